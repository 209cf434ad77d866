"""gelu_layernorm (bertfast/ops/gelu_layernorm.py): LN(GELU(x + bias)), the MLM head's transform, every
implementation against the reference.

The implementation is the test parameter (tests/ops/_op_cases.py: forced through the dispatch
table under BERTFAST_STRICT=1, the selected row checked). Accuracy rule: docs/testing.md.
"""
import pytest
import torch
from _op_cases import (DEVICE, NORM_FLOOR, assert_repeats_bitwise, check_one_row, check_op, forced, gpu_big_cases,
                       gpu_big_rows, gradcheck_inputs, impl_param, impls, low_and_params, norm_cases, norm_rows, rand,
                       require_gpu, row, run_op, same_with_1_and_2_threads,
                       strict_impl)  # noqa: F401 - strict_impl: the autouse fixture

from bertfast import ops
from bertfast.dispatch import Call

OP = "gelu_layernorm"
NAMES = ["out", "dx", "dbias", "dweight", "dln_bias"]
APPROX = (("none", "erf"), ("tanh", "tanh"))


def _fns(approximate="none"):
    return (lambda x, b, w, lb: ops.gelu_layernorm(x, b, w, lb, 1e-5, approximate),
            lambda x, b, w, lb: ops.gelu_layernorm_ref(x, b, w, lb, 1e-5, approximate))


def _inputs(rows, n, dtype, g, device, param_dtype=None):
    """x (scaled: both sides of GELU's knee), bias, weight, ln_bias."""
    p = param_dtype or dtype
    return [rand(*rows, n, dtype=dtype, gen=g, device=device, scale=2.0), rand(n, dtype=dtype, gen=g, device=device),
            rand(n, dtype=p, gen=g, device=device, shift=1.0), rand(n, dtype=p, gen=g, device=device)]


# both GELU forms at every width for the compiled kernels; under the interpreter the tanh form at
# width 17 only (each interpreted case costs seconds)
@pytest.mark.parametrize("impl, dtype, n, approximate",
                         norm_cases("cpp", "cuda", extra=APPROX) + norm_cases("triton"))
def test_gelu_layernorm_matches_oracle(impl, dtype, n, approximate):
    approximate = approximate or ("tanh" if n == 17 else "none")
    g = torch.Generator().manual_seed(n)
    dev, rows = DEVICE[impl], norm_rows(impl, n)
    low, params = low_and_params(impl, dtype)
    inputs, dy = _inputs(rows, n, low, g, dev, params), rand(*rows, n, dtype=low, gen=g, device=dev)
    check_op(impl, *_fns(approximate), inputs, dy, NAMES, NORM_FLOOR[impl][dtype])


@pytest.mark.parametrize("impl", impls("cpp", "triton", "cuda"))
def test_gelu_layernorm_one_row(impl):
    check_one_row(impl, _inputs, _fns(), NAMES)


@pytest.mark.parametrize("impl", impls("reference"))
def test_gelu_layernorm_gradcheck(impl):
    x, b = gradcheck_inputs(6, 17), gradcheck_inputs(17)
    w, lb = gradcheck_inputs(17, seed=2), gradcheck_inputs(17, seed=3)
    with forced(impl):
        assert torch.autograd.gradcheck(lambda *a: ops.gelu_layernorm(*a, eps=1e-5), (x, b, w, lb))


@pytest.mark.parametrize("impl", impls("cpp", "triton"))
def test_gelu_layernorm_non_contiguous(impl):
    """A transposed x and strided parameters: the accuracy rule, and the contiguous copies' result."""
    g = torch.Generator().manual_seed(4)
    dev = DEVICE[impl]
    x = rand(24, 6, gen=g, device=dev).t()
    b, w, lb = (rand(48, gen=g, device=dev, shift=s)[::2] for s in (0.0, 1.0, 0.0))
    dy = rand(6, 24, gen=g, device=dev)
    assert not x.is_contiguous() and not b.is_contiguous()
    check_op(impl, *_fns(), [x, b, w, lb], dy, NAMES, NORM_FLOOR[impl][torch.float32])
    got = run_op(_fns()[0], [x, b, w, lb], dy, impl)
    want = run_op(_fns()[0], [t.contiguous() for t in (x, b, w, lb)], dy, impl)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", impls("cpp"))
