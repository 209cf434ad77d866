"""Greedy and beam-search decoding over any autoregressive model.

A model is seen through one function,
    step(prefix (N, t) token ids, state) -> (log-probabilities (N, vocab), new state),
where `state` is whatever the model carries between steps (an RNN's hidden state, a
Transformer's key/value cache, or None for a model that rereads the whole prefix), and
    reorder(state, rows) -> state
which picks rows of the state (beam search keeps, drops and duplicates hypotheses).
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

Step = Callable[[torch.Tensor, object], tuple]


def _strip(row: List[int], eos: int) -> List[int]:
    """The tokens after <bos>, up to (not including) the first <eos>."""
    row = row[1:]
    return row[: row.index(eos)] if eos in row else row


@torch.no_grad()
def greedy(step: Step, state, batch: int, bos: int, eos: int, max_len: int, device=None) -> List[List[int]]:
    """The most likely next token at every step, for `batch` sequences at once; each result
    stops before its <eos> (or after max_len tokens)."""
    tokens = torch.full((batch, 1), bos, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(max_len):
        logp, state = step(tokens, state)
        nxt = logp.argmax(-1).masked_fill(done, eos)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        done |= nxt == eos
        if bool(done.all()):
            break
    return [_strip(r, eos) for r in tokens.tolist()]


@torch.no_grad()
def beam_search(step: Step, state, reorder: Callable, batch: int, bos: int, eos: int, max_len: int,
                beam: int = 4, length_penalty: float = 1.0, device=None) -> List[List[int]]:
    """The best of `beam` hypotheses per sequence, ranked by total log-probability divided by
    length ** length_penalty (0: raw sums, which favour short outputs; 1: mean per token).
    `state` holds one row per sequence; it is expanded to `beam` rows each here."""
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    k = beam
    state = reorder(state, torch.arange(batch, device=device).repeat_interleave(k))
    tokens = torch.full((batch * k, 1), bos, dtype=torch.long, device=device)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live hypothesis per sequence at the start
    done = torch.zeros(batch * k, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * k, device=device)
    for _ in range(max_len):
        logp, state = step(tokens, state)
        V = logp.shape[-1]
        logp = logp.float()
        # a finished hypothesis only extends with <eos> at no cost, keeping its score
        logp = torch.where(done[:, None], torch.full_like(logp, float("-inf")), logp)
        logp[done, eos] = 0.0
        cand = (scores.view(-1, 1) + logp).view(batch, k * V)
        scores, flat = cand.topk(k, dim=-1)
        rows = (torch.arange(batch, device=device)[:, None] * k + flat // V).view(-1)
        nxt = (flat % V).view(-1)
        tokens = torch.cat([tokens[rows], nxt[:, None]], 1)
        lengths = lengths[rows] + (~done[rows]).float()
        done = done[rows] | (nxt == eos)
        state = reorder(state, rows)
        if bool(done.all()):
            break
    final = scores.view(-1) / lengths.clamp_min(1) ** length_penalty
    best = final.view(batch, k).argmax(-1) + torch.arange(batch, device=device) * k
    return [_strip(tokens[i].tolist(), eos) for i in best.tolist()]


def reorder_tensors(state, rows: torch.Tensor):
    """reorder for states made of tensors (batch first) nested in tuples, lists and dicts."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.index_select(0, rows)
    if isinstance(state, dict):
        return {k: reorder_tensors(v, rows) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(reorder_tensors(v, rows) for v in state)
    return state


def token_accuracy(pred: List[List[int]], gold: List[List[int]], pad: Optional[int] = None) -> float:
    """Share of gold positions (including the end: one extra position per sequence) whose token
    the prediction has at the same position."""
    hit, n = 0, 0
    for p, g in zip(pred, gold):
        g = list(g) + [-1]  # the end of the sequence counts as a position
        p = list(p) + [-1]
        hit += sum(1 for i, t in enumerate(g) if i < len(p) and p[i] == t)
        n += len(g)
    return hit / max(n, 1)
