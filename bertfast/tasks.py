"""Inference tasks on top of the encoder: fill-mask, embeddings, similarity search, clustering,
classification, NLI, tagging (NER/POS) and extractive QA. Their commands (`bertfast embed`,
`classify`, ...) live in bertfast/task_commands.py.

Each task is split into a model call and a pure decoding function on tensors/lists (`topk_tokens`,
`pool`, `cosine_topk`, `kmeans`, `decode_classification`, `word_labels`, `bio_spans`, `best_span`),
so the decoding rules are unit-testable without a model.

Why one file (~580 lines): the decoding functions are shared across the model calls (pool by
embed/search/cluster, word_labels and bio_spans by tagging, best_span and qa_windows by QA and
by fine-tuning's evaluation), and a reader follows a task from its model call to its decoding
without leaving the page; the command line around them is bertfast/task_commands.py.

    from bertfast import tasks
    tasks.fill_mask(mlm_model, tok, "The capital of France is [MASK].")
    emb = tasks.embed(encoder, tok, texts, pooling="mean")          # (N, hidden) float32
    scores, idx = tasks.search(encoder, tok, ["query"], corpus_texts, k=5)
    tasks.answer(qa_model, tok, "Who?", "Ada wrote it.")            # {'answer': 'Ada', 'start': 0, ...}
"""
from __future__ import annotations

import contextlib
import json
import re
import string
import sys
import warnings
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# ---- decoding (pure functions) --------------------------------------------------------------


def topk_tokens(logits: torch.Tensor, k: int, id_to_token=None, exclude: Sequence[int] = ()) -> List[List[dict]]:
    """Top-k of each row of (n, vocab) logits as [{'token_id', 'token', 'score'}] with softmax
    scores; ids in `exclude` (special tokens) are never proposed."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k!r}")
    logits = logits.float().clone()
    if len(exclude):
        logits[:, list(exclude)] = float("-inf")
    probs = logits.softmax(-1)
    k = min(k, probs.shape[-1])
    scores, ids = probs.topk(k, dim=-1)
    return [[{"token_id": int(i), "token": id_to_token(int(i)) if id_to_token else None, "score": float(s)}
             for s, i in zip(row_s, row_i)] for row_s, row_i in zip(scores, ids)]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """(B, S, H) -> (B, H): the first token ('cls') or the mean over valid tokens ('mean'); 'max'
    takes the max over valid tokens."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    if pooling == "max":
        return hidden.masked_fill(mask == 0, float("-inf")).amax(1)
    raise ValueError(f"pooling must be 'mean', 'cls' or 'max', got {pooling!r}")


