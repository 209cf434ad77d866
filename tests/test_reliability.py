"""What a user can count on (docs/reliability.md): every file and folder the project writes is
all-or-nothing, a failed write names its path, resumes refuse what they did not write, no
non-finite number reaches an output, a Tokenizer can be shared by threads, bad input files are
named at the command line."""
import errno
import io
import json
import os
import threading

import numpy as np
import pytest
import torch

from bertfast import _io

WORDS = ["good", "bad", "film", "is", "was", "the", "john", "lives", "in", "paris", "a", "very", "long", "text"]


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return str(d)


def _model(tok_folder, labels, seed=0):
    from bertfast import BertConfig, BertForSequenceClassification, Tokenizer

    tok = Tokenizer.from_pretrained(tok_folder)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=len(labels),
                     id2label=dict(enumerate(labels)))
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg).eval(), tok


class _FullDisk(io.RawIOBase):
    """A file that takes `room` bytes and then fails as a full disk does."""

    def __init__(self, path, room):
        self.f, self.room = open(path, "wb"), room

    def writable(self):
        return True

    def write(self, b):
        if len(b) > self.room:
            self.f.write(bytes(b[:self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(b)
        return self.f.write(b)

    def close(self):
        self.f.close()
        super().close()


def _leftovers(folder):
    return sorted(n for n in os.listdir(folder) if _io.TMP_MARK in n or _io.OLD_MARK in n)


# ---- one writing helper: all-or-nothing, a clear error naming the path ----------------------


@pytest.mark.parametrize("writer", ["torch", "numpy", "json"])
def test_disk_full_removes_the_temporary_and_names_the_path(tmp_path, monkeypatch, writer):
    target = tmp_path / f"out.{writer}"
    target.write_bytes(b"previous")
    monkeypatch.setattr(_io, "_open_binary", lambda p: _FullDisk(p, 100))
    with pytest.raises(_io.WriteError, match=f"could not write {target}: no space left on device") as e:
        if writer == "torch":
            _io.save_torch({"w": torch.zeros(1000)}, str(target))
        elif writer == "numpy":
            _io.save_numpy(str(target), np.zeros(1000, np.float32))
        else:
            _io.write_json(str(target), {"x": "y" * 1000})
    assert e.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"previous"
    assert _leftovers(tmp_path) == []


def test_safetensors_error_becomes_a_named_write_error(tmp_path, monkeypatch):
    import safetensors.torch

    def full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(_io.WriteError, match="model.safetensors: no space left on device"):
        _io.save_safetensors({"w": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    assert os.listdir(tmp_path) == []


def test_temporaries_are_unique_per_writer(tmp_path):
    target = str(tmp_path / "x.json")
    with _io.atomic_file(target) as a, _io.atomic_file(target) as b:
        assert a != b and os.path.dirname(a) == str(tmp_path)
        open(a, "w").write("1")
        open(b, "w").write("2")
    assert open(target).read() == "1"  # the outer one finished last
    assert _leftovers(tmp_path) == []


def test_json_outputs_never_hold_nan(tmp_path):
    _io.write_json(str(tmp_path / "m.json"), {"loss": float("nan"), "x": [float("inf"), 1.5]})
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == \
        {"loss": None, "x": [None, 1.5]}


# ---- save_pretrained: the whole folder or nothing ---------------------------------------------


def test_failed_save_over_a_model_keeps_the_old_one_whole(tok_folder, tmp_path, monkeypatch):
    """config.json (with label names) used to be written before the weights: a failed weight write
    left new label names beside old weights, and classify answered with them."""
    import safetensors.torch

    from bertfast import BertForSequenceClassification

    folder = str(tmp_path / "m")
    old, tok = _model(tok_folder, ["negative", "positive"])
    old.save_pretrained(folder, tokenizer=tok)
    new, _ = _model(tok_folder, ["ham", "spam"], seed=1)

    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match=f"{folder}.*no space left on device"):
        new.save_pretrained(folder, tokenizer=tok)
    monkeypatch.undo()
    back = BertForSequenceClassification.from_pretrained(folder)
    assert back.config.id2label == {0: "negative", 1: "positive"}
    torch.testing.assert_close(back.classifier.weight, old.classifier.weight)
    assert os.listdir(tmp_path) == ["m"]


def test_save_keeps_other_files_and_drops_a_stale_bin(tok_folder, tmp_path):
    from bertfast import BertForSequenceClassification, Tokenizer

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "README.md").write_text("mine")
    (folder / "pytorch_model.bin").write_bytes(b"old weights")
    model, tok = _model(tok_folder, ["a", "b"])
    tok.save_pretrained(str(folder))  # transformers' habit: model and tokenizer saved apart
    model.save_pretrained(str(folder))
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors", "tokenizer.json",
                                          "tokenizer_config.json", "vocab.txt"]
    assert (folder / "README.md").read_text() == "mine"
    BertForSequenceClassification.from_pretrained(str(folder))
    Tokenizer.from_pretrained(str(folder))


def test_a_swap_cut_between_its_renames_is_recovered_on_load(tok_folder, tmp_path):
    from bertfast import BertForSequenceClassification, Tokenizer

    model, tok = _model(tok_folder, ["a", "b"])
    folder = tmp_path / "m"
    model.save_pretrained(str(folder), tokenizer=tok)
    os.rename(folder, tmp_path / f".m{_io.OLD_MARK}x1y2")  # the old version aside, the new one not yet in
    with pytest.warns(UserWarning, match="previous version was restored"):
        back = BertForSequenceClassification.from_pretrained(str(folder))
    assert back.config.id2label == {0: "a", 1: "b"}
    os.rename(folder, tmp_path / f".m{_io.OLD_MARK}z")
    with pytest.warns(UserWarning, match="previous version was restored"):
        Tokenizer.from_pretrained(str(folder))
    assert os.listdir(tmp_path) == ["m"]


def test_interrupt_during_save_leaves_no_temporary(tok_folder, tmp_path, monkeypatch):
    import safetensors.torch

    model, tok = _model(tok_folder, ["a", "b"])

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(str(tmp_path / "m"), tokenizer=tok)
    assert os.listdir(tmp_path) == []


# ---- the tokenizer ------------------------------------------------------------------------------


def test_threads_sharing_a_tokenizer_truncate_independently(tok_folder):
    from bertfast import Tokenizer

    tok = Tokenizer.from_pretrained(tok_folder)
    text = " ".join(WORDS * 40)
    errors, lengths = [], {}

    def work(i):
        try:
            for _ in range(20):
                n = 8 + (i % 4) * 8
                got = {len(x) for x in tok([text] * 3, truncation=True, max_length=n)["input_ids"]}
                full = {len(e.ids) for e in tok.encodings([text])}  # no truncation asked for
                words = {len(e.ids) for e in tok.word_encodings([text.split()], n)}
                lengths.setdefault(i, set()).update({(n, tuple(got), tuple(full), tuple(words))})
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    untruncated = len(tok.encodings([text])[0].ids)
    for i, seen in lengths.items():
        assert seen == {(8 + (i % 4) * 8, (8 + (i % 4) * 8,), (untruncated,), (8 + (i % 4) * 8,))}


def test_tokenizer_still_pickles(tok_folder):
    import pickle

    from bertfast import Tokenizer

    tok = Tokenizer.from_pretrained(tok_folder)
    tok("the film", truncation=True, max_length=4)
    back = pickle.loads(pickle.dumps(tok))
    assert back("the film is good", truncation=True, max_length=4)["input_ids"] == \
        tok("the film is good", truncation=True, max_length=4)["input_ids"]


@pytest.mark.parametrize("name,content", [("tokenizer.json", "{not json"), ("tokenizer.json", '{"model": 3}'),
                                          ("tokenizer_config.json", "{oops"), ("tokenizer_config.json", "[1, 2]")])
def test_a_malformed_tokenizer_file_is_named(tok_folder, tmp_path, name, content):
    import shutil

    from bertfast import Tokenizer

    d = tmp_path / "t"
    shutil.copytree(tok_folder, d)
    (d / name).write_text(content)
    with pytest.raises(ValueError, match=f"{d / name}: "):
        Tokenizer.from_pretrained(str(d))


# ---- fine-tuning --------------------------------------------------------------------------------


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def ft_base(tok_folder, tmp_path_factory):
    from bertfast import BertConfig, BertForPreTraining, Tokenizer

    tok = Tokenizer.from_pretrained(tok_folder)
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=32, max_position_embeddings=64))
    folder = str(tmp_path_factory.mktemp("ft") / "base")
    model.save_pretrained(folder, tokenizer=tok)
    return folder


