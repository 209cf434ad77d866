"""Transformer layers on bertfast's fused ops, shared by the encoder-decoder and GPT.

The same kernels that serve BERT's encoder serve decoders here:
- embeddings: ops.embedding_layernorm (token + position, LayerNorm, dropout in one op);
- attention: ops.attention, bidirectional with a key-padding mask (encoder), causal=True
  (decoder self-attention; the mask is bottom-right aligned, so one new query against a
  longer cached key sequence sees every cached key) and cross-attention with a query length
  that differs from the memory's;
- every add & norm: ops.bias_residual_layernorm on the bias-free GEMM output, so the bias add,
  dropout, residual add and LayerNorm are one pass (post-LN, as in BERT and GPT-1);
- the feed-forward activation: ops.bias_gelu on the bias-free GEMM output.

Incremental decoding: a layer's `cache` (a dict per attention) keeps the keys and values of
the tokens already decoded (self-attention) and of the memory (cross-attention, computed
once), so each new token costs one row of work per layer instead of the whole prefix.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


class Embeddings(nn.Module):
    """LN(token embedding + learned position embedding), then dropout: one fused op."""

    def __init__(self, vocab_size: int, hidden: int, max_positions: int, dropout: float, eps: float = 1e-12):
        super().__init__()
        self.word = nn.Embedding(vocab_size, hidden)
        self.position = nn.Embedding(max_positions, hidden)
        self.token_type = nn.Embedding(1, hidden)  # the fused op's token-type table: one row, no segments here
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout_p = dropout
        for emb in (self.word, self.position):
            nn.init.normal_(emb.weight, 0.0, 0.02)
        nn.init.zeros_(self.token_type.weight)

    def forward(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """ids (B, T) -> (B, T, hidden); positions start..start+T-1 (start > 0 when decoding
        after a cached prefix)."""
        T = ids.shape[1]
        if start + T > self.position.num_embeddings:
            raise ValueError(f"sequence of {start + T} tokens is longer than max_positions "
                             f"({self.position.num_embeddings})")
        pos = torch.arange(start, start + T, device=ids.device).expand_as(ids)
        return ops.embedding_layernorm(ids, torch.zeros_like(ids), pos, self.word.weight, self.position.weight,
                                       self.token_type.weight, self.norm.weight, self.norm.bias, self.norm.eps,
                                       self.dropout_p if self.training else 0.0)


class Attention(nn.Module):
    """Multi-head attention returning the output projection's GEMM *without* its bias: the
    caller's fused add & norm adds it."""

    def __init__(self, hidden: int, heads: int, dropout: float, cross: bool = False):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        self.heads, self.head_dim, self.cross = heads, hidden // heads, cross
        if cross:
            self.query = nn.Linear(hidden, hidden)
            self.key_value = nn.Linear(hidden, 2 * hidden)
        else:
            self.qkv = nn.Linear(hidden, 3 * hidden)
        self.output = nn.Linear(hidden, hidden)
        self.dropout_p = dropout

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor], causal: bool,
                memory: Optional[torch.Tensor] = None, cache: Optional[dict] = None) -> torch.Tensor:
        """x (B, T, hidden) -> (B * T, hidden) rows. key_mask (B, S_keys) True/1 at keys to
        attend (None: all). Self-attention with a cache appends this call's keys and values
        to it; cross-attention computes the memory's once and reuses them."""
        B, T, _ = x.shape
        H, D = self.heads, self.head_dim
        if self.cross:
            q = self.query(x).view(B, T, H, D)
            if cache is not None and "k" in cache:
                k, v = cache["k"], cache["v"]
            else:
                k, v = self.key_value(memory).view(B, memory.shape[1], 2, H, D).unbind(2)
                if cache is not None:
                    cache["k"], cache["v"] = k, v
        else:
            q, k, v = self.qkv(x).view(B, T, 3, H, D).unbind(2)
            if cache is not None:
                if "k" in cache:
                    k, v = torch.cat([cache["k"], k], 1), torch.cat([cache["v"], v], 1)
                cache["k"], cache["v"] = k, v
        ctx = ops.attention(q, k, v, key_mask, dropout_p=self.dropout_p if self.training else 0.0, causal=causal)
        return F.linear(ctx.reshape(B * T, H * D), self.output.weight)


class AddNorm(nn.Module):
    """LN(dropout(x + bias) + residual): ops.bias_residual_layernorm, one pass."""

    def __init__(self, hidden: int, dropout: float, eps: float = 1e-12):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout_p = dropout

    def forward(self, x_without_bias: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return ops.bias_residual_layernorm(x_without_bias, bias, residual, self.norm.weight, self.norm.bias,
                                           self.norm.eps, self.dropout_p if self.training else 0.0)


class TransformerLayer(nn.Module):
    """Self-attention (+ cross-attention when `cross`) + feed-forward, each followed by a
    fused add & norm. Encoder: cross=False, causal=False; decoder: cross=True, causal=True;
    GPT: cross=False, causal=True."""

    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float = 0.1, cross: bool = False):
        super().__init__()
        self.self_attention = Attention(hidden, heads, dropout)
        self.self_norm = AddNorm(hidden, dropout)
        self.cross_attention = Attention(hidden, heads, dropout, cross=True) if cross else None
        self.cross_norm = AddNorm(hidden, dropout) if cross else None
        self.intermediate = nn.Linear(hidden, ffn)
        self.output = nn.Linear(ffn, hidden)
        self.ffn_norm = AddNorm(hidden, dropout)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None, causal: bool = False,
                memory: Optional[torch.Tensor] = None, memory_mask: Optional[torch.Tensor] = None,
                cache: Optional[dict] = None) -> torch.Tensor:
        B, T, hidden = x.shape
        rows = x.reshape(B * T, hidden)
        att = self.self_attention(x, key_mask, causal, cache=None if cache is None else cache.setdefault("self", {}))
        rows = self.self_norm(att, self.self_attention.output.bias, rows)
        if self.cross_attention is not None:
            cross = self.cross_attention(rows.view(B, T, hidden), memory_mask, False, memory,
                                         None if cache is None else cache.setdefault("cross", {}))
            rows = self.cross_norm(cross, self.cross_attention.output.bias, rows)
        h = ops.bias_gelu(F.linear(rows, self.intermediate.weight), self.intermediate.bias)
        rows = self.ffn_norm(F.linear(h, self.output.weight), self.output.bias, rows)
        return rows.view(B, T, hidden)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation for the Linear layers: normal(0, std) weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B, max_len) bool, True at the first lengths[b] positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]
