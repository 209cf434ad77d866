"""How the encoder executes: what bert.py's module tree calls into, and nothing a user builds with.

One `ForwardContext` per encoder forward carries what every layer needs besides its input rows:
the layout (packed varlen rows with their cu_seqlens, or the (batch, seq) rows of a padded batch
with an optional key mask), the CPU inference workspace the GEMMs write into, and the ops'
backends resolved once for the whole forward (`Eager`: the lean path). The layers take that one
object instead of threading six arguments through every forward.

Also here: the host side of a forward (argument checks and the one device-to-host read-back of
everything the host must know), the packed-layout helpers (first token of each sequence, packed
position ids) and the fused steps the layers share (`dense_add_norm`, `dense_act`).

The names are public so the family files, graphs.py and the heads import them without reaching
into private ones; the module is private because none of it is a user's API.
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import Iterator, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import dispatch, ops
from ..dispatch import cpu_gemm
from ..ops._common import can_sync
from ..ops._rng import draw_seeds
from ..ops.attention import attention_unchecked, key_padding_bias
from ..ops.bias_gelu import bias_gelu_unchecked
from ..ops.bias_residual_layernorm import bias_residual_layernorm_unchecked
from ..ops.bias_residual_layernorm_bf16 import bias_residual_layernorm_bf16_unchecked
from ..ops.bias_residual_layernorm_bf16 import select as select_add_norm_bf16
from ..ops.embedding_layernorm import embedding_layernorm_prechecked, id_range_error
from ..padding import PackedLayout
from . import int8_calibration
from .config import FUSED_ACTS, BertConfig

__all__ = ["ACTS", "Eager", "ForwardContext", "Workspace", "activation_fn", "can_sync", "check_inputs",
           "check_packed", "checkpointed_layer", "dense_act", "dense_add_norm", "embedding_layernorm_rows",
           "first_tokens", "gemm_precision", "linear", "packed_qkv", "packed_positions", "plain_linear", "read_back",
           "release_workspace", "workspace_limit",
           "workspace_of"]

# activations the layers run in PyTorch (the GELU flavours are fused: config.FUSED_ACTS)
ACTS = {"relu": F.relu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh, "gelu": F.gelu}


def activation_fn(name):
    """The PyTorch function of an unfused activation (None for a fused GELU flavour); a callable
    (e.g. transformers' activation module) is itself; a clear error for a name neither knows."""
    if callable(name):
        return name
    if name not in ACTS and name not in FUSED_ACTS:
        raise ValueError(f"hidden_act must be one of {sorted(set(ACTS) | set(FUSED_ACTS))}, got {name!r}")
    return ACTS.get(name)


# --------------------------------------------------------------------------------------
# CPU inference workspace


class Workspace:
    """Buffers for the encoder layers' GEMM outputs during CPU inference, kept by the model between
    calls (one set per thread). Each layer writes its fused QKV projection, attention projection,
    intermediate and output GEMMs into them, and the fused ops finish in place, so a forward
    allocates almost nothing: a fresh multi-MB GEMM output costs its page faults on every call
    once glibc has handed freed memory back to the system. The last layer writes fresh memory:
    nothing returned to the caller aliases these buffers. Held: one layer's activations (e.g.
    13.5 MB for MiniLM at 8 x 128 tokens), up to BERTFAST_CPU_WORKSPACE_MB (512 by default; larger
    batches go without); `BertModel.release_workspace()` frees them."""

    def __init__(self):
        self.bufs: dict = {}

    def get(self, name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        key = (name, like.dtype, like.device, torch.is_inference_mode_enabled())
        t = self.bufs.get(key)
        if t is None or t.numel() < rows * cols:
            t = self.bufs[key] = torch.empty(rows * cols, dtype=like.dtype, device=like.device)
        return t[: rows * cols].view(rows, cols)


# per thread (a model served from several threads must not share buffers), per model; held
# outside the module so that pickling, deepcopy and state dicts never see it
WORKSPACES = threading.local()


def workspace_of(model) -> Workspace:
    """The calling thread's workspace of `model` (made on first use)."""
    table = getattr(WORKSPACES, "table", None)
    if table is None:
        table = WORKSPACES.table = weakref.WeakKeyDictionary()
    if model not in table:
        table[model] = Workspace()
    return table[model]


def release_workspace(model) -> None:
    """Drops the calling thread's workspace of `model`."""
    table = getattr(WORKSPACES, "table", None)
    if table is not None:
        table.pop(model, None)


def workspace_limit() -> int:
    """Bytes one model may keep per thread for CPU inference buffers: BERTFAST_CPU_WORKSPACE_MB
    (default 512; 0 turns the workspace off). Larger batches allocate per call as before."""
    raw = os.environ.get("BERTFAST_CPU_WORKSPACE_MB", "512")
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"BERTFAST_CPU_WORKSPACE_MB must be a number of megabytes, got {raw!r}") from None
    return int(mb * 2**20)


def plain_linear(module: nn.Module) -> bool:
    """Exactly an nn.Linear without hooks: its weight and bias can go straight into a GEMM fused
    with what follows. Anything else at a projection (a LoRA layer, a quantised or hooked Linear:
    bertfast.accelerate serves a transformers model whose layers were replaced) is called as the
    module it is, and the fused ops run on its output."""
    return type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks)


