"""The C++ CPU kernels (csrc/cpu via bertfast/dispatch/cpp.py) against the plain-PyTorch references.

Every test forces the `cpp` backend with BERTFAST_STRICT=1, so a silent fallback to the
reference fails the test. Accuracy rule (docs/testing.md): against a float64 oracle, a kernel's
error must stay within 2x the error eager PyTorch makes in the same precision, plus a small
floor. The first test session builds the extension (cached afterwards).
"""
import importlib

import pytest
import torch

import bertfast
import bertfast.dispatch.cpp as cpp
from bertfast import dispatch, ops
from bertfast.dispatch import Call

FLOOR = {torch.float32: 2e-6, torch.bfloat16: 4e-3}


@pytest.fixture(scope="module", autouse=True)
def _built():
    cpp.load()  # a build failure is an error here, not a skip: CI must build the kernels
    assert cpp.status()["state"] in ("built", "cached", "prebuilt"), cpp.status()


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    monkeypatch.setenv("BERTFAST_STRICT", "1")


def _check(got, low, oracle, dtype, what):
    """|got - oracle| <= 2 |low - oracle| + floor * max(1, |oracle|max)."""
    got, low, oracle = got.double(), low.double(), oracle.double()
    err = (got - oracle).abs().max().item()
    ref_err = (low - oracle).abs().max().item()
    scale = max(1.0, oracle.abs().max().item())
    bound = 2 * ref_err + FLOOR[dtype] * scale
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (eager {dtype} error {ref_err:.3g})"


# ---------------------------------------------------------------------------------------
# attention: padded (key bias) and packed varlen, against the reference backward contract

def _attn_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for _ in range(3)]


def _eager_attention(q, k, v, key_bias, scale, causal):
    """Padded attention as eager PyTorch computes it in the inputs' own dtype: (out, lse (B, H, S)).
    Its error against the float64 oracle is what the accuracy rule allows twice of, so the bound
    follows the dtype's real rounding on whatever CPU runs the test (ATen's kernels differ between
    AVX-512, AVX2 and the portable build) rather than one machine's measured result."""
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if key_bias is not None:
        s = s + key_bias[:, None, None, :].to(s.dtype)
    if causal:
        Sq, Sk = s.shape[-2:]
        s = s.masked_fill(torch.ones(Sq, Sk, dtype=torch.bool).triu(Sk - Sq + 1), float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v), s.logsumexp(-1)


