"""Pre-training and fine-tuning loops: loss goes down, exact resume, metrics, DDP equivalence,
fine-tuning for every task, CLI errors."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from bertfast.data import write_corpus
from bertfast.testing import system_documents
from bertfast.train import (finetune, finetune_parser, parameter_groups, pretrain, pretrain_parser, read_metrics,
                            warmup_linear_schedule)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
         "max_position_embeddings": 128}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from bertfast import Tokenizer

    d = tmp_path_factory.mktemp("train")
    docs = system_documents(limit=80)
    corpus = write_corpus(docs, str(d / "corpus.txt"))
    tok = Tokenizer.train([corpus], vocab_size=600)
    tok.save_pretrained(str(d / "tok"))
    cfg = d / "small.json"
    cfg.write_text(json.dumps(SMALL))
    return {"dir": d, "corpus": corpus, "tok": str(d / "tok"), "config": str(cfg)}


def _args(setup, out, *extra):
    return pretrain_parser().parse_args(
        ["--train", setup["corpus"], "--tokenizer", setup["tok"], "--config", setup["config"], "--out", str(out),
         "--batch-size", "8", "--seq-len", "48", "--log-every", "1", "--eval-every", "0", "--no-progress",
         "--threads", "1", *extra])


def test_parameter_groups_exclude_bias_and_layernorm():
    from bertfast import BertConfig, BertForPreTraining

    model = BertForPreTraining(BertConfig(vocab_size=50, **SMALL))
    decay, no_decay = parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 for p in decay["params"])
    assert any("LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert all(not names[id(p)].endswith(".bias") for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0
    # tied decoder weight appears once
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_warmup_then_linear_decay():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = warmup_linear_schedule(opt, 4, 10)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == sorted(lrs[:4]) and lrs[3] < 1.0
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[4:] == sorted(lrs[4:], reverse=True) and lrs[-1] < 0.2


def test_pretraining_lowers_loss_and_writes_metrics(setup, tmp_path):
    out = tmp_path / "run"
    res = pretrain(_args(setup, out, "--max-steps", "30", "--lr", "2e-3", "--warmup-steps", "3", "--eval",
                         setup["corpus"], "--eval-every", "30", "--eval-batches", "3", "--save-every", "0",
                         "--log-every", "5"))
    rows = read_metrics(str(out / "metrics.jsonl"))
    train = [r for r in rows if "mlm_loss" in r]
    assert res["out"] == str(out) and res["step"] == 30  # the command's last line names its folder
    evals = [r for r in rows if "eval_mlm_loss" in r]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    for key in ("mlm_loss", "nsp_loss", "lr", "tokens_per_s", "mlm_acc"):
        assert key in train[0]
    assert train[-1]["mlm_loss"] < train[0]["mlm_loss"] - 0.3
    assert [r["step"] for r in evals] == [0, 30] and evals[1]["eval_mlm_loss"] < evals[0]["eval_mlm_loss"]
    # the final model and tokenizer load back
    from bertfast import BertForPreTraining, Tokenizer

    BertForPreTraining.from_pretrained(str(out))
    Tokenizer.from_pretrained(str(out))
    # --eval-only on the saved model reproduces the final evaluation
    res = pretrain(pretrain_parser().parse_args(
        ["--eval-only", "--init", str(out), "--eval", setup["corpus"], "--batch-size", "8", "--seq-len", "48",
         "--eval-batches", "3", "--threads", "1"]))
    assert res["eval_mlm_loss"] == pytest.approx(evals[1]["eval_mlm_loss"], rel=1e-4)
    assert res["eval_nsp_acc"] == pytest.approx(evals[1]["eval_nsp_acc"])


def test_resume_reproduces_losses(setup, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    pretrain(_args(setup, a, "--max-steps", "6", "--save-every", "3", "--lr", "1e-3"))
    # every checkpoint carries its tokenizer: a folder from_pretrained and the command line take as it is
    from bertfast import Tokenizer

    assert Tokenizer.from_pretrained(str(a / "checkpoints" / "step-00000003")).vocab_size > 0
    full = {r["step"]: r["mlm_loss"] + r["nsp_loss"] for r in read_metrics(str(a / "metrics.jsonl"))}
    # b = a run interrupted after step 3: only its step-3 checkpoint and metrics survive
    os.makedirs(b / "checkpoints")
    shutil.copytree(a / "checkpoints" / "step-00000003", b / "checkpoints" / "step-00000003")
    (b / "checkpoints" / "latest").write_text("step-00000003")
    (b / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in read_metrics(str(a / "metrics.jsonl"))
                                             if r["step"] <= 3) + json.dumps({"step": 5, "mlm_loss": 0}) + "\n")
    pretrain(_args(setup, b, "--max-steps", "6", "--save-every", "3", "--lr", "1e-3", "--resume"))
    resumed = {r["step"]: r["mlm_loss"] + r["nsp_loss"] for r in read_metrics(str(b / "metrics.jsonl"))}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for s in (4, 5, 6):
        assert resumed[s] == pytest.approx(full[s], rel=1e-6, abs=1e-6), (s, resumed[s], full[s])
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_packed_pretraining_learns_and_resumes_exactly(setup, tmp_path):
    """--pack: several pairs per row, losses logged from device tensors, data position counted in
    examples (each batch packs its own number): a resumed run continues with the same losses."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--pack", "--pack-budget", "96", "--batch-size", "3", "--max-steps", "6", "--save-every", "3",
              "--lr", "2e-3", "--warmup-steps", "1"]
    pretrain(_args(setup, a, *common))
    rows = read_metrics(str(a / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_s"] > 0 and 0 <= r["mlm_acc"] <= 1 and 0 <= r["nsp_acc"] <= 1 for r in rows)
    assert rows[-1]["mlm_loss"] < rows[0]["mlm_loss"]
    state = torch.load(a / "checkpoints" / "step-00000003" / "trainer_state.pt", weights_only=False)
    assert state["consumed"][0] > 3 * 3  # more pairs than rows: several per row
    os.makedirs(b / "checkpoints")
    shutil.copytree(a / "checkpoints" / "step-00000003", b / "checkpoints" / "step-00000003")
    (b / "checkpoints" / "latest").write_text("step-00000003")
    (b / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 3))
    pretrain(_args(setup, b, *common, "--resume"))
    resumed = {r["step"]: r["mlm_loss"] + r["nsp_loss"] for r in read_metrics(str(b / "metrics.jsonl"))}
    for r in rows[3:]:
        assert resumed[r["step"]] == pytest.approx(r["mlm_loss"] + r["nsp_loss"], rel=1e-6, abs=1e-6)


def test_cuda_graph_flag_needs_pack_and_a_gpu(setup, tmp_path):
    with pytest.raises(ValueError, match="--cuda-graph needs --pack"):
        pretrain(_args(setup, tmp_path / "g", "--cuda-graph", "--max-steps", "1"))
    with pytest.raises(ValueError, match="--grad-accum must be 1"):
        pretrain(_args(setup, tmp_path / "g", "--cuda-graph", "--pack", "--grad-accum", "2", "--max-steps", "1"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="one process on a CUDA device"):
            pretrain(_args(setup, tmp_path / "g", "--cuda-graph", "--pack", "--max-steps", "1", "--dropout", "0"))
    with pytest.raises(ValueError, match="--pack-budget must be >= --seq-len"):
        pretrain(_args(setup, tmp_path / "g", "--pack", "--pack-budget", "16", "--max-steps", "1"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_pretrain_cuda_graph_matches_eager(setup, tmp_path):
    """bertfast pretrain --pack --cuda-graph: the captured steps log the eager packed run's losses."""
    common = ["--pack", "--pack-budget", "96", "--batch-size", "3", "--max-steps", "6", "--save-every", "0",
              "--lr", "1e-3", "--dropout", "0", "--device", "cuda"]
    pretrain(_args(setup, tmp_path / "eager", *common))
    pretrain(_args(setup, tmp_path / "graph", *common, "--cuda-graph"))
    eager, graph = (read_metrics(str(tmp_path / d / "metrics.jsonl")) for d in ("eager", "graph"))
    assert len(eager) == len(graph) == 6
    for e, g in zip(eager, graph):  # bf16 autocast; the embedding backward's atomics reorder sums
        assert g["mlm_loss"] == pytest.approx(e["mlm_loss"], rel=2e-2), (e, g)
        assert g["nsp_loss"] == pytest.approx(e["nsp_loss"], rel=2e-2, abs=2e-2), (e, g)


def test_pretrain_into_an_out_with_an_earlier_run_needs_overwrite(setup, tmp_path):
    """A rerun without --resume into a used --out is refused (the earlier metrics.jsonl, model and
    checkpoints stay as they were); --overwrite starts afresh: one run's metrics and checkpoints."""
    out = tmp_path / "run"
    pretrain(_args(setup, out, "--max-steps", "4", "--save-every", "2", "--keep-checkpoints", "3"))
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"--out .* already holds a run \(metrics.jsonl.*--overwrite.*--resume"):
        pretrain(_args(setup, out, "--max-steps", "2"))
    assert (out / "metrics.jsonl").read_text() == before
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-00000002", "step-00000004"]
    with pytest.raises(ValueError, match="pass one of them"):
        pretrain(_args(setup, out, "--max-steps", "2", "--overwrite", "--resume"))
    pretrain(_args(setup, out, "--max-steps", "2", "--save-every", "2", "--overwrite"))
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1, 2]
    # the earlier run's step 4 would have outranked this run's step 2 on a later --resume
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-00000002"]


def test_resume_without_checkpoint_is_an_error(setup, tmp_path):
    with pytest.raises(ValueError, match="--resume"):
        pretrain(_args(setup, tmp_path / "none", "--max-steps", "2", "--resume"))


def _cli(*argv, env_extra=None, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=timeout)


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    from bertfast.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    out = tmp_path / "out"
    cases = [(["--train", str(empty)], "empty"), (["--train", str(tmp_path / "missing.txt")], "does not exist"),
             (["--train", str(empty), "--config", "huge"], "empty"), (["--train", str(empty), "--resume"], "empty")]
    for argv, match in cases:
        assert main(["pretrain", *argv, "--out", str(out), "--max-steps", "1"]) == 1
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    ok = tmp_path / "ok.txt"
    ok.write_text("one sentence here.\nanother one.\n")
    assert main(["pretrain", "--train", str(ok), "--config", "huge", "--out", str(out)]) == 1
    assert "--config must be one of" in capsys.readouterr().err and not out.exists()
    assert main(["pretrain", "--train", str(ok), "--max-steps", "0", "--out", str(out)]) == 1
    assert "--max-steps must be a positive integer" in capsys.readouterr().err and not out.exists()
    ft = ["finetune", "--task", "cls", "--model", str(tmp_path / "nomodel"), "--train", str(ok), "--out", str(out)]
    assert main(ft) == 1 and "--model" in capsys.readouterr().err and not out.exists()


def test_torchrun_two_processes_match_one_process(setup, tmp_path):
    """2 ranks x batch 4 (gloo) == 1 process with 2 accumulated micro-batches of 4 from the same shards."""
    common = ["--train", setup["corpus"], "--tokenizer", setup["tok"], "--config", setup["config"],
              "--batch-size", "4", "--seq-len", "32", "--max-steps", "2", "--num-shards", "2", "--lr", "1e-3",
              "--eval-every", "0", "--save-every", "0", "--log-every", "1", "--no-progress", "--threads", "1"]
    r = _cli("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531", "-m", "bertfast",
             "pretrain", *common, "--out", str(tmp_path / "ddp"), "--grad-accum", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    pretrain(pretrain_parser().parse_args(common + ["--out", str(tmp_path / "one"), "--grad-accum", "2"]))
    from safetensors.torch import load_file

    wa, wb = load_file(str(tmp_path / "ddp" / "model.safetensors")), load_file(str(tmp_path / "one" /
                                                                                   "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
    la = read_metrics(str(tmp_path / "ddp" / "metrics.jsonl"))
    lb = read_metrics(str(tmp_path / "one" / "metrics.jsonl"))
    assert [r["mlm_loss"] for r in la] == pytest.approx([r["mlm_loss"] for r in lb], rel=1e-4)


# ---- fine-tuning ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_model(setup):
    from bertfast import BertConfig, BertForPreTraining, Tokenizer

    tok = Tokenizer.from_pretrained(setup["tok"])
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=tok.vocab_size, **SMALL))
    folder = str(setup["dir"] / "base")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _ft(base, tmp_path, task, train, ev, *extra):
    args = finetune_parser().parse_args(["--task", task, "--model", base, "--train", train, "--eval", ev, "--out",
                                         str(tmp_path / task), "--epochs", "3", "--batch-size", "8", "--lr", "3e-3",
                                         "--no-progress", "--threads", "1", "--max-seq-len", "48", *extra])
    return finetune(args)


def test_finetune_cls_learns_an_easy_task(base_model, tmp_path):
    rows = [{"text": f"{w} is here", "label": "pos" if i % 2 else "neg"}
            for i, w in enumerate(["good", "bad"] * 20)]
    f = _write_jsonl(tmp_path / "cls.jsonl", rows)
    res = _ft(base_model, tmp_path, "cls", f, f, "--epochs", "4")
    assert res["eval_accuracy"] == 1.0
    from bertfast import BertForSequenceClassification, Tokenizer
    from bertfast.tasks import classify

    m = BertForSequenceClassification.from_pretrained(str(tmp_path / "cls"))
    tok = Tokenizer.from_pretrained(str(tmp_path / "cls"))
    assert classify(m, tok, "bad is here")["label"] == "pos"
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "cls")).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "cls"))
    batch = hf_tok(["good is here", "bad is here"], padding=True, return_tensors="pt")
    ours = tok(["good is here", "bad is here"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == ours["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(hf(**batch).logits, m(**batch).logits, atol=1e-4, rtol=1e-4)
    assert hf.config.id2label == {0: "neg", 1: "pos"}


def test_finetune_csv_nli_ner_qa_run(base_model, tmp_path):
    csv_path = tmp_path / "nli.csv"
    csv_path.write_text("premise,hypothesis,label\n" + "".join(
        f"a cat sat {i},a cat sat,{['entailment', 'neutral', 'contradiction'][i % 3]}\n" for i in range(12)))
    res = _ft(base_model, tmp_path, "nli", str(csv_path), str(csv_path), "--epochs", "1")
    assert 0 <= res["eval_accuracy"] <= 1
    ner = [{"tokens": ["Alice", "visited", "Paris", "today"], "tags": ["B-PER", "O", "B-LOC", "O"]}] * 16
    f = _write_jsonl(tmp_path / "ner.jsonl", ner)
    res = _ft(base_model, tmp_path, "ner", f, f, "--epochs", "6")
    assert res["eval_entity_f1"] > 0.9
    ctx = "The licence was written by the foundation in Boston."
    qa = [{"question": "Where was it written?", "context": ctx,
           "answers": {"text": ["Boston"], "answer_start": [ctx.index("Boston")]}}] * 16
    f = _write_jsonl(tmp_path / "qa.jsonl", qa)
    res = _ft(base_model, tmp_path, "qa", f, f, "--epochs", "6")
    assert res["eval_exact_match"] == 1.0


def _capitalised_runs(documents, n):
    """NER-style rows from real sentences: each run of capitalised words after a sentence's first
    word is a NAME span (B-NAME I-NAME ...), everything else O."""
    rows = []
    for doc in documents:
        for sent in doc:
            words = [w.strip(".,;:()[]\"'") for w in sent.split()]
            words = [w for w in words if w][:20]
            if len(words) < 4:
                continue
            tags, prev = [], False
            for i, w in enumerate(words):
                cap = i > 0 and w[:1].isupper()
                tags.append(("I-NAME" if prev else "B-NAME") if cap else "O")
                prev = cap
            rows.append({"tokens": words, "tags": tags})
            if len(rows) == n:
                return rows
    return rows


def test_finetune_ner_with_crf_from_the_command_line(base_model, tmp_path, capsys):
    from bertfast import BertForTokenClassification, Tokenizer
    from bertfast.cli import main
    from bertfast.tasks import tag

    rows = _capitalised_runs(system_documents(limit=6, include_docs=False), 48)
    assert any("B-NAME" in r["tags"] for r in rows) and any("I-NAME" in r["tags"] for r in rows)
    f = _write_jsonl(tmp_path / "ner.jsonl", rows)
    out = tmp_path / "ner_crf"
    assert main(["finetune", "--task", "ner", "--crf", "--model", base_model, "--train", f, "--eval", f, "--out",
                 str(out), "--epochs", "3", "--batch-size", "8", "--lr", "3e-3", "--no-progress", "--threads", "1",
                 "--max-seq-len", "48", "--log-every", "2"]) == 0
    capsys.readouterr()
    losses = [r["loss"] for r in read_metrics(str(out / "metrics.jsonl")) if "loss" in r]
    assert losses[-1] < losses[0], losses
    model = BertForTokenClassification.from_pretrained(str(out))
    assert model.crf is not None and model.config.crf_constraints == "bio"
    tok = Tokenizer.from_pretrained(str(out))
    for r in rows[:12]:
        labels = tag(model, tok, r["tokens"])["labels"]
        assert len(labels) == len(r["tokens"]) and labels[0] != "I-NAME"
        assert all(not (b == "I-NAME" and a == "O") for a, b in zip(labels, labels[1:])), labels
    assert main(["finetune", "--task", "cls", "--crf", "--model", base_model, "--train", f, "--out",
                 str(tmp_path / "x")]) == 1
    assert "--crf is a sequence-labelling head" in capsys.readouterr().err


def test_finetune_rejects_unknown_eval_label(base_model, tmp_path):
    tr = _write_jsonl(tmp_path / "tr.jsonl", [{"text": "x y", "label": "a"}, {"text": "y z", "label": "b"}])
    ev = _write_jsonl(tmp_path / "ev.jsonl", [{"text": "x y", "label": "c"}])
    with pytest.raises(ValueError, match="label 'c' is not one of"):
        _ft(base_model, tmp_path, "cls", tr, ev)
    assert not (tmp_path / "cls").exists()
    bad = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "why " * 100, "context": "because"}])
    with pytest.raises(ValueError, match="too long for max_seq_len"):
        _ft(base_model, tmp_path, "qa", bad, bad)


