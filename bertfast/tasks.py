"""Inference tasks on top of the encoder: fill-mask, embeddings, similarity search, clustering,
classification, NLI, tagging (NER/POS) and extractive QA.

Each task is split into a model call and a pure decoding function on tensors/lists (`topk_tokens`,
`pool`, `cosine_topk`, `kmeans`, `decode_classification`, `word_labels`, `bio_spans`, `best_span`),
so the decoding rules are unit-testable without a model.

    from bertfast import tasks
    tasks.fill_mask(mlm_model, tok, "The capital of France is [MASK].")
    emb = tasks.embed(encoder, tok, texts, pooling="mean")          # (N, hidden) float32
    scores, idx = tasks.search(encoder, tok, ["query"], corpus_texts, k=5)
    tasks.answer(qa_model, tok, "Who?", "Ada wrote it.")            # {'answer': 'Ada', 'start': 0, ...}
"""
from __future__ import annotations

import argparse
import json
import os
import re
import string
import sys
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


def fill_mask(model, tokenizer, text, top_k: int = 5) -> List[List[dict]]:
    """For each [MASK] of `text` (a str, or a list of str), the top_k replacements:
    [{'token', 'token_id', 'score', 'sequence'}]. Returns one list per mask of one text, or a list of
    those per text for a list input."""
    single = isinstance(text, str)
    texts = [text] if single else list(text)
    results = []
    model.eval()
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
                filled = ids.clone()
                filled[pos] = c["token_id"]
                c["sequence"] = tokenizer.decode(filled.tolist())
        results.append(per_mask)
    return results[0] if single else results


@torch.no_grad()
def embed(model, tokenizer, texts, pooling: str = "mean", layer: int = -1, batch_size: int = 32,
          max_length: Optional[int] = None, normalize: bool = False,
          cuda_graphs: Optional[bool] = None) -> torch.Tensor:
    """(N, hidden) float32 sentence embeddings. layer indexes hidden_states (0 = embeddings,
    -1 = last layer). Texts are sorted by length into batches, so padding (which the encoder
    drops anyway) stays small; rows come back in input order.

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
    encoder = getattr(model, "bert", model)
    n_layers = encoder.config.num_hidden_layers
    if not -(n_layers + 1) <= layer <= n_layers:
        raise ValueError(f"layer must be in [{-(n_layers + 1)}, {n_layers}] for a {n_layers}-layer model, got {layer}")
    encoder.eval()
    dev = _device(encoder)
    max_length = max_length or min(tokenizer.model_max_length, encoder.config.max_position_embeddings)
    lengths = [len(e.ids) for e in tokenizer.encodings(texts, truncation=True, max_length=max_length)]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    out = torch.empty(len(texts), encoder.config.hidden_size)
    want_all = layer != -1
    run = encoder
    if (dev.type == "cuda" if cuda_graphs is None else cuda_graphs) and not want_all \
            and hasattr(encoder, "forward_packed"):
        from .graphs import cached_encoder

        run = cached_encoder(encoder, max_tokens=min(batch_size * max_length, 16384), max_seqs=batch_size,
                             max_seqlen=min(max_length, encoder.config.max_position_embeddings))
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        batch = tokenizer([texts[j] for j in idx], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(dev)
        if run is encoder:
            res = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                          output_hidden_states=want_all)
        else:
            res = run(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        hidden = res.hidden_states[layer] if want_all else res.last_hidden_state
        out[idx] = pool(hidden.float(), batch["attention_mask"], pooling).cpu()
    return F.normalize(out, dim=-1) if normalize else out


def search(model, tokenizer, queries, corpus, k: int = 5, pooling: str = "mean", corpus_embeddings=None,
           cuda_graphs: Optional[bool] = None):
    """Top-k cosine search of each query over the corpus texts: (scores, indices), (n_queries, k)."""
    q = embed(model, tokenizer, queries, pooling, cuda_graphs=cuda_graphs)
    c = corpus_embeddings if corpus_embeddings is not None else embed(model, tokenizer, corpus, pooling,
                                                                     cuda_graphs=cuda_graphs)
    return cosine_topk(q, c, k)


def cluster(model, tokenizer, texts, k: int, seed: int = 0, pooling: str = "mean",
            cuda_graphs: Optional[bool] = None):
    """k-means cluster ids (N,) of the texts' embeddings, and the centroids."""
    return kmeans(embed(model, tokenizer, texts, pooling, cuda_graphs=cuda_graphs), k, seed=seed)


def _id2label(model) -> Dict[int, str]:
    m = model.config.id2label or {}
    return {i: m.get(i, f"LABEL_{i}") for i in range(model.config.num_labels)}


