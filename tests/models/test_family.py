"""The BERT family (RoBERTa, XLM-RoBERTa, DistilBERT, ELECTRA) against transformers: random-weight
checkpoints that transformers writes here, loaded by bertfast; every hidden state, every head's
logits, loss and parameter gradients on a padded batch with ragged rows; checkpoints both ways."""
import json

import pytest
import torch

import bertfast
from bertfast.models import convert
from conftest import TRITON_DEVICE, requires_cuda, requires_triton
from bertfast.testing import assert_grads_match

transformers = pytest.importorskip("transformers")

B, S, VOCAB = 3, 11, 101
LENGTHS = (7, 11, 4)  # ragged rows: the packed varlen path runs
DROPOUT_OFF = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# small odd sizes: hidden 48 = 3 heads x 16, intermediate 37, vocab 101
FAMILIES = {
    "roberta": ("Roberta", dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                intermediate_size=37, max_position_embeddings=S + 3, type_vocab_size=1,
                                layer_norm_eps=1e-5, **DROPOUT_OFF)),
    "xlm-roberta": ("XLMRoberta", dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                       intermediate_size=37, max_position_embeddings=S + 3, type_vocab_size=1,
                                       layer_norm_eps=1e-5, **DROPOUT_OFF)),
    "distilbert": ("DistilBert", dict(vocab_size=VOCAB, dim=48, n_layers=2, n_heads=3, hidden_dim=37,
                                      max_position_embeddings=20, dropout=0.0, attention_dropout=0.0,
                                      qa_dropout=0.0, seq_classif_dropout=0.0)),
    "electra": ("Electra", dict(vocab_size=VOCAB, embedding_size=24, hidden_size=48, num_hidden_layers=2,
                                num_attention_heads=3, intermediate_size=37, max_position_embeddings=20,
                                type_vocab_size=2, **DROPOUT_OFF)),
}
HEADS = {
    "roberta": ["Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification",
                "ForQuestionAnswering"],
    "distilbert": ["Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification",
                   "ForQuestionAnswering"],
    "electra": ["Model", "ForPreTraining", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification",
                "ForQuestionAnswering"],
}
HEADS["xlm-roberta"] = HEADS["roberta"]
CASES = [(family, head) for family in FAMILIES for head in HEADS[family]]


def hf_config(family, **overrides):
    prefix, kw = FAMILIES[family]
    cfg_cls = getattr(transformers, f"{prefix}Config")
    return cfg_cls(**{**kw, **overrides}, attn_implementation="eager")


