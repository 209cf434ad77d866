"""The encoder's CPU inference GEMMs through dispatch/cpu_gemm, and the precision switch:
fp32 equals the F.linear path (every forced library, odd shapes, padded and packed batches), a
weight edit after the first forward is seen, bf16 / int8 change the numbers only within their
precision and only in inference, and the switch reaches tasks, commands and accelerate."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bertfast import BertConfig, BertForSequenceClassification, BertModel
from bertfast.dispatch import cpu_gemm
from bertfast.models.precision import get_inference_precision, inference_precision
from bertfast.testing import ODD_BERT

HAS_BF16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
HAS_VNNI = torch.cpu._is_vnni_supported()
IMPLS = ["mkl", "onednn", "onednn_gelu"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BERTFAST_CACHE_DIR", str(tmp_path))
    cpu_gemm.forget_choices()
    yield
    cpu_gemm.forget_choices()


def _odd(hidden_act="gelu"):
    torch.manual_seed(0)
    return BertModel(BertConfig(**{**ODD_BERT, "hidden_act": hidden_act})).eval()


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, ODD_BERT["vocab_size"], (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    return ids, mask


def _forward(model, monkeypatch, gemm, ids, mask, mode=torch.inference_mode):
    monkeypatch.setenv("BERTFAST_CPU_GEMM", gemm)
    with mode():
        return model(ids, mask).last_hidden_state.clone()


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
@pytest.mark.parametrize("impl", IMPLS)
def test_fp32_libraries_equal_linear(monkeypatch, impl, hidden_act):
    model = _odd(hidden_act)
    for ids, mask in (_batch(), (_batch()[0], torch.ones_like(_batch()[0]))):  # packed and unpadded rows
        ref = _forward(model, monkeypatch, "off", ids, mask)
        out = _forward(model, monkeypatch, impl, ids, mask)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_auto_choice_equals_linear(monkeypatch):
    model = _odd()
    ids, mask = _batch()
    monkeypatch.setattr(cpu_gemm, "measure", lambda *a, **k: {c: float(i) for i, c in enumerate(
        reversed(cpu_gemm.candidates(*a[:2])))})  # no timing in tests: the last candidate wins
    torch.testing.assert_close(_forward(model, monkeypatch, "auto", ids, mask),
                               _forward(model, monkeypatch, "off", ids, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_weight_edit_after_a_forward_is_seen(monkeypatch, impl):
    """The packed copies follow in-place edits of the parameters (an optimizer step, a loader)."""
    model = _odd()
    ids, mask = _batch()
    _forward(model, monkeypatch, impl, ids, mask)
    with torch.no_grad():
        for lin in (model.encoder.layer[0].attention.self.key, model.encoder.layer[1].intermediate.dense,
                    model.encoder.layer[1].output.dense):
            lin.weight.mul_(1.5)
            lin.bias.add_(0.25)
    torch.testing.assert_close(_forward(model, monkeypatch, impl, ids, mask),
                               _forward(model, monkeypatch, "off", ids, mask), rtol=1e-5, atol=1e-5)


def test_training_and_autograd_keep_linear(monkeypatch):
    """With autograd recording, nothing is packed and the precision setting is not applied."""
    model = _odd().set_inference_precision("bf16" if HAS_BF16 else "fp32")
    ids, mask = _batch()
    monkeypatch.setenv("BERTFAST_CPU_GEMM", "onednn")
    made = []
    monkeypatch.setattr(cpu_gemm, "_pack_for", lambda *a, **k: made.append(a))
    out = model(ids, mask).last_hidden_state
    out.sum().backward()
    assert not made and out.dtype == torch.float32
    assert model.encoder.layer[0].intermediate.dense.weight.grad is not None


@pytest.mark.skipif(not HAS_BF16, reason="no AVX512-BF16 / AMX on this CPU")
def test_bf16_close_to_fp32_and_really_bf16(monkeypatch):
    model = _odd()
    ids, mask = _batch()
    ref = _forward(model, monkeypatch, "off", ids, mask)
    model.set_inference_precision("bf16")
    assert get_inference_precision(model) == "bf16"
    out = _forward(model, monkeypatch, "auto", ids, mask)
    assert out.dtype == torch.float32  # the residual stream and LayerNorm outputs stay fp32
    valid = mask.bool()
    diff = (out - ref)[valid].abs().max()
    assert 0 < diff < 0.1  # changed (bf16 GEMMs ran), within bf16's error
    assert F.cosine_similarity(out[valid], ref[valid], dim=-1).min() > 0.999
    assert (out[~valid] == 0).all()  # padded positions stay zeros
    assert _forward(model, monkeypatch, "auto", ids, mask, torch.enable_grad).sub(ref).abs().max() < 1e-5


@pytest.mark.skipif(not HAS_VNNI, reason="no VNNI on this CPU")
def test_int8_close_to_fp32(monkeypatch):
    model = _odd()
    ids, mask = _batch()
    ref = _forward(model, monkeypatch, "off", ids, mask)
    model.set_inference_precision("int8")
    out = _forward(model, monkeypatch, "auto", ids, mask)
    valid = mask.bool()
    assert (out - ref)[valid].abs().max() > 0
    assert F.cosine_similarity(out[valid], ref[valid], dim=-1).min() > 0.99


def test_precision_refused_clearly(monkeypatch):
    model = _odd()
    with pytest.raises(ValueError, match="precision must be one of"):
        model.set_inference_precision("fp16")
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    with pytest.raises(RuntimeError, match="VNNI"):
        model.set_inference_precision("int8")
    assert get_inference_precision(model) == "fp32"


def test_head_sets_its_encoder_and_context_restores():
    torch.manual_seed(0)
    head = BertForSequenceClassification(BertConfig(**ODD_BERT)).eval()
    precision = "int8" if HAS_VNNI else "fp32"
    with inference_precision(head, precision):
        assert head.bert.inference_precision == precision
    assert get_inference_precision(head) == "fp32"
    head.set_inference_precision(precision)
    assert get_inference_precision(head.bert) == precision


@pytest.fixture(scope="module")
def minilm(minilm_loaded):
    return minilm_loaded


TEXTS = ["The cat sat on the mat.", "Stock markets fell sharply today.", "A kitten sleeps on the rug.",
         "Permission is hereby granted, free of charge, to any person obtaining a copy of this software."]


@pytest.mark.skipif(not HAS_BF16, reason="no AVX512-BF16 / AMX on this CPU")
def test_tasks_and_cli_take_precision(minilm, tmp_path, monkeypatch):
    from bertfast import tasks
    from bertfast.cli import main

    monkeypatch.setenv("BERTFAST_CPU_GEMM", "onednn")
    path, model, tok = minilm
    fp32 = tasks.embed(model, tok, TEXTS)
    bf16 = tasks.embed(model, tok, TEXTS, precision="bf16")
    assert get_inference_precision(model) == "fp32"  # the call's precision, not the model's
    assert 0 < (bf16 - fp32).abs().max() < 0.05
    assert F.cosine_similarity(bf16, fp32).min() > 0.9995
    out = tmp_path / "e.npy"
    # --no-normalize: MiniLM's sentence-transformers folder would otherwise ask for unit vectors
    assert main(["embed", "--model", path, "--precision", "bf16", *sum([["--text", t] for t in TEXTS], []),
                 "--no-normalize", "--out", str(out)]) == 0
    torch.testing.assert_close(torch.from_numpy(np.load(out)), bf16, rtol=0, atol=1e-6)
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    assert main(["embed", "--model", path, "--precision", "int8", "--text", "x", "--out", str(tmp_path / "i.npy")]) == 1
    assert not (tmp_path / "i.npy").exists()


@pytest.mark.skipif(not HAS_BF16, reason="no AVX512-BF16 / AMX on this CPU")
def test_accelerate_takes_precision(minilm, monkeypatch):
    transformers = pytest.importorskip("transformers")
    import bertfast

    monkeypatch.setenv("BERTFAST_CPU_GEMM", "onednn")
    hf = transformers.AutoModel.from_pretrained(minilm[0]).eval()
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 102, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.inference_mode():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        bertfast.accelerate(hf, precision="bf16")
        out = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert 0 < (out - ref)[mask.bool()].abs().max() < 0.1
    with pytest.raises(ValueError, match="precision"):
        bertfast.accelerate(hf, precision="int4")