def test_finetune_refuses_a_max_seq_len_the_model_cannot_hold(base_model, tmp_path):
    """--max-seq-len past max_position_embeddings is refused before anything is written, not an
    index error at the first long record."""
    f = _write_jsonl(tmp_path / "cls.jsonl", [{"text": "good " * 200, "label": "pos"}, {"text": "bad", "label": "neg"}])
    with pytest.raises(ValueError, match="--max-seq-len is 129, more tokens than the model holds: at most 128"):
        _ft(base_model, tmp_path, "cls", f, f, "--max-seq-len", "129")
    assert not (tmp_path / "cls").exists()


def test_finetune_into_an_out_with_an_earlier_run_needs_overwrite(base_model, tmp_path):
    """A second fine-tuning into the same --out is refused, naming --out, before anything is written
    (the first run's metrics.jsonl is kept); with --overwrite it replaces the run, metrics included."""
    rows = [{"text": f"{w} is here", "label": "pos" if w == "good" else "neg"} for w in ["good", "bad"] * 8]
    f = _write_jsonl(tmp_path / "cls.jsonl", rows)
    _ft(base_model, tmp_path, "cls", f, f, "--epochs", "1")
    metrics = tmp_path / "cls" / "metrics.jsonl"
    before = metrics.read_text()
    assert [r["epoch"] for r in read_metrics(str(metrics))] == [1]
    with pytest.raises(ValueError, match=r"--out .*cls already holds a run .*--overwrite"):
        _ft(base_model, tmp_path, "cls", f, f, "--epochs", "2")
    assert metrics.read_text() == before
    _ft(base_model, tmp_path, "cls", f, f, "--epochs", "2", "--overwrite")
    assert [r["epoch"] for r in read_metrics(str(metrics))] == [1, 2]  # the second run's lines only


