"""attention: softmax(Q K^T * scale + mask) V, padded or packed variable-length.

Two layouts:
- padded: q (B, Sq, H, D), k and v (B, Sk, H, D), with an optional key-padding mask
  (HF's (B, Sk) mask, bool/int/float, nonzero = attend) or an additive float mask of shape
  (B, 1, 1, Sk) (HF's "extended" mask). A general additive mask (B, 1|H, Sq, Sk) is served
  by the reference implementation only.
- varlen: q (total_q, H, D), k and v (total_k, H, D), int32 cu_seqlens (B + 1,) (or a pair
  (cu_seqlens_q, cu_seqlens_k) for cross-attention) and max_seqlen (int or pair).

causal=True masks key j for query i when j > i + (Lk - Lq) (bottom-right aligned, as
FlashAttention; the usual causal mask when Lq == Lk). A query row that sees no key
returns zeros and gets zero gradients. dropout_p drops attention probabilities after the
softmax; probability (b, h, i, j) has offset ((b * H + h) * max_q + i) * max_k + j in the
shared Philox stream (ops/_rng.py), so the padded and the packed layouts of one batch draw
the same mask.

Implementations (bertfast/dispatch/table.py: the C++ kernels, ATen's CPU flash attention, the
Triton kernels, PyTorch's SDPA and varlen_attn, the reference below) see:
fwd(q, k, v, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed) -> (out, lse)
bwd(dout, q, k, v, out, lse, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed) -> (dq, dk, dv)
key_bias: None or fp32 (B, Sk) additive (padded layout only); cu_*: None (padded) or int32.
lse (fp32) is (B, H, Sq) padded or (H, total_q) varlen, natural log, and +inf on rows that
see no key (so a backward's exp(s - lse) is 0 there).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import dispatch
from ..dispatch import Call
from ._common import (
    FusedOp,
    can_sync,
    check_dropout,
    check_float,
    compare_close,
    seed_int,
)
from ..padding import PackedLayout, clamp_offsets, offsets_error, offsets_summary, summary_error
from ._rng import draw_seed, keep_mask

OP = "attention"
_SUPPORTED_MASKS = (
    "a (B, Sk) key mask (bool/int/float, nonzero = attend) or an additive (B, 1, 1, Sk) / (B, 1|H, Sq, Sk) float mask"
)


def _dropout_offsets(B, H, max_q, max_k, device):
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    i = torch.arange(max_q, device=device).view(1, 1, max_q, 1)
    j = torch.arange(max_k, device=device).view(1, 1, 1, max_k)
    return ((b * H + h) * max_q + i) * max_k + j


def _attention_padded_ref(q, k, v, bias, p, scale, causal, seed):
    """q (B,Sq,H,D), k/v (B,Sk,H,D), bias None or additive broadcastable to (B,H,Sq,Sk).
    Returns (out (B,Sq,H,D) in q.dtype, lse (B,H,Sq) fp32)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    s = torch.einsum("bihd,bjhd->bhij", q.to(acc), k.to(acc)) * scale
    if bias is not None:
        s = s + bias.to(acc)
    if causal:
        i = torch.arange(Sq, device=q.device).view(Sq, 1)
        j = torch.arange(Sk, device=q.device).view(1, Sk)
        s = s.masked_fill(j > i + (Sk - Sq), float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    dead = torch.isneginf(m)  # rows that see no key
    m = torch.where(dead, torch.zeros_like(m), m)
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    prob = e / torch.where(dead, torch.ones_like(denom), denom)
    lse = torch.where(dead, torch.full_like(m, float("inf")), m + torch.log(denom)).squeeze(-1)
    if p > 0.0:
        keep = keep_mask(seed, p, _dropout_offsets(B, H, Sq, Sk, q.device))
        prob = prob * keep.to(acc) / (1.0 - p)
    out = torch.einsum("bhij,bjhd->bihd", prob, v.to(acc))
    return out.to(q.dtype).contiguous(), lse.float().contiguous()


def _pad(x, cu, max_len):
    """(total, H, D) packed rows -> (B, max_len, H, D) zero-padded, and the key-valid mask."""
    B = cu.numel() - 1
    lens = (cu[1:] - cu[:-1]).long()
    pos = torch.arange(max_len, device=x.device).view(1, -1)
    valid = pos < lens.view(-1, 1)
    idx = (cu[:-1].long().view(-1, 1) + pos).clamp(max=max(x.shape[0] - 1, 0))
    out = x[idx.reshape(-1)].view(B, max_len, *x.shape[1:]) if x.shape[0] else x.new_zeros(B, max_len, *x.shape[1:])
    return out * valid.view(B, max_len, 1, 1).to(x.dtype), valid


def _varlen_bias(cu_q, cu_k, max_q, max_k, causal, device):
    """The padded-layout additive bias (B, 1, 1|max_q, max_k) of a varlen batch, and the
    padded row indices of the packed query and key tokens."""
    lq = (cu_q[1:] - cu_q[:-1]).long().view(-1, 1)
    lk = (cu_k[1:] - cu_k[:-1]).long().view(-1, 1)
    vq = torch.arange(max_q, device=device).view(1, -1) < lq
    vk = torch.arange(max_k, device=device).view(1, -1) < lk
    bias = torch.zeros(vk.shape, dtype=torch.float32, device=device).masked_fill(~vk, float("-inf"))
    bias = bias[:, None, None, :]
    if causal:  # bottom-right alignment per sequence: j > i + (Lk - Lq)
        i = torch.arange(max_q, device=device).view(1, 1, -1, 1)
        j = torch.arange(max_k, device=device).view(1, 1, 1, -1)
        bias = bias.masked_fill(j > i + (lk - lq).view(-1, 1, 1, 1), float("-inf"))
    return bias, vq.reshape(-1).nonzero().squeeze(-1), vk.reshape(-1).nonzero().squeeze(-1)


def _attention_varlen_ref(q, k, v, cu_q, cu_k, max_q, max_k, p, scale, causal, seed):
    bias, rows_q, _ = _varlen_bias(cu_q, cu_k, max_q, max_k, causal, q.device)
    qp, kp, vp = _pad(q, cu_q, max_q)[0], _pad(k, cu_k, max_k)[0], _pad(v, cu_k, max_k)[0]
    out, lse = _attention_padded_ref(qp, kp, vp, bias, p, scale, False, seed)
    out = out.reshape(-1, *q.shape[1:])[rows_q]
    lse = lse.permute(1, 0, 2).reshape(q.shape[1], -1)[:, rows_q]
    return out, lse.contiguous()


def attention_ref(q, k, v, key_bias=None, cu_q=None, cu_k=None, max_q=None, max_k=None, dropout_p=0.0,
                  softmax_scale=None, causal=False, seed=0):
    """Plain PyTorch oracle for both layouts; returns the attention output only.
    key_bias: None or additive, broadcastable to (B, H, Sq, Sk) when given as 4-D, or (B, Sk)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_q is not None:
        return _attention_varlen_ref(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, seed)[0]
    if key_bias is not None and key_bias.dim() == 2:
        key_bias = key_bias[:, None, None, :]
    return _attention_padded_ref(q, k, v, key_bias, dropout_p, scale, causal, seed)[0]


# ---- backends

def _fwd_reference(q, k, v, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed):
    if cu_q is not None:
        return _attention_varlen_ref(q, k, v, cu_q, cu_k, max_q, max_k, p, scale, causal, seed)
    bias = None if key_bias is None else key_bias[:, None, None, :]
    return _attention_padded_ref(q, k, v, bias, p, scale, causal, seed)


def _attention_padded_bwd_ref(dout, q, k, v, out, lse, bias, p, scale, causal, seed):
    """FlashAttention-2's backward in plain PyTorch: P = exp(S - lse) from the saved lse,
    D = rowsum(dO * O), dS = P * (dP - D)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    qa, ka, va, do = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    s = torch.einsum("bihd,bjhd->bhij", qa, ka) * scale
    if bias is not None:
        s = s + bias.to(acc)
    if causal:
        i = torch.arange(Sq, device=q.device).view(Sq, 1)
        j = torch.arange(Sk, device=q.device).view(1, Sk)
        s = s.masked_fill(j > i + (Sk - Sq), float("-inf"))
    prob = torch.exp(s - lse.to(acc).unsqueeze(-1))  # lse = +inf on dead rows -> 0
    drop = keep_mask(seed, p, _dropout_offsets(B, H, Sq, Sk, q.device)).to(acc) / (1.0 - p) if p > 0.0 else None
    pd = prob if drop is None else prob * drop
    dv = torch.einsum("bhij,bihd->bjhd", pd, do)
    dp = torch.einsum("bihd,bjhd->bhij", do, va)
    if drop is not None:
        dp = dp * drop
    delta = (do * out.to(acc)).sum(-1).permute(0, 2, 1).unsqueeze(-1)  # (B, H, Sq, 1)
    ds = prob * (dp - delta) * scale
    dq = torch.einsum("bhij,bjhd->bihd", ds, ka)
    dk = torch.einsum("bhij,bihd->bjhd", ds, qa)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


def _bwd_reference(dout, q, k, v, out, lse, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed):
    if cu_q is None:
        bias = None if key_bias is None else key_bias[:, None, None, :]
        return _attention_padded_bwd_ref(dout, q, k, v, out, lse, bias, p, scale, causal, seed)
    bias, rows_q, rows_k = _varlen_bias(cu_q, cu_k, max_q, max_k, causal, q.device)
    B = cu_q.numel() - 1
    H = q.shape[1]
    lse_p = torch.full((H, B * max_q), float("inf"), device=q.device)
    lse_p[:, rows_q] = lse
    lse_p = lse_p.view(H, B, max_q).permute(1, 0, 2)
    qp, kp, vp, op, dop = (_pad(t, cu, m)[0] for t, cu, m in
                           ((q, cu_q, max_q), (k, cu_k, max_k), (v, cu_k, max_k), (out, cu_q, max_q),
                            (dout, cu_q, max_q)))
    dq, dk, dv = _attention_padded_bwd_ref(dop, qp, kp, vp, op, lse_p, bias, p, scale, False, seed)
    return (dq.reshape(-1, *q.shape[1:])[rows_q], dk.reshape(-1, *k.shape[1:])[rows_k],
            dv.reshape(-1, *v.shape[1:])[rows_k])


def _probe(device):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 5, 2, 32, generator=g).to(device).unbind(0)
    bias = torch.zeros(2, 5, device=device)
    bias[1, 3:] = float("-inf")
    return (q, k, v, bias, None, None, 5, 5, 0.0, 32 ** -0.5, False, 0), {}


