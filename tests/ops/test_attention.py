"""attention (bertfast/ops/attention.py): softmax(QK^T * scale + mask) V, padded (B, S, H, D) with a key
bias or packed varlen, every implementation against the reference.

The implementation is the test parameter (tests/ops/_op_cases.py): the C++ CPU kernels ("cpp")
and the Triton kernels ("triton"; under the interpreter on CPU tensors, so the shapes are tiny and
odd: sequence lengths 1, 3, 17, 33, 97, 130 cover one, several and partial tiles and the causal
diagonal). Accuracy rule (docs/testing.md, FlashAttention's): against the float64 reference, a
kernel's error is at most twice eager PyTorch attention's in the same precision, plus a small
floor; the log-sum-exp the backward reads is checked too, +inf exactly on rows that see no key.
Dropout masks are compared exactly (the Philox stream is shared). Launch configurations,
autotuning and ahead-of-time compilation of the Triton kernels: tests/kernels/test_triton_attention_launch.py.
"""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from _op_cases import (ATTENTION_FLOOR, DEVICE, DTYPE_ID, forced, gradcheck_inputs, impl_param, impls, require_gpu, row,
                       same_with_1_and_2_threads, strict_impl)  # noqa: F401 - strict_impl: the autouse fixture

from bertfast import dispatch, ops
from bertfast.dispatch import Call

OP = "attention"


def _ref():
    return importlib.import_module("bertfast.ops.attention")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(shape, dtype, g, device, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def _kernel(impl, q, v, kb, cu_q, cu_k, max_q, max_k, p, causal):
    """The (fwd, bwd) of the implementation's own table row (the reference's for "reference"),
    checked to serve this call."""
    call = _ref().attention_call(q, v, kb is not None, cu_q, cu_k, max_q, max_k, p, causal, "fwd+bwd")
    return row(OP, impl, call, name=impl)


def _key_bias(kind, B, Sk, g, device):
    """fp32 (B, Sk) additive key bias of a mask kind, or None."""
    if kind == "none":
        return None
    bias = torch.zeros(B, Sk, dtype=torch.float32)
    lens = [max(1, Sk - 2 * b - 1) for b in range(B)]
    for b, n in enumerate(lens):
        if kind == "right":
            bias[b, n:] = float("-inf")
        elif kind == "left":
            bias[b, : Sk - n] = float("-inf")
    if kind == "dead":  # right padding, and one batch row that sees no key at all
        for b, n in enumerate(lens):
            bias[b, n:] = float("-inf")
        bias[-1] = float("-inf")
    if kind == "float":  # HF-style additive float mask: arbitrary finite values and some -inf
        bias = torch.randn(B, Sk, generator=g) * 3.0
        bias[0, -1] = float("-inf")
    if kind == "hf":  # right padding, a row that sees nothing, and HF's finite "extended mask" value
        bias[1, Sk // 2 + 1:] = float("-inf")
        bias[2, :] = float("-inf")
        bias[0, 0] = -10000.0
    return bias.to(device)


def _full_bias(key_bias, B, Sq, Sk, causal, device):
    """(B, 1, Sq, Sk) additive float64 mask for the eager implementation."""
    bias = torch.zeros(B, 1, Sq, Sk, dtype=torch.float64, device=device)
    if key_bias is not None:
        bias = bias + key_bias.double()[:, None, None, :]
    if causal:
        i = torch.arange(Sq, device=device).view(Sq, 1)
        j = torch.arange(Sk, device=device).view(1, Sk)
        bias = bias.masked_fill(j > i + (Sk - Sq), float("-inf"))
    return bias


def _eager(q, k, v, bias, p, scale, seed, dout):
    """Plain PyTorch attention in the inputs' own precision (the oracle's yardstick): (out, lse,
    dq, dk, dv). Rows that see no key give 0, like the kernels."""
    A = _ref()
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale + bias.to(q.dtype)
    dead = torch.isneginf(s).all(-1, keepdim=True)
    prob = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if p > 0:
        keep = A.keep_mask(seed, p, A._dropout_offsets(B, H, Sq, Sk, q.device))
        prob = prob * keep.to(q.dtype) / (1.0 - p)
    out = torch.einsum("bhij,bjhd->bihd", prob, v)
    out.backward(dout)
    return out.detach(), s.detach().logsumexp(-1), q.grad, k.grad, v.grad


def _assert_oracle(name, got, ref, eager, dtype):
    got, ref, eager = got.double(), ref.double(), eager.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref).abs().max().item() if got.numel() else 0.0
    err_eager = (eager - ref).abs().max().item() if got.numel() else 0.0
    bound = 2 * err_eager + ATTENTION_FLOOR[dtype]
    assert err <= bound, f"{name}: max error {err:.3g} > 2 x eager {err_eager:.3g} + {ATTENTION_FLOOR[dtype]:g}"
    return err


def _assert_lse(got, ref):
    ref = ref.to(got.device)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(got), inf) and (got[inf] > 0).all(), "lse must be +inf exactly on dead rows"
    if (~inf).any():
        torch.testing.assert_close(got[~inf].double(), ref[~inf].double(), atol=1e-5, rtol=1e-5)


