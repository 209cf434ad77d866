"""Skip-gram word2vec (Mikolov et al. 2013), as the seed describes it.

A word is a one-hot vector over the vocabulary (10,000 words by default); multiplying it by
W (vocab x 64) picks its row, the word's embedding; multiplying that by W' (64 x vocab)
gives one score per vocabulary word, and a softmax over them predicts the words found
within `window` positions of it. Training pairs are (centre, context) from every window of
the corpus.

Two losses:
- 'softmax': the full softmax over the vocabulary, exactly as described (cost ~ vocab per pair);
- 'negative': negative sampling, the practical option: for each true pair, `negatives` noise
  words drawn from the unigram distribution to the power 3/4, and a logistic loss that tells
  the true context word from them (cost ~ negatives per pair).

After training the rows of W are the word vectors: `neighbours` ranks words by cosine
similarity, `analogy` answers a - b + c (king - man + woman).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .text import Vocab

LOSSES = ("negative", "softmax")


class SkipGram(nn.Module):
    def __init__(self, vocab_size: int, dim: int = 64):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, dim=dim)
        if vocab_size < 2 or dim < 1:
            raise ValueError(f"vocab_size must be >= 2 and dim >= 1, got {vocab_size}, {dim}")
        self.W = nn.Embedding(vocab_size, dim)  # one-hot @ W: the input (centre) vectors
        self.W_out = nn.Embedding(vocab_size, dim)  # rows of W'^T: the output (context) vectors
        nn.init.uniform_(self.W.weight, -0.5 / dim, 0.5 / dim)  # word2vec.c's initialisation
        nn.init.zeros_(self.W_out.weight)

    def logits(self, centre: torch.Tensor) -> torch.Tensor:
        """(N, vocab): the scores that the softmax turns into p(context | centre)."""
        return self.W(centre) @ self.W_out.weight.T

    def softmax_loss(self, centre: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(centre), context)

    def negative_sampling_loss(self, centre: torch.Tensor, context: torch.Tensor,
                               negatives: torch.Tensor) -> torch.Tensor:
        """-log s(w_c . w'_o) - sum_k log s(-w_c . w'_k), averaged over pairs; negatives (N, K)."""
        w = self.W(centre)
        pos = (w * self.W_out(context)).sum(-1)
        neg = torch.einsum("nd,nkd->nk", w, self.W_out(negatives))
        return -(F.logsigmoid(pos) + F.logsigmoid(-neg).sum(-1)).mean()

    def score(self, centre: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return (self.W(centre) * self.W_out(context)).sum(-1)


def skipgram_pairs(sentences: Sequence[Sequence[int]], window: int = 2, unk: Optional[int] = Vocab.unk) -> torch.Tensor:
    """(N, 2) (centre, context) pairs: every context word within `window` positions of each
    centre word, inside each sentence; pairs involving `unk` are dropped."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out = []
    for s in sentences:
        t = torch.as_tensor(list(s), dtype=torch.long)
        for off in range(1, window + 1):
            if len(t) > off:
                out.append(torch.stack([t[:-off], t[off:]], 1))
                out.append(torch.stack([t[off:], t[:-off]], 1))
    if not out:
        return torch.empty(0, 2, dtype=torch.long)
    pairs = torch.cat(out)
    if unk is not None:
        pairs = pairs[(pairs != unk).all(1)]
    return pairs


def noise_distribution(counts: torch.Tensor, power: float = 0.75) -> torch.Tensor:
    """Unigram frequencies to the power 3/4, normalised (specials and <unk> get none)."""
    p = counts.float().clamp_min(0) ** power
    p[:4] = 0
    if float(p.sum()) <= 0:
        raise ValueError("the vocabulary has no counted words to draw negatives from")
    return p / p.sum()


