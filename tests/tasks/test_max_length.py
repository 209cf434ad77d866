"""A model's usable length where RoBERTa's positions start past padding_idx: max_position_embeddings
- padding_idx - 1 tokens fit (512 for 514 positions). The tasks truncate to it by default, refuse a
longer max_length naming the argument, and the graphed encoder bounds its rows by it; never an
out-of-range position."""
import warnings

import pytest
import torch

from bertfast import tasks as T
from bertfast.models import (BertConfig, DistilBertConfig, RobertaConfig, RobertaForMaskedLM,
                             RobertaForQuestionAnswering, RobertaForSequenceClassification,
                             RobertaForTokenClassification, XLMRobertaConfig)

POSITIONS = 20  # with padding_idx 0 (the tokenizer's [PAD]): 19 tokens fit
FIT = POSITIONS - 1
LONG = "the licence allows redistribution of the software with or without changes " * 4  # > 20 tokens


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from bertfast import Tokenizer
    from bertfast.bench.encoder import real_sentences

    path = tmp_path_factory.mktemp("tok") / "c.txt"
    path.write_text("\n".join(real_sentences(300) + [LONG]), encoding="utf-8")
    return Tokenizer.train([str(path)], vocab_size=300)


def _roberta(cls, vocab, **kw):
    torch.manual_seed(0)
    return cls(RobertaConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=POSITIONS, pad_token_id=0,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)).eval()


def test_longest_sequence_of_each_family():
    assert RobertaConfig(max_position_embeddings=514).longest_sequence == 512  # padding_idx 1
    assert XLMRobertaConfig(max_position_embeddings=514).longest_sequence == 512
    assert RobertaConfig(max_position_embeddings=514, pad_token_id=0).longest_sequence == 513
    assert BertConfig(max_position_embeddings=512).longest_sequence == 512
    assert DistilBertConfig(max_position_embeddings=512).longest_sequence == 512


def test_classify_and_embed_truncate_to_the_usable_length(tok):
    assert len(tok.encode(LONG)) > POSITIONS
    model = _roberta(RobertaForSequenceClassification, tok.vocab_size, num_labels=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for packed in (True, False):
            got = T.classify(model, tok, [LONG, "short"], packed=packed)
            want = T.classify(model, tok, [LONG, "short"], packed=packed, max_length=FIT)
            assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], abs=1e-6)
        vecs = {(p, g): T.embed(model.roberta, tok, [LONG, "short"], packed=p, cuda_graphs=g)
                for p in (True, False) for g in (True, False)}
    assert any(f"longer than {FIT} tokens" in str(w.message) for w in caught)
    for v in vecs.values():
        torch.testing.assert_close(v, vecs[(False, False)], rtol=1e-5, atol=1e-5)
    for call in (lambda: T.classify(model, tok, [LONG], max_length=POSITIONS),
                 lambda: T.embed(model.roberta, tok, ["short"], max_length=POSITIONS)):
        with pytest.raises(ValueError, match=f"max_length is {POSITIONS}, .* at most {FIT} .*padding_idx"):
            call()


def test_tag_and_fill_mask_truncate_to_the_usable_length(tok):
    tagger = _roberta(RobertaForTokenClassification, tok.vocab_size, num_labels=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert T.tag_batch(tagger, tok, [LONG]) == T.tag_batch(tagger, tok, [LONG], max_length=FIT)
    assert any(f"longer than {FIT} tokens" in str(w.message) for w in caught)
    mlm = _roberta(RobertaForMaskedLM, tok.vocab_size)
    cands = T.fill_mask(mlm, tok, "the [MASK] allows " + LONG)
    assert len(cands) == 1 and len(cands[0]) == 5


def test_answer_refuses_a_window_longer_than_the_model_holds(tok):
    model = _roberta(RobertaForQuestionAnswering, tok.vocab_size)
    (res,) = T.answer_batch(model, tok, [("what does the licence allow?", LONG)], max_seq_len=FIT, doc_stride=4)
    assert set(res) == {"answer", "start", "end", "score"}
    with pytest.raises(ValueError, match=f"max_seq_len is {POSITIONS}, .* at most {FIT}"):
        T.answer_batch(model, tok, [("what does the licence allow?", LONG)], max_seq_len=POSITIONS)


def test_graphed_encoder_bounds_rows_by_the_usable_length(tok):
    from bertfast.graphs import GraphedEncoder

    model = _roberta(RobertaForSequenceClassification, tok.vocab_size, num_labels=2)
    assert GraphedEncoder(model.roberta, max_tokens=64, max_seqs=4, capture=False).max_seqlen == FIT
    with pytest.raises(ValueError, match=f"max_seqlen must be an int in \\[1, {FIT}\\]"):
        GraphedEncoder(model.roberta, max_tokens=64, max_seqs=4, capture=False, max_seqlen=POSITIONS)


def test_embed_of_a_family_head_is_embed_of_its_encoder(tok):
    # a head keeps its encoder under its family's name (.roberta here), not .bert
    head = _roberta(RobertaForSequenceClassification, tok.vocab_size, num_labels=2)
    texts = ["the licence allows redistribution", "with or without changes"]
    got = T.embed(head, tok, texts)
    want = T.embed(head.roberta, tok, texts)
    torch.testing.assert_close(got, want)
