"""The C++ op tests again under every lower ATen CPU capability this machine has.

ATen picks its vectorised kernels (GEMMs, softmax, its flash attention, the eager ops the accuracy
rule measures) by CPU capability: AVX-512, AVX2 or the portable `default`. A suite tuned on an
AVX-512 machine can fail on an AVX2 one, so on an AVX-512 machine the C++ cases of the op tests
(`pytest tests/ops -k cpp`) rerun here in a subprocess with ATEN_CPU_CAPABILITY=avx2 and =default.

The extension itself stays the one this machine built (BERTFAST_CPU_CAPABILITY pinned to it): a
build per capability is minutes of compiling each, too much for every run. Set
BERTFAST_TEST_CPU_BUILDS=1 to build and test the extension for each lower capability as well.
"""
import os
import subprocess
import sys

import pytest
import torch

import bertfast.dispatch.cpp as cpp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RANK = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}


def _machine_capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability().upper()
    except Exception:  # noqa: BLE001 - old torch or not x86: nothing lower to try
        return "DEFAULT"


@pytest.mark.parametrize("cap", ["AVX2", "DEFAULT"])
def test_cpp_ops_under_lower_aten_capability(cap):
    # what ATen would use without the variable: ATEN_CPU_CAPABILITY may already lower it
    here = _machine_capability()
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        pytest.skip("this process already runs under ATEN_CPU_CAPABILITY")
    if RANK.get(here, 0) <= RANK[cap]:
        pytest.skip(f"this machine's ATen runs {here}: nothing lower than it to try with {cap}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap.lower())
    if os.environ.get("BERTFAST_TEST_CPU_BUILDS") != "1":
        env["BERTFAST_CPU_CAPABILITY"] = cpp.capability()
    script = ("import sys, torch, pytest; print('capability', torch.backends.cpu.get_cpu_capability()); "
              "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/ops', '-k', 'cpp']))")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    out = r.stdout + r.stderr
    assert f"capability {cap}" in out, out[-2000:]  # ATen really switched
    assert r.returncode == 0, f"pytest tests/ops -k cpp under ATEN_CPU_CAPABILITY={cap.lower()}:\n{out[-6000:]}"
