"""One small training loop for every classic system: AdamW, linear warm-up then linear decay,
gradient clipping, an optional wall-clock limit, and a record of the losses and seconds."""
from __future__ import annotations

import math
import time
from typing import Callable, Iterator, List, Optional, Sequence

import torch


def shuffled_batches(n: int, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Index batches over range(n), reshuffled every epoch, forever. The last short batch of an
    epoch is kept unless it holds a single example (batch norm cannot train on one)."""
    if n < 1:
        raise ValueError("there are no training examples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            if n - i == 1 and n > 1:
                break
            yield order[i:i + batch_size]


def fit(model: torch.nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterator,
        steps: int, lr: float = 1e-3, warmup: int = 0, weight_decay: float = 0.0, clip: float = 1.0,
        time_limit: Optional[float] = None, log_every: int = 0, params: Optional[Sequence] = None,
        desc: str = "train") -> dict:
    """Runs `steps` optimizer steps of loss_fn(next(batches)). Stops early after time_limit
    seconds. Returns {'losses': per step, 'steps', 'seconds'}."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.05, 1.0 - (step - warmup) / max(1, steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses: List[float] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        loss = loss_fn(next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            recent = losses[-log_every:]
            print(f"{desc} step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            break
    model.eval()
    return {"losses": losses, "steps": len(losses), "seconds": time.perf_counter() - t0}


def mean_first_last(losses: Sequence[float], k: int = 10):
    """(mean of the first k losses, mean of the last k): how far the loss fell."""
    k = max(1, min(k, len(losses) // 2 or 1))
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def fit_classifier(model: torch.nn.Module, vocab, classes: Sequence[str], texts: Sequence[str],
                   labels: Sequence[str], steps: int, batch_size: int, lr: float, max_len: int, seed: int = 0,
                   params: Optional[Sequence] = None, **kw) -> dict:
    """Cross-entropy training of a `model(ids (B, L), lengths (B,)) -> logits` sentence classifier."""
    import torch.nn.functional as F

    from .text import pad_batch

    ids = [vocab.encode(t, max_len=max_len) or [vocab.unk] for t in texts]
    y = torch.tensor([list(classes).index(t) for t in labels])

    def step_loss(idx):
        batch, lengths = pad_batch([ids[i] for i in idx.tolist()])
        return F.cross_entropy(model(batch, lengths), y[idx])

    return fit(model, step_loss, shuffled_batches(len(ids), batch_size, seed), steps, lr=lr, params=params, **kw)


@torch.no_grad()
def predict_classes(model: torch.nn.Module, vocab, classes: Sequence[str], texts: Sequence[str],
                    max_len: int = 64, batch_size: int = 128) -> List[str]:
    """The best class of each text under a `model(ids, lengths) -> logits` classifier."""
    from .text import pad_batch

    model.eval()
    out: List[str] = []
    for i in range(0, len(texts), batch_size):
        batch, lengths = pad_batch([vocab.encode(t, max_len=max_len) or [vocab.unk] for t in texts[i:i + batch_size]])
        out += [classes[j] for j in model(batch, lengths).argmax(-1).tolist()]
    return out


def accuracy(pred: Sequence, gold: Sequence) -> float:
    if len(pred) != len(gold) or not gold:
        raise ValueError(f"pred and gold must be equally long and non-empty, got {len(pred)} and {len(gold)}")
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


def majority_accuracy(train_labels: Sequence, test_labels: Sequence) -> float:
    """The trivial baseline: always answer the training set's most frequent label."""
    from collections import Counter

    top = Counter(train_labels).most_common(1)[0][0]
    return accuracy([top] * len(test_labels), test_labels)


@torch.no_grad()
def perplexity(loss_and_tokens: Callable[[Sequence[str]], tuple], texts: Sequence[str], batch_size: int) -> float:
    """exp of the token-weighted mean loss over the texts, in batches: loss_and_tokens(batch texts)
    -> (mean loss per predicted token, number of predicted tokens)."""
    total, n = 0.0, 0
    for i in range(0, len(texts), batch_size):
        loss, k = loss_and_tokens(texts[i:i + batch_size])
        total += float(loss) * k
        n += k
    return math.exp(total / max(n, 1))
