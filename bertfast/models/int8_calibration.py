"""The int8 plan of a model's encoder GEMMs: which run smoothed int8, which keep more precision.

precision="int8" quantises each GEMM's activations with one scale per call (dispatch/int8_plan.py
says why and what a plan does). Measured per GEMM on all-MiniLM-L6-v2 (docs/benchmarks-cpu.md):
the inputs that follow a LayerNorm (the fused QKV projection, the FFN input projection) carry a
few channels ~15x larger than the median, which smoothing absorbs into the weights; the FFN
output projection's input (after GELU) loses the most, and smoothing makes it worse: it runs
in bf16 where the CPU has bf16 GEMMs (the best quality, and as fast as the alternatives here),
else int8 with its 8 widest input channels taken out and multiplied in fp32 beside it (a little
less precise, faster than the whole GEMM in fp32); the attention output projection loses least,
and a little more when smoothed, so it runs plain int8 (no smoothing pass either).

The activation maxima come from one fp32 pass of the encoder itself over a fixed batch of random
token ids (seeded, 16 x 128): deterministic, nothing shipped or downloaded, any vocabulary, and
on MiniLM as good as a pass over 128 real sentences (measured). `ensure(model)` runs it at the
first int8 forward of a model and again when any of its parameters changed (version counter or
storage) or its plans were released (`set_inference_precision`, `cpu_gemm.release`). A plan that
lags an in-place write through `.data` still computes the same product (smoothing divides the
input by what it multiplies the weight with, and the pack is made from the weights as they are),
only less precisely, until the precision is set again.
"""
from __future__ import annotations

import threading
import weakref
from typing import Optional

import torch
from torch import nn

from ..dispatch import cpu_gemm

CALIBRATION_SHAPE = (16, 128)  # sequences x tokens of the calibration pass
FFN_OUTPUT_FP32_CHANNELS = 8  # the FFN output projection's widest input channels, multiplied in fp32
# model -> (parameter stamp it was calibrated at, one weight that got a plan, or None)
_DONE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.RLock()


def _stamp(model: nn.Module) -> Optional[tuple]:
    try:
        return tuple((p._version, p.data_ptr()) for p in model.parameters())
    except RuntimeError:  # inference tensors keep no version counter: never calibrated (plain int8)
        return None


def calibration_ids(config) -> torch.Tensor:
    """The calibration batch: random ids above the special and [unused] rows (BERT's first 1000)."""
    vocab = config.vocab_size
    low = 1000 if vocab > 2000 else 1
    seq = min(CALIBRATION_SHAPE[1], getattr(config, "longest_sequence", config.max_position_embeddings))
    ids = torch.randint(low, vocab, (CALIBRATION_SHAPE[0], seq), generator=torch.Generator().manual_seed(0))
    return ids


def calibrate(model: nn.Module) -> Optional[torch.Tensor]:
    """Records every encoder GEMM's input range over the calibration batch (in fp32) and sets the
    GEMMs' int8 plans. Returns one weight that got a plan (None: no GEMM ran through cpu_gemm)."""
    cfg = model.config
    params = {id(p): p for p in model.parameters()}
    ids = calibration_ids(cfg).to(next(model.parameters()).device)
    with torch.inference_mode(), cpu_gemm.recording_inputs() as seen:
        model(ids)
    planned = None
    for key, (amax, n) in seen.items():
        weight = params.get(key)
        if weight is None:
            continue
        shape = (weight.shape[1], n)  # the GEMM's (K, N): Q, K and V run as one GEMM of N = 3 x hidden
        if shape == (cfg.intermediate_size, cfg.hidden_size):  # the FFN output projection
            if cpu_gemm.has_bf16():
                cpu_gemm.set_int8_plan(weight, None, "bf16")
            else:
                cpu_gemm.set_int8_plan(weight, None, "int8", amax.topk(min(FFN_OUTPUT_FP32_CHANNELS, amax.numel())).indices)
        elif shape == (cfg.hidden_size, cfg.hidden_size):  # the attention output projection: plain int8
            cpu_gemm.set_int8_plan(weight, None, "int8")
        else:
            cpu_gemm.set_int8_plan(weight, amax, "int8")
        planned = weight
    return planned


def ensure(model: nn.Module) -> None:
    """Calibrates `model` (a base encoder) unless its plans are there and its parameters unchanged.
    Called by the engine at the start of an int8 forward; the calibration pass's own forward
    returns at once."""
    if cpu_gemm.recording():
        return
    stamp = _stamp(model)
    if stamp is None:
        return
    with _LOCK:
        done = _DONE.get(model)
        # released plans (set_inference_precision, cpu_gemm.release) are made again too
        if done is not None and done[0] == stamp and (done[1] is None or cpu_gemm.int8_plan(done[1]) is not None):
            return
        was_training = model.training
        model.eval()  # no dropout in the pass
        try:
            planned = calibrate(model)
        finally:
            model.train(was_training)
        _DONE[model] = (stamp, planned)
