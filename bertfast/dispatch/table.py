"""The dispatch table: every implementation of every fused op, what it serves, and where it lives.

One row per (op, implementation). A row names
- `backend`: the BERTFAST_BACKEND / use_backend name that forces it ("triton", "cpp", "cuda",
  "reference"), or None for PyTorch's own kernels that only a measured routing table selects;
- `load`: a function that imports (and builds, for the C++/CUDA extensions) what it needs and
  returns its (fwd, bwd), with the op's backend signatures (the "---- backends" block of
  bertfast/ops/<op>.py); it raises with a reason when it cannot. The reference has none: the op
  file hands its `_fwd_reference`/`_bwd_reference` to dispatch.register_op;
- `serves` (and `serves_bwd` where the backward differs): what it declares it can do;
- `contract`: implementations of one op with the same contract exchange saved tensors (lse,
  mean/rstd), so a forward from one may pair with a backward from another; "own" marks a
  kernel with its own autograd (one call does both passes, returning (out, None));
- `probe`: tried once on a tiny call against the reference before it is trusted (PyTorch's own
  kernels are not probed);
- `inplace`: its forward takes inplace=True and may write the result over x.

Selection (core.select) tries, under BERTFAST_BACKEND=auto, the routing table's choice for the
call, then AUTO_ORDER's backends for the device, each backend's rows in the order below; a
forced backend tries its own rows, then the reference. To add an implementation: write its
fwd/bwd functions in a module of their own, add a loader and a row here; nothing else changes
(docs/architecture.md walks through the ATen CPU flash attention row).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from .serves import Serves

LOW_AND_FP32 = ("fp32", "fp16", "bf16")
# Triton on CPU tensors only under TRITON_INTERPRET=1 (the tests' interpreter)
TRITON_DEVICES = dict(devices=("cuda",), interpreter=True)
# kernels/_layernorm.py MAX_N (a row in registers) and kernels/attention.py MAX_HEAD_DIM; written
# out so declaring them imports no triton (tests/test_dispatch_table.py checks they agree)
TRITON_MAX_HIDDEN = 8192
TRITON_MAX_HEAD_DIM = 256
# csrc/cuda/common.cuh kMaxHidden: the CUDA C++ bias_gelu backward keeps a row per block
CUDA_MAX_HIDDEN = 8192

# which backends auto tries, in order, per device type (after a routing table's choice)
AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpp", "reference")}


@dataclass
class Implementation:
    op: str
    name: str
    backend: Optional[str]
    serves: Serves
    load: Optional[Callable] = None
    serves_bwd: Optional[Serves] = None
    contract: str = "bertfast"
    probe: bool = True
    inplace: bool = False
    # set when loaded (or given directly: the reference, tests' fakes)
    fwd: Optional[Callable] = None
    bwd: Optional[Callable] = None
    extra: dict = field(default_factory=dict)

    def declared(self, direction: str) -> Serves:
        return self.serves_bwd if direction == "bwd" and self.serves_bwd is not None else self.serves

    @property
    def own_autograd(self) -> bool:
        return self.contract == "own"


# ---------------------------------------------------------------------------------------------
# where each implementation lives: real imports, made on first use; each returns (fwd, bwd)

def _cpp_embedding_layernorm():
    from . import cpp

    cpp.load()
    return cpp.embedding_layernorm_fwd, cpp.embedding_layernorm_bwd


def _cpp_bias_gelu():
    from . import cpp

    cpp.load()
    return cpp.bias_gelu_fwd, cpp.bias_gelu_bwd


def _cpp_bias_residual_layernorm():
    from . import cpp

    cpp.load()
    return cpp.bias_residual_layernorm_fwd, cpp.bias_residual_layernorm_bwd


def _cpp_bias_residual_layernorm_bf16():
    from . import cpp

    cpp.load()
    return cpp.bias_residual_layernorm_bf16_fwd, None


def _cpp_gelu_layernorm():
    from . import cpp

    cpp.load()
    return cpp.gelu_layernorm_fwd, cpp.gelu_layernorm_bwd


def _cpp_attention():
    from . import cpp

    cpp.load()
    return cpp.attention_fwd, cpp.attention_bwd


def _triton_embedding_layernorm():
    from ..kernels import embedding_layernorm

    return embedding_layernorm.embedding_layernorm_fwd, embedding_layernorm.embedding_layernorm_bwd


def _triton_bias_gelu():
    from ..kernels import bias_gelu

    return bias_gelu.bias_gelu_fwd, bias_gelu.bias_gelu_bwd


def _triton_bias_residual_layernorm():
    from ..kernels import bias_residual_layernorm

    return bias_residual_layernorm.bias_residual_layernorm_fwd, bias_residual_layernorm.bias_residual_layernorm_bwd


def _triton_gelu_layernorm():
    from ..kernels import gelu_layernorm

    return gelu_layernorm.gelu_layernorm_fwd, gelu_layernorm.gelu_layernorm_bwd


def _triton_attention():
    from ..kernels import attention

    return attention.attention_fwd, attention.attention_bwd


def _cuda_embedding_layernorm():
    from . import cuda

    cuda.load()
    return cuda.embedding_layernorm_fwd, cuda.embedding_layernorm_bwd


def _cuda_bias_gelu():
    from . import cuda

    cuda.load()
    return cuda.bias_gelu_fwd, cuda.bias_gelu_bwd


def _cuda_bias_residual_layernorm():
    from . import cuda

    cuda.load()
    return cuda.bias_residual_layernorm_fwd, cuda.bias_residual_layernorm_bwd


def _cuda_gelu_layernorm():
    from . import cuda

    cuda.load()
    return cuda.gelu_layernorm_fwd, cuda.gelu_layernorm_bwd


def _aten_flash():
    from . import torch_attention

    return torch_attention.aten_flash_fwd, torch_attention.aten_flash_bwd


def _sdpa():
    from . import torch_attention

    return torch_attention.sdpa_fwd, None


def _varlen_attn():
    from . import torch_attention

    torch_attention.load_varlen_attn()
    return torch_attention.varlen_attn_fwd, None


# ---------------------------------------------------------------------------------------------
# the rows

REFERENCE = Serves()  # plain PyTorch: every device, dtype, width and semantics
_ROWS_LAYOUT = dict(width_name="hidden size", layouts=("rows",))
CPP = Serves(devices=("cpu",), dtypes=LOW_AND_FP32, **_ROWS_LAYOUT)
CUDA = Serves(devices=("cuda",), dtypes=LOW_AND_FP32, **_ROWS_LAYOUT)
TRITON = Serves(dtypes=LOW_AND_FP32, **TRITON_DEVICES, **_ROWS_LAYOUT)
TRITON_LN = Serves(dtypes=LOW_AND_FP32, max_width=TRITON_MAX_HIDDEN, **TRITON_DEVICES, **_ROWS_LAYOUT)

_HEAD = dict(width_name="head_dim", layouts=("padded", "varlen"))
# PyTorch's kernels compute only what bertfast's attention means without masks and dropout (their
# dropout masks are not bertfast's Philox stream) and with causal only where both alignments agree
_TORCH_SEMANTICS = dict(masks=("none",), dropout=False, causal=("none", "self"), width_name="head_dim")

I = Implementation
ROWS = [
    I("embedding_layernorm", "cpp", "cpp", CPP, _cpp_embedding_layernorm),
    I("embedding_layernorm", "triton", "triton", TRITON_LN, _triton_embedding_layernorm),
    I("embedding_layernorm", "cuda", "cuda", CUDA, _cuda_embedding_layernorm),
    I("embedding_layernorm", "reference", "reference", REFERENCE, probe=False),

    I("bias_gelu", "cpp", "cpp", CPP, _cpp_bias_gelu, inplace=True),
    I("bias_gelu", "triton", "triton", TRITON, _triton_bias_gelu),
    I("bias_gelu", "cuda", "cuda", CUDA, _cuda_bias_gelu,
      serves_bwd=Serves(devices=("cuda",), dtypes=LOW_AND_FP32, max_width=CUDA_MAX_HIDDEN, **_ROWS_LAYOUT)),
    I("bias_gelu", "reference", "reference", REFERENCE, probe=False),

    I("bias_residual_layernorm", "cpp", "cpp", CPP, _cpp_bias_residual_layernorm, inplace=True),
    I("bias_residual_layernorm", "triton", "triton", TRITON_LN, _triton_bias_residual_layernorm),
    I("bias_residual_layernorm", "cuda", "cuda", CUDA, _cuda_bias_residual_layernorm),
    I("bias_residual_layernorm", "reference", "reference", REFERENCE, probe=False),

    # bf16 CPU inference's add-and-norm (bf16 GEMM output + fp32 residual -> fp32 and bf16 rows),
    # forward only: the C++ kernel converts in registers; the reference casts
    I("bias_residual_layernorm_bf16", "cpp", "cpp",
      Serves(devices=("cpu",), dtypes=("bf16",), **_ROWS_LAYOUT, dropout=False), _cpp_bias_residual_layernorm_bf16),
    I("bias_residual_layernorm_bf16", "reference", "reference", REFERENCE, probe=False),

    I("gelu_layernorm", "cpp", "cpp", CPP, _cpp_gelu_layernorm),
    I("gelu_layernorm", "triton", "triton", TRITON_LN, _triton_gelu_layernorm),
    I("gelu_layernorm", "cuda", "cuda", CUDA, _cuda_gelu_layernorm),
    I("gelu_layernorm", "reference", "reference", REFERENCE, probe=False),

    # ATen's CPU flash attention (what torch SDPA runs on CPU) writes the same (B, H, S) natural-log
    # lse as csrc/cpu/attention.cpp, so the two pair: ATen serves the passes it measured faster in
    # (the bf16 forward, its GEMMs; the fp32 backward), the C++ kernels the others
    I("attention", "aten_flash", "cpp",
      Serves(devices=("cpu",), dtypes=("bf16",), layouts=("padded",), **_TORCH_SEMANTICS), _aten_flash,
      serves_bwd=Serves(devices=("cpu",), dtypes=("fp32",), layouts=("padded",), **_TORCH_SEMANTICS), probe=False),
    I("attention", "cpp", "cpp", Serves(devices=("cpu",), dtypes=LOW_AND_FP32, **_HEAD), _cpp_attention),
    I("attention", "triton", "triton",
      Serves(dtypes=LOW_AND_FP32, max_width=TRITON_MAX_HEAD_DIM, **TRITON_DEVICES, **_HEAD), _triton_attention),
    # torch.nn.functional.scaled_dot_product_attention (cuDNN / flash on Hopper) and
    # torch.nn.attention.varlen.varlen_attn (PyTorch's FlashAttention-2 varlen, torch 2.10+), each
    # with its own autograd: only where a committed routing table measured them faster (backend None:
    # no BERTFAST_BACKEND name forces them)
    I("attention", "sdpa", None, Serves(dtypes=LOW_AND_FP32, layouts=("padded",), **_TORCH_SEMANTICS), _sdpa,
      contract="own", probe=False),
    I("attention", "varlen_attn", None,
      Serves(devices=("cuda",), dtypes=("fp16", "bf16"), layouts=("varlen",), **_TORCH_SEMANTICS), _varlen_attn,
      contract="own", probe=False),
    I("attention", "reference", "reference", REFERENCE, probe=False),
]
del I


def rows_of(op: str) -> list:
    """Fresh Implementation objects for `op`'s rows, in order (select binds fwd/bwd on them)."""
    from dataclasses import replace

    return [replace(r, extra={}) for r in ROWS if r.op == op]