def _ft_args(base, train, out, *extra):
    from bertfast.train import finetune_parser

    return finetune_parser().parse_args(["--task", "cls", "--model", base, "--train", train, "--out", str(out),
                                         "--epochs", "1", "--batch-size", "4", "--no-progress", "--threads", "1",
                                         "--max-seq-len", "16", *extra])


CLS_ROWS = [{"text": f"the film is {w}", "label": "pos" if w == "good" else "neg"} for w in ["good", "bad"] * 4]


@pytest.mark.parametrize("option,value,message", [
    ("--lr", "inf", "--lr must be a finite number"), ("--lr", "nan", "--lr must be a finite number"),
    ("--lr", "0", "--lr must be > 0"), ("--max-grad-norm", "nan", "--max-grad-norm must be a finite"),
    ("--weight-decay", "nan", "--weight-decay must be a finite"), ("--weight-decay", "-1", "--weight-decay must be >= 0"),
    ("--warmup-ratio", "-5", r"--warmup-ratio must be in \[0, 1\]"), ("--warmup-ratio", "1.5", "--warmup-ratio"),
    ("--log-every", "0", "--log-every must be an integer >= 1"), ("--threshold", "nan", "--threshold"),
    ("--max-answer-len", "0", "--max-answer-len")])
def test_finetune_refuses_bad_numeric_options_before_writing(ft_base, tmp_path, option, value, message):
    from bertfast.train import finetune

    train = _write_jsonl(tmp_path / "t.jsonl", CLS_ROWS)
    with pytest.raises(ValueError, match=message):
        finetune(_ft_args(ft_base, train, tmp_path / "out", option, value))
    assert not (tmp_path / "out").exists()


