"""Sequence classification (single- and multi-label) and NLI with a BertForSequenceClassification
(or a family member's). The texts go to the packed encoder (Tokenizer.pack: no padding) and the
head reads each sequence's first row through cu_seqlens; padded batches serve only heads whose
forward this module does not know."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..models import BertForSequenceClassification
from ..models.heads import SequenceClassificationHead
from .common import id2label_of, model_device, progress, resolve_max_length, token_types, warn_truncated


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


def packed_logits(model, batch) -> Optional[torch.Tensor]:
    """(n, num_labels) logits of a packed batch (a Tokenizer.pack batch on the model's device),
    computed as the head's own forward computes them from the padded batch; None for a head whose
    forward is not one of those below (the caller then runs the padded forward)."""
    encoder = getattr(model, getattr(model, "base_model_prefix", "bert"), None)
    forward = getattr(type(model), "forward", None)
    if encoder is None or not hasattr(encoder, "forward_packed"):
        return None
    args = (batch.input_ids, batch.cu_seqlens, batch.max_seqlen, token_types(encoder, batch.token_type_ids))
    if forward is BertForSequenceClassification.forward:  # the pooled [CLS]
        return model.classifier(model.dropout(encoder.forward_packed(*args).pooler_output))
    if forward is SequenceClassificationHead.forward:  # the family: classify() on each first token
        out = encoder.forward_packed(*args, pool=False)
        n, total = len(batch), out.last_hidden_state.shape[0]
        starts = batch.cu_seqlens[:-1].long().clamp(max=max(total - 1, 0))
        first = out.last_hidden_state.index_select(0, starts).view(n, 1, -1)
        return model.classify(first, None)
    return None


@torch.no_grad()
def classify(model, tokenizer, texts, text_pairs=None, multi_label: Optional[bool] = None, threshold: float = 0.5,
             top_k: Optional[int] = None, max_length: Optional[int] = None, batch_size: int = 32,
             packed: bool = True, precision: Optional[str] = None, progress_bar: bool = False):
    """Labels of a BertForSequenceClassification: softmax (best label and score) or, for a
    multi-label model (config.problem_type == 'multi_label_classification', or multi_label=True),
    every label with sigmoid >= threshold. Texts (pairs) over max_length tokens are cut to it, with
    one TruncationWarning. packed=False runs right-padded batches instead of packed ones.
    precision: the CPU GEMMs' precision for this call, "fp32", "bf16" or "int8" (see
    bertfast.models.precision; None: the model's own setting).
    progress_bar: a bar on stderr for runs of a few batches or more."""
    if precision is not None:
        from ..models.precision import inference_precision

        with inference_precision(model, precision):
            return classify(model, tokenizer, texts, text_pairs, multi_label, threshold, top_k, max_length,
                            batch_size, packed, progress_bar=progress_bar)
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    if text_pairs is not None:
        text_pairs = [text_pairs] if isinstance(text_pairs, str) else list(text_pairs)
    if multi_label is None:
        multi_label = getattr(model.config, "problem_type", None) == "multi_label_classification"
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    model.eval()
    max_length = resolve_max_length(model, tokenizer, max_length)
    full = tokenizer.encodings(texts, text_pairs)
    warn_truncated("classify", sum(len(e.ids) > max_length for e in full), len(texts), max_length)
    out = []
    with progress(progress_bar, len(texts), batch_size, "classify") as bar:
        for i in range(0, len(texts), batch_size):
            pairs = text_pairs[i:i + batch_size] if text_pairs is not None else None
            logits = None
            if packed:
                batch = tokenizer.pack(texts[i:i + batch_size], pairs, truncation=True, max_length=max_length)
                logits = packed_logits(model, batch.to(model_device(model)))
            if logits is None:
                batch = tokenizer(texts[i:i + batch_size], pairs, padding=True, truncation=True, max_length=max_length,
                                  return_tensors="pt").to(model_device(model))
                encoder = getattr(model, getattr(model, "base_model_prefix", "bert"), model)
                logits = model(batch["input_ids"], batch["attention_mask"],
                               token_types(encoder, batch["token_type_ids"])).logits
            logits = logits.cpu()
            out += decode_classification(logits, id2label_of(model), multi_label, threshold, top_k)
            bar(len(texts[i:i + batch_size]))
    return out[0] if single else out


def nli(model, tokenizer, premises, hypotheses, **kw):
    """3-way NLI (entailment / neutral / contradiction, as the model's id2label names them) over pairs."""
    return classify(model, tokenizer, premises, hypotheses, multi_label=False, **kw)
