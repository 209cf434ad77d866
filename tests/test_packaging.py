"""A normal (non-editable) install ships kernels/ as bertfast.kernels and no top-level `kernels`."""
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {r.stderr.strip().splitlines()[-1:]}")
    (whl,) = [p for p in out.iterdir() if p.suffix == ".whl"]
    return whl


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert "kernels" not in top, "a top-level `kernels` module must not be installed"
    assert top <= {"bertfast", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top
    for mod in ("attention", "bias_gelu", "bias_residual_layernorm", "embedding_layernorm", "gelu_layernorm", "_rng"):
        assert f"bertfast/kernels/{mod}.py" in names
    assert any(n.startswith("bertfast/csrc/cpu/") and n.endswith(".cpp") for n in names)
    assert "bertfast/routing_tables/layernorm_family.json" in names


def test_installed_layout_imports(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = ("import importlib.util, bertfast, bertfast.ops; "
            f"assert bertfast.__file__.startswith({str(tmp_path)!r}), bertfast.__file__; "
            "assert importlib.util.find_spec('bertfast.kernels') is not None; "
            "assert importlib.util.find_spec('kernels') is None, 'top-level kernels importable'; print('ok')")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
