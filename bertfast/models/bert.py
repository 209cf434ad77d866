"""BertModel and the module tree it is built from, on bertfast.ops, with Hugging Face's names.

The encoder is padding-free: when the attention mask has padding, the valid tokens are
packed once (only they are embedded), every layer runs on (total_tokens, hidden) rows with
variable-length attention on cu_seqlens computed once per batch, and the outputs are padded
back once at the end (zeros at padded positions). Without padding the same code runs on the
(batch * seq, hidden) rows with cu_seqlens = None (padded-layout attention, no mask).

Every layer takes the rows and one ForwardContext (_engine.py: the layout, the CPU workspace, the
backends resolved once per forward). The heads and their losses are heads.py, the output classes
outputs.py, checkpoint I/O hub.py, conversion from transformers convert.py.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..padding import PackedLayout, clamp_offsets, layout_of, packed_layout, pad_input
from ._engine import (ForwardContext, activation_fn, can_sync, check_inputs, check_packed, checkpointed_layer, dense_act,
                      dense_add_norm, embedding_layernorm_rows, first_tokens, linear, packed_positions, packed_qkv,
                      plain_linear, read_back, release_workspace)
from .config import BertConfig
from .hub import load_pretrained, save_pretrained
from .outputs import BertModelOutput

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
        return embedding_layernorm_rows(
            input_ids, token_type_ids, position_ids, self.word_embeddings.weight, self.position_embeddings.weight,
            self.token_type_embeddings.weight, self.LayerNorm, self.dropout_p if self.training else 0.0,
            ranges_checked)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def _qkv(self, hidden, out: Optional[torch.Tensor] = None, ctx: Optional[ForwardContext] = None):
        """Q, K and V projections of `hidden` in one (tokens, 3 * hidden) tensor, from the
        parameters as they are now: nothing is cached, so no write to them (optimizer steps,
        `.data` writes, loaders) can leave a stale copy behind. With autograd or under
        torch.compile: one GEMM on the concatenated weights (autograd differentiates the cat);
        otherwise three GEMMs into the column blocks of one output (BLAS writes strided rows), which
        costs no concatenation of the weights per call. In CPU inference (ctx.gemm): one GEMM on the
        three weights packed together once by dispatch/cpu_gemm (repacked when one changes)."""
        lins = (self.query, self.key, self.value)
        if not all(map(plain_linear, lins)):  # columns [q | k | v], as the concatenated weights give
            return torch.cat([lin(hidden) for lin in lins], dim=-1)
        if ctx is not None and ctx.gemm is not None and all(lin.bias is not None for lin in lins):
            return packed_qkv(hidden, lins, ctx, out)
        ps = [p for lin in lins for p in (lin.weight, lin.bias)]
        if (torch.compiler.is_compiling() or torch.is_autocast_enabled(hidden.device.type)
                or (torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in ps)))
                or any(p.dtype != hidden.dtype for p in ps)):
            w = torch.cat([lin.weight for lin in lins])
            return linear(hidden, w, torch.cat([lin.bias for lin in lins]), out)
        n = self.query.weight.shape[0]
        if out is None:
            out = hidden.new_empty((hidden.shape[0], 3 * n))
        for i, lin in enumerate(lins):
            torch.addmm(lin.bias, hidden, lin.weight.t(), out=out[:, i * n:(i + 1) * n])
        return out

    def forward(self, hidden, ctx: ForwardContext):
        """hidden: (tokens, hidden) rows; packed varlen when ctx.layout is given, else the
        (batch, seq) = ctx.shape rows of a padded batch with an optional key mask."""
        qkv = self._qkv(hidden, ctx.buffer("qkv", hidden.shape[0], 3 * self.num_attention_heads * self.attention_head_size,
                                           hidden), ctx)
        H, D = self.num_attention_heads, self.attention_head_size
        p = self.dropout_p if self.training else 0.0
        if ctx.layout is not None:  # packed rows (total, 3 * hidden)
            q, k, v = qkv.view(-1, 3, H, D).unbind(1)
            return ctx.attention(q, k, v, p).reshape(-1, H * D)
        B, S = ctx.shape
        q, k, v = qkv.view(B, S, 3, H, D).unbind(2)
        return ctx.attention(q, k, v, p).reshape(B * S, H * D)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout_p = config.hidden_dropout_prob

    def forward(self, hidden, residual, out: Optional[torch.Tensor] = None, ctx: Optional[ForwardContext] = None):
        """`out`: a workspace buffer for the GEMM (None: fresh memory)."""
        return dense_add_norm(hidden, self.dense, residual, self.LayerNorm, self.dropout_p if self.training else 0.0,
                              out, ctx)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden, ctx: ForwardContext):
        out = ctx.buffer("attn", hidden.shape[0], hidden.shape[1], hidden)
        return self.output(self.self(hidden, ctx), hidden, out, ctx)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = config.hidden_act
        activation_fn(config.hidden_act)  # an unknown name fails here, not in the first forward

    def forward(self, hidden, ctx: Optional[ForwardContext] = None):
        return dense_act(hidden, self.dense, self.act, ctx)


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

    def forward(self, hidden, ctx: ForwardContext):
        """(tokens, hidden) rows -> the layer's output rows. The output of the last layer
        (ctx.last) is fresh memory; any other layer's may live in the CPU workspace until the
        next layer's."""
        attn = self.attention(hidden, ctx)
        out = ctx.output_buffer("out", hidden.shape[0], hidden.shape[1], hidden)
        return self.output(self.intermediate(attn, ctx), attn, out, ctx)


