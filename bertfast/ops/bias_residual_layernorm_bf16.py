"""bias_residual_layernorm_bf16: BERT's add-and-norm in bf16 CPU inference, with no casts.

    out, low = bias_residual_layernorm_bf16(x, bias, residual, weight, ln_bias, eps, low=True)

out = LayerNorm(x + bias + residual) * weight + ln_bias over the last dimension, where x is a
bf16 GEMM output (fp32 accepted too) and the residual stream is fp32 (or bf16); `out` is in the
residual's dtype and `low` is the same result rounded to bf16, the next GEMM's input.
Statistics in fp32, each output rounded once on store.

Why it exists: in bf16 inference (models/precision.py) every encoder GEMM reads and writes bf16
while the residual stream stays fp32, so the plain add-and-norm needs the GEMM output widened
before it and its result narrowed for the next GEMM after it: two extra passes over the rows
per add-and-norm, a fifth of a bf16 forward. This op does both conversions in registers, in
the one pass LayerNorm makes anyway (csrc/cpu/bias_residual_layernorm_bf16.cpp).

Inference only: no dropout, no autograd, and not a torch.library op (the engine calls it only
on the lean CPU inference path, never while torch.compile traces). The dispatch table declares
which implementations serve it (the C++ kernel on CPU, this file's reference anywhere).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import dispatch
from ._common import check_eps, check_float, check_same_device, check_same_shape, check_vector, compare_close, \
    layernorm_fp32

OP = "bias_residual_layernorm_bf16"
_WIDE = (torch.float32, torch.bfloat16)


def bias_residual_layernorm_bf16_ref(x, bias, residual, weight, ln_bias, eps=1e-12, low=True):
    """Plain PyTorch: the fallback and the test oracle. Returns (out in residual's dtype, its
    bf16 copy or None). Computed in float64 when the inputs are float64 (the oracle's precision),
    else in fp32."""
    acc = torch.float64 if torch.float64 in (x.dtype, residual.dtype) else torch.float32
    h = x.to(acc)
    if bias is not None:
        h = h + bias.to(acc)
    h = h + residual.to(acc)
    y = layernorm_fp32(h, weight, ln_bias, eps)[0]
    return y.to(residual.dtype), (y.to(torch.bfloat16) if low else None)


# ---- backends (2-D contiguous rows):
# fwd(x, bias|None, residual, weight, ln_bias, eps, out|None, out_low|None, low) -> (out, low|None)
# out / out_low: where the results go (None: fresh memory); out may be residual itself

def _fwd_reference(x, bias, residual, weight, ln_bias, eps, out=None, out_low=None, low=True):
    y, lo = bias_residual_layernorm_bf16_ref(x, bias, residual, weight, ln_bias, eps, low)
    if out is not None:
        y = out.copy_(y)
    if lo is not None and out_low is not None:
        lo = out_low.copy_(lo)
    return y, lo


def _probe(device):
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(2, 3, 17, generator=g).to(device).unbind(0)
    b, w, lb = torch.randn(3, 17, generator=g).to(device).unbind(0)
    return (x.bfloat16(), b, r, w, lb, 1e-12), {}


def _typical(device_type: str) -> dispatch.Call:
    """The call `bertfast info` / `bertfast verify` describe: BERT-base's hidden size, bf16 GEMM output."""
    return dispatch.Call(device_type, torch.bfloat16, 768, "fwd")


dispatch.register_op(OP, reference=(_fwd_reference, None), make_probe=_probe,
                     compare=compare_close(1e-2, 1e-2), typical=_typical)
# its C++ CPU implementation and what it serves: bertfast/dispatch/table.py


def select(device_type: str, width: int) -> dispatch.Impl:
    """The implementation serving this op's calls for rows of `width` on `device_type` (the
    engine asks once per forward)."""
    return dispatch.select(OP, dispatch.Call(device_type, torch.bfloat16, width, "fwd"))


def bias_residual_layernorm_bf16(x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor,
                                 weight: torch.Tensor, ln_bias: torch.Tensor, eps: float = 1e-12,
                                 low: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(LN(x + bias + residual) in residual's dtype, the same rounded to bf16 or None without `low`).

    x: (..., hidden) bf16 or fp32; residual: the same shape, fp32 or bf16; bias (or None),
    weight, ln_bias: (hidden,). Inference only (no autograd)."""
    check_float("x", x, min_ndim=1)
    check_float("residual", residual)
    check_same_shape("residual", residual, "x", x)
    for name, t in (("x", x), ("residual", residual)):
        if t.dtype not in _WIDE:
            raise TypeError(f"{name} must be bfloat16 or float32, got {t.dtype}")
    n = x.shape[-1]
    if bias is not None:
        check_vector("bias", bias, n)
    check_vector("weight", weight, n)
    check_vector("ln_bias", ln_bias, n)
    check_same_device("x", x, bias=bias, residual=residual, weight=weight, ln_bias=ln_bias)
    eps = check_eps(eps)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, residual, weight, ln_bias)):
        raise RuntimeError("bias_residual_layernorm_bf16 is inference only (no autograd): call it under "
                           "torch.no_grad() / torch.inference_mode(), or use bias_residual_layernorm")
    shape = x.shape
    if x.numel() == 0:
        return residual.new_empty(shape), (x.new_empty(shape, dtype=torch.bfloat16) if low else None)
    sel = select(x.device.type, n)
    y, lo = bias_residual_layernorm_bf16_unchecked(
        sel, x.reshape(-1, n).contiguous(), None if bias is None else bias.contiguous(),
        residual.reshape(-1, n).contiguous(), weight.contiguous(), ln_bias.contiguous(), eps, low=low)
    return y.view(shape), (lo.view(shape) if lo is not None else None)


def bias_residual_layernorm_bf16_unchecked(sel: dispatch.Impl, x, bias, residual, weight, ln_bias, eps: float,
                                           out: Optional[torch.Tensor] = None,
                                           out_low: Optional[torch.Tensor] = None, low: bool = True):
    """The encoder layers' call, without the public checks: x, residual contiguous 2-D rows of
    one shape, the vectors contiguous (hidden,), `sel` from select(); out / out_low: contiguous
    buffers of that shape (residual's dtype / bf16) or None."""
    y, lo = sel.fwd(x, bias, residual, weight, ln_bias, eps, out, out_low, low)
    return y, (lo if low else None)