@torch.no_grad()
def classify(model, tokenizer, texts, text_pairs=None, multi_label: Optional[bool] = None, threshold: float = 0.5,
             top_k: Optional[int] = None, max_length: Optional[int] = None, batch_size: int = 32):
    """Labels of a BertForSequenceClassification: softmax (best label and score) or, for a
    multi-label model (config.problem_type == 'multi_label_classification', or multi_label=True),
    every label with sigmoid >= threshold."""
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    if text_pairs is not None:
        text_pairs = [text_pairs] if isinstance(text_pairs, str) else list(text_pairs)
    if multi_label is None:
        multi_label = getattr(model.config, "problem_type", None) == "multi_label_classification"
    model.eval()
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


@torch.no_grad()
def tag(model, tokenizer, text, max_length: Optional[int] = None) -> dict:
    """Token classification of one text (a str, split by the tokenizer's pre-tokenizer, or a list
    of words): {'words', 'labels' (one per word), 'spans' ([{'type', 'start', 'end', 'text'}], BIO
    merged; with a str input, start/end are character offsets into it)}."""
    model.eval()
    max_length = max_length or tokenizer.model_max_length
    if isinstance(text, str):
        enc = tokenizer.encodings(text, truncation=True, max_length=max_length)[0]
        # word ids from the pre-tokenizer; char span of each word from its pieces' offsets
        spans_of: Dict[int, List[int]] = {}
        for w, (a, b) in zip(enc.word_ids, enc.offsets):
            if w is not None:
                spans_of.setdefault(w, [a, b])[1] = b
        words = [text[spans_of[w][0]:spans_of[w][1]] for w in sorted(spans_of)]
        char = [tuple(spans_of[w]) for w in sorted(spans_of)]
    else:
        words = [str(w) for w in text]
        raw = tokenizer._tok
        raw.enable_truncation(max_length)
        try:
            enc = raw.encode(words, is_pretokenized=True)
        finally:
            raw.no_truncation()
        char = None
    ids = torch.tensor([enc.ids], device=_device(model))
    tt = torch.tensor([enc.type_ids], device=_device(model))
    logits = model(ids, torch.ones_like(ids), tt).logits[0].cpu()
    id2label = _id2label(model)
    word_ids = list(enc.word_ids)
    # word ids restart per sequence; one text has one sequence, so they are word indices
    wl = [id2label[i] for i in word_labels(piece_tags(model, logits, word_ids), word_ids)]
    words = words[:len(wl)]
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
def answer(model, tokenizer, question: str, context: str, max_answer_len: int = 30, max_seq_len: int = 384,
           doc_stride: int = 128) -> dict:
    """Extractive QA: the best span (start <= end, at most max_answer_len tokens, inside the context)
    over all windows of the context: {'answer', 'start', 'end' (char offsets in context), 'score'}."""
    model.eval()
    best = None
    for w in qa_windows(tokenizer, question, context, max_seq_len, doc_stride):
        ids = torch.tensor([w["input_ids"]], device=_device(model))
        out = model(ids, torch.ones_like(ids), torch.tensor([w["token_type_ids"]], device=ids.device))
        span = best_span(out.start_logits[0].cpu(), out.end_logits[0].cpu(), torch.tensor(w["is_context"]),
                         max_answer_len)
        if span is not None and (best is None or span[2] > best[2]):
            a, b = w["offsets"][span[0]][0], w["offsets"][span[1]][1]
            best = (a, b, span[2])
    if best is None:
        return {"answer": "", "start": 0, "end": 0, "score": float("-inf")}
    return {"answer": context[best[0]:best[1]], "start": best[0], "end": best[1], "score": best[2]}


# ---- CLI ------------------------------------------------------------------------------------


def _read_lines(path: str, what: str) -> List[str]:
    if not os.path.isfile(path):
        raise ValueError(f"{what}: {path!r} is not a file")
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    if not lines:
        raise ValueError(f"{what}: {path!r} holds no non-blank lines")
    return lines


def _texts_arg(values: List[str], what: str) -> List[str]:
    """A single existing file argument is read as one text per line; otherwise the values are texts."""
    if len(values) == 1 and os.path.isfile(values[0]):
        return _read_lines(values[0], what)
    return values


def _load(cls_name: str, folder: str):
    from . import models
    from .tokenizer import Tokenizer

    if not os.path.isdir(folder):
        raise ValueError(f"--model must be a checkpoint folder (config.json + weights + tokenizer), got {folder!r}")
    tok = Tokenizer.from_pretrained(folder)
    cls = getattr(models, cls_name)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, info = cls.from_pretrained(folder, output_loading_info=True)
    if cls_name == "BertForMaskedLM" and any(k.startswith("cls.predictions") for k in info["missing_keys"]):
        raise ValueError(f"--model {folder!r} has no MLM head (cls.predictions.*): fill-mask needs a "
                         f"pre-trained BertForPreTraining/BertForMaskedLM checkpoint")
    for w in caught:  # only now: a refused model should give one error line, not warnings first
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(dev).eval(), tok


