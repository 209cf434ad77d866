"""bias_residual_layernorm (bertfast/ops/bias_residual_layernorm.py): LN(dropout(x + bias) + residual),
every implementation against the reference.

The implementation is the test parameter (tests/ops/_op_cases.py: forced through the dispatch
table under BERTFAST_STRICT=1, the selected row checked). Accuracy rule: docs/testing.md; dropout
masks are compared bit for bit (every implementation draws the reference's Philox stream).
"""
import importlib

import pytest
import torch
import torch.nn.functional as F
from _op_cases import (DEVICE, NORM_FLOOR, SEED, assert_repeats_bitwise, check_inplace, check_one_row, check_op, forced,
                       gpu_big_cases, gpu_big_rows, gradcheck_inputs, impl_param, impls, low_and_params, norm_cases,
                       norm_rows, rand, require_gpu, row, run_op, same_with_1_and_2_threads,
                       strict_impl)  # noqa: F401 - strict_impl: the autouse fixture

from bertfast import ops
from bertfast.dispatch import Call

OP = "bias_residual_layernorm"
NAMES = ["out", "dx", "dbias", "dresidual", "dweight", "dln_bias"]
NAMES_NO_BIAS = ["out", "dx", "dresidual", "dweight", "dln_bias"]


def _ref_mod():
    return importlib.import_module(f"bertfast.ops.{OP}")


def _fns(eps=1e-5, p=0.0):
    return (lambda x, b, r, w, lb: ops.bias_residual_layernorm(x, b, r, w, lb, eps, p),
            lambda x, b, r, w, lb: ops.bias_residual_layernorm_ref(x, b, r, w, lb, eps))


def _inputs(rows, n, dtype, g, device, param_dtype=None, has_bias=True):
    """x, bias (or None), residual, weight, ln_bias."""
    p = param_dtype or dtype
    x, r = rand(*rows, n, dtype=dtype, gen=g, device=device), rand(*rows, n, dtype=dtype, gen=g, device=device)
    b = rand(n, dtype=dtype, gen=g, device=device) if has_bias else None
    return [x, b, r, rand(n, dtype=p, gen=g, device=device, shift=1.0), rand(n, dtype=p, gen=g, device=device)]


@pytest.mark.parametrize("impl, dtype, n, has_bias",
                         norm_cases("cpp", "triton", "cuda", extra=((True, "bias"), (False, "nobias"))))
def test_bias_residual_layernorm_matches_oracle(impl, dtype, n, has_bias):
    g = torch.Generator().manual_seed(n)
    dev, rows = DEVICE[impl], norm_rows(impl, n)
    low, params = low_and_params(impl, dtype)
    inputs = _inputs(rows, n, low, g, dev, params, has_bias)
    dy = rand(*rows, n, dtype=low, gen=g, device=dev)
    check_op(impl, *_fns(), inputs, dy, NAMES if has_bias else NAMES_NO_BIAS, NORM_FLOOR[impl][dtype])


@pytest.mark.parametrize("impl", impls("cpp", "triton", "cuda"))
def test_bias_residual_layernorm_one_row(impl):
    check_one_row(impl, _inputs, _fns(), NAMES)


@pytest.mark.parametrize("impl", impls("reference"))
def test_bias_residual_layernorm_gradcheck(impl):
    x, r, b = gradcheck_inputs(4, 7, 17), gradcheck_inputs(4, 7, 17, seed=1), gradcheck_inputs(17)
    w, lb = gradcheck_inputs(17, seed=2), gradcheck_inputs(17, seed=3)
    with forced(impl):
        assert torch.autograd.gradcheck(lambda *a: ops.bias_residual_layernorm(*a, eps=1e-5), (x, b, r, w, lb))
        assert torch.autograd.gradcheck(lambda x, r, w, lb: ops.bias_residual_layernorm(x, None, r, w, lb, 1e-5),
                                        (x, r, w, lb))


