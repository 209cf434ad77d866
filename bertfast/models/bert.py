"""BertModel and its heads, built on bertfast.ops, with Hugging Face's module tree and names.

The encoder is padding-free: when the attention mask has padding, the valid tokens are
packed once (only they are embedded), every layer runs on (total_tokens, hidden) rows with
variable-length attention on cu_seqlens computed once per batch, and the outputs are padded
back once at the end (zeros at padded positions). Without padding the same code runs on the
(batch * seq, hidden) rows with cu_seqlens = None (padded-layout attention, no mask).

Why one file of over 500 lines: the encoder and the heads that read it belong together (as in
transformers' modeling_bert.py and FlashAttention's models/bert.py): a head's forward calls into
the encoder's packed layout, and a reader follows it without switching files. Checkpoint I/O is
hub.py, conversion from transformers convert.py.
"""
from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass, fields
from typing import Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import backend, ops
from ..ops._common import can_sync
from ..ops._rng import draw_seeds
from ..ops.attention import attention_route, attention_unchecked, key_padding_bias
from ..ops.bias_gelu import bias_gelu_unchecked
from ..ops.bias_residual_layernorm import bias_residual_layernorm_unchecked
from ..ops.embedding_layernorm import _embedding_layernorm, id_range_error
from ..padding import PackedLayout, clamp_offsets, layout_of, pad_input
from .config import FUSED_ACTS, BertConfig
from .hub import load_pretrained, save_pretrained

_ACTS = {"relu": F.relu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh, "gelu": F.gelu}


class _Workspace:
    """Buffers for the encoder layers' GEMM outputs during CPU inference, kept by the model between
    calls (one set per thread). Each layer writes its fused QKV projection, attention projection,
    intermediate and output GEMMs into them, and the fused ops finish in place, so a forward
    allocates almost nothing: a fresh multi-MB GEMM output costs its page faults on every call
    once glibc has handed freed memory back to the system (MiniLM 8x128: ~2.7k faults per forward,
    a few percent of its time). The last layer writes fresh memory: nothing returned to the
    caller aliases these buffers. Held: one layer's activations (e.g. 13.5 MB for MiniLM at 8 x 128
    tokens), up to BERTFAST_CPU_WORKSPACE_MB (512 by default; larger batches go without);
    `BertModel.release_workspace()` frees them."""

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
_WORKSPACES = threading.local()


def _workspace(model) -> _Workspace:
    table = getattr(_WORKSPACES, "table", None)
    if table is None:
        table = _WORKSPACES.table = weakref.WeakKeyDictionary()
    if model not in table:
        table[model] = _Workspace()
    return table[model]


def _workspace_limit() -> int:
    """Bytes one model may keep per thread for CPU inference buffers: BERTFAST_CPU_WORKSPACE_MB
    (default 512; 0 turns the workspace off). Larger batches allocate per call as before."""
    raw = os.environ.get("BERTFAST_CPU_WORKSPACE_MB", "512")
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"BERTFAST_CPU_WORKSPACE_MB must be a number of megabytes, got {raw!r}") from None
    return int(mb * 2**20)


def _linear(x, weight, bias=None, out: Optional[torch.Tensor] = None):
    """F.linear, or the same product written into `out` (a workspace buffer)."""
    if out is None:
        return F.linear(x, weight, bias)
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def _act(name):
    """The activation named `name` (a callable, e.g. transformers' activation module, is itself)."""
    if callable(name):
        return name
    if name not in _ACTS and name not in FUSED_ACTS:
        raise ValueError(f"hidden_act must be one of {sorted(set(_ACTS) | set(FUSED_ACTS))}, got {name!r}")
    return _ACTS.get(name)