def _compare(impl, q, k, v, dout, args, eager, dtype, dead_rows):
    """The implementation's forward and backward against the float64 reference and `eager`."""
    fwd, bwd = _kernel(impl, q, v, *args[:5], args[5], args[7])
    out, lse = fwd(q, k, v, *args)
    dq, dk, dv = bwd(dout, q, k, v, out, lse, *args)
    assert out.dtype == q.dtype and dq.dtype == q.dtype
    A = _ref()
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, dout))
    ref_out, ref_lse = A._fwd_reference(q64, k64, v64, *args)
    ref_grads = A._bwd_reference(do64, q64, k64, v64, ref_out, ref_lse, *args)
    errs = {"out": _assert_oracle("out", out, ref_out, eager[0], dtype)}
    _assert_lse(lse, ref_lse)
    for name, got, ref, e in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, eager[2:]):
        errs[name] = _assert_oracle(name, got, ref, e, dtype)
    dead = dead_rows(torch.isinf(ref_lse))
    if dead.any():  # rows that see no key: exact zeros and zero grads
        assert (out[dead] == 0).all() and (dq[dead] == 0).all()
    return errs


def _padded_case(impl, B, Sq, Sk, H, D, dtype, mask="none", causal=False, p=0.0, scale=None, Dv=None, seed=0):
    dev = DEVICE[impl]
    g = _gen(seed)
    Dv = Dv or D
    q, k = _rand((B, Sq, H, D), dtype, g, dev), _rand((B, Sk, H, D), dtype, g, dev)
    v, dout = _rand((B, Sk, H, Dv), dtype, g, dev), _rand((B, Sq, H, Dv), dtype, g, dev)
    kb = _key_bias(mask, B, Sk, g, dev)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    drop_seed = 123456789123 + seed
    args = (kb, None, None, Sq, Sk, p, scale, causal, drop_seed)
    eager = _eager(q, k, v, _full_bias(kb, B, Sq, Sk, causal, dev), p, scale, drop_seed, dout)
    return _compare(impl, q, k, v, dout, args, eager, dtype, lambda inf: inf.permute(0, 2, 1))


def _cu(lens, device):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)


def _varlen_case(impl, lens_q, lens_k, H, D, dtype, causal=False, p=0.0, seed=1, scale=None):
    A = _ref()
    dev = DEVICE[impl]
    g = _gen(seed)
    cu_q = _cu(lens_q, dev)
    cu_k = cu_q if lens_k is lens_q else _cu(lens_k, dev)
    max_q, max_k = max(lens_q), max(lens_k)
    q, k = _rand((sum(lens_q), H, D), dtype, g, dev), _rand((sum(lens_k), H, D), dtype, g, dev)
    v, dout = _rand((sum(lens_k), H, D), dtype, g, dev), _rand((sum(lens_q), H, D), dtype, g, dev)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    drop_seed = 987654321 + seed
    args = (None, cu_q, cu_k, max_q, max_k, p, scale, causal, drop_seed)
    # eager yardstick on the padded equivalent, then packed again
    bias, rows_q, rows_k = A._varlen_bias(cu_q, cu_k, max_q, max_k, causal, q.device)
    pad = lambda t, cu, m: A._pad(t, cu, m)[0]  # noqa: E731
    eo, _, edq, edk, edv = _eager(pad(q, cu_q, max_q), pad(k, cu_k, max_k), pad(v, cu_k, max_k),
                                  bias.double().expand(-1, 1, max_q, -1), p, scale, drop_seed,
                                  pad(dout, cu_q, max_q))
    unpad = lambda t, rows: t.reshape(-1, *t.shape[2:])[rows]  # noqa: E731
    eager = (unpad(eo, rows_q), None, unpad(edq, rows_q), unpad(edk, rows_k), unpad(edv, rows_k))
    return _compare(impl, q, k, v, dout, args, eager, dtype, lambda inf: inf.t())