def test_gelu_layernorm_float16(impl):
    """fp16 activations: the C++ kernels convert, the result is the reference's in fp16."""
    g = torch.Generator().manual_seed(0)
    x, b, w, lb = _inputs((19,), 200, torch.float32, g, "cpu")
    with forced(impl):
        got = ops.gelu_layernorm(x.half(), b, w, lb)
    with forced("reference"):
        ref = ops.gelu_layernorm(x.half(), b, w, lb)
    torch.testing.assert_close(got.float(), ref.float(), atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize("impl", impls("cpp"))
def test_gelu_layernorm_same_with_1_and_2_threads(impl):
    g = torch.Generator().manual_seed(0)
    inputs, dy = _inputs((1000,), 384, torch.float32, g, "cpu"), rand(1000, 384, gen=g)
    same_with_1_and_2_threads(lambda: run_op(_fns()[0], inputs, dy, impl))


@pytest.mark.parametrize("impl", impls("cuda"))
def test_gelu_layernorm_fp32_params_with_bf16_activations(impl):
    """autocast's mix: bf16 activations, fp32 LayerNorm/bias parameters (read as fp32, gradients in fp32)."""
    g = torch.Generator().manual_seed(11)
    x, dy = (rand(129, 768, dtype=torch.bfloat16, gen=g, device="cuda") for _ in range(2))
    b, w, lb = (rand(768, gen=g, device="cuda", shift=s) for s in (0.0, 1.0, 0.0))
    check_op(impl, *_fns(), [x, b, w, lb], dy, NAMES, NORM_FLOOR[impl][torch.bfloat16])


@pytest.mark.parametrize("impl, n", [impl_param("cuda", n, id=str(n)) for n in (768, 3072)])
def test_gelu_layernorm_backward_deterministic(impl, n):
    g = torch.Generator().manual_seed(15)
    args = _inputs((2049,), n, torch.bfloat16, g, "cuda")
    dy = rand(2049, n, dtype=torch.bfloat16, gen=g, device="cuda")
    fwd, bwd = row(OP, impl, Call("cuda", torch.bfloat16, n, "fwd+bwd"))
    y = fwd(*args, 1e-5, "none")
    assert_repeats_bitwise(lambda: bwd(dy, *args, y[1], y[2], 1e-5, "none"))


@pytest.mark.parametrize("impl, dtype, n", gpu_big_cases())
def test_gelu_layernorm_gpu_big_shapes(impl, dtype, n):
    require_gpu(impl)
    g, m = torch.Generator().manual_seed(n), gpu_big_rows(n)
    inputs, dy = _inputs((m,), n, dtype, g, "cuda"), rand(m, n, dtype=dtype, gen=g, device="cuda")
    check_op(impl, *_fns(), inputs, dy, NAMES, NORM_FLOOR[impl][dtype])


def test_gelu_layernorm_bad_input():
    with pytest.raises(ValueError, match="eps"):
        ops.gelu_layernorm(torch.randn(3, 4), torch.randn(4), torch.ones(4), torch.zeros(4), eps=0.0)


@pytest.mark.parametrize("impl", impls("cpp", "triton", "cuda"))
def test_gelu_layernorm_row_reads_strided_vectors(impl):
    """The row's own entry points with strided bias, LayerNorm weight and bias: the results of
    contiguous ones, forward and backward."""
    g = torch.Generator().manual_seed(2)
    dev = DEVICE[impl]
    x, dy = rand(6, 24, gen=g, device=dev), rand(6, 24, gen=g, device=dev)
    vecs = [rand(48, gen=g, device=dev)[::2] for _ in range(3)]
    fwd, bwd = row("gelu_layernorm", impl, Call(dev, torch.float32, 24, "fwd"))
    outs = []
    for bias, w, lb in (vecs, [v.contiguous() for v in vecs]):
        y, mean, rstd = fwd(x.clone(), bias, w, lb, 1e-5, "none")
        outs.append([y, *bwd(dy, x, bias, w, lb, mean, rstd, 1e-5, "none")])
    for a, c in zip(*outs):
        torch.testing.assert_close(a, c)
