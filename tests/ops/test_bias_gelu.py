"""bias_gelu (bertfast/ops/bias_gelu.py): GELU(x + bias), every implementation against the reference.

The implementation is the test parameter (tests/ops/_op_cases.py: forced through the dispatch
table under BERTFAST_STRICT=1, the selected row checked). Accuracy rule: docs/testing.md.
"""
import pytest
import torch
from _op_cases import (DEVICE, NORM_FLOOR, assert_repeats_bitwise, check_inplace, check_one_row, check_op, forced,
                       gpu_big_cases, gradcheck_inputs, impl_param, impls, norm_cases, norm_rows, rand, require_gpu,
                       row, run_op, same_with_1_and_2_threads,
                       strict_impl)  # noqa: F401 - strict_impl: the autouse fixture

from bertfast import ops
from bertfast.dispatch import Call

NAMES = ["out", "dx", "dbias"]
APPROX = (("none", "erf"), ("tanh", "tanh"))


def _fns(approximate="none"):
    return (lambda x, b: ops.bias_gelu(x, b, approximate), lambda x, b: ops.bias_gelu_ref(x, b, approximate))


@pytest.mark.parametrize("impl, dtype, n, approximate", norm_cases("cpp", "triton", "cuda", extra=APPROX))
def test_bias_gelu_matches_oracle(impl, dtype, n, approximate):
    g = torch.Generator().manual_seed(n)
    dev, rows = DEVICE[impl], norm_rows(impl, n)
    x, dy = rand(*rows, n, dtype=dtype, gen=g, device=dev, scale=2.0), rand(*rows, n, dtype=dtype, gen=g, device=dev)
    b = rand(n, dtype=dtype, gen=g, device=dev)
    check_op(impl, *_fns(approximate), [x, b], dy, NAMES, NORM_FLOOR[impl][dtype])


@pytest.mark.parametrize("impl", impls("cpp", "triton", "cuda"))
def test_bias_gelu_one_row(impl):
    def inputs(rows, n, dtype, g, device):
        x = rand(*rows, n, dtype=dtype, gen=g, device=device, scale=2.0)
        return [x, rand(n, dtype=dtype, gen=g, device=device)]

    check_one_row(impl, inputs, _fns(), NAMES)


@pytest.mark.parametrize("impl", impls("reference"))
def test_bias_gelu_gradcheck(impl):
    x, b = gradcheck_inputs(3, 5, 17), gradcheck_inputs(17)
    with forced(impl):
        for approx in ("none", "tanh"):
            assert torch.autograd.gradcheck(lambda x, b: ops.bias_gelu(x, b, approx), (x, b))