class _Eager(NamedTuple):
    """What one eager encoder forward resolves once for all its layers' op calls (the lean
    path): each op's backend (backend.select, which reads BERTFAST_BACKEND and use_backend, once
    per forward instead of once per call), whether autograd records (torch.is_grad_enabled()),
    the padded layout's key bias, the forward's dropout seeds (one draw from torch's generator
    for all layers, not one per op call) and (memo, filled by the first layer) which attention
    kernel serves the forward's shape. The layers then call the ops' `_unchecked` entry points:
    the inputs were validated at the model boundary, so no per-call argument checks either."""

    grad: bool
    attention: backend.Impl
    bias_residual_layernorm: backend.Impl
    bias_gelu: backend.Impl
    key_bias: Optional[torch.Tensor]
    seeds: Optional[Iterator[int]]
    memo: dict

    @classmethod
    def resolve(cls, device_type: str, key_mask: Optional[torch.Tensor], n_seeds: int = 0) -> "_Eager":
        """n_seeds: how many dropout calls the forward may make (0: none, e.g. in eval mode)."""
        seeds = iter(draw_seeds(n_seeds)) if n_seeds else None
        return cls(torch.is_grad_enabled(), backend.select("attention", device_type),
                   backend.select("bias_residual_layernorm", device_type), backend.select("bias_gelu", device_type),
                   None if key_mask is None else key_padding_bias(key_mask), seeds, {})

    def seed(self, p: float) -> Optional[int]:
        """The next dropout seed of this forward for a call with rate p (None: the op draws one)."""
        return next(self.seeds, None) if p > 0.0 and self.seeds is not None else None

    def attention_call(self, q, k, v, layout: Optional[PackedLayout], p: float):
        """Self-attention of one layer: the public op's routing decided once per forward."""
        route = self.memo.get("route", False)
        if route is False:
            training = self.grad and (q.requires_grad or k.requires_grad or v.requires_grad)
            route = self.memo["route"] = attention_route(q, layout, self.key_bias, p, training)
        return attention_unchecked(self.attention, self.grad, q, k, v, layout, self.key_bias, p, route,
                                   self.seed(p))


# --------------------------------------------------------------------------------------
# outputs: attribute access like HF's ModelOutput, and out[0] / tuple(out) over set fields


class _Output:
    def to_tuple(self):
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, i):
        if isinstance(i, str):
            return getattr(self, i)
        return self.to_tuple()[i]

    def __iter__(self):
        return iter(self.to_tuple())


@dataclass
class BertModelOutput(_Output):
    last_hidden_state: torch.Tensor = None
    pooler_output: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple] = None
    # with return_packed=True: (total_tokens, hidden) rows of the valid tokens and their layout
    packed_hidden_state: Optional[torch.Tensor] = None
    layout: Optional[PackedLayout] = None


@dataclass
class BertForPreTrainingOutput(_Output):
    loss: Optional[torch.Tensor] = None
    prediction_logits: torch.Tensor = None
    seq_relationship_logits: torch.Tensor = None
    hidden_states: Optional[tuple] = None


@dataclass
class MaskedLMOutput(_Output):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None
    hidden_states: Optional[tuple] = None


@dataclass
class SequenceClassifierOutput(_Output):
    loss: Optional[torch.Tensor] = None
    logits: torch.Tensor = None
    hidden_states: Optional[tuple] = None


TokenClassifierOutput = SequenceClassifierOutput
NextSentencePredictorOutput = SequenceClassifierOutput


@dataclass
class QuestionAnsweringOutput(_Output):
    loss: Optional[torch.Tensor] = None
    start_logits: torch.Tensor = None
    end_logits: torch.Tensor = None
    hidden_states: Optional[tuple] = None


# --------------------------------------------------------------------------------------
# modules (HF names: embeddings, encoder.layer.N.attention.self.query, ...)


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout_p = config.hidden_dropout_prob

    def forward(self, input_ids, token_type_ids, position_ids, ranges_checked: bool = False):
        return _embedding_layernorm(
            input_ids, token_type_ids, position_ids, self.word_embeddings.weight, self.position_embeddings.weight,
            self.token_type_embeddings.weight, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps,
            self.dropout_p if self.training else 0.0, ranges_checked=ranges_checked)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def _qkv(self, hidden, out: Optional[torch.Tensor] = None):
        """Q, K and V projections of `hidden` in one (tokens, 3 * hidden) tensor, from the
        parameters as they are now: nothing is cached, so no write to them (optimizer steps,
        `.data` writes, loaders) can leave a stale copy behind. With autograd or under
        torch.compile: one GEMM on the concatenated weights (autograd differentiates the cat);
        otherwise three GEMMs into the column blocks of one output (BLAS writes strided rows), which
        costs no concatenation of the weights per call."""
        lins = (self.query, self.key, self.value)
        ps = [p for lin in lins for p in (lin.weight, lin.bias)]
        if (torch.compiler.is_compiling() or torch.is_autocast_enabled(hidden.device.type)
                or (torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in ps)))
                or any(p.dtype != hidden.dtype for p in ps)):
            w = torch.cat([lin.weight for lin in lins])
            return _linear(hidden, w, torch.cat([lin.bias for lin in lins]), out)
        n = self.query.weight.shape[0]
        if out is None:
            out = hidden.new_empty((hidden.shape[0], 3 * n))
        for i, lin in enumerate(lins):
            torch.addmm(lin.bias, hidden, lin.weight.t(), out=out[:, i * n:(i + 1) * n])
        return out

    def forward(self, hidden, layout: Optional[PackedLayout], shape, key_mask=None, ws: Optional[_Workspace] = None,
                eager: Optional[_Eager] = None):
        """hidden: (tokens, hidden) rows; packed varlen when `layout` is given, else the
        (batch, seq) = `shape` rows of a padded batch with an optional (batch, seq) key mask.
        `eager`: the forward's resolved lean path (None: the public, checked op)."""
        qkv = self._qkv(hidden, ws.get("qkv", hidden.shape[0], 3 * self.query.weight.shape[0], hidden) if ws else None)
        H, D = self.num_attention_heads, self.attention_head_size
        p = self.dropout_p if self.training else 0.0
        if layout is not None:  # packed rows (total, 3 * hidden)
            q, k, v = qkv.view(-1, 3, H, D).unbind(1)
            if eager is not None:
                ctx = eager.attention_call(q, k, v, layout, p)
            else:
                ctx = ops.attention(q, k, v, cu_seqlens=layout, dropout_p=p)  # the layout: no per-layer host read
            return ctx.reshape(-1, H * D)
        B, S = shape
        q, k, v = qkv.view(B, S, 3, H, D).unbind(2)
        if eager is not None:
            return eager.attention_call(q, k, v, None, p).reshape(B * S, H * D)
        return ops.attention(q, k, v, key_mask, dropout_p=p).reshape(B * S, H * D)


