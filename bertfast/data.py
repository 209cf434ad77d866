"""Pre-training data: BERT-format corpora streamed from disk, NSP pairs, MLM masking, collators.

Corpus format (the original BERT one): plain UTF-8 text files, one sentence per line, a blank
line between documents.

    stream = PretrainingStream(["corpus.txt"], tokenizer, max_seq_len=128, seed=0)
    for batch in batch_iterator(stream, batch_size=32):   # dicts of padded tensors
        model(**batch)   # input_ids, token_type_ids, attention_mask, labels, next_sentence_label

Design choices that make training reproducible and resumable:

* Files are read line by line; only a bounded pool of recent documents (for NSP's random
  segments) and a bounded shuffle buffer of examples live in memory, so a corpus larger than
  memory streams.
* Documents are dealt to `num_shards` shards by their index (document i -> shard i % num_shards);
  each DDP rank reads only its own shards' documents (it still scans the lines of every file,
  which is cheap; tokenization, the expensive part, is done only for its own documents).
* All randomness is derived from (seed, shard, epoch) for pair sampling and from the example's
  position in the stream for masking, so the stream is a pure function of its arguments: resuming
  at example n replays the same examples (`PretrainingStream.iter_from(n)`).
"""
from __future__ import annotations

import hashlib
import os
import random
from collections import deque
from typing import Dict, Iterator, List, Optional, Sequence

import torch

IGNORE_INDEX = -100


class CorpusError(ValueError):
    """A corpus file is missing, unreadable, not text, or holds no sentences."""


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and Python runs,
    unlike hash())."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


# ---- reading --------------------------------------------------------------------------------


