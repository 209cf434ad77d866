"""RNN sequence-to-sequence with additive attention (Bahdanau et al. 2015).

The encoder, a bidirectional GRU (or LSTM), turns the source into one vector per token,
[forward; backward]. The decoder, a GRU (or LSTM) cell, emits the target one token at a
time; before each step it scores every source vector against its previous state,
    e_j = v . tanh(W s + U h_j),  a = softmax(e) over the source's valid tokens,
and reads the context vector c = sum_j a_j h_j, which enters the cell with the previous
token's embedding and the output layer with the new state. The attention is what lets the
decoder look back at any source token instead of squeezing the sentence into one vector;
the Transformer keeps the attention and drops the recurrence.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import decoding
from .text import Vocab, pad_batch

CELLS = ("gru", "lstm")


class AdditiveAttention(nn.Module):
    def __init__(self, state: int, memory: int, hidden: int):
        super().__init__()
        self.W = nn.Linear(state, hidden, bias=False)
        self.U = nn.Linear(memory, hidden)
        self.v = nn.Linear(hidden, 1, bias=False)

    def forward(self, s: torch.Tensor, memory: torch.Tensor, memory_proj: torch.Tensor, mask: torch.Tensor):
        """s (B, state), memory (B, S, memory), memory_proj = U(memory) (computed once per
        source), mask (B, S) True at valid tokens -> (context (B, memory), weights (B, S))."""
        e = self.v(torch.tanh(self.W(s)[:, None, :] + memory_proj)).squeeze(-1)
        a = e.masked_fill(~mask, float("-inf")).softmax(-1)
        return torch.bmm(a[:, None, :], memory).squeeze(1), a


class Seq2Seq(nn.Module):
    def __init__(self, src_vocab: int, tgt_vocab: int, emb: int = 128, hidden: int = 256, attn: int = 128,
                 cell: str = "gru", dropout: float = 0.1):
        super().__init__()
        self.config = dict(src_vocab=src_vocab, tgt_vocab=tgt_vocab, emb=emb, hidden=hidden, attn=attn, cell=cell,
                           dropout=dropout)
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
        self.cell_type = cell
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.src_emb = nn.Embedding(src_vocab, emb, padding_idx=Vocab.pad)
        self.tgt_emb = nn.Embedding(tgt_vocab, emb, padding_idx=Vocab.pad)
        self.encoder = rnn(emb, hidden, batch_first=True, bidirectional=True)
        self.bridge = nn.Linear(2 * hidden, hidden)  # mean encoder state -> the decoder's first state
        self.attention = AdditiveAttention(hidden, 2 * hidden, attn)
        self.cell = (nn.GRUCell if cell == "gru" else nn.LSTMCell)(emb + 2 * hidden, hidden)
        self.out = nn.Linear(hidden + 2 * hidden + emb, tgt_vocab)
        self.dropout = nn.Dropout(dropout)

    def encode(self, src: torch.Tensor, src_len: torch.Tensor) -> dict:
        """The decoder's state before the first step: memory, its projection, mask, cell state."""
        packed = nn.utils.rnn.pack_padded_sequence(self.dropout(self.src_emb(src)), src_len.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        out, _ = self.encoder(packed)
        memory, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        mask = torch.arange(src.shape[1], device=src.device)[None, :] < src_len[:, None]
        mean = (memory * mask[..., None]).sum(1) / src_len[:, None].clamp_min(1)
        h = torch.tanh(self.bridge(mean))
        state = {"memory": memory, "proj": self.attention.U(memory), "mask": mask, "h": h}
        if self.cell_type == "lstm":
            state["c"] = torch.zeros_like(h)
        return state

    def step(self, prev: torch.Tensor, state: dict):
        """One decoder step from the previous tokens (N,) -> (logits (N, vocab), new state)."""
        e = self.dropout(self.tgt_emb(prev))
        ctx, _ = self.attention(state["h"], state["memory"], state["proj"], state["mask"])
        new = dict(state)
        if self.cell_type == "gru":
            new["h"] = self.cell(torch.cat([e, ctx], -1), state["h"])
        else:
            new["h"], new["c"] = self.cell(torch.cat([e, ctx], -1), (state["h"], state["c"]))
        logits = self.out(self.dropout(torch.cat([new["h"], ctx, e], -1)))
        return logits, new

    def loss(self, src, src_len, tgt) -> torch.Tensor:
        """Teacher-forced cross entropy; tgt holds <bos> y1 .. ym <eos> rows, right-padded."""
        state = self.encode(src, src_len)
        logits = []
        for t in range(tgt.shape[1] - 1):
            lg, state = self.step(tgt[:, t], state)
            logits.append(lg)
        logits = torch.stack(logits, 1)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt[:, 1:].reshape(-1), ignore_index=Vocab.pad)

    def _decode_step(self, prefix, state):
        logits, state = self.step(prefix[:, -1], state)
        return logits.log_softmax(-1), state

    @torch.no_grad()
    def greedy(self, src, src_len, max_len: int = 50) -> List[List[int]]:
        self.eval()
        return decoding.greedy(self._decode_step, self.encode(src, src_len), src.shape[0], Vocab.bos, Vocab.eos,
                               max_len, src.device)

    @torch.no_grad()
    def beam(self, src, src_len, beam: int = 4, max_len: int = 50, length_penalty: float = 1.0) -> List[List[int]]:
        self.eval()
        return decoding.beam_search(self._decode_step, self.encode(src, src_len), decoding.reorder_tensors,
                                    src.shape[0], Vocab.bos, Vocab.eos, max_len, beam, length_penalty, src.device)


