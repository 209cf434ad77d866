"""A linear-chain conditional random field: the sequence-labelling head BERT's paper offers as
the alternative to labelling each token on its own.

For tags y_1..y_n of one sentence and per-token emission scores E (the classifier's logits),
    score(y) = start[y_1] + sum_i E[i, y_i] + sum_{i>1} trans[y_{i-1}, y_i] + end[y_n],
    p(y) = exp(score(y)) / Z,  Z = sum over every tag sequence of exp(score).
Training minimises -log p(gold) (Z by the forward algorithm); prediction is the argmax sequence
(Viterbi). Both are batched: the only Python loop is over time steps, each step one
(batch, tags, tags) log-sum-exp or max.

Only the positions a mask marks take part (the first sub-token of each word, as the tagger
labels them): they are moved to the front of each row, in order, before the recursion, so
holes (continuation pieces, special tokens, padding) neither break the chain nor count.
Math runs in float32 at least (float64 stays float64), in log space.

Constraints (optional): a boolean (tags, tags) matrix of allowed transitions plus allowed
first and last tags; Viterbi never emits a disallowed one. `bio_constraints` builds them for
BIO tags (I-X only after B-X or I-X, never first). They apply to decoding only: training
normalises over every path, so a gold sequence that breaks them (a truncated span) still
has a finite loss, and the learned transitions push the invalid moves down anyway.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn


def bio_constraints(id2label: Dict[int, str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(allowed transitions (T, T) [from, to], allowed first tags (T,), allowed last tags (T,))
    for BIO labels: I-X may only follow B-X or I-X and may not start a sentence. Labels that
    are not B-/I- (O, or bare labels) are unconstrained."""
    n = len(id2label)
    labels = [id2label[i] for i in range(n)]

    def parts(lab):
        prefix, dash, typ = lab.partition("-")
        return (prefix, typ) if dash and prefix in ("B", "I") else ("O", lab)

    allowed = torch.ones(n, n, dtype=torch.bool)
    start = torch.ones(n, dtype=torch.bool)
    for j, lab in enumerate(labels):
        prefix, typ = parts(lab)
        if prefix == "I":
            start[j] = False
            for i, prev in enumerate(labels):
                p, t = parts(prev)
                allowed[i, j] = p in ("B", "I") and t == typ
    return allowed, start, torch.ones(n, dtype=torch.bool)


def compact(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order (B, L), lengths (B,), step mask (B, L)): the masked positions of each row first,
    in their order (a stable sort), cut to the longest row's count L."""
    mask = mask.bool()
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    lengths = mask.sum(1)
    L = int(lengths.max()) if mask.numel() else 0
    order = order[:, :L]
    steps = torch.arange(L, device=mask.device)[None, :] < lengths[:, None]
    return order, lengths, steps