def _embed_to_folder(out: str) -> bool:
    """embed's --out: a .npy file, or a folder (an existing one, or a name without an extension) of shards."""
    folder = os.path.isdir(out) or not os.path.splitext(out)[1]
    if not folder and not out.endswith(".npy"):
        raise ValueError(f"--out must name a .npy file or a folder (no extension), got {out!r}")
    if not folder and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"--out must be a folder under torchrun (shards per process), got {out!r}")
    return folder


def cli_main(cmd: str, argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog=f"bertfast {cmd}")
    p.add_argument("--model", required=True, help="checkpoint folder (config.json, weights, tokenizer)")
    if cmd == "fill-mask":
        p.add_argument("text", nargs="+", help="text(s) with [MASK]")
        p.add_argument("--top-k", type=int, default=5)
    elif cmd == "embed":
        p.add_argument("inputs", nargs="+", help="texts, or one file with a text per line")
        p.add_argument("--pooling", default="mean", choices=["mean", "cls", "max"])
        p.add_argument("--layer", type=int, default=-1)
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--normalize", action="store_true")
        p.add_argument("--out", required=True, help="a .npy file (N, hidden) float32, or a folder: shards + "
                       "index.json, split over torchrun's processes, resumable (see bertfast.embed_shards)")
        p.add_argument("--shard-size", type=int, help="texts per shard of a folder --out (default: one per process)")
    elif cmd == "search":
        p.add_argument("--corpus", required=True, help="file with one text per line")
        p.add_argument("--query", required=True, nargs="+")
        p.add_argument("--k", type=int, default=5)
        p.add_argument("--pooling", default="mean", choices=["mean", "cls", "max"])
    elif cmd == "cluster":
        p.add_argument("file", help="file with one text per line")
        p.add_argument("--k", type=int, required=True)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--pooling", default="mean", choices=["mean", "cls", "max"])
    else:
        print(f"bertfast: tasks handles fill-mask, embed, search, cluster, not {cmd!r}", file=sys.stderr)
        return 2
    if cmd != "fill-mask":
        p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                       help="run the eager forward on CUDA (default: CUDA graphs per token bucket)")
    args = p.parse_args(list(argv))
    try:
        return _run_cli(cmd, args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"bertfast {cmd}: error: {e}", file=sys.stderr)
        return 1


def _run_cli(cmd: str, args) -> int:
    if cmd == "fill-mask":
        text = " ".join(args.text)
        if "[MASK]" not in text:
            raise ValueError(f"the text has no [MASK] token: {text!r}")
        model, tok = _load("BertForMaskedLM", args.model)
        for i, cands in enumerate(fill_mask(model, tok, text, args.top_k)):
            for c in cands:
                print(json.dumps({"mask": i, "token": c["token"], "score": round(c["score"], 6),
                                  "sequence": c["sequence"]}))
    elif cmd == "embed":
        to_folder = _embed_to_folder(args.out)
        texts = _texts_arg(args.inputs, "embed")
        if to_folder:
            from .embed_shards import run

            summary = run(args, texts, lambda: _load("BertModel", args.model))
            if summary:  # rank 0's
                print(json.dumps(summary))
            return 0
        model, tok = _load("BertModel", args.model)
        emb = embed(model, tok, texts, args.pooling, args.layer, args.batch_size, normalize=args.normalize,
                    cuda_graphs=None if args.cuda_graphs else False)
        import numpy as np

        tmp = args.out + ".tmp.npy"
        np.save(tmp, emb.numpy().astype(np.float32))
        os.replace(tmp, args.out)  # never a half-written output
        print(json.dumps({"out": args.out, "shape": list(emb.shape)}))
    elif cmd == "search":
        corpus = _read_lines(args.corpus, "--corpus")
        if args.k < 1:
            raise ValueError(f"--k must be >= 1, got {args.k}")
        model, tok = _load("BertModel", args.model)
        queries = [" ".join(args.query)]
        scores, idx = search(model, tok, queries, corpus, args.k, args.pooling,
                             cuda_graphs=None if args.cuda_graphs else False)
        for rank, (s, i) in enumerate(zip(scores[0].tolist(), idx[0].tolist()), 1):
            print(json.dumps({"rank": rank, "score": round(s, 6), "line": i + 1, "text": corpus[i]}))
    elif cmd == "cluster":
        texts = _read_lines(args.file, "cluster")
        if not 1 <= args.k <= len(texts):
            raise ValueError(f"--k must be in [1, {len(texts)}] (the number of lines), got {args.k}")
        model, tok = _load("BertModel", args.model)
        labels, _ = cluster(model, tok, texts, args.k, args.seed, args.pooling,
                            cuda_graphs=None if args.cuda_graphs else False)
        for i, (lab, t) in enumerate(zip(labels.tolist(), texts), 1):
            print(json.dumps({"line": i, "cluster": lab, "text": t}))
    return 0
