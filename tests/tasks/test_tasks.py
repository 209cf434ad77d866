"""Inference tasks: hand-made decoding cases, then the model plumbing (MiniLM for embeddings,
tiny random heads for fill-mask, tagging and QA) and the CLI."""
import io
import json
import os

import numpy as np
import pytest
import torch

from bertfast import tasks as T

# ---- decoding ---------------------------------------------------------------------------------


def test_topk_tokens_orders_and_excludes():
    logits = torch.tensor([[0.0, 5.0, 1.0, 3.0], [2.0, 0.0, 0.0, 0.0]])
    out = T.topk_tokens(logits, 2, id_to_token=lambda i: "abcd"[i], exclude=[1])
    assert [c["token"] for c in out[0]] == ["d", "c"]
    assert [c["token_id"] for c in out[1]] == [0, 2] or [c["token_id"] for c in out[1]][0] == 0
    p = torch.tensor([0.0, 1.0, 3.0]).softmax(-1)
    assert out[0][0]["score"] == pytest.approx(float(p[2]))
    assert len(T.topk_tokens(logits, 10)[0]) == 4
    with pytest.raises(ValueError, match="top_k"):
        T.topk_tokens(logits, 0)


def test_pool_ignores_padding():
    h = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    m = torch.tensor([[1, 1, 0]])
    assert T.pool(h, m, "mean").tolist() == [[2.0, 2.0]]
    assert T.pool(h, m, "cls").tolist() == [[1.0, 1.0]]
    assert T.pool(h, m, "max").tolist() == [[3.0, 3.0]]
    with pytest.raises(ValueError, match="pooling"):
        T.pool(h, m, "sum")


def test_cosine_topk():
    corpus = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    scores, idx = T.cosine_topk(torch.tensor([[2.0, 0.1]]), corpus, 3)
    assert idx.tolist() == [[0, 2, 1]]
    assert scores[0, 0] > scores[0, 1] > scores[0, 2]
    scores, idx = T.cosine_topk(torch.tensor([1.0, 0.0]), corpus, 10)  # k larger than the corpus
    assert idx.shape == (1, 4) and idx[0, -1] == 3
    with pytest.raises(ValueError, match="embedding size"):
        T.cosine_topk(torch.ones(1, 3), corpus, 1)


def test_kmeans_separates_blobs_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 5, generator=g) * 0.1 + torch.tensor([5.0, 0, 0, 0, 0])
    b = torch.randn(20, 5, generator=g) * 0.1 + torch.tensor([0, 0, 0, 0, 5.0])
    x = torch.cat([a, b])
    labels, cent = T.kmeans(x, 2, seed=1)
    assert len(set(labels[:20].tolist())) == 1 and len(set(labels[20:].tolist())) == 1
    assert labels[0] != labels[20] and cent.shape == (2, 5)
    assert torch.equal(T.kmeans(x, 2, seed=1)[0], labels)
    with pytest.raises(ValueError, match="k must be"):
        T.kmeans(x, 41)


def test_classification_softmax_and_multilabel_threshold():
    id2label = {0: "a", 1: "b", 2: "c"}
    logits = torch.tensor([[0.0, 2.0, 1.0], [0.0, 0.0, -3.0]])
    out = T.decode_classification(logits, id2label)
    assert out[0]["label"] == "b" and out[0]["score"] == pytest.approx(float(logits[0].softmax(-1)[1]))
    assert [r["label"] for r in T.decode_classification(logits, id2label, top_k=2)[0]] == ["b", "c"]
    # multi-label: sigmoid(0) = 0.5 is kept at threshold 0.5 (>=), sigmoid(-3) never
    ml = T.decode_classification(logits, id2label, multi_label=True, threshold=0.5)
    assert [r["label"] for r in ml[0]] == ["b", "c", "a"]
    assert [r["label"] for r in ml[1]] == ["a", "b"]
    assert T.decode_classification(logits, id2label, multi_label=True, threshold=0.9)[1] == []
    assert [r["label"] for r in T.decode_classification(logits, id2label, True, 0.8)[0]] == ["b"]


