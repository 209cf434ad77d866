"""`bertfast embed --out DIR`: sharded by rank under torchrun (2 CPU processes, gloo), an index, resume
without redoing finished shards, and the vectors of one process."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bertfast.tasks import shards as embed_shards
from bertfast import tasks as T

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random BertModel + WordPiece vocab saved as a folder, and a corpus of real sentences."""
    from bertfast import BertConfig, BertModel, Tokenizer
    from bertfast.data import write_corpus
    from bertfast.testing import system_documents, system_sentences

    d = tmp_path_factory.mktemp("shards")
    tok = Tokenizer.train([write_corpus(system_documents(limit=10), str(d / "c.txt"))], vocab_size=300)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    folder = str(d / "model")
    BertModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    texts = system_sentences(200)[::4][:37]
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(texts[:20]) + "\n\n" + "\n".join(texts[20:]) + "\n")  # a blank line is skipped
    ref = T.embed(BertModel.from_pretrained(folder), Tokenizer.from_pretrained(folder), texts, batch_size=8)
    return folder, str(corpus), texts, ref


def _cli(args, torchrun: int = 0, timeout: int = 120):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun)] \
        if torchrun else [sys.executable]  # --standalone: a free port on this host
    out = subprocess.run([*launcher, "-m", "bertfast", "embed", *args], capture_output=True, text=True, env=env,
                         timeout=timeout, cwd=ROOT)
    return out


def test_torchrun_two_processes_equal_one(setup, tmp_path):
    folder, corpus, texts, ref = setup
    out = _cli(["--model", folder, corpus, "--out", str(tmp_path / "two"), "--batch-size", "8"], torchrun=2)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert summary == [{"out": str(tmp_path / "two"), "shape": [37, 32], "shards": 2, "written": 2, "skipped": 0,
                        "processes": 2}]  # printed once, by rank 0
    index = json.loads((tmp_path / "two" / "index.json").read_text())
    assert index["complete"] and [(s["start"], s["end"]) for s in index["shards"]] == [(0, 18), (18, 37)]
    two = embed_shards.load(str(tmp_path / "two"))
    one = _cli(["--model", folder, corpus, "--out", str(tmp_path / "one"), "--batch-size", "8"])
    assert one.returncode == 0, one.stderr[-3000:]
    assert json.loads((tmp_path / "one" / "index.json").read_text())["shards"] == [
        {"file": "shard-00000.npy", "start": 0, "end": 37}]
    np.testing.assert_allclose(two, embed_shards.load(str(tmp_path / "one")), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(two, ref.numpy(), atol=1e-5, rtol=1e-5)


def test_resume_skips_finished_shards(setup, tmp_path, capsys):
    from bertfast.cli import main

    folder, corpus, texts, ref = setup
    out = tmp_path / "emb"
    args = ["embed", "--model", folder, corpus, "--out", str(out), "--shard-size", "10", "--batch-size", "8"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert first["shards"] == 4 and first["written"] == 4
    np.testing.assert_allclose(embed_shards.load(str(out)), ref.numpy(), atol=1e-5, rtol=1e-5)
    # a crash: shard 2 never written (a temporary file left behind); shard 1 zero-filled at the
    # right shape (damaged: its SHA-256 no longer matches its record); shard 0 untouched
    (out / "shard-00002.npy").rename(out / "shard-00002.npy.tmp123.npy")
    np.save(out / "shard-00001.npy", np.zeros((9, 32), dtype=np.float32))  # 37 rows in 4 shards: 9, 9, 9, 10
    before = os.stat(out / "shard-00000.npy")
    with pytest.raises(ValueError, match="not complete"):
        embed_shards.load(str(out))
    assert main(args + ["--shard-size", "3"]) == 0  # the layout of the first run is kept
    again = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (again["written"], again["skipped"]) == (2, 2)
    after = os.stat(out / "shard-00000.npy")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # finished shards are not redone
    np.testing.assert_allclose(embed_shards.load(str(out)), ref.numpy(), atol=1e-5, rtol=1e-5)


def test_other_job_in_the_folder_is_refused(setup, tmp_path, capsys):
    from bertfast.cli import main

    folder, corpus, _, _ = setup
    out = str(tmp_path / "emb")
    assert main(["embed", "--model", folder, corpus, "--out", out]) == 0
    capsys.readouterr()
    assert main(["embed", "--model", folder, corpus, "--out", out, "--pooling", "cls"]) == 1
    err = capsys.readouterr().err
    assert "another job" in err and "pooling" in err
    assert main(["embed", "--model", folder, corpus, "--out", str(tmp_path / "e.txt")]) == 1
    assert "--out must name a .npy file or a folder" in capsys.readouterr().err


def test_layout_and_plan():
    assert embed_shards.layout(5, 2) == [{"file": "shard-00000.npy", "start": 0, "end": 2},
                                         {"file": "shard-00001.npy", "start": 2, "end": 5}]
    assert len(embed_shards.layout(3, 8)) == 3  # never an empty shard
    with pytest.raises(ValueError, match="shard-size"):
        embed_shards.plan("/nonexistent-folder", {}, 10, 1, 0)
    assert embed_shards.fingerprint(["a", "b"]) != embed_shards.fingerprint(["a b"])