# ---------------------------------------------------------------------------------------------
# padded layout

# (B, Sq, Sk, H, D, mask, causal, p, scale): the Triton cases at fp32 and fp16, odd and partial tiles
_TRITON_FP32 = [(2, 17, 17, 2, 32, "right", False), (2, 33, 33, 1, 64, "left", True), (3, 3, 3, 2, 128, "dead", False),
                (1, 1, 1, 2, 64, "none", False), (2, 1, 5, 1, 32, "right", True), (2, 97, 97, 1, 32, "float", False),
                (2, 20, 13, 2, 64, "dead", True),  # Sq > Sk causal: the first Sq - Sk rows see no key
                (1, 130, 130, 1, 64, "right", True)]
_TRITON_FP16 = [(2, 17, 17, 2, 64, "right", False), (2, 19, 35, 1, 32, "left", True), (2, 3, 3, 1, 128, "dead", False),
                (1, 97, 97, 1, 128, "none", True)]


def _padded_cases():
    out = []
    for dtype, cases in ((torch.float32, _TRITON_FP32), (torch.float16, _TRITON_FP16)):
        for B, Sq, Sk, H, D, mask, causal in cases:
            out.append(impl_param("triton", dtype, (B, Sq, Sk, H, D, mask, causal, 0.0, None),
                                  id=f"{DTYPE_ID[dtype]}-{B}x{Sq}x{Sk}x{H}x{D}-{mask}{'-causal' if causal else ''}"))
    # the C++ kernels: three sequences (one right-padded, one that sees nothing, one with HF's finite
    # mask value), then no mask at another scale; with and without dropout, causal or not
    for S, H, D in ((1, 1, 32), (3, 2, 64), (97, 3, 64), (130, 2, 32), (17, 2, 128)):
        for p in (0.0, 0.2):
            for causal in (False, True):
                out.append(impl_param("cpp", torch.float32, (3, S, S, H, D, "hf", causal, p, None),
                                      id=f"fp32-3x{S}x{H}x{D}-p{p}{'-causal' if causal else ''}"))
    return out


@pytest.mark.parametrize("impl, dtype, case", _padded_cases())
def test_attention_padded(impl, dtype, case):
    B, Sq, Sk, H, D, mask, causal, p, scale = case
    _padded_case(impl, B, Sq, Sk, H, D, dtype, mask, causal, p=p, scale=scale)
    if impl == "cpp":  # the same sequences without a mask, another scale
        _padded_case(impl, B, Sq, Sk, H, D, dtype, "none", causal, p=p, scale=0.3)


@pytest.mark.parametrize("impl", impls("triton", "cpp"))
def test_attention_odd_head_dims_and_negative_scale(impl):
    # head_dim 24 (q/k) and 40 (v) are padded in-kernel to 32 and 64; a negative scale flips q
    _padded_case(impl, 2, 9, 11, 1, 24, torch.float32, "right", False, Dv=40)
    _padded_case(impl, 1, 7, 7, 1, 32, torch.float32, "none", True, scale=-0.3)


# ---------------------------------------------------------------------------------------------
# varlen layout

_SAME = None  # lens_k: the query lengths (one cu_seqlens for both)


