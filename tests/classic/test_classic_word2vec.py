"""Skip-gram word2vec: pairs, both losses learn on real text (held-out pair AUC above the
word-frequency baseline), analogy arithmetic, the command line."""
import json

import pytest
import torch

from bertfast.classic import datasets, word2vec
from bertfast.classic.text import Vocab

pytestmark = pytest.mark.usefixtures("one_thread")


def _split():
    texts, labels = datasets.docstring_topics()
    return datasets.split(texts, labels, 0.2)


def test_skipgram_pairs_are_every_window_neighbour():
    pairs = word2vec.skipgram_pairs([[5, 6, 7], [8]], window=1, unk=None)
    assert sorted(map(tuple, pairs.tolist())) == [(5, 6), (6, 5), (6, 7), (7, 6)]
    pairs = word2vec.skipgram_pairs([[5, 1, 7]], window=2, unk=1)  # pairs with <unk> dropped
    assert sorted(map(tuple, pairs.tolist())) == [(5, 7), (7, 5)]


@pytest.mark.parametrize("loss", ["negative", "softmax"])
def test_word2vec_learns_on_real_text(loss):
    (tr, _), (te, _) = _split()
    model, vocab, hist = word2vec.train(tr, vocab_size=2000, dim=32, loss=loss, steps=400, batch_size=256,
                                        lr=0.05, seed=0)
    first, last = sum(hist["losses"][:10]) / 10, sum(hist["losses"][-10:]) / 10
    assert last < first - 0.5, (first, last)
    pairs = word2vec.skipgram_pairs([vocab.encode(s) for s in te], 2)
    noise = word2vec.noise_distribution(vocab.counts)
    auc = word2vec.pair_auc(model.score, pairs, noise)
    baseline = word2vec.pair_auc(lambda c, o: vocab.counts[o], pairs, noise)
    assert auc > baseline + 0.03, (auc, baseline)


def test_analogy_is_a_minus_b_plus_c():
    vocab = Vocab(["king", "man", "woman", "queen", "apple"])
    model = word2vec.SkipGram(len(vocab), 3)
    vec = {"king": [1, 1, 0], "man": [1, 0, 0], "woman": [0, 0, 1], "queen": [0, 1, 1], "apple": [1, -1, 1]}
    with torch.no_grad():
        for w, v in vec.items():
            model.W.weight[vocab.id(w)] = torch.tensor(v, dtype=torch.float)
    # unit vectors: king/sqrt2 - man + woman is closest to queen
    assert word2vec.analogy(model, vocab, "king", "man", "woman", k=1)[0][0] == "queen"
    assert [w for w, _ in word2vec.neighbours(model, vocab, "queen", k=4)][-1] == "apple"
    assert "queen" not in [w for w, _ in word2vec.neighbours(model, vocab, "queen", k=4)]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        word2vec.neighbours(model, vocab, "pear")


def test_word2vec_command_line(tmp_path, capsys):
    from bertfast.cli import main

    (tr, _), (te, _) = _split()
    (tmp_path / "train.txt").write_text("\n".join(tr[:1500]))
    (tmp_path / "test.txt").write_text("\n".join(te[:300]))
    out = tmp_path / "w2v"
    assert main(["classic", "word2vec", "train", "--train", str(tmp_path / "train.txt"), "--test",
                 str(tmp_path / "test.txt"), "--out", str(out), "--steps", "60", "--vocab", "1000", "--dim", "16",
                 "--log-every", "0"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["loss_last"] < res["loss_first"] and 0.0 < res["test_pair_auc"] <= 1.0
    assert main(["classic", "word2vec", "neighbours", "--model", str(out), "the", "--k", "3"]) == 0
    assert len(json.loads(capsys.readouterr().out)["neighbours"]) == 3
    assert main(["classic", "word2vec", "analogy", "--model", str(out), "a", "the", "an"]) == 0
    assert len(json.loads(capsys.readouterr().out)["answers"]) == 5
    assert main(["classic", "word2vec", "neighbours", "--model", str(out), "zzzzqqq"]) == 1
    assert "not in the vocabulary" in capsys.readouterr().err
