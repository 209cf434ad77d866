"""The inference precision of a model's encoder GEMMs on CPU: "fp32" (default), "bf16", "int8".

    model.set_inference_precision("bf16")           # from now on
    with inference_precision(model, "int8"): ...    # for a block (tasks' precision= argument)

The setting is a plain attribute of the base model (BertModel), read once per forward by the
engine; it changes nothing in training, under autograd, on a GPU or under torch.compile (those
run the fp32 parameters as they are), and it is never saved with the weights. What each precision
does, and the instructions it needs, is in bertfast/dispatch/cpu_gemm.py.
"""
from __future__ import annotations

import contextlib
import threading

from torch import nn

from ..dispatch import cpu_gemm

_LOCK = threading.Lock()


def base_model(model: nn.Module) -> nn.Module:
    """The encoder (BertModel or a family's) inside `model` (itself, a head, or a twin)."""
    prefix = getattr(model, "base_model_prefix", None)
    base = getattr(model, prefix, None) if prefix else None
    return base if isinstance(base, nn.Module) else model


def get_inference_precision(model: nn.Module) -> str:
    return getattr(base_model(model), "inference_precision", "fp32")


def set_inference_precision(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """Sets the CPU inference precision of `model`'s encoder GEMMs; refuses a precision this CPU
    has no instructions for (cpu_gemm.check_precision). Drops the bf16/int8 weight copies made so
    far (call it again after writing weights through `.data`). Returns `model`."""
    precision = cpu_gemm.check_precision(precision)
    base_model(model).inference_precision = precision
    cpu_gemm.release(model)  # converted weights are made again from the parameters as they are now
    return model


@contextlib.contextmanager
def inference_precision(model: nn.Module, precision=None):
    """`precision` for the block, the model's own setting again after it (None: leave it)."""
    if precision is None:
        yield model
        return
    precision = cpu_gemm.check_precision(precision)
    base = base_model(model)
    with _LOCK:
        before = getattr(base, "inference_precision", "fp32")
        base.inference_precision = precision
    try:
        yield model
    finally:
        with _LOCK:
            base.inference_precision = before
