"""`bertfast verify --aot sm_90a --aot sm_80`: every Triton kernel configuration compiles for
Hopper and Ampere on this GPU-less machine (ptxas and cuobjdump ship with triton).

It runs in a subprocess without TRITON_INTERPRET (conftest sets it for the interpreter tests;
jitted functions cannot be compiled under it). Compiles are cached by Triton
(~/.triton/cache), so only the first run pays for them, most of it for the attention kernels.
"""
import os
import subprocess
import sys

import pytest
from conftest import requires_triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("sm_90a", "sm_80")


def _expected():
    """(module.kernel, config) -> the archs it must be compiled for (every requested arch, or the
    ones a spec's "archs" names among them)."""
    import bertfast.verify as v

    return [(f"{name}.{s['kernel']}", s["config"], [a for a in ARCHS if v._meant_for(s, a, ARCHS)])
            for name, mod in v.kernel_modules() if hasattr(mod, "aot_specs") for s in mod.aot_specs()]


@requires_triton
def test_verify_aot_compiles_every_kernel_config():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "bertfast", "verify", *(a for arch in ARCHS for a in ("--aot", arch)), "--jobs", "2"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired as e:  # pragma: no cover - report what was compiled
        pytest.fail(f"verify --aot timed out:\n{(e.stdout or '')[-3000:]}")
    out = proc.stdout
    assert proc.returncode == 0, f"verify --aot exited {proc.returncode}\n{out[-6000:]}\n{proc.stderr[-3000:]}"
    lines = out.splitlines()
    expected = _expected()
    assert expected, "no aot_specs() entries discovered"
    for kernel, _config, archs in expected:
        for arch in archs:
            assert any(line.startswith(kernel + " ") and f" {arch} " in line for line in lines), (kernel, arch)
    rows = [line for line in lines if any(f" {a} " in line for a in ARCHS)]
    assert len(rows) == sum(len(a) for _k, _c, a in expected), (len(rows), len(expected))
    assert not any(" FAIL " in line for line in rows)
    # my kernels: the LayerNorm/GELU family has every config in the table, with a register count
    for kernel, config, archs in expected:
        if kernel.split(".")[0] in ("bias_gelu", "bias_residual_layernorm", "gelu_layernorm", "embedding_layernorm"):
            hits = [line for line in rows if line.startswith(kernel + " ") and config in line]
            assert len(hits) == len(archs), (kernel, config)
            assert all(line.split()[len(config.split()) + 2].isdigit() for line in hits), hits


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