@pytest.mark.parametrize("impl", impls("cpp", "triton"))
def test_bias_residual_layernorm_non_contiguous_3d(impl):
    """A transposed x and a strided residual in a 3-d batch: the accuracy rule holds."""
    g = torch.Generator().manual_seed(2)
    dev = DEVICE[impl]
    x = rand(2, 33, 3, gen=g, device=dev).transpose(1, 2)  # (2, 3, 33) non-contiguous
    r = rand(2, 3, 66, gen=g, device=dev)[..., ::2]  # strided last dim
    b, w, lb = rand(33, gen=g, device=dev), rand(33, gen=g, device=dev, shift=1.0), rand(33, gen=g, device=dev)
    dy = rand(2, 3, 33, gen=g, device=dev)
    assert not x.is_contiguous() and not r.is_contiguous()
    check_op(impl, *_fns(), [x, b, r, w, lb], dy, NAMES, NORM_FLOOR[impl][torch.float32])


@pytest.mark.parametrize("impl", impls("cpp"))
def test_bias_residual_layernorm_strided_rows_and_entry_point(impl):
    """Strided rows, a transposed residual, strided parameters: the reference's result, through the
    public op and through the C++ row's own entry point (which makes its inputs contiguous)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2 * 384, generator=g)[:, ::2]
    r = torch.randn(384, 64, generator=g).t()
    b, w, lb = torch.randn(3, 2 * 384, generator=g)[:, ::2].unbind(0)
    assert not x.is_contiguous() and not r.is_contiguous() and not b.is_contiguous()
    with forced(impl):
        got = ops.bias_residual_layernorm(x, b, r, w, lb)
    with forced("reference"):
        ref = ops.bias_residual_layernorm(x, b, r, w, lb)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    fwd, _ = row(OP, impl, Call("cpu", torch.float32, 384, "fwd"))
    out, mean, rstd = fwd(x, b, r, w, lb, 1e-12, 0.0, 0)
    torch.testing.assert_close(out, ops.bias_residual_layernorm_ref(x, b, r, w, lb), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", impls("triton"))
def test_bias_residual_layernorm_many_rows_partial_sums(impl):
    """More row tiles than programs: exercises the strided loop and the (G, N) partial sums."""
    g = torch.Generator().manual_seed(3)
    dev = DEVICE[impl]
    inputs, dy = _inputs((70,), 40, torch.float32, g, dev), rand(70, 40, gen=g, device=dev)
    check_op(impl, *_fns(), inputs, dy, NAMES, NORM_FLOOR[impl][torch.float32])


@pytest.mark.parametrize("impl", impls("cpp"))
def test_bias_residual_layernorm_without_bias(impl):
    g = torch.Generator().manual_seed(3)
    x, r = (torch.randn(21, 300, generator=g) for _ in range(2))
    w, lb = torch.randn(300, generator=g), torch.randn(300, generator=g)
    dy = torch.randn(21, 300, generator=g)
    got = run_op(lambda x, r, w, lb: ops.bias_residual_layernorm(x, None, r, w, lb), [x, r, w, lb], dy, impl)
    ref = run_op(lambda x, r, w, lb: ops.bias_residual_layernorm(x, None, r, w, lb), [x, r, w, lb], dy)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", impls("reference", "cpp"))
def test_bias_residual_layernorm_low_precision_keeps_fp32_statistics(impl):
    """fp16 and bf16 inputs with a large mean: a naive low-precision variance would lose it."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 100 + 1000
    w, b = torch.ones(64), torch.zeros(64)
    for dt in (torch.float16, torch.bfloat16):
        with forced(impl):
            y = ops.bias_residual_layernorm(x.to(dt), None, torch.zeros(8, 64, dtype=dt), w.to(dt), b.to(dt), 1e-5)
        ref = F.layer_norm(x.to(dt).float(), (64,), eps=1e-5)
        assert y.dtype == dt
        torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("impl", impls("cpp"))