class BertEncoder(nn.Module):
    """The layers. A layer whose `checkpoint` attribute holds a function `checkpoint(run, hidden)`
    (torch.utils.checkpoint.checkpoint or a partial of it) runs under it while training with
    autograd: activation checkpointing per layer (bertfast.accelerate sets there what transformers'
    gradient_checkpointing_enable chose for each of its layers)."""

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
        self.tie_weights()

    def set_inference_precision(self, precision: str = "fp32"):
        """The precision of the encoder's GEMMs in CPU inference (no_grad / inference_mode):
        "fp32" (default), "bf16" (AVX512-BF16 / AMX GEMMs on bf16 weights packed once; LayerNorm
        statistics and the residual stream stay fp32) or "int8" (dynamic quantisation: int8
        weights with one scale per output channel, activations quantised per GEMM; VNNI).
        Training, autograd, GPUs and torch.compile always run the fp32 parameters as they are.
        Refuses a precision this CPU has no instructions for. Returns the model."""
        from .precision import set_inference_precision

        return set_inference_precision(self, precision)

    def tie_weights(self):
        """Share the parameters a model ties (none here; the MLM heads tie their decoder to the word
        embeddings: heads.py)."""

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
        release_workspace(self)

    def embed_tokens(self, input_ids, token_type_ids, position_ids, ranges_checked: bool):
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
        check_inputs(cfg, input_ids, attention_mask, token_type_ids, position_ids)
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
            total, max_len = read_back(cfg, input_ids, attention_mask if self.unpad else None, user_tt, user_pos)
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
            hidden = self.embed_tokens(input_ids.reshape(-1)[idx], token_type_ids.reshape(-1)[idx],
                                 position_ids.reshape(-1)[idx], checked)
        else:
            hidden = self.embed_tokens(input_ids, token_type_ids, position_ids, checked).reshape(B * S, -1)
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
        """The encoder layers over (tokens, hidden) rows -> (last rows, every layer's rows or None).
        layout: the packed layout, or None for the (batch, seq) = shape rows of a padded batch
        with an optional key mask. One ForwardContext serves every layer."""
        all_hidden = [hidden] if output_hidden_states else None
        ctx = ForwardContext.begin(self, hidden, layout, shape, key_mask, keep_hidden=all_hidden is not None)
        n = len(self.encoder.layer)
        recording = self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.encoder.layer):
            ctx.last = i == n - 1
            checkpoint = layer.__dict__.get("checkpoint") if recording else None
            hidden = layer(hidden, ctx) if checkpoint is None else checkpointed_layer(checkpoint, layer, hidden, ctx)
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
        ids, cu = check_packed(self.config, input_ids, cu_seqlens, max_seqlen, token_type_ids, position_ids)
        total = ids.shape[0]
        if position_ids is None:
            position_ids = packed_positions(cu, total)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(ids)
        # the packed tokens are one row of `total`: indices are their flat positions in it. Eager
        # calls checked the offsets above; where nothing can be read back (a CUDA graph replays
        # whatever offsets its buffers hold) they are clamped into the tokens on the device
        if not can_sync():
            cu = clamp_offsets(cu, total, int(max_seqlen))
        layout = packed_layout(cu, total, int(max_seqlen))
        hidden = self.embed_tokens(ids, token_type_ids.reshape(-1), position_ids.reshape(-1), can_sync())
        hidden, all_hidden = self._layers(hidden, layout, (1, total), None, output_hidden_states)
        pooled = self.pooler(first_tokens(hidden, cu)) if self.pooler is not None and pool else None
        return BertModelOutput(last_hidden_state=hidden, pooler_output=pooled,
                               hidden_states=tuple(all_hidden) if all_hidden is not None else None,
                               packed_hidden_state=hidden, layout=layout)