def check_corpus_files(files: Sequence[str], what: str = "train") -> List[str]:
    """Validate corpus paths before anything is written: each must exist, be a readable UTF-8
    text file and hold at least one non-blank line. Returns the list of paths."""
    if isinstance(files, str):
        files = [files]
    files = list(files)
    if not files:
        raise CorpusError(f"{what}: expected at least one corpus file, got none")
    for path in files:
        if not os.path.exists(path):
            raise CorpusError(f"{what}: corpus file {path!r} does not exist")
        if not os.path.isfile(path):
            raise CorpusError(f"{what}: corpus path {path!r} is not a regular file")
        try:
            with open(path, encoding="utf-8") as f:
                # Read only until the first non-blank line: a corpus may be far larger than memory.
                if not any(line.strip() for line in f):
                    raise CorpusError(f"{what}: corpus file {path!r} is empty (expected one sentence per line, "
                                      f"blank lines between documents)")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{what}: corpus file {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from e
        except OSError as e:
            raise CorpusError(f"{what}: cannot read corpus file {path!r}: {e.strerror or e}") from e
    return files


def iter_documents(files: Sequence[str]) -> Iterator[List[str]]:
    """Documents (lists of sentences) from BERT-format files, streamed. A blank line ends a
    document, and so does the end of a file."""
    for path in check_corpus_files(files):
        doc: List[str] = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if line:
                    doc.append(line)
                elif doc:
                    yield doc
                    doc = []
        if doc:
            yield doc


def write_corpus(documents: Sequence[Sequence[str]], path: str) -> str:
    """Write documents in BERT format (atomically) and return the path."""
    from ._io import atomic_file

    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for doc in documents:
            for sent in doc:
                sent = " ".join(sent.split())
                if sent:
                    f.write(sent + "\n")
            f.write("\n")
    return path


# ---- masking --------------------------------------------------------------------------------


class Masker:
    """BERT's MLM masking of one sequence: `mlm_probability` of the maskable tokens (all but
    special tokens and padding) are chosen (an exact count per sequence, at least one, as Google's
    create_pretraining_data does); of those 80% become [MASK], 10% a random token, 10% stay.
    With whole_word_mask, a word and all its ## continuation pieces are chosen together."""

    def __init__(self, tokenizer, mlm_probability: float = 0.15, whole_word_mask: bool = False,
                 max_predictions: Optional[int] = None, mask_replace_prob: float = 0.8,
                 random_replace_prob: float = 0.1):
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability!r}")
        if mask_replace_prob < 0 or random_replace_prob < 0 or mask_replace_prob + random_replace_prob > 1:
            raise ValueError(f"mask_replace_prob + random_replace_prob must be within [0, 1], got "
                             f"{mask_replace_prob!r} + {random_replace_prob!r}")
        self.mlm_probability = mlm_probability
        self.whole_word_mask = whole_word_mask
        self.max_predictions = max_predictions
        self.p_mask, self.p_random = mask_replace_prob, random_replace_prob
        self.mask_id = tokenizer.mask_token_id
        vocab = tokenizer.get_vocab()
        size = max(vocab.values()) + 1
        self.special = torch.zeros(size, dtype=torch.bool)
        self.special[sorted(tokenizer.special_ids)] = True
        # [unusedN] slots (Google's vocabularies) and other bracketed specials are never sampled
        # as random replacements.
        for tok, i in vocab.items():
            if tok.startswith("[") and tok.endswith("]"):
                self.special[i] = True
        self.continuation = torch.zeros(size, dtype=torch.bool)
        for tok, i in vocab.items():
            if tok.startswith("##"):
                self.continuation[i] = True
        self.random_pool = (~self.special).nonzero().squeeze(-1)
        if self.random_pool.numel() == 0:
            raise ValueError("the vocabulary has no ordinary tokens to use as random replacements")

    def __call__(self, input_ids: torch.Tensor, seed: int, maskable: Optional[torch.Tensor] = None):
        """(masked_ids, labels) for a 1-D id tensor; labels are IGNORE_INDEX where not chosen.
        `maskable` (bool) further restricts candidates (e.g. padding)."""
        ids = input_ids.clone()
        labels = torch.full_like(ids, IGNORE_INDEX)
        cand = ~self.special[ids]
        if maskable is not None:
            cand &= maskable.bool()
        pos = cand.nonzero().squeeze(-1)
        n_cand = pos.numel()
        if n_cand == 0:
            return ids, labels
        g = torch.Generator().manual_seed(seed)
        n_pred = max(1, int(round(n_cand * self.mlm_probability)))
        if self.max_predictions is not None:
            n_pred = min(n_pred, self.max_predictions)
        if self.whole_word_mask:
            # A word starts at each candidate that is not a ## continuation of the previous candidate.
            cont = self.continuation[ids[pos]]
            contiguous = torch.zeros_like(cont)
            contiguous[1:] = pos[1:] == pos[:-1] + 1
            starts = (~(cont & contiguous)).nonzero().squeeze(-1).tolist()
            bounds = starts + [n_cand]
            words = [(bounds[i], bounds[i + 1]) for i in range(len(starts))]
            chosen: List[int] = []
            for w in torch.randperm(len(words), generator=g).tolist():
                a, b = words[w]
                if len(chosen) >= n_pred:
                    break
                if len(chosen) + (b - a) > n_pred:
                    continue  # Google's rule: skip words that would overshoot the budget
                chosen.extend(range(a, b))
            if not chosen:  # every word is longer than the budget: take the shortest one whole
                a, b = min(words, key=lambda ab: ab[1] - ab[0])
                chosen = list(range(a, b))
            sel = pos[torch.tensor(sorted(chosen), dtype=torch.long)]
        else:
            sel = pos[torch.randperm(n_cand, generator=g)[:n_pred]].sort().values
        labels[sel] = ids[sel]
        r = torch.rand(sel.numel(), generator=g)
        to_mask = r < self.p_mask
        to_rand = (r >= self.p_mask) & (r < self.p_mask + self.p_random)
        ids[sel[to_mask]] = self.mask_id
        n_rand = int(to_rand.sum())
        if n_rand:
            pick = torch.randint(0, self.random_pool.numel(), (n_rand,), generator=g)
            ids[sel[to_rand]] = self.random_pool[pick]
        return ids, labels


# ---- NSP pairs ------------------------------------------------------------------------------