def dense_add_norm(hidden, dense: nn.Linear, residual, norm: nn.LayerNorm, dropout_p: float,
                   out: Optional[torch.Tensor] = None, eager: Optional[_Eager] = None):
    """LayerNorm(dropout(dense(hidden)) + residual): the GEMM without its bias, then the bias add,
    dropout, residual add and LayerNorm as one op. `out`: a workspace buffer for the GEMM; inplace,
    because the fresh GEMM output is read by nothing else (used only without autograd). `eager`:
    the forward's lean path (None: the public, checked op)."""
    x = _linear(hidden, dense.weight, out=out)
    if eager is not None:
        return bias_residual_layernorm_unchecked(eager.bias_residual_layernorm, eager.grad, x, dense.bias, residual,
                                                 norm.weight, norm.bias, norm.eps, dropout_p, inplace=True,
                                                 seed=eager.seed(dropout_p))
    return ops.bias_residual_layernorm(x, dense.bias, residual, norm.weight, norm.bias, norm.eps, dropout_p,
                                       inplace=True)


def dense_act(hidden, dense: nn.Linear, act: str, ws: Optional[_Workspace] = None, eager: Optional[_Eager] = None):
    """act(dense(hidden)), the FFN's first half: bias and GELU fused after the GEMM (written into the
    workspace's "inter" buffer when given); other activations in PyTorch."""
    if act in FUSED_ACTS:
        out = ws.get("inter", hidden.shape[0], dense.weight.shape[0], hidden) if ws else None
        x = _linear(hidden, dense.weight, out=out)
        if eager is not None:
            return bias_gelu_unchecked(eager.bias_gelu, eager.grad, x, dense.bias, FUSED_ACTS[act], inplace=True)
        return ops.bias_gelu(x, dense.bias, FUSED_ACTS[act], inplace=True)
    return _act(act)(dense(hidden))


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout_p = config.hidden_dropout_prob

    def forward(self, hidden, residual, out: Optional[torch.Tensor] = None, eager: Optional[_Eager] = None):
        return dense_add_norm(hidden, self.dense, residual, self.LayerNorm, self.dropout_p if self.training else 0.0,
                              out, eager)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden, layout, shape, key_mask=None, ws: Optional[_Workspace] = None,
                eager: Optional[_Eager] = None):
        out = ws.get("attn", hidden.shape[0], self.output.dense.weight.shape[0], hidden) if ws else None
        return self.output(self.self(hidden, layout, shape, key_mask, ws, eager), hidden, out, eager)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = config.hidden_act
        _act(config.hidden_act)  # an unknown name fails here, not in the first forward

    def forward(self, hidden, ws: Optional[_Workspace] = None, eager: Optional[_Eager] = None):
        return dense_act(hidden, self.dense, self.act, ws, eager)


