"""ELMo-style features (Peters et al. 2018): a bidirectional LSTM language model whose layers,
mixed with learned weights, feed a downstream model.

Two language models share the word embeddings and the softmax: a forward LSTM stack reads
<bos> w1 .. wn and predicts each next word; a backward stack reads the sentence right to left
and predicts each previous word. Neither direction sees the word it predicts, which is why
ELMo needs two models where BERT's masked LM needs one.

For a downstream task the language model is frozen; each word gets one vector per layer,
[forward; backward] (layer 0 is the embedding, repeated for both halves), and the task learns
a softmax-normalised weight per layer and a scale (the "scalar mix"). Here the mixed word
vectors are pooled over the sentence (mean and max) and a one-hidden-layer MLP classifies them.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .text import Vocab, pad_batch


def reverse_within_length(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """x (B, L, ...) with each row's first lengths[b] positions reversed, padding left in place."""
    B, L = x.shape[:2]
    t = torch.arange(L, device=x.device)[None, :].expand(B, L)
    idx = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return x.gather(1, idx.view(B, L, *([1] * (x.dim() - 2))).expand_as(x))


class BiLM(nn.Module):
    def __init__(self, vocab_size: int, hidden: int = 128, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, hidden=hidden, layers=layers, dropout=dropout)
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.embedding = nn.Embedding(vocab_size, hidden, padding_idx=Vocab.pad)
        self.forward_lstms = nn.ModuleList(nn.LSTM(hidden, hidden, batch_first=True) for _ in range(layers))
        self.backward_lstms = nn.ModuleList(nn.LSTM(hidden, hidden, batch_first=True) for _ in range(layers))
        self.dropout = nn.Dropout(dropout)
        self.softmax = nn.Linear(hidden, vocab_size)  # shared by both directions, as in ELMo
        self.num_layers = layers + 1  # the embedding counts as layer 0

    def _stack(self, lstms, x):
        outs = []
        for i, lstm in enumerate(lstms):
            h, _ = lstm(self.dropout(x))
            x = h + x if i > 0 else h  # residual connections above the first layer
            outs.append(x)
        return outs

    def layers(self, ids: torch.Tensor, lengths: torch.Tensor):
        """(forward outputs, backward outputs): one (B, L, hidden) per LSTM layer each. Right
        padding never reaches a valid position: the forward stack is causal and the backward
        stack reads each sentence reversed within its length."""
        emb = self.embedding(ids)
        fwd = self._stack(self.forward_lstms, emb)
        bwd = [reverse_within_length(h, lengths)
               for h in self._stack(self.backward_lstms, reverse_within_length(emb, lengths))]
        return emb, fwd, bwd

    def lm_loss(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Mean of the forward and backward next/previous-word cross entropies; ids hold
        <bos> w1 .. wn <eos> rows, right-padded with <pad>."""
        _, fwd, bwd = self.layers(ids, lengths)
        V = self.softmax.out_features
        fwd_logits = self.softmax(self.dropout(fwd[-1][:, :-1]))  # position t predicts t + 1
        bwd_logits = self.softmax(self.dropout(bwd[-1][:, 1:]))  # position t predicts t - 1
        f = F.cross_entropy(fwd_logits.reshape(-1, V), ids[:, 1:].reshape(-1), ignore_index=Vocab.pad)
        b = F.cross_entropy(bwd_logits.reshape(-1, V), ids[:, :-1].reshape(-1), ignore_index=Vocab.pad)
        return (f + b) / 2

    def features(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(num_layers, B, L, 2 * hidden): [forward; backward] per layer, the embedding first."""
        emb, fwd, bwd = self.layers(ids, lengths)
        return torch.stack([torch.cat([emb, emb], -1)] + [torch.cat(p, -1) for p in zip(fwd, bwd)])


class ScalarMix(nn.Module):
    """gamma * sum_k softmax(s)_k * layer_k: the task's learned weighting of the layers."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.scalars = nn.Parameter(torch.zeros(num_layers))
        self.gamma = nn.Parameter(torch.ones(()))

    def forward(self, layers: torch.Tensor) -> torch.Tensor:
        w = self.scalars.softmax(0).view(-1, *([1] * (layers.dim() - 1)))
        return self.gamma * (w * layers).sum(0)


class ELMoClassifier(nn.Module):
    """Frozen biLM -> scalar mix -> [mean; max] over the sentence's words -> dropout -> MLP."""

    def __init__(self, bilm: BiLM, num_classes: int, dropout: float = 0.3):
        super().__init__()
        self.config = dict(num_classes=num_classes, dropout=dropout)
        self.bilm = bilm
        for p in self.bilm.parameters():
            p.requires_grad_(False)
        self.mix = ScalarMix(bilm.num_layers)
        width = 2 * bilm.embedding.embedding_dim
        self.dropout = nn.Dropout(dropout)
        # [mean; max] over the words, standardised across the batch (pooled LM states share a large
        # common offset: without it a few hundred steps barely move the classifier), one hidden layer
        self.classifier = nn.Sequential(nn.BatchNorm1d(2 * width), nn.Linear(2 * width, width), nn.ReLU(),
                                        nn.Dropout(dropout), nn.Linear(width, num_classes))

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, L) words only (no <bos>/<eos>), right-padded; lengths (B,)."""
        B = ids.shape[0]
        lm_ids = torch.cat([torch.full((B, 1), Vocab.bos), ids, torch.full((B, 1), Vocab.pad)], 1)
        lm_ids[torch.arange(B), lengths + 1] = Vocab.eos
        self.bilm.eval()
        with torch.no_grad():
            layers = self.bilm.features(lm_ids, lengths + 2)[:, :, 1:-1]  # the words' positions
        mixed = self.mix(layers)
        valid = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).unsqueeze(-1)
        mean = (mixed * valid).sum(1) / valid.sum(1).clamp_min(1)
        top = mixed.masked_fill(~valid, float("-inf")).amax(1)
        return self.classifier(self.dropout(torch.cat([mean, top], -1)))


def lm_batch(vocab: Vocab, texts: Sequence[str], max_len: int = 64):
    return pad_batch([vocab.encode(t, bos=True, eos=True, max_len=max_len) for t in texts])


def train_lm(texts: Sequence[str], vocab_size: int = 10_000, hidden: int = 128, layers: int = 2,
             dropout: float = 0.1, steps: int = 1000, batch_size: int = 32, lr: float = 2e-3, max_len: int = 64,
             seed: int = 0, time_limit: Optional[float] = None, log_every: int = 0, vocab: Optional[Vocab] = None):
    """(bilm, vocab, history): the bidirectional LM trained on unlabelled sentences."""
    from .training import fit, shuffled_batches

    torch.manual_seed(seed)
    vocab = vocab or Vocab.build(texts, max_size=vocab_size)
    model = BiLM(len(vocab), hidden, layers, dropout)
    texts = list(texts)

    def step_loss(idx):
        return model.lm_loss(*lm_batch(vocab, [texts[i] for i in idx.tolist()], max_len))

    hist = fit(model, step_loss, shuffled_batches(len(texts), batch_size, seed), steps, lr=lr,
               time_limit=time_limit, log_every=log_every, desc="elmo biLM")
    return model, vocab, hist


def lm_perplexity(model: BiLM, vocab: Vocab, texts: Sequence[str], max_len: int = 64, batch_size: int = 64) -> float:
    """exp of the mean forward/backward cross entropy per predicted token."""
    from .training import perplexity

    def loss_and_tokens(batch):
        ids, lengths = lm_batch(vocab, batch, max_len)
        return model.lm_loss(ids, lengths), int((lengths - 1).sum())

    model.eval()
    return perplexity(loss_and_tokens, texts, batch_size)


def unigram_perplexity(vocab: Vocab, texts: Sequence[str], max_len: int = 64) -> float:
    """The trivial baseline: the training unigram distribution (add-one smoothed), ignoring context."""
    p = (vocab.counts + 1) / (vocab.counts + 1).sum()
    nll, n = 0.0, 0
    for t in texts:
        ids = vocab.encode(t, eos=True, max_len=max_len - 1)
        nll -= float(torch.log(p[ids]).sum())
        n += len(ids)
    return float(torch.exp(torch.tensor(nll / n)))


def train_classifier(bilm: BiLM, vocab: Vocab, texts: Sequence[str], labels: Sequence[str], steps: int = 400,
                     batch_size: int = 32, lr: float = 5e-3, max_len: int = 64, dropout: float = 0.3, seed: int = 0,
                     time_limit: Optional[float] = None, log_every: int = 0):
    """(classifier, classes, history): the scalar mix and the linear layer over frozen biLM features."""
    from .training import fit_classifier

    torch.manual_seed(seed)
    classes: List[str] = sorted(set(labels))
    model = ELMoClassifier(bilm, len(classes), dropout)
    hist = fit_classifier(model, vocab, classes, texts, labels, steps, batch_size, lr, max_len, seed,
                          time_limit=time_limit, log_every=log_every, desc="elmo classifier")
    return model, classes, hist
