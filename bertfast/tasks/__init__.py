"""Inference tasks on top of the encoder: fill-mask, embeddings, similarity search, clustering,
classification, NLI, tagging (NER/POS) and extractive QA, one module per task family:

    mask_filling.py         fill_mask, topk_tokens
    embedding.py            embed, search, cluster; pool, pool_packed, cosine_topk, similarity, kmeans
    classification.py       classify, nli; decode_classification
    tagging.py              tag, tag_batch; piece_tags, word_labels, bio_spans
    question_answering.py   answer, answer_batch, qa_windows; best_span, normalize_answer, answer_f1
    common.py               device, length limit, padded batches, label names, TruncationWarning,
                            the JSONL reader and truncation notes the commands share
    commands.py             the commands (`bertfast embed`, `classify`, ...): inputs, checks, JSON out
    shards.py               sharded, resumable embedding of a corpus into a folder (torchrun)

The names below load their module on first use (`import bertfast.tasks` imports no torch).
Each task is split into a model call and a pure decoding function on tensors/lists (`topk_tokens`,
`pool`, `cosine_topk`, `kmeans`, `decode_classification`, `word_labels`, `bio_spans`, `best_span`),
so the decoding rules are unit-testable without a model.

    from bertfast import tasks
    tasks.fill_mask(mlm_model, tok, "The capital of France is [MASK].")
    emb = tasks.embed(encoder, tok, texts, pooling="mean")          # (N, hidden) float32
    scores, idx = tasks.search(encoder, tok, ["query"], corpus_texts, k=5)
    tasks.answer(qa_model, tok, "Who?", "Ada wrote it.")            # {'answer': 'Ada', 'start': 0, ...}
"""
from .._lazy import lazy_exports

# public name -> the module that defines it; loaded on first use, so that `bertfast embed --help`
# and argument errors (bertfast.tasks.commands) answer before torch is imported
_LAZY = {
    **dict.fromkeys(("fill_mask", "topk_tokens"), "mask_filling"),
    **dict.fromkeys(("embed", "search", "cluster", "pool", "pool_packed", "cosine_topk", "similarity", "kmeans"),
                    "embedding"),
    **dict.fromkeys(("classify", "nli", "decode_classification", "packed_logits"), "classification"),
    **dict.fromkeys(("tag", "tag_batch", "piece_tags", "word_labels", "bio_spans"), "tagging"),
    **dict.fromkeys(("answer", "answer_batch", "qa_windows", "best_span", "span_probability", "normalize_answer",
                     "answer_f1"),
                    "question_answering"),
    **dict.fromkeys(("TruncationWarning", "iter_jsonl", "truncation_notes"), "common"),
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
