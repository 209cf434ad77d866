"""bias_residual_layernorm_bf16 (bertfast/ops/bias_residual_layernorm_bf16.py), the bf16 CPU inference
add-and-norm: its C++ kernel (csrc/cpu/bias_residual_layernorm_bf16.cpp) against its
plain-PyTorch reference, and the bf16 encoder that uses them.

Accuracy rule (docs/testing.md): against the float64 oracle (the reference on the same inputs in
float64), the kernel's error stays within 2x the error of eager PyTorch in the same precision
(the reference on the same bf16 / fp32 inputs: fp32 arithmetic, each output rounded once), plus
the C++ floors. The kernel is forced (`cpp`, BERTFAST_STRICT=1), so a silent fallback fails.
"""
import pytest
import torch

import bertfast
import bertfast.dispatch.cpp as cpp
import bertfast.models._engine as engine
from bertfast import BertConfig, BertModel
from bertfast.dispatch import cpu_gemm
from bertfast.ops import bias_residual_layernorm_bf16, bias_residual_layernorm_bf16_ref
from bertfast.ops.bias_residual_layernorm_bf16 import select
from bertfast.testing import ODD_BERT
from conftest import assert_within_eager_error

FLOOR = {torch.float32: 2e-6, torch.bfloat16: 4e-3}
OP_NAME = "bias_residual_layernorm_bf16"
HAS_BF16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@pytest.fixture(scope="module", autouse=True)
def _built():
    cpp.load()  # a build failure is an error here, not a skip
    assert cpp.status()["state"] in ("built", "cached", "prebuilt"), cpp.status()


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    monkeypatch.setenv("BERTFAST_STRICT", "1")


def _inputs(rows, n, x_dtype, res_dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=g) * 2).to(x_dtype)
    res = (torch.randn(rows, n, generator=g) * 3 + 0.5).to(res_dtype)
    b = torch.randn(n, generator=g) if bias else None
    w = torch.randn(n, generator=g)
    lb = torch.randn(n, generator=g)
    return x, b, res, w, lb


def _oracle(x, b, res, w, lb, eps):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return bias_residual_layernorm_bf16_ref(d(x), d(b), d(res), d(w), d(lb), eps, low=False)[0]


