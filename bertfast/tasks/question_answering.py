"""Extractive question answering with a BertForQuestionAnswering: overlapping windows over a long
context, the best span over all of them, and SQuAD's answer F1."""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import List, Optional, Tuple

import torch

from .common import model_device, padded_batch, progress, resolve_max_length


def best_span(start_logits: torch.Tensor, end_logits: torch.Tensor, allowed: torch.Tensor,
              max_answer_len: int = 30) -> Optional[Tuple[int, int, float]]:
    """(start, end, score) maximising start_logit + end_logit over token pairs with start <= end,
    end - start + 1 <= max_answer_len and both tokens allowed (context tokens); None if no pair is."""
    if max_answer_len < 1:
        raise ValueError(f"max_answer_len must be >= 1, got {max_answer_len!r}")
    s, e = start_logits.float(), end_logits.float()
    n = s.shape[0]
    ok = allowed.bool()
    scores = s[:, None] + e[None, :]
    i = torch.arange(n)
    valid = (i[None, :] >= i[:, None]) & (i[None, :] - i[:, None] < max_answer_len) & ok[:, None] & ok[None, :]
    if not bool(valid.any()):
        return None
    scores = scores.masked_fill(~valid, float("-inf"))
    flat = int(scores.argmax())
    return flat // n, flat % n, float(scores.reshape(-1)[flat])


def normalize_answer(s: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation or articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def answer_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


def qa_windows(tokenizer, question: str, context: str, max_seq_len: int = 384, doc_stride: int = 128) -> List[dict]:
    """[CLS] question [SEP] context-window [SEP] features over a long context: windows of the context
    tokens that overlap by doc_stride tokens. Each: input_ids, token_type_ids, offsets (char span in
    the context for context tokens), is_context (bool per token)."""
    q, c = tokenizer.encodings([question, context], add_special_tokens=False)
    room = max_seq_len - len(q.ids) - 3
    if room < 1:
        raise ValueError(f"the question is {len(q.ids)} tokens, too long for max_seq_len={max_seq_len} "
                         f"(needs room for 3 special tokens and at least one context token)")
    if not c.ids:
        raise ValueError("the context is empty")
    stride = max(1, room - max(0, min(doc_stride, room - 1)))
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    out = []
    start = 0
    while True:
        end = min(start + room, len(c.ids))
        ids = [cls] + q.ids + [sep] + c.ids[start:end] + [sep]
        n_q = len(q.ids) + 2
        out.append({"input_ids": ids, "token_type_ids": [0] * n_q + [1] * (end - start + 1),
                    "offsets": [(0, 0)] * n_q + list(c.offsets[start:end]) + [(0, 0)],
                    "is_context": [False] * n_q + [True] * (end - start) + [False]})
        if end >= len(c.ids):
            return out
        start += stride


def span_probability(start_logits: torch.Tensor, end_logits: torch.Tensor, allowed: torch.Tensor, start: int,
                     end: int) -> float:
    """P(start) * P(end), each a softmax over the allowed (context) tokens of one window: the
    span's probability, as transformers' question-answering pipeline scores it."""
    ok = allowed.bool()
    p_start = start_logits.float().masked_fill(~ok, float("-inf")).softmax(-1)
    p_end = end_logits.float().masked_fill(~ok, float("-inf")).softmax(-1)
    return float(p_start[start] * p_end[end])


@torch.no_grad()
def answer_batch(model, tokenizer, pairs, max_answer_len: int = 30, max_seq_len: Optional[int] = None,
                 doc_stride: int = 128, batch_size: int = 32, progress_bar: bool = False) -> List[dict]:
    """answer() of each (question, context) pair; the windows of all pairs go through the model
    batch_size at a time (right-padded: padding is never a context token, so never an answer).
    max_seq_len: tokens per window (default: 384, or the model's limit when lower, as transformers'
    pipeline does); a window longer than the model holds is refused.
    progress_bar: a bar on stderr for runs of a few batches or more."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    max_seq_len = min(384, resolve_max_length(model, tokenizer, None)) if max_seq_len is None else \
        resolve_max_length(model, tokenizer, max_seq_len, "max_seq_len")
    model.eval()
    wins = [(n, w) for n, (q, c) in enumerate(pairs) for w in qa_windows(tokenizer, q, c, max_seq_len, doc_stride)]
    best: List[Optional[Tuple[int, int, float]]] = [None] * len(pairs)
    with progress(progress_bar, len(wins), batch_size, "answer", unit="window") as bar:
        for i in range(0, len(wins), batch_size):
            chunk = wins[i:i + batch_size]
            ids, mask, tt = padded_batch([w["input_ids"] for _, w in chunk], tokenizer.pad_token_id,
                                         model_device(model), [w["token_type_ids"] for _, w in chunk])
            out = model(ids, mask, tt)
            for row, (n, w) in enumerate(chunk):
                k = len(w["input_ids"])
                s_l, e_l, ctx = out.start_logits[row, :k].cpu(), out.end_logits[row, :k].cpu(), torch.tensor(
                    w["is_context"])
                span = best_span(s_l, e_l, ctx, max_answer_len)
                if span is None:
                    continue
                # windows compete by the span's probability in its own window
                p = span_probability(s_l, e_l, ctx, span[0], span[1])
                if best[n] is None or p > best[n][2]:
                    best[n] = (w["offsets"][span[0]][0], w["offsets"][span[1]][1], p)
            bar(len(chunk))
    res = []
    for (_, context), b in zip(pairs, best):
        if b is None:
            res.append({"answer": "", "start": 0, "end": 0, "score": 0.0})
        else:
            res.append({"answer": context[b[0]:b[1]], "start": b[0], "end": b[1], "score": b[2]})
    return res


def answer(model, tokenizer, question: str, context: str, max_answer_len: int = 30,
           max_seq_len: Optional[int] = None, doc_stride: int = 128) -> dict:
    """Extractive QA: the best span (start <= end, at most max_answer_len tokens, inside the context)
    over all windows of the context: {'answer', 'start', 'end' (char offsets in context), 'score'}.
    score: the span's probability (span_probability: P(start) * P(end) in its window), as in
    transformers' pipeline; 0.0 with an empty answer when no span is allowed."""
    return answer_batch(model, tokenizer, [(question, context)], max_answer_len, max_seq_len, doc_stride)[0]