def truncate_pair(a: List[int], b: List[int], max_tokens: int, rng: random.Random) -> None:
    """Trim the longer segment, from the front or the back at random (Google's rule), in place."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


class PretrainingStream:
    """An endless (or `epochs`-long) stream of NSP + MLM examples from BERT-format files.

    Each example: dict(input_ids, token_type_ids, labels, next_sentence_label) of 1-D int64
    tensors ([CLS] A [SEP] B [SEP], at most max_seq_len tokens). next_sentence_label is 0 when B
    really follows A (IsNext) and 1 when B is a random segment of another document, HF's convention.
    """

    def __init__(self, files: Sequence[str], tokenizer, max_seq_len: int = 128, *, seed: int = 0,
                 shard: int = 0, num_shards: int = 1, mlm_probability: float = 0.15, whole_word_mask: bool = False,
                 short_seq_prob: float = 0.1, nsp_probability: float = 0.5, max_predictions: Optional[int] = None,
                 doc_pool: int = 1000, shuffle_buffer: int = 2000, epochs: Optional[int] = None):
        if not isinstance(max_seq_len, int) or max_seq_len < 8:
            raise ValueError(f"max_seq_len must be an int >= 8, got {max_seq_len!r}")
        if not isinstance(num_shards, int) or num_shards < 1 or not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in [0, num_shards) with num_shards >= 1, got shard={shard!r}, "
                             f"num_shards={num_shards!r}")
        if not 0.0 <= nsp_probability <= 1.0:
            raise ValueError(f"nsp_probability must be in [0, 1], got {nsp_probability!r}")
        self.files = check_corpus_files(files)
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.seed, self.shard, self.num_shards = seed, shard, num_shards
        self.short_seq_prob, self.nsp_probability = short_seq_prob, nsp_probability
        self.doc_pool, self.shuffle_buffer = max(2, doc_pool), max(1, shuffle_buffer)
        self.epochs = epochs
        self.masker = Masker(tokenizer, mlm_probability, whole_word_mask, max_predictions)
        self.cls_id, self.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id

    # Documents of this shard, tokenized into segments (one list of ids per sentence).
    def _documents(self) -> Iterator[List[List[int]]]:
        for i, doc in enumerate(iter_documents(self.files)):
            if i % self.num_shards != self.shard:
                continue
            segs = [e.ids for e in self.tokenizer.encodings(doc, add_special_tokens=False)]
            segs = [s for s in segs if s]
            if segs:
                yield segs

    def _doc_examples(self, doc: List[List[int]], pool: deque, rng: random.Random):
        """Google's create_instances_from_document, with NSP drawn exactly 50/50."""
        max_tokens = self.max_seq_len - 3
        target = max_tokens
        if rng.random() < self.short_seq_prob:
            target = rng.randint(2, max_tokens)
        chunk: List[List[int]] = []
        length = 0
        i = 0
        while i < len(doc):
            chunk.append(doc[i])
            length += len(doc[i])
            if i == len(doc) - 1 or length >= target:
                if len(chunk) == 1 and len(chunk[0]) < 2:
                    chunk, length, i = [], 0, i + 1  # too short to form a pair at all
                    continue
                is_random = rng.random() < self.nsp_probability
                if len(chunk) == 1:
                    # One long sentence: split it, so a real continuation exists too.
                    seg = chunk[0]
                    cut = rng.randint(1, len(seg) - 1)
                    a, b_real = list(seg[:cut]), list(seg[cut:])
                    unused = 0
                else:
                    a_end = rng.randint(1, len(chunk) - 1)
                    a = [t for s in chunk[:a_end] for t in s]
                    b_real = [t for s in chunk[a_end:] for t in s]
                    unused = len(chunk) - a_end
                if is_random:
                    others = [d for d in pool if d is not doc] or [doc]
                    other = others[rng.randrange(len(others))]
                    start = rng.randrange(len(other))
                    b: List[int] = []
                    target_b = max(1, target - len(a))
                    for seg in other[start:]:
                        b.extend(seg)
                        if len(b) >= target_b:
                            break
                    # The unused segments of this chunk go back to the document (Google's rule).
                    i -= unused if len(chunk) > 1 else 0
                else:
                    b = b_real
                truncate_pair(a, b, max_tokens, rng)
                if a and b:
                    yield a, b, int(is_random)
                chunk, length = [], 0
                target = max_tokens if rng.random() >= self.short_seq_prob else rng.randint(2, max_tokens)
            i += 1

    def _raw(self) -> Iterator[tuple]:
        """Unmasked (a, b, label) triples in stream order, epoch after epoch."""
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            rng = random.Random(derive_seed(self.seed, "pairs", self.shard, self.num_shards, epoch))
            pool: deque = deque(maxlen=self.doc_pool)
            pending: deque = deque()
            buf: List[tuple] = []
            produced = 0
            # A document's pairs are made only once a few later documents are read too, so that
            # even the first document has other documents to draw random segments from.
            lookahead = min(8, self.doc_pool - 1)
            docs = self._documents()
            done = False
            while not done or pending:
                if not done:
                    doc = next(docs, None)
                    if doc is None:
                        done = True
                    else:
                        pool.append(doc)
                        pending.append(doc)
                if not pending or (not done and len(pending) <= lookahead):
                    continue
                for ex in self._doc_examples(pending.popleft(), pool, rng):
                    buf.append(ex)
                    if len(buf) >= self.shuffle_buffer:
                        j = rng.randrange(len(buf))
                        buf[j], buf[-1] = buf[-1], buf[j]
                        produced += 1
                        yield buf.pop()
            rng.shuffle(buf)
            for ex in buf:
                produced += 1
                yield ex
            if produced == 0:
                raise CorpusError(f"corpus {self.files} gives no training pairs for shard {self.shard} of "
                                  f"{self.num_shards} (too few documents or sentences)")
            epoch += 1

    def _finish(self, a: List[int], b: List[int], nsp: int, index: int) -> Dict[str, torch.Tensor]:
        ids = torch.tensor([self.cls_id] + a + [self.sep_id] + b + [self.sep_id], dtype=torch.long)
        tt = torch.zeros_like(ids)
        tt[len(a) + 2:] = 1
        masked, labels = self.masker(ids, derive_seed(self.seed, "mask", self.shard, self.num_shards, index))
        return {"input_ids": masked, "token_type_ids": tt, "labels": labels,
                "next_sentence_label": torch.tensor(nsp, dtype=torch.long)}

    def iter_from(self, start: int = 0) -> Iterator[Dict[str, torch.Tensor]]:
        """Examples from position `start` on; skipped examples are generated but never masked,
        which is how an exact resume fast-forwards."""
        for index, (a, b, nsp) in enumerate(self._raw()):
            if index >= start:
                yield self._finish(list(a), list(b), nsp, index)

    def __iter__(self):
        return self.iter_from(0)


