"""Bag of words: logistic regression on tf-idf features, the baseline every sentence classifier
is measured against. Word order is thrown away; each text is the set of its words, weighted
by how rare they are across the training texts (idf) and normalised to unit length.

The linear layer is an nn.EmbeddingBag in 'sum' mode with per-word tf-idf weights: the same
product as a (texts x vocab) sparse matrix times a (vocab x classes) weight, without building
the matrix.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .text import Vocab


class BagOfWords(nn.Module):
    def __init__(self, vocab_size: int, num_classes: int):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, num_classes=num_classes)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.weight = nn.EmbeddingBag(vocab_size, num_classes, mode="sum")
        nn.init.zeros_(self.weight.weight)
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.register_buffer("idf", torch.ones(vocab_size))

    def features(self, texts_ids: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(flat word ids, offsets, tf-idf weights) of a batch: each text's distinct words with
        count * idf, L2-normalised per text."""
        ids, offsets, weights = [], [], []
        for seq in texts_ids:
            offsets.append(len(ids))
            counts = Counter(int(i) for i in seq)
            w = torch.tensor([c * float(self.idf[i]) for i, c in counts.items()]) if counts else torch.zeros(0)
            ids += list(counts)
            weights.append(w / w.norm().clamp_min(1e-12))
        return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long), torch.cat(weights)

    def forward(self, texts_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        ids, offsets, w = self.features(texts_ids)
        return self.weight(ids, offsets, per_sample_weights=w) + self.bias

    def set_idf(self, texts_ids: Sequence[Sequence[int]]) -> None:
        df = Counter()
        for seq in texts_ids:
            df.update(set(int(i) for i in seq))
        n = len(texts_ids)
        idf = torch.tensor([math.log((1 + n) / (1 + df.get(i, 0))) + 1.0 for i in range(self.idf.numel())])
        self.idf.copy_(idf)


def train(texts: Sequence[str], labels: Sequence[str], vocab_size: int = 20_000, steps: int = 300,
          batch_size: int = 64, lr: float = 0.05, weight_decay: float = 1e-4, seed: int = 0,
          time_limit: Optional[float] = None, log_every: int = 0):
    """(model, vocab, classes, history)."""
    from .training import fit, shuffled_batches

    torch.manual_seed(seed)
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(t) for t in labels])
    vocab = Vocab.build(texts, max_size=vocab_size)
    ids = [vocab.encode(t) for t in texts]
    model = BagOfWords(len(vocab), len(classes))
    model.set_idf(ids)

    def step_loss(idx):
        return F.cross_entropy(model([ids[i] for i in idx.tolist()]), y[idx])

    hist = fit(model, step_loss, shuffled_batches(len(ids), batch_size, seed), steps, lr=lr,
               weight_decay=weight_decay, time_limit=time_limit, log_every=log_every, desc="bow")
    return model, vocab, classes, hist


@torch.no_grad()
def predict(model: BagOfWords, vocab: Vocab, classes: List[str], texts: Sequence[str]) -> List[str]:
    model.eval()
    logits = model([vocab.encode(t) for t in texts])
    return [classes[i] for i in logits.argmax(-1).tolist()]
