"""Real data found on any machine with Python (nothing downloaded, nothing written for a test).

- `docstring_topics`: sentences of the Python standard library's docstrings, labelled with the
  package they document (asyncio, email, logging, ...). A topic-classification task: the text
  is real English written by the stdlib's authors, the label comes from the file's location.
- `reversal_pairs`: a transduction task derived from real words: a word's characters -> the
  same characters reversed (Sutskever et al.'s sanity task for sequence-to-sequence models).
- `split`: a deterministic train/test split by a hash of each text, so a sentence never lands
  on both sides and the split does not move when the corpus grows.
"""
from __future__ import annotations

import ast
import functools
import glob
import hashlib
import os
import sysconfig
from typing import List, Optional, Sequence, Tuple

from ..testing import split_sentences

# stdlib packages with several hundred docstring sentences each (Python 3.9 - 3.13)
TOPICS = ("asyncio", "email", "logging", "tkinter", "unittest", "xml")


def _docstrings(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, ValueError, OSError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                out.append(doc)
    return out


def docstring_topics(packages: Sequence[str] = TOPICS, min_words: int = 4, max_words: int = 60,
                     stdlib: Optional[str] = None) -> Tuple[List[str], List[str]]:
    """(sentences, labels): every distinct docstring sentence of min_words..max_words words in the
    given stdlib packages (their tests excluded), labelled with the package's name. Packages the
    installed Python lacks are skipped; at least two must be found."""
    texts, labels = _docstring_topics(tuple(packages), min_words, max_words,
                                      stdlib or sysconfig.get_paths()["stdlib"])
    return list(texts), list(labels)


@functools.lru_cache(maxsize=4)  # parsing the packages takes seconds; tests and compare ask repeatedly
def _docstring_topics(packages, min_words, max_words, stdlib):
    seen = set()
    texts, labels = [], []
    for pkg in packages:
        files = sorted(glob.glob(os.path.join(stdlib, pkg, "**", "*.py"), recursive=True))
        files = [f for f in files if "test" not in os.path.relpath(f, os.path.join(stdlib, pkg))]
        for path in files:
            for doc in _docstrings(path):
                for s in split_sentences(doc, min_words=min_words):
                    if len(s.split()) <= max_words and s not in seen:
                        seen.add(s)
                        texts.append(s)
                        labels.append(pkg)
    if len(set(labels)) < 2:
        raise ValueError(f"found docstrings of fewer than two of the packages {list(packages)} under {stdlib!r}")
    return tuple(texts), tuple(labels)


def in_test_split(text: str, test_fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return (h % 10_000) < test_fraction * 10_000


def split(texts: Sequence[str], labels: Sequence, test_fraction: float = 0.2):
    """((train_texts, train_labels), (test_texts, test_labels)) by a hash of each text."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    train, test = ([], []), ([], [])
    for t, y in zip(texts, labels):
        side = test if in_test_split(t, test_fraction) else train
        side[0].append(t)
        side[1].append(y)
    return train, test


def reversal_pairs(sentences: Sequence[str], min_len: int = 2, max_len: int = 10) -> Tuple[List[str], List[str]]:
    """(sources, targets): each distinct alphabetic word of min_len..max_len letters in the
    sentences, spelled with spaces between letters, and the same letters reversed."""
    seen = set()
    src, tgt = [], []
    for s in sentences:
        for w in s.lower().split():
            w = w.strip(".,;:!?()[]\"'`")
            if w.isalpha() and w.isascii() and min_len <= len(w) <= max_len and w not in seen:
                seen.add(w)
                src.append(" ".join(w))
                tgt.append(" ".join(reversed(w)))
    return src, tgt