def attention_call(q, v, masked: bool, cu_q, cu_k, max_q: int, max_k: int, p: float, causal: bool,
                   direction: str, traced: bool = False) -> Call:
    """The dispatch.Call of one attention call: head_dim as the width, the layout, the longest
    sequence, the mask kind, dropout, and causal as "self" where top-left and bottom-right alignment
    agree (equal query and key lengths) or "cross"."""
    varlen = cu_q is not None
    if not causal:
        kind = "none"
    else:
        kind = "self" if (cu_q is cu_k if varlen else max_q == max_k) else "cross"
    return Call(q.device.type, q.dtype, max(q.shape[-1], v.shape[-1]), direction, "varlen" if varlen else "padded",
                max(int(max_q), int(max_k)), "key" if masked else "none", p > 0.0, kind, traced)


def _call_of(direction, args, traced=False) -> Call:
    if direction == "bwd":
        _, q, k, v, _, _, key_bias, cu_q, cu_k, max_q, max_k, p, _, causal, _ = args
    else:
        q, k, v, key_bias, cu_q, cu_k, max_q, max_k, p, _, causal, _ = args
    return attention_call(q, v, key_bias is not None, cu_q, cu_k, max_q, max_k, p, causal, direction, traced)


def _typical(device_type: str) -> Call:
    """The call `bertfast info` describes: BERT's self-attention, head_dim 64, a padded batch of
    128 tokens per row with a key mask, training (fp32 on a CPU, bf16 on a GPU)."""
    dtype = torch.float32 if device_type == "cpu" else torch.bfloat16
    return Call(device_type, dtype, 64, "fwd+bwd", "padded", 128, "key")