def hf_model(family, head, **overrides):
    name = FAMILIES[family][0] + head
    num_labels = 2 if head == "ForQuestionAnswering" else 3
    torch.manual_seed(0)
    model = getattr(transformers, name)(hf_config(family, num_labels=num_labels, **overrides))
    with torch.no_grad():  # random LayerNorm affine parameters and biases too (HF initialises them to 1 / 0)
        for pname, p in model.named_parameters():
            if "LayerNorm" in pname or "layer_norm" in pname or pname.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def batch(family, pad=True, seed=0):
    """ids (no padding id among the valid tokens), attention mask, token types where the family has them."""
    g = torch.Generator().manual_seed(seed)
    pad_id = 1 if "roberta" in family else 0
    ids = torch.randint(3, VOCAB, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if pad:
        for row, n in enumerate(LENGTHS):
            mask[row, n:] = 0
        ids[mask == 0] = pad_id
    kw = dict(input_ids=ids, attention_mask=mask)
    if family == "electra":
        kw["token_type_ids"] = torch.randint(0, 2, (B, S), generator=g)
    return kw


def labels_for(head, mask):
    g = torch.Generator().manual_seed(1)
    pad = mask == 0
    if head == "ForMaskedLM":
        lab = torch.randint(0, VOCAB, (B, S), generator=g).masked_fill(pad, -100)
        lab[:, ::2] = -100
        return dict(labels=lab)
    if head == "ForSequenceClassification":
        return dict(labels=torch.randint(0, 3, (B,), generator=g))
    if head == "ForTokenClassification":
        return dict(labels=torch.randint(0, 3, (B, S), generator=g).masked_fill(pad, -100))
    if head == "ForQuestionAnswering":
        return dict(start_positions=torch.tensor([1, 5, 2]), end_positions=torch.tensor([3, 20, 2]))
    if head == "ForPreTraining":
        return dict(labels=torch.randint(0, 2, (B, S), generator=g))
    return {}


def max_diff(a, b):
    return (a.detach().double() - b.detach().double()).abs().max().item()


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("family,head", CASES)
def test_family_head_matches_transformers(tmp_path, family, head):
    name = FAMILIES[family][0] + head
    hf = hf_model(family, head)
    hf.save_pretrained(tmp_path / "hf")
    ours = getattr(bertfast, name).from_pretrained(str(tmp_path / "hf"), strict=True)
    assert type(ours).__name__ == name
    # QA's loss is a softmax over every position, padded ones included (as in HF): no padding there
    inputs = batch(family, pad=head != "ForQuestionAnswering")
    labels = labels_for(head, inputs["attention_mask"])
    hf.train(), ours.train()  # dropout is 0: train mode only exercises the training code paths
    a = hf(**inputs, **labels, output_hidden_states=True)
    b = ours(**inputs, **labels, output_hidden_states=True)
    valid = inputs["attention_mask"].bool()
    diffs = {"hidden": 0.0, "logits": 0.0, "loss": 0.0, "grad": 0.0}
    assert len(b.hidden_states) == len(a.hidden_states) == 3
    for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states)):
        torch.testing.assert_close(y[valid], x[valid], atol=2e-5, rtol=1e-4, msg=f"{name} hidden state {i}")
        diffs["hidden"] = max(diffs["hidden"], max_diff(y[valid], x[valid]))
    assert (b.hidden_states[-1][~valid] == 0).all()  # padded positions are zeros
    for key in ("last_hidden_state", "logits", "start_logits", "end_logits"):
        y = getattr(b, key, None)
        if y is None:
            continue
        x = getattr(a, key)
        if y.dim() >= 2 and y.shape[:2] == valid.shape:  # token-level: valid tokens only
            x, y = x[valid], y[valid]
        torch.testing.assert_close(y, x, atol=2e-5, rtol=1e-4, msg=f"{name}.{key}")
        diffs["logits" if key != "last_hidden_state" else "hidden"] = max(
            diffs["logits" if key != "last_hidden_state" else "hidden"], max_diff(y, x))
    if labels:
        torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=1e-5, msg=f"{name} loss")
        diffs["loss"] = max_diff(b.loss, a.loss)
        a.loss.backward()
        b.loss.backward()
    else:
        a.last_hidden_state[valid].square().sum().backward()
        b.last_hidden_state[valid].square().sum().backward()
        with torch.inference_mode():  # the CPU inference path: GEMMs into reused buffers, ops in place
            for _ in range(2):
                y = ours.eval()(**inputs).last_hidden_state
                torch.testing.assert_close(y[valid], a.last_hidden_state[valid].detach(), atol=2e-5, rtol=1e-4)
                assert (y[~valid] == 0).all()
    n, diffs["grad"] = assert_grads_match(ours, hf, label=f"{name}: ")
    assert n >= len(dict(hf.named_parameters())) // 2 and n > 10
    print(f"PARITY {family:12s} {head:26s} " + " ".join(f"{k}={v:.2e}" for k, v in diffs.items()))


@pytest.mark.parametrize("family,head", [("roberta", "ForMaskedLM"), ("xlm-roberta", "ForSequenceClassification"),
                                         ("distilbert", "ForMaskedLM"), ("electra", "ForMaskedLM"),
                                         ("electra", "ForPreTraining")])
