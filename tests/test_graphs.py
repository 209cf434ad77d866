"""Graphed serving of ragged batches by token bucket, the packed encoder entry point, packed
pre-training (loss and gradients equal to the unpacked run) and the captured training step.

On CPU the bucketing code runs without capture (the same packing, slots and copy-out); the
tests named gpu capture real CUDA graphs and skip without a device.
"""
import copy

import pytest
import torch

from bertfast import BertConfig, BertForPreTraining, BertModel
from bertfast.data import IGNORE_INDEX, collate_pretraining, pack_pretraining
from bertfast.graphs import GraphedEncoder, GraphedTrainStep, token_buckets
from bertfast.ops._common import no_host_reads
from conftest import requires_cuda, requires_triton

CFG = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
           max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _model(cls=BertModel, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(BertConfig(**{**CFG, **kw}))


def _batch(lens, S, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    ids = torch.randint(1, CFG["vocab_size"], (B, S), generator=g)
    tt = torch.randint(0, 2, (B, S), generator=g)
    mask = (torch.arange(S)[None] < torch.tensor(lens)[:, None]).long()
    return ids.to(device), mask.to(device), tt.to(device)


def _ulps(a, b):
    """Largest distance between a and b in units in the last place of b's dtype (at b)."""
    a, b = a.float(), b.float()
    if a.dtype != b.dtype:
        raise TypeError
    spacing = torch.nextafter(b.abs(), torch.full_like(b, float("inf"))) - b.abs()
    return ((a - b).abs() / spacing).max().item() if a.numel() else 0.0


def _serves_like_eager(model, enc, batches, tol):
    """enc's outputs equal the model's eager forward on each (row lengths, width) batch; padded
    positions are zeros."""
    for i, (lens, S) in enumerate(batches):
        ids, mask, tt = _batch(lens, S, seed=i)
        with torch.no_grad():
            ref = model(ids, mask, tt)
        got = enc(ids, mask, tt)
        torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state, rtol=1e-5, atol=tol)
        torch.testing.assert_close(got.pooler_output, ref.pooler_output, rtol=1e-5, atol=tol)
        assert (got.last_hidden_state[mask == 0] == 0).all()


# ragged rows with an empty one, a full batch, a batch exactly at a bucket, one row per bucket size
SERVING = [([5, 3, 0, 7], 10), ([16], 16), ([30, 2], 30), ([32, 32], 32), ([64, 64], 64), ([33], 40),
           ([9, 1, 17, 4], 20)]


def test_token_buckets():
    assert token_buckets(4096) == [64, 128, 256, 512, 1024, 2048, 4096]
    assert token_buckets(100) == [64, 100]
    assert token_buckets(10) == [10]
    with pytest.raises(ValueError, match="max_tokens"):
        token_buckets(0)


def test_graphed_encoder_matches_eager_forward_cpu():
    """The bucketed path (packing, empty slots, dummy sequences, copy-out) gives the eager
    forward's rows and pooler output, for every bucket, ragged and full batches, empty rows and
    a batch exactly at a bucket."""
    model = _model().eval()
    enc = GraphedEncoder(model, max_tokens=128, max_seqs=4, buckets=[16, 32, 64, 128], pad_chunk=8)
    assert not enc.capture
    # the same kernels on the same rows; only the GEMM library's choice of kernel for another
    # row count may round differently (the tiny model here is bit for bit on MKL)
    _serves_like_eager(model, enc, SERVING, tol=1e-6)
    assert all(n > 0 for n in enc.replays.values())  # every bucket served
    assert enc.fallbacks == 0
    with no_host_reads():  # the code path a capture records (public ops, no read-backs): the same rows
        _serves_like_eager(model, enc, SERVING[:3], tol=1e-6)
    # position ids given by the caller are gathered like the eager forward's
    ids, mask, tt = _batch([6, 2], 8)
    pos = torch.tensor([3, 4, 5, 6, 7, 8, 9, 10])
    with torch.no_grad():
        ref = model(ids, mask, tt, pos)
    assert torch.equal(enc(ids, mask, tt, pos).last_hidden_state, ref.last_hidden_state)


@requires_triton
def test_graphed_encoder_interpreted_kernels_cpu():
    """The Triton kernels (interpreted on CPU) serve the bucketed layout the graphs capture: zero-length
    slots, dummy sequences and max_seqlen = the bucket, not the longest row."""
    from bertfast import use_backend

    model = _model().eval()
    enc = GraphedEncoder(model, max_tokens=64, max_seqs=3, buckets=[16, 64], pad_chunk=8)
    with use_backend("triton"):
        _serves_like_eager(model, enc, [([5, 0, 7], 10), ([16], 16), ([40, 9], 40)], tol=1e-5)
    assert enc.fallbacks == 0 and all(n > 0 for n in enc.replays.values())


def test_graphed_encoder_uses_the_models_default_positions():
    """Left and right padding, BERT (positions = columns, as HF) and RoBERTa (counted past
    padding_idx): the bucketed rows equal the eager forward's."""
    from bertfast.models.roberta import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    roberta = RobertaModel(RobertaConfig(**{**CFG, "max_position_embeddings": 70})).eval()
    for model in (_model().eval(), roberta):
        enc = GraphedEncoder(model, max_tokens=64, max_seqs=3, buckets=[32, 64], pad_chunk=8)
        ids, mask, tt = _batch([9, 4, 0], 9)
        ids[mask == 0] = model.config.pad_token_id
        left = mask.flip(1)
        ids_left = torch.where(left.bool(), ids.flip(1), torch.full_like(ids, model.config.pad_token_id))
        for i, m in ((ids, mask), (ids_left, left)):
            with torch.no_grad():
                ref = model(i, m, tt)
            torch.testing.assert_close(enc(i, m, tt).last_hidden_state, ref.last_hidden_state, rtol=1e-5, atol=1e-6)
        assert enc.fallbacks == 0


def test_graphed_encoder_serves_distilbert_without_token_types():
    """DistilBERT has no token type embeddings (its forward refuses token_type_ids): the bucketed
    path passes none, padded and packed batches equal the eager forward's, a head's encoder is
    taken, and token_type_ids given are refused as the model refuses them."""
    from bertfast.models import DistilBertConfig, DistilBertForSequenceClassification
    from bertfast.tokenizer import pack_rows

    torch.manual_seed(0)
    head = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=CFG["vocab_size"], dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0)).eval()
    model = head.distilbert
    enc = GraphedEncoder(head, max_tokens=64, max_seqs=4, buckets=[16, 64], pad_chunk=8)
    assert enc.model is model and not enc.takes_token_types
    for i, (lens, S) in enumerate(SERVING[:4]):
        ids, mask, _ = _batch(lens, S, seed=i)
        with torch.no_grad():
            ref = model(ids, mask)
        got = enc(ids, mask)
        torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state, rtol=1e-5, atol=1e-6)
        assert got.pooler_output is None
        rows = [r[:n].tolist() for r, n in zip(ids, lens)]
        packed = pack_rows(rows)
        with torch.no_grad():
            want = model.forward_packed(packed.input_ids, packed.cu_seqlens, packed.max_seqlen, pool=False)
        torch.testing.assert_close(enc.forward_packed(packed.input_ids, packed.cu_seqlens, packed.max_seqlen),
                                   want.last_hidden_state, rtol=1e-5, atol=1e-6)
    assert enc.fallbacks == 0 and sum(enc.replays.values()) == 8
    ids, mask, tt = _batch([5, 3], 6)
    with pytest.raises(ValueError, match="token_type_ids must be None: DistilBertModel has no token type"):
        enc(ids, mask, tt)
    with pytest.raises(ValueError, match="token_type_ids must be None"):
        enc.forward_packed(ids[0], torch.tensor([0, 6], dtype=torch.int32), 6, tt[0])