def test_bias_residual_layernorm_float16(impl):
    """fp16 activations: the C++ kernels convert, the result is the reference's in fp16."""
    g = torch.Generator().manual_seed(0)
    x, r = (rand(19, 200, gen=g).half() for _ in range(2))
    b, w, lb = rand(200, gen=g), rand(200, gen=g, shift=1.0), rand(200, gen=g)
    with forced(impl):
        got = ops.bias_residual_layernorm(x, b, r, w, lb)
    with forced("reference"):
        ref = ops.bias_residual_layernorm(x, b, r, w, lb)
    torch.testing.assert_close(got.float(), ref.float(), atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize("impl", impls("cpp"))
def test_bias_residual_layernorm_same_with_1_and_2_threads(impl):
    g = torch.Generator().manual_seed(0)
    inputs, dy = _inputs((1000,), 384, torch.float32, g, "cpu"), rand(1000, 384, gen=g)

    def run():
        torch.manual_seed(11)  # the dropout seed comes from torch's generator
        return run_op(*_fns(p=0.1)[:1], inputs, dy, impl)

    same_with_1_and_2_threads(run)


@pytest.mark.parametrize("impl", impls("cpp"))
def test_bias_residual_layernorm_inplace_writes_over_x_only_without_autograd(impl):
    g = torch.Generator().manual_seed(5)
    x0, r = torch.randn(2, 9, 384, generator=g), torch.randn(2, 9, 384, generator=g)
    b, w, lb = torch.randn(3, 384, generator=g).unbind(0)
    check_inplace(lambda x, **k: ops.bias_residual_layernorm(x, b, r, w, lb, **k), x0)


# ---------------------------------------------------------------------------------------
# dropout


# (forward atol, rtol), (backward atol, rtol) of a kernel against the reference with the same mask
def _dropout_tol(impl, dtype):
    if impl == "cpp":
        return (1e-4, 1e-4), (1e-3, 1e-4)
    f = NORM_FLOOR[impl][dtype]
    return (4 * f, f), (8 * f, 4 * f)


@pytest.mark.parametrize("impl, dtype, n, has_bias", [
    impl_param("cpp", torch.float32, 17, True, id="fp32-17-bias"),
    impl_param("cpp", torch.float32, 768, True, id="fp32-768-bias"),
    *(impl_param("triton", dt, 45, hb, id=f"{name}-45-{'bias' if hb else 'nobias'}")
      for dt, name in ((torch.float32, "fp32"), (torch.float16, "fp16")) for hb in (True, False)),
    impl_param("cuda", torch.bfloat16, 45, True, id="bf16-45-bias"),
    impl_param("triton", torch.bfloat16, 45, True, id="bf16-45-bias-gpu"),
])
def test_bias_residual_layernorm_dropout_mask_matches_reference(impl, dtype, n, has_bias):
    """Same seed: the reference's Philox mask bit for bit, forward and backward (dx is exactly 0
    where an element was dropped)."""
    if dtype == torch.bfloat16 and impl == "triton":
        require_gpu(impl)  # the interpreter cannot do bf16
    g = torch.Generator().manual_seed(8)
    dev, rows = DEVICE[impl], (6 if impl != "cpp" else 33,)
    args = _inputs(rows, n, dtype, g, dev, has_bias=has_bias)
    fwd, bwd = row(OP, impl, Call(dev, dtype, n, "fwd+bwd", dropout=True))
    rm = _ref_mod()
    (fa, fr), (ba, br) = _dropout_tol(impl, dtype)
    got = fwd(*args, 1e-5, 0.25, SEED)
    ref = rm._fwd_reference(*args, 1e-5, 0.25, SEED)
    for a, c in zip(got, ref):
        torch.testing.assert_close(a, c, atol=fa, rtol=fr)
    dy = rand(*rows, n, dtype=dtype, gen=g, device=dev)
    gb = bwd(dy, *args, ref[1], ref[2], 1e-5, 0.25, SEED)
    rb = rm._bwd_reference(dy, *args, ref[1], ref[2], 1e-5, 0.25, SEED)
    assert torch.equal(gb[0] == 0, rb[0] == 0)
    assert 0.1 < (rb[0] == 0).float().mean().item() < 0.4
    for a, c in zip(gb, rb):
        if c is not None:
            torch.testing.assert_close(a.float(), c.float(), atol=ba, rtol=br)


@pytest.mark.parametrize("impl", impls("reference"))
def test_bias_residual_layernorm_dropout_seeded_by_torch_and_backward_regenerates_mask(impl):
    x, r, b = gradcheck_inputs(64, 33), gradcheck_inputs(64, 33, seed=1), gradcheck_inputs(33)
    w, lb = gradcheck_inputs(33, seed=2), gradcheck_inputs(33, seed=3)
    with forced(impl):
        torch.manual_seed(7)
        y1 = ops.bias_residual_layernorm(x, b, r, w, lb, 1e-5, dropout_p=0.25)
        torch.manual_seed(7)
        y2 = ops.bias_residual_layernorm(x, b, r, w, lb, 1e-5, dropout_p=0.25)
        y3 = ops.bias_residual_layernorm(x, b, r, w, lb, 1e-5, dropout_p=0.25)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    # backward with a fixed seed equals autograd through the reference with the same mask
    rm = _ref_mod()
    out, mean, rstd = rm._fwd_reference(x, b, r, w, lb, 1e-5, 0.25, 99)
    g = torch.randn_like(out)
    got = rm._bwd_reference(g, x, b, r, w, lb, mean, rstd, 1e-5, 0.25, 99)
    ref = torch.autograd.grad(ops.bias_residual_layernorm_ref(x, b, r, w, lb, 1e-5, 0.25, 99), (x, b, r, w, lb), g)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("impl", impls("cpp", "triton"))
def test_bias_residual_layernorm_dropout_through_public_op(impl):
    """Autograd through the public op with dropout: a fixed torch seed reproduces the output, and
    forward and backward (which regenerates the mask) match the reference under the same seed."""
    g = torch.Generator().manual_seed(10)
    dev = DEVICE[impl]
    inputs, dy = _inputs((7,), 33, torch.float32, g, dev), rand(7, 33, gen=g, device=dev)
    fn = _fns(p=0.2)[0]
    runs = {}
    for name in (impl, impl, "reference"):
        torch.manual_seed(123)
        runs.setdefault(name, []).append(run_op(fn, inputs, dy, name))
    (got, again), (ref,) = runs[impl], runs["reference"]
    assert all(torch.equal(a, c) for a, c in zip(got, again))
    assert torch.equal(got[1] == 0, ref[1] == 0)  # dx zero exactly where dropped
    for a, c in zip(got, ref):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl, n", [impl_param("cuda", n, id=str(n)) for n in (17, 768, 3072)])
def test_bias_residual_layernorm_dropout_masks_equal_triton(impl, n):
    """The CUDA C++ kernels draw the Triton kernels' masks: the same bits."""
    g = torch.Generator().manual_seed(n)
    args = _inputs((97,), n, torch.bfloat16, g, "cuda")
    dy = rand(97, n, dtype=torch.bfloat16, gen=g, device="cuda")
    call = Call("cuda", torch.bfloat16, n, "fwd+bwd", dropout=True)
    (fwd, bwd), (tfwd, tbwd) = row(OP, impl, call), row(OP, "triton", call)
    got, tri = fwd(*args, 1e-5, 0.25, SEED), tfwd(*args, 1e-5, 0.25, SEED)
    ref = _ref_mod()._fwd_reference(*args, 1e-5, 0.25, SEED)
    for a, c in zip(got, ref):
        f = NORM_FLOOR[impl][torch.bfloat16]
        torch.testing.assert_close(a, c, atol=f * 4, rtol=f)
    gb = bwd(dy, *args, got[1], got[2], 1e-5, 0.25, SEED)
    tb = tbwd(dy, *args, tri[1], tri[2], 1e-5, 0.25, SEED)
    assert torch.equal(gb[0] == 0, tb[0] == 0)
    assert 0.15 < (gb[0] == 0).float().mean().item() < 0.35


@pytest.mark.parametrize("impl", impls("cuda"))
def test_bias_residual_layernorm_dropout_autograd_matches_triton_under_one_seed(impl):
    """Forward on one implementation, backward on the other: interchangeable mid-training."""
    g = torch.Generator().manual_seed(14)
    args = _inputs((64,), 768, torch.bfloat16, g, "cuda")
    dy = rand(64, 768, dtype=torch.bfloat16, gen=g, device="cuda")
    call = Call("cuda", torch.bfloat16, 768, "fwd+bwd", dropout=True)
    (fwd, bwd), (tfwd, tbwd) = row(OP, impl, call), row(OP, "triton", call)
    y_c, y_t = fwd(*args, 1e-5, 0.1, SEED), tfwd(*args, 1e-5, 0.1, SEED)
    torch.testing.assert_close(y_c[0], y_t[0], atol=3e-2, rtol=2e-2)
    mixed = bwd(dy, *args, y_t[1], y_t[2], 1e-5, 0.1, SEED)  # triton's saved stats, cuda's backward
    same = tbwd(dy, *args, y_t[1], y_t[2], 1e-5, 0.1, SEED)
    for a, c in zip(mixed, same):
        torch.testing.assert_close(a.float(), c.float(), atol=6e-2, rtol=3e-2)


# ---------------------------------------------------------------------------------------
# edges and the GPU's own cases


@pytest.mark.parametrize("impl", impls("triton", "cuda"))
def test_bias_residual_layernorm_zero_rows(impl):
    dev = DEVICE[impl]
    g = torch.Generator().manual_seed(13)
    x = torch.empty(0, 64, device=dev)
    b, w, lb = rand(64, gen=g, device=dev), rand(64, gen=g, device=dev), rand(64, gen=g, device=dev)
    fwd, bwd = row(OP, impl, Call(dev, torch.float32, 64, "fwd+bwd"))
    y, mean, rstd = fwd(x, None if impl == "triton" else b, x, w, lb, 1e-5, 0.0, 0)
    assert y.shape == (0, 64) and mean.shape == (0,)
    if impl == "cuda":
        dx, db, dres, dw, dlb = bwd(x, x, b, x, w, lb, mean, rstd, 1e-5, 0.0, 0)
        assert dx.shape == (0, 64) and not dw.any() and not db.any()


@pytest.mark.parametrize("impl", impls("cuda"))
def test_bias_residual_layernorm_fp32_params_with_bf16_activations(impl):
    """autocast's mix: bf16 activations, fp32 LayerNorm/bias parameters (read as fp32, gradients in fp32)."""
    g = torch.Generator().manual_seed(11)
    x, r, dy = (rand(129, 768, dtype=torch.bfloat16, gen=g, device="cuda") for _ in range(3))
    b, w, lb = (rand(768, gen=g, device="cuda", shift=s) for s in (0.0, 1.0, 0.0))
    check_op(impl, *_fns(), [x, b, r, w, lb], dy, NAMES, NORM_FLOOR[impl][torch.bfloat16])


@pytest.mark.parametrize("impl", impls("cuda"))
def test_bias_residual_layernorm_misaligned_and_non_contiguous(impl):
    """Rows that start off a 16-byte boundary take the scalar variant; strided views are copied."""
    g = torch.Generator().manual_seed(12)
    n, m = 384, 65
    x = rand(m * n + 1, dtype=torch.bfloat16, gen=g, device="cuda")[1:].view(m, n)  # 2-byte offset
    r = rand(n, m, dtype=torch.bfloat16, gen=g, device="cuda").t()  # non-contiguous
    dy = rand(m, n, dtype=torch.bfloat16, gen=g, device="cuda")
    b, w, lb = (rand(n, dtype=torch.bfloat16, gen=g, device="cuda", shift=s) for s in (0.0, 1.0, 0.0))
    check_op(impl, *_fns(), [x, b, r, w, lb], dy, NAMES, NORM_FLOOR[impl][torch.bfloat16])


@pytest.mark.parametrize("impl, n", [impl_param("cuda", n, id=str(n)) for n in (768, 3072)])
def test_bias_residual_layernorm_backward_deterministic(impl, n):
    g = torch.Generator().manual_seed(15)
    args = _inputs((2049,), n, torch.bfloat16, g, "cuda")
    dy = rand(2049, n, dtype=torch.bfloat16, gen=g, device="cuda")
    fwd, bwd = row(OP, impl, Call("cuda", torch.bfloat16, n, "fwd+bwd", dropout=True))
    y = fwd(*args, 1e-5, 0.1, SEED)
    assert_repeats_bitwise(lambda: bwd(dy, *args, y[1], y[2], 1e-5, 0.1, SEED))


@pytest.mark.parametrize("impl, dtype, n", gpu_big_cases())
def test_bias_residual_layernorm_gpu_big_shapes(impl, dtype, n):
    require_gpu(impl)
    g, m = torch.Generator().manual_seed(n), gpu_big_rows(n)
    inputs, dy = _inputs((m,), n, dtype, g, "cuda"), rand(m, n, dtype=dtype, gen=g, device="cuda")
    check_op(impl, *_fns(), inputs, dy, NAMES, NORM_FLOOR[impl][dtype])


@pytest.mark.parametrize("impl", impls("cuda"))
def test_bias_residual_layernorm_compiles_under_torch_compile(impl):
    """torch.compile sees the public op through its fake implementation; the kernel runs inside."""
    g = torch.Generator().manual_seed(16)
    x, r = (rand(8, 768, dtype=torch.bfloat16, gen=g, device="cuda") for _ in range(2))
    b, w, lb = (rand(768, dtype=torch.bfloat16, gen=g, device="cuda", shift=s) for s in (0.0, 1.0, 0.0))
    with forced(impl):
        f = torch.compile(lambda *a: ops.bias_residual_layernorm(*a, 1e-5), fullgraph=True)
        out = f(x, b, r, w, lb)
    torch.testing.assert_close(out, ops.bias_residual_layernorm_ref(x, b, r, w, lb, 1e-5), atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: ops.bias_residual_layernorm(torch.randn(3, 4), None, torch.randn(3, 5), torch.ones(4), torch.zeros(4)),
     ValueError, "residual"),
    (lambda: ops.bias_residual_layernorm(torch.randn(3, 4), None, torch.randn(3, 4), torch.ones(4), torch.zeros(4),
                                         dropout_p=1.0), ValueError, "dropout_p"),
], ids=["residual_shape", "dropout_p"])
def test_bias_residual_layernorm_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("impl", impls("cpp", "triton", "cuda"))
def test_bias_residual_layernorm_row_reads_strided_vectors(impl):
    """The row's own entry points with strided bias, LayerNorm weight and bias: the results of
    contiguous ones, forward and backward."""
    g = torch.Generator().manual_seed(2)
    dev = DEVICE[impl]
    x, res, dy = (rand(6, 24, gen=g, device=dev) for _ in range(3))
    vecs = [rand(48, gen=g, device=dev)[::2] for _ in range(3)]
    fwd, bwd = row(OP, impl, Call(dev, torch.float32, 24, "fwd"))
    outs = []
    for bias, w, lb in (vecs, [v.contiguous() for v in vecs]):
        y, mean, rstd = fwd(x.clone(), bias, res.clone(), w, lb, 1e-5, 0.0, 0)
        outs.append([y, *bwd(dy, x, bias, res, w, lb, mean, rstd, 1e-5, 0.0, 0)])
    for a, c in zip(*outs):
        torch.testing.assert_close(a, c)
