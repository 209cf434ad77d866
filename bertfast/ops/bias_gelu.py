"""bias_gelu: GELU(x + bias), the FFN intermediate activation.

Erf form by default (BERT's `hidden_act="gelu"`); approximate="tanh" for `gelu_new` /
`gelu_pytorch_tanh` checkpoints. Math in fp32, one cast back on store.
"""
from __future__ import annotations

import torch

from .. import dispatch
from ._common import rows_call, rows_typical
from ._common import (
    FusedOp,
    gelu,
    bump_version,
    check_float,
    check_same_device,
    check_vector,
    compare_close,
    gelu_grad,
    overwrite_impl,
)

OP = "bias_gelu"
APPROXIMATE = ("none", "tanh")


def bias_gelu_ref(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Plain PyTorch: the fallback and the test oracle."""
    h = x.to(torch.float32 if x.dtype != torch.float64 else x.dtype) + bias.to(
        torch.float32 if x.dtype != torch.float64 else x.dtype)
    return gelu(h, approximate=approximate).to(x.dtype)


# ---- backends: fwd(x, bias, approximate) -> out; bwd(dout, x, bias, approximate) -> (dx, dbias)

def _fwd_reference(x, bias, approximate):
    return bias_gelu_ref(x, bias, approximate)


def _bwd_reference(dout, x, bias, approximate):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dh = dout.to(acc) * gelu_grad(x.to(acc) + bias.to(acc), approximate)
    return dh.to(x.dtype), dh.reshape(-1, x.shape[-1]).sum(0).to(bias.dtype)


def _probe(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, generator=g).to(device)
    b = torch.randn(17, generator=g).to(device)
    return (x, b, "none"), {}


dispatch.register_op(OP, reference=(_fwd_reference, _bwd_reference), make_probe=_probe,
                     compare=compare_close(1e-5, 1e-5), typical=rows_typical())
# its other implementations (C++ CPU, Triton, CUDA C++) and what they serve: bertfast/dispatch/table.py


# ---- registered op

_CALL = rows_call()

def _fwd(x, bias, approximate):
    return _op.kernel("fwd", (x,)).fwd(x, bias, approximate)


def _bwd(dout, x, bias, approximate):
    return _op.kernel("bwd", (dout, x)).bwd(dout, x, bias, approximate)


def _setup(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _backward(ctx, grads, bwd):
    x, bias = ctx.saved_tensors
    dx, dbias = bwd(grads[0].contiguous(), x, bias, ctx.approximate)
    return dx, dbias, None


_op = FusedOp(
    OP,
    fwd_schema="(Tensor x, Tensor bias, str approximate) -> Tensor",
    bwd_schema="(Tensor dout, Tensor x, Tensor bias, str approximate) -> (Tensor, Tensor)",
    fwd_fake=lambda x, bias, approximate: torch.empty_like(x),
    bwd_fake=lambda dout, x, bias, approximate: (torch.empty_like(x), torch.empty_like(bias)),
    call_of=_CALL, fwd_impl=_fwd, bwd_impl=_bwd, setup_context=_setup, backward=_backward,
)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none", inplace: bool = False) -> torch.Tensor:
    """GELU(x + bias) over the last dimension of x (any leading shape); bias: (hidden,).

    inplace=True lets the result be written over x (x's values are then gone) where that saves
    an allocation: without autograd, on the C++ CPU kernels; elsewhere it has no effect."""
    check_float("x", x, min_ndim=1)
    check_vector("bias", bias, x.shape[-1])
    check_same_device("x", x, bias=bias)
    if approximate not in APPROXIMATE:
        raise ValueError(f"approximate must be one of {APPROXIMATE}, got {approximate!r}")
    if x.numel() == 0:
        return x.new_empty(x.shape)
    sel = overwrite_impl(OP, x, bias) if inplace else None
    if sel is not None:
        out = sel.fwd(x, bias.contiguous(), approximate, inplace=True)
        bump_version(x)
        return out
    return _op(0.0, x.contiguous(), bias.contiguous(), approximate)


def bias_gelu_unchecked(sel: dispatch.Impl, grad: bool, x: torch.Tensor, bias: torch.Tensor,
                        approximate: str = "none", inplace: bool = False) -> torch.Tensor:
    """The encoder layers' call, without the public checks (see
    bias_residual_layernorm_unchecked): x non-empty contiguous rows, bias (hidden,)."""
    if inplace and not grad and sel.inplace:
        return sel.fwd(x, bias, approximate, inplace=True)
    return _op.eager(sel, grad, 0, x, bias, approximate)