def test_graphed_encoder_falls_back_and_releases():
    model = _model().eval()
    enc = GraphedEncoder(model, max_tokens=32, max_seqs=2, buckets=[16, 32])
    enc_short = GraphedEncoder(model, max_tokens=32, max_seqs=2, buckets=[16, 32], max_seqlen=8)
    ids, mask, tt = _batch([9, 2], 9)  # a row longer than max_seqlen
    with torch.no_grad():
        torch.testing.assert_close(enc_short(ids, mask, tt).last_hidden_state, model(ids, mask, tt).last_hidden_state)
    assert enc_short.fallbacks == 1
    for lens, S in (([20, 20], 20), ([1, 1, 1], 3)):  # too many tokens; too many rows
        ids, mask, tt = _batch(lens, S)
        with torch.no_grad():
            ref = model(ids, mask, tt)
        assert torch.equal(enc(ids, mask, tt).last_hidden_state, ref.last_hidden_state)
    assert enc.fallbacks == 2 and sum(enc.replays.values()) == 0
    ids, mask, _ = _batch([3, 0], 4)  # no token types, output rows do not alias the buffers
    out = enc(ids, mask)
    keep = out.last_hidden_state.clone()
    enc(*_batch([4, 4], 4, seed=1)[:2])
    assert torch.equal(out.last_hidden_state, keep)
    assert (out.last_hidden_state[1] == 0).all()
    enc.release()
    assert enc.memory_bytes == 0 and enc.report()["buckets"] == []
    with torch.no_grad():
        assert torch.equal(enc(ids, mask).last_hidden_state, model(ids, mask).last_hidden_state)