def _varlen_cases():
    out = []
    for lens_q, lens_k, D, causal in (([5, 1, 17, 3], _SAME, 32, False), ([5, 1, 17, 3], _SAME, 64, True),
                                      ([3, 20, 1], [7, 2, 0], 32, False),  # cross lengths, a sequence with no key
                                      ([9, 2, 33], [4, 6, 18], 128, True)):  # causal cross, Lq > Lk and Lq < Lk
        out.append(impl_param("triton", torch.float32, (lens_q, lens_k, 2, D, causal, 0.0),
                              id=f"fp32-{'cross' if lens_k else 'self'}-{D}{'-causal' if causal else ''}"))
    out += [impl_param("triton", torch.float16, ([17, 4, 30], _SAME, 2, 64, False, 0.0), id="fp16-self-64"),
            impl_param("triton", torch.float16, ([6, 21], [11, 21], 1, 32, True, 0.0), id="fp16-cross-32-causal")]
    for p in (0.0, 0.3):
        for causal in (False, True):
            out.append(impl_param("cpp", torch.float32, ([5, 1, 17, 64, 130, 3], _SAME, 3, 64, causal, p),
                                  id=f"fp32-self-64-p{p}{'-causal' if causal else ''}"))
    for causal in (False, True):  # an empty query sequence
        out.append(impl_param("cpp", torch.float32, ([3, 0, 7], [7, 2, 2], 2, 32, causal, 0.0),
                              id=f"fp32-cross-32{'-causal' if causal else ''}"))
    out.append(impl_param("cpp", torch.bfloat16, ([7, 33, 128], _SAME, 4, 64, False, 0.0), id="bf16-self-64"))
    return out


@pytest.mark.parametrize("impl, dtype, case", _varlen_cases())
def test_attention_varlen(impl, dtype, case):
    lens_q, lens_k, H, D, causal, p = case
    _varlen_case(impl, lens_q, lens_q if lens_k is None else lens_k, H, D, dtype, causal, p=p)


# ---------------------------------------------------------------------------------------------
# dropout: the mask is the reference's bit for bit, so fp32 results match it to rounding


@pytest.mark.parametrize("impl, causal", [impl_param(i, c, id="causal" if c else "full")
                                          for i in ("triton", "cpp") for c in (False, True)])
def test_attention_dropout_matches_reference(impl, causal):
    errs = _padded_case(impl, 2, 17, 19, 2, 32, torch.float32, "right", causal, p=0.3, seed=5)
    assert max(errs.values()) < 1e-5, errs
    _varlen_case(impl, [7, 17], [7, 17], 2, 32, torch.float32, causal, p=0.25, seed=6)


@pytest.mark.parametrize("impl", impls("triton", "cpp"))
def test_attention_dropout_changes_output_and_is_reproducible(impl):
    g = _gen(3)
    q, k, v = (_rand((1, 17, 2, 32), torch.float32, g, DEVICE[impl]) for _ in range(3))
    fwd, _ = _kernel(impl, q, v, None, None, None, 17, 17, 0.4, False)
    base = fwd(q, k, v, None, None, None, 17, 17, 0.0, 0.2, False, 0)[0]
    a = fwd(q, k, v, None, None, None, 17, 17, 0.4, 0.2, False, 77)[0]
    b = fwd(q, k, v, None, None, None, 17, 17, 0.4, 0.2, False, 77)[0]
    c = fwd(q, k, v, None, None, None, 17, 17, 0.4, 0.2, False, 78)[0]
    assert torch.equal(a, b) and not torch.allclose(a, base) and not torch.allclose(a, c)


@pytest.mark.parametrize("impl", impls("reference"))
def test_attention_padded_and_varlen_layouts_draw_the_same_dropout_mask(impl):
    g = _gen(0)
    q, k, v = (torch.randn(2, 5, 2, 8, generator=g) for _ in range(3))
    fwd, _ = _kernel(impl, q, v, None, None, None, 5, 5, 0.3, False)
    out_p, _ = fwd(q, k, v, None, None, None, 5, 5, 0.3, 0.25, False, 1234)
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    out_v, _ = fwd(q.reshape(10, 2, 8), k.reshape(10, 2, 8), v.reshape(10, 2, 8), None, cu, cu, 5, 5, 0.3, 0.25,
                   False, 1234)
    torch.testing.assert_close(out_v, out_p.reshape(10, 2, 8))


# ---------------------------------------------------------------------------------------------
# through the public op: masks, autograd, layouts


