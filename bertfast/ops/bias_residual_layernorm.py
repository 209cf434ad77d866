"""bias_residual_layernorm: LN(dropout(x + bias) + residual), BERT's add-and-norm.

Used twice per layer: after the attention output projection and after the FFN output
projection. x is the GEMM output without its bias (the bias add is fused here); bias may be
None when the GEMM already added it. Statistics in fp32; the forward also returns the
per-row mean and rstd (fp32) so the backward does not recompute them.

Dropout: element (row r, column c) of x + bias has offset r * hidden + c in the shared
Philox stream (ops/_rng.py); backward regenerates the mask from the seed.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch
from ._common import rows_call, rows_typical
from ._common import (
    FusedOp,
    bump_version,
    check_dropout,
    check_eps,
    check_float,
    check_same_device,
    check_same_shape,
    check_vector,
    compare_close,
    overwrite_impl,
    layernorm_bwd_fp32,
    layernorm_fp32,
    rows,
    seed_int,
    stats_fake,
)
from ._common import (
    stat_dtype as _stat,
)
from ._rng import dropout_scale_mask, draw_seed

OP = "bias_residual_layernorm"


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _bias_residual_layernorm_stats(x, bias, residual, weight, ln_bias, eps, dropout_p=0.0, seed=0):
    acc = _acc(x)
    h = x.to(acc)
    if bias is not None:
        h = h + bias.to(acc)
    if dropout_p > 0.0:
        h = h * dropout_scale_mask(seed, dropout_p, h.shape, h.device).to(acc)
    h = h + residual.to(acc)
    y, mean, rstd = layernorm_fp32(h, weight, ln_bias, eps)
    return y.to(x.dtype), mean.to(_stat(acc)), rstd.to(_stat(acc))


def bias_residual_layernorm_ref(x, bias, residual, weight, ln_bias, eps=1e-12, dropout_p=0.0, seed=0):
    """Plain PyTorch: the fallback and the test oracle. x, residual: (..., hidden)."""
    return _bias_residual_layernorm_stats(x, bias, residual, weight, ln_bias, eps, dropout_p, seed)[0]


# ---- backends (2-D contiguous rows):
# fwd(x, bias|None, residual, weight, ln_bias, eps, p, seed) -> (out, mean, rstd)
# bwd(dout, x, bias|None, residual, weight, ln_bias, mean, rstd, eps, p, seed)
#     -> (dx, dbias|None, dresidual, dweight, dln_bias)

def _fwd_reference(x, bias, residual, weight, ln_bias, eps, p, seed):
    return _bias_residual_layernorm_stats(x, bias, residual, weight, ln_bias, eps, p, seed)


def _bwd_reference(dout, x, bias, residual, weight, ln_bias, mean, rstd, eps, p, seed):
    acc = _acc(x)
    h = x.to(acc)
    if bias is not None:
        h = h + bias.to(acc)
    scale = dropout_scale_mask(seed, p, h.shape, h.device).to(acc) if p > 0.0 else None
    if scale is not None:
        h = h * scale
    h = h + residual.to(acc)
    dh, dw, dlb = layernorm_bwd_fp32(dout, h, weight, mean, rstd)
    dx = dh if scale is None else dh * scale
    dbias = None if bias is None else dx.sum(0).to(bias.dtype)
    return dx.to(x.dtype), dbias, dh.to(residual.dtype), dw.to(weight.dtype), dlb.to(ln_bias.dtype)


def _probe(device):
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(2, 3, 17, generator=g).to(device).unbind(0)
    b, w, lb = torch.randn(3, 17, generator=g).to(device).unbind(0)
    return (x, b, r, w, lb, 1e-12, 0.0, 0), {}


dispatch.register_op(OP, reference=(_fwd_reference, _bwd_reference), make_probe=_probe,
                     compare=compare_close(1e-4, 1e-4), typical=rows_typical())
# its other implementations (C++ CPU, Triton, CUDA C++) and what they serve: bertfast/dispatch/table.py


# ---- registered op

_CALL = rows_call()

def _fwd(x, bias, residual, weight, ln_bias, eps, p, seed):
    return _op.kernel("fwd", (x,)).fwd(x, bias, residual, weight, ln_bias, eps, p, seed_int(seed))


def _bwd(dout, x, bias, residual, weight, ln_bias, mean, rstd, eps, p, seed):
    return _op.kernel("bwd", (dout, x)).bwd(dout, x, bias, residual, weight, ln_bias, mean, rstd, eps, p, seed_int(seed))


def _setup(ctx, inputs, output):
    x, bias, residual, weight, ln_bias, eps, p, seed = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, bias, residual, weight, ln_bias, mean, rstd, seed)
    ctx.eps, ctx.p = eps, p


def _backward(ctx, grads, bwd):
    x, bias, residual, weight, ln_bias, mean, rstd, seed = ctx.saved_tensors
    dx, dbias, dres, dw, dlb = bwd(grads[0].contiguous(), x, bias, residual, weight, ln_bias, mean, rstd,
                                   ctx.eps, ctx.p, seed)
    return dx, dbias, dres, dw, dlb, None, None, None


def _fwd_fake(x, bias, residual, weight, ln_bias, eps, p, seed):
    return (torch.empty_like(x), *stats_fake(x, x.shape[:1]))


def _bwd_fake(dout, x, bias, residual, weight, ln_bias, mean, rstd, eps, p, seed):
    return (torch.empty_like(x), None if bias is None else torch.empty_like(bias), torch.empty_like(residual),
            torch.empty_like(weight), torch.empty_like(ln_bias))


_op = FusedOp(
    OP,
    fwd_schema="(Tensor x, Tensor? bias, Tensor residual, Tensor weight, Tensor ln_bias, float eps, float p, "
               "Tensor? seed) -> (Tensor, Tensor, Tensor)",
    bwd_schema="(Tensor dout, Tensor x, Tensor? bias, Tensor residual, Tensor weight, Tensor ln_bias, Tensor mean, "
               "Tensor rstd, float eps, float p, Tensor? seed) -> (Tensor, Tensor?, Tensor, Tensor, Tensor)",
    fwd_fake=_fwd_fake, bwd_fake=_bwd_fake, call_of=_CALL, fwd_impl=_fwd, bwd_impl=_bwd,
    setup_context=_setup, backward=_backward, n_nondiff_outputs=2, has_seed=True,
)


def bias_residual_layernorm(x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor,
                            weight: torch.Tensor, ln_bias: torch.Tensor, eps: float = 1e-12,
                            dropout_p: float = 0.0, inplace: bool = False) -> torch.Tensor:
    """LayerNorm(dropout(x + bias) + residual) * weight + ln_bias over the last dimension.

    x, residual: (..., hidden), same shape (different float dtypes are promoted to the wider);
    bias, weight, ln_bias: (hidden,). inplace=True lets the result be written over x, as in
    bias_gelu.
    """
    check_float("x", x, min_ndim=1)
    check_float("residual", residual)
    check_same_shape("residual", residual, "x", x)
    if residual.dtype != x.dtype:
        # mixed precision (torch.autocast): the GEMM output x is bf16/fp16 while the residual
        # stream stays fp32; compute and return in the wider dtype, as autocast's fp32
        # LayerNorm would
        wide = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(wide), residual.to(wide)
    n = x.shape[-1]
    if bias is not None:
        check_vector("bias", bias, n)
    check_vector("weight", weight, n)
    check_vector("ln_bias", ln_bias, n)
    check_same_device("x", x, bias=bias, residual=residual, weight=weight, ln_bias=ln_bias)
    eps, p = check_eps(eps), check_dropout(dropout_p)
    if x.numel() == 0:
        return x.new_empty(x.shape)
    shape = x.shape
    args = (None if bias is None else bias.contiguous(), rows(residual), weight.contiguous(), ln_bias.contiguous(),
            eps, p)
    sel = overwrite_impl(OP, x, bias, residual, weight, ln_bias) if inplace else None
    if sel is not None:
        out = sel.fwd(rows(x), *args, draw_seed() if p > 0.0 else 0, inplace=True)[0].view(shape)
        bump_version(x)
        return out
    return _op(p, rows(x), *args, None)[0].view(shape)


def bias_residual_layernorm_unchecked(sel: dispatch.Impl, grad: bool, x: torch.Tensor, bias: Optional[torch.Tensor],
                                      residual: torch.Tensor, weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                                      p: float, inplace: bool = False, seed: Optional[int] = None) -> torch.Tensor:
    """The encoder layers' call, without the public checks (BertModel validated its inputs once
    per forward; the rest holds by construction): x, residual non-empty contiguous 2-D rows, the
    vectors contiguous (hidden,), `sel` the backend resolved once per forward, `grad` its
    torch.is_grad_enabled(). Mixed dtypes (autocast) are promoted as in the public function.
    `seed`: the dropout seed when p > 0 (None: drawn here)."""
    if residual.dtype != x.dtype:
        wide = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(wide), residual.to(wide)
    seed = 0 if p == 0.0 else draw_seed() if seed is None else seed
    if inplace and not grad and sel.inplace:
        return sel.fwd(x, bias, residual, weight, ln_bias, eps, p, seed, inplace=True)[0]
    return _op.eager(sel, grad, seed, x, bias, residual, weight, ln_bias, eps, p, None)[0]
