"""fill-mask: the top-k tokens for each [MASK] of a text, from a BertForMaskedLM/BertForPreTraining."""
from __future__ import annotations

from typing import List, Sequence

import torch

from .common import model_device, resolve_max_length


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
    limit = resolve_max_length(model, tokenizer, None)  # the model's limit (RoBERTa's is below its table)
    for t in texts:
        if tokenizer.mask_token not in t:
            raise ValueError(f"fill_mask: the text has no {tokenizer.mask_token} token: {t!r}")
        batch = tokenizer(t, truncation=True, max_length=limit, return_tensors="pt").to(model_device(model))
        with torch.no_grad():
            logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits[0]
        ids = batch["input_ids"][0]
        where = (ids == tokenizer.mask_token_id).nonzero().squeeze(-1)
        if where.numel() == 0:
            raise ValueError(f"fill_mask: the {tokenizer.mask_token} of the text was truncated away (text longer "
                             f"than {limit} tokens)")
        per_mask = topk_tokens(logits[where].cpu(), top_k, tokenizer.convert_ids_to_tokens,
                               exclude=sorted(tokenizer.special_ids))
        for pos, cands in zip(where.tolist(), per_mask):
            for c in cands:
                filled = ids.tolist()
                filled[pos] = c["token_id"]
                c["sequence"] = tokenizer.decode([i for i in filled if i not in frame], skip_special_tokens=False)
        results.append(per_mask)
    return results[0] if single else results