def test_finetune_stops_on_a_non_finite_loss_and_keeps_the_old_output(ft_base, tmp_path):
    """--lr 1e30 is finite, but the first step fills the weights with NaN: the run stops at the
    next loss (or at the save) and --out keeps what it held."""
    from bertfast.train import finetune

    train = _write_jsonl(tmp_path / "t.jsonl", CLS_ROWS)
    out = tmp_path / "out"
    finetune(_ft_args(ft_base, train, out))
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 2|weights hold NaN"):
        finetune(_ft_args(ft_base, train, out, "--lr", "1e30", "--epochs", "2"))
    assert (out / "model.safetensors").read_bytes() == before


def test_finetune_cli_prints_standard_json_and_one_line_errors(ft_base, tmp_path, capsys):
    from bertfast.train.cli import cli_main

    train = _write_jsonl(tmp_path / "t.jsonl", CLS_ROWS)
    argv = ["--task", "cls", "--model", ft_base, "--train", train, "--out", str(tmp_path / "o"), "--epochs", "1",
            "--batch-size", "4", "--no-progress", "--threads", "1", "--max-seq-len", "16"]
    assert cli_main("finetune", argv + ["--lr", "1e30", "--epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err or "NaN" in err
    assert "Traceback" not in err
    assert cli_main("finetune", argv) == 0
    json.loads(capsys.readouterr().out.strip().splitlines()[-1],
               parse_constant=lambda c: pytest.fail(f"{c} in the printed JSON"))


@pytest.mark.parametrize("labels,message", [(["pos"] * 8, "at least two classes"),
                                            ([3, 3.0] * 4, "'3' / '3.0' are one number written two ways")])
def test_degenerate_label_sets_are_refused(ft_base, tmp_path, labels, message):
    from bertfast.train import finetune

    rows = [{"text": "the film is good", "label": lab} for lab in labels]
    with pytest.raises(ValueError, match=message):
        finetune(_ft_args(ft_base, _write_jsonl(tmp_path / "t.jsonl", rows), tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ---- pre-training ---------------------------------------------------------------------------------


def test_pretrain_resume_refuses_an_edited_corpus(tok_folder, tmp_path):
    from bertfast.train import pretrain, pretrain_parser

    corpus = tmp_path / "corpus.txt"
    docs = ["the film is good . john lives in paris .", "the film was bad . a very long text ."]
    corpus.write_text("\n\n".join("\n".join([d] * 6) for d in docs * 3) + "\n")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "intermediate_size": 32, "max_position_embeddings": 64}))

    def args(*extra):
        return pretrain_parser().parse_args(["--train", str(corpus), "--tokenizer", tok_folder, "--config", str(cfg),
                                             "--out", str(tmp_path / "run"), "--batch-size", "2", "--seq-len", "16",
                                             "--no-progress", "--threads", "1", "--save-every", "1",
                                             "--eval-every", "0", *extra])

    pretrain(args("--max-steps", "1"))
    corpus.write_text(corpus.read_text().replace("paris", "john"))
    with pytest.raises(ValueError, match="--train files' content changed"):
        pretrain(args("--max-steps", "2", "--resume"))


def test_a_model_smaller_than_its_tokenizer_is_refused_when_loaded(tok_folder, tmp_path):
    from bertfast import BertConfig, BertForPreTraining, Tokenizer
    from bertfast.train import finetune

    tok = Tokenizer.from_pretrained(tok_folder)
    model = BertForPreTraining(BertConfig(vocab_size=tok.vocab_size - 3, hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=32, max_position_embeddings=64))
    model.save_pretrained(str(tmp_path / "m"), tokenizer=tok)
    train = _write_jsonl(tmp_path / "t.jsonl", CLS_ROWS)
    with pytest.raises(ValueError, match=f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size "
                                         f"is {tok.vocab_size - 3}"):
        finetune(_ft_args(str(tmp_path / "m"), train, tmp_path / "out"))
