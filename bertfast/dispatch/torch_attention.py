"""PyTorch's own attention kernels as implementations of `bertfast.ops.attention`, with the op's
backend signatures (bertfast/ops/attention.py, "---- backends"):

    aten_flash    ATen's CPU flash attention (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                  what SDPA runs on CPU): forward and backward with the (B, H, S) natural-log lse of the
                  C++ kernels, so either pass pairs with theirs
    sdpa          torch.nn.functional.scaled_dot_product_attention on (B, H, S, D) views of the padded
                  (B, S, H, D) tensors (no copies), PyTorch choosing its backend (cuDNN or flash on
                  Hopper); its own autograd: returns (out, None)
    varlen_attn   torch.nn.attention.varlen.varlen_attn (PyTorch's bundled FlashAttention-2 varlen,
                  torch 2.10+) on the packed (total, H, D) tensors and int32 cu_seqlens; its own autograd

What each serves (no mask, no dropout, causal only where Lq == Lk) is declared in dispatch/table.py;
these functions assume it.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch


def _bhsd(t):
    return t.transpose(1, 2)


def aten_flash_fwd(q, k, v, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _bhsd(q), _bhsd(k), _bhsd(v), 0.0, bool(causal), scale=float(scale))[:2]
    return _bhsd(out).contiguous(), lse.float().contiguous()


def aten_flash_bwd(dout, q, k, v, out, lse, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed):
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse, 0.0, bool(causal), scale=float(scale))
    return tuple(_bhsd(g).contiguous() for g in grads)


def sdpa(q, k, v, scale: float, causal: bool) -> torch.Tensor:
    """Padded (B, S, H, D) attention through PyTorch's SDPA; (B, Sq, H, Dv) out."""
    import torch.nn.functional as F

    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, scale=scale)
    return out.transpose(1, 2)


def sdpa_fwd(q, k, v, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed):
    return sdpa(q, k, v, scale, bool(causal)), None


_VARLEN_PARAMS: Optional[frozenset] = None


def load_varlen_attn() -> None:
    """Raises when this torch has no torch.nn.attention.varlen (before torch 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.attention.varlen ({e})") from None


def varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool) -> torch.Tensor:
    """Packed (total, H, D) attention through torch.nn.attention.varlen.varlen_attn. Its keyword
    for causal masking changed between releases (is_causal, then window_size=(-1, 0)): read once."""
    global _VARLEN_PARAMS
    from torch.nn.attention.varlen import varlen_attn

    if _VARLEN_PARAMS is None:
        _VARLEN_PARAMS = frozenset(inspect.signature(varlen_attn).parameters)
    kw = {}
    if "scale" in _VARLEN_PARAMS:
        kw["scale"] = scale
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:  # a torch whose varlen_attn has no scale: fold it into q
        q = q * (scale * q.shape[-1] ** 0.5)
    if causal:
        if "window_size" in _VARLEN_PARAMS:
            kw["window_size"] = (-1, 0)
        else:
            kw["is_causal"] = True
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


def varlen_attn_fwd(q, k, v, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed):
    return varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, bool(causal)), None


def reset() -> None:
    """Forget the varlen_attn signature read (tests swap the function)."""
    global _VARLEN_PARAMS
    _VARLEN_PARAMS = None
