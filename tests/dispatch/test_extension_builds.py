"""The C++ CPU and CUDA C++ extensions as dispatch sees them: which backend serves by default, what a
build failure does (one warning, the reference serves; an error under BERTFAST_STRICT=1), forcing
`cuda` by environment, and both extensions in one process. The kernels' numerics are tested per
op in tests/ops/test_<op>.py. The CUDA ones skip without a GPU; their names carry "gpu" and
"cuda" and they are marked cuda_ext, so benchmarks/gpu_check.sh runs them after the build.
"""
import warnings

import pytest
import torch
from conftest import requires_cuda

import bertfast
import bertfast.dispatch.cpp as cpp
from bertfast import dispatch, ops
from bertfast.dispatch import Call


# ---------------------------------------------------------------------------------------
# build machinery

def test_selected_by_default_on_cpu(monkeypatch):
    monkeypatch.delenv("BERTFAST_BACKEND", raising=False)
    for op in ("embedding_layernorm", "bias_residual_layernorm", "bias_gelu", "gelu_layernorm"):
        assert dispatch.select(op, Call("cpu", torch.float32, 768, "fwd+bwd")).backend == "cpp"
    assert cpp.status()["capability"] in ("AVX512", "AVX2", "DEFAULT")


def test_build_failure_falls_back_with_one_warning(monkeypatch, tmp_path, capfd):
    """A compiler error: the reference serves the op, with one warning quoting the error. The build
    says it started (and roughly how long it takes) before the compiler runs."""
    broken = tmp_path / "csrc" / "cpu"
    broken.mkdir(parents=True)
    (broken / "bias_gelu.cpp").write_text("#error deliberately broken for the test\n")
    (broken / "build_info.cpp").write_text("\n")
    monkeypatch.setenv("BERTFAST_CSRC_DIR", str(tmp_path / "csrc"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("BERTFAST_STRICT", raising=False)
    monkeypatch.setattr(cpp, "_LOADED", None)
    monkeypatch.setattr(cpp, "_state", dict(cpp._state))
    dispatch.reset()
    x, b = torch.randn(4, 8), torch.randn(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with bertfast.use_backend("cpp"):
            y1 = ops.bias_gelu(x, b)
            y2 = ops.bias_gelu(x, b)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1, msgs
    assert "failed to build" in msgs[0] and "deliberately broken" in msgs[0], msgs[0]
    err = capfd.readouterr().err
    # the estimate matches the measured build (tens of seconds on 2 cores), not a stale "2 minutes"
    assert "building the C++ CPU kernels once" in err and "about a minute" in err, err
    torch.testing.assert_close(y1, ops.bias_gelu_ref(x, b))
    assert torch.equal(y1, y2)
    st = cpp.status()
    assert st["state"] == "failed" and "deliberately broken" in st["reason"]
    # another op: its own single warning, from the remembered failure (no second compile)
    calls = []
    monkeypatch.setattr(cpp, "_jit_build", lambda *a: calls.append(a))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with bertfast.use_backend("cpp"):
            ops.gelu_layernorm(x, b, b, b)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "deliberately broken" in msgs[0] and not calls, (msgs, calls)
    # strict mode turns the same fallback into an error
    dispatch.reset()
    monkeypatch.setenv("BERTFAST_STRICT", "1")
    with bertfast.use_backend("cpp"), pytest.raises(dispatch.BackendError, match="failed to build"):
        ops.bias_gelu(x, b)
    dispatch.reset()


@requires_cuda
@pytest.mark.cuda_ext
def test_gpu_cuda_forced_by_env_and_auto_follows_the_table(monkeypatch):
    monkeypatch.setenv("BERTFAST_BACKEND", "cuda")
    for op in ("embedding_layernorm", "bias_gelu", "bias_residual_layernorm", "gelu_layernorm"):
        assert dispatch.select(op, Call("cuda", torch.bfloat16, 768, "fwd+bwd")).backend == "cuda"
    monkeypatch.setenv("BERTFAST_BACKEND", "auto")
    dispatch.reset()
    from bertfast.dispatch import routing

    for op in ("bias_gelu", "bias_residual_layernorm"):
        name, why = dispatch.explain(op, "cuda")
        if routing.table_for(op).source is None:
            assert name == "triton" and "no measurement" in why, (name, why)
        else:
            assert "cuda" in name or "triton" in name, (name, why)


@requires_cuda
@pytest.mark.cuda_ext
def test_gpu_cuda_and_cpu_extensions_load_in_one_process():
    from bertfast.dispatch import cpp, cuda

    cpp.load()
    cuda.load()
    assert hasattr(torch.ops.bertfast, "bias_gelu_cpu_fwd") and hasattr(torch.ops.bertfast, "bias_gelu_cuda_fwd")
    x, b = torch.randn(4, 8), torch.randn(8)
    torch.testing.assert_close(torch.ops.bertfast.bias_gelu_cpu_fwd(x, b, False, False).cuda(),
                               torch.ops.bertfast.bias_gelu_cuda_fwd(x.cuda(), b.cuda(), False))
