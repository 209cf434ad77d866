"""The Transformer encoder-decoder (Vaswani et al. 2017) on bertfast's fused ops.

The encoder is BERT's stack (bidirectional self-attention, feed-forward, post-LN); the decoder
adds causal self-attention (a target token sees only earlier ones) and cross-attention to
the encoder's output. BERT keeps the encoder only; GPT keeps the decoder without the
cross-attention. Layers, embeddings and the fused ops they run on: `layers.py`.

Decoding: greedy or beam search (`decoding.py`) with an incremental cache: each new target
token runs through the decoder alone, attending to the cached keys/values of the tokens
before it and to the memory's, computed once. `use_cache=False` rereads the whole prefix
every step; both give the same tokens (a test checks).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import decoding
from .layers import Embeddings, TransformerLayer, init_weights, length_mask
from .text import Vocab


class TransformerSeq2Seq(nn.Module):
    def __init__(self, src_vocab: int, tgt_vocab: int, hidden: int = 256, layers: int = 3, heads: int = 4,
                 ffn: int = 1024, dropout: float = 0.1, max_positions: int = 256):
        super().__init__()
        self.config = dict(src_vocab=src_vocab, tgt_vocab=tgt_vocab, hidden=hidden, layers=layers, heads=heads,
                           ffn=ffn, dropout=dropout, max_positions=max_positions)
        self.src_embeddings = Embeddings(src_vocab, hidden, max_positions, dropout)
        self.tgt_embeddings = Embeddings(tgt_vocab, hidden, max_positions, dropout)
        self.encoder = nn.ModuleList(TransformerLayer(hidden, heads, ffn, dropout) for _ in range(layers))
        self.decoder = nn.ModuleList(TransformerLayer(hidden, heads, ffn, dropout, cross=True) for _ in range(layers))
        self.output_bias = nn.Parameter(torch.zeros(tgt_vocab))  # the output layer's weight is tgt_embeddings'
        init_weights(self)

    def encode(self, src: torch.Tensor, src_len: torch.Tensor) -> dict:
        mask = length_mask(src_len, src.shape[1])
        x = self.src_embeddings(src)
        for layer in self.encoder:
            x = layer(x, mask)
        return {"memory": x, "mask": mask}

    def decode(self, tgt: torch.Tensor, enc: dict, tgt_mask: Optional[torch.Tensor] = None,
               cache: Optional[list] = None, start: int = 0) -> torch.Tensor:
        """Logits (B, T, vocab) for target tokens tgt (B, T) at positions start..; with a cache
        (one dict per layer), tgt holds only the tokens not yet seen by it."""
        x = self.tgt_embeddings(tgt, start)
        for i, layer in enumerate(self.decoder):
            x = layer(x, tgt_mask, True, enc["memory"], enc["mask"], None if cache is None else cache[i])
        return F.linear(x, self.tgt_embeddings.word.weight, self.output_bias)

    def loss(self, src, src_len, tgt) -> torch.Tensor:
        """Teacher-forced cross entropy; tgt holds <bos> y1 .. ym <eos> rows, right-padded."""
        inp = tgt[:, :-1]
        logits = self.decode(inp, self.encode(src, src_len), tgt_mask=inp != Vocab.pad)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt[:, 1:].reshape(-1),
                               ignore_index=Vocab.pad)

    def _stepper(self, use_cache: bool):
        def step(prefix, state):
            if not use_cache:  # the whole prefix again
                return self.decode(prefix, state["enc"])[:, -1].float().log_softmax(-1), state
            t = prefix.shape[1] - 1
            logits = self.decode(prefix[:, -1:], state["enc"], cache=state["cache"], start=t)
            return logits[:, -1].float().log_softmax(-1), state
        return step

    def _state(self, src, src_len, use_cache: bool) -> dict:
        return {"enc": self.encode(src, src_len), "cache": [{} for _ in self.decoder] if use_cache else None}

    @torch.no_grad()
    def greedy(self, src, src_len, max_len: int = 50, use_cache: bool = True) -> List[List[int]]:
        self.eval()
        return decoding.greedy(self._stepper(use_cache), self._state(src, src_len, use_cache), src.shape[0],
                               Vocab.bos, Vocab.eos, max_len, src.device)

    @torch.no_grad()
    def beam(self, src, src_len, beam: int = 4, max_len: int = 50, length_penalty: float = 1.0,
             use_cache: bool = True) -> List[List[int]]:
        self.eval()
        return decoding.beam_search(self._stepper(use_cache), self._state(src, src_len, use_cache),
                                    decoding.reorder_tensors, src.shape[0], Vocab.bos, Vocab.eos, max_len, beam,
                                    length_penalty, src.device)


def train(sources, targets, hidden: int = 256, layers: int = 3, heads: int = 4, ffn: int = 1024,
          dropout: float = 0.1, max_positions: int = 256, **kw):
    """(model, src_vocab, tgt_vocab, history); keyword arguments go to seq2seq.train_pairs."""
    from .seq2seq import train_pairs

    kw.setdefault("desc", "transformer")
    kw.setdefault("warmup", 100)
    return train_pairs(lambda sv, tv: TransformerSeq2Seq(sv, tv, hidden, layers, heads, ffn, dropout, max_positions),
                       sources, targets, **kw)