def pair_batch(src_vocab: Vocab, tgt_vocab: Vocab, sources: Sequence[str], targets: Sequence[str], max_len: int = 64):
    """(src ids, src lengths, tgt ids with <bos>/<eos>) for a batch of pairs."""
    src, src_len = pad_batch([src_vocab.encode(s, max_len=max_len) or [Vocab.unk] for s in sources])
    tgt, _ = pad_batch([tgt_vocab.encode(t, bos=True, eos=True, max_len=max_len) for t in targets])
    return src, src_len, tgt


def translate(model, src_vocab: Vocab, tgt_vocab: Vocab, sources: Sequence[str], beam: int = 1, max_len: int = 64,
              batch_size: int = 64) -> List[str]:
    """Decoded targets of the sources (greedy with beam=1, else beam search); works for any model
    with greedy(src, src_len, max_len) and beam(src, src_len, beam, max_len)."""
    out = []
    for i in range(0, len(sources), batch_size):
        src, src_len = pad_batch([src_vocab.encode(s, max_len=max_len) or [Vocab.unk]
                                  for s in sources[i:i + batch_size]])
        ids = model.greedy(src, src_len, max_len) if beam == 1 else model.beam(src, src_len, beam, max_len)
        out += [tgt_vocab.decode(r) for r in ids]
    return out


def train_pairs(make_model, sources: Sequence[str], targets: Sequence[str], vocab_size: int = 10_000,
                steps: int = 2000, batch_size: int = 64, lr: float = 2e-3, warmup: int = 0, max_len: int = 64,
                seed: int = 0, time_limit: Optional[float] = None, log_every: int = 0, desc: str = "seq2seq"):
    """(model, src_vocab, tgt_vocab, history) for any encoder-decoder with
    loss(src, src_len, tgt); make_model(src_vocab_size, tgt_vocab_size) builds it."""
    from .training import fit, shuffled_batches

    if len(sources) != len(targets) or not sources:
        raise ValueError(f"sources and targets must be non-empty and equally long, got {len(sources)} and "
                         f"{len(targets)}")
    torch.manual_seed(seed)
    src_vocab = Vocab.build(sources, max_size=vocab_size)
    tgt_vocab = Vocab.build(targets, max_size=vocab_size)
    model = make_model(len(src_vocab), len(tgt_vocab))

    def step_loss(idx):
        idx = idx.tolist()
        return model.loss(*pair_batch(src_vocab, tgt_vocab, [sources[i] for i in idx], [targets[i] for i in idx],
                                      max_len))

    hist = fit(model, step_loss, shuffled_batches(len(sources), batch_size, seed), steps, lr=lr, warmup=warmup,
               time_limit=time_limit, log_every=log_every, desc=desc)
    return model, src_vocab, tgt_vocab, hist


def train(sources: Sequence[str], targets: Sequence[str], emb: int = 128, hidden: int = 256, attn: int = 128,
          cell: str = "gru", dropout: float = 0.1, **kw):
    """(model, src_vocab, tgt_vocab, history); keyword arguments go to train_pairs."""
    return train_pairs(lambda sv, tv: Seq2Seq(sv, tv, emb, hidden, attn, cell, dropout), sources, targets, **kw)
