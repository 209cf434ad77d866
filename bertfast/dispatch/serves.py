"""The vocabulary of dispatch: a `Call` (what one op call needs) and `Serves` (what one
implementation declares it can do), after xformers' fmha backends (SUPPORTED_DTYPES,
SUPPORTED_MAX_K, ... and `not_supported_reasons`).

A Call is a small hashable tuple, so a selection is memoised per distinct call: the ops build it
from their arguments' dtype and shapes (no host read), the model builds one per forward.

Fields of a Call:
    device     "cpu", "cuda", ...: the tensors' device type
    dtype      torch dtype of the op's floating-point input
    width      the op's width: the hidden size (the LayerNorm family, bias_gelu) or the head_dim
               (attention, the larger of q's and v's)
    direction  "fwd" (no autograd), "bwd" (a backward on its own: torch.compile's backward op),
               "fwd+bwd" (a forward whose backward autograd will run: both passes are chosen at
               once, and must share a saved-tensor contract)
    layout     "rows" (token-wise ops), "padded" (B, S, H, D) or "varlen" (packed, cu_seqlens)
    seq        attention: the longest sequence (routing tables bucket it); 0 elsewhere
    mask       attention: "none" or "key" (a key-padding bias)
    dropout    dropout_p > 0
    causal     attention: "none", "self" (causal with Lq == Lk, where top-left and bottom-right
               alignment agree) or "cross" (bottom-right aligned, Lq != Lk)
    traced     the call comes from the op's registered torch.library body (torch.compile's graph):
               only implementations with the op's backend contract (fwd -> (out, saved...),
               bwd from those) serve it, not those that bring their own autograd
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

ANY_DEVICE = ("*",)
LAYOUTS = ("rows", "padded", "varlen")
MASKS = ("none", "key")
CAUSAL = ("none", "self", "cross")
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")


class Call(NamedTuple):
    device: str
    dtype: object  # torch.dtype (kept untyped so this module imports without torch)
    width: int
    direction: str = "fwd"
    layout: str = "rows"
    seq: int = 0
    mask: str = "none"
    dropout: bool = False
    causal: str = "none"
    traced: bool = False

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)


def dtype_name(dtype) -> str:
    """'bf16' / 'fp16' / 'fp32' / 'fp64' for a torch dtype (or its str)."""
    return {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16",
            "torch.float64": "fp64"}.get(str(dtype), str(dtype))


@dataclass(frozen=True)
class Serves:
    """What an implementation serves, for one direction. Every field restricts; the defaults
    serve everything. `dtypes` holds names ('fp32', 'fp16', 'bf16', 'fp64'); `width_name` is what
    the op calls its width in messages (hidden size, head_dim)."""

    devices: tuple = ANY_DEVICE
    dtypes: tuple = ("fp32", "fp16", "bf16", "fp64")
    max_width: Optional[int] = None
    width_name: str = "width"
    layouts: tuple = LAYOUTS
    masks: tuple = MASKS
    dropout: bool = True
    causal: tuple = CAUSAL
    # Triton kernels also run on CPU tensors under TRITON_INTERPRET=1 (tests, no GPU)
    interpreter: bool = False

    def device_reason(self, device: str, interpret: bool) -> Optional[str]:
        if self.devices == ANY_DEVICE or device in self.devices:
            return None
        if self.interpreter and device == "cpu":
            if interpret:
                return None
            return "does not serve cpu tensors (set TRITON_INTERPRET=1 to run Triton on CPU)"
        return f"does not serve {device} tensors"

    def not_supported_reasons(self, call: Call, interpret: bool = False) -> tuple[list, list]:
        """(capability reasons, semantic reasons) why this declaration refuses `call`; both empty
        when it serves it. Capability: device, dtype, width (a routing table asking for an
        implementation that refuses these is worth a warning). Semantic: layout, mask, dropout,
        causal (the call means something this implementation does not compute)."""
        cap, sem = [], []
        why = self.device_reason(call.device, interpret)
        if why:
            cap.append(why)
        dt = dtype_name(call.dtype)
        if dt not in self.dtypes:
            cap.append(f"dtype {dt} (serves {', '.join(self.dtypes)})")
        if self.max_width is not None and call.width > self.max_width:
            cap.append(f"{self.width_name} {call.width} > {self.max_width}")
        if call.layout not in self.layouts:
            sem.append(f"{call.layout} layout (serves {', '.join(self.layouts)})")
        if call.mask not in self.masks:
            sem.append(f"{call.mask} mask")
        if call.dropout and not self.dropout:
            sem.append("dropout")
        if call.causal not in self.causal:
            sem.append(f"causal={call.causal}")
        return cap, sem