def test_word_labels_take_first_piece():
    # [CLS] new ##york is [SEP] -> words: new-york(0), is(1)
    assert T.word_labels([9, 1, 2, 3, 9], [None, 0, 0, 1, None]) == [1, 3]
    assert T.word_labels([], []) == []


@pytest.mark.parametrize("tags, spans", [
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
    (["I-PER", "I-PER", "O"], [("PER", 0, 2)]),                     # I- without B- starts a span
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 3)]),  # type change starts a new span
    (["B-PER", "B-PER", "I-PER"], [("PER", 0, 1), ("PER", 1, 3)]),  # B- always starts a new span
    (["O", "O"], []),
    (["B-ORG", "I-ORG", "I-ORG"], [("ORG", 0, 3)]),                 # span running to the end
    (["S-LOC", "B-PER", "E-PER", "O"], [("LOC", 0, 1), ("PER", 1, 3)]),
    (["PER", "PER", "O", "LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),   # bare labels, no BIO prefix
])
def test_bio_spans(tags, spans):
    assert [(s["type"], s["start"], s["end"]) for s in T.bio_spans(tags)] == spans


def test_best_span_rules():
    allowed = torch.tensor([False, True, True, True, True, False])
    start = torch.tensor([9.0, 0.0, 1.0, 0.0, 5.0, 9.0])
    end = torch.tensor([9.0, 0.0, 4.0, 0.0, 0.0, 9.0])
    # positions 0 and 5 score most but are not context; (2, 2) and (4, 4) tie at 5, the first wins
    assert T.best_span(start, end, allowed, max_answer_len=30) == (2, 2, 5.0)
    # end before start is never chosen even when it scores more
    s, e, _ = T.best_span(torch.tensor([0.0, 0.0, 5.0]), torch.tensor([6.0, 0.0, 0.0]), torch.ones(3), 30)
    assert (s, e) == (0, 0)  # (2, 0) would score 11 but ends before it starts
    # the maximum answer length cuts long spans
    st, en = torch.tensor([5.0, 0, 0, 0]), torch.tensor([0, 0, 0, 5.0])
    assert T.best_span(st, en, torch.ones(4), 4)[:2] == (0, 3)
    assert T.best_span(st, en, torch.ones(4), 3)[:2] != (0, 3)
    assert T.best_span(st, en, torch.zeros(4), 3) is None
    with pytest.raises(ValueError, match="max_answer_len"):
        T.best_span(st, en, torch.ones(4), 0)


def test_squad_metrics():
    assert T.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert T.answer_f1("the quick fox", "quick brown fox") == pytest.approx(0.8)
    assert T.answer_f1("", "") == 1.0 and T.answer_f1("x", "") == 0.0


# ---- models -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random BertForMaskedLM + a WordPiece vocab trained on real text, saved as a folder."""
    from bertfast import BertConfig, BertForMaskedLM, Tokenizer
    from bertfast.data import write_corpus
    from bertfast.testing import system_documents

    d = tmp_path_factory.mktemp("tiny")
    corpus = write_corpus(system_documents(limit=20), str(d / "c.txt"))
    tok = Tokenizer.train([corpus], vocab_size=500)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    model = BertForMaskedLM(cfg).eval()
    folder = str(d / "mlm")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok, cfg


