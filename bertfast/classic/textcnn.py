"""TextCNN (Kim 2014): a sentence classifier made of convolutions over word embeddings.

Each filter spans the whole embedding width and `w` consecutive words (w in 3 window sizes,
3/4/5 by default), so it is an n-gram detector; one max-pool over time per filter keeps the
strongest match anywhere in the sentence; the pooled values of every filter, concatenated,
go through dropout and a linear layer to the softmax over classes.

Windows that run past a sentence's end are not pooled (a sentence shorter than a window keeps
its one window, padded with the zero <pad> embedding), so a sentence's scores do not depend
on how long the other sentences of its batch are.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .text import Vocab


class TextCNN(nn.Module):
    def __init__(self, vocab_size: int, num_classes: int, dim: int = 128, windows: Sequence[int] = (3, 4, 5),
                 filters: int = 100, dropout: float = 0.5):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, num_classes=num_classes, dim=dim, windows=list(windows),
                           filters=filters, dropout=dropout)
        if len(windows) < 1 or min(windows) < 1:
            raise ValueError(f"windows must be positive window sizes, got {list(windows)}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.windows = tuple(int(w) for w in windows)
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=Vocab.pad)
        # a (w x dim) kernel over a (1, L, dim) "image": each filter spans the full embedding width
        self.convs = nn.ModuleList(nn.Conv2d(1, filters, (w, dim)) for w in self.windows)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(filters * len(self.windows), num_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, L) right-padded, lengths (B,) -> logits (B, classes)."""
        need = max(self.windows)
        if ids.shape[1] < need:
            ids = F.pad(ids, (0, need - ids.shape[1]), value=Vocab.pad)
        x = self.embedding(ids).unsqueeze(1)  # (B, 1, L, dim)
        pooled = []
        for w, conv in zip(self.windows, self.convs):
            h = F.relu(conv(x).squeeze(3))  # (B, filters, L - w + 1)
            starts = torch.arange(h.shape[-1], device=ids.device)
            valid = starts[None, :] + w <= lengths.clamp_min(w)[:, None]  # windows inside the sentence
            pooled.append(h.masked_fill(~valid[:, None, :], float("-inf")).amax(-1))
        return self.classifier(self.dropout(torch.cat(pooled, 1)))


def train(texts: Sequence[str], labels: Sequence[str], vocab_size: int = 20_000, dim: int = 128,
          windows: Sequence[int] = (3, 4, 5), filters: int = 100, dropout: float = 0.5, steps: int = 600,
          batch_size: int = 50, lr: float = 1e-3, max_len: int = 64, seed: int = 0,
          time_limit: Optional[float] = None, log_every: int = 0):
    """(model, vocab, classes, history)."""
    from .training import fit_classifier

    torch.manual_seed(seed)
    vocab = Vocab.build(texts, max_size=vocab_size)
    classes = sorted(set(labels))
    model = TextCNN(len(vocab), len(classes), dim, windows, filters, dropout)
    hist = fit_classifier(model, vocab, classes, texts, labels, steps, batch_size, lr, max_len, seed,
                          time_limit=time_limit, log_every=log_every, desc="textcnn")
    return model, vocab, classes, hist