def _eager_attention_varlen(q, k, v, cu, scale):
    """_eager_attention of each packed (total, H, D) sequence alone: (out (total, H, D), lse (H, total))."""
    pieces = [_eager_attention(q[None, a:b], k[None, a:b], v[None, a:b], None, scale, False)
              for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    return torch.cat([o[0] for o, _ in pieces]), torch.cat([lse[0] for _, lse in pieces], -1)


def _attn_check(args, dtype, atol):
    A = importlib.import_module("bertfast.ops.attention")

    q, k, v = args[:3]
    out, lse = cpp.attention_fwd(*args)
    ro, rl = A._fwd_reference(*args)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == rl.shape
    assert torch.equal(torch.isinf(lse), torch.isinf(rl)), "rows that see no key must have lse = +inf"
    torch.testing.assert_close(out.float(), ro.float(), atol=atol, rtol=atol)
    torch.testing.assert_close(torch.nan_to_num(lse, posinf=0.0), torch.nan_to_num(rl, posinf=0.0), atol=atol,
                               rtol=atol)
    dout = torch.randn_like(out)
    got = cpp.attention_bwd(dout, q, k, v, ro, rl, *args[3:])
    ref = A._bwd_reference(dout, q, k, v, ro, rl, *args[3:])
    for name, a, b in zip("qkv", got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b.float(), atol=4 * atol, rtol=4 * atol, msg=f"d{name}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("S,H,D", [(1, 1, 32), (3, 2, 64), (97, 3, 64), (130, 2, 32), (17, 2, 128)])
def test_attention_padded(S, H, D, p, causal):
    B = 3
    q, k, v = _attn_inputs((B, S, H, D), torch.float32)
    bias = torch.zeros(B, S)
    bias[1, S // 2 + 1:] = float("-inf")  # right padding
    bias[2, :] = float("-inf")  # a sequence that sees nothing: zeros, lse = +inf
    bias[0, 0] = -10000.0  # HF's finite "extended mask" value
    _attn_check((q, k, v, bias, None, None, S, S, p, D ** -0.5, causal, 4321), torch.float32, 2e-5)
    _attn_check((q, k, v, None, None, None, S, S, p, 0.3, causal, 4321), torch.float32, 2e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_attention_varlen(p, causal):
    lens = [5, 1, 17, 64, 130, 3]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = _attn_inputs((int(cu[-1]), 3, 64), torch.float32, seed=1)
    _attn_check((q, k, v, None, cu, cu, max(lens), max(lens), p, 0.125, causal, 99), torch.float32, 2e-5)


def test_attention_varlen_cross_lengths():
    cu_q = torch.tensor([0, 3, 3, 10], dtype=torch.int32)  # an empty query sequence
    cu_k = torch.tensor([0, 7, 9, 11], dtype=torch.int32)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(10, 2, 32, generator=g)
    k, v = torch.randn(2, 11, 2, 32, generator=g).unbind(0)
    for causal in (False, True):
        _attn_check((q, k, v, None, cu_q, cu_k, 7, 7, 0.0, 0.2, causal, 0), torch.float32, 2e-5)


def test_attention_bf16_and_public_op():
    lens = [7, 33, 128]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = _attn_inputs((int(cu[-1]), 4, 64), torch.bfloat16, seed=3)
    _attn_check((q, k, v, None, cu, cu, 128, 128, 0.0, 0.125, False, 0), torch.bfloat16, 2e-2)
    # the public op with autograd, padded with a (B, S) mask, against the reference backend
    g = torch.Generator().manual_seed(4)
    qp, kp, vp = (torch.randn(2, 40, 4, 32, generator=g).requires_grad_() for _ in range(3))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0
    res = {}
    for name in ("cpp", "reference"):
        for t in (qp, kp, vp):
            t.grad = None
        with bertfast.use_backend(name):
            o = ops.attention(qp, kp, vp, attention_mask=mask)
            o.backward(torch.cos(o.detach()))
        res[name] = [o.detach()] + [t.grad.clone() for t in (qp, kp, vp)]
    for a, b in zip(res["cpp"], res["reference"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [17, 32, 40, 64])
def test_attention_reads_fused_qkv_views_in_place(dtype, D):
    """Q, K and V as views into one (tokens, 3, heads, head_dim) projection (BertModel's fused QKV)
    are read at their token stride: the same bits as from contiguous copies, padded (with and
    without a key bias) and packed, and within tolerance of the float64 reference. 75 queries
    leave partial query blocks and GEMM row blocks; head_dim 17 and 40 partial vectors."""
    A = importlib.import_module("bertfast.ops.attention")
    B, S, H = 2, 75, 3
    g = torch.Generator().manual_seed(D)
    qkv = torch.randn(B, S, 3, H, D, generator=g).to(dtype)
    bias = torch.zeros(B, S)
    bias[1, 60:] = float("-inf")
    cu = torch.tensor([0, 31, 2 * S], dtype=torch.int32)
    fwd = cpp._OPS["attention_fwd"]  # the extension itself, whatever serves the public op
    cases = [(qkv.unbind(2), (bias, None, None, S, S)), (qkv.unbind(2), (None, None, None, S, S)),
             (qkv.view(B * S, 3, H, D).unbind(1), (None, cu, cu, 2 * S - 31, 2 * S - 31))]
    for (q, k, v), geo in cases:
        assert not q.is_contiguous() and q.stride(-3) == 3 * H * D
        rest = (*geo, 0.0, D ** -0.5, False, 0)
        out, lse = fwd(q, k, v, *rest)
        want_out, want_lse = fwd(q.contiguous(), k.contiguous(), v.contiguous(), *rest)
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
        ro, rl = A._fwd_reference(q.double(), k.double(), v.double(), *rest)
        if geo[1] is None:
            low_out, low_lse = _eager_attention(q, k, v, geo[0], D ** -0.5, False)
        else:
            low_out, low_lse = _eager_attention_varlen(q, k, v, cu, D ** -0.5)
        _check(out, low_out, ro, dtype, "out")
        _check(lse, low_lse, rl, dtype, "lse")


def test_attention_deterministic_across_threads():
    lens = [50, 128, 77, 3]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = _attn_inputs((int(cu[-1]), 6, 64), torch.float32, seed=5)
    args = (q, k, v, None, cu, cu, 128, 128, 0.1, 0.125, False, 7)
    prev = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, lse = cpp.attention_fwd(*args)
            runs.append([out, lse, *cpp.attention_bwd(torch.ones_like(out), q, k, v, out, lse, *args[3:])])
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmasked_padded_attention_served_by_aten_flash(monkeypatch, causal, dtype):
    """Unmasked padded batches: ATen's CPU flash kernel serves the bf16 forward and the fp32
    backward, this extension the others (whichever measured faster), so every pairing of the two
    kernels' forward and backward runs here: same outputs, lse and grads as the reference."""
    att = importlib.import_module("bertfast.ops.attention")
    monkeypatch.setenv("BERTFAST_STRICT", "1")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 9, 3, 32, generator=g).to(dtype) for _ in range(3))
    call = Call("cpu", dtype, 32, "fwd+bwd", "padded", 9, "none", False, "self" if causal else "none")
    sel = dispatch.select("attention", call)
    assert sel.backend == ("aten_flash+cpp" if dtype == torch.bfloat16 else "cpp+aten_flash"), sel
    # a key mask or dropout: the C++ kernels serve both passes
    assert dispatch.select("attention", call._replace(mask="key")).backend == "cpp"
    assert dispatch.select("attention", call._replace(dropout=True)).backend == "cpp"
    out, lse = sel.fwd(q, k, v, None, None, None, 9, 9, 0.0, 0.2, causal, 0)
    ref_out, ref_lse = att._fwd_reference(q.double(), k.double(), v.double(), None, None, None, 9, 9, 0.0, 0.2,
                                          causal, 0)
    # eager PyTorch in the same dtype, with autograd: the error the rule allows twice of
    low = [t.detach().requires_grad_() for t in (q, k, v)]
    low_out, low_lse = _eager_attention(*low, None, 0.2, causal)
    _check(out, low_out, ref_out, dtype, "out")
    _check(lse, low_lse, ref_lse, dtype, "lse")
    dout = torch.randn(out.shape, generator=g).to(dtype)
    low_grads = torch.autograd.grad(low_out, low, dout)
    got = sel.bwd(dout, q, k, v, out, lse, None, None, None, 9, 9, 0.0, 0.2, causal, 0)
    ref = att._bwd_reference(dout.double(), q.double(), k.double(), v.double(), ref_out, ref_lse, None, None, None,
                             9, 9, 0.0, 0.2, causal, 0)
    for name, a, lo, b in zip("qkv", got, low_grads, ref):
        _check(a, lo, b, dtype, f"d{name}")