@pytest.mark.parametrize("impl", impls("reference", "cpp", "triton"))
def test_attention_matches_sdpa_and_masked_rows_are_zero(impl):
    dev = DEVICE[impl]
    q, k, v = (gradcheck_inputs(2, 6, 4, 16, grad=False, seed=s).float().to(dev) for s in range(3))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6], device=dev)
    with forced(impl):
        out = ops.attention(q, k, v, mask)
        # an additive HF-style extended mask gives the same
        ext = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        out_ext = ops.attention(q, k, v, ext)
        # a query row that sees no key: zeros and zero gradients, never NaN
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        dead = torch.zeros(2, 6, dtype=torch.long, device=dev)
        dead[1] = 1
        o = ops.attention(qg, kg, vg, dead)
        o.sum().backward()
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask.bool()[:, None, None, :]).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_ext, out, atol=1e-5, rtol=1e-5)
    assert o[0].abs().max() == 0
    for t in (qg, kg, vg):
        assert torch.isfinite(t.grad).all()
    assert qg.grad[0].abs().max() == 0


@pytest.mark.parametrize("impl", impls("triton", "cpp"))
def test_attention_public_op_with_autograd(impl):
    """Padded with a left- and right-padded (B, S) mask, then varlen with a (q, k) pair of
    cu_seqlens, causal: outputs and gradients of the public op equal the reference's."""
    from bertfast.ops.attention import attention, attention_ref

    dev = DEVICE[impl]
    g = _gen(11)
    B, S, H, D = 2, 13, 2, 32
    q, k, v = (_rand((B, S, H, D), torch.float32, g, dev).requires_grad_() for _ in range(3))
    mask = torch.ones(B, S, dtype=torch.int64, device=dev)
    mask[0, 9:] = 0
    mask[1, :4] = 0  # left padding
    with forced(impl):
        out = attention(q, k, v, attention_mask=mask)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    kb = torch.zeros(B, S, device=dev).masked_fill(mask == 0, float("-inf"))
    ref = attention_ref(q, k, v, kb)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-5)

    cu = torch.tensor([0, 5, 13], dtype=torch.int32, device=dev)
    qv, kv, vv = (t.detach()[0].clone().requires_grad_() for t in (q, k, v))  # (13, H, D) packed
    with forced(impl):
        o = attention(qv, kv, vv, cu_seqlens=(cu, cu), max_seqlen=(8, 8), causal=True)
        grads = torch.autograd.grad((o * o).sum(), (qv, kv, vv))
    r = attention_ref(qv, kv, vv, None, cu, cu, 8, 8, causal=True)
    ref_grads = torch.autograd.grad((r * r).sum(), (qv, kv, vv))
    torch.testing.assert_close(o, r, atol=2e-5, rtol=1e-5)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", impls("cpp"))
def test_attention_public_op_padded_with_mask_matches_reference(impl):
    g = _gen(4)
    qp, kp, vp = (torch.randn(2, 40, 4, 32, generator=g).requires_grad_() for _ in range(3))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0
    res = {}
    for name in (impl, "reference"):
        for t in (qp, kp, vp):
            t.grad = None
        with forced(name):
            o = ops.attention(qp, kp, vp, attention_mask=mask)
            o.backward(torch.cos(o.detach()))
        res[name] = [o.detach()] + [t.grad.clone() for t in (qp, kp, vp)]
    for a, b in zip(res[impl], res["reference"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl, dtype, D", [impl_param("cpp", dt, D, id=f"{DTYPE_ID[dt]}-{D}")
                                            for dt in (torch.float32, torch.bfloat16) for D in (17, 32, 40, 64)])
