"""Fuzz the public ops (tests/ops/fuzz_ops_worker.py) in a child process: random shapes, strides,
dtypes, values (inf, nan, 1e30), offsets, masks and ids, valid and not. The process must not
crash; every accepted call matches the reference on every backend, every rejected one raises the
same ValueError / TypeError / IndexError naming an argument. A bounded, derandomized number of
examples (BERTFAST_FUZZ_EXAMPLES, 25 per op by default) keeps it well under a minute."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_fuzz_public_ops_in_a_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "ops", "fuzz_ops_worker.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    report = f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, report  # a negative code is a signal: the process crashed
    assert "FUZZ OK" in proc.stdout, report