def test_fill_mask_plumbing(tiny):
    folder, model, tok, _ = tiny
    out = T.fill_mask(model, tok, "the licence [MASK] apply to [MASK] copies", top_k=3)
    assert len(out) == 2 and all(len(c) == 3 for c in out)
    # scores are the model's softmax at the masked position, best first, no special tokens
    ids = tok("the licence [MASK] apply to [MASK] copies", return_tensors="pt")
    with torch.no_grad():
        logits = model(ids["input_ids"]).logits[0]
    pos = int((ids["input_ids"][0] == tok.mask_token_id).nonzero()[0])
    probs = logits[pos].clone()
    probs[sorted(tok.special_ids)] = float("-inf")
    probs = probs.softmax(-1)
    assert out[0][0]["token_id"] == int(probs.argmax()) and out[0][0]["score"] == pytest.approx(float(probs.max()))
    assert out[0][0]["score"] >= out[0][1]["score"] >= out[0][2]["score"]
    assert all(c["token_id"] not in tok.special_ids for c in out[0])
    assert "[MASK]" in out[0][0]["sequence"] or out[0][0]["token"].lstrip("#") in out[0][0]["sequence"]
    with pytest.raises(ValueError, match="no \\[MASK\\]"):
        T.fill_mask(model, tok, "no mask here")


def test_tag_and_answer_plumbing(tiny):
    from bertfast import BertConfig, BertForQuestionAnswering, BertForTokenClassification

    _, _, tok, cfg = tiny
    d = cfg.to_dict()
    d.update(num_labels=3, id2label={0: "O", 1: "B-X", 2: "I-X"})
    torch.manual_seed(0)
    tagger = BertForTokenClassification(BertConfig.from_dict(d)).eval()
    text = "Redistribution of the Software is permitted"
    res = T.tag(tagger, tok, text)
    assert res["words"] == text.split() and len(res["labels"]) == 6
    for s in res["spans"]:
        assert s["text"] == text[s["start_char"]:s["end_char"]]
    res = T.tag(tagger, tok, ["Redistribution", "is", "permitted"])
    assert len(res["labels"]) == 3
    qa = BertForQuestionAnswering(BertConfig.from_dict(cfg.to_dict())).eval()
    ctx = "The licence was written in Boston by the foundation. " * 30  # longer than one window
    ans = T.answer(qa, tok, "Where was it written?", ctx, max_answer_len=5, max_seq_len=64, doc_stride=16)
    assert 0 <= ans["start"] <= ans["end"] <= len(ctx) and ans["answer"] == ctx[ans["start"]:ans["end"]]
    assert len(tok.tokenize(ans["answer"])) <= 5
    with pytest.raises(ValueError, match="too long for max_seq_len"):
        T.answer(qa, tok, "why " * 70, ctx, max_seq_len=64)


def test_classify_is_batch_invariant(tiny):
    """A text's labels and scores do not depend on the other texts of its batch (their lengths set its padding)."""
    from bertfast import BertConfig, BertForSequenceClassification

    _, _, tok, cfg = tiny
    d = cfg.to_dict()
    d.update(num_labels=3)
    torch.manual_seed(0)
    clf = BertForSequenceClassification(BertConfig.from_dict(d)).eval()
    texts = ["short", "a much longer text about the licence and its copies and what they permit", "two words"]
    pairs = ["a pair", "b", "the second text of a pair, longer than the others"]
    for p in (None, pairs):
        batched = T.classify(clf, tok, texts, p, top_k=3)
        for i, t in enumerate(texts):
            alone = T.classify(clf, tok, t, None if p is None else p[i], top_k=3)
            assert [r["label"] for r in alone] == [r["label"] for r in batched[i]]
            assert [r["score"] for r in alone] == pytest.approx([r["score"] for r in batched[i]], abs=1e-5)


def test_qa_windows_cover_the_context(tiny):
    _, _, tok, _ = tiny
    ctx = " ".join(f"word{i}" for i in range(60))
    wins = T.qa_windows(tok, "which word?", ctx, max_seq_len=32, doc_stride=8)
    assert len(wins) > 1 and all(len(w["input_ids"]) <= 32 for w in wins)
    covered = set()
    for w in wins:
        assert w["input_ids"][0] == tok.cls_token_id and w["input_ids"][-1] == tok.sep_token_id
        for (a, b), c in zip(w["offsets"], w["is_context"]):
            if c:
                covered.update(range(a, b))
    assert {i for i, ch in enumerate(ctx) if ch != " "} <= covered