class CRF(nn.Module):
    def __init__(self, num_tags: int, constraints: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None):
        super().__init__()
        if num_tags < 1:
            raise ValueError(f"num_tags must be >= 1, got {num_tags}")
        self.num_tags = num_tags
        self.start_transitions = nn.Parameter(torch.zeros(num_tags))
        self.end_transitions = nn.Parameter(torch.zeros(num_tags))
        self.transitions = nn.Parameter(torch.zeros(num_tags, num_tags))  # [from, to]
        if constraints is None:
            constraints = (torch.ones(num_tags, num_tags, dtype=torch.bool), torch.ones(num_tags, dtype=torch.bool),
                           torch.ones(num_tags, dtype=torch.bool))
        allowed, start, end = constraints
        if allowed.shape != (num_tags, num_tags) or start.shape != (num_tags,) or end.shape != (num_tags,):
            raise ValueError(f"constraints must be ((T, T), (T,), (T,)) bool tensors for T={num_tags} tags")
        # not saved in the state dict: they follow from the labels (config), not from training
        self.register_buffer("allowed", allowed.bool(), persistent=False)
        self.register_buffer("allowed_start", start.bool(), persistent=False)
        self.register_buffer("allowed_end", end.bool(), persistent=False)

    def _check(self, emissions: torch.Tensor, mask: torch.Tensor, tags: Optional[torch.Tensor] = None):
        if emissions.dim() != 3 or emissions.shape[-1] != self.num_tags:
            raise ValueError(f"emissions must be (batch, seq, {self.num_tags}), got {tuple(emissions.shape)}")
        if mask.shape != emissions.shape[:2]:
            raise ValueError(f"mask must be (batch, seq) = {tuple(emissions.shape[:2])}, got {tuple(mask.shape)}")
        if tags is not None:
            if tags.shape != mask.shape:
                raise ValueError(f"tags must be (batch, seq) = {tuple(mask.shape)}, got {tuple(tags.shape)}")
            bad = mask.bool() & ((tags < 0) | (tags >= self.num_tags))
            if bool(bad.any()):
                raise ValueError(f"tags at masked positions must be in [0, {self.num_tags}), got "
                                 f"{int(tags[bad][0])}")

    def _dtype(self, emissions):
        return torch.promote_types(emissions.dtype, torch.float32)

    def nll(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor,
            reduction: str = "mean") -> torch.Tensor:
        """-log p(tags) of each row over its masked positions: 'none' (B,), 'sum', or 'mean'
        over the rows that have at least one masked position (0 when none has)."""
        self._check(emissions, mask, tags)
        if reduction not in ("none", "sum", "mean"):
            raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
        dt = self._dtype(emissions)
        order, lengths, steps = compact(mask)
        B, L = order.shape
        if L == 0:
            out = emissions.new_zeros(B, dtype=dt) + 0 * emissions.sum()
            return out if reduction == "none" else out.sum()
        em = emissions.to(dt).gather(1, order[..., None].expand(B, L, self.num_tags))
        tg = tags.long().gather(1, order).masked_fill(~steps, 0)
        start, end, trans = (self.start_transitions.to(dt), self.end_transitions.to(dt), self.transitions.to(dt))
        # the gold path's score
        fm = steps.to(dt)
        gold = start[tg[:, 0]] + (em.gather(2, tg[..., None]).squeeze(-1) * fm).sum(1)
        if L > 1:
            gold = gold + (trans[tg[:, :-1], tg[:, 1:]] * fm[:, 1:]).sum(1)
        last = tg.gather(1, (lengths - 1).clamp_min(0)[:, None]).squeeze(1)
        gold = gold + end[last]
        # log Z by the forward algorithm: alpha[b, j] = log-sum over paths ending in tag j
        alpha = start[None, :] + em[:, 0]
        for i in range(1, L):
            nxt = torch.logsumexp(alpha[:, :, None] + trans[None] + em[:, i, None, :], dim=1)
            alpha = torch.where(steps[:, i, None], nxt, alpha)
        log_z = torch.logsumexp(alpha + end[None, :], dim=1)
        out = torch.where(lengths > 0, log_z - gold, torch.zeros_like(gold))
        if reduction == "none":
            return out
        if reduction == "sum":
            return out.sum()
        return out.sum() / (lengths > 0).sum().clamp_min(1)

    def forward(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor,
                reduction: str = "mean") -> torch.Tensor:
        """The negative log-likelihood (see nll)."""
        return self.nll(emissions, tags, mask, reduction)

    @torch.no_grad()
    def decode(self, emissions: torch.Tensor, mask: torch.Tensor, constrained: bool = True,
               fill: int = -100) -> torch.Tensor:
        """The best tag sequence of each row (Viterbi), (B, S) with the tags at masked positions
        and `fill` elsewhere. constrained=True never uses a disallowed transition, first or last
        tag (a path without one exists whenever some tag is allowed everywhere, as O is in BIO)."""
        self._check(emissions, mask)
        dt = self._dtype(emissions)
        B, S = mask.shape
        out = torch.full((B, S), fill, dtype=torch.long, device=emissions.device)
        order, lengths, steps = compact(mask)
        L = order.shape[1]
        if L == 0:
            return out
        em = emissions.to(dt).gather(1, order[..., None].expand(B, L, self.num_tags))
        start, end, trans = (self.start_transitions.to(dt), self.end_transitions.to(dt), self.transitions.to(dt))
        if constrained:
            start = start.masked_fill(~self.allowed_start, float("-inf"))
            end = end.masked_fill(~self.allowed_end, float("-inf"))
            trans = trans.masked_fill(~self.allowed, float("-inf"))
        score = start[None, :] + em[:, 0]
        back = []
        for i in range(1, L):
            best, arg = (score[:, :, None] + trans[None] + em[:, i, None, :]).max(dim=1)
            back.append(arg)
            score = torch.where(steps[:, i, None], best, score)
        cur = (score + end[None, :]).argmax(-1)
        path = torch.zeros(B, L, dtype=torch.long, device=emissions.device)
        for i in range(L - 1, 0, -1):
            active = i < lengths
            path[:, i] = cur
            cur = torch.where(active, back[i - 1].gather(1, cur[:, None]).squeeze(1), cur)
        path[:, 0] = cur
        out.scatter_(1, order, path.masked_fill(~steps, fill))
        # positions of order beyond a row's length point at unmasked positions: they got `fill`
        return out

    def path_score(self, emissions: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        """score(tags) of one unmasked sequence: emissions (S, T), tags (S,). For tests and checks."""
        s = self.start_transitions[tags[0]] + self.end_transitions[tags[-1]]
        s = s + emissions[torch.arange(len(tags)), tags].sum()
        return s + self.transitions[tags[:-1], tags[1:]].sum()
