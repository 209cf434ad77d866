"""The reference ops: float64 gradcheck, the analytic backward against autograd of the forward,
dropout reproducibility, the shared RNG, and bad input."""
import pytest
import torch
import torch.nn.functional as F

import bertfast
from bertfast import ops

D = torch.float64


@pytest.fixture(autouse=True)
def _reference():
    with bertfast.use_backend("reference"):
        yield


def _t(*shape, grad=True, seed=None):
    g = torch.Generator().manual_seed(hash(shape) % 1000 if seed is None else seed)
    return torch.randn(*shape, dtype=D, generator=g).requires_grad_(grad)


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
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
