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
    ("--weight-decay", "nan", "--weight-decay must be a finite"),
    ("--weight-decay", "-1", "--weight-decay must be >= 0"),
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
        finetune(_ft_args(ft_base, train, out, "--lr", "1e30", "--epochs", "2", "--overwrite"))
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


# ---- tagging: labels aligned by word index --------------------------------------------------------


@pytest.fixture(scope="module")
def tagger(tok_folder, tmp_path_factory):
    from bertfast import BertConfig, BertForTokenClassification, Tokenizer

    tok = Tokenizer.from_pretrained(tok_folder)
    labels = ["O", "B-PER", "I-PER", "B-LOC"]
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=4, id2label=dict(enumerate(labels)))
    torch.manual_seed(3)
    model = BertForTokenClassification(cfg).eval()
    folder = str(tmp_path_factory.mktemp("tagger") / "m")
    model.save_pretrained(folder, tokenizer=tok)
    return model, tok, folder


@pytest.mark.parametrize("gap", ["", "\u200b", "\x07"])
def test_tag_gives_a_word_without_pieces_no_label_and_shifts_nothing(tagger, gap):
    from bertfast.tasks import tag

    model, tok, _ = tagger
    plain = tag(model, tok, ["john", "lives", "in", "paris"])
    gapped = tag(model, tok, ["john", gap, "lives", "in", "paris"])
    assert gapped["words"] == ["john", gap, "lives", "in", "paris"]
    assert gapped["labels"] == [plain["labels"][0], None, *plain["labels"][1:]]


def test_ner_evaluation_aligns_gold_tags_by_word_index(tagger):
    """The gold tags of the words after a word without pieces used to be compared with the
    predictions of the words before them."""
    from bertfast.train.finetune import build_features, evaluate_finetune
    from bertfast.train.runtime import Runtime

    model, tok, _ = tagger
    label2id = {lab: i for i, lab in model.config.id2label.items()}
    with torch.no_grad():  # make the model answer a known tag per word: O except 'paris' (B-LOC)
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([1.0, 0, 0, 0]))
        model.bert.embeddings.word_embeddings.weight[tok.convert_tokens_to_ids("paris")] = 0
    records = [{"tokens": ["john", "", "lives", "in", "paris"], "tags": ["O", "O", "O", "O", "O"], "_line": 1}]
    feats = build_features("ner", records, tok, "t.jsonl", "--eval", label2id, 32)
    res = evaluate_finetune("ner", model, feats, tok, Runtime("cpu"), 4, model.config.id2label)
    assert res["eval_token_accuracy"] == 1.0  # four words with pieces, all O; the empty one is not scored
    records[0]["tags"] = ["O", "O", "O", "O", "B-LOC"]
    res = evaluate_finetune("ner", model, build_features("ner", records, tok, "t.jsonl", "--eval", label2id, 32),
                            tok, Runtime("cpu"), 4, model.config.id2label)
    assert res["eval_token_accuracy"] == 0.75 and res["eval_entity_f1"] == 0.0


# ---- sharded embedding: a resume knows what it resumes -------------------------------------------


@pytest.fixture()
def encoder(tok_folder, tmp_path):
    from bertfast import BertConfig, BertModel, Tokenizer

    tok = Tokenizer.from_pretrained(tok_folder)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, max_position_embeddings=64))
    folder = str(tmp_path / "enc")
    model.save_pretrained(folder, tokenizer=tok)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the film is {w}" for w in ["good", "bad", "long", "very good", "a text", "the"]))
    return folder, str(corpus), model, tok


def test_embed_resume_refuses_other_weights_in_the_same_folder(encoder, tmp_path, capsys):
    from bertfast.cli import main

    folder, corpus, model, tok = encoder
    out = tmp_path / "emb"
    args = ["embed", "--model", folder, corpus, "--out", str(out), "--shard-size", "2"]
    assert main(args) == 0
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.mul_(2)
    model.save_pretrained(folder, tokenizer=tok)
    os.remove(out / "shard-00001.npy")
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "another job" in err and "model_sha256" in err