@pytest.mark.parametrize("impl", impls("reference", "cpp", "triton", "cuda"))
def test_bias_gelu_non_contiguous(impl):
    """A transposed x and a strided bias: the result of contiguous copies, within the accuracy rule.
    The C++ row's own entry point also takes the strided views (the public op hands the others
    contiguous rows)."""
    g = torch.Generator().manual_seed(1)
    dev = DEVICE[impl]
    x = rand(40, 5, gen=g, device=dev).t()  # (5, 40), column-major
    b, dy = rand(80, gen=g, device=dev)[::2], rand(5, 40, gen=g, device=dev)
    assert not x.is_contiguous() and not b.is_contiguous()
    got = run_op(ops.bias_gelu, [x, b], dy, impl)
    want = run_op(ops.bias_gelu, [x.contiguous(), b.contiguous()], dy, impl)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    if impl != "reference":
        check_op(impl, ops.bias_gelu, ops.bias_gelu_ref, [x, b], dy, NAMES, NORM_FLOOR[impl][torch.float32])
    if impl != "cpp":
        return
    fwd, _ = row("bias_gelu", impl, Call(dev, torch.float32, 40, "fwd"))
    # two fp32 erf forms (the kernels' own, eager's oneDNN), each ~1e-6 from fp64 at worst
    torch.testing.assert_close(fwd(x, b, "none"), ops.bias_gelu_ref(x, b), atol=3e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", impls("cpp"))
def test_bias_gelu_float16(impl):
    """fp16 activations: the C++ kernels convert, the result is the reference's in fp16."""
    g = torch.Generator().manual_seed(0)
    x, b = rand(19, 200, gen=g).half(), rand(200, gen=g)
    with forced(impl):
        got = ops.bias_gelu(x, b)
    with forced("reference"):
        ref = ops.bias_gelu(x, b)
    torch.testing.assert_close(got.float(), ref.float(), atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize("impl", impls("cpp", "triton", "cuda"))
def test_bias_gelu_float64_served_by_reference_math(impl):
    """float64 calls run the reference (the oracle's precision) even when a kernel is forced."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64).to(DEVICE[impl]).requires_grad_()
    b = torch.randn(5, generator=g, dtype=torch.float64).to(DEVICE[impl]).requires_grad_()
    with forced(impl):
        assert torch.autograd.gradcheck(lambda a, c: ops.bias_gelu(a, c), (x, b))


@pytest.mark.parametrize("impl", impls("cpp"))
def test_bias_gelu_same_with_1_and_2_threads(impl):
    g = torch.Generator().manual_seed(0)
    x, b, dy = rand(1000, 384, gen=g), rand(384, gen=g), rand(1000, 384, gen=g)
    same_with_1_and_2_threads(lambda: run_op(ops.bias_gelu, [x, b], dy, impl))


@pytest.mark.parametrize("impl", impls("cpp"))
def test_bias_gelu_inplace_writes_over_x_only_without_autograd(impl):
    g = torch.Generator().manual_seed(5)
    x0, b = torch.randn(2, 9, 384, generator=g), torch.randn(384, generator=g)
    check_inplace(lambda x, **k: ops.bias_gelu(x, b, **k), x0)


@pytest.mark.parametrize("impl", impls("triton"))
def test_bias_gelu_zero_rows(impl):
    x = torch.empty(0, 8, device=DEVICE[impl])
    fwd, _ = row("bias_gelu", impl, Call(DEVICE[impl], torch.float32, 8, "fwd"))
    assert fwd(x, torch.ones(8, device=DEVICE[impl]), "none").shape == (0, 8)


@pytest.mark.parametrize("impl", impls("cuda"))
def test_bias_gelu_fp32_bias_with_bf16_activations(impl):
    """autocast's mix: bf16 activations, an fp32 bias (read as fp32, its gradient in fp32)."""
    g = torch.Generator().manual_seed(11)
    x, dy = (rand(129, 768, dtype=torch.bfloat16, gen=g, device="cuda") for _ in range(2))
    b = rand(768, gen=g, device="cuda")
    check_op(impl, ops.bias_gelu, ops.bias_gelu_ref, [x, b], dy, NAMES, NORM_FLOOR[impl][torch.bfloat16])


@pytest.mark.parametrize("impl", impls("cuda"))
def test_bias_gelu_misaligned_and_non_contiguous(impl):
    """Rows that start off a 16-byte boundary take the scalar variant."""
    g = torch.Generator().manual_seed(12)
    n, m = 384, 65
    x = rand(m * n + 1, dtype=torch.bfloat16, gen=g, device="cuda")[1:].view(m, n)  # 2-byte offset
    b, dy = rand(n, dtype=torch.bfloat16, gen=g, device="cuda"), rand(m, n, dtype=torch.bfloat16, gen=g, device="cuda")
    check_op(impl, ops.bias_gelu, ops.bias_gelu_ref, [x, b], dy, NAMES, NORM_FLOOR[impl][torch.bfloat16])


@pytest.mark.parametrize("impl, n", [impl_param("cuda", n, id=str(n)) for n in (768, 3072)])
def test_bias_gelu_backward_deterministic(impl, n):
    g = torch.Generator().manual_seed(15)
    x, dy = (rand(2049, n, dtype=torch.bfloat16, gen=g, device="cuda") for _ in range(2))
    b = rand(n, dtype=torch.bfloat16, gen=g, device="cuda")
    _, bwd = row("bias_gelu", impl, Call("cuda", torch.bfloat16, n, "fwd+bwd"))
    assert_repeats_bitwise(lambda: bwd(dy, x, b, "none"))


@pytest.mark.parametrize("impl, dtype, n", gpu_big_cases())
def test_bias_gelu_gpu_big_shapes(impl, dtype, n):
    require_gpu(impl)
    g, m = torch.Generator().manual_seed(n), gpu_big_rows(n)
    x, dy = (rand(m, n, dtype=dtype, gen=g, device="cuda") for _ in range(2))
    b = rand(n, dtype=dtype, gen=g, device="cuda")
    check_op(impl, ops.bias_gelu, ops.bias_gelu_ref, [x, b], dy, NAMES, NORM_FLOOR[impl][dtype])


@pytest.mark.parametrize("call, exc, match", [
    (lambda: ops.bias_gelu(torch.randn(3, 4), torch.randn(5)), ValueError, "bias"),
    (lambda: ops.bias_gelu(torch.ones(3, 4, dtype=torch.long), torch.randn(4)), TypeError, "x"),
    (lambda: ops.bias_gelu(torch.randn(3, 4), torch.randn(4), approximate="fast"), ValueError, "approximate"),
], ids=["bias_width", "x_dtype", "approximate"])
def test_bias_gelu_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("impl", impls("cpp", "triton", "cuda"))
def test_bias_gelu_row_reads_a_strided_bias(impl):
    """The row's own entry points (what dispatch hands any caller) with a strided bias: the result
    of a contiguous one, forward and backward."""
    g = torch.Generator().manual_seed(2)
    dev = DEVICE[impl]
    x, dy, wide = rand(6, 24, gen=g, device=dev), rand(6, 24, gen=g, device=dev), rand(48, gen=g, device=dev)
    fwd, bwd = row("bias_gelu", impl, Call(dev, torch.float32, 24, "fwd"))
    b = wide[::2]
    torch.testing.assert_close(fwd(x.clone(), b, "none"), fwd(x.clone(), b.contiguous(), "none"))
    for a, c in zip(bwd(dy, x, b, "none"), bwd(dy, x, b.contiguous(), "none")):
        torch.testing.assert_close(a, c)
