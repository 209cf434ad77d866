"""What the task modules share: the model's device and length limit, right-padded batches of
token id lists, label names, the TruncationWarning the commands print as notes, and the helpers
the commands and fine-tuning use to read JSONL records and report truncation."""
from __future__ import annotations

import contextlib
import json
import sys
import warnings
from typing import Dict, Optional, Sequence


# a progress bar appears for work of at least this many batches (short runs stay quiet)
PROGRESS_MIN_BATCHES = 4


@contextlib.contextmanager
def progress(enabled: bool, items: int, batch_size: int, desc: str, unit: str = "text"):
    """A tqdm bar on stderr counting `items` (yields its update(n)), shown when `enabled` and the
    work takes at least PROGRESS_MIN_BATCHES batches; otherwise a no-op update."""
    if not enabled or -(-items // max(batch_size, 1)) < PROGRESS_MIN_BATCHES:
        yield lambda n=1: None
        return
    from tqdm import tqdm

    with tqdm(total=items, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar.update


def model_device(model):
    return next(model.parameters()).device


class TruncationWarning(UserWarning):
    """Texts longer than the model's limit were cut to it (the command line prints these as notes)."""


def warn_truncated(task: str, n_cut: int, total: int, max_length: int, remedy: str = "") -> None:
    if n_cut:
        warnings.warn(f"{task}: {n_cut} of {total} texts are longer than {max_length} tokens (the model's limit) "
                      f"and were cut to it{remedy}", TruncationWarning, stacklevel=4)  # caller, through torch.no_grad


def model_limit(model) -> int:
    """The most tokens one sequence may hold in `model` (an encoder or a head): its config's
    longest_sequence, which is max_position_embeddings less RoBERTa's padding_idx offset."""
    return model.config.longest_sequence


def resolve_max_length(model, tokenizer, max_length: Optional[int], name: str = "max_length") -> int:
    """Tokens per sequence: `max_length` when given (refused, naming `name`, when the model cannot
    hold it), else the smaller of the tokenizer's model_max_length and the model's limit."""
    limit = model_limit(model)
    if max_length is None:
        return min(tokenizer.model_max_length, limit)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"{name} must be a positive int, got {max_length!r}")
    if max_length > limit:
        raise ValueError(f"{name} is {max_length}, more tokens than the model holds: at most {limit} "
                         f"({type(model.config).__name__}: max_position_embeddings "
                         f"{model.config.max_position_embeddings}{_offset_note(model.config)})")
    return max_length


def _offset_note(config) -> str:
    extra = config.max_position_embeddings - config.longest_sequence
    return f", of which {extra} are never a token's position (padding_idx offset)" if extra else ""


def padded_batch(rows: Sequence[Sequence[int]], pad_id: int, device, type_rows=None):
    """Right-padded (ids, attention_mask, token_type_ids) int64 tensors of token id lists."""
    import torch  # here: the commands import this module before they parse their arguments
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


def token_types(encoder, token_type_ids):
    """token_type_ids for `encoder`, or None for a model with a single token type (DistilBERT has
    no token type embeddings, RoBERTa one): their tokenizers give no segment ids, while BERT's
    WordPiece marks a pair's second text with type 1."""
    return token_type_ids if getattr(encoder.config, "type_vocab_size", 2) > 1 else None


def id2label_of(model) -> Dict[int, str]:
    m = model.config.id2label or {}
    return {i: m.get(i, f"LABEL_{i}") for i in range(model.config.num_labels)}


def utf8_lines(lines, name: str, what: str):
    """(line number, text) of each line of a file opened in binary mode (or of a text stream),
    decoded as UTF-8. Invalid UTF-8 is an error naming the file and the line: one rule for every
    command (nothing is silently replaced)."""
    for i, line in enumerate(lines, 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{what}: {name} line {i} is not UTF-8 text (byte 0x{line[e.start]:02x} at column "
                                 f"{e.start + 1}); save the file as UTF-8") from None
        yield i, line


def binary_source(path: str):
    """The file to read lines from: `-` is standard input (its bytes, where it has them)."""
    if path == "-":
        return getattr(sys.stdin, "buffer", sys.stdin)
    return open(path, "rb")


def iter_jsonl(lines, name: str, what: str):
    """(line number, object) of each non-blank line of a JSONL stream (binary or text); an error
    names the line: invalid UTF-8, invalid JSON, not an object, or a string holding a lone
    surrogate escape ("\\ud800", valid JSON but no text: it cannot be encoded or tokenized)."""
    for i, line in utf8_lines(lines, name, what):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what}: {name} line {i} is not JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{what}: {name} line {i} must be a JSON object, got {type(rec).__name__}")
        if "\\u" in line:  # only an escape can smuggle a lone surrogate past the UTF-8 decoding
            try:
                json.dumps(rec, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{what}: {name} line {i} holds a lone surrogate escape (such as \\ud800): not "
                                 f"text that can be encoded") from None
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