def train(sentences: Sequence[str], vocab_size: int = 10_000, dim: int = 64, window: int = 2,
          loss: str = "negative", negatives: int = 5, steps: int = 2000, batch_size: int = 256, lr: float = 0.01,
          seed: int = 0, time_limit: Optional[float] = None, log_every: int = 0, vocab: Optional[Vocab] = None):
    """(model, vocab, history) trained on the sentences' (centre, context) pairs."""
    from .training import fit, shuffled_batches

    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if negatives < 1:
        raise ValueError(f"negatives must be >= 1, got {negatives}")
    torch.manual_seed(seed)
    vocab = vocab or Vocab.build(sentences, max_size=vocab_size)
    pairs = skipgram_pairs([vocab.encode(s) for s in sentences], window)
    if len(pairs) == 0:
        raise ValueError("the sentences give no (centre, context) pairs: too short, or every word is unknown")
    model = SkipGram(len(vocab), dim)
    noise = noise_distribution(vocab.counts)
    g = torch.Generator().manual_seed(seed + 1)

    def step_loss(idx):
        c, o = pairs[idx, 0], pairs[idx, 1]
        if loss == "softmax":
            return model.softmax_loss(c, o)
        neg = torch.multinomial(noise, len(idx) * negatives, replacement=True, generator=g).view(len(idx), negatives)
        return model.negative_sampling_loss(c, o, neg)

    hist = fit(model, step_loss, shuffled_batches(len(pairs), batch_size, seed), steps, lr=lr,
               time_limit=time_limit, log_every=log_every, desc=f"word2vec ({loss})")
    hist["pairs"] = len(pairs)
    return model, vocab, hist


@torch.no_grad()
def neighbours(model: SkipGram, vocab: Vocab, word: str, k: int = 10) -> List[Tuple[str, float]]:
    """The k words whose vectors (rows of W) are most cosine-similar to `word`'s."""
    if word not in vocab:
        raise ValueError(f"{word!r} is not in the vocabulary ({len(vocab)} words)")
    return _nearest(model, vocab, model.W.weight[vocab.id(word)], exclude=[vocab.id(word)], k=k)


@torch.no_grad()
def analogy(model: SkipGram, vocab: Vocab, a: str, b: str, c: str, k: int = 5) -> List[Tuple[str, float]]:
    """The words nearest to vec(a) - vec(b) + vec(c) (a, b and c themselves excluded):
    analogy('king', 'man', 'woman') should rank 'queen' high on a large enough corpus."""
    missing = [w for w in (a, b, c) if w not in vocab]
    if missing:
        raise ValueError(f"not in the vocabulary: {missing}")
    W = F.normalize(model.W.weight, dim=-1)
    ids = [vocab.id(w) for w in (a, b, c)]
    return _nearest(model, vocab, W[ids[0]] - W[ids[1]] + W[ids[2]], exclude=ids, k=k)


def _nearest(model: SkipGram, vocab: Vocab, vec: torch.Tensor, exclude: Sequence[int], k: int):
    sims = F.normalize(model.W.weight, dim=-1) @ F.normalize(vec, dim=0)
    sims[:4] = float("-inf")  # specials and <unk> are never an answer
    sims[list(exclude)] = float("-inf")
    k = min(k, int(torch.isfinite(sims).sum()))
    top = sims.topk(k)
    return [(vocab.itos[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]


@torch.no_grad()
def pair_auc(score_fn, pairs: torch.Tensor, noise: torch.Tensor, seed: int = 0) -> float:
    """How often a true held-out (centre, context) pair scores above (centre, noise word) with the
    noise word drawn from `noise`: 0.5 is chance. score_fn(centre, context) -> scores."""
    g = torch.Generator().manual_seed(seed)
    fake = torch.multinomial(noise, len(pairs), replacement=True, generator=g)
    pos = score_fn(pairs[:, 0], pairs[:, 1])
    neg = score_fn(pairs[:, 0], fake)
    return float((pos > neg).float().mean() + 0.5 * (pos == neg).float().mean())


@torch.no_grad()
def sentence_vectors(model: SkipGram, vocab: Vocab, texts: Sequence[str]) -> torch.Tensor:
    """(N, dim): the mean of each text's known word vectors (zeros when it has none)."""
    out = torch.zeros(len(texts), model.W.weight.shape[1])
    for i, t in enumerate(texts):
        ids = [j for j in vocab.encode(t) if j != vocab.unk]
        if ids:
            out[i] = model.W.weight[ids].mean(0)
    return out