dispatch.register_op(OP, reference=(_fwd_reference, _bwd_reference), make_probe=_probe,
                     compare=compare_close(2e-3, 2e-3), typical=_typical)
# its other implementations and what each serves: bertfast/dispatch/table.py


# ---- registered op

def _fwd(q, k, v, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed):
    _check_host_offsets(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k)
    args = (q, k, v, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed_int(seed))
    return _op.kernel("fwd", args).fwd(*args)


def _bwd(dout, q, k, v, out, lse, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed):
    args = (dout, q, k, v, out, lse, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed_int(seed))
    return _op.kernel("bwd", args).bwd(*args)


def _setup(ctx, inputs, output):
    q, k, v, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], key_bias, cu_q, cu_k, seed)
    ctx.args = (max_q, max_k, p, scale, causal)


def _backward(ctx, grads, bwd):
    q, k, v, out, lse, key_bias, cu_q, cu_k, seed = ctx.saved_tensors
    max_q, max_k, p, scale, causal = ctx.args
    dq, dk, dv = bwd(grads[0].contiguous(), q, k, v, out, lse, key_bias, cu_q, cu_k, max_q, max_k, p, scale,
                     causal, seed)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


def _fwd_fake(q, k, v, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed):
    if cu_q is None:
        B, Sq, H, _ = q.shape
        lse = q.new_empty((B, H, Sq), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return q.new_empty(q.shape[:-1] + v.shape[-1:]), lse


_op = FusedOp(
    OP,
    fwd_schema="(Tensor q, Tensor k, Tensor v, Tensor? key_bias, Tensor? cu_q, Tensor? cu_k, SymInt max_q, "
               "SymInt max_k, float p, float scale, bool causal, Tensor? seed) -> (Tensor, Tensor)",
    bwd_schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_bias, Tensor? cu_q, "
               "Tensor? cu_k, SymInt max_q, SymInt max_k, float p, float scale, bool causal, Tensor? seed) "
               "-> (Tensor, Tensor, Tensor)",
    fwd_fake=_fwd_fake,
    bwd_fake=lambda dout, q, k, v, *rest: (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)),
    call_of=_call_of, fwd_impl=_fwd, bwd_impl=_bwd, setup_context=_setup, backward=_backward, n_nondiff_outputs=1,
    has_seed=True,
)