def test_embed_index_that_is_not_an_object_is_a_clear_error(encoder, tmp_path, capsys):
    from bertfast.cli import main

    folder, corpus, _, _ = encoder
    out = tmp_path / "emb"
    out.mkdir()
    (out / "index.json").write_text("[1, 2]")
    assert main(["embed", "--model", folder, corpus, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{out / 'index.json'}: not a sharded-embedding index" in err and "Traceback" not in err


def test_embed_shard_of_the_wrong_width_or_dtype_is_redone(encoder, tmp_path, capsys):
    from bertfast.cli import main
    from bertfast.tasks import shards

    folder, corpus, _, _ = encoder
    out = tmp_path / "emb"
    args = ["embed", "--model", folder, corpus, "--out", str(out), "--shard-size", "2"]
    assert main(args) == 0
    good = shards.load(str(out))
    np.save(out / "shard-00000.npy", np.zeros((2, 8), np.float32))
    np.save(out / "shard-00002.npy", np.zeros((2, 16), np.float64))
    capsys.readouterr()
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["written"] == 2
    np.testing.assert_array_equal(shards.load(str(out)), good)


# ---- the command line: files named, one rule for invalid UTF-8, no leftovers ---------------------


def test_invalid_utf8_is_refused_by_every_command_naming_file_and_line(tagger, encoder, tmp_path, capsys):
    from bertfast.cli import main

    _, _, tag_folder = tagger
    enc_folder = encoder[0]
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_bytes(b'{"text": "the film"}\n{"text": "caf\xe9"}\n')
    bad_txt = tmp_path / "bad.txt"
    bad_txt.write_bytes(b"the film\ncaf\xe9 is good\n")
    for argv, path in ((["tag", "--model", tag_folder, str(bad_jsonl)], bad_jsonl),
                       (["embed", "--model", enc_folder, str(bad_txt), "--out", str(tmp_path / "e.npy")], bad_txt),
                       (["cluster", "--model", enc_folder, str(bad_txt), "--k", "1"], bad_txt),
                       (["search", "--model", enc_folder, "--corpus", str(bad_txt), "--query", "film"], bad_txt)):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert f"{path} line 2 is not UTF-8 text" in err and "Traceback" not in err, err
    assert not (tmp_path / "e.npy").exists()


def test_a_lone_surrogate_escape_names_its_line(tagger, tmp_path, capsys):
    from bertfast.cli import main

    f = tmp_path / "s.jsonl"
    f.write_text('{"text": "john lives"}\n{"text": "bad \\ud800 one"}\n')
    assert main(["tag", "--model", tagger[2], str(f)]) == 1
    err = capsys.readouterr().err
    assert f"{f} line 2 holds a lone surrogate escape" in err


def test_classify_out_folder_is_refused_and_leaves_nothing(tok_folder, tmp_path, capsys):
    from bertfast.cli import main

    model, tok = _model(tok_folder, ["neg", "pos"])
    model.save_pretrained(str(tmp_path / "m"), tokenizer=tok)
    (tmp_path / "dir").mkdir()
    assert main(["classify", "--model", str(tmp_path / "m"), "--text", "the film", "--out", str(tmp_path / "dir")]) == 1
    assert "is a folder" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["dir", "m"]
    assert main(["classify", "--model", str(tmp_path / "m"), "--text", "the film", "--out",
                 str(tmp_path / "p.jsonl")]) == 0
    assert json.loads((tmp_path / "p.jsonl").read_text())["label"] in ("neg", "pos")
    assert sorted(os.listdir(tmp_path)) == ["dir", "m", "p.jsonl"]


def test_cli_names_a_malformed_tokenizer_and_a_too_small_model(tok_folder, tmp_path, capsys):
    from bertfast.cli import main

    model, tok = _model(tok_folder, ["neg", "pos"])
    folder = tmp_path / "m"
    model.save_pretrained(str(folder), tokenizer=tok)
    (folder / "tokenizer.json").write_text("{broken")
    assert main(["classify", "--model", str(folder), "--text", "the film"]) == 1
    err = capsys.readouterr().err
    assert f"{folder / 'tokenizer.json'}: not a readable tokenizers file" in err and "Traceback" not in err
    cfg = json.loads((folder / "config.json").read_text())
    tok.save_pretrained(str(folder))
    small, _ = _model(tok_folder, ["neg", "pos"])
    from bertfast import BertConfig, BertForSequenceClassification

    small = BertForSequenceClassification(BertConfig.from_dict({**cfg, "vocab_size": tok.vocab_size - 2}))
    small.save_pretrained(str(folder))
    assert main(["classify", "--model", str(folder), "--text", "the film"]) == 1
    assert "the tokenizer has" in capsys.readouterr().err


def test_concurrent_saves_to_one_folder_leave_one_whole_model(tok_folder, tmp_path):
    """Several writers saving to the same folder at once (two runs with the same --out): each
    has its own temporary, the last swap wins, and the folder always holds one model whole."""
    from bertfast import BertForSequenceClassification

    models = [_model(tok_folder, [f"a{i}", f"b{i}"], seed=i) for i in range(4)]
    folder = str(tmp_path / "m")
    errors = []

    def work(i):
        try:
            for _ in range(3):
                models[i][0].save_pretrained(folder, tokenizer=models[i][1])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    back = BertForSequenceClassification.from_pretrained(folder)
    i = int(back.config.id2label[0][1:])
    torch.testing.assert_close(back.classifier.weight, models[i][0].classifier.weight)
    assert os.listdir(tmp_path) == ["m"]


def test_outputs_get_the_mode_a_plain_write_would_give(tok_folder, tmp_path):
    """mkstemp and mkdtemp make owner-only temporaries; the outputs must not stay that way."""
    old = os.umask(0o022)
    try:
        _io.write_text(str(tmp_path / "a.txt"), "x")
        model, tok = _model(tok_folder, ["a", "b"])
        model.save_pretrained(str(tmp_path / "m"), tokenizer=tok)
        os.chmod(tmp_path / "a.txt", 0o640)
        _io.write_text(str(tmp_path / "a.txt"), "y")  # a replaced file keeps its mode
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "m").st_mode & 0o777 == 0o755
    assert os.stat(tmp_path / "m" / "model.safetensors").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "a.txt").st_mode & 0o777 == 0o640


