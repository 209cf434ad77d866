"""bertfast.models.int8_calibration: precision="int8" keeps MiniLM's sentence vectors close to fp32
(a bound the per-tensor int8 of before missed), its plans are made once per model and again
when the weights change, and a re-made model gets the same numbers (the calibration is
deterministic)."""
import pytest
import torch
import torch.nn.functional as F

from bertfast import BertConfig, BertModel
from bertfast.dispatch import cpu_gemm
from bertfast.models import int8_calibration
from bertfast.testing import ODD_BERT

HAS_VNNI = torch.cpu._is_vnni_supported()
HAS_BF16 = cpu_gemm.has_bf16()
pytestmark = pytest.mark.skipif(not HAS_VNNI, reason="no VNNI on this CPU")

# held out from the calibration (random ids) and written for this test: short and long, several topics
SENTENCES = [
    "The cat sat quietly on the warm kitchen mat.",
    "A kitten is sleeping on the rug by the fire.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "Investors sold shares as bond yields climbed to a ten-year high.",
    "The recipe calls for two cups of flour, a pinch of salt and three eggs.",
    "Bake the bread at two hundred degrees for forty minutes.",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.",
    "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED.",
    "The train to Edinburgh was delayed by a signal failure near York.",
    "Passengers waited on the platform for over an hour.",
    "She scored twice in the second half to win the championship.",
    "The goalkeeper saved a penalty in the final minute.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Mitochondria produce most of the cell's supply of adenosine triphosphate.",
    "Please restart your computer to finish installing the update.",
    "The server returned error 503: service temporarily unavailable.",
    "He planted tomatoes, beans and courgettes in the vegetable garden.",
    "Heavy rain is expected across the north of the country tomorrow.",
    "The museum's new exhibition shows paintings from the Dutch golden age.",
    "Our flight to Tokyo leaves at 6:45 in the morning.",
    "Quantum computers use qubits, which can be in a superposition of states.",
    "The committee will publish its report on the budget next week.",
    "Add the onions and fry them gently until golden.",
    "The violinist played a Bach partita without a score.",
    "Symptoms include fever, cough and shortness of breath.",
    "The library is closed on Sundays and public holidays.",
    "A fox crossed the road in front of our car last night.",
    "Compile the project with make and run the tests before committing.",
    "The treaty was signed in 1648 and ended thirty years of war.",
    "I would like a large coffee with oat milk, please.",
    "Mount Everest is the highest mountain above sea level.",
    "The company reported record profits in the third quarter.",
]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BERTFAST_CACHE_DIR", str(tmp_path))  # the measured GEMM choices
    cpu_gemm.forget_choices()
    yield
    cpu_gemm.forget_choices()


@pytest.fixture(scope="module")
def minilm(minilm_loaded):
    return minilm_loaded[1:]  # (model, tokenizer)


def test_minilm_int8_vectors_close_to_fp32(minilm, monkeypatch):
    """The int8 plans (QKV and FFN input smoothed, the FFN output in bf16, or int8 with its widest
    input channels in fp32 on a CPU without bf16; both cases run here): every sentence vector within cosine 0.996 of fp32, 0.998 on average. Per-tensor int8 on every
    GEMM, the mode before plans, gave 0.9895 / 0.9934 here."""
    from bertfast import tasks

    model, tok = minilm
    fp32 = tasks.embed(model, tok, SENTENCES)
    for bf16 in (True, False) if HAS_BF16 else (False,):
        monkeypatch.setattr(cpu_gemm, "has_bf16", lambda bf16=bf16: bf16)
        model.set_inference_precision("fp32")  # plans made again, for this CPU
        int8 = tasks.embed(model, tok, SENTENCES, precision="int8")
        kept = cpu_gemm.int8_plan(model.encoder.layer[0].output.dense.weight)[1]
        assert kept == ("bf16" if bf16 else "int8")
        cos = F.cosine_similarity(int8, fp32)
        assert (int8 - fp32).abs().max() > 0  # int8 really ran
        assert cos.min() > 0.996 and cos.mean() > 0.998, (bf16, cos.min(), cos.mean())


def _odd():
    torch.manual_seed(0)
    return BertModel(BertConfig(**ODD_BERT)).eval()


def _ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, ODD_BERT["vocab_size"], (3, 13), generator=g)


def _int8(model, ids, set_precision=True):
    if set_precision:  # drops the plans and packs made so far
        model.set_inference_precision("int8")
    with torch.inference_mode():
        return model(ids).last_hidden_state.clone()


def test_plans_made_once_and_follow_weight_edits():
    model = _odd()
    layer = model.encoder.layer[0]
    out = _int8(model, _ids())
    qkv, ffn_out = cpu_gemm.int8_plan(layer.attention.self.query.weight), cpu_gemm.int8_plan(layer.output.dense.weight)
    assert qkv[0] is not None and qkv[1] == "int8"  # smoothed int8
    if cpu_gemm.has_bf16():
        assert ffn_out == (None, "bf16", None)
    else:
        assert ffn_out[:2] == (None, "int8") and ffn_out[2].shape == (int8_calibration.FFN_OUTPUT_FP32_CHANNELS,)
    assert cpu_gemm.int8_plan(layer.intermediate.dense.weight)[0].shape == (ODD_BERT["hidden_size"],)
    torch.testing.assert_close(_int8(model, _ids(), False), out, rtol=0, atol=0)
    assert cpu_gemm.int8_plan(layer.attention.self.query.weight)[0] is qkv[0]  # not calibrated again

    with torch.no_grad():  # an in-place edit (an optimizer step): plans and packs are made again
        layer.intermediate.dense.weight.mul_(3.0)
        model.embeddings.LayerNorm.weight.add_(0.5)
    edited = _int8(model, _ids(), False)
    assert cpu_gemm.int8_plan(layer.attention.self.query.weight)[0] is not qkv[0]
    fresh = _odd()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(edited, _int8(fresh, _ids()), rtol=0, atol=0)  # as if made with these weights

    with torch.no_grad():  # a write through .data bumps no version: seen once the precision is set again
        model.encoder.layer[1].attention.self.value.weight.data = model.encoder.layer[1].attention.self.value.weight * 2
        layer.intermediate.dense.weight.data.mul_(0.5)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(_int8(model, _ids()), _int8(fresh, _ids()), rtol=0, atol=0)


@pytest.mark.parametrize("gemm", ["auto", *cpu_gemm.candidates("int8", "none")])
def test_calibration_deterministic_and_fp32_untouched(monkeypatch, gemm):
    a, b = _odd(), _odd()
    ids = _ids()
    with torch.inference_mode():
        ref = a(ids).last_hidden_state.clone()
    monkeypatch.setenv("BERTFAST_CPU_GEMM", gemm)  # a forced int8 library serves the calibration pass too
    torch.testing.assert_close(_int8(a, ids), _int8(b, ids), rtol=0, atol=0)
    assert torch.equal(int8_calibration.calibration_ids(a.config), int8_calibration.calibration_ids(b.config))
    monkeypatch.setenv("BERTFAST_CPU_GEMM", "auto")
    a.set_inference_precision("fp32")
    with torch.inference_mode():
        torch.testing.assert_close(a(ids).last_hidden_state, ref, rtol=0, atol=0)
