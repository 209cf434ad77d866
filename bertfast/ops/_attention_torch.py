"""PyTorch's own attention kernels as routes of `bertfast.ops.attention`: never slower than the
best available.

Where a committed GPU measurement (bertfast/routing_tables/attention.json, an "op"-level table of
bertfast/routing.py) shows one of PyTorch's kernels faster than ours for a case, the `auto` backend
hands that call to it before it reaches bertfast's backends:

    sdpa          torch.nn.functional.scaled_dot_product_attention on (B, H, S, D) views of the padded
                  (B, S, H, D) tensors (no copies), PyTorch choosing its backend (cuDNN or flash on
                  Hopper); its own autograd
    varlen_attn   torch.nn.attention.varlen.varlen_attn (PyTorch's bundled FlashAttention-2 varlen,
                  torch 2.10+), on the packed (total, H, D) tensors and int32 cu_seqlens

A case is (direction: "fwd" for inference, "fwd+bwd" when autograd will run the backward, since
both passes must come from one implementation; dtype; head_dim as the width; layout; the longest
sequence). Only calls whose semantics PyTorch's kernels share exactly are routed: no dropout (the
masks would not be bertfast's Philox stream), no attention mask on the padded layout, causal only
for self-attention (Lq == Lk, where top-left and bottom-right alignment agree). Everything else,
any forced backend (BERTFAST_BACKEND=triton, `use_backend`), and calls traced by torch.compile (the
compiled graph keeps bertfast's op) go to bertfast's kernels. The decision reads shapes and dtypes
only: no host sync, one memoised table lookup.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

from .. import backend, routing

OP = "attention"
ROUTES = ("sdpa", "varlen_attn")
# device types whose calls may be routed (the table's measurements are GPU ones; tests add "cpu")
ROUTED_DEVICES = ("cuda",)
_unavailable: dict = {}  # route -> why it cannot run here (found once)


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # older torch
        return False


def route(q: torch.Tensor, layout: str, seq: int, training: bool) -> Optional[str]:
    """The PyTorch kernel the routing table names for this call, or None for bertfast's own.
    The caller has already excluded dropout, masks and cross-attention causal calls."""
    # is_compiling first: under dynamo it is a constant, while the backend's thread-local would
    # have to be traced
    if _compiling() or q.device.type not in ROUTED_DEVICES or backend.requested() != "auto":
        return None
    table = routing.table_for(OP)
    if table is None or table.level != "op":
        return None
    name, why = table.lookup(OP, "fwd+bwd" if training else "fwd", q.dtype, q.shape[-1], layout, seq)
    if name not in ROUTES:
        return None
    reason = _why_unavailable(name, q)
    if reason is not None:
        backend._fallback(OP, name, f"{reason}; the routing table {table.name} asked for it")
        return None
    return name


def _why_unavailable(name: str, q: torch.Tensor) -> Optional[str]:
    if name in _unavailable:
        return _unavailable[name]
    why = None
    if name == "varlen_attn":
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        except ImportError as e:
            why = f"torch {torch.__version__} has no torch.nn.attention.varlen ({e})"
        else:
            if q.device.type != "cuda":
                why = "varlen_attn runs on CUDA tensors only"
    _unavailable[name] = why
    return why


def sdpa(q, k, v, scale: float, causal: bool) -> torch.Tensor:
    """Padded (B, S, H, D) attention through PyTorch's SDPA; (B, Sq, H, Dv) out."""
    import torch.nn.functional as F

    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, scale=scale)
    return out.transpose(1, 2)


_VARLEN_PARAMS: Optional[frozenset] = None


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


def reset() -> None:
    """Forget availability verdicts (tests)."""
    global _VARLEN_PARAMS
    _unavailable.clear()
    _VARLEN_PARAMS = None
