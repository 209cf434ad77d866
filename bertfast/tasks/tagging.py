"""Token classification (NER/POS) with a BertForTokenClassification, CRF head included: word
labels from word-piece labels, BIO-merged spans."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from .common import id2label_of, model_device, padded_batch, progress, resolve_max_length, warn_truncated


def word_labels(piece_labels: Sequence[int], word_ids: Sequence[Optional[int]],
                n_words: Optional[int] = None) -> List[Optional[int]]:
    """Word-level labels from word-piece labels: each word takes its first piece's label;
    special tokens (word id None) and continuation pieces are skipped.

    With n_words (pre-split words), the result is aligned by word index: entry w is word w's
    label, and a word without pieces (an empty string, a zero-width space, a control character,
    or a word cut by truncation) gets None, so no label slides onto the next word. Without it,
    the labels of the words that have pieces, in order (a text split by the pre-tokenizer, whose
    words are exactly those)."""
    out: Dict[int, int] = {}
    for lab, w in zip(piece_labels, word_ids):
        if w is not None and w not in out:
            out[w] = int(lab)
    if n_words is None:
        return [out[w] for w in sorted(out)]
    return [out.get(w) for w in range(n_words)]


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
    full = tokenizer.word_encodings([words])[0]
    enc = tokenizer.word_encodings([words], max_length)[0]
    # words whose pieces truncation removed get no label: the words from the first of them on are
    # left out (a word that never had pieces is kept, with the label None)
    cut = {w for w in full.word_ids if w is not None} - {w for w in enc.word_ids if w is not None}
    return enc, words[:min(cut, default=len(words))], None, len(full.ids)


def _tag_decode(model, logits: torch.Tensor, enc, words, char, text, id2label) -> dict:
    # word ids restart per sequence; one text has one sequence, so they are word indices
    word_ids = list(enc.word_ids)
    if char is None:  # pre-split words: aligned by word index, None for a word without pieces
        wl = [None if i is None else id2label[i]
              for i in word_labels(piece_tags(model, logits, word_ids), word_ids, len(words))]
    else:
        wl = [id2label[i] for i in word_labels(piece_tags(model, logits, word_ids), word_ids)]
    words = words[:len(wl)]  # words cut by truncation get no label
    spans = bio_spans(["O" if t is None else t for t in wl])
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
    dev = model_device(model)
    return model.decode(logits[None].to(dev), torch.tensor([first], device=dev))[0].tolist()


@torch.no_grad()
def tag_batch(model, tokenizer, texts, max_length: Optional[int] = None, batch_size: int = 32,
              progress_bar: bool = False) -> List[dict]:
    """tag() of each text (a str or a list of words), batch_size texts per forward. Words past
    max_length tokens get no label; one TruncationWarning says how many texts lost some.
    progress_bar: a bar on stderr for runs of a few batches or more."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    model.eval()
    max_length = resolve_max_length(model, tokenizer, max_length)
    coded = [_tag_encode(tokenizer, t, max_length) for t in texts]
    warn_truncated("tag", sum(c[3] > max_length for c in coded), len(coded), max_length,
                    " (their last words get no label)")
    id2label = id2label_of(model)
    out = []
    with progress(progress_bar, len(coded), batch_size, "tag") as bar:
        for i in range(0, len(coded), batch_size):
            chunk = coded[i:i + batch_size]
            ids, mask, tt = padded_batch([c[0].ids for c in chunk], tokenizer.pad_token_id, model_device(model),
                                         [c[0].type_ids for c in chunk])
            logits = model(ids, mask, tt).logits.cpu()
            for row, (enc, words, char, _), text in zip(logits, chunk, texts[i:i + batch_size]):
                out.append(_tag_decode(model, row[:len(enc.ids)], enc, words, char, text, id2label))
            bar(len(chunk))
    return out


def tag(model, tokenizer, text, max_length: Optional[int] = None) -> dict:
    """Token classification of one text (a str, split by the tokenizer's pre-tokenizer, or a list
    of words): {'words', 'labels' (one per word), 'spans' ([{'type', 'start', 'end', 'text'}], BIO
    merged; with a str input, start/end are character offsets into it)}. A pre-split word with no
    word piece (an empty string, a zero-width space) gets the label None, explicitly: labels are
    aligned with words by index, never shifted."""
    return tag_batch(model, tokenizer, [text], max_length)[0]
