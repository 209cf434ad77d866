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

Each task is split into a model call and a pure decoding function on tensors/lists (`topk_tokens`,
`pool`, `cosine_topk`, `kmeans`, `decode_classification`, `word_labels`, `bio_spans`, `best_span`),
so the decoding rules are unit-testable without a model.

    from bertfast import tasks
    tasks.fill_mask(mlm_model, tok, "The capital of France is [MASK].")
    emb = tasks.embed(encoder, tok, texts, pooling="mean")          # (N, hidden) float32
    scores, idx = tasks.search(encoder, tok, ["query"], corpus_texts, k=5)
    tasks.answer(qa_model, tok, "Who?", "Ada wrote it.")            # {'answer': 'Ada', 'start': 0, ...}
"""
from .classification import classify, decode_classification, nli
from .common import TruncationWarning, iter_jsonl, truncation_notes
from .embedding import cluster, cosine_topk, embed, kmeans, pool, pool_packed, search, similarity
from .mask_filling import fill_mask, topk_tokens
from .question_answering import answer, answer_batch, answer_f1, best_span, normalize_answer, qa_windows
from .tagging import bio_spans, piece_tags, tag, tag_batch, word_labels

__all__ = [
    "fill_mask", "topk_tokens",
    "embed", "search", "cluster", "pool", "pool_packed", "cosine_topk", "similarity", "kmeans",
    "classify", "nli", "decode_classification",
    "tag", "tag_batch", "piece_tags", "word_labels", "bio_spans",
    "answer", "answer_batch", "qa_windows", "best_span", "normalize_answer", "answer_f1",
    "TruncationWarning", "iter_jsonl", "truncation_notes",
]