def test_finetune_command_line_to_predictions(base_model, tmp_path, capsys):
    """finetune prints one summary line (with or without --eval, the last evaluation not twice),
    notes texts cut to --max-seq-len, and `bertfast classify` reads its folder with the label names."""
    from bertfast.cli import main

    rows = [{"text": f"{w} is here", "label": "pos" if w == "good" else "neg"} for w in ["good", "bad"] * 12]
    rows.append({"text": "good " * 60, "label": "pos"})  # longer than --max-seq-len 32
    f = _write_jsonl(tmp_path / "cls.jsonl", rows)
    out = tmp_path / "ft"
    common = ["finetune", "--task", "cls", "--model", base_model, "--train", f, "--batch-size", "8", "--lr", "3e-3",
              "--no-progress", "--threads", "1", "--max-seq-len", "32"]
    assert main(common + ["--eval", f, "--epochs", "2", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    lines = [json.loads(x) for x in cap.out.splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2], lines  # epoch 1's evaluation, then the summary with epoch 2's
    assert lines[-1]["out"] == str(out) and lines[-1]["steps"] == 6 and "eval_accuracy" in lines[-1]
    assert "note: --train: 1 of 25 records are longer than --max-seq-len 32" in cap.err
    assert main(common + ["--epochs", "1", "--out", str(tmp_path / "noeval")]) == 0
    (summary,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert summary["steps"] == 3 and summary["train_loss"] > 0 and "eval_accuracy" not in summary
    # the fine-tuned folder predicts from the command line with the label names it was trained on
    assert main(["classify", "--model", str(out), "--text", "good is here", "--text", "bad is here"]) == 0
    preds = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [p["text"] for p in preds] == ["good is here", "bad is here"]
    assert {p["label"] for p in preds} <= {"pos", "neg"} and all(0 < p["score"] <= 1 for p in preds)


def test_finetune_help_shows_the_data_formats_and_defaults(capsys):
    from bertfast.cli import main

    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = capsys.readouterr().out
    assert '{"tokens": ["John", "lives", "in", "Paris"]' in out and '"answer_start": [17]' in out
    assert "(default: 5e-05)" in " ".join(out.split())


# ---- damaged checkpoints, planted pickles, full disks, changed settings --------------------------


@pytest.fixture(scope="module")
def ckpt_run(setup, tmp_path_factory):
    """A 4-step run with checkpoints after steps 2 and 4, and its per-step losses."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    pretrain(_args(setup, out, "--max-steps", "4", "--save-every", "2", "--keep-checkpoints", "3", "--lr", "1e-3"))
    losses = {r["step"]: r["mlm_loss"] + r["nsp_loss"] for r in read_metrics(str(out / "metrics.jsonl"))}
    return out, losses


def _copy_run(ckpt_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(ckpt_run[0], out)
    return out


def _damage(out, how):
    step4 = out / "checkpoints" / "step-00000004"
    if how == "truncated":
        w = step4 / "model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])
    elif how == "flipped":
        w = step4 / "model.safetensors"
        data = bytearray(w.read_bytes())
        data[len(data) // 2] ^= 0x40
        w.write_bytes(bytes(data))
    elif how == "no_state":
        (step4 / "trainer_state.pt").unlink()
    elif how == "no_manifest":
        (step4 / "manifest.json").unlink()
    elif how == "state_truncated":
        s = step4 / "trainer_state.pt"
        s.write_bytes(s.read_bytes()[:100])


def _load(out, setup, **kw):
    from bertfast import BertConfig, BertForPreTraining
    from bertfast.train.runtime import build_optimizer, load_checkpoint, warmup_linear_schedule

    cfg = BertConfig.from_pretrained(str(out / "checkpoints" / "step-00000002"))
    model = BertForPreTraining(cfg)
    opt = build_optimizer(model, 1e-3)
    return load_checkpoint(str(out), model, opt, warmup_linear_schedule(opt, 0, 4), **kw)


@pytest.mark.parametrize("how", ["truncated", "flipped", "no_state", "no_manifest", "state_truncated"])
def test_resume_skips_a_damaged_latest_checkpoint(ckpt_run, setup, tmp_path, how):
    out = _copy_run(ckpt_run, tmp_path)
    _damage(out, how)
    with pytest.warns(UserWarning, match="skipped damaged checkpoints step-00000004"):
        state = _load(out, setup)
    assert state["step"] == 2 and state["path"].endswith("step-00000002")


@pytest.mark.parametrize("latest", ["", "step-00000099", None])
def test_resume_without_a_usable_latest_pointer_takes_the_newest(ckpt_run, setup, tmp_path, latest):
    out = _copy_run(ckpt_run, tmp_path)
    pointer = out / "checkpoints" / "latest"
    if latest is None:
        pointer.unlink()
    else:
        pointer.write_text(latest)
    assert _load(out, setup)["step"] == 4


def test_resume_never_runs_a_planted_pickle(ckpt_run, setup, tmp_path):
    """A trainer_state.pt that runs code when unpickled (its manifest rewritten to match, as an
    attacker with write access would): loading refuses it and falls back, and nothing runs."""
    from bertfast.train.runtime import write_manifest

    out = _copy_run(ckpt_run, tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    step4 = out / "checkpoints" / "step-00000004"
    torch.save({"step": 4, "payload": Payload()}, str(step4 / "trainer_state.pt"))
    write_manifest(str(step4))
    with pytest.warns(UserWarning, match="step-00000004"):
        state = _load(out, setup)
    assert not marker.exists()
    assert state["step"] == 2


def test_resume_refuses_changed_settings_unless_forced(ckpt_run, setup, tmp_path):
    out = _copy_run(ckpt_run, tmp_path)
    args = vars(_args(setup, out, "--max-steps", "4", "--seed", "1", "--batch-size", "4", "--lr", "1e-3"))
    with pytest.raises(ValueError, match="--seed: checkpoint 0, now 1.*--batch-size: checkpoint 8, now 4"):
        _load(out, setup, args=args)
    with pytest.warns(UserWarning, match="--force-resume"):
        assert _load(out, setup, args=args, force=True)["step"] == 4
    with pytest.raises(ValueError, match="--seq-len"):
        pretrain(_args(setup, out, "--max-steps", "6", "--seq-len", "40", "--lr", "1e-3", "--resume"))


def test_resume_after_damage_is_exact_and_metrics_torn_line_is_dropped(ckpt_run, setup, tmp_path):
    """Flipped bytes in the newest checkpoint and a torn metrics line (a run killed mid-write):
    --resume warns, continues from step 2 and reproduces the uninterrupted run's losses."""
    out = _copy_run(ckpt_run, tmp_path)
    _damage(out, "flipped")
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 5, "mlm_lo')
    (out / "checkpoints" / "step-00000006.tmp4242").mkdir()  # a save a killed run left behind
    with pytest.warns(UserWarning, match="skipped damaged checkpoints"):
        pretrain(_args(setup, out, "--max-steps", "4", "--save-every", "2", "--lr", "1e-3", "--resume"))
    resumed = {r["step"]: r["mlm_loss"] + r["nsp_loss"] for r in read_metrics(str(out / "metrics.jsonl"))}
    assert sorted(resumed) == [1, 2, 3, 4]
    for s in (3, 4):
        assert resumed[s] == pytest.approx(ckpt_run[1][s], rel=1e-6, abs=1e-6)
    assert not (out / "checkpoints" / "step-00000006.tmp4242").exists()


def test_non_finite_loss_stops_with_the_step(ckpt_run, setup, tmp_path):
    """Weights that are intact on disk but NaN (a diverged run): the loop stops at once, naming the step."""
    from safetensors.torch import load_file, save_file

    from bertfast.train.runtime import write_manifest

    out = _copy_run(ckpt_run, tmp_path)
    step4 = out / "checkpoints" / "step-00000004"
    w = load_file(str(step4 / "model.safetensors"))
    key = next(k for k in w if k.endswith("word_embeddings.weight"))
    w[key] = torch.full_like(w[key], float("nan"))
    save_file(w, str(step4 / "model.safetensors"), metadata={"format": "pt"})
    write_manifest(str(step4))
    with pytest.raises(FloatingPointError, match="non-finite loss at step 5"):
        pretrain(_args(setup, out, "--max-steps", "6", "--save-every", "2", "--lr", "1e-3", "--resume",
                       "--force-resume"))


def test_disk_full_while_saving_is_clear_and_leaves_no_partial_folder(setup, tmp_path, monkeypatch):
    import errno

    from bertfast.train import runtime

    real_save = torch.save

    def full_disk(obj, path, *a, **k):
        if "trainer_state.pt" in str(getattr(path, "name", path)):  # a path, or the file object written through
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(runtime.torch, "save", full_disk)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="no space left .*checkpoints/step-00000001.tmp"):
        pretrain(_args(setup, out, "--max-steps", "1", "--save-every", "1"))
    assert os.listdir(out / "checkpoints") == []


def test_train_argument_errors_come_before_torch_is_imported():
    """`bertfast pretrain|finetune` parse their arguments before loading torch: --help, a missing
    required option and a bad choice are answered at once."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = """
import contextlib, io, sys
from bertfast.cli import main
calls = [["finetune", "--task", "cls", "--model", "m", "--train", "t.jsonl"],   # --out missing
         ["finetune", "--task", "sum", "--model", "m", "--train", "t.jsonl", "--out", "o"],
         ["pretrain", "--lr", "fast"],
         ["pretrain", "--help"]]
codes = []
for argv in calls:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            codes.append(main(argv))
        except SystemExit as e:
            codes.append(e.code)
print(codes, "torch" in sys.modules)
"""
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[2,", "2,", "2,", "0]", "False"], (r.stdout, r.stderr)
    assert "--out" in r.stderr and "invalid choice: 'sum'" in r.stderr and "invalid float value: 'fast'" in r.stderr