@pytest.fixture(scope="module")
def minilm(minilm_loaded):
    return minilm_loaded


def test_embed_is_batch_invariant_and_selects_layers(minilm):
    _, model, tok = minilm
    texts = ["a short one", "a considerably longer sentence about software licences and copies", "x"]
    batched = T.embed(model, tok, texts, batch_size=3)
    single = torch.cat([T.embed(model, tok, [t]) for t in texts])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)
    first = T.embed(model, tok, texts, layer=0, pooling="cls")
    assert first.shape == (3, 384) and not torch.allclose(first, T.embed(model, tok, texts, pooling="cls"))
    with pytest.raises(ValueError, match="layer"):
        T.embed(model, tok, texts, layer=7)


def test_embed_through_the_bucketed_encoder_equals_eager(minilm):
    """cuda_graphs=True on CPU runs the graphs' bucketing (packing, slots, copy-out) eagerly:
    the embeddings equal the eager forward's (up to the GEMM library's choice of kernel for other
    row counts: a 1 x 3 batch differs by ~3e-6 on MKL); the encoder is kept with the model."""
    from bertfast.graphs import _CACHED

    _, model, tok = minilm
    texts = ["a short one", "a considerably longer sentence about software licences and copies", "x", "two words"]
    eager = T.embed(model, tok, texts, batch_size=3, cuda_graphs=False)
    graphed = T.embed(model, tok, texts, batch_size=3, cuda_graphs=True)
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    enc = _CACHED[model][0]
    assert sum(enc.replays.values()) == 2 and enc.fallbacks == 0
    T.embed(model, tok, texts[:2], batch_size=3, cuda_graphs=True)
    assert _CACHED[model][0] is enc  # reused while the parameters are unchanged


def test_search_and_cluster_on_minilm(minilm):
    _, model, tok = minilm
    corpus = ["The cat sat on the mat.", "Stock markets fell sharply today.", "A kitten is sleeping on the rug.",
              "Investors sold shares as prices dropped.", "My dog chases the cat around.",
              "The central bank raised interest rates."]
    scores, idx = T.search(model, tok, ["Shares lost value on the exchange"], corpus, k=2)
    assert set(idx[0].tolist()) <= {1, 3, 5}
    labels, _ = T.cluster(model, tok, corpus, 2, seed=0)
    assert labels[0] == labels[2] == labels[4] and labels[1] == labels[3] == labels[5] and labels[0] != labels[1]