class BertOutput(BertSelfOutput):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden, layout, shape, key_mask=None, ws: Optional[_Workspace] = None, last: bool = True,
                eager: Optional[_Eager] = None):
        """`ws`: CPU inference buffers for the GEMM outputs (see _Workspace); the output of the
        `last` layer is fresh memory, any other layer's lives in `ws` until the next layer's.
        `eager`: the lean path BertModel.forward resolved (None: the public, checked ops)."""
        attn = self.attention(hidden, layout, shape, key_mask, ws, eager)
        out = ws.get("out", hidden.shape[0], self.output.dense.weight.shape[0], hidden) if ws and not last else None
        return self.output(self.intermediate(attn, ws, eager), attn, out, eager)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, first_token):
        return torch.tanh(self.dense(first_token))


# --------------------------------------------------------------------------------------
# pretrained-model plumbing shared by BertModel and the heads


class BertPreTrainedModel(nn.Module):
    config_class = BertConfig
    base_model_prefix = "bert"  # the encoder's attribute in every head (HF's name)
    # state-dict keys that share another parameter (tie_weights): not saved, not missing when absent
    tied_weight_keys = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
    # pre-training heads a checkpoint may carry that a model without them drops silently, as HF does
    pretraining_heads = ("cls",)

    def __init__(self, config: BertConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    def init_weights(self):
        """HF's initialisation: normal(0, initializer_range) weights, zero biases, LayerNorm 1/0."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
                if m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, BertLMPredictionHead):
                nn.init.zeros_(m.bias)
        self.tie_weights()

    def tie_weights(self):
        """Share the MLM decoder with the word embeddings (and its bias with the head's)."""
        head = getattr(getattr(self, "cls", None), "predictions", None)
        if isinstance(head, BertLMPredictionHead):
            head.decoder.weight = self.bert.embeddings.word_embeddings.weight
            head.decoder.bias = head.bias

    @classmethod
    def from_pretrained(cls, folder: str, config: Optional[BertConfig] = None, **kwargs):
        return load_pretrained(cls, folder, config=config, **kwargs)

    def save_pretrained(self, folder: str, tokenizer=None) -> None:
        """config.json + model.safetensors, and the tokenizer's files when one is given (the
        command line and from_pretrained users need both in one folder)."""
        save_pretrained(self, folder, tokenizer=tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def _check_inputs(config: BertConfig, input_ids, attention_mask, token_type_ids, position_ids):
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


def _read_back(config: BertConfig, input_ids, attention_mask, token_type_ids, position_ids):
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


class BertModel(BertPreTrainedModel):
    """BERT encoder: embeddings -> layers -> pooler, Hugging Face's BertModel interface."""

    embeddings_class = BertEmbeddings  # a family member's own embeddings (RoBERTa's, ELECTRA's)

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = self.embeddings_class(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        # padding-free execution when the mask has padding; False runs the padded layout with a
        # key mask (what torch.compile gets: static shapes), kept for comparisons
        self.unpad = True
        self.init_weights()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def release_workspace(self) -> None:
        """Frees the calling thread's CPU inference buffers (one layer's GEMM outputs at the
        largest batch seen); the next inference call allocates them again."""
        table = getattr(_WORKSPACES, "table", None)
        if table is not None:
            table.pop(self, None)

    def _embed(self, input_ids, token_type_ids, position_ids, ranges_checked: bool):
        """The encoder's input rows from the (packed or padded) ids; a family member whose
        embeddings differ (ELECTRA's projection to the hidden width) overrides this."""
        return self.embeddings(input_ids, token_type_ids, position_ids, ranges_checked)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states: bool = False, return_packed: bool = False,
                return_dict: bool = True) -> BertModelOutput:
        """input_ids (batch, seq) -> BertModelOutput(last_hidden_state (batch, seq, hidden),
        pooler_output, hidden_states). Padded positions of every output are zeros.
        return_packed=True also returns the valid tokens' rows (total, hidden) and the layout,
        for heads that only need valid tokens."""
        cfg = self.config
        _check_inputs(cfg, input_ids, attention_mask, token_type_ids, position_ids)
        B, S = input_ids.shape
        user_tt, user_pos = token_type_ids, position_ids
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device, dtype=input_ids.dtype).expand(B, S)
        else:
            position_ids = position_ids.expand(B, S)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        layout, key_mask = None, None
        checked = can_sync()
        if checked:  # eager: everything the host must know, read back at once
            total, max_len = _read_back(cfg, input_ids, attention_mask if self.unpad else None, user_tt, user_pos)
            if attention_mask is not None:
                if not self.unpad:
                    key_mask = attention_mask  # the padded layout, kept for comparisons
                elif total < B * S:
                    # once per batch, shared by every layer; the counts come from this very mask
                    keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
                    layout = layout_of(keep, total, max_len)
        elif attention_mask is not None:
            # torch.compile / CUDA-graph capture: static shapes, the padded layout with a key mask
            key_mask = attention_mask
        if layout is not None:  # only valid tokens are embedded
            idx = layout.indices
            hidden = self._embed(input_ids.reshape(-1)[idx], token_type_ids.reshape(-1)[idx],
                                 position_ids.reshape(-1)[idx], checked)
        else:
            hidden = self._embed(input_ids, token_type_ids, position_ids, checked).reshape(B * S, -1)
        hidden, all_hidden = self._layers(hidden, layout, (B, S), key_mask, output_hidden_states)

        def padded(rows):
            if layout is not None:
                return pad_input(rows, layout.indices, B, S)
            rows = rows.view(B, S, -1)
            if key_mask is not None:  # padded positions are zeros in every layout
                rows = rows * (key_mask != 0).unsqueeze(-1).to(rows.dtype)
            return rows

        last = padded(hidden)
        if key_mask is not None:  # the first valid token of each row (position 0 under right padding)
            first = last.gather(1, (key_mask != 0).int().argmax(1).view(B, 1, 1).expand(B, 1, last.shape[-1]))[:, 0]
        elif layout is None:
            first = last[:, 0]  # no padding: HF's pooler input, position 0
        else:  # the first valid token of each row ([CLS] also under left padding); zeros for empty rows
            first = first_tokens(hidden, layout.cu_seqlens)
        out = BertModelOutput(
            last_hidden_state=last,
            pooler_output=self.pooler(first) if self.pooler is not None else None,
            hidden_states=tuple(padded(h) for h in all_hidden) if all_hidden is not None else None,
            packed_hidden_state=hidden if return_packed else None,
            layout=layout if return_packed else None,
        )
        return out if return_dict else out.to_tuple()

    def _layers(self, hidden, layout: Optional[PackedLayout], shape, key_mask, output_hidden_states: bool):
        """The encoder layers over (tokens, hidden) rows -> (last rows, every layer's rows or None)."""
        cfg = self.config
        all_hidden = [hidden] if output_hidden_states else None
        # CPU inference: GEMM outputs go to buffers reused across layers and calls (not when every
        # layer's output is returned)
        ws = None
        # (not while torch.compile traces: the buffers are Python state, and the fused ops do not
        # write in place there)
        if (hidden.device.type == "cpu" and not torch.is_grad_enabled() and all_hidden is None
                and not torch.compiler.is_compiling()):
            need = hidden.shape[0] * (5 * cfg.hidden_size + cfg.intermediate_size) * hidden.element_size()
            if need <= _workspace_limit():  # an occasional huge batch is not kept for the process' life
                ws = _workspace(self)
        # eager: the inputs were validated at the model boundary, so the layers take the ops'
        # unchecked paths with backends resolved once here; torch.compile and CUDA-graph capture
        # trace the public ops (the custom ops), and so does an empty batch (no valid token: the
        # public ops' empty-input handling)
        eager = None
        if hidden.shape[0] and can_sync():
            # dropout calls per layer: attention probabilities and the two add-and-norms
            eager = _Eager.resolve(hidden.device.type, key_mask, 3 * len(self.encoder.layer) if self.training else 0)
        n = len(self.encoder.layer)
        for i, layer in enumerate(self.encoder.layer):
            hidden = layer(hidden, layout, shape, key_mask, ws, last=i == n - 1, eager=eager)
            if all_hidden is not None:
                all_hidden.append(hidden)
        return hidden, all_hidden

    def default_position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The (batch, seq) position ids forward uses when none are given: the column index, also
        under left padding, as Hugging Face's BertModel. (CUDA-graph serving gathers them.)"""
        B, S = input_ids.shape
        return torch.arange(S, device=input_ids.device, dtype=input_ids.dtype).expand(B, S)

    def forward_packed(self, input_ids, cu_seqlens, max_seqlen: int, token_type_ids=None, position_ids=None,
                       output_hidden_states: bool = False, pool: bool = True) -> BertModelOutput:
        """Sequences already packed: input_ids (total,) holds them one after the other, int32
        cu_seqlens (n + 1,) marks where each starts (zero-length sequences allowed), max_seqlen is
        any host int >= the longest one (a fixed bound is fine: the attention kernels' grids follow
        it, their results do not). position_ids default to 0, 1, ... restarting at every sequence.

        Returns BertModelOutput(last_hidden_state (total, hidden) packed rows, pooler_output (n, hidden)
        from each sequence's first token (zeros for empty ones), hidden_states packed too). Nothing
        depends on host values of the inputs, so a CUDA graph can capture it; eager calls check the
        ids and the offsets with one read-back. pool=False skips the pooler."""
        ids, cu = _check_packed(self.config, input_ids, cu_seqlens, max_seqlen, token_type_ids, position_ids)
        total, n = ids.shape[0], cu.shape[0] - 1
        if position_ids is None:
            position_ids = packed_positions(cu, total)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(ids)
        # the packed tokens are one row of `total`: indices are their flat positions in it. Eager
        # calls checked the offsets above; where nothing can be read back (a CUDA graph replays
        # whatever offsets its buffers hold) they are clamped into the tokens on the device
        if not can_sync():
            cu = clamp_offsets(cu, total, int(max_seqlen))
        layout = PackedLayout._trusted(torch.arange(total, device=ids.device), cu, int(max_seqlen), n, total)
        hidden = self._embed(ids, token_type_ids.reshape(-1), position_ids.reshape(-1), can_sync())
        hidden, all_hidden = self._layers(hidden, layout, (1, total), None, output_hidden_states)
        pooled = self.pooler(first_tokens(hidden, cu)) if self.pooler is not None and pool else None
        return BertModelOutput(last_hidden_state=hidden, pooler_output=pooled,
                               hidden_states=tuple(all_hidden) if all_hidden is not None else None,
                               packed_hidden_state=hidden, layout=layout)


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


def _check_packed(config: BertConfig, input_ids, cu_seqlens, max_seqlen, token_type_ids, position_ids):
    """forward_packed's argument checks; the value checks (id ranges, offsets) in one read-back."""
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
        _read_back(config, ids, None, token_type_ids, position_ids)
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
# heads


def dense_act_layernorm(hidden, dense: nn.Linear, act: str, norm: nn.LayerNorm):
    """LayerNorm(act(dense(hidden))), the MLM heads' transform: one fused op after the GEMM for GELU."""
    if act in FUSED_ACTS:
        return ops.gelu_layernorm(F.linear(hidden, dense.weight), dense.bias, norm.weight, norm.bias, norm.eps,
                                  FUSED_ACTS[act])
    return norm(_act(act)(dense(hidden)))


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = config.hidden_act
        _act(config.hidden_act)

    def forward(self, hidden):
        return dense_act_layernorm(hidden, self.dense, self.act, self.LayerNorm)


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, hidden):
        return self.decoder(self.transform(hidden))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, hidden):
        return self.predictions(hidden)


class BertOnlyNSPHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, pooled):
        return self.seq_relationship(pooled)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


def _valid_labels(labels: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor]):
    """Token labels with padded positions set to the ignore index (-100): a label on a padded
    position would make a row's loss depend on how much padding its batch has."""
    if labels is None or attention_mask is None or tuple(labels.shape) != tuple(attention_mask.shape):
        return labels
    return labels.masked_fill(attention_mask == 0, -100)


def _mlm_logits(predict, out: BertModelOutput, labels: Optional[torch.Tensor], sparse: bool):
    """Vocabulary logits. With sparse=True and labels, only the labelled positions are projected
    (total_labelled, vocab): the decoder GEMM is most of an MLM step and ~85% of positions carry
    no label."""
    if sparse and labels is not None:
        sel = (labels.reshape(-1) != -100).nonzero().squeeze(-1)
        rows = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1]).index_select(0, sel)
        return predict(rows), labels.reshape(-1).index_select(0, sel)
    return predict(out.last_hidden_state), labels


class BertForPreTraining(BertPreTrainedModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                next_sentence_label=None, output_hidden_states=False, sparse_prediction=False, cu_seqlens=None,
                masked_positions=None, masked_labels=None):
        """HF's BertForPreTraining forward; with cu_seqlens (a packed batch of
        bertfast.data.pack_pretraining: no attention_mask) it is forward_packed's, with max_seqlen
        the row width (so DDP, which only wraps forward, serves packed batches too)."""
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError("attention_mask must be None with cu_seqlens (packed pairs carry no padding)")
            return self.forward_packed(input_ids, cu_seqlens, int(input_ids.shape[-1]), token_type_ids, position_ids,
                                       masked_positions, masked_labels, labels, next_sentence_label)
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits, lab = _mlm_logits(self.cls.predictions, out, _valid_labels(labels, attention_mask), sparse_prediction)
        nsp = self.cls.seq_relationship(out.pooler_output)
        loss = None
        if labels is not None and next_sentence_label is not None:
            loss = (F.cross_entropy(logits.reshape(-1, self.config.vocab_size).float(), lab.reshape(-1))
                    + F.cross_entropy(nsp.reshape(-1, 2).float(), next_sentence_label.reshape(-1)))
        return BertForPreTrainingOutput(loss, logits, nsp, out.hidden_states)

    def forward_packed(self, input_ids, cu_seqlens, max_seqlen: int, token_type_ids=None, position_ids=None,
                       masked_positions=None, masked_labels=None, labels=None, next_sentence_label=None):
        """Packed pre-training (several NSP pairs per row of a fixed token budget): input_ids
        (total,) or (rows, budget) flattened, int32 cu_seqlens over the flat tokens with one
        sequence per pair (filler and zero-length sequences allowed), position_ids restarting per
        pair (the default). NSP logits are read at each sequence's first token ([CLS]):
        seq_relationship_logits (n, 2), next_sentence_label (n,) with -100 for sequences that are
        not pairs. MLM: either masked_positions (m,) flat token indices with masked_labels (m,)
        (-100 on padding entries: a fixed m keeps every shape static, for CUDA graphs), or labels
        with one entry per token (-100 where not masked; every position is projected).
        loss = mean MLM cross entropy over the labelled tokens + mean NSP cross entropy over the
        labelled sequences: the loss of the same pairs run unpacked."""
        ids = input_ids.reshape(-1)
        out = self.bert.forward_packed(ids, cu_seqlens, max_seqlen, token_type_ids, position_ids)
        hidden = out.last_hidden_state
        if masked_positions is not None:
            if masked_labels is None or masked_labels.shape != masked_positions.shape:
                raise ValueError("masked_labels must be given with masked_positions, one label per position")
            logits, lab = self.cls.predictions(hidden.index_select(0, masked_positions.reshape(-1))), masked_labels
        else:
            logits, lab = self.cls.predictions(hidden), labels
        nsp = self.cls.seq_relationship(out.pooler_output)
        loss = None
        if lab is not None and next_sentence_label is not None:
            loss = (F.cross_entropy(logits.float(), lab.reshape(-1))
                    + F.cross_entropy(nsp.float(), next_sentence_label.reshape(-1)))
        return BertForPreTrainingOutput(loss, logits, nsp, out.hidden_states)


