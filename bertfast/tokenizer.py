"""WordPiece tokenization through the `tokenizers` library, with Hugging Face's call signature.

    tok = Tokenizer.from_pretrained(folder)          # tokenizer.json, else vocab.txt
    batch = tok(["a text", "another"], padding=True, truncation=True, max_length=128,
                return_tensors="pt")               # input_ids, token_type_ids, attention_mask
    pairs = tok(questions, contexts, truncation="only_second", max_length=384)
    packed = tok.pack(["a text", "another"], truncation=True)   # no padding: ids (total,),
    out = model.forward_packed(packed.input_ids, packed.cu_seqlens, packed.max_seqlen,
                               packed.token_type_ids)             # cu_seqlens, max_seqlen
    tok = Tokenizer.train(["corpus.txt"], vocab_size=8000)
"""
from __future__ import annotations

import itertools
import json
import os
import threading
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Union

import torch

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_TRUNCATION = {True: "longest_first", "longest_first": "longest_first", "only_first": "only_first",
               "only_second": "only_second"}


class BatchEncoding(dict):
    """A dict of lists or tensors with attribute access (batch.input_ids) and .to(device)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    def to(self, device):
        return BatchEncoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


@dataclass(frozen=True)
class PackedBatch:
    """Sequences one after the other, no padding: the packed encoder's input, built on the host.

    input_ids, token_type_ids: int64 (total,); cu_seqlens: int32 (n + 1,), where sequence i is
    rows cu_seqlens[i]:cu_seqlens[i + 1]; max_seqlen: the longest sequence (a host int);
    lengths: the n lengths as host ints (so no caller reads them back from a device). Positions
    are left to the model, whose packed forward restarts them at every sequence (from 0 for BERT,
    after padding_idx for RoBERTa)."""

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    lengths: tuple

    def __len__(self) -> int:
        return len(self.lengths)

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.token_type_ids.to(device), self.cu_seqlens.to(device),
                           self.max_seqlen, self.lengths)


def pack_rows(rows: Sequence[Sequence[int]], type_rows: Optional[Sequence[Sequence[int]]] = None) -> PackedBatch:
    """A PackedBatch of token id lists (and their token type lists; default all 0). Empty rows
    are allowed: they are zero-length sequences."""
    lengths = tuple(len(r) for r in rows)
    if type_rows is not None and tuple(len(t) for t in type_rows) != lengths:
        raise ValueError("type_rows must hold one token type per token of each row")
    total = sum(lengths)
    ids = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.int64).reshape(total)
    tt = torch.zeros(total, dtype=torch.int64) if type_rows is None else \
        torch.tensor(list(itertools.chain.from_iterable(type_rows)), dtype=torch.int64).reshape(total)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return PackedBatch(ids, tt, cu, max(lengths, default=0), lengths)


class Tokenizer:
    """BERT's WordPiece tokenizer (a thin layer over tokenizers.Tokenizer)."""

    def __init__(self, tokenizer, model_max_length: int = 512):
        from tokenizers import Tokenizer as _Tok

        if not isinstance(tokenizer, _Tok):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        # `tokenizers` keeps truncation settings on the object, so truncating calls never touch
        # self._tok: each thread encodes through its own copies, one per (max_length, strategy)
        self._local = threading.local()
        self.model_max_length = int(model_max_length)
        vocab = self._tok.get_vocab()
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"the vocabulary lacks BERT's special tokens {missing}")
        self.pad_token, self.unk_token, self.cls_token, self.sep_token, self.mask_token = SPECIAL_TOKENS
        self.pad_token_id, self.unk_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id = (
            vocab[t] for t in SPECIAL_TOKENS)

    def __getstate__(self):  # pickling (worker pools): the per-thread copies stay behind
        state = self.__dict__.copy()
        state.pop("_local", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    # ---- construction -------------------------------------------------------------------

    @staticmethod
    def _wordpiece_from_vocab(vocab_file: str, lowercase: bool):
        from tokenizers import Tokenizer as _Tok
        from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

        tok = _Tok(models.WordPiece.from_file(vocab_file, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                    lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        if cls is None or sep is None:
            raise ValueError(f"{vocab_file}: the vocabulary lacks [CLS] or [SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A:0 [SEP]:0", pair="[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        tok.decoder = decoders.WordPiece(prefix="##")
        return tok

    @classmethod
    def from_pretrained(cls, folder: str) -> "Tokenizer":
        """Load from a folder with tokenizer.json (preferred) or vocab.txt (+ tokenizer_config.json)."""
        from ._io import recover_folder

        recover_folder(folder)  # a save cut between its two renames left the previous version aside
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"Tokenizer.from_pretrained: {folder!r} is not a folder; nothing is downloaded")
        conf = {}
        conf_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(conf_path):
            try:
                with open(conf_path, encoding="utf-8") as f:
                    conf = json.load(f)
            except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
                raise ValueError(f"{conf_path}: not a readable JSON file ({e})") from None
            if not isinstance(conf, dict):
                raise ValueError(f"{conf_path}: must hold a JSON object, got a JSON {type(conf).__name__}")
        max_len = conf.get("model_max_length", 512)
        if not isinstance(max_len, int) or max_len > 1_000_000:  # HF writes a huge sentinel for "unset"
            max_len = 512
        tj, vt = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "vocab.txt")
        if os.path.isfile(tj):
            from tokenizers import Tokenizer as _Tok

            try:
                raw = _Tok.from_file(tj)
            except Exception as e:  # noqa: BLE001 - the library's error names neither the file nor the cause's place
                raise ValueError(f"{tj}: not a readable tokenizers file (damaged or not a tokenizer.json?): "
                                 f"{str(e).splitlines()[0][:300] if str(e) else type(e).__name__}") from None
            try:
                return cls(raw, max_len)
            except ValueError as e:
                raise ValueError(f"{tj}: {e}") from None
        if os.path.isfile(vt):
            try:
                return cls(cls._wordpiece_from_vocab(vt, bool(conf.get("do_lower_case", True))), max_len)
            except ValueError as e:
                raise ValueError(f"{vt}: {e}" if vt not in str(e) else str(e)) from None
            except Exception as e:  # noqa: BLE001 - e.g. a vocab.txt that is not UTF-8
                raise ValueError(f"{vt}: not a readable vocabulary file: {type(e).__name__}: {e}") from None
        raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {folder!r}")

    @classmethod
    def train(cls, files: Sequence[str], vocab_size: int = 30522, lowercase: bool = True,
              min_frequency: int = 2, show_progress: bool = False) -> "Tokenizer":
        """Train a new WordPiece vocabulary on text files (BERT's normaliser and pre-tokenizer)."""
        from tokenizers import Tokenizer as _Tok
        from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

        files = [files] if isinstance(files, str) else list(files)
        if not files:
            raise ValueError("files must name at least one text file")
        for f in files:
            if not os.path.isfile(f) or os.path.getsize(f) == 0:
                raise ValueError(f"files: {f!r} is missing or empty")
        if not isinstance(vocab_size, int) or vocab_size < len(SPECIAL_TOKENS) + 1:
            raise ValueError(f"vocab_size must be an int > {len(SPECIAL_TOKENS)}, got {vocab_size!r}")
        normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        vocab = wordpiece_vocab(_word_counts(files, normalizer, pre_tokenizer), vocab_size, min_frequency)
        tok = _Tok(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
        tok.add_special_tokens(list(SPECIAL_TOKENS))  # "[MASK]" in a text is one token, as the trainer does
        del trainers, show_progress  # the library's trainer breaks ties by hash order: see wordpiece_vocab
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A:0 [SEP]:0", pair="[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
        tok.decoder = decoders.WordPiece(prefix="##")
        return cls(tok)

    def save_pretrained(self, folder: str) -> None:
        """tokenizer.json + vocab.txt + tokenizer_config.json (transformers' BertTokenizerFast reads
        it), all-or-nothing: written beside `folder` and swapped in; other files there are kept."""
        from ._io import atomic_folder

        with atomic_folder(folder) as tmp:
            self.write_files(tmp)

    def write_files(self, folder: str) -> None:
        """The tokenizer's files into an existing folder (a model's save writes them into its own
        temporary folder: see models/hub.save_pretrained)."""
        self._tok.save(os.path.join(folder, "tokenizer.json"))
        vocab = sorted(self._tok.get_vocab().items(), key=lambda kv: kv[1])
        with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
            f.writelines(tok + "\n" for tok, _ in vocab)
        norm = self._tok.normalizer
        lower = bool(json.loads(self._tok.to_str()).get("normalizer", {}).get("lowercase", True)) if norm else True
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": lower,
                       "model_max_length": self.model_max_length, "unk_token": "[UNK]", "sep_token": "[SEP]",
                       "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}, f, indent=2)

    # ---- vocabulary ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def check_fits(self, vocab_size: int, where: str) -> None:
        """Refuse a model whose embedding table is smaller than this vocabulary (found when loading,
        not as an index error at the first forward that meets a high id)."""
        if self.vocab_size > int(vocab_size):
            raise ValueError(f"{where}: the tokenizer has {self.vocab_size} tokens but the model's vocab_size is "
                             f"{vocab_size} (config.json), so ids >= {vocab_size} have no embedding; use the "
                             f"tokenizer the model was trained with")

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict:
        return self._tok.get_vocab()

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            i = self._tok.token_to_id(tokens)
            return self.unk_token_id if i is None else i
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(int(i)) for i in ids]

    @property
    def special_ids(self) -> set:
        return {self.pad_token_id, self.unk_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id}

    # ---- encoding -----------------------------------------------------------------------

    def tokenize(self, text: str) -> List[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str, text_pair: Optional[str] = None, add_special_tokens: bool = True) -> List[int]:
        return self._tok.encode(text, text_pair, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> List[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def _truncating(self, max_length: int, strategy: str):
        """This thread's copy of the tokenizer that truncates to max_length with `strategy`
        (enable_truncation mutates a tokenizers.Tokenizer, so the shared one never gets it)."""
        cache = getattr(self._local, "truncating", None)
        if cache is None:
            cache = self._local.truncating = {}
        key = (max_length, strategy)
        if key not in cache:
            from tokenizers import Tokenizer as _Tok

            if len(cache) >= 8:
                cache.clear()
            raw = _Tok.from_str(self._tok.to_str())
            raw.enable_truncation(max_length, strategy=strategy)
            cache[key] = raw
        return cache[key]

    def encodings(self, text, text_pair=None, truncation=False, max_length=None, add_special_tokens=True):
        """The raw `tokenizers` Encoding objects (offsets, word ids, sequence ids), truncated.
        Safe to call from several threads at once, with different max_length values."""
        texts, pairs, _ = self._normalise_inputs(text, text_pair)
        max_length = self._max_length(truncation, max_length)
        raw = self._tok if max_length is None else self._truncating(max_length, _TRUNCATION[truncation])
        try:
            inputs = texts if pairs is None else list(zip(texts, pairs))
            return raw.encode_batch(inputs, add_special_tokens=add_special_tokens)
        except Exception as e:
            if "Truncation error" in str(e) or "truncat" in str(e).lower():
                raise ValueError(f"cannot truncate to max_length={max_length} with truncation={truncation!r}: "
                                 f"{e}") from e
            raise

    def word_encodings(self, words_list: Sequence[Sequence[str]], max_length: Optional[int] = None):
        """Encodings of pre-split words (their word_ids map pieces back to word indices), cut to
        max_length tokens when given. Thread-safe as `encodings` is."""
        words_list = [list(map(str, words)) for words in words_list]
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        raw = self._tok if max_length is None else self._truncating(max_length, "longest_first")
        return raw.encode_batch(words_list, is_pretokenized=True)

    def pack(self, text, text_pair=None, truncation: Union[bool, str] = False, max_length: Optional[int] = None,
             add_special_tokens: bool = True) -> PackedBatch:
        """The texts (or pairs) packed one after the other with no padding (a PackedBatch:
        input_ids, token_type_ids, cu_seqlens, max_seqlen, lengths), the tokens and truncation
        of __call__ for the same arguments."""
        encs = self.encodings(text, text_pair, truncation, max_length, add_special_tokens)
        return pack_rows([e.ids for e in encs], [e.type_ids for e in encs])

    @staticmethod
    def _normalise_inputs(text, text_pair):
        single = isinstance(text, str)
        texts = [text] if single else list(text) if text is not None else None
        if texts is None or not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a str or a list of str")
        pairs = None
        if text_pair is not None:
            pairs = [text_pair] if isinstance(text_pair, str) else list(text_pair)
            if not all(isinstance(t, str) for t in pairs):
                raise TypeError("text_pair must be a str or a list of str")
            if len(pairs) != len(texts):
                raise ValueError(f"text_pair must have one entry per text ({len(texts)}), got {len(pairs)}")
        return texts, pairs, single

    def _max_length(self, truncation, max_length):
        if truncation not in (False, None) and truncation not in _TRUNCATION:
            raise ValueError(f"truncation must be True, False, 'longest_first', 'only_first' or 'only_second', "
                             f"got {truncation!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if truncation in (False, None):
            return None
        return max_length if max_length is not None else self.model_max_length

    def __call__(self, text: Union[str, Iterable[str]], text_pair=None, padding: Union[bool, str] = False,
                 truncation: Union[bool, str] = False, max_length: Optional[int] = None,
                 return_tensors: Optional[str] = None, return_offsets_mapping: bool = False,
                 return_token_type_ids: bool = True, return_attention_mask: bool = True,
                 add_special_tokens: bool = True, pad_to_multiple_of: Optional[int] = None) -> BatchEncoding:
        """Encode one text, a list of texts, or (text, text_pair) pairs ([CLS] A [SEP] B [SEP],
        token_type_ids 0/1). padding: False | True/'longest' | 'max_length'. return_tensors='pt'
        gives int64 tensors (padding is then required for batches of unequal lengths)."""
        texts, pairs, single = self._normalise_inputs(text, text_pair)
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        encs = self.encodings(texts, pairs, truncation, max_length, add_special_tokens)
        ids = [e.ids for e in encs]
        tts = [e.type_ids for e in encs]
        offs = [e.offsets for e in encs]
        if padding in (True, "longest", "max_length"):
            target = max((len(x) for x in ids), default=0)
            if padding == "max_length":
                target = max_length if max_length is not None else self.model_max_length
            if pad_to_multiple_of:
                target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
            masks = [[1] * len(x) + [0] * (target - len(x)) for x in ids]
            ids = [x + [self.pad_token_id] * (target - len(x)) for x in ids]
            tts = [x + [0] * (target - len(x)) for x in tts]
            offs = [list(x) + [(0, 0)] * (target - len(x)) for x in offs]
        else:
            masks = [[1] * len(x) for x in ids]
        out = {"input_ids": ids}
        if return_token_type_ids:
            out["token_type_ids"] = tts
        if return_attention_mask:
            out["attention_mask"] = masks
        if return_offsets_mapping:
            out["offset_mapping"] = offs
        if return_tensors == "pt":
            if len({len(x) for x in ids}) > 1:
                raise ValueError("texts have different lengths: pass padding=True to return tensors")
            out = {k: torch.tensor(v, dtype=torch.int64) for k, v in out.items()}
        elif single:
            out = {k: v[0] for k, v in out.items()}
        return BatchEncoding(out)


def _word_counts(files: Sequence[str], normalizer, pre_tokenizer) -> dict:
    """How often each pre-tokenized word of the files occurs (BERT's normaliser and pre-tokenizer)."""
    from collections import Counter

    counts: Counter = Counter()
    for path in files:
        with open(path, "rb") as f:
            for i, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:  # never silently replaced: the vocabulary would learn U+FFFD
                    raise ValueError(f"files: {path} line {i} is not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                     f"{e.start + 1})") from None
                if line.strip():
                    counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)))
    return counts


def wordpiece_vocab(word_counts: dict, vocab_size: int, min_frequency: int = 2) -> dict:
    """A WordPiece vocabulary {token: id} learned by merging the most frequent adjacent pair of
    symbols, as the `tokenizers` WordPiece trainer does, but reproducibly: ties go to the pair that
    sorts first, and the alphabet is sorted. (The library's trainer numbers the "##" continuation
    symbols in hash-map order, which differs per process, and breaks ties by those numbers: the
    same corpus and seed gave a different vocabulary on every run.)
    Ids: the special tokens, the characters and "##" characters in sorted order, then the merges."""
    import heapq

    words = [([w[0]] + ["##" + c for c in w[1:]], n) for w, n in sorted(word_counts.items()) if w]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for sym in sorted({s for syms, _ in words for s in syms}):
        vocab.setdefault(sym, len(vocab))
    pairs: dict = {}
    where: dict = {}  # pair -> indices of the words that hold it
    for i, (syms, n) in enumerate(words):
        for pair in zip(syms, syms[1:]):
            pairs[pair] = pairs.get(pair, 0) + n
            where.setdefault(pair, set()).add(i)
    heap = [(-c, pair) for pair, c in pairs.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pairs.get(pair, 0) != -neg:  # stale entry: its count changed since it was pushed
            if pairs.get(pair, 0) > 0:
                heapq.heappush(heap, (-pairs[pair], pair))
            continue
        if -neg < min_frequency:
            break
        a, b = pair
        new = a + (b[2:] if b.startswith("##") else b)
        vocab.setdefault(new, len(vocab))
        touched = {}
        for i in sorted(where.pop(pair, ())):
            syms, n = words[i]
            for p in zip(syms, syms[1:]):
                pairs[p] -= n
            merged, j = [], 0
            while j < len(syms):
                if j + 1 < len(syms) and syms[j] == a and syms[j + 1] == b:
                    merged.append(new)
                    j += 2
                else:
                    merged.append(syms[j])
                    j += 1
            words[i] = (merged, n)
            for p in zip(merged, merged[1:]):
                pairs[p] = pairs.get(p, 0) + n
                where.setdefault(p, set()).add(i)
                touched[p] = pairs[p]
        pairs.pop(pair, None)
        for p, c in touched.items():
            if c > 0 and p != pair:
                heapq.heappush(heap, (-c, p))
    return vocab