def test_cli_fill_mask_embed_search_cluster(tiny, minilm, tmp_path, capsys, monkeypatch):
    from bertfast.cli import main

    folder = tiny[0]
    assert main(["fill-mask", "--model", folder, "--top-k", "2", "--text", "the [MASK] applies"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and lines[0]["score"] >= lines[1]["score"] and lines[0]["text"] == "the [MASK] applies"
    assert main(["fill-mask", "--model", folder, "--text", "no mask"]) == 1
    err = capsys.readouterr().err
    assert "[MASK]" in err and len(err.strip().splitlines()) == 1
    path = minilm[0]
    assert main(["fill-mask", "--model", path, "--text", "a [MASK]"]) == 1
    assert "is a BertModel (config.json \"architectures\")" in capsys.readouterr().err

    texts = tmp_path / "texts.txt"
    texts.write_text("The cat sat on the mat.\nStock markets fell sharply today.\n\nA kitten sleeps on the rug.\n")
    out = tmp_path / "emb.npy"
    assert main(["embed", "--model", path, "--pooling", "cls", str(texts), "--out", str(out)]) == 0
    assert np.load(out).shape == (3, 384)
    capsys.readouterr()
    assert main(["embed", "--model", path, "--text", "one text", "--text", "another", "--out",
                 str(tmp_path / "e.npy")]) == 0
    assert np.load(tmp_path / "e.npy").shape == (2, 384)
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\n\nand again\n"))
    assert main(["embed", "--model", path, "-", "--out", str(tmp_path / "s.npy")]) == 0
    # MiniLM's folder is a sentence-transformers one: its max_seq_length and Normalize are followed
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "s.npy")),
                               T.embed(minilm[1], minilm[2], ["from stdin", "and again"], max_length=256,
                                       normalize=True))
    assert main(["embed", "--model", path, "--text", "x", "--out", str(tmp_path / "e.txt")]) == 1
    assert main(["embed", "--model", str(tmp_path / "nope"), "--text", "x", "--out", str(tmp_path / "f.npy")]) == 1
    assert not os.path.exists(tmp_path / "f.npy")
    capsys.readouterr()
    # a path that does not exist is an error, never embedded as the text "nosuch.txt"
    assert main(["embed", "--model", path, "nosuch.txt", "--out", str(tmp_path / "g.npy")]) == 1
    assert "no such file 'nosuch.txt'" in capsys.readouterr().err and not os.path.exists(tmp_path / "g.npy")
    assert main(["embed", "--model", path, "--out", str(tmp_path / "g.npy")]) == 1
    assert main(["embed", "--model", path, "--text", " ", "--out", str(tmp_path / "g.npy")]) == 1
    assert "--text must not be empty" in capsys.readouterr().err

    # every --query is searched on its own; words after one --query are not joined into it
    assert main(["search", "--model", path, "--corpus", str(texts), "--query", "a small cat", "--query",
                 "shares fell", "--k", "2"]) == 0
    hits = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(h["query"], h["rank"]) for h in hits] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert hits[0]["line"] in (1, 3) and hits[2]["line"] == 2 and hits[2]["query_text"] == "shares fell"
    with pytest.raises(SystemExit):
        main(["search", "--model", path, "--corpus", str(texts), "--query", "a", "small"])
    capsys.readouterr()
    assert main(["search", "--model", path, "--corpus", str(texts), "--query", ""]) == 1
    assert "--query must not be empty" in capsys.readouterr().err
    assert main(["search", "--model", path, "--corpus", str(texts)]) == 1
    assert "no query" in capsys.readouterr().err

    assert main(["cluster", "--model", path, str(texts), "--k", "2"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and rows[0]["cluster"] == rows[2]["cluster"] != rows[1]["cluster"]
    assert main(["cluster", "--model", path, str(texts), "--k", "9"]) == 1
    assert "--k must be in [1, 3]" in capsys.readouterr().err
    assert main(["cluster", "--model", path, str(tmp_path / "missing.txt"), "--k", "2"]) == 1
    assert "no such file" in capsys.readouterr().err


def test_cli_help_shows_defaults(capsys):
    from bertfast.cli import main

    with pytest.raises(SystemExit):
        main(["embed", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    assert "(default: truncate)" in out and "(default: 32)" in out and "(default: None)" not in out


def test_fill_mask_keeps_the_other_masks_and_loads_pretraining_checkpoints_quietly(tiny, tmp_path):
    import warnings

    from bertfast import BertForMaskedLM, BertForPreTraining

    _, _, tok, cfg = tiny
    torch.manual_seed(1)
    folder = str(tmp_path / "pre")
    BertForPreTraining(cfg).save_pretrained(folder, tokenizer=tok)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mlm = BertForMaskedLM.from_pretrained(folder)
    assert not caught, [str(w.message) for w in caught]  # unused pooler/NSP weights are expected
    first, second = T.fill_mask(mlm, tok, "the licence [MASK] apply to [MASK] copies", top_k=2)
    for cands, kept_before in ((first, False), (second, True)):
        for c in cands:
            seq = c["sequence"].split()
            assert seq.count("[MASK]") == 1, c["sequence"]
            assert (seq.index("[MASK]") < len(seq) // 2) == kept_before


def test_embed_counts_truncated_texts_and_windows_long_ones(tiny):
    _, mlm, tok, _ = tiny
    model = mlm.bert
    long_text = " ".join(f"the licence number {i} is here" for i in range(20))  # > 64 tokens
    texts = ["short text", long_text]
    with pytest.warns(T.TruncationWarning, match="1 of 2 texts are longer than 64 tokens"):
        cut = T.embed(model, tok, texts, max_length=64)
    ids = tok._tok.encode(long_text, add_special_tokens=False).ids
    assert len(ids) > 62 + 31
    # windows: the mean of each 62-content-token window's embedding, every 31 tokens, the last at the end
    starts = list(range(0, len(ids) - 62, 31)) + [len(ids) - 62]
    win = []
    for a in starts:
        row = torch.tensor([[tok.cls_token_id] + ids[a:a + 62] + [tok.sep_token_id]])
        with torch.no_grad():
            win.append(T.pool(model(row).last_hidden_state, torch.ones_like(row)))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", T.TruncationWarning)  # windows cut nothing
        whole = T.embed(model, tok, texts, max_length=64, long_texts="windows", batch_size=2)
    torch.testing.assert_close(whole[1], torch.cat(win).mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(whole[0], cut[0])  # short texts are not affected
    assert not torch.allclose(whole[1], cut[1], atol=1e-3)
    with pytest.raises(ValueError, match="long_texts"):
        T.embed(model, tok, texts, long_texts="split")


def test_cli_notes_truncation(tiny, tmp_path, capsys):
    from bertfast.cli import main

    folder = tiny[0]  # max_position_embeddings 128: the limit
    long_text = "the licence " * 100
    assert main(["embed", "--model", folder, "--text", long_text, "--text", "short", "--out",
                 str(tmp_path / "e.npy")]) == 0
    err = capsys.readouterr().err
    assert "note: embed: 1 of 2 texts are longer than 128 tokens" in err and "--long-texts windows" in err
    assert main(["embed", "--model", folder, "--text", long_text, "--long-texts", "windows", "--out",
                 str(tmp_path / "w.npy")]) == 0
    assert "note" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def heads(tiny, tmp_path_factory):
    """Tiny random classification / tagging / QA models saved with label names and their tokenizer."""
    from bertfast import BertConfig, BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification

    _, _, tok, cfg = tiny
    d = tmp_path_factory.mktemp("heads")
    out = {}
    for name, cls, labels in (("cls", BertForSequenceClassification, ["negative", "neutral", "positive"]),
                              ("ner", BertForTokenClassification, ["O", "B-ORG", "I-ORG"]),
                              ("qa", BertForQuestionAnswering, None)):
        c = cfg.to_dict()
        if labels:
            c.update(num_labels=len(labels), id2label=dict(enumerate(labels)))
        torch.manual_seed(len(name))
        model = cls(BertConfig.from_dict(c)).eval()
        model.save_pretrained(str(d / name), tokenizer=tok)
        out[name] = (str(d / name), model)
    return tok, out


def test_save_pretrained_writes_the_tokenizer(heads):
    from bertfast import Tokenizer

    tok, models = heads
    folder = models["cls"][0]
    assert os.path.isfile(os.path.join(folder, "tokenizer.json"))
    assert Tokenizer.from_pretrained(folder).encode("the licence") == tok.encode("the licence")


def test_batched_tag_and_answer_match_one_at_a_time(heads):
    tok, models = heads
    tagger, qa = models["ner"][1], models["qa"][1]
    texts = ["Redistribution of the Software is permitted", ["The", "Free", "Software", "Foundation"], "x"]
    assert T.tag_batch(tagger, tok, texts, batch_size=2) == [T.tag(tagger, tok, t) for t in texts]
    ctx = "The licence was written in Boston by the foundation. " * 12
    pairs = [("Where?", ctx), ("Who wrote it?", "The foundation wrote the licence."), ("When?", ctx[:80])]
    batched = T.answer_batch(qa, tok, pairs, max_seq_len=48, doc_stride=16, batch_size=3)
    single = [T.answer(qa, tok, q, c, max_seq_len=48, doc_stride=16) for q, c in pairs]
    for b, s in zip(batched, single):
        assert (b["answer"], b["start"], b["end"]) == (s["answer"], s["start"], s["end"])
        assert b["score"] == pytest.approx(s["score"], abs=1e-4)


def test_cli_classify_tag_answer(heads, tmp_path, capsys, monkeypatch):
    from bertfast.cli import main

    tok, models = heads
    (cls_dir, clf), (ner_dir, tagger), (qa_dir, qa) = models["cls"], models["ner"], models["qa"]
    src = tmp_path / "cls.jsonl"
    recs = [{"text": "the software is free", "id": 7}, {"text": "copies may be sold"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "pred.jsonl"
    assert main(["classify", "--model", cls_dir, str(src), "--out", str(out), "--batch-size", "1"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    want = T.classify(clf, tok, [r["text"] for r in recs])
    assert [(r["label"], r["id"] if "id" in r else None) for r in rows] == [(w["label"], i) for w, i in
                                                                         zip(want, (7, None))]
    assert all(r["label"] in ("negative", "neutral", "positive") for r in rows)  # the saved label names
    assert rows[0]["score"] == pytest.approx(want[0]["score"], abs=1e-5)
    # pairs and --top-k, from standard input
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"premise": "a cat", "hypothesis": "an animal"}) + "\n"))
    assert main(["classify", "--model", cls_dir, "-", "--top-k", "2"]) == 0
    (row,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    pair = T.classify(clf, tok, ["a cat"], ["an animal"], top_k=2)[0]
    assert [x["label"] for x in row["labels"]] == [x["label"] for x in pair]
    assert main(["classify", "--model", cls_dir, "--text", "one", "--text", "two"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    assert main(["classify", "--model", cls_dir, str(bad)]) == 1
    assert "line 2: the record has no 'text'" in capsys.readouterr().err
    assert main(["classify", "--model", cls_dir, "nosuch.jsonl"]) == 1
    assert "no such file" in capsys.readouterr().err
    # a bare encoder is refused with what to do instead
    assert main(["classify", "--model", qa_dir, "--text", "x"]) == 1
    assert "bertfast finetune --task cls" in capsys.readouterr().err

    src = tmp_path / "ner.jsonl"
    src.write_text(json.dumps({"text": "The Free Software Foundation"}) + "\n"
                   + json.dumps({"tokens": ["Boston", "is", "far"]}) + "\n")
    assert main(["tag", "--model", ner_dir, str(src)]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rows[0]["words"] == ["The", "Free", "Software", "Foundation"] and len(rows[1]["labels"]) == 3
    assert rows[0]["labels"] == T.tag(tagger, tok, "The Free Software Foundation")["labels"]
    assert set(rows[0]["labels"] + rows[1]["labels"]) <= {"O", "B-ORG", "I-ORG"}

    ctx = "The licence was written in Boston by the foundation."
    assert main(["answer", "--model", qa_dir, "--question", "Where?", "--context", ctx]) == 0
    (row,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    want = T.answer(qa, tok, "Where?", ctx)
    assert (row["answer"], row["start"], row["end"]) == (want["answer"], want["start"], want["end"])
    assert row["answer"] == ctx[row["start"]:row["end"]]
    assert main(["answer", "--model", qa_dir, "--question", "Where?"]) == 1
    assert "--question and --context go together" in capsys.readouterr().err


def test_load_explains_a_folder_without_tokenizer(heads, tmp_path, capsys):
    from bertfast.cli import main

    folder = str(tmp_path / "bare")
    heads[1]["cls"][1].save_pretrained(folder)
    assert main(["classify", "--model", folder, "--text", "x"]) == 1
    assert "save_pretrained(folder, tokenizer=tok)" in capsys.readouterr().err
