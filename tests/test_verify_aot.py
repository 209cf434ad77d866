"""`bertfast verify --aot sm_90a --aot sm_80`: every Triton kernel configuration compiles for
Hopper and Ampere on this GPU-less machine (ptxas and cuobjdump ship with triton).

The sweep covers the configurations that can differ (bertfast.verify.plan):
- the attention kernels: every tile list of each GPU family, for that family's architecture
  (their code differs by target: mma.sync on sm_80, wgmma and tensor descriptors on sm_90a);
- the LayerNorm/GELU kernels: every configuration for sm_90a, and for sm_80 one per kernel, its
  largest tile. The other sm_80 compiles cannot differ in what they check: these kernels use no
  tensor-core dot and no descriptor, so Triton turns a configuration into the same TTGIR for
  sm_80 as for sm_90a (checked when this was written: identical apart from the target name) and
  the configurations of one kernel differ from each other only in tile sizes, which the sm_90a
  pass covers; what sm_80 adds is the lowering of the kernel's operations (bf16 conversions,
  shuffles) to sm_80 PTX and ptxas, the same operations at every tile size.

It runs in a subprocess without TRITON_INTERPRET (conftest sets it for the interpreter tests;
jitted functions cannot be compiled under it), two compiles at a time, and relays verify's
progress lines as it goes. Compiles are cached by Triton (~/.triton/cache, or TRITON_CACHE_DIR),
so only the first run pays for them: 218 compiles, most of the time in the attention kernels.
"""
import os
import re
import subprocess
import sys
import threading

import pytest
from conftest import progress, requires_triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("sm_90a", "sm_80")


def _expected():
    """(module.kernel, config, arch) of every compile the sweep must report: bertfast.verify.plan
    over every aot_specs() entry."""
    import bertfast.verify as v

    specs = [(name, idx, s) for name, mod in v.kernel_modules() if hasattr(mod, "aot_specs")
             for idx, s in enumerate(mod.aot_specs())]
    return [(f"{name}.{s['kernel']}", s["config"], arch) for name, _idx, s, arch in v.plan(specs, ARCHS)]


def test_sweep_plan_compiles_the_neutral_kernels_once_per_extra_arch():
    import bertfast.verify as v

    plan = _expected()
    norm = [(k, c, a) for k, c, a in plan if not k.startswith("attention.")]
    kernels = {k for k, _c, _a in norm}
    assert kernels and all(sum(1 for k2, _c, a in norm if k2 == k and a == "sm_80") == 1 for k in kernels)
    assert all(any(k2 == k and a == "sm_90a" for k2, _c, a in norm) for k in kernels)
    # the attention tile lists: each family's configurations for its own architecture only
    attn = [(c, a) for k, c, a in plan if k.startswith("attention.")]
    assert attn and all(c.startswith("[sm90]") == (a == "sm_90a") for c, a in attn)
    # --full: every configuration for every architecture requested
    specs = [(n, i, s) for n, m in v.kernel_modules() if n == "bias_gelu" for i, s in enumerate(m.aot_specs())]
    assert len(v.plan(specs, ARCHS, full=True)) == 2 * len(specs)


def _run_verify(cmd, env, timeout):
    """verify's stdout (the table), relaying its stderr progress lines (one per compile) every
    10 compiles and on failures, so the minutes of compiling show on the terminal as they pass."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines = []

    def relay():
        for line in proc.stderr:
            err_lines.append(line)
            m = re.match(r"\[(\d+)/(\d+)\]", line)
            if line.startswith("verify --aot:") or " FAIL " in line or (m and (int(m.group(1)) % 10 == 0
                                                                              or m.group(1) == m.group(2))):
                progress(line.rstrip())

    t = threading.Thread(target=relay, daemon=True)
    t.start()
    try:
        out = proc.stdout.read()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:  # pragma: no cover - report what was compiled
        proc.kill()
        pytest.fail(f"verify --aot timed out:\n{''.join(err_lines)[-3000:]}")
    t.join(timeout=10)
    return proc.returncode, out, "".join(err_lines)


@requires_triton
def test_verify_aot_compiles_every_kernel_config():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "bertfast", "verify", *(a for arch in ARCHS for a in ("--aot", arch)), "--jobs", "2"]
    rc, out, err = _run_verify(cmd, env, timeout=1800)
    assert rc == 0, f"verify --aot exited {rc}\n{out[-6000:]}\n{err[-3000:]}"
    lines = out.splitlines()
    expected = _expected()
    assert expected, "no aot_specs() entries discovered"
    for kernel, config, arch in expected:
        assert any(line.startswith(kernel + " ") and config in line and f" {arch} " in line for line in lines), (
            kernel, config, arch)
    rows = [line for line in lines if any(f" {a} " in line for a in ARCHS)]
    assert len(rows) == len(expected), (len(rows), len(expected))
    assert not any(" FAIL " in line for line in rows)
    # the LayerNorm/GELU family: every config it compiled has a register count
    for kernel, config, arch in expected:
        if kernel.split(".")[0] in ("bias_gelu", "bias_residual_layernorm", "gelu_layernorm", "embedding_layernorm"):
            hits = [line for line in rows if line.startswith(kernel + " ") and config in line and f" {arch} " in line]
            assert hits and all(line.split()[len(config.split()) + 2].isdigit() for line in hits), hits


def test_verify_aot_rejects_bad_arch():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "bertfast", "verify", "--aot", "volta"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "sm_90a" in proc.stderr + proc.stdout


@requires_triton
def test_verify_aot_reexecs_without_interpreter():
    """Under TRITON_INTERPRET=1 (as in this test session) verify --aot re-runs itself without it."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "bertfast", "verify", "--aot", "sm_90a", "--kernel", "_bias_gelu_fwd"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sum(line.startswith("bias_gelu._bias_gelu_fwd_kernel ") for line in proc.stdout.splitlines()) == 6