def linear(x, weight, bias=None, out: Optional[torch.Tensor] = None):
    """F.linear, or the same product written into `out` (a workspace buffer)."""
    if out is None:
        return F.linear(x, weight, bias)
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def gemm_precision(model, hidden: torch.Tensor) -> Optional[str]:
    """The precision the encoder's GEMMs run in through dispatch/cpu_gemm (the fastest library
    per shape, weights packed once), or None where `linear` (F.linear) serves: on a GPU, when
    autograd records, under torch.compile or autocast, for activations other than fp32, and with
    BERTFAST_CPU_GEMM=off. The precision is the model's inference setting (models/precision.py)."""
    if (hidden.device.type != "cpu" or torch.is_grad_enabled() or hidden.dtype != torch.float32
            or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")):
        return None
    if os.environ.get("BERTFAST_CPU_GEMM", "").strip().lower() == "off":
        return None
    return getattr(model, "inference_precision", "fp32")


def packed_qkv(hidden, lins, ctx: "ForwardContext", out: Optional[torch.Tensor] = None):
    """The Q, K and V projections as one GEMM on their weights packed together once (CPU
    inference, ctx.gemm set): (tokens, 3 * hidden)."""
    return cpu_gemm.linear(ctx.gemm_rows(hidden), tuple(lin.weight for lin in lins), tuple(lin.bias for lin in lins),
                           "bias", ctx.gemm, out=out)


# --------------------------------------------------------------------------------------
# the per-forward context


class Eager(NamedTuple):
    """What one eager encoder forward resolves once for all its layers' op calls (the lean
    path): the implementation serving each op's calls of this forward (dispatch.resolve_encoder,
    the engine's one call into dispatch: it reads BERTFAST_BACKEND and use_backend once per forward
    instead of once per call), whether autograd records (torch.is_grad_enabled()), the padded
    layout's key bias and the forward's dropout seeds (one draw from torch's generator for all
    layers, not one per op call). The layers then call the ops' `_unchecked` entry points: the
    inputs were validated at the model boundary, so no per-call argument checks either."""

    grad: bool
    attention: dispatch.Impl
    bias_residual_layernorm: dispatch.Impl
    bias_gelu: dispatch.Impl
    key_bias: Optional[torch.Tensor]
    seeds: Optional[Iterator[int]]

    @classmethod
    def resolve(cls, hidden: torch.Tensor, config, layout: Optional[PackedLayout], shape,
                key_mask: Optional[torch.Tensor], n_seeds: int = 0) -> "Eager":
        """n_seeds: how many dropout calls the forward may make (0: none, e.g. in eval mode)."""
        seeds = iter(draw_seeds(n_seeds)) if n_seeds else None
        grad, dev = torch.is_grad_enabled(), hidden.device.type
        # the projections' outputs (what attention and bias_gelu see) are in autocast's dtype
        gemm = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        impls = dispatch.resolve_encoder(
            dev, gemm, hidden.dtype, config.hidden_size, config.intermediate_size,
            config.hidden_size // config.num_attention_heads, layout is not None,
            layout.max_seqlen if layout is not None else shape[1], key_mask is not None,
            n_seeds > 0 and config.attention_probs_dropout_prob > 0, grad)
        return cls(grad, *impls, None if key_mask is None else key_padding_bias(key_mask), seeds)

    def seed(self, p: float) -> Optional[int]:
        """The next dropout seed of this forward for a call with rate p (None: the op draws one)."""
        return next(self.seeds, None) if p > 0.0 and self.seeds is not None else None

    def attention_call(self, q, k, v, layout: Optional[PackedLayout], p: float):
        """Self-attention of one layer through the implementation resolved for the forward."""
        return attention_unchecked(self.attention, self.grad, q, k, v, layout, self.key_bias, p, self.seed(p))


class ForwardContext:
    """Everything an encoder layer needs besides its input rows, made once per forward.

    layout: the packed layout (varlen rows) or None (the (batch, seq) = `shape` rows of a padded
    batch, with `key_mask` (batch, seq) or None); workspace: CPU inference buffers for the GEMM
    outputs (see Workspace) or None; eager: the forward's resolved lean path, or None where the
    layers call the public, checked ops (torch.compile tracing, CUDA-graph capture, an empty
    batch); last: whether the layer now running is the last one (its output is returned, so it
    is fresh memory, never a workspace buffer); gemm: the precision of the layers' GEMMs through
    dispatch/cpu_gemm (CPU inference on the lean path), or None where they run F.linear.

    In bf16 inference (gemm "bf16") the residual stream stays fp32 and every GEMM reads bf16:
    each add-and-norm writes its result twice in one pass (fp32, and bf16 for the next GEMM:
    ops/bias_residual_layernorm_bf16.py, served by `add_norm_bf16`), and `low` holds the latest
    such pair, so the GEMM that reads those rows takes the bf16 copy instead of casting them."""

    __slots__ = ("layout", "shape", "key_mask", "workspace", "eager", "last", "gemm", "low", "add_norm_bf16")

    def __init__(self, layout: Optional[PackedLayout], shape: Tuple[int, int], key_mask: Optional[torch.Tensor] = None,
                 workspace: Optional[Workspace] = None, eager: Optional[Eager] = None, gemm: Optional[str] = None):
        self.layout, self.shape, self.key_mask = layout, shape, key_mask
        self.workspace, self.eager, self.gemm = workspace, eager, gemm
        self.last = True
        self.low: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (fp32 rows, their bf16 copy)
        self.add_norm_bf16: Optional[dispatch.Impl] = None

    @classmethod
    def begin(cls, model, hidden: torch.Tensor, layout: Optional[PackedLayout], shape, key_mask,
              keep_hidden: bool) -> "ForwardContext":
        """The context of one forward of `model` (a BertModel) over the embedded rows `hidden`;
        keep_hidden: every layer's output is returned (so none may live in the workspace)."""
        cfg = model.config
        ws = None
        # CPU inference: GEMM outputs go to buffers reused across layers and calls; not while
        # torch.compile traces (the buffers are Python state, and the fused ops do not write in
        # place there)
        if (hidden.device.type == "cpu" and not torch.is_grad_enabled() and not keep_hidden
                and not torch.compiler.is_compiling()):
            need = hidden.shape[0] * (5 * cfg.hidden_size + cfg.intermediate_size) * hidden.element_size()
            if need <= workspace_limit():  # an occasional huge batch is not kept for the process' life
                ws = workspace_of(model)
        # eager: the inputs were validated at the model boundary, so the layers take the ops'
        # unchecked paths with backends resolved once here; torch.compile and CUDA-graph capture
        # trace the public ops (the custom ops), and so does an empty batch (no valid token: the
        # public ops' empty-input handling)
        eager, gemm = None, None
        if hidden.shape[0] and can_sync():
            gemm = gemm_precision(model, hidden)
            # dropout calls per layer: attention probabilities and the two add-and-norms. In bf16
            # inference attention and bias+GELU get the GEMMs' bf16 rows; they are resolved as the
            # fp32 calls (the C++ kernels, which serve bf16 too): ATen's CPU flash attention, which
            # the table puts first for bf16 training, ran at half the C++ kernel's speed on BERT's
            # inference shapes (docs/benchmarks-cpu.md)
            eager = Eager.resolve(hidden, cfg, layout, shape, key_mask,
                                  3 * len(model.encoder.layer) if model.training else 0)
        if gemm == "int8":  # smoothing statistics and bf16 GEMMs: calibrated once per model and weights
            int8_calibration.ensure(model)
        ctx = cls(layout, shape, key_mask, ws, eager, gemm)
        if gemm == "bf16" and not model.training:
            ctx.add_norm_bf16 = select_add_norm_bf16(hidden.device.type, cfg.hidden_size)
        return ctx

    def gemm_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """What a cpu_gemm GEMM reads for `hidden`: its bf16 copy when the add-and-norm that made
        it wrote one (bf16 inference), else `hidden` itself (cpu_gemm casts where it must)."""
        low = self.low
        return low[1] if low is not None and low[0] is hidden else hidden

    def buffer(self, name: str, rows: int, cols: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        """The workspace buffer `name` as a (rows, cols) tensor, or None without a workspace."""
        ws = self.workspace
        return ws.get(name, rows, cols, like) if ws is not None else None

    def output_buffer(self, name: str, rows: int, cols: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        """buffer() for a layer's output: None in the last layer (what the caller gets is fresh)."""
        return None if self.last else self.buffer(name, rows, cols, like)

    def attention(self, q, k, v, p: float):
        """Self-attention over q, k, v ((total, H, D) packed or (B, S, H, D) padded) in this layout."""
        if self.eager is not None:
            return self.eager.attention_call(q, k, v, self.layout, p)
        if self.layout is not None:  # the layout itself: no per-layer host read
            return ops.attention(q, k, v, cu_seqlens=self.layout, dropout_p=p)
        return ops.attention(q, k, v, self.key_mask, dropout_p=p)


# --------------------------------------------------------------------------------------
# the fused steps the layers share


def embedding_layernorm_rows(input_ids, token_type_ids, position_ids, word_emb, pos_emb, type_emb,
                             norm: nn.LayerNorm, dropout_p: float, ranges_checked: bool):
    """The fused embedding op on the (packed or padded) ids; ranges_checked: the forward's
    read_back checked the ids against their tables already."""
    return embedding_layernorm_prechecked(input_ids, token_type_ids, position_ids, word_emb, pos_emb, type_emb,
                                          norm.weight, norm.bias, norm.eps, dropout_p, ranges_checked=ranges_checked)


def dense_add_norm(hidden, dense: nn.Linear, residual, norm: nn.LayerNorm, dropout_p: float,
                   out: Optional[torch.Tensor] = None, ctx: Optional[ForwardContext] = None):
    """LayerNorm(dropout(dense(hidden)) + residual): the GEMM without its bias, then the bias add,
    dropout, residual add and LayerNorm as one op. `out`: a workspace buffer for the GEMM; inplace,
    because the fresh GEMM output is read by nothing else (used only without autograd). With the
    context's lean path the op's unchecked entry, else the public, checked op. In CPU inference
    (ctx.gemm) the GEMM runs through cpu_gemm; the bias stays in the add-and-norm kernel, which
    reads it in the pass LayerNorm makes anyway. A `dense` that is not a plain Linear is called as
    it is (its output carries its bias)."""
    bias = dense.bias
    if not plain_linear(dense):
        x, bias = dense(hidden), None
    elif ctx is not None and ctx.gemm is not None:
        x = cpu_gemm.linear(ctx.gemm_rows(hidden), (dense.weight,), (dense.bias,), "none", ctx.gemm, out=out)
    else:
        x = linear(hidden, dense.weight, out=out)
    if (ctx is not None and ctx.add_norm_bf16 is not None and dropout_p == 0.0 and x.dtype == torch.bfloat16
            and residual.dtype == torch.float32):
        # bf16 inference: the fp32 result goes where the fp32 GEMM output would have (a workspace
        # buffer, or fresh memory in the last layer), its bf16 copy to the next GEMM
        low_out = ctx.buffer("low", x.shape[0], x.shape[1], x)
        y, low = bias_residual_layernorm_bf16_unchecked(
            ctx.add_norm_bf16, x, bias, residual, norm.weight, norm.bias, norm.eps,
            out if out is not None and out.dtype == torch.float32 else None, low_out)
        ctx.low = (y, low)
        return y
    eager = ctx.eager if ctx is not None else None
    if eager is not None:
        return bias_residual_layernorm_unchecked(eager.bias_residual_layernorm, eager.grad, x, bias, residual,
                                                 norm.weight, norm.bias, norm.eps, dropout_p, inplace=True,
                                                 seed=eager.seed(dropout_p))
    return ops.bias_residual_layernorm(x, bias, residual, norm.weight, norm.bias, norm.eps, dropout_p, inplace=True)


def dense_act(hidden, dense: nn.Linear, act: str, ctx: Optional[ForwardContext] = None):
    """act(dense(hidden)), the FFN's first half: bias and GELU fused after the GEMM (written into the
    workspace's "inter" buffer when there is one); other activations in PyTorch. In CPU inference
    (ctx.gemm) the GEMM runs through cpu_gemm, which folds bias and GELU into it where the chosen
    library's post-op is faster and otherwise finishes with the same fused kernel. A `dense` that
    is not a plain Linear is called as it is, then the activation."""
    if act in FUSED_ACTS and not plain_linear(dense):
        return F.gelu(dense(hidden), approximate=FUSED_ACTS[act])
    if act in FUSED_ACTS:
        out = ctx.buffer("inter", hidden.shape[0], dense.weight.shape[0], hidden) if ctx is not None else None
        if ctx is not None and ctx.gemm is not None and dense.bias is not None:
            approximate, sel = FUSED_ACTS[act], ctx.eager.bias_gelu
            return cpu_gemm.linear(ctx.gemm_rows(hidden), (dense.weight,), (dense.bias,),
                                   "gelu_tanh" if approximate == "tanh" else "gelu", ctx.gemm,
                                   lambda y, b: bias_gelu_unchecked(sel, False, y, b, approximate, inplace=True), out)
        x = linear(hidden, dense.weight, out=out)
        eager = ctx.eager if ctx is not None else None
        if eager is not None:
            return bias_gelu_unchecked(eager.bias_gelu, eager.grad, x, dense.bias, FUSED_ACTS[act], inplace=True)
        return ops.bias_gelu(x, dense.bias, FUSED_ACTS[act], inplace=True)
    return activation_fn(act)(dense(hidden))


def checkpointed_layer(checkpoint, layer: nn.Module, hidden, ctx: ForwardContext):
    """One encoder layer under activation checkpointing: `checkpoint(run, hidden)`
    (torch.utils.checkpoint.checkpoint with its use_reentrant choice bound, or a partial of it)
    keeps only the layer's input and runs the layer again in backward. The layer's dropout seeds
    are drawn once here, so the rerun draws the same masks; it gets a context of its own (no
    workspace: autograd is recording)."""
    eager = ctx.eager
    seeds = None
    if eager is not None and eager.seeds is not None:
        seeds = [next(eager.seeds, None) for _ in range(3)]  # the three dropout calls of a layer

    def run(rows):
        lean = eager if seeds is None else eager._replace(seeds=iter(seeds))
        return layer(rows, ForwardContext(ctx.layout, ctx.shape, ctx.key_mask, None, lean))

    return checkpoint(run, hidden)


# --------------------------------------------------------------------------------------
# the host side of a forward: argument checks and the one read-back


def check_inputs(config: BertConfig, input_ids, attention_mask, token_type_ids, position_ids) -> None:
    """BertModel.forward's argument checks (types, shapes, devices): a clear error naming the argument."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be an integer (int64 or int32) tensor of token ids, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    B, S = input_ids.shape
    if B == 0 or S == 0:
        raise ValueError(f"input_ids must hold at least one token per batch row, got an empty batch of shape {(B, S)}")
    if S > config.max_position_embeddings:
        raise ValueError(f"input_ids has sequence length {S}, longer than max_position_embeddings "
                         f"({config.max_position_embeddings})")
    for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (B, S):
            raise ValueError(f"{name} must have the shape of input_ids {(B, S)}, got {tuple(t.shape)}")
        if t.device != input_ids.device:
            raise ValueError(f"{name} is on {t.device} but input_ids is on {input_ids.device}")
    if token_type_ids is not None and (token_type_ids.dtype.is_floating_point or token_type_ids.dtype == torch.bool):
        raise TypeError(f"token_type_ids must be an integer tensor, got {token_type_ids.dtype}")
    if position_ids is not None:
        if not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point:
            raise TypeError("position_ids must be an integer torch.Tensor")
        if position_ids.shape[-1] != S or position_ids.dim() > 2:
            raise ValueError(f"position_ids must be (seq_len,) or (batch, seq_len) = {(B, S)}, "
                             f"got {tuple(position_ids.shape)}")


def read_back(config: BertConfig, input_ids, attention_mask, token_type_ids, position_ids):
    """The values the forward needs on the host, in one device-to-host transfer: every id range
    (a kernel must never gather outside its table) and, for the packed layout, the number of
    valid tokens and the longest row. On a GPU each read drains the queue of launched kernels,
    so one read per forward instead of one per check (and none per layer).
    Returns (valid tokens, longest row); both are None without a mask."""
    checks = [("input_ids", input_ids, config.vocab_size, "word_emb")]
    if token_type_ids is not None:
        checks.append(("token_type_ids", token_type_ids, config.type_vocab_size, "type_emb"))
    if position_ids is not None:
        checks.append(("position_ids", position_ids, config.max_position_embeddings, "pos_emb"))
    vals = []
    for _, t, _, _ in checks:
        lo, hi = torch.aminmax(t)
        vals += [lo.long(), hi.long()]
    if attention_mask is not None:
        lens = (attention_mask != 0).sum(1)
        vals += [lens.sum(), lens.max()]
    host = torch.stack(vals).tolist()
    for i, (name, _, rows, table) in enumerate(checks):
        err = id_range_error(name, host[2 * i], host[2 * i + 1], rows, table)
        if err is not None:
            raise err
    if attention_mask is None:
        return None, None
    return host[-2], host[-1]


def check_packed(config: BertConfig, input_ids, cu_seqlens, max_seqlen, token_type_ids, position_ids):
    """forward_packed's argument checks; the value checks (id ranges, offsets) in one read-back.
    Returns (flat ids, contiguous cu_seqlens)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be an int64 or int32 tensor of packed token ids, got "
                        f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
    ids = input_ids.reshape(-1)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 \
            or cu_seqlens.numel() < 2:
        raise TypeError(f"cu_seqlens must be an int32 tensor of shape (sequences + 1,), got "
                        f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} "
                        f"{tuple(getattr(cu_seqlens, 'shape', ()))}")
    if cu_seqlens.device != ids.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but input_ids is on {ids.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or not 1 <= max_seqlen:
        raise ValueError(f"max_seqlen must be a positive int (a bound on the longest sequence), got {max_seqlen!r}")
    if ids.numel() == 0:
        raise ValueError("input_ids must hold at least one packed token, got none")
    for name, t in (("token_type_ids", token_type_ids), ("position_ids", position_ids)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.numel() != ids.numel() or t.device != ids.device:
            raise ValueError(f"{name} must hold one id per packed token ({ids.numel()}) on {ids.device}, "
                             f"got shape {tuple(t.shape)} on {t.device}")
    if can_sync():
        read_back(config, ids, None, token_type_ids, position_ids)
        lens = cu_seqlens[1:] - cu_seqlens[:-1]
        first, last, shortest, longest = torch.stack([cu_seqlens[0], cu_seqlens[-1], lens.min(), lens.max()]).tolist()
        if first != 0 or last != ids.numel() or shortest < 0:
            raise ValueError(f"cu_seqlens must rise from 0 to the number of packed tokens ({ids.numel()}), "
                             f"got {first} .. {last}" + (" with a decreasing step" if shortest < 0 else ""))
        if longest > max_seqlen:
            raise ValueError(f"max_seqlen ({max_seqlen}) is shorter than the longest sequence ({longest})")
        if longest > config.max_position_embeddings and position_ids is None:
            raise ValueError(f"a sequence of {longest} tokens is longer than max_position_embeddings "
                             f"({config.max_position_embeddings})")
    return ids, cu_seqlens.contiguous()


# --------------------------------------------------------------------------------------
# packed-layout helpers


def first_tokens(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(n, hidden): the first packed row of each sequence of `cu_seqlens`, zeros for empty ones
    (no host read: a graph can capture it)."""
    n = cu_seqlens.shape[0] - 1
    first = hidden.new_zeros(n, hidden.shape[-1])
    if not hidden.shape[0]:
        return first
    nonempty = cu_seqlens[1:] > cu_seqlens[:-1]
    starts = cu_seqlens[:-1].long().clamp(max=hidden.shape[0] - 1)
    return torch.where(nonempty.unsqueeze(-1), hidden.index_select(0, starts), first)


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int64 (total,) position ids 0, 1, ... restarting at every sequence of `cu_seqlens`."""
    t = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), t, right=True)  # the sequence each token is in
    return t - cu_seqlens.long().clamp(max=total).index_select(0, seq.clamp(max=cu_seqlens.shape[0] - 2))
