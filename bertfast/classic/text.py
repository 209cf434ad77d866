"""Text in and out of the classic systems: a word or character vocabulary, padding, reading
the user's files, and saving a model folder (config.json + vocab.json + model.safetensors).

The classic systems predate WordPiece: they see lower-cased words (or characters), keep the
`max_size` most frequent, and map the rest to <unk>.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
LEVELS = ("word", "char")


def tokenize(text: str, level: str = "word") -> List[str]:
    """Lower-cased words and punctuation marks ('word'), or the characters ('char')."""
    if level == "word":
        return _WORD.findall(text.lower())
    if level == "char":
        return list(" ".join(text.split()))
    raise ValueError(f"level must be one of {LEVELS}, got {level!r}")


class Vocab:
    """Token <-> id. Ids 0..3 are <pad>, <unk>, <bos>, <eos>; the rest by falling frequency
    (ties alphabetical, so the same corpus gives the same vocabulary)."""

    def __init__(self, tokens: Sequence[str], level: str = "word"):
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        self.level = level
        self.itos = list(SPECIALS) + [t for t in tokens if t not in SPECIALS]
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        self.counts: Optional[torch.Tensor] = None  # training-corpus frequency per id, when built

    pad, unk, bos, eos = 0, 1, 2, 3

    @classmethod
    def build(cls, texts: Iterable[str], max_size: int = 10_000, min_count: int = 1, level: str = "word") -> "Vocab":
        if max_size < len(SPECIALS) + 1:
            raise ValueError(f"max_size must be >= {len(SPECIALS) + 1} (room for the specials), got {max_size}")
        counter = Counter()
        for t in texts:
            counter.update(tokenize(t, level))
        kept = sorted((c for c in counter.items() if c[1] >= min_count), key=lambda kv: (-kv[1], kv[0]))
        kept = kept[: max_size - len(SPECIALS)]
        if not kept:
            raise ValueError("the texts hold no tokens: nothing to build a vocabulary from")
        v = cls([t for t, _ in kept], level)
        counts = torch.zeros(len(v))
        counts[len(SPECIALS):] = torch.tensor([float(c) for _, c in kept])
        counts[cls.unk] = float(sum(counter.values()) - counts.sum())
        v.counts = counts
        return v

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def id(self, token: str) -> int:
        return self.stoi.get(token, self.unk)

    def encode(self, text: str, bos: bool = False, eos: bool = False, max_len: Optional[int] = None) -> List[int]:
        ids = [self.id(t) for t in tokenize(text, self.level)]
        if max_len is not None:
            ids = ids[: max_len - bos - eos]
        return ([self.bos] if bos else []) + ids + ([self.eos] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos:
                break
            if i in (self.pad, self.bos):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else "<unk>")
        return ("" if self.level == "char" else " ").join(out)

    def to_dict(self) -> dict:
        d = {"level": self.level, "itos": self.itos}
        if self.counts is not None:
            d["counts"] = [int(c) for c in self.counts.tolist()]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        v = cls(d["itos"][len(SPECIALS):], d.get("level", "word"))
        if "counts" in d:
            v.counts = torch.tensor(d["counts"], dtype=torch.float32)
        return v


def pad_batch(seqs: Sequence[Sequence[int]], pad: int = Vocab.pad,
              min_len: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, L) right-padded, lengths (B,)); L is at least min_len."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    L = max(int(lengths.max()) if len(seqs) else 0, min_len)
    out = torch.full((len(seqs), L), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out, lengths


# ---- the user's files ---------------------------------------------------------------------


def read_lines(files: Sequence[str], what: str = "--train") -> List[str]:
    """Non-blank lines of text files (prose: paragraphs are joined and split into sentences)."""
    from ..testing import split_sentences

    if isinstance(files, str):
        files = [files]
    if not files:
        raise ValueError(f"{what} needs at least one text file")
    out: List[str] = []
    for path in files:
        if not os.path.isfile(path):
            raise ValueError(f"{what}: {path!r} is not a file")
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        out += split_sentences(text, min_words=1)
    if not out:
        raise ValueError(f"{what}: {list(files)} hold no text")
    return out


def _read_tsv(path: str, what: str, layout: str) -> Tuple[List[str], List[str]]:
    """The two tab-separated fields of each non-blank line, as two lists."""
    if not os.path.isfile(path):
        raise ValueError(f"{what}: {path!r} is not a file")
    first, second = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            a, tab, b = line.rstrip("\n").partition("\t")
            if not tab or not a.strip() or not b.strip():
                raise ValueError(f"{what}: {path} line {n}: expected '{layout}', got {line[:60]!r}")
            first.append(a.strip())
            second.append(b.strip())
    if not first:
        raise ValueError(f"{what}: {path!r} holds no '{layout}' lines")
    return first, second


def read_labelled(path: str, what: str = "--train") -> Tuple[List[str], List[str]]:
    """(texts, labels) from a file of `label<TAB>text` lines."""
    labels, texts = _read_tsv(path, what, "label<TAB>text")
    return texts, labels


def read_pairs(path: str, what: str = "--train") -> Tuple[List[str], List[str]]:
    """(sources, targets) from a file of `source<TAB>target` lines."""
    return _read_tsv(path, what, "source<TAB>target")


def write_tsv(path: str, first: Sequence[str], second: Sequence[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for a, b in zip(first, second):
            f.write(f"{a}\t{' '.join(b.split())}\n")


# ---- model folders ------------------------------------------------------------------------


def save_folder(folder: str, system: str, config: dict, model: torch.nn.Module, vocabs: Dict[str, Vocab],
                extra: Optional[dict] = None) -> None:
    """config.json ({'system', 'config', ...extra}), vocab.json and model.safetensors."""
    from .._io import atomic_folder, save_safetensors, write_json

    with atomic_folder(folder) as tmp:  # all-or-nothing: never a new config beside old weights
        write_json(os.path.join(tmp, "config.json"), {"system": system, "config": config, **(extra or {})})
        write_json(os.path.join(tmp, "vocab.json"), {k: v.to_dict() for k, v in vocabs.items()}, indent=None)
        save_safetensors({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                         os.path.join(tmp, "model.safetensors"))


def load_folder(folder: str, system: str) -> Tuple[dict, Dict[str, torch.Tensor], Dict[str, Vocab]]:
    """(config.json contents, state dict, vocabularies) of a folder written by save_folder."""
    from safetensors.torch import load_file

    from .._io import recover_folder

    recover_folder(folder)  # a save cut between its two renames left the previous version aside
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--model must be a folder written by `bertfast classic {system} train`, got {folder!r}")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("system") != system:
        raise ValueError(f"--model {folder!r} holds a {meta.get('system')!r} model, expected {system!r}")
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocabs = {k: Vocab.from_dict(v) for k, v in json.load(f).items()}
    return meta, load_file(os.path.join(folder, "model.safetensors")), vocabs
