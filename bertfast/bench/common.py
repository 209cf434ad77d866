"""What every part of the harness shares: the subject's variant name, dtype names, the
suite options, short error reasons, torch.compile baselines and which backend served an op."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
NORM_OPS = ("embedding_layernorm", "bias_gelu", "bias_residual_layernorm", "gelu_layernorm")
SUBJECT = "bertfast"
COPY = "copy_same_bytes"  # not a baseline: the in-case copy-bandwidth reference of the ops suite


@dataclass
class SuiteOptions:
    """What the command line asked for, with the device's defaults filled in; each suite's
    plan_cases(opts) reads the fields it needs and ignores the rest."""

    device: torch.device
    dtypes: List[torch.dtype]
    quick: bool = False
    compile_mode: str = "some"
    tokens: List[int] = field(default_factory=list)  # ops: token counts
    hidden: List[int] = field(default_factory=list)  # ops: hidden sizes
    ops: Tuple[str, ...] = NORM_OPS  # ops: which ops
    sizes: List[int] = field(default_factory=list)  # attention: sequence lengths
    models: Tuple[str, ...] = ("minilm", "base")  # encoder: which models
    shapes: Optional[List[Tuple[int, int]]] = None  # encoder: fixed full batches (BATCH, SEQ)
    text_batches: Optional[Dict[str, int]] = None  # encoder: real-text batches per model
    train: Optional[bool] = None  # encoder: the MLM+NSP training step (default: CUDA only)


def dtype_name(dt: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, str(dt))


def reason(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip().splitlines()
    return (msg[0] if msg else type(e).__name__)[:300]


def compiled(fn, dynamic=False):
    """torch.compile(fn); compilation happens at the first call (the harness's warm-up)."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(fn, dynamic=dynamic)


def served_by(op: str, device: torch.device) -> str:
    from .. import dispatch

    try:
        name, why = dispatch.explain(op, device.type)
        return name if why == "first choice" else f"{name} ({why})"
    except Exception as e:  # noqa: BLE001
        return f"unknown ({reason(e)})"


