"""The reference ops: float64 gradcheck, the analytic backward against autograd of the forward,
dropout reproducibility, the shared RNG, and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import bertfast
from bertfast import ops
from bertfast.ops import _rng

D = torch.float64


@pytest.fixture(autouse=True)
def _reference():
    with bertfast.use_backend("reference"):
        yield


def _t(*shape, grad=True, seed=None):
    g = torch.Generator().manual_seed(hash(shape) % 1000 if seed is None else seed)
    return torch.randn(*shape, dtype=D, generator=g).requires_grad_(grad)


def test_gradcheck_bias_gelu():
    x, b = _t(3, 5, 17), _t(17)
    for approx in ("none", "tanh"):
        assert torch.autograd.gradcheck(lambda x, b: ops.bias_gelu(x, b, approx), (x, b))


def test_gradcheck_bias_residual_layernorm():
    x, r, b, w, lb = _t(4, 7, 17), _t(4, 7, 17, seed=1), _t(17), _t(17, seed=2), _t(17, seed=3)
    assert torch.autograd.gradcheck(lambda *a: ops.bias_residual_layernorm(*a, eps=1e-5), (x, b, r, w, lb))
    assert torch.autograd.gradcheck(lambda x, r, w, lb: ops.bias_residual_layernorm(x, None, r, w, lb, 1e-5),
                                    (x, r, w, lb))


def test_gradcheck_gelu_layernorm():
    x, b, w, lb = _t(6, 17), _t(17), _t(17, seed=2), _t(17, seed=3)
    assert torch.autograd.gradcheck(lambda *a: ops.gelu_layernorm(*a, eps=1e-5), (x, b, w, lb))


def test_gradcheck_embedding_layernorm_repeated_ids():
    ids = torch.tensor([[1, 5, 5, 0], [5, 5, 2, 9]])
    tt = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 0]])
    W, P, T, w, b = _t(11, 17), _t(8, 17), _t(2, 17), _t(17, seed=2), _t(17, seed=3)
    # fast_mode: a random projection of the Jacobian (one backward) instead of every column, so
    # 400 inputs do not cost 800 forwards; a wrong gradient still fails it
    assert torch.autograd.gradcheck(lambda *a: ops.embedding_layernorm(ids, tt, None, *a, eps=1e-5),
                                    (W, P, T, w, b), fast_mode=True)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_attention_padded_and_varlen(causal):
    q, k, v = _t(2, 5, 3, 8), _t(2, 5, 3, 8, seed=1), _t(2, 5, 3, 8, seed=2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    # fast_mode: a random projection of the Jacobian, not each of its 720 columns (see above)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, mask, causal=causal), (q, k, v),
                                    fast_mode=True)
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 2, 4, 7], dtype=torch.int32)
    qv, kv, vv = _t(8, 3, 8), _t(7, 3, 8, seed=1), _t(7, 3, 8, seed=2)
    assert torch.autograd.gradcheck(
        lambda q, k, v: ops.attention(q, k, v, cu_seqlens=(cu_q, cu_k), max_seqlen=(5, 3), causal=causal),
        (qv, kv, vv), fast_mode=True)


def test_attention_matches_sdpa_and_masked_rows_are_zero():
    q, k, v = (_t(2, 6, 4, 16, grad=False, seed=s).float() for s in range(3))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    out = ops.attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask.bool()[:, None, None, :]).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # an additive HF-style extended mask gives the same
    ext = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    torch.testing.assert_close(ops.attention(q, k, v, ext), out, atol=1e-5, rtol=1e-5)
    # a query row that sees no key: zeros and zero gradients, never NaN
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    dead = torch.zeros(2, 6, dtype=torch.long)
    dead[1] = 1
    o = ops.attention(qg, kg, vg, dead)
    assert o[0].abs().max() == 0
    o.sum().backward()
    for t in (qg, kg, vg):
        assert torch.isfinite(t.grad).all()
    assert qg.grad[0].abs().max() == 0


def test_padded_and_varlen_layouts_draw_the_same_dropout_mask():
    q, k, v = (_t(2, 5, 2, 8, grad=False, seed=s).float() for s in range(3))
    fwd = ops.attention.__globals__["_fwd_reference"]
    out_p, _ = fwd(q, k, v, None, None, None, 5, 5, 0.3, 0.25, False, 1234)
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    out_v, _ = fwd(q.reshape(10, 2, 8), k.reshape(10, 2, 8), v.reshape(10, 2, 8), None, cu, cu, 5, 5, 0.3, 0.25,
                   False, 1234)
    torch.testing.assert_close(out_v, out_p.reshape(10, 2, 8))


def test_dropout_seeded_by_torch_and_backward_regenerates_mask():
    x, r, b, w, lb = _t(64, 33), _t(64, 33, seed=1), _t(33), _t(33, seed=2), _t(33, seed=3)
    torch.manual_seed(7)
    y1 = ops.bias_residual_layernorm(x, b, r, w, lb, 1e-5, dropout_p=0.25)
    torch.manual_seed(7)
    y2 = ops.bias_residual_layernorm(x, b, r, w, lb, 1e-5, dropout_p=0.25)
    assert torch.equal(y1, y2)
    y3 = ops.bias_residual_layernorm(x, b, r, w, lb, 1e-5, dropout_p=0.25)
    assert not torch.equal(y1, y3)
    # backward with a fixed seed equals autograd through the reference with the same mask
    seed = 99
    mod = ops.bias_residual_layernorm.__globals__
    out, mean, rstd = mod["_fwd_reference"](x, b, r, w, lb, 1e-5, 0.25, seed)
    g = torch.randn_like(out)
    got = mod["_bwd_reference"](g, x, b, r, w, lb, mean, rstd, 1e-5, 0.25, seed)
    ref = torch.autograd.grad(ops.bias_residual_layernorm_ref(x, b, r, w, lb, 1e-5, 0.25, seed), (x, b, r, w, lb), g)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e)


def test_dropout_rate_and_scale():
    keep = _rng.keep_mask(12345, 0.1, torch.arange(200_000))
    rate = 1 - keep.float().mean().item()
    assert abs(rate - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 200_000)
    m = _rng.dropout_scale_mask(1, 0.2, (100, 100), "cpu")
    assert set(torch.unique(m).tolist()) == {0.0, 1.25}


def test_philox_matches_plain_python():
    M = 0xFFFFFFFF

    def philox(seed, n):
        c0, c1, c2, c3, k0, k1 = n & M, n >> 32, 0, 0, seed & M, seed >> 32 & M
        for _ in range(7):
            p2, p0 = c2 * 0xCD9E8D57, c0 * 0xD2511F53
            c0, c1, c2, c3 = (p2 >> 32) ^ c1 ^ k0, p2 & M, (p0 >> 32) ^ c3 ^ k1, p0 & M
            k0, k1 = (k0 + 0x9E3779B9) & M, (k1 + 0xBB67AE85) & M
        return c0

    offs = [0, 1, 2, 2**31 - 1, 2**32 + 5, 2**40 + 11]
    seed = 0x0123456789ABCDEF
    assert _rng.philox_word0(seed, torch.tensor(offs)).tolist() == [philox(seed, o) for o in offs]


def test_fp16_and_bf16_inputs_keep_fp32_statistics():
    x = torch.randn(8, 64) * 100 + 1000  # large mean: a naive fp16 variance would lose it
    w, b = torch.ones(64), torch.zeros(64)
    for dt in (torch.float16, torch.bfloat16):
        y = ops.bias_residual_layernorm(x.to(dt), None, torch.zeros(8, 64, dtype=dt), w.to(dt), b.to(dt), 1e-5)
        ref = F.layer_norm(x.to(dt).float(), (64,), eps=1e-5)
        assert y.dtype == dt
        torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)


def test_non_contiguous_inputs():
    x = _t(17, 6, grad=False).t()  # (6, 17) transposed view
    b = _t(34, grad=False)[::2]
    torch.testing.assert_close(ops.bias_gelu(x, b), ops.bias_gelu_ref(x.contiguous(), b.contiguous()))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: ops.bias_gelu(torch.randn(3, 4), torch.randn(5)), ValueError, "bias"),
    (lambda: ops.bias_gelu(torch.ones(3, 4, dtype=torch.long), torch.randn(4)), TypeError, "x"),
    (lambda: ops.bias_gelu(torch.randn(3, 4), torch.randn(4), approximate="fast"), ValueError, "approximate"),
    (lambda: ops.bias_residual_layernorm(torch.randn(3, 4), None, torch.randn(3, 5), torch.ones(4), torch.zeros(4)),
     ValueError, "residual"),
    (lambda: ops.bias_residual_layernorm(torch.randn(3, 4), None, torch.randn(3, 4), torch.ones(4), torch.zeros(4),
                                         dropout_p=1.0), ValueError, "dropout_p"),
    (lambda: ops.gelu_layernorm(torch.randn(3, 4), torch.randn(4), torch.ones(4), torch.zeros(4), eps=0.0),
     ValueError, "eps"),
    (lambda: ops.embedding_layernorm(torch.tensor([[1, 20]]), None, None, torch.randn(10, 4), torch.randn(8, 4),
                                     torch.randn(2, 4), torch.ones(4), torch.zeros(4)), IndexError, "input_ids"),
    (lambda: ops.embedding_layernorm(torch.tensor([[1.0]]), None, None, torch.randn(10, 4), torch.randn(8, 4),
                                     torch.randn(2, 4), torch.ones(4), torch.zeros(4)), TypeError, "input_ids"),
    (lambda: ops.embedding_layernorm(torch.ones(1, 9, dtype=torch.long), None, None, torch.randn(10, 4),
                                     torch.randn(8, 4), torch.randn(2, 4), torch.ones(4), torch.zeros(4)),
     ValueError, "position"),
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
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
