"""Pre-training data: corpus reading and streaming, NSP sampling, packing, MLM masking, collation."""
import itertools
import os

import pytest
import torch

from bertfast import data as D
from bertfast.data import (IGNORE_INDEX, CorpusError, Masker, MLMCollator, PretrainingStream, batch_iterator,
                           collate_pretraining, iter_documents, pack_pretraining, packed_batch_iterator,
                           write_corpus)
from bertfast.testing import system_documents


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_corpus(system_documents(limit=60), str(d / "corpus.txt"))


@pytest.fixture(scope="module")
def tok(corpus):
    from bertfast import Tokenizer

    return Tokenizer.train([corpus], vocab_size=800)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Documents whose every token names its document and sentence (d3s7a = doc 3, sentence 7),
    with a hand-made vocabulary, so NSP pairs can be checked for what they claim."""
    from bertfast import Tokenizer

    d = tmp_path_factory.mktemp("synthetic")
    docs = [[f"d{i}s{k}a d{i}s{k}b d{i}s{k}c" for k in range(12)] for i in range(30)]
    words = [w for doc in docs for s in doc for w in s.split()]
    folder = d / "tok"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    return write_corpus(docs, str(d / "corpus.txt")), Tokenizer.from_pretrained(str(folder))


def _where(tok, ids):
    """(doc, sentence) of each ordinary token."""
    out = []
    for t in tok.convert_ids_to_tokens(ids):
        if t.startswith("d"):
            doc, sent = t[1:-1].split("s")
            out.append((int(doc), int(sent)))
    return out


# ---- reading ----------------------------------------------------------------------------------


def test_documents_split_on_blank_lines(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("a b c.\nd e f.\n\n\n\ng h i.\n  \nj k l.\nm n o.")
    assert list(iter_documents([str(p)])) == [["a b c.", "d e f."], ["g h i."], ["j k l.", "m n o."]]


def test_corpus_errors_name_the_file(tmp_path, tok):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81abc\n")
    for path, match in [(tmp_path / "missing.txt", "does not exist"), (empty, "is empty"), (tmp_path, "not a regular"),
                        (binary, "not UTF-8")]:
        with pytest.raises(CorpusError, match=match) as e:
            PretrainingStream([str(path)], tok, 64)
        assert str(path) in str(e.value)
    with pytest.raises(CorpusError, match="at least one"):
        PretrainingStream([], tok, 64)
    one = tmp_path / "one.txt"
    one.write_text("x\n")
    with pytest.raises(CorpusError, match="no training pairs"):
        next(iter(PretrainingStream([str(one)], tok, 64)))
    with pytest.raises(ValueError, match="max_seq_len"):
        PretrainingStream([str(one)], tok, 4)
    with pytest.raises(ValueError, match="shard"):
        PretrainingStream([str(one)], tok, 64, shard=2, num_shards=2)


def test_streaming_reads_only_what_it_needs(corpus, tok, monkeypatch):
    """With small buffers the first batch needs a handful of documents, not the whole corpus."""
    read = []
    real = D.iter_documents

    def spy(files):
        for doc in real(files):
            read.append(1)
            yield doc

    monkeypatch.setattr(D, "iter_documents", spy)
    total = sum(1 for _ in real([corpus]))
    stream = PretrainingStream([corpus], tok, 64, doc_pool=4, shuffle_buffer=8)
    next(batch_iterator(stream, 4))
    assert 0 < len(read) < total // 4


def test_shards_partition_the_documents(synthetic):
    path, tok = synthetic
    seen = []
    for shard in range(3):
        s = PretrainingStream([path], tok, 64, shard=shard, num_shards=3)
        seen.append({_where(tok, seg)[0][0] for seg in (d[0] for d in s._documents())})
    assert seen[0] | seen[1] | seen[2] == set(range(30))
    assert not (seen[0] & seen[1] or seen[1] & seen[2] or seen[0] & seen[2])


# ---- NSP and packing --------------------------------------------------------------------------


def test_nsp_is_half_random_and_pairs_are_what_they_claim(synthetic):
    path, tok = synthetic
    stream = PretrainingStream([path], tok, 40, seed=3, mlm_probability=0.01)
    n = n_random = 0
    for ex in stream.iter_from(0):
        ids = ex["input_ids"].tolist()
        # unmask for checking: labels hold the originals
        ids = [lab if lab != IGNORE_INDEX else i for i, lab in zip(ids, ex["labels"].tolist())]
        sep = ids.index(tok.sep_token_id)
        a, b = _where(tok, ids[1:sep]), _where(tok, ids[sep + 1:-1])
        assert a and b
        docs_a, docs_b = {w[0] for w in a}, {w[0] for w in b}
        assert len(docs_a) == 1
        if int(ex["next_sentence_label"]) == 0:
            assert docs_a == docs_b and min(s for _, s in b) >= max(s for _, s in a)  # B follows A
        else:
            assert docs_a != docs_b
            n_random += 1
        n += 1
        if n == 2000:
            break
    assert abs(n_random / n - 0.5) < 0.04


def test_packing_layout_and_lengths(corpus, tok):
    stream = PretrainingStream([corpus], tok, 64, seed=1, short_seq_prob=0.1, shuffle_buffer=100)
    lengths = []
    for i, ex in enumerate(stream):
        ids, tt = ex["input_ids"], ex["token_type_ids"]
        assert len(ids) <= 64
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        seps = (ids == tok.sep_token_id).nonzero().squeeze(-1).tolist()
        assert len(seps) == 2
        assert tt[:seps[0] + 1].eq(0).all() and tt[seps[0] + 1:].eq(1).all()
        lengths.append(len(ids))
        if i == 500:
            break
    # documents are packed up to the target length: most examples are (nearly) full
    assert sum(n >= 56 for n in lengths) / len(lengths) > 0.6


def test_stream_is_deterministic_and_resumable(corpus, tok):
    def first(stream, n, start=0):
        out = []
        for ex in stream.iter_from(start):
            out.append(ex)
            if len(out) == n:
                return out

    a = first(PretrainingStream([corpus], tok, 64, seed=5, shuffle_buffer=50), 30)
    b = first(PretrainingStream([corpus], tok, 64, seed=5, shuffle_buffer=50), 10, start=20)
    for x, y in zip(a[20:], b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    c = first(PretrainingStream([corpus], tok, 64, seed=6, shuffle_buffer=50), 30)
    assert any(not torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_epochs_end_the_stream(synthetic):
    path, tok = synthetic
    n1 = sum(1 for _ in PretrainingStream([path], tok, 40, epochs=1))
    n2 = sum(1 for _ in PretrainingStream([path], tok, 40, epochs=2))
    assert n1 > 0 and n1 * 1.5 < n2 < n1 * 2.5


# ---- masking ----------------------------------------------------------------------------------


def test_masking_statistics_80_10_10(tok):
    m = Masker(tok)
    g = torch.Generator().manual_seed(0)
    chosen = to_mask = kept = randomised = total = 0
    for i in range(400):
        ids = m.random_pool[torch.randint(len(m.random_pool), (128,), generator=g)]
        masked, labels = m(ids, seed=i)
        sel = labels != IGNORE_INDEX
        assert torch.equal(labels[sel], ids[sel]) and torch.equal(masked[~sel], ids[~sel])
        total += len(ids)
        chosen += int(sel.sum())
        to_mask += int((masked[sel] == tok.mask_token_id).sum())
        kept += int((masked[sel] == ids[sel]).sum())
        randomised += int(((masked[sel] != ids[sel]) & (masked[sel] != tok.mask_token_id)).sum())
    assert chosen == 400 * round(128 * 0.15)  # an exact count per sequence
    assert abs(to_mask / chosen - 0.8) < 0.02
    assert abs(kept / chosen - 0.1) < 0.015
    assert abs(randomised / chosen - 0.1) < 0.015
    assert total == 51200


def test_special_tokens_and_padding_never_masked(tok):
    m = Masker(tok, mlm_probability=0.5)
    enc = tok("the licence applies to all copies", "and to every modified version")
    ids = torch.tensor(enc["input_ids"] + [tok.pad_token_id] * 10)
    maskable = torch.tensor([1] * len(enc["input_ids"]) + [0] * 10)
    # the pad id is special for the masker even without the maskable hint, but check both ways
    for kw in ({"maskable": maskable}, {}):
        for seed in range(200):
            masked, labels = m(ids, seed=seed, **kw)
            special = torch.tensor([int(i) in tok.special_ids for i in ids]) | (maskable == 0)
            assert (labels[special] == IGNORE_INDEX).all()
            assert torch.equal(masked[special], ids[special])
            # a random replacement is never a special token
            assert not any(int(t) in tok.special_ids for t in masked[~special] if int(t) != tok.mask_token_id)


def test_whole_word_masking_takes_every_piece(corpus, tok):
    m = Masker(tok, whole_word_mask=True)
    n_words_split = 0
    sentences = [s for d in iter_documents([corpus]) for s in d][:200]
    for seed, sent in enumerate(sentences):
        enc = tok.encodings(sent, truncation=True, max_length=128)[0]
        ids = torch.tensor(enc.ids)
        _, labels = m(ids, seed=seed)
        chosen = (labels != IGNORE_INDEX).tolist()
        words = {}
        for pos, w in enumerate(enc.word_ids):
            if w is not None:
                words.setdefault(w, []).append(pos)
        for positions in words.values():
            flags = {chosen[p] for p in positions}
            assert len(flags) == 1, (sent, positions)
            n_words_split += len(positions) > 1 and chosen[positions[0]]
        assert any(chosen)
    assert n_words_split > 10  # multi-piece words were really masked whole


def test_mask_args_are_checked(tok):
    with pytest.raises(ValueError, match="mlm_probability"):
        Masker(tok, mlm_probability=0.0)
    with pytest.raises(ValueError, match="random_replace_prob"):
        Masker(tok, mask_replace_prob=0.9, random_replace_prob=0.2)


# ---- collation --------------------------------------------------------------------------------


def test_collate_pads_with_ignore_labels(corpus, tok):
    exs = [ex for _, ex in zip(range(5), PretrainingStream([corpus], tok, 64, short_seq_prob=1.0,
                                                                    shuffle_buffer=20))]
    batch = collate_pretraining(exs, tok.pad_token_id)
    n = max(len(e["input_ids"]) for e in exs)
    assert batch["input_ids"].shape == (5, n) and batch["next_sentence_label"].shape == (5,)
    for i, e in enumerate(exs):
        k = len(e["input_ids"])
        assert batch["attention_mask"][i].tolist() == [1] * k + [0] * (n - k)
        assert (batch["labels"][i, k:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][i, k:] == tok.pad_token_id).all()
    assert batch["input_ids"].dtype == torch.long
    padded = collate_pretraining(exs, tok.pad_token_id, pad_to_multiple_of=16)
    assert padded["input_ids"].shape[1] % 16 == 0


def test_mlm_collator_masks_token_lists(tok):
    col = MLMCollator(tok, seed=0)
    seqs = [tok.encode("some text to mask for the model"), tok.encode("short one")]
    b = col(seqs)
    assert b["input_ids"].shape == b["labels"].shape == (2, len(seqs[0]))
    assert (b["labels"] != IGNORE_INDEX).sum(1).ge(1).all()
    assert b["attention_mask"][1].sum() == len(seqs[1])


def test_write_corpus_round_trips(tmp_path):
    docs = [["one  sentence.", "two"], ["three"]]
    p = write_corpus(docs, str(tmp_path / "c.txt"))
    assert list(iter_documents([p])) == [["one sentence.", "two"], ["three"]]
    assert not os.path.exists(p + ".tmp")


# ---- packing ----------------------------------------------------------------------------------


def _packable(n, seed=0, vocab=120):
    """NSP + MLM examples shaped like PretrainingStream's, of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        la, lb = (int(x) for x in torch.randint(2, 14, (2,), generator=g))
        ids = torch.cat([torch.tensor([2]), torch.randint(5, vocab, (la,), generator=g), torch.tensor([3]),
                         torch.randint(5, vocab, (lb,), generator=g), torch.tensor([3])])
        tt = torch.zeros_like(ids)
        tt[la + 2:] = 1
        labels = torch.full_like(ids, IGNORE_INDEX)
        pick = torch.randperm(len(ids) - 1, generator=g)[:max(1, len(ids) // 7)] + 1
        labels[pick] = ids[pick]
        out.append({"input_ids": ids, "token_type_ids": tt, "labels": labels,
                    "next_sentence_label": torch.tensor(int(torch.randint(0, 2, (), generator=g)))})
    return out


def test_pack_pretraining_layout():
    exs = _packable(12)
    batch, n = pack_pretraining(exs, rows=3, budget=40, max_pairs_per_row=3)
    assert 0 < n <= 9
    slots = 4
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu.shape == (3 * slots + 1,) and cu[-1] == 3 * 40
    lens = (cu[1:] - cu[:-1]).view(3, slots)
    assert (lens.sum(1) == 40).all()  # each row: its pairs, spare empty slots, the filler
    # every example is somewhere, in order of the stream, with positions restarting at 0
    flat_ids, flat_pos = batch["input_ids"].reshape(-1), batch["position_ids"].reshape(-1)
    found = 0
    for s in range(3 * slots):
        a, b = int(cu[s]), int(cu[s + 1])
        if b > a:
            assert torch.equal(flat_pos[a:b], torch.arange(b - a))
        if s % slots != slots - 1 and b > a:
            found += 1
            assert int(batch["next_sentence_label"][s]) in (0, 1)
            assert any(torch.equal(flat_ids[a:b], e["input_ids"]) for e in exs[:n])
        else:
            assert int(batch["next_sentence_label"][s]) == IGNORE_INDEX
    assert found == n
    # the masked positions hold exactly the labelled tokens
    real = batch["masked_labels"] != IGNORE_INDEX
    labels = batch["labels"].reshape(-1)
    assert torch.equal(labels[batch["masked_positions"][real]], batch["masked_labels"][real])
    assert int(real.sum()) == int((labels != IGNORE_INDEX).sum()) == sum(int((e["labels"] != -100).sum())
                                                                          for e in exs[:n])
    # static shapes whatever the examples
    other, _ = pack_pretraining(_packable(3, seed=1), rows=3, budget=40, max_pairs_per_row=3)
    assert {k: v.shape for k, v in other.items()} == {k: v.shape for k, v in batch.items()}
    with pytest.raises(ValueError, match="budget=8"):
        pack_pretraining(exs, rows=1, budget=8)
    with pytest.raises(ValueError, match="rows"):
        pack_pretraining(exs, rows=0, budget=40)


def test_packed_batches_follow_the_stream_and_resume(corpus, tok):
    stream = PretrainingStream([corpus], tok, max_seq_len=48, seed=0, short_seq_prob=0.5)
    it = packed_batch_iterator(stream, rows=3, budget=96)
    got = [next(it) for _ in range(3)]
    assert all(n > 3 for _, n, _ in got)  # several pairs per row on average
    # the examples of the batches are the stream's, in order
    flat = list(itertools.islice(stream.iter_from(0), sum(n for _, n, _ in got)))  # the stream is endless
    b0, n0, t0 = got[0]
    assert t0 == sum(len(e["input_ids"]) for e in flat[:n0])
    cu = b0["cu_seqlens"]
    firsts = [b0["input_ids"].reshape(-1)[int(cu[s]):int(cu[s + 1])] for s in range(cu.numel() - 1)]
    for ex in flat[:n0]:
        assert any(torch.equal(ex["input_ids"], f) for f in firsts)
    # resuming at the first batch's end gives the second batch
    b1, n1, _ = next(packed_batch_iterator(stream, rows=3, budget=96, start=n0))
    assert n1 == got[1][1] and all(torch.equal(b1[k], got[1][0][k]) for k in b1)
    with pytest.raises(ValueError, match="budget"):
        next(packed_batch_iterator(stream, rows=3, budget=32))