def test_family_checkpoint_loads_in_transformers(tmp_path, family, head):
    """from_hf, save_pretrained, transformers' from_pretrained: the same outputs, config.json right."""
    name = FAMILIES[family][0] + head
    hf = hf_model(family, head)
    ours = bertfast.from_hf(hf)
    assert type(ours).__name__ == name
    ours.save_pretrained(tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["architectures"] == [name]
    hf2 = getattr(transformers, name).from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    inputs = batch(family)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        x, y = hf(**inputs).logits, hf2(**inputs).logits
    if x.shape[:2] == valid.shape:
        x, y = x[valid], y[valid]
    torch.testing.assert_close(y, x, atol=0, rtol=0)  # the very same weights
    assert set(hf.state_dict()) == set(hf2.state_dict())


def test_registry_maps_transformers_names():
    for family, (prefix, _) in FAMILIES.items():
        assert convert.MODEL_TYPES[family].__name__ == f"{prefix}Config"
        for head in HEADS[family]:
            assert convert.model_class(getattr(transformers, prefix + head)) is getattr(bertfast, prefix + head)
    with pytest.raises(TypeError, match="hf_model"):
        convert.model_class(transformers.GPT2Model)
    with pytest.raises(ValueError, match="model_type"):
        convert.config_from_hf({"model_type": "gpt2"})


def test_family_from_pretrained_picks_the_class(tmp_path):
    hf = hf_model("electra", "ForTokenClassification")
    hf.save_pretrained(tmp_path / "m")
    model = convert.from_pretrained(str(tmp_path / "m"))
    assert type(model).__name__ == "ElectraForTokenClassification"
    # a bare encoder loads from a head checkpoint, dropping the head with a warning (as transformers does)
    with pytest.warns(UserWarning, match="not used by ElectraModel"):
        enc = bertfast.ElectraModel.from_pretrained(str(tmp_path / "m"))
    assert enc.embeddings_project.weight.shape == (48, 24)
    # model_type is checked: a RoBERTa class refuses an ELECTRA checkpoint
    with pytest.raises(ValueError, match="model_type"):
        bertfast.RobertaModel.from_pretrained(str(tmp_path / "m"))


def test_roberta_positions_count_past_padding():
    """left padding: positions follow the non-padding tokens, so a row's outputs do not depend
    on how much padding precedes it."""
    hf = hf_model("roberta", "Model")
    ours = bertfast.from_hf(hf).eval()
    ids = torch.randint(3, VOCAB, (1, 6))
    left = torch.cat([torch.ones(1, 4, dtype=torch.long), ids], 1)
    mask = (left != 1).long()
    with torch.no_grad():
        alone = ours(ids).last_hidden_state
        padded = ours(left, mask).last_hidden_state
        ref = hf(input_ids=left, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(padded[:, 4:], alone, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(padded[:, 4:], ref[:, 4:], atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="padding_idx"):
        ours(torch.randint(3, VOCAB, (1, S + 2)))


def test_electra_without_projection_and_distilbert_variants(tmp_path):
    """embedding_size == hidden_size: no embeddings_project; DistilBERT with sinusoidal positions
    and ReLU; DistilBERT refuses token types."""
    hf = hf_model("electra", "Model", embedding_size=48)
    ours = bertfast.from_hf(hf)
    assert not hasattr(ours, "embeddings_project")
    hf2 = hf_model("distilbert", "ForSequenceClassification", sinusoidal_pos_embds=True, activation="relu")
    ours2 = bertfast.from_hf(hf2)
    for h, o, fam in ((hf, ours, "electra"), (hf2, ours2, "distilbert")):
        inputs = batch(fam)
        valid = inputs["attention_mask"].bool()
        with torch.no_grad():
            x = h(**inputs, output_hidden_states=True).hidden_states[-1][valid]
            y = o(**inputs, output_hidden_states=True).hidden_states[-1][valid]
        torch.testing.assert_close(y, x, atol=2e-5, rtol=1e-4)
    fresh = bertfast.DistilBertModel(bertfast.DistilBertConfig(**FAMILIES["distilbert"][1], sinusoidal_pos_embds=True))
    torch.testing.assert_close(fresh.embeddings.position_embeddings.weight,
                               transformers.DistilBertModel(hf_config("distilbert", sinusoidal_pos_embds=True))
                               .embeddings.position_embeddings.weight)
    with pytest.raises(ValueError, match="token_type_ids"):
        ours2(**batch("distilbert"), token_type_ids=torch.zeros(B, S, dtype=torch.long))


def test_family_configs_round_trip(tmp_path):
    cfg = bertfast.DistilBertConfig(dim=64, n_layers=3, n_heads=4, hidden_dim=100)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.dim) == (64, 3, 64)
    d = cfg.to_dict()
    assert d["model_type"] == "distilbert" and d["dim"] == 64 and "hidden_size" not in d
    assert transformers.DistilBertConfig(**d).hidden_dim == 100
    assert bertfast.DistilBertConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="model_type"):
        bertfast.RobertaConfig.from_dict({"model_type": "bert"})
    with pytest.raises(ValueError, match="embedding_size"):
        bertfast.ElectraConfig(embedding_size=0)
    with pytest.raises(TypeError, match="RobertaConfig"):
        bertfast.RobertaModel(bertfast.ElectraConfig())
    assert bertfast.XLMRobertaConfig().to_dict()["model_type"] == "xlm-roberta"


def _place(family, rows, tts, labels, S, side):
    """The same rows in a batch of length S, right- or left-padded; token labels moved with their
    row and a real label on every padded position (it must be ignored)."""
    pad_id = 1 if "roberta" in family else 0
    n_rows = len(rows)
    ids = torch.full((n_rows, S), pad_id, dtype=torch.long)
    tt, mask, pos = (torch.zeros(n_rows, S, dtype=torch.long) for _ in range(3))
    offsets = [S - len(r) if side == "left" else 0 for r in rows]
    for b, (r, t, o) in enumerate(zip(rows, tts, offsets)):
        ids[b, o:o + len(r)], tt[b, o:o + len(r)], mask[b, o:o + len(r)] = r, t, 1
        pos[b, o:o + len(r)] = torch.arange(len(r))
    args = dict(input_ids=ids, attention_mask=mask)
    if family == "electra":
        args["token_type_ids"] = tt
    if side == "left" and "roberta" not in family:  # RoBERTa counts its positions past the padding itself
        args["position_ids"] = pos
    for key, val in labels.items():
        if isinstance(val, list) and isinstance(val[0], torch.Tensor):  # token labels
            lab = torch.ones(n_rows, S, dtype=torch.long)
            for b, (v, o) in enumerate(zip(val, offsets)):
                lab[b, o:o + len(v)] = v
            args[key] = lab
        elif isinstance(val, list):  # span positions, moved with the row
            args[key] = torch.tensor([p + o for p, o in zip(val, offsets)])
        else:
            args[key] = val
    return args, offsets


# the heads' forward and losses are shared by the family (heads.py): each member's encoder, and each
# kind of loss, once or twice
PAD_CASES = [("roberta", "ForSequenceClassification"), ("roberta", "ForQuestionAnswering"),
             ("xlm-roberta", "ForMaskedLM"), ("distilbert", "ForTokenClassification"),
             ("distilbert", "ForQuestionAnswering"), ("electra", "ForPreTraining"), ("electra", "ForMaskedLM"),
             ("electra", "ForSequenceClassification")]


@pytest.mark.parametrize("family,head", PAD_CASES)
def test_family_heads_ignore_padding_amount_and_side(family, head):
    """A row's outputs, loss and gradients are the same whatever padding its batch has; the encoder
    runs its packed (padding-free) path whenever there is padding."""
    ours = bertfast.from_hf(hf_model(family, head)).train()  # the loss paths (dropout is 0)
    lengths = (5, 7)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    tts = [torch.randint(0, 2, (n,), generator=g) for n in lengths]
    labels = {"ForMaskedLM": {"labels": [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]},
              "ForPreTraining": {"labels": [torch.randint(0, 2, (n,), generator=g) for n in lengths]},
              "ForTokenClassification": {"labels": [torch.randint(0, 3, (n,), generator=g) for n in lengths]},
              "ForSequenceClassification": {"labels": torch.tensor([0, 2])},
              "ForQuestionAnswering": {"start_positions": [1, 2], "end_positions": [3, 6]}}.get(head, {})
    base = getattr(ours, ours.base_model_prefix, ours)
    results = []
    for S, side in ((7, "right"), (12, "right"), (10, "left")):
        args, offsets = _place(family, rows, tts, labels, S, side)
        enc_args = {k: v for k, v in args.items() if k in ("input_ids", "attention_mask", "token_type_ids",
                                                            "position_ids")}
        with torch.no_grad():
            packed = base(**enc_args, return_packed=True)
        assert (packed.layout is not None) == bool((args["attention_mask"] == 0).any()), "padding-free path"
        ours.zero_grad()
        out = ours(**args)
        per_row = {}
        for key in ("last_hidden_state", "logits", "start_logits", "end_logits"):
            y = getattr(out, key, None)
            if y is None:
                continue
            if y.dim() >= 2 and y.shape[:2] == (2, S):  # token level: each row's own positions
                per_row[key] = [y[b, o:o + n] for b, (o, n) in enumerate(zip(offsets, lengths))]
            else:
                per_row[key] = [y]
        loss = out.loss if getattr(out, "loss", None) is not None else \
            (out.last_hidden_state * args["attention_mask"].unsqueeze(-1)).square().sum()
        loss.backward()
        per_row["loss"] = [loss.detach()]
        per_row["grads"] = [p.grad.clone() for p in ours.parameters() if p.grad is not None]
        results.append(per_row)
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for key in results[0]:
            for x, y in zip(results[0][key], other[key]):
                torch.testing.assert_close(y, x, atol=2e-5, rtol=1e-4, msg=f"{family} {head}.{key}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_accelerate_serves_the_family(family, monkeypatch):
    """bertfast.accelerate on a transformers head of each member: bertfast's encoder runs (the
    transformers encoder's forward is made to fail), outputs, loss and gradients as transformers'."""
    import copy

    head = "ForTokenClassification"
    hf = hf_model(family, head)
    fast = bertfast.accelerate(copy.deepcopy(hf))
    inputs = batch(family)
    labels = labels_for(head, inputs["attention_mask"])
    a = hf(**inputs, **labels)
    encoder_cls = getattr(transformers, FAMILIES[family][0] + "Model")

    def refuse(*args, **kwargs):
        raise AssertionError("the transformers encoder ran")

    monkeypatch.setattr(encoder_cls, "forward", refuse)
    b = fast(**inputs, **labels)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(b.logits[valid], a.logits[valid], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=1e-5)
    a.loss.backward()
    b.loss.backward()
    assert assert_grads_match(fast, hf)[0] > 10


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_packed_matches_padded_forward(family):
    """forward_packed (the graphs' entry point) on each member: the packed rows of forward's."""
    ours = bertfast.from_hf(hf_model(family, "Model")).eval()
    inputs = batch(family)
    valid = inputs["attention_mask"].bool()
    lengths = inputs["attention_mask"].sum(1)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    kw = {"token_type_ids": inputs["token_type_ids"][valid]} if "token_type_ids" in inputs else {}
    with torch.no_grad():
        packed = ours.forward_packed(inputs["input_ids"][valid], cu, int(lengths.max()), **kw)
        padded = ours(**inputs)
    torch.testing.assert_close(packed.last_hidden_state, padded.last_hidden_state[valid], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["roberta", "distilbert", "electra"])
def test_mlm_decoder_tied_unless_config_says_not(tmp_path, family):
    prefix = FAMILIES[family][0]
    tied = bertfast.from_hf(hf_model(family, "ForMaskedLM"))
    words = tied.get_parameter(f"{tied.base_model_prefix}.embeddings.word_embeddings.weight")
    decoder = {"roberta": "lm_head.decoder", "distilbert": "vocab_projector", "electra": "generator_lm_head"}[family]
    assert tied.get_parameter(decoder + ".weight") is words
    hf = hf_model(family, "ForMaskedLM", tie_word_embeddings=False)
    hf.save_pretrained(tmp_path / "hf")
    ours = getattr(bertfast, prefix + "ForMaskedLM").from_pretrained(str(tmp_path / "hf"), strict=True)
    assert ours.get_parameter(decoder + ".weight") is not ours.get_parameter(
        f"{ours.base_model_prefix}.embeddings.word_embeddings.weight")
    ours.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file

    saved = {d: set(load_file(tmp_path / d / "model.safetensors")) for d in ("ours", "hf")}
    assert saved["ours"] == saved["hf"]
    back = getattr(transformers, prefix + "ForMaskedLM").from_pretrained(tmp_path / "ours", attn_implementation="eager")
    back.eval()
    inputs = batch(family)
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, hf(**inputs).logits, atol=0, rtol=0)


@requires_triton
@pytest.mark.parametrize("family", ["electra"])  # the ops are BERT's (tested there); ELECTRA's widths differ
def test_family_on_triton_kernels(family):
    """The Triton kernels (interpreted on CPU without a GPU) serve the family's encoders: the same
    logits, loss and gradients as the reference ops."""
    ours = bertfast.from_hf(hf_model(family, "ForTokenClassification")).to(TRITON_DEVICE).train()
    inputs = batch(family)
    inputs.update(labels_for("ForTokenClassification", inputs["attention_mask"]))
    inputs = {k: v.to(TRITON_DEVICE) for k, v in inputs.items()}
    results = []
    for backend in ("reference", "triton"):
        ours.zero_grad()
        with bertfast.use_backend(backend):
            out = ours(**inputs)
            out.loss.backward()
        results.append((out.logits, out.loss, {n: p.grad.clone() for n, p in ours.named_parameters()}))
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = results
    valid = inputs["attention_mask"].bool()
    assert _rel(logits[valid], ref_logits[valid]) < 1e-5 and _rel(loss, ref_loss) < 1e-5
    for name, g in grads.items():
        if not name.endswith("key.bias"):  # its true gradient is zero: rounding noise on both sides
            assert _rel(g, ref_grads[name]) < 1e-4, name


# ---- on a CUDA device (benchmarks/gpu_check.sh runs the tests named *gpu*) -------------------

GPU_SIZES = {"distilbert": dict(dim=256, n_heads=4, hidden_dim=1000, max_position_embeddings=160),
             "electra": dict(embedding_size=128, hidden_size=256, num_attention_heads=4, intermediate_size=1000,
                             max_position_embeddings=160)}
GPU_LENGTHS = (150, 1, 77, 128, 33, 64)


def _family_parity_at_scale(family, device):
    """head_dim 64, FFN 1000, 6 ragged rows up to 150 tokens: every hidden state, the token
    classifier's logits, loss and every gradient against transformers (relative errors)."""
    sizes = GPU_SIZES.get(family, dict(hidden_size=256, num_attention_heads=4, intermediate_size=1000,
                                       max_position_embeddings=160))
    hf = hf_model(family, "ForTokenClassification", **sizes).to(device)
    ours = bertfast.from_hf(hf)
    g = torch.Generator().manual_seed(0)
    pad_id = 1 if "roberta" in family else 0
    lens = torch.tensor(GPU_LENGTHS)
    mask = (torch.arange(150)[None, :] < lens[:, None]).long()
    ids = torch.randint(3, VOCAB, mask.shape, generator=g).masked_fill(mask == 0, pad_id)
    inputs = dict(input_ids=ids, attention_mask=mask)
    if family == "electra":
        inputs["token_type_ids"] = torch.randint(0, 2, mask.shape, generator=g)
    labels = torch.randint(0, 3, mask.shape, generator=g).masked_fill(mask == 0, -100)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    hf.train(), ours.train()  # dropout is 0: the training code paths
    a = hf(**inputs, labels=labels.to(device), output_hidden_states=True)
    b = ours(**inputs, labels=labels.to(device), output_hidden_states=True)
    valid = inputs["attention_mask"].bool()
    errs = {"hidden": max(_rel(y[valid], x[valid]) for x, y in zip(a.hidden_states, b.hidden_states)),
            "logits": _rel(b.logits[valid], a.logits[valid]), "loss": _rel(b.loss, a.loss)}
    a.loss.backward()
    b.loss.backward()
    theirs = dict(hf.named_parameters())
    # a key bias's true gradient is zero (softmax ignores a constant added to a query's scores): noise on both sides
    errs["grad"] = max(_rel(p.grad, theirs[n].grad) for n, p in ours.named_parameters()
                       if not n.endswith(("key.bias", "k_lin.bias")))
    return errs


@requires_cuda
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_gpu_matches_transformers(family):
    errs = _family_parity_at_scale(family, "cuda")
    print(f"GPU PARITY {family}: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    assert errs["hidden"] < 1e-4 and errs["logits"] < 1e-4 and errs["loss"] < 1e-4, errs  # 3xTF32 attention
    assert errs["grad"] < 1e-3, errs