def test_attention_reads_fused_qkv_views_in_place(impl, dtype, D):
    """Q, K and V as views into one (tokens, 3, heads, head_dim) projection (BertModel's fused QKV)
    are read at their token stride: the same bits as from contiguous copies, padded (with and
    without a key bias) and packed, and within the accuracy rule of the float64 reference. 75
    queries leave partial query blocks and GEMM row blocks; head_dim 17 and 40 partial vectors."""
    A = _ref()
    B, S, H = 2, 75, 3
    g = _gen(D)
    qkv = torch.randn(B, S, 3, H, D, generator=g).to(dtype)
    bias = torch.zeros(B, S)
    bias[1, 60:] = float("-inf")
    cu = torch.tensor([0, 31, 2 * S], dtype=torch.int32)
    cases = [(qkv.unbind(2), (bias, None, None, S, S)), (qkv.unbind(2), (None, None, None, S, S)),
             (qkv.view(B * S, 3, H, D).unbind(1), (None, cu, cu, 2 * S - 31, 2 * S - 31))]
    for (q, k, v), geo in cases:
        assert not q.is_contiguous() and q.stride(-3) == 3 * H * D
        fwd, _ = _kernel(impl, q, v, geo[0], geo[1], geo[2], geo[3], geo[4], 0.0, False)
        rest = (*geo, 0.0, D ** -0.5, False, 0)
        out, lse = fwd(q, k, v, *rest)
        want_out, want_lse = fwd(q.contiguous(), k.contiguous(), v.contiguous(), *rest)
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
        ro, rl = A._fwd_reference(q.double(), k.double(), v.double(), *rest)
        if geo[1] is None:
            full = _full_bias(geo[0], B, S, S, False, "cpu")
            low_out, low_lse = _eager(q, k, v, full, 0.0, D ** -0.5, 0, torch.zeros_like(q))[:2]
        else:
            bias_v, rows_q, _ = A._varlen_bias(cu, cu, geo[3], geo[3], False, q.device)
            pad = lambda t: A._pad(t, cu, geo[3])[0]  # noqa: E731
            eo, el = _eager(pad(q), pad(k), pad(v), bias_v.double().expand(-1, 1, geo[3], -1), 0.0, D ** -0.5, 0,
                            torch.zeros_like(pad(q)))[:2]
            low_out = eo.reshape(-1, H, D)[rows_q]
            low_lse = el.permute(1, 0, 2).reshape(H, -1)[:, rows_q]
        from conftest import assert_within_eager_error

        floor = {torch.float32: 2e-6, torch.bfloat16: 4e-3}[dtype]
        assert_within_eager_error(["out", "lse"], [out, lse], [low_out, low_lse.float()], [ro, rl], floor)