def _fail_safetensors(monkeypatch):
    import safetensors.torch

    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)


def test_finetune_out_is_replaced_whole_or_not_at_all(ft_base, tmp_path, monkeypatch, capsys):
    """The bug this guards: a second fine-tune with other labels into the same --out, whose weight
    write fails, used to leave the new label names beside the old weights."""
    from bertfast import BertForSequenceClassification
    from bertfast.train.cli import cli_main

    out = tmp_path / "out"
    argv = ["--task", "cls", "--model", ft_base, "--out", str(out), "--epochs", "1", "--batch-size", "4",
            "--no-progress", "--threads", "1", "--max-seq-len", "16"]
    assert cli_main("finetune", argv + ["--train", _write_jsonl(tmp_path / "a.jsonl", CLS_ROWS)]) == 0
    before = BertForSequenceClassification.from_pretrained(str(out))
    spam = [{**r, "label": "spam" if r["label"] == "pos" else "ham"} for r in CLS_ROWS]
    _fail_safetensors(monkeypatch)
    assert cli_main("finetune", argv + ["--train", _write_jsonl(tmp_path / "b.jsonl", spam), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert f"could not write {out}: no space left on device" in err and "Traceback" not in err
    monkeypatch.undo()
    after = BertForSequenceClassification.from_pretrained(str(out))
    assert after.config.id2label == before.config.id2label == {0: "neg", 1: "pos"}
    torch.testing.assert_close(after.classifier.weight, before.classifier.weight)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_pretrain_out_is_replaced_whole_and_keeps_its_checkpoints(tok_folder, tmp_path, monkeypatch):
    from bertfast import BertForPreTraining
    from bertfast.train import pretrain, pretrain_parser

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("\n".join(["the film is good . john lives in paris ."] * 4) for _ in range(4)))

    def run(hidden, *extra):
        cfg = tmp_path / f"c{hidden}.json"
        cfg.write_text(json.dumps({"hidden_size": hidden, "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "intermediate_size": 32, "max_position_embeddings": 64}))
        pretrain(pretrain_parser().parse_args(
            ["--train", str(corpus), "--tokenizer", tok_folder, "--config", str(cfg), "--out", str(tmp_path / "run"),
             "--batch-size", "2", "--seq-len", "16", "--no-progress", "--threads", "1", "--eval-every", "0",
             "--max-steps", "1", *extra]))

    run(16, "--save-every", "1")
    _fail_safetensors(monkeypatch)
    with pytest.raises(OSError, match="no space left on device"):
        run(32, "--save-every", "0", "--overwrite")
    monkeypatch.undo()
    assert BertForPreTraining.from_pretrained(str(tmp_path / "run")).config.hidden_size == 16
    run(32, "--save-every", "1", "--overwrite")
    assert BertForPreTraining.from_pretrained(str(tmp_path / "run")).config.hidden_size == 32
    # the run's checkpoint, written before the model, is carried over by the model's save
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["latest", "step-00000001"]


@pytest.mark.parametrize("option,value,message", [
    ("--lr", "inf", "--lr must be a finite number"), ("--max-grad-norm", "nan", "--max-grad-norm must be a finite"),
    ("--mlm-probability", "1.5", r"--mlm-probability must be in \(0, 1\]"),
    ("--dropout", "1", r"--dropout must be in \[0, 1\)")])
def test_pretrain_refuses_bad_float_options_before_writing(tok_folder, tmp_path, option, value, message):
    from bertfast.train import pretrain, pretrain_parser

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the film is good .\njohn lives in paris .\n")
    with pytest.raises(ValueError, match=message):
        pretrain(pretrain_parser().parse_args(["--train", str(corpus), "--tokenizer", tok_folder, "--config", "tiny",
                                               "--out", str(tmp_path / "run"), "--max-steps", "1", option, value]))
    assert not (tmp_path / "run").exists()


def test_a_folder_swapped_away_during_the_check_is_not_a_file(tok_folder, tmp_path, monkeypatch):
    """Another writer renames the folder aside between this writer's look and its save: the folder
    seen a moment ago and gone now is not "a file in the way" (it made concurrent saves fail)."""
    model, tok = _model(tok_folder, ["a", "b"], seed=0)
    folder = str(tmp_path / "m")
    real_exists = os.path.exists
    # the folder existed when looked at, and is gone by the next look (another writer's swap)
    monkeypatch.setattr(os.path, "exists", lambda p: True if os.path.abspath(p) == folder else real_exists(p))
    model.save_pretrained(folder, tokenizer=tok)
    monkeypatch.undo()
    assert os.path.isdir(folder)


def test_a_file_where_the_folder_goes_is_refused_and_kept(tok_folder, tmp_path):
    from bertfast._io import WriteError

    model, tok = _model(tok_folder, ["a", "b"], seed=0)
    path = tmp_path / "m"
    path.write_text("mine")
    with pytest.raises(WriteError, match="not a folder"):
        model.save_pretrained(str(path), tokenizer=tok)
    assert path.read_text() == "mine" and os.listdir(tmp_path) == ["m"]
