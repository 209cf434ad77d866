"""gelu_layernorm: LN(GELU(x + bias)), the MLM head's transform (dense -> gelu -> LayerNorm).

x is the dense layer's output without its bias. Erf GELU by default (approximate="tanh"
for tanh-GELU checkpoints). Statistics in fp32; the forward returns per-row mean/rstd.
"""
from __future__ import annotations

import torch

from .. import dispatch
from ._common import rows_call, rows_typical
from ._common import (
    FusedOp,
    gelu,
    check_eps,
    check_float,
    check_same_device,
    check_vector,
    compare_close,
    gelu_grad,
    layernorm_bwd_fp32,
    layernorm_fp32,
    rows,
    stats_fake,
)
from ._common import (
    stat_dtype as _stat,
)

OP = "gelu_layernorm"


def _gelu_layernorm_stats(x, bias, weight, ln_bias, eps, approximate="none"):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = gelu(x.to(acc) + bias.to(acc), approximate=approximate)
    y, mean, rstd = layernorm_fp32(h, weight, ln_bias, eps)
    return y.to(x.dtype), mean.to(_stat(acc)), rstd.to(_stat(acc))


def gelu_layernorm_ref(x, bias, weight, ln_bias, eps=1e-12, approximate="none"):
    """Plain PyTorch: the fallback and the test oracle."""
    return _gelu_layernorm_stats(x, bias, weight, ln_bias, eps, approximate)[0]


# ---- backends (2-D contiguous rows):
# fwd(x, bias, weight, ln_bias, eps, approximate) -> (out, mean, rstd)
# bwd(dout, x, bias, weight, ln_bias, mean, rstd, eps, approximate) -> (dx, dbias, dweight, dln_bias)

def _fwd_reference(x, bias, weight, ln_bias, eps, approximate):
    return _gelu_layernorm_stats(x, bias, weight, ln_bias, eps, approximate)


def _bwd_reference(dout, x, bias, weight, ln_bias, mean, rstd, eps, approximate):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    pre = x.to(acc) + bias.to(acc)
    dh, dw, dlb = layernorm_bwd_fp32(dout, gelu(pre, approximate=approximate), weight, mean, rstd)
    dx = dh * gelu_grad(pre, approximate)
    return dx.to(x.dtype), dx.sum(0).to(bias.dtype), dw.to(weight.dtype), dlb.to(ln_bias.dtype)


def _probe(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, generator=g).to(device)
    b, w, lb = torch.randn(3, 17, generator=g).to(device).unbind(0)
    return (x, b, w, lb, 1e-12, "none"), {}


dispatch.register_op(OP, reference=(_fwd_reference, _bwd_reference), make_probe=_probe,
                     compare=compare_close(1e-4, 1e-4), typical=rows_typical())
# its other implementations (C++ CPU, Triton, CUDA C++) and what they serve: bertfast/dispatch/table.py


# ---- registered op

_CALL = rows_call()

def _fwd(x, bias, weight, ln_bias, eps, approximate):
    return _op.kernel("fwd", (x,)).fwd(x, bias, weight, ln_bias, eps, approximate)


def _bwd(dout, x, bias, weight, ln_bias, mean, rstd, eps, approximate):
    return _op.kernel("bwd", (dout, x)).bwd(dout, x, bias, weight, ln_bias, mean, rstd, eps, approximate)


def _setup(ctx, inputs, output):
    x, bias, weight, ln_bias, eps, approximate = inputs
    ctx.save_for_backward(x, bias, weight, ln_bias, output[1], output[2])
    ctx.eps, ctx.approximate = eps, approximate


def _backward(ctx, grads, bwd):
    x, bias, weight, ln_bias, mean, rstd = ctx.saved_tensors
    dx, db, dw, dlb = bwd(grads[0].contiguous(), x, bias, weight, ln_bias, mean, rstd, ctx.eps, ctx.approximate)
    return dx, db, dw, dlb, None, None


_op = FusedOp(
    OP,
    fwd_schema="(Tensor x, Tensor bias, Tensor weight, Tensor ln_bias, float eps, str approximate) "
               "-> (Tensor, Tensor, Tensor)",
    bwd_schema="(Tensor dout, Tensor x, Tensor bias, Tensor weight, Tensor ln_bias, Tensor mean, Tensor rstd, "
               "float eps, str approximate) -> (Tensor, Tensor, Tensor, Tensor)",
    fwd_fake=lambda x, b, w, lb, eps, a: (torch.empty_like(x), *stats_fake(x, x.shape[:1])),
    bwd_fake=lambda do, x, b, w, lb, m, r, eps, a: (torch.empty_like(x), torch.empty_like(b), torch.empty_like(w),
                                                    torch.empty_like(lb)),
    call_of=_CALL, fwd_impl=_fwd, bwd_impl=_bwd, setup_context=_setup, backward=_backward, n_nondiff_outputs=2,
)


def gelu_layernorm(x: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor, ln_bias: torch.Tensor,
                   eps: float = 1e-12, approximate: str = "none") -> torch.Tensor:
    """LayerNorm(GELU(x + bias)) * weight + ln_bias over the last dimension of x."""
    check_float("x", x, min_ndim=1)
    n = x.shape[-1]
    check_vector("bias", bias, n)
    check_vector("weight", weight, n)
    check_vector("ln_bias", ln_bias, n)
    check_same_device("x", x, bias=bias, weight=weight, ln_bias=ln_bias)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    eps = check_eps(eps)
    if x.numel() == 0:
        return x.new_empty(x.shape)
    out = _op(0.0, rows(x), bias.contiguous(), weight.contiguous(), ln_bias.contiguous(), eps,
              approximate)[0]
    return out.view(x.shape)
