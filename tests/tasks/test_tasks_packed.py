"""The task layer on the packed encoder: Tokenizer.pack batches go to forward_packed (eager and the
bucketed GraphedEncoder) and pooling reads cu_seqlens. The results equal the padded path's
(packed=False) within 1e-5 on the real MiniLM checkpoint, for every pooling and for ragged, empty
and truncated texts; the padded forward is never called."""
import warnings

import pytest
import torch

from bertfast import tasks as T

TEXTS = ["a short one", "", "a considerably longer sentence about software licences and copies " * 12, "x",
         "Two words", "The licence allows redistribution of the software, with or without changes."]


@pytest.fixture(scope="module")
def minilm(minilm_loaded):
    return minilm_loaded[1:]  # (model, tokenizer)


def _no_padded_forward(monkeypatch, model):
    def refuse(*a, **k):
        raise AssertionError("the padded forward ran")

    monkeypatch.setattr(model, "forward", refuse)


def test_pool_packed_equals_pool_on_the_padded_batch():
    torch.manual_seed(0)
    lengths = [3, 0, 5, 1]
    hidden = torch.randn(sum(lengths), 4)
    cu = torch.tensor([0, 3, 3, 8, 9], dtype=torch.int32)
    padded = torch.zeros(4, 5, 4)
    mask = torch.zeros(4, 5, dtype=torch.long)
    for i, (a, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        padded[i, :n], mask[i, :n] = hidden[a:a + n], 1
    keep = [0, 2, 3]  # the padded pool has no answer for an empty row (-inf max, row 0 for cls)
    for pooling in ("mean", "cls", "max"):
        got = T.pool_packed(hidden, cu, pooling)
        torch.testing.assert_close(got[keep], T.pool(padded, mask, pooling)[keep], rtol=1e-6, atol=1e-6)
        assert torch.equal(got[1], torch.zeros(4))  # an empty sequence pools to zeros
    with pytest.raises(ValueError, match="pooling"):
        T.pool_packed(hidden, cu, "sum")


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_embed_packed_equals_padded_on_minilm(minilm, pooling, monkeypatch):
    model, tok = minilm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", T.TruncationWarning)  # max_length=32 cuts the long text
        kw = dict(pooling=pooling, batch_size=4, max_length=32)
        padded = {layer: T.embed(model, tok, TEXTS, layer=layer, packed=False, **kw) for layer in (-1, 0)}
        windows = T.embed(model, tok, TEXTS, long_texts="windows", packed=False, **kw)
        graphed_padded = T.embed(model, tok, TEXTS, cuda_graphs=True, packed=False, **kw)
        _no_padded_forward(monkeypatch, model)
        for layer in (-1, 0):
            torch.testing.assert_close(T.embed(model, tok, TEXTS, layer=layer, **kw), padded[layer],
                                       rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(T.embed(model, tok, TEXTS, long_texts="windows", **kw), windows,
                                   rtol=1e-5, atol=1e-5)
        # the bucketed encoder (eager on a CPU: the graphs' packing, slots and copy-out) takes the
        # packed batch as it is
        graphed = T.embed(model, tok, TEXTS, cuda_graphs=True, **kw)
    torch.testing.assert_close(graphed, graphed_padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(graphed, padded[-1], rtol=1e-5, atol=1e-5)


def test_search_and_cluster_run_packed(minilm, monkeypatch):
    model, tok = minilm
    corpus = ["The cat sat on the mat.", "Stock markets fell sharply today.", "A kitten is sleeping on the rug.",
              "Investors sold shares as prices dropped."]
    want = T.search(model, tok, ["Shares lost value"], corpus, k=2, packed=False)
    labels_padded, _ = T.cluster(model, tok, corpus, 2, packed=False)
    _no_padded_forward(monkeypatch, model)
    scores, idx = T.search(model, tok, ["Shares lost value"], corpus, k=2)
    assert torch.equal(idx, want[1]) and torch.allclose(scores, want[0], atol=1e-5)
    assert torch.equal(T.cluster(model, tok, corpus, 2)[0], labels_padded)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small WordPiece vocabulary trained on real text."""
    from bertfast import Tokenizer
    from bertfast.testing import system_sentences

    path = tmp_path_factory.mktemp("tok") / "c.txt"
    path.write_text("\n".join(system_sentences(300)), encoding="utf-8")
    return Tokenizer.train([str(path)], vocab_size=400)


def _classifier(kind, vocab):
    from bertfast import BertConfig, BertForSequenceClassification
    from bertfast.models import (DistilBertConfig, DistilBertForSequenceClassification, RobertaConfig,
                                 RobertaForSequenceClassification)

    torch.manual_seed(0)
    small = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 num_labels=3, pad_token_id=0)
    if kind == "bert":
        return BertForSequenceClassification(BertConfig(max_position_embeddings=64, **small)).eval()
    if kind == "roberta":  # positions counted past padding_idx: the packed default must follow
        return RobertaForSequenceClassification(RobertaConfig(max_position_embeddings=66, **small)).eval()
    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=3, pad_token_id=0,
        max_position_embeddings=64)).eval()


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_classify_packed_equals_padded(tok, kind, monkeypatch):
    model = _classifier(kind, tok.vocab_size)
    texts = ["short", "", "a much longer text about the licence and its copies and what they permit " * 8,
             "two words"]
    pairs = ["a pair", "b", "the second text of a pair", ""]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", T.TruncationWarning)
        kw = dict(top_k=3, batch_size=3, max_length=40)  # RoBERTa fits max_position_embeddings - padding_idx - 1
        want = [T.classify(model, tok, texts, p, packed=False, **kw) for p in (None, pairs)]
        _no_padded_forward(monkeypatch, model)
        got = [T.classify(model, tok, texts, p, **kw) for p in (None, pairs)]
    for g, w in zip(got, want):
        for gr, wr in zip(g, w):
            assert [x["label"] for x in gr] == [x["label"] for x in wr]
            assert [x["score"] for x in gr] == pytest.approx([x["score"] for x in wr], abs=1e-5)


def test_embed_packed_on_roberta_positions_through_the_graphs(tok):
    """A RoBERTa encoder's packed default positions start after padding_idx; the bucketed encoder
    gives the padded path's vectors."""
    model = _classifier("roberta", tok.vocab_size).roberta
    texts = ["a short one", "a considerably longer sentence about software licences", "x"]
    padded = T.embed(model, tok, texts, batch_size=2, packed=False)
    torch.testing.assert_close(T.embed(model, tok, texts, batch_size=2), padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(T.embed(model, tok, texts, batch_size=2, cuda_graphs=True), padded,
                               rtol=1e-5, atol=1e-5)