@pytest.mark.parametrize("impl", impls("triton"))
def test_attention_fused_qkv_views_reach_the_kernel_without_copy(impl):
    """q/k/v as views of one fused projection (token stride 3*H*D), as the encoder passes them: the
    kernel reads the strides, and results equal those of contiguous copies."""
    from bertfast.kernels import attention as K
    from bertfast.padding import unpad_mask

    dev = DEVICE[impl]
    g = _gen(12)
    B, S, H, D = 2, 11, 2, 32
    qkv = _rand((B, S, 3, H, D), torch.float32, g, dev).requires_grad_()
    mask = torch.ones(B, S, dtype=torch.int64, device=dev)
    mask[1, 6:] = 0
    layout = unpad_mask(mask)
    packed = qkv.reshape(B * S, 3, H, D).index_select(0, layout.indices)
    calls = []  # the backend registry takes the spy at its first load (reset before each test)
    orig = K.attention_fwd

    def spy(q, k, v, *a):
        calls.append(q.is_contiguous())
        return orig(q, k, v, *a)

    for views, kw in (((qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]), dict(attention_mask=mask)),
                      ((packed[:, 0], packed[:, 1], packed[:, 2]), dict(cu_seqlens=layout))):
        with forced(impl), pytest.MonkeyPatch.context() as mp:
            mp.setattr(K, "attention_fwd", spy)
            out = ops.attention(*views, **kw)
            reached_as_view = calls[-1] is False
            grads = torch.autograd.grad(out.square().sum(), qkv)
        copies = [t.detach().contiguous().requires_grad_() for t in views]
        with forced(impl):
            ref = ops.attention(*copies, **kw)
            ref.square().sum().backward()
        assert reached_as_view, calls  # the view reached the kernel as a view, not a copy
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
        d = grads[0] if "attention_mask" in kw else grads[0].reshape(B * S, 3, H, D)[layout.indices]
        for i, c in enumerate(copies):
            torch.testing.assert_close(d.select(-3, i), c.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", impls("cpp"))
def test_attention_same_with_1_and_2_threads(impl):
    lens = [50, 128, 77, 3]
    cu = _cu(lens, "cpu")
    g = _gen(5)
    q, k, v = (torch.randn(int(cu[-1]), 6, 64, generator=g) for _ in range(3))
    args = (None, cu, cu, 128, 128, 0.1, 0.125, False, 7)
    fwd, bwd = _kernel(impl, q, v, None, cu, cu, 128, 128, 0.1, False)

    def run():
        out, lse = fwd(q, k, v, *args)
        return [out, lse, *bwd(torch.ones_like(out), q, k, v, out, lse, *args)]

    same_with_1_and_2_threads(run)


@pytest.mark.parametrize("impl, dtype, causal", [
    impl_param("cpp", dt, c, id=f"{DTYPE_ID[dt]}-{'causal' if c else 'full'}")
    for dt in (torch.float32, torch.bfloat16) for c in (False, True)])
def test_attention_unmasked_padded_served_by_aten_flash(monkeypatch, impl, dtype, causal):
    """Unmasked padded batches on CPU: ATen's CPU flash kernel (a `cpp` row) serves the bf16 forward
    and the fp32 backward, the C++ kernels the others (whichever measured faster), so every pairing
    of the two kernels' forward and backward runs here: same outputs, lse and grads as the
    reference, within the accuracy rule."""
    from conftest import assert_within_eager_error

    A = _ref()
    g = _gen(3)
    q, k, v = (torch.randn(2, 9, 3, 32, generator=g).to(dtype) for _ in range(3))
    call = Call("cpu", dtype, 32, "fwd+bwd", "padded", 9, "none", False, "self" if causal else "none")
    sel = dispatch.select(OP, call)
    assert sel.backend == ("aten_flash+cpp" if dtype == torch.bfloat16 else "cpp+aten_flash"), sel
    # a key mask or dropout: the C++ kernels serve both passes
    assert dispatch.select(OP, call._replace(mask="key")).backend == "cpp"
    assert dispatch.select(OP, call._replace(dropout=True)).backend == "cpp"
    args = (None, None, None, 9, 9, 0.0, 0.2, causal, 0)
    out, lse = sel.fwd(q, k, v, *args)
    ref_out, ref_lse = A._fwd_reference(q.double(), k.double(), v.double(), *args)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    low = _eager(q, k, v, _full_bias(None, 2, 9, 9, causal, "cpu"), 0.0, 0.2, 0, dout)
    got = sel.bwd(dout, q, k, v, out, lse, *args)
    ref = A._bwd_reference(dout.double(), q.double(), k.double(), v.double(), ref_out, ref_lse, *args)
    floor = {torch.float32: 2e-6, torch.bfloat16: 4e-3}[dtype]
    assert_within_eager_error(["out", "lse", "dq", "dk", "dv"], [out, lse, *got],
                              [low[0], low[1].float(), *low[2:]], [ref_out, ref_lse, *ref], floor)


@pytest.mark.parametrize("impl", impls("triton"))
def test_attention_unsupported_inputs_raise_under_strict(impl):
    """What the Triton kernels do not serve is declared (bertfast/dispatch/table.py), refused by
    dispatch before any kernel runs: a head_dim over MAX_HEAD_DIM is an error when triton is forced
    under BERTFAST_STRICT=1, naming the reason; float64 goes to the reference by design (the
    oracle's precision), with the refusal listed by explain."""
    from bertfast.kernels import attention as K

    dev = DEVICE[impl]
    q = torch.zeros(1, 2, 1, 264, dtype=torch.float32, device=dev)
    assert K.MAX_HEAD_DIM == 256
    with forced(impl):
        with pytest.raises(dispatch.BackendError, match="triton: head_dim 264 > 256"):
            ops.attention(q, q, q)
        q64 = torch.zeros(1, 2, 1, 8, dtype=torch.float64, device=dev)
        torch.testing.assert_close(ops.attention(q64, q64, q64), ops.attention_ref(q64, q64, q64))
        name, why = dispatch.explain(OP, dev, Call(dev, torch.float64, 8, "fwd", "padded", 2))
    assert name == "reference" and "triton: dtype fp64" in why, why


@pytest.mark.parametrize("impl, causal", [impl_param("reference", c, id="causal" if c else "full")
                                          for c in (False, True)])
def test_attention_gradcheck_padded_and_varlen(impl, causal):
    t = gradcheck_inputs
    q, k, v = t(2, 5, 3, 8), t(2, 5, 3, 8, seed=1), t(2, 5, 3, 8, seed=2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 2, 4, 7], dtype=torch.int32)
    qv, kv, vv = t(8, 3, 8), t(7, 3, 8, seed=1), t(7, 3, 8, seed=2)
    # fast_mode: a random projection of the Jacobian (one backward), not each of its 720 columns
    with forced(impl):
        assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, mask, causal=causal), (q, k, v),
                                        fast_mode=True)
        assert torch.autograd.gradcheck(
            lambda q, k, v: ops.attention(q, k, v, cu_seqlens=(cu_q, cu_k), max_seqlen=(5, 3), causal=causal),
            (qv, kv, vv), fast_mode=True)


