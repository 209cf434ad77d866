"""bertfast.dispatch.cpu_gemm: every CPU GEMM implementation equals F.linear (fp32 tolerance;
bf16 / int8 within their precision), packs follow weight edits, the measured choice is saved
and read back. Small odd shapes; the measurement runs on tiny buckets only."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from bertfast.dispatch import cpu_gemm

FP32 = [i for i in cpu_gemm.IMPLS if i in cpu_gemm.candidates("fp32", "gelu")]
INT8 = list(cpu_gemm.candidates("int8", "none"))
HAS_BF16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
HAS_VNNI = torch.cpu._is_vnni_supported()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BERTFAST_CACHE_DIR", str(tmp_path))
    cpu_gemm.forget_choices()
    yield
    cpu_gemm.forget_choices()


def _params(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(n, k, generator=g) * k ** -0.5)
    b = torch.nn.Parameter(torch.randn(n, generator=g))
    return w, b


def _gelu_finish(approximate="none"):
    return lambda y, bias: F.gelu(y.float() + bias.float(), approximate=approximate).to(y.dtype)


def _ref(x, ws, bs, epilogue):
    w, b = torch.cat(ws), torch.cat(bs)
    y = F.linear(x.double(), w.double(), None if epilogue == "none" else b.double())
    if epilogue in ("gelu", "gelu_tanh"):
        y = F.gelu(y, approximate="tanh" if epilogue == "gelu_tanh" else "none")
    return y


@pytest.mark.parametrize("impl", FP32)
@pytest.mark.parametrize("epilogue", cpu_gemm.EPILOGUES)
@pytest.mark.parametrize("rows,k,n", [(1, 17, 5), (37, 384, 1000), (130, 97, 129)])
def test_fp32_equals_linear(monkeypatch, impl, epilogue, rows, k, n):
    if impl == "onednn_gelu" and epilogue not in ("gelu", "gelu_tanh"):
        pytest.skip("the GELU post-op serves GELU epilogues only")
    monkeypatch.setenv("BERTFAST_CPU_GEMM", impl)
    w1, b1 = _params(n // 2, k, 1)
    w2, b2 = _params(n - n // 2, k, 2)  # two weights concatenated along N, as Q/K/V are
    x = torch.randn(rows, k)
    with torch.inference_mode():
        y = cpu_gemm.linear(x, (w1, w2), (b1, b2), epilogue,
                            finish=_gelu_finish("tanh" if epilogue == "gelu_tanh" else "none"))
    ref = _ref(x, (w1, w2), (b1, b2), epilogue)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("impl", FP32)
def test_fp32_sees_every_weight_write(monkeypatch, impl):
    """fp32 keeps no copy of the weights: in-place edits (optimizer steps, loaders), `.data` swaps
    and writes through `.data` (which bump no version counter) are all seen on the next call."""
    monkeypatch.setenv("BERTFAST_CPU_GEMM", impl)
    epilogue = "gelu" if impl == "onednn_gelu" else "bias"
    w, b = _params(33, 65)
    x = torch.randn(9, 65)

    def check():
        with torch.inference_mode():
            y = cpu_gemm.linear(x, (w,), (b,), epilogue, finish=_gelu_finish())
        torch.testing.assert_close(y.double(), _ref(x, (w,), (b,), epilogue), rtol=1e-5, atol=2e-5)

    check()
    with torch.no_grad():
        w.mul_(-2.0)
        b.add_(1.0)
    check()
    w.data = torch.randn(33, 65)
    check()
    w.data.mul_(3.0)
    b.data.sub_(2.0)
    check()
    assert cpu_gemm.pack_count(w) == 0


@pytest.mark.skipif(not HAS_BF16, reason="needs AVX512-BF16 or AMX")
def test_bf16_pack_follows_weight_edits(monkeypatch):
    """bf16 keeps converted weights: an in-place edit or a `.data` swap replaces the stale copy."""
    monkeypatch.setenv("BERTFAST_CPU_GEMM", "onednn")
    w, b = _params(33, 65)
    x = torch.randn(9, 65)

    def check():
        with torch.inference_mode():
            y = cpu_gemm.linear(x, (w,), (b,), "bias", "bf16")
        torch.testing.assert_close(y.double(), _ref(x, (w,), (b,), "bias"), rtol=3e-2, atol=6e-2)

    check()
    with torch.no_grad():
        w.mul_(-2.0)
    check()
    w.data = torch.randn(33, 65)
    check()
    assert cpu_gemm.pack_count(w) == 1  # the stale pack was replaced, not kept beside


@pytest.mark.skipif(not HAS_BF16, reason="needs AVX512-BF16 or AMX")
def test_pack_made_once(monkeypatch):
    monkeypatch.setenv("BERTFAST_CPU_GEMM", "onednn")
    w, b = _params(16, 8)
    made = []
    real = cpu_gemm._Pack.__init__

    def spy(self, *a, **k):
        made.append(1)
        real(self, *a, **k)

    monkeypatch.setattr(cpu_gemm._Pack, "__init__", spy)
    with torch.inference_mode():
        for rows in (3, 50, 3):
            cpu_gemm.linear(torch.randn(rows, 8), (w,), (b,), "bias", "bf16")
    assert len(made) == 1


@pytest.mark.skipif(not HAS_BF16, reason="no AVX512-BF16 / AMX on this CPU")
@pytest.mark.parametrize("impl", ["mkl", "onednn", "onednn_gelu"])
def test_bf16_within_bf16_error(monkeypatch, impl):
    """bf16 GEMM (fp32 accumulation) within 2x the error of eager bf16 F.linear, plus a floor."""
    monkeypatch.setenv("BERTFAST_CPU_GEMM", impl)
    epilogue = "gelu" if impl == "onednn_gelu" else "bias"
    w, b = _params(200, 96)
    x = torch.randn(45, 96)
    with torch.inference_mode():
        y = cpu_gemm.linear(x, (w,), (b,), epilogue, "bf16", finish=_gelu_finish())
    assert y.dtype == torch.bfloat16
    ref = _ref(x, (w,), (b,), epilogue)
    eager = F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()).double()
    if epilogue == "gelu":
        eager = F.gelu(eager)
    assert (y.double() - ref).abs().max() <= 2 * (eager - ref).abs().max() + 1e-2


@pytest.mark.skipif(not HAS_VNNI, reason="no VNNI on this CPU")
@pytest.mark.parametrize("impl", INT8)
@pytest.mark.parametrize("epilogue", ["none", "bias", "gelu"])
def test_int8_dynamic_quantisation(monkeypatch, impl, epilogue):
    monkeypatch.setenv("BERTFAST_CPU_GEMM", impl)
    w, b = _params(130, 384)
    x = torch.randn(70, 384)
    with torch.inference_mode():
        y = cpu_gemm.linear(x, (w,), (b,), epilogue, "int8", finish=_gelu_finish())
    ref = _ref(x, (w,), (b,), epilogue)
    assert y.dtype == torch.float32
    # per-channel int8 weights and per-call uint8 activations: ~1% of the output's scale
    assert (y.double() - ref).abs().max() <= 0.03 * ref.abs().max()
    cos = F.cosine_similarity(y.double().flatten(), ref.flatten(), dim=0)
    assert cos > 0.999


def test_measured_choice_saved_and_reused(monkeypatch, tmp_path):
    monkeypatch.delenv("BERTFAST_CPU_GEMM", raising=False)
    measured = []
    real = cpu_gemm.measure

    def spy(*a, **k):
        measured.append(a)
        return real(*a, **k, rounds=1)

    monkeypatch.setattr(cpu_gemm, "measure", spy)
    w, b = _params(24, 40)
    with torch.inference_mode():
        x = torch.randn(5, 40)
        y = cpu_gemm.linear(x, (w,), (b,), "gelu", finish=_gelu_finish())
        cpu_gemm.linear(torch.randn(11, 40), (w,), (b,), "gelu", finish=_gelu_finish())  # same bucket
    assert len(measured) == 1
    torch.testing.assert_close(y.double(), _ref(x, (w,), (b,), "gelu"), rtol=1e-5, atol=2e-5)
    data = json.loads(open(cpu_gemm.cache_path()).read())
    (key, entry), = data["entries"].items()
    assert key == "fp32/gelu/16/40/24" and entry["impl"] in cpu_gemm.candidates("fp32", "gelu")
    assert set(entry["us"]) == set(cpu_gemm.candidates("fp32", "gelu"))
    assert data["threads"] == torch.get_num_threads() and data["torch"] == torch.__version__
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    # a new process reads the file instead of measuring
    cpu_gemm.forget_choices()
    with torch.inference_mode():
        cpu_gemm.linear(torch.randn(16, 40), (w,), (b,), "gelu", finish=_gelu_finish())
    assert len(measured) == 1


def test_damaged_cache_file_is_measured_again(monkeypatch):
    monkeypatch.delenv("BERTFAST_CPU_GEMM", raising=False)
    monkeypatch.setattr(cpu_gemm, "measure", lambda *a, **k: {"mkl": 2.0, "onednn": 1.0})
    path = cpu_gemm.cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").write("{not json")
    assert cpu_gemm.choose("fp32", "bias", 3, 8, 8) == "onednn"
    assert json.load(open(path))["entries"]["fp32/bias/16/8/8"]["impl"] == "onednn"


def test_bad_arguments_are_named(monkeypatch):
    w, b = _params(4, 4)
    with pytest.raises(ValueError, match="epilogue"):
        cpu_gemm.linear(torch.randn(2, 4), (w,), (b,), "relu")
    with pytest.raises(ValueError, match="finish"):
        cpu_gemm.linear(torch.randn(2, 4), (w,), (b,), "gelu")
    with pytest.raises(ValueError, match="precision"):
        cpu_gemm.check_precision("fp8")
    monkeypatch.setenv("BERTFAST_CPU_GEMM", "cublas")
    with pytest.raises(ValueError, match="BERTFAST_CPU_GEMM"):
        cpu_gemm.linear(torch.randn(2, 4), (w,), (b,), "bias")
    monkeypatch.setenv("BERTFAST_CPU_GEMM", "fbgemm")
    with pytest.raises(ValueError, match="fp32"):
        cpu_gemm.linear(torch.randn(2, 4), (w,), (b,), "bias")


def test_refuses_precision_without_instructions(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    with pytest.raises(RuntimeError, match="AVX512-BF16"):
        cpu_gemm.check_precision("bf16")
    with pytest.raises(RuntimeError, match="VNNI"):
        cpu_gemm.check_precision("int8")
    assert cpu_gemm.check_precision("fp32") == "fp32"


def test_bucket():
    assert [cpu_gemm.bucket(m) for m in (1, 16, 17, 1000, 4096, 50000)] == [16, 16, 32, 1024, 4096, 4096]


@pytest.mark.skipif(not HAS_VNNI, reason="no VNNI on this CPU")
@pytest.mark.parametrize("impl", INT8)
def test_int8_plan_smooths_outlier_channels(monkeypatch, impl):
    """Inputs with a few channels 40x the rest (what follows BERT's LayerNorms): one activation scale
    per call leaves the other channels few levels; a plan with the channels' maxima moves the range
    into the per-channel weight scales and computes the same product far more precisely."""
    monkeypatch.setenv("BERTFAST_CPU_GEMM", impl)
    w, b = _params(96, 64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 64, generator=g)
    x[:, [5, 40]] *= 40.0
    ref = _ref(x, (w,), (b,), "bias")
    with torch.inference_mode():
        plain = cpu_gemm.linear(x, (w,), (b,), "bias", "int8")
        cpu_gemm.set_int8_plan(w, x.abs().amax(0))
        smooth = cpu_gemm.linear(x, (w,), (b,), "bias", "int8")
    err_plain, err_smooth = (plain.double() - ref).abs().max(), (smooth.double() - ref).abs().max()
    assert err_smooth < 0.5 * err_plain, (err_smooth, err_plain)
    assert err_smooth <= 0.03 * ref.abs().max()


@pytest.mark.skipif(not HAS_VNNI, reason="no VNNI on this CPU")
def test_int8_plan_keeps_a_gemm_and_recording_runs_fp32(monkeypatch):
    monkeypatch.setenv("BERTFAST_CPU_GEMM", INT8[0])
    w, b = _params(33, 40)
    x = torch.randn(9, 40)
    ref = F.linear(x, w, b)
    with torch.inference_mode():
        cpu_gemm.set_int8_plan(w, keep="fp32")
        kept = cpu_gemm.linear(x, (w,), (b,), "bias", "int8")
        assert kept.dtype == torch.float32
        torch.testing.assert_close(kept, ref, rtol=1e-5, atol=1e-5)
        if HAS_BF16:
            cpu_gemm.set_int8_plan(w, keep="bf16")
            y = cpu_gemm.linear(x, (w,), (b,), "bias", "int8")
            assert y.dtype == torch.float32 and 0 < (y - ref).abs().max() < 0.05
        with cpu_gemm.recording_inputs() as seen:
            cpu_gemm.set_int8_plan(w)  # plain int8, but a calibration pass runs fp32
            torch.testing.assert_close(cpu_gemm.linear(x, (w,), (b,), "bias", "int8"), ref, rtol=1e-5, atol=1e-5)
            cpu_gemm.linear(2 * x[:3], (w,), (b,), "bias", "int8")
        torch.testing.assert_close(seen[id(w)][0], torch.maximum(x.abs().amax(0), 2 * x[:3].abs().amax(0)))
        assert seen[id(w)][1] == 33  # the GEMM's N
    with pytest.raises(ValueError, match="act_amax must be"):
        cpu_gemm.set_int8_plan(w, torch.ones(39))
    with pytest.raises(ValueError, match="keep must be"):
        cpu_gemm.set_int8_plan(w, keep="fp16")
    cpu_gemm.release(torch.nn.Linear(1, 1))  # another module's release leaves the plan
    assert cpu_gemm.int8_plan(w) is not None


@pytest.mark.skipif(not HAS_VNNI, reason="no VNNI on this CPU")
@pytest.mark.parametrize("impl", INT8)
@pytest.mark.parametrize("smoothed", [False, True])
def test_int8_plan_outlier_channels_in_fp32(monkeypatch, impl, smoothed):
    """A plan's outlier channels leave the int8 GEMM (input and weight) and are multiplied in fp32
    beside it: the same product, the int8 part's range set by the other channels."""
    monkeypatch.setenv("BERTFAST_CPU_GEMM", impl)
    w, b = _params(40, 96)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 96, generator=g).abs()  # one-sided, as after GELU
    x[:, [3, 70]] *= 60.0
    ref = _ref(x, (w,), (b,), "bias")
    with torch.inference_mode():
        plain = cpu_gemm.linear(x, (w,), (b,), "bias", "int8")
        cpu_gemm.set_int8_plan(w, x.abs().amax(0) if smoothed else None, outliers=torch.tensor([70, 3]))
        before = x.clone()
        split = cpu_gemm.linear(x, (w,), (b,), "bias", "int8")
        assert torch.equal(x, before)  # the input as it was (its outlier channels are zeroed only during the GEMM)
        gelu = cpu_gemm.linear(x, (w,), (b,), "gelu", "int8", finish=_gelu_finish())
    err_plain, err_split = (plain.double() - ref).abs().max(), (split.double() - ref).abs().max()
    assert err_split < 0.3 * err_plain, (err_split, err_plain)
    assert (gelu.double() - F.gelu(ref)).abs().max() < 2 * err_split + 1e-6
    with pytest.raises(ValueError, match="outliers must be"):
        cpu_gemm.set_int8_plan(w, outliers=torch.tensor([96]))
