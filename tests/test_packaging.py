"""kernels/ is `bertfast.kernels` in a wheel, an editable install and a bare checkout alike, and never
a top-level `kernels` module: that name is Hugging Face's package, which transformers imports."""
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
    assert "bertfast/dispatch/routing_tables/layernorm_family.json" in names
    assert "bertfast/csrc/cuda/common.cuh" in names and "bertfast/csrc/cuda/bias_gelu.cu" in names


def test_installed_layout_imports(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = ("import importlib.util, bertfast, bertfast.ops; "
            f"assert bertfast.__file__.startswith({str(tmp_path)!r}), bertfast.__file__; "
            "assert importlib.util.find_spec('bertfast.kernels') is not None; "
            "s = importlib.util.find_spec('kernels'); "
            f"assert s is None or not (s.origin or '').startswith({str(tmp_path)!r}), s; print('ok')")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_triton_is_an_extra_not_a_dependency(wheel):
    """A CPU-only install does not pay ~1 GB for Triton: it comes with a CUDA torch (at torch's own
    pin) or through the `triton`/`test` extras, never as a plain requirement."""
    meta = zipfile.ZipFile(wheel).read(
        next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA"))).decode()
    reqs = [ln.split(":", 1)[1].strip() for ln in meta.splitlines() if ln.startswith("Requires-Dist:")]
    tri = [r for r in reqs if r.split(";")[0].strip().lower().startswith("triton")]
    assert tri and all("extra ==" in r for r in tri), tri
    assert any('extra == "triton"' in r for r in tri) and any('extra == "test"' in r for r in tri), tri
    assert all(r.split(";")[0].strip().lower() == "triton" for r in tri), "unpinned: torch's pin decides"


def test_cpu_use_without_triton():
    """With triton absent, import, a CPU forward (C++ or reference backend) and `info` work."""
    code = ("import sys; sys.modules['triton'] = None\n"  # import triton raises ImportError
            "import warnings, torch, bertfast\n"
            "from bertfast import BertConfig, BertModel\n"
            "cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, "
            "intermediate_size=64)\n"
            "m = BertModel(cfg).eval()\n"
            "with torch.no_grad(): out = m(torch.randint(0, 50, (2, 7))).last_hidden_state\n"
            "assert torch.isfinite(out).all()\n"
            "d = bertfast.info(print_=False)\n"
            "assert d['triton'].startswith('not available'), d['triton']\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def _run_from_root(code, path_entries=None):
    env = dict(os.environ)
    if path_entries is not None:
        env["PYTHONPATH"] = os.pathsep.join(path_entries)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)


def test_transformers_imports_from_the_repository_root():
    """`python -c` / `python -m` from the root put the root first on sys.path: our kernels/ folder must
    not shadow Hugging Face's `kernels` (transformers >= 5.25 imports it at `import transformers`)."""
    pytest.importorskip("transformers")
    code = ("import bertfast, transformers\n"
            "from transformers import BertModel\n"
            "import bertfast.kernels, importlib.util, os\n"
            "spec = importlib.util.find_spec('kernels')\n"
            f"root = os.path.realpath({ROOT!r})\n"
            "ours = os.path.realpath(os.path.join(root, 'kernels'))\n"
            "if spec is not None:\n"
            "    import kernels\n"
            "    assert not os.path.realpath(kernels.__file__).startswith(ours), kernels.__file__\n"
            "assert os.path.realpath(bertfast.kernels.__file__).startswith(ours), bertfast.kernels.__file__\n"
            "print('ok')\n")
    r = _run_from_root(code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_the_root_offers_no_top_level_kernels():
    """With only the checkout's root on sys.path (no installed `kernels` anywhere), `import kernels`
    fails as if the folder were not there, and `bertfast.kernels` imports from the same root."""
    code = ("import sys\n"
            "sys.path[:] = [p for p in sys.path if 'site-packages' not in p and 'dist-packages' not in p]\n"
            "try:\n"
            "    import kernels\n"
            "except ModuleNotFoundError as e:\n"
            "    assert e.name == 'kernels', e\n"
            "else:\n"
            "    raise AssertionError('a top-level kernels imported: ' + repr(kernels))\n"
            "assert 'kernels' not in sys.modules\n"
            "import importlib.util\n"
            "assert importlib.util.find_spec('bertfast.kernels') is not None\n"
            "print('ok')\n")
    r = _run_from_root(code, [ROOT])
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_a_lazy_export_named_like_its_module_stays_the_export():
    """`bertfast.train.finetune` is the function even after another name of its module loaded the
    module (an import binds a submodule to its package under its own name)."""
    code = ("import bertfast.train as t, bertfast.tasks as k; t.NLI_LABELS; t.evaluate_pretraining; "
            "from bertfast.train import finetune, pretrain; "
            "assert callable(finetune) and callable(pretrain), (finetune, pretrain); "
            "assert all(callable(getattr(k, n)) or not isinstance(getattr(k, n), type(t)) for n in k.__all__)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
