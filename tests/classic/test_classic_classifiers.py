"""Bag of words, TextCNN and ELMo features: each learns the real docstring-topic task (held-out
accuracy above the majority class), a row's scores do not depend on its batch's padding, and
the command line trains, saves, loads and predicts."""
import json

import pytest
import torch

from bertfast.classic import bow, datasets, elmo, textcnn
from bertfast.classic.text import pad_batch
from bertfast.classic.training import accuracy, majority_accuracy, predict_classes

pytestmark = pytest.mark.usefixtures("one_thread")


def _split():
    texts, labels = datasets.docstring_topics()
    return datasets.split(texts, labels, 0.2)


def test_docstring_topics_are_real_and_split_deterministically():
    texts, labels = datasets.docstring_topics()
    assert len(set(labels)) >= 4 and len(texts) > 1500 and len(set(texts)) == len(texts)
    (tr, _), (te, _) = datasets.split(texts, labels, 0.2)
    assert not set(tr) & set(te) and 0.15 < len(te) / len(texts) < 0.25
    assert datasets.split(texts, labels, 0.2)[1][0] == te


def test_bag_of_words_learns():
    (tr_x, tr_y), (te_x, te_y) = _split()
    model, vocab, classes, hist = bow.train(tr_x, tr_y, steps=150, seed=0)
    acc = accuracy(bow.predict(model, vocab, classes, te_x), te_y)
    assert hist["losses"][-1] < hist["losses"][0]
    assert acc > majority_accuracy(tr_y, te_y) + 0.3, acc


def test_textcnn_learns_and_ignores_padding():
    (tr_x, tr_y), (te_x, te_y) = _split()
    model, vocab, classes, hist = textcnn.train(tr_x, tr_y, dim=32, filters=32, steps=200, batch_size=32, lr=3e-3,
                                                max_len=40, seed=0)
    acc = accuracy(predict_classes(model, vocab, classes, te_x, max_len=40), te_y)
    assert acc > majority_accuracy(tr_y, te_y) + 0.1, acc
    ids = [vocab.encode(t) for t in ["a short one", te_x[0], te_x[1] + " " + te_x[2]]]
    batch, lengths = pad_batch(ids)
    together = model(batch, lengths)
    for i, seq in enumerate(ids):
        alone = model(*pad_batch([seq]))
        torch.testing.assert_close(together[i], alone[0], rtol=1e-5, atol=1e-5)


def test_textcnn_filters_span_the_embedding_width():
    m = textcnn.TextCNN(50, 3, dim=8, windows=(2, 3, 4), filters=5)
    assert [tuple(c.weight.shape) for c in m.convs] == [(5, 1, 2, 8), (5, 1, 3, 8), (5, 1, 4, 8)]
    assert m(torch.tensor([[4]]), torch.tensor([1])).shape == (1, 3)  # shorter than every window


def test_reverse_within_length():
    x = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    assert elmo.reverse_within_length(x, torch.tensor([3, 2])).tolist() == [[3, 2, 1, 0], [5, 4, 0, 0]]


def test_elmo_lm_learns_and_features_classify():
    (tr_x, tr_y), (te_x, te_y) = _split()
    bilm, vocab, hist = elmo.train_lm(tr_x, vocab_size=1000, hidden=48, steps=60, batch_size=32, lr=5e-3,
                                      max_len=32, seed=0)
    assert elmo.lm_perplexity(bilm, vocab, te_x[:300], 32) < 0.8 * elmo.unigram_perplexity(vocab, te_x[:300], 32)
    # each direction reads only its own side: the forward state at t ignores tokens after t
    ids, lengths = elmo.lm_batch(vocab, te_x[:2], 32)
    changed = ids.clone()
    changed[0, lengths[0] - 2] = vocab.id("the")
    f1, f2 = bilm.features(ids, lengths), bilm.features(changed, lengths)
    H = bilm.embedding.embedding_dim
    t = int(lengths[0]) - 3
    torch.testing.assert_close(f1[1:, 0, :t + 1, :H], f2[1:, 0, :t + 1, :H])
    torch.testing.assert_close(f1[1:, 0, t + 2:lengths[0], H:], f2[1:, 0, t + 2:lengths[0], H:])
    # padding of other rows does not change a row's features
    alone = bilm.features(ids[1:2, : lengths[1]], lengths[1:2])
    torch.testing.assert_close(f1[:, 1, : lengths[1]], alone[:, 0], rtol=1e-5, atol=1e-5)
    before = {k: v.clone() for k, v in bilm.state_dict().items()}
    clf, classes, _ = elmo.train_classifier(bilm, vocab, tr_x, tr_y, steps=150, lr=5e-3, max_len=32, seed=0)
    acc = accuracy(predict_classes(clf, vocab, classes, te_x, max_len=32), te_y)
    assert acc > majority_accuracy(tr_y, te_y) + 0.05, acc
    for k, v in clf.bilm.state_dict().items():  # the language model stays frozen
        assert torch.equal(v, before[k]), k


def test_classifier_command_line(tmp_path, capsys):
    from bertfast.cli import main

    assert main(["classic", "data", "docstrings", "--out", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["train"] > info["test"] > 100 and len(info["classes"]) >= 4
    out = tmp_path / "cnn"
    assert main(["classic", "textcnn", "train", "--train", str(tmp_path / "train.tsv"), "--test",
                 str(tmp_path / "test.tsv"), "--out", str(out), "--steps", "30", "--dim", "16", "--filters", "8",
                 "--log-every", "0"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= res["test_accuracy"] <= 1 and res["majority_baseline"] > 0
    assert main(["classic", "textcnn", "predict", "--model", str(out), "Return the event loop.",
                 "Parse an email message."]) == 0
    preds = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(preds) == 2 and all(p["label"] in info["classes"] for p in preds)
    assert main(["classic", "bow", "predict", "--model", str(out), "x"]) == 1
    assert "holds a 'textcnn' model" in capsys.readouterr().err


def test_shuffled_batches_cover_each_epoch_and_never_yield_a_lone_example():
    from bertfast.classic.training import shuffled_batches

    it = shuffled_batches(7, 3, seed=0)
    epoch = [next(it) for _ in range(2)]  # 3 + 3; the lone 7th example is left for a later epoch
    assert [len(b) for b in epoch] == [3, 3] and len(set(torch.cat(epoch).tolist())) == 6
    it = shuffled_batches(8, 3, seed=0)
    assert sorted(torch.cat([next(it) for _ in range(3)]).tolist()) == list(range(8))