def cosine_topk(queries: torch.Tensor, corpus: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices), each (n_queries, k): the k corpus rows most cosine-similar to each query."""
    if queries.dim() == 1:
        queries = queries.unsqueeze(0)
    if corpus.dim() != 2 or queries.shape[-1] != corpus.shape[-1]:
        raise ValueError(f"queries (.., {queries.shape[-1]}) and corpus {tuple(corpus.shape)} must be 2-D "
                         "with the same embedding size")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    sim = similarity(queries, corpus)
    return sim.topk(min(k, corpus.shape[0]), dim=-1)


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix (len(a), len(b))."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 100, cosine: bool = True):
    """k-means (k-means++ initialisation, Lloyd iterations) with a seeded generator.
    Returns (labels (n,), centroids (k, d)). cosine=True clusters L2-normalised rows."""
    x = x.float()
    n = x.shape[0]
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, {n}] (the number of points), got {k!r}")
    if cosine:
        x = F.normalize(x, dim=-1)
    g = torch.Generator().manual_seed(seed)
    cent = [x[torch.randint(n, (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(cent)).min(1).values ** 2
        if float(d2.sum()) <= 0:
            cent.append(x[torch.randint(n, (1,), generator=g)].squeeze(0))
        else:
            cent.append(x[torch.multinomial(d2 / d2.sum(), 1, generator=g)].squeeze(0))
    c = torch.stack(cent)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(0)
    return labels, c


def decode_classification(logits: torch.Tensor, id2label: Dict[int, str], multi_label: bool = False,
                          threshold: float = 0.5, top_k: Optional[int] = None) -> List:
    """Softmax (single-label: the best label and its score, or the top_k) or sigmoid (multi-label:
    every label whose probability >= threshold, best first)."""
    out = []
    for row in logits.float():
        if multi_label:
            p = torch.sigmoid(row)
            keep = [(id2label[i], float(p[i])) for i in range(len(p)) if float(p[i]) >= threshold]
            out.append([{"label": lab, "score": s} for lab, s in sorted(keep, key=lambda t: -t[1])])
        else:
            p = row.softmax(-1)
            order = p.argsort(descending=True).tolist()
            ranked = [{"label": id2label[i], "score": float(p[i])} for i in order]
            out.append(ranked[:top_k] if top_k else ranked[0])
    return out


def word_labels(piece_labels: Sequence[int], word_ids: Sequence[Optional[int]]) -> List[int]:
    """Word-level labels from word-piece labels: each word takes its first piece's label;
    special tokens (word id None) and continuation pieces are skipped."""
    out: Dict[int, int] = {}
    for lab, w in zip(piece_labels, word_ids):
        if w is not None and w not in out:
            out[w] = int(lab)
    return [out[w] for w in sorted(out)]


def bio_spans(tags: Sequence[str]) -> List[dict]:
    """Merge BIO (or IOB1/IOBES-ish) tags into spans [{'type', 'start', 'end'}] with end exclusive,
    in word indices. An I-X that does not continue an X span starts a new one (conlleval's rule);
    E-/S- close a span, O and B- end the current one."""
    spans: List[dict] = []
    cur = None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, typ = tag.partition("-") if tag not in ("O", "") else ("O", "", "")
        if prefix not in ("B", "I", "E", "S", "O"):
            prefix, typ = "B", tag  # a bare label: each word its own span unless repeated
            if cur is not None and cur["type"] == typ:
                prefix = "I"
        if cur is not None and (prefix in ("O", "B", "S") or typ != cur["type"]):
            cur["end"] = i
            spans.append(cur)
            cur = None
        if prefix in ("B", "I", "E", "S") and cur is None:
            cur = {"type": typ, "start": i, "end": i + 1}
        if prefix in ("E", "S") and cur is not None:
            cur["end"] = i + 1
            spans.append(cur)
            cur = None
    return spans


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


# ---- model calls ----------------------------------------------------------------------------


def _device(model):
    return next(model.parameters()).device


class TruncationWarning(UserWarning):
    """Texts longer than the model's limit were cut to it (the command line prints these as notes)."""


def _warn_truncated(task: str, n_cut: int, total: int, max_length: int, remedy: str = "") -> None:
    if n_cut:
        warnings.warn(f"{task}: {n_cut} of {total} texts are longer than {max_length} tokens (the model's limit) "
                      f"and were cut to it{remedy}", TruncationWarning, stacklevel=4)  # caller, through torch.no_grad


def _max_length(model, tokenizer, max_length: Optional[int]) -> int:
    encoder = getattr(model, "bert", model)
    return max_length or min(tokenizer.model_max_length, encoder.config.max_position_embeddings)


def _batch_tensors(rows: Sequence[Sequence[int]], pad_id: int, device, type_rows=None):
    """Right-padded (ids, attention_mask, token_type_ids) int64 tensors of token id lists."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    tt = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
        if type_rows is not None:
            tt[i, :len(r)] = torch.tensor(type_rows[i], dtype=torch.long)
    return ids.to(device), mask.to(device), tt.to(device)


def fill_mask(model, tokenizer, text, top_k: int = 5) -> List[List[dict]]:
    """For each [MASK] of `text` (a str, or a list of str), the top_k replacements:
    [{'token', 'token_id', 'score', 'sequence'}]; 'sequence' fills that mask and keeps the text's
    other masks as [MASK]. Returns one list per mask of one text, or a list of those per text for a
    list input."""
    single = isinstance(text, str)
    texts = [text] if single else list(text)
    results = []
    model.eval()
    # the text's own markers are dropped from 'sequence', its other [MASK]s are kept
    frame = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
    for t in texts:
        if tokenizer.mask_token not in t:
            raise ValueError(f"fill_mask: the text has no {tokenizer.mask_token} token: {t!r}")
        batch = tokenizer(t, truncation=True, return_tensors="pt").to(_device(model))
        with torch.no_grad():
            logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits[0]
        ids = batch["input_ids"][0]
        where = (ids == tokenizer.mask_token_id).nonzero().squeeze(-1)
        if where.numel() == 0:
            raise ValueError(f"fill_mask: the {tokenizer.mask_token} of the text was truncated away (text longer "
                             f"than {tokenizer.model_max_length} tokens)")
        per_mask = topk_tokens(logits[where].cpu(), top_k, tokenizer.convert_ids_to_tokens,
                               exclude=sorted(tokenizer.special_ids))
        for pos, cands in zip(where.tolist(), per_mask):
            for c in cands:
                filled = ids.tolist()
                filled[pos] = c["token_id"]
                c["sequence"] = tokenizer.decode([i for i in filled if i not in frame], skip_special_tokens=False)
        results.append(per_mask)
    return results[0] if single else results


def _windows(ids: List[int], size: int, stride: int) -> List[List[int]]:
    """Windows of `size` tokens every `stride` tokens, the last one ending at the text's end."""
    if len(ids) <= size:
        return [ids]
    starts = list(range(0, len(ids) - size, stride)) + [len(ids) - size]
    return [ids[a:a + size] for a in starts]


@torch.no_grad()
def embed(model, tokenizer, texts, pooling: str = "mean", layer: int = -1, batch_size: int = 32,
          max_length: Optional[int] = None, normalize: bool = False, long_texts: str = "truncate",
          window_stride: Optional[int] = None, cuda_graphs: Optional[bool] = None) -> torch.Tensor:
    """(N, hidden) float32 sentence embeddings. layer indexes hidden_states (0 = embeddings,
    -1 = last layer). Texts are sorted by length into batches, so padding (which the encoder
    drops anyway) stays small; rows come back in input order.

    A text longer than max_length tokens (default: the model's limit) is cut to it, with one
    TruncationWarning saying how many were (long_texts='truncate'), or embedded whole
    (long_texts='windows') as the mean of the pooled embeddings of overlapping windows of
    max_length tokens, one every window_stride content tokens (default: half a window).

    cuda_graphs: serve the batches through CUDA graphs per total-token bucket (bertfast.graphs,
    captured on first use and kept with the model); the default on CUDA for the last layer.
    False runs the eager forward; True on a CPU runs the same bucketing eagerly."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("texts must hold at least one text")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if long_texts not in ("truncate", "windows"):
        raise ValueError(f"long_texts must be 'truncate' or 'windows', got {long_texts!r}")
    encoder = getattr(model, "bert", model)
    n_layers = encoder.config.num_hidden_layers
    if not -(n_layers + 1) <= layer <= n_layers:
        raise ValueError(f"layer must be in [{-(n_layers + 1)}, {n_layers}] for a {n_layers}-layer model, got {layer}")
    encoder.eval()
    dev = _device(encoder)
    max_length = _max_length(encoder, tokenizer, max_length)
    size = max_length - 2  # content tokens per row, between [CLS] and [SEP]
    if size < 1:
        raise ValueError(f"max_length must leave room for [CLS], [SEP] and one token, got {max_length}")
    stride = window_stride or max(1, size // 2)
    if not 1 <= stride <= size:
        raise ValueError(f"window_stride must be in [1, {size}] (the content tokens of a window), got {window_stride}")
    rows, owner = [], []
    n_long = 0
    for i, enc in enumerate(tokenizer.encodings(texts, add_special_tokens=False)):
        n_long += len(enc.ids) > size
        pieces = _windows(enc.ids, size, stride) if long_texts == "windows" else [enc.ids[:size]]
        rows += [[tokenizer.cls_token_id] + w + [tokenizer.sep_token_id] for w in pieces]
        owner += [i] * len(pieces)
    if long_texts == "truncate":
        _warn_truncated("embed", n_long, len(texts), max_length,
                        "; long_texts='windows' (--long-texts windows) embeds them whole as the mean over "
                        "overlapping windows")
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    pooled = torch.empty(len(rows), encoder.config.hidden_size)
    want_all = layer != -1
    run = encoder
    if (dev.type == "cuda" if cuda_graphs is None else cuda_graphs) and not want_all \
            and hasattr(encoder, "forward_packed"):
        from .graphs import cached_encoder

        run = cached_encoder(encoder, max_tokens=min(batch_size * max_length, 16384), max_seqs=batch_size,
                             max_seqlen=min(max_length, encoder.config.max_position_embeddings))
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        ids, mask, tt = _batch_tensors([rows[j] for j in idx], tokenizer.pad_token_id, dev)
        res = encoder(ids, mask, tt, output_hidden_states=want_all) if run is encoder else run(ids, mask, tt)
        hidden = res.hidden_states[layer] if want_all else res.last_hidden_state
        pooled[idx] = pool(hidden.float(), mask, pooling).cpu()
    if len(rows) == len(texts):
        out = pooled
    else:  # windows: each text the mean of its windows
        who = torch.tensor(owner)
        out = torch.zeros(len(texts), pooled.shape[1]).index_add_(0, who, pooled)
        out /= torch.bincount(who, minlength=len(texts)).unsqueeze(1).to(out.dtype)
    return F.normalize(out, dim=-1) if normalize else out


def search(model, tokenizer, queries, corpus, k: int = 5, pooling: str = "mean", corpus_embeddings=None,
           cuda_graphs: Optional[bool] = None, long_texts: str = "truncate"):
    """Top-k cosine search of each query over the corpus texts: (scores, indices), (n_queries, k)."""
    q = embed(model, tokenizer, queries, pooling, cuda_graphs=cuda_graphs, long_texts=long_texts)
    c = corpus_embeddings if corpus_embeddings is not None else embed(model, tokenizer, corpus, pooling,
                                                                     cuda_graphs=cuda_graphs, long_texts=long_texts)
    return cosine_topk(q, c, k)


def cluster(model, tokenizer, texts, k: int, seed: int = 0, pooling: str = "mean",
            cuda_graphs: Optional[bool] = None, long_texts: str = "truncate"):
    """k-means cluster ids (N,) of the texts' embeddings, and the centroids."""
    return kmeans(embed(model, tokenizer, texts, pooling, cuda_graphs=cuda_graphs, long_texts=long_texts), k,
                  seed=seed)


def _id2label(model) -> Dict[int, str]:
    m = model.config.id2label or {}
    return {i: m.get(i, f"LABEL_{i}") for i in range(model.config.num_labels)}


@torch.no_grad()
def classify(model, tokenizer, texts, text_pairs=None, multi_label: Optional[bool] = None, threshold: float = 0.5,
             top_k: Optional[int] = None, max_length: Optional[int] = None, batch_size: int = 32):
    """Labels of a BertForSequenceClassification: softmax (best label and score) or, for a
    multi-label model (config.problem_type == 'multi_label_classification', or multi_label=True),
    every label with sigmoid >= threshold. Texts (pairs) over max_length tokens are cut to it, with
    one TruncationWarning."""
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    if text_pairs is not None:
        text_pairs = [text_pairs] if isinstance(text_pairs, str) else list(text_pairs)
    if multi_label is None:
        multi_label = getattr(model.config, "problem_type", None) == "multi_label_classification"
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    model.eval()
    max_length = _max_length(model, tokenizer, max_length)
    full = tokenizer.encodings(texts, text_pairs)
    _warn_truncated("classify", sum(len(e.ids) > max_length for e in full), len(texts), max_length)
    out = []
    for i in range(0, len(texts), batch_size):
        pairs = text_pairs[i:i + batch_size] if text_pairs is not None else None
        batch = tokenizer(texts[i:i + batch_size], pairs, padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(_device(model))
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits.cpu()
        out += decode_classification(logits, _id2label(model), multi_label, threshold, top_k)
    return out[0] if single else out


def nli(model, tokenizer, premises, hypotheses, **kw):
    """3-way NLI (entailment / neutral / contradiction, as the model's id2label names them) over pairs."""
    return classify(model, tokenizer, premises, hypotheses, multi_label=False, **kw)


def _tag_encode(tokenizer, text, max_length: int):
    """(encoding, words, char spans of the words or None, untruncated piece count) of one text for tagging."""
    if isinstance(text, str):
        full = tokenizer.encodings(text)[0]
        enc = tokenizer.encodings(text, truncation=True, max_length=max_length)[0]
        # word ids from the pre-tokenizer; char span of each word from its pieces' offsets
        spans_of: Dict[int, List[int]] = {}
        for w, (a, b) in zip(full.word_ids, full.offsets):
            if w is not None:
                spans_of.setdefault(w, [a, b])[1] = b
        words = [text[spans_of[w][0]:spans_of[w][1]] for w in sorted(spans_of)]
        return enc, words, [tuple(spans_of[w]) for w in sorted(spans_of)], len(full.ids)
    words = [str(w) for w in text]
    raw = tokenizer._tok
    full = raw.encode(words, is_pretokenized=True)
    raw.enable_truncation(max_length)
    try:
        enc = raw.encode(words, is_pretokenized=True)
    finally:
        raw.no_truncation()
    return enc, words, None, len(full.ids)


def _tag_decode(model, logits: torch.Tensor, enc, words, char, text, id2label) -> dict:
    # word ids restart per sequence; one text has one sequence, so they are word indices
    word_ids = list(enc.word_ids)
    wl = [id2label[i] for i in word_labels(piece_tags(model, logits, word_ids), word_ids)]
    words = words[:len(wl)]  # words cut by truncation get no label
    spans = bio_spans(wl)
    for s in spans:
        if char is not None:
            s["start_char"], s["end_char"] = char[s["start"]][0], char[s["end"] - 1][1]
            s["text"] = text[s["start_char"]:s["end_char"]]
        else:
            s["text"] = " ".join(words[s["start"]:s["end"]])
    return {"words": words, "labels": wl, "spans": spans}


def piece_tags(model, logits: torch.Tensor, word_ids: Sequence[Optional[int]]) -> List[int]:
    """A tag id per word piece of one sequence's (S, labels) logits: the argmax of each piece, or
    for a model with a CRF head (config.use_crf) the Viterbi path over the first piece of each
    word (other pieces get -100; word_labels reads first pieces only)."""
    if getattr(model, "crf", None) is None:
        return logits.argmax(-1).tolist()
    seen, first = set(), []
    for w in word_ids:
        first.append(w is not None and w not in seen)
        seen.add(w)
    dev = _device(model)
    return model.decode(logits[None].to(dev), torch.tensor([first], device=dev))[0].tolist()


@torch.no_grad()
def tag_batch(model, tokenizer, texts, max_length: Optional[int] = None, batch_size: int = 32) -> List[dict]:
    """tag() of each text (a str or a list of words), batch_size texts per forward. Words past
    max_length tokens get no label; one TruncationWarning says how many texts lost some."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    model.eval()
    max_length = _max_length(model, tokenizer, max_length)
    coded = [_tag_encode(tokenizer, t, max_length) for t in texts]
    _warn_truncated("tag", sum(c[3] > max_length for c in coded), len(coded), max_length,
                    " (their last words get no label)")
    id2label = _id2label(model)
    out = []
    for i in range(0, len(coded), batch_size):
        chunk = coded[i:i + batch_size]
        ids, mask, tt = _batch_tensors([c[0].ids for c in chunk], tokenizer.pad_token_id, _device(model),
                                       [c[0].type_ids for c in chunk])
        logits = model(ids, mask, tt).logits.cpu()
        for row, (enc, words, char, _), text in zip(logits, chunk, texts[i:i + batch_size]):
            out.append(_tag_decode(model, row[:len(enc.ids)], enc, words, char, text, id2label))
    return out


def tag(model, tokenizer, text, max_length: Optional[int] = None) -> dict:
    """Token classification of one text (a str, split by the tokenizer's pre-tokenizer, or a list
    of words): {'words', 'labels' (one per word), 'spans' ([{'type', 'start', 'end', 'text'}], BIO
    merged; with a str input, start/end are character offsets into it)}."""
    return tag_batch(model, tokenizer, [text], max_length)[0]


def qa_windows(tokenizer, question: str, context: str, max_seq_len: int = 384, doc_stride: int = 128) -> List[dict]:
    """[CLS] question [SEP] context-window [SEP] features over a long context: windows of the context
    tokens that overlap by doc_stride tokens. Each: input_ids, token_type_ids, offsets (char span in
    the context for context tokens), is_context (bool per token)."""
    q = tokenizer._tok.encode(question, add_special_tokens=False)
    c = tokenizer._tok.encode(context, add_special_tokens=False)
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


@torch.no_grad()
def answer_batch(model, tokenizer, pairs, max_answer_len: int = 30, max_seq_len: int = 384, doc_stride: int = 128,
                 batch_size: int = 32) -> List[dict]:
    """answer() of each (question, context) pair; the windows of all pairs go through the model
    batch_size at a time (right-padded: padding is never a context token, so never an answer)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    model.eval()
    wins = [(n, w) for n, (q, c) in enumerate(pairs) for w in qa_windows(tokenizer, q, c, max_seq_len, doc_stride)]
    best: List[Optional[Tuple[int, int, float]]] = [None] * len(pairs)
    for i in range(0, len(wins), batch_size):
        chunk = wins[i:i + batch_size]
        ids, mask, tt = _batch_tensors([w["input_ids"] for _, w in chunk], tokenizer.pad_token_id, _device(model),
                                       [w["token_type_ids"] for _, w in chunk])
        out = model(ids, mask, tt)
        for row, (n, w) in enumerate(chunk):
            k = len(w["input_ids"])
            span = best_span(out.start_logits[row, :k].cpu(), out.end_logits[row, :k].cpu(),
                             torch.tensor(w["is_context"]), max_answer_len)
            if span is not None and (best[n] is None or span[2] > best[n][2]):
                best[n] = (w["offsets"][span[0]][0], w["offsets"][span[1]][1], span[2])
    res = []
    for (_, context), b in zip(pairs, best):
        if b is None:
            res.append({"answer": "", "start": 0, "end": 0, "score": float("-inf")})
        else:
            res.append({"answer": context[b[0]:b[1]], "start": b[0], "end": b[1], "score": b[2]})
    return res


def answer(model, tokenizer, question: str, context: str, max_answer_len: int = 30, max_seq_len: int = 384,
           doc_stride: int = 128) -> dict:
    """Extractive QA: the best span (start <= end, at most max_answer_len tokens, inside the context)
    over all windows of the context: {'answer', 'start', 'end' (char offsets in context), 'score'}."""
    return answer_batch(model, tokenizer, [(question, context)], max_answer_len, max_seq_len, doc_stride)[0]


# ---- helpers shared with the commands (bertfast.task_commands, bertfast.train) ------------


def iter_jsonl(lines, name: str, what: str):
    """(line number, object) of each non-blank line of a JSONL stream; an error names the line."""
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what}: {name} line {i} is not JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{what}: {name} line {i} must be a JSON object, got {type(rec).__name__}")
        yield i, rec


@contextlib.contextmanager
def truncation_notes(cmd: str):
    """A command's TruncationWarnings as plain `bertfast CMD: note: ...` lines on stderr once it is
    done (other warnings as Python shows them), not as Python warning blocks."""
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TruncationWarning)
            yield
    finally:  # outside the recording context, or showwarning would record into the list it walks
        for w in caught:
            if issubclass(w.category, TruncationWarning):
                print(f"bertfast {cmd}: note: {w.message}", file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