# ---- collation ------------------------------------------------------------------------------


def pad_sequences(seqs: Sequence[torch.Tensor], value: int, multiple_of: Optional[int] = None) -> torch.Tensor:
    n = max((len(s) for s in seqs), default=0)
    if multiple_of:
        n = -(-n // multiple_of) * multiple_of
    out = torch.full((len(seqs), n), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def collate_pretraining(examples: Sequence[Dict[str, torch.Tensor]], pad_token_id: int = 0,
                        pad_to_multiple_of: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Pad a list of examples to the longest one: input_ids (pad id), token_type_ids (0),
    attention_mask (1 on tokens), labels (-100 on padding), next_sentence_label."""
    if not examples:
        raise ValueError("examples must not be empty")
    ids = [e["input_ids"] for e in examples]
    batch = {
        "input_ids": pad_sequences(ids, pad_token_id, pad_to_multiple_of),
        "token_type_ids": pad_sequences([e["token_type_ids"] for e in examples], 0, pad_to_multiple_of),
        "labels": pad_sequences([e["labels"] for e in examples], IGNORE_INDEX, pad_to_multiple_of),
    }
    batch["attention_mask"] = pad_sequences([torch.ones(len(x), dtype=torch.long) for x in ids], 0,
                                            pad_to_multiple_of)
    if "next_sentence_label" in examples[0]:
        batch["next_sentence_label"] = torch.stack([torch.as_tensor(e["next_sentence_label"]) for e in examples])
    return batch


class MLMCollator:
    """Mask already-tokenized texts (lists of ids with specials) at collation time: for MLM on
    arbitrary tokenized data, outside the NSP stream. Seeds come from a counter, so a collator
    built with the same seed masks the same batches the same way."""

    def __init__(self, tokenizer, mlm_probability: float = 0.15, whole_word_mask: bool = False, seed: int = 0):
        self.masker = Masker(tokenizer, mlm_probability, whole_word_mask)
        self.pad_id = tokenizer.pad_token_id
        self.seed = seed
        self.count = 0

    def __call__(self, sequences: Sequence[Sequence[int]]) -> Dict[str, torch.Tensor]:
        examples = []
        for s in sequences:
            ids = torch.as_tensor(list(s), dtype=torch.long)
            masked, labels = self.masker(ids, derive_seed(self.seed, "mlm-collator", self.count))
            self.count += 1
            examples.append({"input_ids": masked, "token_type_ids": torch.zeros_like(ids), "labels": labels})
        return collate_pretraining(examples, self.pad_id)


def batch_iterator(stream, batch_size: int, start: int = 0, pad_to_multiple_of: Optional[int] = None,
                   drop_last: bool = True) -> Iterator[Dict[str, torch.Tensor]]:
    """Padded batches from a PretrainingStream, beginning at example `start`."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    buf = []
    for ex in stream.iter_from(start):
        buf.append(ex)
        if len(buf) == batch_size:
            yield collate_pretraining(buf, stream.tokenizer.pad_token_id, pad_to_multiple_of)
            buf = []
    if buf and not drop_last:
        yield collate_pretraining(buf, stream.tokenizer.pad_token_id, pad_to_multiple_of)


# ---- sequence packing -----------------------------------------------------------------------


def default_pairs_per_row(budget: int) -> int:
    """Slots for NSP pairs per packed row when none is given: one per 32 tokens, at least 2."""
    return max(2, budget // 32)


def pack_pretraining(examples: Sequence[Dict[str, torch.Tensor]], rows: int, budget: int,
                     max_pairs_per_row: Optional[int] = None, max_predictions_per_row: Optional[int] = None,
                     pad_token_id: int = 0, mlm_probability: float = 0.15):
    """Pack NSP + MLM examples (PretrainingStream's dicts) into `rows` rows of `budget` tokens,
    several pairs per row (the MLPerf / Graphcore recipe), in stream order: each example goes to
    the first row it fits (tokens, pair slots, masked-token slots); the first example that fits
    no row ends the batch. Returns (batch, n_packed): the first n_packed examples are in it.

    Every shape depends only on (rows, budget, max_pairs_per_row, max_predictions_per_row), so a
    training step on packed batches can be captured in a CUDA graph. The batch (for
    BertForPreTraining.forward_packed):
      input_ids, token_type_ids, position_ids, labels   (rows, budget); position ids restart at
          every pair; a row's tail after its pairs is filler (pad id, labels -100)
      cu_seqlens        int32 (rows * (max_pairs_per_row + 1) + 1,) over the flat tokens: per row,
                        its pairs, zero-length spare slots, then the filler as one sequence
      next_sentence_label  (rows * (max_pairs_per_row + 1),): the pair's label, -100 elsewhere
      masked_positions, masked_labels  (rows * max_predictions_per_row,): flat token index and
                        label of every masked token (padding entries: position 0, label -100)
    """
    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive int, got {rows!r}")
    if not isinstance(budget, int) or budget < 2:
        raise ValueError(f"budget (tokens per row) must be an int >= 2, got {budget!r}")
    pairs = max_pairs_per_row if max_pairs_per_row is not None else default_pairs_per_row(budget)
    if not isinstance(pairs, int) or pairs < 1:
        raise ValueError(f"max_pairs_per_row must be a positive int, got {pairs!r}")
    preds = max_predictions_per_row
    if preds is None:  # the masker takes round(p * n) >= 1 per pair: p * budget + one per pair bounds it
        preds = int(-(-mlm_probability * budget // 1)) + pairs
    if not isinstance(preds, int) or preds < 1:
        raise ValueError(f"max_predictions_per_row must be a positive int, got {preds!r}")
    if not examples:
        raise ValueError("examples must not be empty")
    fill = [0] * rows  # tokens, pairs and masked tokens placed in each row
    count = [0] * rows
    npred = [0] * rows
    placed: List[List[int]] = [[] for _ in range(rows)]
    n_packed = 0
    for i, ex in enumerate(examples):
        n, m = len(ex["input_ids"]), int((ex["labels"] != IGNORE_INDEX).sum())
        if n > budget or m > preds:
            raise ValueError(f"example {i} has {n} tokens and {m} masked tokens; a row holds budget={budget} "
                             f"tokens and max_predictions_per_row={preds} masked tokens")
        row = next((r for r in range(rows) if fill[r] + n <= budget and count[r] < pairs and npred[r] + m <= preds),
                   None)
        if row is None:
            break
        fill[row] += n
        count[row] += 1
        npred[row] += m
        placed[row].append(i)
        n_packed += 1
    slots = pairs + 1
    ids = torch.full((rows, budget), pad_token_id, dtype=torch.long)
    tt = torch.zeros((rows, budget), dtype=torch.long)
    pos = torch.zeros((rows, budget), dtype=torch.long)
    labels = torch.full((rows, budget), IGNORE_INDEX, dtype=torch.long)
    lens = torch.zeros(rows * slots, dtype=torch.int32)
    nsp = torch.full((rows * slots,), IGNORE_INDEX, dtype=torch.long)
    mpos = torch.zeros(rows * preds, dtype=torch.long)
    mlab = torch.full((rows * preds,), IGNORE_INDEX, dtype=torch.long)
    for r in range(rows):
        at, m_at = 0, r * preds
        for k, i in enumerate(placed[r]):
            ex = examples[i]
            n = len(ex["input_ids"])
            ids[r, at:at + n] = ex["input_ids"]
            tt[r, at:at + n] = ex["token_type_ids"]
            pos[r, at:at + n] = torch.arange(n)
            labels[r, at:at + n] = ex["labels"]
            lens[r * slots + k] = n
            if "next_sentence_label" in ex:
                nsp[r * slots + k] = int(ex["next_sentence_label"])
            where = (ex["labels"] != IGNORE_INDEX).nonzero().squeeze(-1)
            mpos[m_at:m_at + where.numel()] = r * budget + at + where
            mlab[m_at:m_at + where.numel()] = ex["labels"][where]
            m_at += where.numel()
            at += n
        lens[r * slots + pairs] = budget - at  # the filler: one sequence of pad tokens
        pos[r, at:] = torch.arange(budget - at)
    cu = torch.zeros(rows * slots + 1, dtype=torch.int32)
    torch.cumsum(lens, 0, out=cu[1:])
    batch = {"input_ids": ids, "token_type_ids": tt, "position_ids": pos, "labels": labels, "cu_seqlens": cu,
             "next_sentence_label": nsp, "masked_positions": mpos, "masked_labels": mlab}
    return batch, n_packed


def packed_batch_iterator(stream, rows: int, budget: Optional[int] = None, start: int = 0,
                          max_pairs_per_row: Optional[int] = None, max_predictions_per_row: Optional[int] = None):
    """Packed batches (see pack_pretraining) from a PretrainingStream, beginning at example
    `start`; yields (batch, n_examples, n_tokens): n_tokens counts the pairs' tokens (not the
    filler). Each batch holds the next examples of the stream in order, so a position in
    examples resumes it exactly. budget defaults to the stream's max_seq_len (every pair fits a row)."""
    budget = budget if budget is not None else stream.max_seq_len
    if budget < stream.max_seq_len:
        raise ValueError(f"budget must be >= the stream's max_seq_len ({stream.max_seq_len}) so every pair fits "
                         f"a row, got {budget}")
    pad = stream.tokenizer.pad_token_id
    p = stream.masker.mlm_probability
    pending: List[Dict[str, torch.Tensor]] = []
    examples = stream.iter_from(start)
    # at most rows * pairs examples fit one batch: read that many ahead
    pairs = max_pairs_per_row if max_pairs_per_row is not None else default_pairs_per_row(budget)
    while True:
        while len(pending) < rows * pairs:
            ex = next(examples, None)
            if ex is None:
                break
            pending.append(ex)
        if not pending:
            return
        batch, n = pack_pretraining(pending, rows, budget, max_pairs_per_row, max_predictions_per_row, pad, p)
        yield batch, n, sum(len(e["input_ids"]) for e in pending[:n])
        pending = pending[n:]
