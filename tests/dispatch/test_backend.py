"""Backend selection (bertfast/dispatch): env switch, use_backend, probing, one warning per
fallback, strict mode."""
import warnings

import pytest
import torch

import bertfast
from bertfast import dispatch, ops
from bertfast.dispatch import Call, core
from bertfast.dispatch.serves import Serves
from bertfast.dispatch.table import Implementation

CPU32 = Call("cpu", torch.float32, 8)


def _x():
    return torch.randn(4, 8), torch.randn(8)


def test_reference_serves_when_forced(monkeypatch):
    monkeypatch.setenv("BERTFAST_BACKEND", "reference")
    assert dispatch.select("bias_gelu", CPU32).backend == "reference"
    with bertfast.use_backend("auto"):
        assert dispatch.requested() == "auto"
    assert dispatch.requested() == "reference"


def test_bad_backend_names():
    with pytest.raises(ValueError, match="use_backend"):
        with bertfast.use_backend("fastest"):
            pass
    with pytest.raises(ValueError, match="BERTFAST_BACKEND"):
        import os

        os.environ["BERTFAST_BACKEND"] = "nope"
        try:
            dispatch.requested()
        finally:
            del os.environ["BERTFAST_BACKEND"]


def _register_fake(name, fwd, devices=("cpu",), load=None, bwd=None):
    """A fake row `name` of bias_gelu (forced as backend `name`), declared for `devices`."""
    spec = core.spec("bias_gelu")
    saved = dict(spec.rows)
    bwd = bwd or spec.reference.bwd

    def loader():
        if load is not None:
            load()
        return fwd, bwd

    core.register_impl("bias_gelu", Implementation("bias_gelu", name, name, Serves(devices=devices), loader),
                       first=True)
    return spec, saved


def _restore(spec, saved):
    spec.rows.clear()
    spec.rows.update(saved)
    dispatch.reset()


def test_failed_probe_falls_back_with_one_warning(monkeypatch):
    spec, saved = _register_fake("cuda", lambda x, b, a: x * 0 + 1, devices=("cpu",))  # wrong answers
    try:
        x, b = _x()
        with bertfast.use_backend("cuda"):
            with pytest.warns(RuntimeWarning, match="bias_gelu cannot use backend 'cuda' .*probe failed"):
                y = ops.bias_gelu(x, b)
            torch.testing.assert_close(y, ops.bias_gelu_ref(x, b))
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the second call warns no more
                ops.bias_gelu(x, b)
    finally:
        _restore(spec, saved)


def test_failed_load_is_an_error_in_strict_mode(monkeypatch):
    def load():
        raise RuntimeError("compiler exploded")

    spec, saved = _register_fake("cuda", lambda x, b, a: x, load=load)
    try:
        monkeypatch.setenv("BERTFAST_STRICT", "1")
        with bertfast.use_backend("cuda"):
            with pytest.raises(dispatch.BackendError, match="compiler exploded"):
                ops.bias_gelu(*_x())
    finally:
        _restore(spec, saved)


def test_a_good_backend_is_probed_once_and_used(monkeypatch):
    calls = []

    def fwd(x, b, a):
        calls.append(1)
        return ops.bias_gelu_ref(x, b, a)

    spec, saved = _register_fake("cuda", fwd)
    try:
        with bertfast.use_backend("cuda"):
            for _ in range(3):
                ops.bias_gelu(*_x())
        assert len(calls) == 4  # one probe + three calls
        assert dispatch.explain("bias_gelu", "cpu")[0] != "cuda"  # auto on CPU does not try 'cuda'
    finally:
        _restore(spec, saved)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("BERTFAST_STRICT", "1")
    with bertfast.use_backend("triton"):
        with pytest.raises(dispatch.BackendError, match="TRITON_INTERPRET"):
            ops.bias_gelu(*_x())


def test_info_lists_every_op():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = bertfast.info(print_=False)
    for op in ops.OPS:
        assert f"{op}@cpu" in d["backends"]
        # one implementation, or a forward's and a backward's ("aten_flash+cpp")
        names = {r.name for r in core.spec(op).rows.values()}
        assert set(d["backends"][f"{op}@cpu"]["backend"].split("+")) <= names
    assert d["torch"] == torch.__version__


def test_cli_info_runs():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "bertfast", "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "bias_residual_layernorm@cpu" in out.stdout
    # the extension's row agrees with the table below it: C++ serving an op means it is loaded
    rows = dict(line.split(None, 1) for line in out.stdout.splitlines() if len(line.split(None, 1)) == 2)
    cpp_serves = any(v.split()[0] == "cpp" for k, v in rows.items() if k.endswith("@cpu"))
    loaded = rows["cpp_extension"].split(",")[0] in ("built", "cached", "prebuilt")
    assert cpp_serves == loaded, rows["cpp_extension"]


def test_backward_uses_the_backend_the_forward_was_asked_for():
    calls = []
    ref = core.spec("bias_gelu").reference

    def bwd(*a):
        calls.append("bwd")
        return ref.bwd(*a)

    spec, saved = _register_fake("cuda", ref.fwd, bwd=bwd)
    try:
        x = torch.randn(4, 8, requires_grad=True)
        with bertfast.use_backend("cuda"):
            y = ops.bias_gelu(x, torch.randn(8))
        y.sum().backward()  # outside the block
        assert calls == ["bwd"]
    finally:
        _restore(spec, saved)


def test_cuda_backend_is_never_built_for_cpu_tensors(monkeypatch):
    """Forcing `cuda` on CPU tensors falls back without trying to build the CUDA extension; and
    where torch has no CUDA, loading it fails at once with the reason (no nvcc is run)."""
    from bertfast.dispatch import cuda as _cuda

    monkeypatch.setattr(_cuda, "_jit_build", lambda src: pytest.fail("tried to build the CUDA kernels"))
    with bertfast.use_backend("cuda"):
        with pytest.warns(RuntimeWarning, match="cuda: does not serve cpu tensors"):
            ops.bias_gelu(*_x())
    assert _cuda.status()["state"] in ("not loaded", "cached", "built", "failed")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="not a CUDA build|no CUDA device"):
            _cuda.load()