def _key_bias(attention_mask, B, Sq, Sk, H, device):
    """Normalise a padded-layout mask: -> ('key', fp32 (B, Sk) additive) or ('full', additive 4-D)."""
    m = attention_mask
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor ({_SUPPORTED_MASKS}), got {type(m).__name__}")
    if m.device != device:
        raise ValueError(f"attention_mask is on {m.device} but q is on {device}; expected the same device")
    if m.dim() == 2:
        if tuple(m.shape) != (B, Sk):
            raise ValueError(f"attention_mask must have shape (batch, key_len) = ({B}, {Sk}), got {tuple(m.shape)}")
        return "key", key_padding_bias(m)
    if m.dim() == 4 and m.is_floating_point():
        if m.shape[0] not in (1, B) or m.shape[1] not in (1, H) or m.shape[2] not in (1, Sq) or m.shape[3] != Sk:
            raise ValueError(f"attention_mask of 4 dims must broadcast to (B, H, Sq, Sk) = ({B}, {H}, {Sq}, {Sk}), "
                             f"got {tuple(m.shape)}")
        if m.shape[1] == 1 and m.shape[2] == 1:
            return "key", m.reshape(m.shape[0], Sk).expand(B, Sk).float().contiguous()
        return "full", m
    raise ValueError(f"attention_mask must be {_SUPPORTED_MASKS}; got shape {tuple(m.shape)} and dtype {m.dtype}")


def _training(q, k, v) -> bool:
    """Will autograd run this call's backward? (Then both passes must come from one implementation.)"""
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def key_padding_bias(mask: torch.Tensor) -> torch.Tensor:
    """A (B, Sk) key-padding mask (nonzero = attend) as the kernels' fp32 additive bias: 0 where
    a key is attended, -inf where it is padding."""
    keep = mask if mask.dtype == torch.bool else mask != 0
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~keep, float("-inf"))


def _as_pair(x, name):
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"{name} must be one value or a pair (q, k), got {len(x)} values")
        return x[0], x[1]
    return x, x