def test_graphed_encoder_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="max_seqs"):
        GraphedEncoder(model, max_seqs=0)
    with pytest.raises(ValueError, match="max_seqlen"):
        GraphedEncoder(model, max_seqlen=CFG["max_position_embeddings"] + 1)
    with pytest.raises(ValueError, match="buckets"):
        GraphedEncoder(model, buckets=[0, 16])
    with pytest.raises(ValueError, match="capture=True needs"):
        GraphedEncoder(model, capture=True)
    with pytest.raises(TypeError, match="BertModel"):
        GraphedEncoder(torch.nn.Linear(2, 2))
    enc = GraphedEncoder(model, max_tokens=16, max_seqs=2)
    with pytest.raises(ValueError, match="attention_mask"):
        enc(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(IndexError, match="input_ids"):
        enc(torch.full((1, 3), CFG["vocab_size"]))


def test_forward_packed_matches_padded_forward():
    """Sequences packed by the caller (positions restarting per sequence, an empty one, a
    static max_seqlen larger than the longest) give the padded forward's rows."""
    model = _model().eval()
    ids, mask, tt = _batch([7, 0, 12, 3], 12)
    keep = mask.bool()
    lens = mask.sum(1)
    cu = torch.zeros(5, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    with torch.no_grad():
        ref = model(ids, mask, tt)
        got = model.forward_packed(ids[keep], cu, 64, tt[keep])
    assert got.last_hidden_state.shape == (int(lens.sum()), CFG["hidden_size"])
    torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state[keep], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.pooler_output, ref.pooler_output, rtol=1e-5, atol=1e-6)
    # a non-contiguous id view works too
    wide = torch.stack([ids[keep], ids[keep]], 1)[:, 0]
    with torch.no_grad():
        assert torch.equal(model.forward_packed(wide, cu, 64, tt[keep]).last_hidden_state, got.last_hidden_state)


def test_forward_packed_checks_its_arguments():
    model = _model()
    ids = torch.ones(6, dtype=torch.long)
    cu = torch.tensor([0, 4, 6], dtype=torch.int32)
    with pytest.raises(TypeError, match="cu_seqlens must be an int32"):
        model.forward_packed(ids, cu.long(), 8)
    with pytest.raises(ValueError, match="rise from 0"):
        model.forward_packed(ids, torch.tensor([0, 4, 5], dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="max_seqlen .3. is shorter"):
        model.forward_packed(ids, cu, 3)
    with pytest.raises(ValueError, match="max_seqlen must be a positive int"):
        model.forward_packed(ids, cu, 0)
    with pytest.raises(ValueError, match="token_type_ids must hold one id per packed token"):
        model.forward_packed(ids, cu, 8, torch.zeros(5, dtype=torch.long))
    with pytest.raises(IndexError, match="input_ids"):
        model.forward_packed(ids * CFG["vocab_size"], cu, 8)


def _examples(n, seed=0):
    """NSP + MLM examples shaped like PretrainingStream's, of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        la, lb = (int(x) for x in torch.randint(2, 14, (2,), generator=g))
        ids = torch.cat([torch.tensor([2]), torch.randint(5, CFG["vocab_size"], (la,), generator=g), torch.tensor([3]),
                         torch.randint(5, CFG["vocab_size"], (lb,), generator=g), torch.tensor([3])])
        tt = torch.zeros_like(ids)
        tt[la + 2:] = 1
        labels = torch.full_like(ids, IGNORE_INDEX)
        pick = torch.randperm(len(ids) - 1, generator=g)[:max(1, len(ids) // 7)] + 1
        labels[pick] = ids[pick]
        masked = ids.clone()
        masked[pick] = 4
        out.append({"input_ids": masked, "token_type_ids": tt, "labels": labels,
                    "next_sentence_label": torch.tensor(int(torch.randint(0, 2, (), generator=g)))})
    return out


@pytest.mark.parametrize("sparse", [True, False], ids=["masked_positions", "token_labels"])
def test_packed_pretraining_equals_unpacked(sparse):
    """Loss and every gradient of a packed batch equal those of the same pairs run unpacked."""
    exs = _examples(10, seed=3)
    batch, n = pack_pretraining(exs, rows=3, budget=48, max_pairs_per_row=3)
    model = _model(BertForPreTraining)
    kw = dict(masked_positions=batch["masked_positions"], masked_labels=batch["masked_labels"]) if sparse else \
        dict(labels=batch["labels"])
    out = model.forward_packed(batch["input_ids"], batch["cu_seqlens"], 48, batch["token_type_ids"],
                               batch["position_ids"], next_sentence_label=batch["next_sentence_label"], **kw)
    out.loss.backward()
    packed = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    pb = collate_pretraining(exs[:n])
    ref = model(pb["input_ids"], pb["attention_mask"], pb["token_type_ids"], labels=pb["labels"],
                next_sentence_label=pb["next_sentence_label"])
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    scale = max(p.grad.abs().max() for p in model.parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed[name], p.grad, rtol=1e-4, atol=1e-6 * scale, msg=name)


def _packed_loss(model, batch):
    out = model.forward_packed(batch["input_ids"], batch["cu_seqlens"], batch["input_ids"].shape[1],
                               batch["token_type_ids"], batch["position_ids"], batch["masked_positions"],
                               batch["masked_labels"], next_sentence_label=batch["next_sentence_label"])
    return out.loss, {"nsp_logits": out.seq_relationship_logits}


def _optimizer(model, device="cpu"):
    return torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device=device), fused=True, capturable=True)


def test_train_step_without_capture_equals_the_loop():
    """GraphedTrainStep's eager path (static copies, fresh gradients, foreach clipping, fused
    AdamW) ends with the parameters of a plain training loop."""
    model = _model(BertForPreTraining).train()
    twin = copy.deepcopy(model)
    batches = [pack_pretraining(_examples(8, seed=s), rows=2, budget=48, max_pairs_per_row=3)[0] for s in range(4)]
    step = GraphedTrainStep(model, _optimizer(model), _packed_loss, max_grad_norm=0.5)
    assert not step.capture
    for b in batches:
        out = step(b)
    assert set(out) == {"loss", "grad_norm", "nsp_logits"}
    opt = _optimizer(twin)
    for b in batches:
        opt.zero_grad(set_to_none=True)
        loss, _ = _packed_loss(twin, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
        opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    bad = dict(batches[0], input_ids=batches[0]["input_ids"][:1])
    with pytest.raises(ValueError, match="static shapes"):
        step(bad)
    with pytest.raises(ValueError, match="capture=True needs"):
        GraphedTrainStep(model, _optimizer(model), _packed_loss, capture=True)


# ---------------------------------------------------------------------------------------------
# CUDA graphs (skip without a device)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_graphed_encoder_matches_eager(dtype):
    """Graph replays equal the same bucketed forward run eagerly bit for bit, for every bucket
    (ragged, full, empty rows, a batch exactly at a bucket), and the plain eager forward within
    1 ulp (fp32) / the model's own bf16 noise (its GEMMs have other row counts)."""
    model = _model().to("cuda", dtype).eval()
    buckets = [16, 32, 64, 128]
    enc = GraphedEncoder(model, max_tokens=128, max_seqs=4, buckets=buckets, pad_chunk=8)
    eager = GraphedEncoder(model, max_tokens=128, max_seqs=4, buckets=buckets, pad_chunk=8, capture=False)
    assert enc.capture and enc.memory_bytes > 0
    worst = 0.0
    for i, (lens, S) in enumerate(SERVING):
        ids, mask, tt = _batch(lens, S, seed=i, device="cuda")
        got = enc(ids, mask, tt)
        with no_host_reads():  # the eager run of the capture's code path (public ops)
            same = eager(ids, mask, tt)
        assert torch.equal(got.last_hidden_state, same.last_hidden_state), (lens, S)
        assert torch.equal(got.pooler_output, same.pooler_output), (lens, S)
        with torch.no_grad():
            ref = model(ids, mask, tt)
        assert (got.last_hidden_state[mask == 0] == 0).all()
        worst = max(worst, _ulps(got.last_hidden_state.float(), ref.last_hidden_state.float()))
        if dtype == torch.float32:
            torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state, rtol=2e-6, atol=2e-6)
        else:
            torch.testing.assert_close(got.last_hidden_state.float(), ref.last_hidden_state.float(), rtol=2e-2,
                                       atol=2e-2)
    print(f"graphed vs plain eager, {dtype}: at most {worst:.1f} ulps (fp32 ulps of the rounded outputs)")
    assert all(n > 0 for n in enc.replays.values())
    enc.release()
    assert enc.memory_bytes == 0


@requires_cuda
def test_gpu_graphed_train_step_matches_eager():
    """N captured training steps end with the parameters N eager steps give."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = _model(BertForPreTraining).cuda().train()
    twin = copy.deepcopy(model)
    batches = [pack_pretraining(_examples(8, seed=s), rows=2, budget=48, max_pairs_per_row=3)[0] for s in range(8)]
    graphed = GraphedTrainStep(model, _optimizer(model, "cuda"), _packed_loss, max_grad_norm=0.5, warmup_steps=2)
    eager = GraphedTrainStep(twin, _optimizer(twin, "cuda"), _packed_loss, max_grad_norm=0.5, capture=False)
    assert graphed.capture
    for b in batches:
        a, e = graphed(b), eager(b)
        torch.testing.assert_close(a["loss"], e["loss"], rtol=1e-5, atol=1e-6)
    assert graphed.graph is not None
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5, msg=name)