@pytest.mark.parametrize("n", [1, 17, 384, 1000])
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("x_dtype, res_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.float32, torch.float32)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_vs_reference(n, rows, x_dtype, res_dtype, bias):
    x, b, res, w, lb = _inputs(rows, n, x_dtype, res_dtype, bias, seed=n + rows)
    with torch.inference_mode(), bertfast.use_backend("cpp"):
        assert select("cpu", n).backend == "cpp"
        out, low = bias_residual_layernorm_bf16(x, b, res, w, lb, 1e-5)
    eager, eager_low = bias_residual_layernorm_bf16_ref(x, b, res, w, lb, 1e-5)
    oracle = _oracle(x, b, res, w, lb, 1e-5)
    assert out.dtype == res_dtype and low.dtype == torch.bfloat16
    assert_within_eager_error(["out"], [out], [eager], [oracle], FLOOR[res_dtype])
    assert_within_eager_error(["low"], [low], [eager_low], [oracle], FLOOR[torch.bfloat16])
    # the bf16 copy is the cast of the result, bit for bit (one rounding, to nearest even)
    assert torch.equal(low, out.to(torch.bfloat16))


def test_non_contiguous_and_batched_inputs():
    x, b, res, w, lb = _inputs(2 * 3 * 40, 33, torch.bfloat16, torch.float32)
    xt = x.view(33, 240).t()  # (240, 33), transposed: not contiguous
    rt = res.view(33, 240).t()
    wide = torch.randn(33, 2)[:, 0]  # a strided vector
    with torch.inference_mode(), bertfast.use_backend("cpp"):
        out, low = bias_residual_layernorm_bf16(xt, b, rt, wide, lb, 1e-12)
        out3, low3 = bias_residual_layernorm_bf16(xt.contiguous().view(6, 40, 33), b, rt.contiguous().view(6, 40, 33),
                                                  wide.contiguous(), lb, 1e-12)
    ref, ref_low = bias_residual_layernorm_bf16_ref(xt, b, rt, wide, lb, 1e-12)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out3.shape == (6, 40, 33) and torch.equal(out3.view(240, 33), out)
    assert torch.equal(low3.view(240, 33), low) and torch.equal(low, out.to(torch.bfloat16))


def test_writes_into_given_buffers_and_over_the_residual():
    x, b, res, w, lb = _inputs(9, 384, torch.bfloat16, torch.float32)
    ref, ref_low = bias_residual_layernorm_bf16_ref(x, b, res, w, lb, 1e-12)
    with torch.inference_mode(), bertfast.use_backend("cpp"):
        sel = select("cpu", 384)
        out, low = torch.empty(9, 384), torch.empty(9, 384, dtype=torch.bfloat16)
        y, lo = sel.fwd(x, b, res, w, lb, 1e-12, out, low, True)
        assert y.data_ptr() == out.data_ptr() and lo.data_ptr() == low.data_ptr()
        same = res.clone()
        y2, lo2 = sel.fwd(x, b, same, w, lb, 1e-12, same, None, False)  # a row is read before it is written
        assert y2.data_ptr() == same.data_ptr() and lo2 is None
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(y2, out) and torch.equal(low, out.to(torch.bfloat16))


def test_reference_serves_when_forced_and_agrees():
    x, b, res, w, lb = _inputs(5, 17, torch.bfloat16, torch.float32)
    with torch.inference_mode():
        with bertfast.use_backend("reference"):
            assert select("cpu", 17).backend == "reference"
            r, rl = bias_residual_layernorm_bf16(x, b, res, w, lb)
        with bertfast.use_backend("cpp"):
            c, cl = bias_residual_layernorm_bf16(x, b, res, w, lb)
    torch.testing.assert_close(c, r, atol=1e-5, rtol=1e-5)
    assert (cl.float() - rl.float()).abs().max() <= 2 ** -7 * r.abs().max()  # at most one bf16 rounding apart


def test_bad_input_is_named():
    x, b, res, w, lb = _inputs(3, 8, torch.bfloat16, torch.float32)
    with torch.inference_mode():
        with pytest.raises(TypeError, match="residual must be bfloat16 or float32"):
            bias_residual_layernorm_bf16(x, b, res.half(), w, lb)
        with pytest.raises(ValueError, match="residual must have the shape of x"):
            bias_residual_layernorm_bf16(x, b, res[:2], w, lb)
        with pytest.raises(ValueError, match="bias must have shape"):
            bias_residual_layernorm_bf16(x, b[:5], res, w, lb)
    with pytest.raises(RuntimeError, match="inference only"):
        bias_residual_layernorm_bf16(x, b, res, w.requires_grad_(), lb)


# ---------------------------------------------------------------------------------------
# the bf16 encoder: no fp32 <-> bf16 pass between its kernels

def _profile_counts(model, ids, mask):
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(ids, mask)  # first call: GEMM choices, packing and the kernels' one-time probes
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        out = model(ids, mask).last_hidden_state
    counts = {}
    for e in prof.events():
        counts[e.name] = counts.get(e.name, 0) + 1
    return out, counts


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no AVX512-BF16 / AMX: bf16 inference is refused")
@pytest.mark.parametrize("padded", [False, True])
def test_bf16_encoder_casts_once_per_forward(monkeypatch, tmp_path, padded):
    """Each add-and-norm writes the fp32 residual and the next GEMM's bf16 rows in one pass, so a
    forward converts activations between fp32 and bf16 once (the embeddings' output), not four
    times per layer; the numbers are those of the casting path, bit for bit."""
    monkeypatch.setenv("BERTFAST_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("BERTFAST_CPU_GEMM", "onednn")
    monkeypatch.delenv("BERTFAST_STRICT")
    cpu_gemm.forget_choices()
    torch.manual_seed(0)
    cfg = BertConfig(**{**ODD_BERT, "num_hidden_layers": 3})
    model = BertModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, cfg.vocab_size, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 7:] = 0
    fp32_copies = _profile_counts(model, ids, mask)[1].get("aten::_to_copy", 0)  # conversions besides the GEMMs'
    model.set_inference_precision("bf16")
    out, counts = _profile_counts(model, ids, mask)
    layers = cfg.num_hidden_layers
    assert counts.get("bertfast::bias_residual_layernorm_bf16_cpu_fwd", 0) == 2 * layers, counts
    assert counts.get("aten::_to_copy", 0) <= fp32_copies + 1, (fp32_copies, counts.get("aten::_to_copy"))
    # the same forward through the casting path (no bf16 add-and-norm): the same numbers
    monkeypatch.setattr(engine, "select_add_norm_bf16", lambda *a: None)
    ref, ref_counts = _profile_counts(model, ids, mask)
    assert ref_counts.get("aten::_to_copy", 0) >= fp32_copies + 4 * layers
    assert torch.equal(out, ref)
    cpu_gemm.forget_choices()


def test_bertfast_verify_probes_it_in_bf16(capsys):
    """`bertfast verify` runs the kernel against the reference (in bf16, the dtype it serves), not a skip."""
    from bertfast.verify import verify_numerics

    assert verify_numerics(["cpp"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(OP_NAME)]
    assert rows and all(" ok " in line and "skip" not in line for line in rows), rows