# ---------------------------------------------------------------------------------------------
# GPU only: bf16, BERT-size shapes, dropout statistics, determinism


@pytest.mark.parametrize("impl, dtype, D", [impl_param("triton", dt, D, id=f"{DTYPE_ID[dt]}-{D}-gpu") for dt, D in
                                            ((torch.bfloat16, 32), (torch.bfloat16, 64), (torch.bfloat16, 128),
                                             (torch.float16, 64))])
def test_attention_gpu_low_precision(impl, dtype, D):
    require_gpu(impl)
    _padded_case(impl, 4, 197, 197, 4, D, dtype, "right", False)
    _padded_case(impl, 2, 128, 256, 3, D, dtype, "left", True)
    _varlen_case(impl, [128, 1, 77, 300], [128, 1, 77, 300], 4, D, dtype, causal=False)


@pytest.mark.parametrize("impl, S", [impl_param("triton", S, id=f"{S}-gpu") for S in (128, 512)])
def test_attention_gpu_bert_shapes(impl, S):
    require_gpu(impl)
    _padded_case(impl, 16384 // S // 4, S, S, 12, 64, torch.bfloat16, "right", False)
    _padded_case(impl, 8, S, S, 16, 64, torch.float16, "none", False, p=0.1)


@pytest.mark.parametrize("impl", [impl_param("triton", id="gpu")])
def test_attention_gpu_dropout_statistics(impl):
    require_gpu(impl)
    B, S, H, p = 8, 512, 12, 0.2
    q = torch.zeros(B, S, H, 64, device="cuda", dtype=torch.float16)  # uniform attention
    v = torch.ones(B, S, H, 64, device="cuda", dtype=torch.float16)
    fwd, _ = _kernel(impl, q, v, None, None, None, S, S, p, False)
    out, _ = fwd(q, q, v, None, None, None, S, S, p, 0.125, False, 2024)
    # out = mean over keys of keep / (1 - p): mean 1, std sqrt(p / ((1 - p) S)) per row
    per_row = out[..., 0].float()
    assert abs(per_row.mean().item() - 1.0) < 2e-3
    assert abs(per_row.std().item() - math.sqrt(p / ((1 - p) * S))) < 3e-3


@pytest.mark.parametrize("impl", [impl_param("triton", id="gpu")])
def test_attention_gpu_backward_deterministic(impl):
    require_gpu(impl)
    g = _gen(9)
    B, S, H, D = 4, 384, 12, 64
    q, k, v, do = (_rand((B, S, H, D), torch.bfloat16, g, "cuda") for _ in range(4))
    fwd, bwd = _kernel(impl, q, v, None, None, None, S, S, 0.1, False)
    out, lse = fwd(q, k, v, None, None, None, S, S, 0.1, 0.125, False, 5)
    a = bwd(do, q, k, v, out, lse, None, None, None, S, S, 0.1, 0.125, False, 5)
    torch.use_deterministic_algorithms(True)
    try:
        b = bwd(do, q, k, v, out, lse, None, None, None, S, S, 0.1, 0.125, False, 5)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: ops.attention(torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4),
                           torch.ones(2, 4)), ValueError, "attention_mask"),
    (lambda: ops.attention(torch.randn(6, 2, 4), torch.randn(6, 2, 4), torch.randn(6, 2, 4),
                           cu_seqlens=torch.tensor([0, 3, 6]), max_seqlen=3), TypeError, "cu_seqlens"),
    (lambda: ops.attention(torch.randn(6, 2, 4), torch.randn(6, 2, 4), torch.randn(6, 2, 4),
                           cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.int32), max_seqlen=3), ValueError,
     "cu_seqlens"),
    (lambda: ops.attention(torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4).half(), torch.randn(2, 3, 2, 4)),
     TypeError, "dtype"),
    (lambda: ops.attention(torch.randn(0, 3, 2, 4), torch.randn(0, 3, 2, 4), torch.randn(0, 3, 2, 4)),
     ValueError, "batch"),
], ids=["mask_shape", "cu_seqlens_dtype", "cu_seqlens_total", "dtype_mismatch", "empty_batch"])
def test_attention_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