class BertForMaskedLM(BertPreTrainedModel):
    # a pre-training checkpoint's pooler and NSP head are expected to go unused (HF drops them silently too)
    _keys_to_ignore_on_load_unexpected = ("bert.pooler.", "cls.seq_relationship.")

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False, sparse_prediction=False):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits, lab = _mlm_logits(self.cls.predictions, out, _valid_labels(labels, attention_mask), sparse_prediction)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, self.config.vocab_size).float(), lab.reshape(-1))
        return MaskedLMOutput(loss, logits, out.hidden_states)


class BertForNextSentencePrediction(BertPreTrainedModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertOnlyNSPHead(config)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits = self.cls(out.pooler_output)
        loss = None if labels is None else F.cross_entropy(logits.reshape(-1, 2).float(), labels.reshape(-1))
        return SequenceClassifierOutput(loss, logits, out.hidden_states)


def _checked_labels(name: str, labels: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """Flat class labels, each in [0, n) or the ignore index -100; a clear error otherwise (a GPU
    cross entropy would only hit a device-side assert)."""
    lab = labels.reshape(-1)
    if can_sync():
        bad = (lab != -100) & ((lab < 0) | (lab >= n))
        if bool(bad.any()):
            raise ValueError(f"{name} must be in [0, {n}) ({what}) or -100, got {lab[bad][0].item()}")
    return lab


def _classifier_dropout(config: BertConfig) -> float:
    return config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob


def sequence_classification_loss(config: BertConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's loss of a sequence classifier: config.problem_type, else regression (MSE) for one label,
    single-label cross entropy for integer labels, multi-label BCE with logits otherwise."""
    num_labels = config.num_labels
    problem = config.problem_type
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        return F.mse_loss(logits.squeeze().float(), labels.squeeze().float()) if num_labels == 1 \
            else F.mse_loss(logits.float(), labels.float())
    if problem == "single_label_classification":
        lab = _checked_labels("labels", labels, num_labels, "num_labels")
        return F.cross_entropy(logits.reshape(-1, num_labels).float(), lab)
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    raise ValueError(f"config.problem_type must be regression, single_label_classification or "
                     f"multi_label_classification, got {problem!r}")


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor, num_labels: int,
                              attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross entropy over the labelled tokens; labels on padding are ignored (_valid_labels)."""
    lab = _checked_labels("labels", _valid_labels(labels, attention_mask), num_labels, "num_labels")
    return F.cross_entropy(logits.reshape(-1, num_labels).float(), lab)


def _span_labels(positions: torch.Tensor, padded: Optional[torch.Tensor], S: int) -> torch.Tensor:
    """Start or end positions (batch,) clamped to [0, S] as HF does, S (the ignore index) also for a
    position on padding: such a label would point at a token that is not there."""
    pos = positions.reshape(-1).clamp(0, S)
    if padded is None:
        return pos
    on_pad = padded.gather(1, pos.clamp(max=S - 1).view(-1, 1)).view(-1)
    return pos.masked_fill(on_pad, S)


def span_outputs(logits: torch.Tensor, attention_mask=None, start_positions=None, end_positions=None):
    """(start_logits, end_logits, loss) of an extractive-QA head from its (batch, seq, 2) logits.
    Padded positions never compete for the span, in the loss or in an argmax: their logits are the
    dtype's lowest value and a label on padding is ignored. The loss (mean of the start and end
    cross entropies) only when both positions are given."""
    start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
    padded = None if attention_mask is None else attention_mask == 0
    if padded is not None:
        lowest = torch.finfo(start_logits.dtype).min
        start_logits, end_logits = start_logits.masked_fill(padded, lowest), end_logits.masked_fill(padded, lowest)
    loss = None
    if start_positions is not None and end_positions is not None:
        S = start_logits.size(1)  # positions outside the sequence, or on padding, are ignored
        sp, ep = (_span_labels(p, padded, S) for p in (start_positions, end_positions))
        loss = (F.cross_entropy(start_logits.float(), sp, ignore_index=S)
                + F.cross_entropy(end_logits.float(), ep, ignore_index=S)) / 2
    return start_logits, end_logits, loss


class BertForSequenceClassification(BertPreTrainedModel):
    """Sentence (or sentence-pair) classification on the pooled [CLS]: single-label (cross
    entropy), multi-label (BCE with logits) or regression (MSE), chosen as HF does from
    config.problem_type, else from num_labels and the labels' dtype."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits = self.classifier(self.dropout(out.pooler_output))
        loss = None if labels is None else sequence_classification_loss(self.config, logits, labels)
        return SequenceClassifierOutput(loss, logits, out.hidden_states)


class BertForTokenClassification(BertPreTrainedModel):
    """Token labels from a linear layer over each token (HF's head), or, with config.use_crf,
    a linear-chain CRF over those scores: the loss is then the CRF's negative log-likelihood of
    the labelled positions of each row (labels != -100, e.g. the first piece of each word), and
    `decode` gives the Viterbi tags (config.crf_constraints = "bio": never an invalid BIO
    transition)."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.crf = None
        if getattr(config, "use_crf", False):
            from .crf import CRF, bio_constraints

            kind = getattr(config, "crf_constraints", None)
            if kind not in (None, "bio"):
                raise ValueError(f"BertConfig.crf_constraints must be None or 'bio', got {kind!r}")
            if kind == "bio" and not config.id2label:
                raise ValueError("BertConfig.crf_constraints='bio' needs config.id2label (the BIO label names)")
            self.crf = CRF(config.num_labels, bio_constraints(config.id2label) if kind == "bio" else None)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states=False):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None and self.crf is not None:
            lab = _checked_labels("labels", _valid_labels(labels, attention_mask), self.num_labels, "num_labels")
            lab = lab.view(labels.shape)
            loss = self.crf.nll(logits, lab.clamp_min(0), lab != -100)
        elif labels is not None:
            loss = token_classification_loss(logits, labels, self.num_labels, attention_mask)
        return TokenClassifierOutput(loss, logits, out.hidden_states)

    def decode(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, S) tag ids at the positions `mask` marks (-100 elsewhere): Viterbi with a CRF,
        else the argmax of each position."""
        if self.crf is not None:
            return self.crf.decode(logits, mask)
        return logits.argmax(-1).masked_fill(~mask.bool(), -100)



class BertForQuestionAnswering(BertPreTrainedModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, start_positions=None,
                end_positions=None, output_hidden_states=False):
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        start_logits, end_logits, loss = span_outputs(self.qa_outputs(out.last_hidden_state), attention_mask,
                                                      start_positions, end_positions)
        return QuestionAnsweringOutput(loss, start_logits, end_logits, out.hidden_states)


HEADS = {cls.__name__: cls for cls in (BertModel, BertForPreTraining, BertForMaskedLM, BertForNextSentencePrediction,
                                       BertForSequenceClassification, BertForTokenClassification,
                                       BertForQuestionAnswering)}
