"""int8 plans: per encoder GEMM, what precision="int8" does with it, and the calibration pass that
records the GEMMs' input ranges.

dispatch/cpu_gemm.py's int8 runs torch.ops.quantized.linear_dynamic, which quantises each GEMM's
activations with one scale per call (the libraries' dynamic ops offer no per-token scale at
their speed), so a few input channels with large values leave the others few levels. A GEMM's
plan (`set_int8_plan`, made by models/int8_calibration.py) fixes that the two ways the field
does: smoothing (SmoothQuant: the activation divided per input channel by
s_j = max|X_j|^a / max|W_j|^(1-a) and the weight's column j multiplied by it, so the product is
unchanged and the range moves from the activation into the per-channel weight scales), and
taking the few widest input channels out of the int8 GEMM into a small fp32 GEMM beside it
(LLM.int8()'s decomposition, with channels chosen once from the statistics: for an input that
smoothing cannot tame, the FFN output projection after GELU). A plan may also keep a GEMM in
bf16 (fp32 without bf16 instructions) or fp32. The plan holds activation statistics, not the scales: s is
computed from the weights as they are whenever cpu_gemm makes the pack, so a plan that lags an
edit still computes the same product, only less precisely.

Plans live beside the weights, keyed by the GEMM's first weight (a weak table, like cpu_gemm's
packs: pickling, deepcopy and state dicts never see them); cpu_gemm.release drops them.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Optional

import torch

_LOCK = threading.RLock()  # reentrant: a collected weight's callback may run while it is held

INT8_KEEPS = ("int8", "bf16", "fp32")
_PLANS: dict = {}  # {id(first weight): (weakref to it, (act_amax or None, keep, outliers or None))}
_RECORDING = threading.local()  # .table: {id(first weight): (running max|x| per input channel, N)}


def set_int8_plan(weight: torch.Tensor, act_amax: Optional[torch.Tensor] = None, keep: str = "int8",
                  outliers: Optional[torch.Tensor] = None) -> None:
    """What precision="int8" does with the GEMM whose first weight is `weight`: quantise it smoothed
    for inputs reaching act_amax (K,) per channel (None: unsmoothed), with the input channels
    `outliers` (int64 indices) left out of the int8 GEMM and multiplied in fp32 beside it; or `keep`
    it in "bf16" (fp32 where this CPU has no bf16 instructions) or "fp32"."""
    if keep not in INT8_KEEPS:
        raise ValueError(f"keep must be one of {INT8_KEEPS}, got {keep!r}")
    if act_amax is not None and (act_amax.dim() != 1 or act_amax.shape[0] != weight.shape[1]):
        raise ValueError(f"act_amax must be ({weight.shape[1]},), one maximum per input channel of the weight, "
                         f"got {tuple(act_amax.shape)}")
    if outliers is not None and (outliers.dtype != torch.long or outliers.dim() != 1
                                 or not bool(((outliers >= 0) & (outliers < weight.shape[1])).all())):
        raise ValueError(f"outliers must be int64 indices of input channels (0 .. {weight.shape[1] - 1}), "
                         f"got {outliers.dtype} {tuple(outliers.shape)}")
    plan = (None if act_amax is None else act_amax.detach().float().clone(), keep,
            None if outliers is None else outliers.clone())
    key = id(weight)

    def gone(_ref, key=key):
        with _LOCK:
            if _PLANS.get(key, (None,))[0] is _ref:
                del _PLANS[key]

    with _LOCK:
        _PLANS[key] = (weakref.ref(weight, gone), plan)


def int8_plan(weight: torch.Tensor) -> Optional[tuple]:
    """(act_amax or None, keep, outliers or None) set for the GEMM whose first weight is `weight`, or None."""
    hit = _PLANS.get(id(weight))
    return hit[1] if hit is not None and hit[0]() is weight else None


@contextlib.contextmanager
def recording_inputs():
    """For the block, in this thread: every cpu_gemm.linear() call runs in fp32 whatever its precision and
    records max|x| per input channel of its GEMM; yields {id(first weight): ((K,) maxima, N)}."""
    if getattr(_RECORDING, "table", None) is not None:
        raise RuntimeError("cpu_gemm.recording_inputs() is already active in this thread")
    _RECORDING.table = table = {}
    try:
        yield table
    finally:
        _RECORDING.table = None


def recording() -> bool:
    """Whether this thread is inside recording_inputs() (a calibration pass)."""
    return getattr(_RECORDING, "table", None) is not None


def drop(weight: torch.Tensor) -> None:
    """Forget the plan of the GEMM whose first weight is `weight` (if any)."""
    with _LOCK:
        hit = _PLANS.get(id(weight))
        if hit is not None and hit[0]() is weight:
            del _PLANS[id(weight)]


def recording_table() -> Optional[dict]:
    """The table recording_inputs() fills in this thread, or None outside one."""
    return getattr(_RECORDING, "table", None)


SMOOTH_ALPHA = 0.75  # the exponent a above; 0.5 and 0.85 gave lower cosines on MiniLM (docs/benchmarks-cpu.md)


def smoothing(act_amax: torch.Tensor, w: torch.Tensor, alpha: float = SMOOTH_ALPHA) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors s (K,) for weights w (N, K) whose input channels reach
    act_amax (K,): the GEMM runs as (x / s) @ (w * s)^T."""
    floor = 1e-5  # a channel that never fired (or an all-zero column) keeps s finite
    s = act_amax.float().clamp_min(floor).pow(alpha) / w.detach().abs().amax(0).float().clamp_min(floor).pow(1 - alpha)
    return s.clamp_min(floor)


_SCRATCH = threading.local()  # .buf: this thread's smoothed-input buffer, reused across GEMMs and calls
_SCRATCH_MAX = 1 << 24  # elements (64 MB); a larger input gets fresh memory


def scratch(like: torch.Tensor) -> Optional[torch.Tensor]:
    """A (rows, K) fp32 buffer for a smoothed int8 GEMM's input: a fresh multi-MB tensor costs its page
    faults on every call. The GEMM reads it and returns fresh memory, so one per thread serves all."""
    n = like.numel()
    if n > _SCRATCH_MAX or like.dtype != torch.float32:
        return None
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < n or buf.is_inference() != torch.is_inference_mode_enabled():
        buf = _SCRATCH.buf = torch.empty(max(n, 1 << 16), dtype=torch.float32)
    return buf[:n].view(like.shape)