def _max_len(name, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        if not (isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point()):
            raise TypeError(f"{name} must be an int (the longest sequence's length), got {type(v).__name__}")
        v = int(v)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def _varlen_offsets(cu_seqlens, max_seqlen, q, k):
    """Checked (cu_q, cu_k, max_q, max_k) of a varlen call: int32 offsets on q's device that start
    at 0, never decrease, end at the token counts, and whose longest sequence max_seqlen covers.
    Host offsets are checked where the op runs (_check_host_offsets, also under torch.compile);
    device offsets here, in one read-back, or, where nothing can be read back (torch.compile,
    CUDA-graph capture), clamped on the device into the packed tokens. A PackedLayout from
    bertfast.padding is right by construction and is not read back."""
    layout = cu_seqlens if isinstance(cu_seqlens, PackedLayout) else None
    if layout is not None:
        if not layout.is_intact():
            raise ValueError("cu_seqlens: this PackedLayout was modified in place or rebuilt after it was checked; "
                             "build it again with bertfast.padding.unpad_mask or PackedLayout(...)")
        if max_seqlen is not None and _max_len("max_seqlen", max_seqlen) != layout.max_seqlen:
            raise ValueError(f"max_seqlen ({max_seqlen}) disagrees with the layout's ({layout.max_seqlen})")
        total = layout.indices.numel()  # the layout's token count, known on the host
        for name, t in (("q", q), ("k", k)):
            if t.shape[0] != total:
                raise ValueError(f"{name} has {t.shape[0]} packed tokens but the layout has {total}")
        cu_seqlens, max_seqlen = layout.cu_seqlens, layout.max_seqlen
    cu_q, cu_k = _as_pair(cu_seqlens, "cu_seqlens")
    if max_seqlen is None:
        raise ValueError("max_seqlen is required with cu_seqlens")
    max_q, max_k = _as_pair(max_seqlen, "max_seqlen")
    max_q, max_k = _max_len("max_seqlen", max_q), _max_len("max_seqlen", max_k)
    pair = isinstance(cu_seqlens, (tuple, list))
    names = ("cu_seqlens_q", "cu_seqlens_k") if pair else ("cu_seqlens", "cu_seqlens")
    for name, cu in zip(names, (cu_q, cu_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise TypeError(f"{name} must be an int32 tensor of shape (batch + 1,), got "
                            f"{getattr(cu, 'dtype', type(cu).__name__)} {tuple(getattr(cu, 'shape', ()))}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}; expected the same device")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same batch, got {cu_q.numel() - 1} "
                         f"and {cu_k.numel() - 1} sequences")
    cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()
    if layout is None and q.device.type == "cpu" and not torch.compiler.is_compiling():
        # also checked where the op runs; here too for the calls that never reach it (no tokens)
        _check_host_offsets(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k)
    elif layout is None and q.device.type != "cpu":
        sides = ((names[0], cu_q, q.shape[0], max_q), (names[1], cu_k, k.shape[0], max_k))
        if can_sync():  # one host read for both sides: a GPU waits for every queued kernel
            host = torch.cat([offsets_summary(cu) for _, cu, _, _ in sides]).tolist()
            for i, (name, _, total, m) in enumerate(sides):
                err = summary_error(name, host[4 * i: 4 * i + 4], total, m)
                if err is not None:
                    raise ValueError(err)
        else:
            same = cu_q is cu_k
            cu_q = clamp_offsets(cu_q, q.shape[0], max_q)
            cu_k = cu_q if same and max_q == max_k else clamp_offsets(cu_k, k.shape[0], max_k)
    return cu_q, cu_k, max_q, max_k


def _check_host_offsets(cu_q, cu_k, total_q, total_k, max_q, max_k) -> None:
    """Host offsets checked where the op runs (eager and compiled alike): a few microseconds of
    numpy against kernels that would read outside the packed tokens."""
    if cu_q is None or cu_q.device.type != "cpu":
        return
    for name, cu, total, m in (("cu_seqlens_q", cu_q, total_q, max_q), ("cu_seqlens_k", cu_k, total_k, max_k)):
        err = offsets_error(name, cu.numpy(), total, m)
        if err is not None:
            raise ValueError(err)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
              cu_seqlens=None, max_seqlen=None, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
              causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention over heads, FlashAttention layout (tokens, heads, head_dim).

    Padded: q (B, Sq, H, D), k/v (B, Sk, H, D), attention_mask see module docstring.
    Varlen: q (total_q, H, D), k/v (total_k, H, D), cu_seqlens int32 (B+1,) or a pair,
    max_seqlen int or a pair; or cu_seqlens = the PackedLayout of bertfast.padding.unpad_mask
    (max_seqlen from it; its offsets are not read back to be checked, so no host sync).
    Offsets must start at 0, never decrease and end at the token counts, and max_seqlen must cover
    the longest sequence (ValueError otherwise; _varlen_offsets says where each is checked).
    Returns q.shape[:-1] + (v.shape[-1],) in q.dtype.
    """
    check_float("q", q)
    check_float("k", k)
    check_float("v", v)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; expected the same device")
    p = check_dropout(dropout_p)
    D = q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D) if D else 1.0
    varlen = cu_seqlens is not None
    nd = 3 if varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != nd:
            layout = "(total, heads, head_dim) with cu_seqlens" if varlen else "(batch, seq, heads, head_dim)"
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    if k.shape[-2:] != q.shape[-2:] or v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"q, k, v shapes are inconsistent: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
                         " (expected equal heads and q/k head_dim, and v with k's tokens)")
    if varlen:
        if attention_mask is not None:
            raise ValueError("attention_mask must be None with cu_seqlens (packed sequences carry no padding)")
        cu_q, cu_k, max_q, max_k = _varlen_offsets(cu_seqlens, max_seqlen, q, k)
        if q.numel() == 0:
            return q.new_zeros(q.shape[:-1] + v.shape[-1:])
        if p == 0.0:  # no sequence is longer than its tokens: a larger max_seqlen only adds empty blocks
            max_q, max_k = min(max_q, q.shape[0]), min(max_k, k.shape[0])
        # q/k/v go as they are (views of a fused QKV projection): each implementation takes the layout
        # it needs (the Triton kernels read any token/head strides, so the views cost no copy there)
        return _run(q, k, v, None, cu_q, cu_k, max_q, max_k, p, scale, bool(causal))
    B, Sq, H, _ = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k must have q's batch size {B}, got {k.shape[0]}")
    Sk = k.shape[1]
    if B == 0:
        raise ValueError("q must have a non-empty batch, got batch size 0")
    key_bias = None
    if attention_mask is not None:
        kind, key_bias = _key_bias(attention_mask, B, Sq, Sk, H, q.device)
        if kind == "full":  # a general additive mask: the reference serves it (autograd through PyTorch)
            return attention_ref(q, k, v, key_bias, dropout_p=p, softmax_scale=scale, causal=causal,
                                 seed=draw_seed() if p > 0.0 else 0)
    if q.numel() == 0 or k.shape[1] == 0:
        return q.new_zeros(q.shape[:-1] + v.shape[-1:])
    return _run(q, k, v, key_bias, None, None, Sq, Sk, p, scale, bool(causal))


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _run(q, k, v, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal) -> torch.Tensor:
    """The public function's call after its checks: the registered op while torch.compile traces,
    else the implementation dispatch selects for this call (one with its own autograd, such as
    SDPA where a routing table measured it faster, is called as it is)."""
    args = (q, k, v, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, None)
    if _compiling():
        return _op.traced(p, *args)[0]
    grad = _training(q, k, v)
    sel = dispatch.select(OP, attention_call(q, v, key_bias is not None, cu_q, cu_k, max_q, max_k, p, causal,
                                             "fwd+bwd" if grad else "fwd"))
    if sel.own_autograd:
        return sel.fwd(*args[:-1], 0)[0]
    return _op.eager(sel, grad, draw_seed() if p > 0.0 else 0, *args)[0]


def attention_unchecked(sel: dispatch.Impl, grad: bool, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        layout: Optional[PackedLayout], key_bias: Optional[torch.Tensor], p: float,
                        seed: Optional[int] = None) -> torch.Tensor:
    """The encoder layers' self-attention call, without the public checks (see
    bias_residual_layernorm_unchecked): q, k, v views of the fused QKV projection, packed
    (total, H, D) with the batch's `layout` (unpad_mask's, made once per forward) or padded
    (B, S, H, D) with `key_bias` (key_padding_bias of the mask, made once per forward, or None);
    non-empty; scale 1/sqrt(head_dim), not causal. `sel`: dispatch.resolve_encoder's choice for
    the forward (an implementation with its own autograd is called as it is). `seed`: the dropout
    seed when p > 0 (None: drawn here)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if layout is not None:
        cu, m = layout.cu_seqlens, layout.max_seqlen
        if sel.own_autograd:
            return sel.fwd(q, k, v, None, cu, cu, m, m, p, scale, False, 0)[0]
        seed = 0 if p == 0.0 else draw_seed() if seed is None else seed
        return _op.eager(sel, grad, seed, q, k, v, None, cu, cu, m, m, p, scale, False, None)[0]
    S = q.shape[1]
    if sel.own_autograd:
        return sel.fwd(q, k, v, key_bias, None, None, S, S, p, scale, False, 0)[0]
    seed = 0 if p == 0.0 else draw_seed() if seed is None else seed
    return _op.eager(sel, grad, seed, q, k, v, key_bias, None, None, S, S, p, scale, False, None)[0]
