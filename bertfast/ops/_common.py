"""Machinery shared by the op files: the two-path registration and argument checks.

Each fused op is registered twice from one description:
- a torch.library custom op pair (`bertfast::<op>` and `bertfast::<op>_backward`) with fake
  implementations and autograd, which torch.compile sees (fullgraph, no graph break);
- a torch.autograd.Function over the same forward/backward, used in eager mode because the
  custom-op dispatcher costs several times an autograd.Function's host time per call (tens of
  microseconds against a few), which would drown small kernels.
Without autograd (inference), eager calls go straight to the selected backend.

Two eager entries share that Function: the public functions (argument checks, then
FusedOp.__call__: the backend looked up for the call) and the ops' `<op>_unchecked` functions,
which BertModel's layers call with the backend, the autograd flag and the dropout seed resolved
once per forward (FusedOp.eager): per call, one Python frame per op and the Function's C++ apply.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from .. import dispatch
from ..dispatch import Call
from ..padding import can_sync, no_host_reads  # noqa: F401 - the ops' names for them
from ._rng import draw_seed

_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def seed_tensor(dropout_p: float) -> Optional[torch.Tensor]:
    """The dropout seed as a 1-element int64 CPU tensor (traceable by torch.compile), or None."""
    if dropout_p == 0.0:
        return None
    if torch.compiler.is_compiling():
        return torch.randint(0, 2**62, (1,), dtype=torch.int64)
    return torch.tensor([draw_seed()], dtype=torch.int64)


def seed_int(seed: Optional[torch.Tensor]) -> int:
    return 0 if seed is None else int(seed.reshape(-1)[0].item())


class FusedOp:
    """One fused op: the implementations dispatch selects (`dispatch.Impl`: fwd/bwd) behind one
    autograd rule.

    `call_of(direction, args, traced)` describes a call from the op's backend arguments (a
    dispatch.Call). `fwd_impl`/`bwd_impl` (the custom ops' bodies) select per call through
    `kernel(direction, args)`; the eager paths below take the selection made by their caller. setup_context(ctx, inputs, output) saves what backward needs;
    backward(ctx, grads, bwd) returns one gradient per input, calling `bwd(*args)` for the
    backward computation (the custom op under torch.compile, the backend directly in eager mode).

    `has_seed`: the op's last input is its dropout seed (a 1-element int64 tensor or None in the
    custom op's schema, so torch.compile can trace it); the eager paths take it as a Python int
    instead and pass None in that slot: no tensor is made or read back for it.
    """

    def __init__(self, name: str, *, fwd_schema: str, bwd_schema: str, fwd_fake: Callable,
                 bwd_fake: Callable, fwd_impl: Callable, bwd_impl: Callable,
                 setup_context: Callable, backward: Callable, call_of: Callable, n_nondiff_outputs: int = 0,
                 has_seed: bool = False):
        self.name = name
        self.call_of = call_of
        self.has_seed = has_seed
        lib_name = f"bertfast::{name}"
        self.fwd_op = torch.library.custom_op(lib_name, fwd_impl, mutates_args=(), schema=fwd_schema)
        self.bwd_op = torch.library.custom_op(lib_name + "_backward", bwd_impl, mutates_args=(),
                                              schema=bwd_schema)
        self.fwd_op.register_fake(fwd_fake)
        self.bwd_op.register_fake(bwd_fake)
        bwd_op = self.bwd_op
        self.fwd_op.register_autograd(lambda ctx, *g: backward(ctx, g, bwd_op), setup_context=setup_context)

        class _Fn(torch.autograd.Function):
            # The eager autograd node: the forward's backend serves the backward too (also when
            # loss.backward() runs outside the caller's use_backend(...) block), called directly.
            @staticmethod
            def forward(ctx, sel, seed, *inputs):
                out = sel.fwd(*inputs[:-1], seed) if has_seed else sel.fwd(*inputs)
                setup_context(ctx, inputs, out)
                ctx.sel, ctx.seed = sel, seed
                if n_nondiff_outputs:
                    ctx.mark_non_differentiable(*out[-n_nondiff_outputs:])
                return out

            @staticmethod
            def backward(ctx, *grads):
                sel, seed = ctx.sel, ctx.seed
                bwd = (lambda *args: sel.bwd(*args[:-1], seed)) if has_seed else sel.bwd
                return (None, None, *backward(ctx, grads, bwd))

        _Fn.__name__ = f"{name}_fn"
        # Function.apply's Python wrapper (a functorch check, an unwrap pass over the arguments)
        # costs about as much again as the C++ apply behind it: called directly unless a functorch
        # transform (vmap, grad, ...) is active, which needs the wrapper
        fn_apply, c_apply = _Fn.apply, super(torch.autograd.Function, _Fn).apply
        functorch_active = torch._C._are_functorch_transforms_active

        def apply(*args):
            return fn_apply(*args) if functorch_active() else c_apply(*args)

        self._apply = apply

    def traced(self, dropout_p: float, *inputs):
        """The registered custom op, as torch.compile traces it (inputs[-1] replaced by a traceable
        seed tensor)."""
        if self.has_seed:
            inputs = inputs[:-1] + (seed_tensor(dropout_p),)
        return self.fwd_op(*inputs)

    def kernel(self, direction: str, args) -> dispatch.Impl:
        """The implementation serving the registered op's body (torch.compile's graph) for `args`."""
        return dispatch.select(self.name, self.call_of(direction, args, True))

    def eager(self, sel: dispatch.Impl, grad: bool, seed: int, *inputs):
        """The eager call with everything resolved by the caller: `sel` the implementation (one
        dispatch.select per model forward, not per call), `grad` whether autograd may need the
        result (torch.is_grad_enabled() of the forward; inputs that need no gradient are fine),
        `seed` the dropout seed (0 without dropout), inputs with None in the seed slot."""
        if grad:
            return self._apply(sel, seed, *inputs)
        return sel.fwd(*inputs[:-1], seed) if self.has_seed else sel.fwd(*inputs)

    def __call__(self, dropout_p: float, *inputs):
        """The public functions' call after their argument checks: the custom op while
        torch.compile traces (inputs[-1] is then replaced by a traceable seed tensor), else the
        eager path with the implementation dispatch selects for this call. Without autograd it is
        called directly."""
        if torch.compiler.is_compiling():
            return self.traced(dropout_p, *inputs)
        grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)
        seed = draw_seed() if dropout_p > 0.0 else 0
        sel = dispatch.select(self.name, self.call_of("fwd+bwd" if grad else "fwd", inputs, False))
        return self.eager(sel, grad, seed, *inputs)


def rows_call(fwd_index: int = 0, bwd_index: int = 1) -> Callable:
    """call_of for a token-wise op: device, dtype and width (last dimension) of one tensor
    argument, args[fwd_index] of a forward, args[bwd_index] of a backward (default: x, and x after
    dout)."""
    def call_of(direction: str, args, traced: bool = False) -> Call:
        t = args[bwd_index if direction == "bwd" else fwd_index]
        return Call(t.device.type, t.dtype, t.shape[-1], direction, traced=traced)

    return call_of


def rows_typical(width: int = 768):
    """The call `bertfast info` describes for a token-wise op: BERT-base's hidden size, fp32 on a
    CPU, bf16 on a GPU, a training forward."""
    def typical(device_type: str) -> Call:
        import torch

        return Call(device_type, torch.float32 if device_type == "cpu" else torch.bfloat16, width, "fwd+bwd")

    return typical


def overwrite_impl(op: str, x: torch.Tensor, *others: Optional[torch.Tensor]) -> Optional[dispatch.Impl]:
    """The backend implementation to call with inplace=True, or None when the result must go to
    fresh memory: an autograd graph needs x, torch.compile is tracing, x is not contiguous, another
    input shares memory with x (it would be read after x's rows are overwritten), or the serving
    backend has no in-place path (only the C++ CPU kernels have one: on a CPU a fresh output costs
    first-touch page faults that take longer than the kernel itself). A caller that writes over x
    calls bump_version(x) after."""
    if torch.compiler.is_compiling() or not x.is_contiguous():
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *others)):
        return None
    if any(t is not None and _overlaps(x, t) for t in others):
        return None
    sel = dispatch.select(op, Call(x.device.type, x.dtype, x.shape[-1], "fwd"))
    return sel if sel.inplace else None


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of a and b intersect (conservative: spans, not exact elements)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):
        lo = t.data_ptr()
        extent = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
        return lo, lo + (extent + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def bump_version(x: torch.Tensor) -> None:
    """Record that x was written in place, as torch's own in-place ops do: autograd then refuses
    a backward that saved x before the write, instead of computing wrong gradients from the new
    values. Inference tensors keep no version counter (and are only writable in inference mode)."""
    if not x.is_inference():
        torch.autograd.graph.increment_version(x)


# ---------------------------------------------------------------------------------------
# argument checks: every error names the argument and what was expected


def check_float(name: str, t, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")


def check_same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; expected the same device")


def check_vector(name: str, t, size: int) -> None:
    check_float(name, t, ndim=1)
    if t.shape[0] != size:
        raise ValueError(f"{name} must have shape ({size},) to match the last dimension, got {tuple(t.shape)}")


def check_same_shape(name: str, t, ref_name: str, ref: torch.Tensor) -> None:
    if tuple(t.shape) != tuple(ref.shape):
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")


def check_dropout(p) -> float:
    if not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {p!r}")
    return float(p)


def check_eps(eps) -> float:
    if not isinstance(eps, (int, float)) or not float(eps) > 0.0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    return float(eps)


def rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D (rows, hidden) view or copy: kernels index rows of contiguous memory."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def compare_close(atol: float = 1e-4, rtol: float = 1e-4):
    """A probe comparator: every tensor output of the backend matches the reference."""

    def compare(got, ref):
        got = got if isinstance(got, (tuple, list)) else (got,)
        ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        for g, r in zip(got, ref):
            if isinstance(r, torch.Tensor):
                torch.testing.assert_close(g.float(), r.float(), atol=atol, rtol=rtol, equal_nan=True)

    return compare


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """LayerNorm statistics are fp32 for every input dtype but fp64 (the oracle's precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stats_fake(x: torch.Tensor, shape: Sequence[int]):
    """Fake per-row statistics (mean, rstd) for a LayerNorm op's fake implementation."""
    dt = stat_dtype(x.dtype)
    return x.new_empty(shape, dtype=dt), x.new_empty(shape, dtype=dt)


def layernorm_fp32(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """LayerNorm of fp32 rows h: (y fp32, mean, rstd), statistics in fp32."""
    mean = h.mean(dim=-1)
    var = (h - mean.unsqueeze(-1)).pow(2).mean(dim=-1)
    rstd = torch.rsqrt(var + eps)
    y = (h - mean.unsqueeze(-1)) * rstd.unsqueeze(-1) * weight.to(h.dtype) + bias.to(h.dtype)
    return y, mean, rstd


def layernorm_bwd_fp32(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                       rstd: torch.Tensor):
    """Backward of layernorm_fp32 for rows h (fp32/fp64): (dh, dweight, dbias) in h's dtype.
    dh = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight."""
    acc = h.dtype
    xhat = (h - mean.to(acc).unsqueeze(-1)) * rstd.to(acc).unsqueeze(-1)
    dy = dy.to(acc)
    g = dy * weight.to(acc)
    n = h.shape[-1]
    c1 = (g * xhat).sum(-1, keepdim=True) / n
    c2 = g.sum(-1, keepdim=True) / n
    dh = (g - xhat * c1 - c2) * rstd.to(acc).unsqueeze(-1)
    red = tuple(range(dy.dim() - 1))
    return dh, (dy * xhat).sum(red), dy.sum(red)


def gelu(h: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU by its definition, h * Phi(h): F.gelu's fp32 CPU kernel returns NaN for +inf (the
    kernels and float64 give +inf); the tanh form is F.gelu's."""
    if approximate == "tanh":
        return torch.nn.functional.gelu(h, approximate="tanh")
    return h * 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))


def gelu_grad(h: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """d GELU(h) / dh, erf or tanh form."""
    if approximate == "tanh":
        k = math.sqrt(2.0 / math.pi)
        inner = k * (h + 0.044715 * h.pow(3))
        t = torch.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * h * h)
    cdf = 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * h * h) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + h * pdf
