"""Hardening: bad input never crashes the process or corrupts memory, no cache serves
stale weights, torch.compile works in every grad mode, in-place ops keep autograd honest, and
configs / checkpoints with bad contents fail with errors that say what and where.

Calls that crashed the process before the fix run in a subprocess, so a regression is a failed
test instead of a dead test run. tests/ops/test_fuzz_ops.py fuzzes the same entries at random."""
import copy
import importlib
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import bertfast
from bertfast import BertConfig, ops
from bertfast.padding import PackedLayout, clamp_offsets, unpad_mask

from conftest import TRITON_DEVICE, requires_cuda, requires_triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ["cpp", "reference"] + (["triton"] if not torch.cuda.is_available() else [])


def _run(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---- 1. variable-length offsets ----------------------------------------------------------------


def test_issue_offsets_that_crashed_raise_valueerror_on_every_backend():
    """Offsets that once crashed (segfault, heap corruption, silent garbage), in a child process: each must
    raise the same ValueError on the C++, reference and Triton paths."""
    proc = _run("""
        import warnings, torch, bertfast
        from bertfast import ops
        from bertfast.padding import unpad_mask
        warnings.simplefilter("ignore")
        q = torch.randn(10, 2, 16)
        cases = [([0, 12, 10], 12), ([0, 20, 10], 20), ([0, 7, 3, 10], 7), ([0, 5, 10], 4), ([0, 5, 12], 7),
                 ([2, 5, 10], 8), ([0, -3, 10], 13)]
        for backend in ("cpp", "reference", "triton"):
            with bertfast.use_backend(backend):
                for cu, m in cases:
                    try:
                        ops.attention(q, q, q, cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=m)
                        print("ACCEPTED", backend, cu, m)
                    except ValueError as e:
                        assert "cu_seqlens" in str(e) or "max_seqlen" in str(e), e
                        print("ValueError", backend)
        mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
        for total, m in ((5, 2), (1, 2), (3, 1), (3, 3)):
            try:
                unpad_mask(mask, total, m)
                print("ACCEPTED unpad_mask", total, m)
            except ValueError as e:
                print("ValueError unpad_mask")
        print("DONE")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ACCEPTED" not in proc.stdout, proc.stdout
    assert proc.stdout.count("ValueError") == 3 * 7 + 4 and "DONE" in proc.stdout


def test_cpp_kernel_checks_offsets_itself():
    """The C++ op is the last guard: called directly (past the Python checks) with offsets that
    overshoot, it raises a ValueError instead of reading outside q (in a child process: before the
    fix this aborted with heap corruption)."""
    proc = _run("""
        import torch
        from bertfast.dispatch import cpp
        cpp.load()
        q = torch.randn(10, 2, 16)
        for cu, m in (([0, 12, 10], 12), ([0, 5, 10], 3), ([0, 5, 11], 6), ([1, 5, 10], 6)):
            cu = torch.tensor(cu, dtype=torch.int32)
            try:
                torch.ops.bertfast.attention_cpu_fwd(q, q, q, None, cu, cu, m, m, 0.0, 0.25, False, 0)
                print("ACCEPTED", cu.tolist())
            except ValueError as e:
                assert "cu_seqlens" in str(e) or "max_seqlen" in str(e), e
                print("ValueError")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ValueError"] * 4, proc.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_too_small_max_seqlen_is_one_valueerror(backend):
    q = torch.randn(9, 1, 8)
    cu = torch.tensor([0, 2, 9], dtype=torch.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with bertfast.use_backend(backend), pytest.raises(ValueError, match="max_seqlen \\(6\\) must cover"):
            ops.attention(q, q, q, cu_seqlens=cu, max_seqlen=6)
        with bertfast.use_backend(backend):  # a larger one is fine and changes nothing
            a = ops.attention(q, q, q, cu_seqlens=cu, max_seqlen=7)
            b = ops.attention(q, q, q, cu_seqlens=cu, max_seqlen=50)
    torch.testing.assert_close(a, b)


def test_max_seqlen_type_and_cross_attention_names():
    q, k = torch.randn(5, 1, 8), torch.randn(7, 1, 8)
    cq, ck = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 3, 7], dtype=torch.int32)
    with pytest.raises(TypeError, match="max_seqlen"):
        ops.attention(q, q, q, cu_seqlens=cq, max_seqlen=3.0)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        ops.attention(q, k, k, cu_seqlens=(cq, torch.tensor([0, 3, 6], dtype=torch.int32)), max_seqlen=(3, 4))
    out = ops.attention(q, k, k, cu_seqlens=(cq, ck), max_seqlen=(3, 4))
    ref = ops.attention_ref(q, k, k, cu_q=cq, cu_k=ck, max_q=3, max_k=4)
    torch.testing.assert_close(out, ref)


def test_packed_layout_cannot_be_built_wrong():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    layout = unpad_mask(mask)
    q = torch.randn(4, 1, 8)
    ops.attention(q, q, q, cu_seqlens=layout)
    # by hand: checked when built
    with pytest.raises(ValueError, match="cu_seqlens"):
        PackedLayout(layout.indices, torch.tensor([0, 5, 4], dtype=torch.int32), 3, 2, 4)
    with pytest.raises(ValueError, match="max_seqlen"):
        PackedLayout(layout.indices, layout.cu_seqlens, 2, 2, 4)
    with pytest.raises(ValueError, match="indices"):
        PackedLayout(torch.tensor([0, 1, 2, 99]), layout.cu_seqlens, 3, 2, 4)
    ok = PackedLayout(layout.indices.clone(), layout.cu_seqlens.clone(), 3, 2, 4)
    torch.testing.assert_close(ops.attention(q, q, q, cu_seqlens=ok), ops.attention(q, q, q, cu_seqlens=layout))
    # wrong counts given to unpad_mask
    with pytest.raises(ValueError, match="total"):
        unpad_mask(mask, 3, 3)
    with pytest.raises(ValueError, match="max_seqlen"):
        unpad_mask(mask, 4, 2)
    # modified in place after it was checked, or rebuilt without a check: refused
    bad = unpad_mask(mask)
    bad.cu_seqlens[1] = 9
    with pytest.raises(ValueError, match="modified in place"):
        ops.attention(q, q, q, cu_seqlens=bad)
    with pytest.raises(ValueError, match="rebuilt"):
        ops.attention(q, q, q, cu_seqlens=layout._replace(max_seqlen=1))


def test_offsets_clamped_on_device_without_a_read(monkeypatch):
    """Where nothing can be read back (torch.compile, CUDA-graph capture) offsets are clamped into
    the packed tokens instead: whatever they were, every kernel stays inside its rows."""
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        cu = torch.randint(-20, 40, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g, dtype=torch.int32)
        safe = clamp_offsets(cu, 17, 5)
        lens = safe[1:] - safe[:-1]
        assert safe[0] == 0 and (lens >= 0).all() and (lens <= 5).all() and safe.max() <= 17
        assert safe.dtype == torch.int32 and safe.shape == cu.shape
    good = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    assert torch.equal(clamp_offsets(good, 8, 5), good)
    import bertfast.padding as padding

    monkeypatch.setattr(padding, "can_sync", lambda: False)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    with pytest.raises(ValueError, match="needs total and max_seqlen"):
        unpad_mask(mask)
    lied = unpad_mask(mask, 2, 1)  # wrong counts, unchecked: clamped into 2 tokens of length <= 1
    assert lied.cu_seqlens.tolist() == [0, 1, 2] and lied.indices.numel() == 2


# ---- 3. no stale fused-QKV weights ------------------------------------------------------------------


def _tiny(**kw):
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                     max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
    torch.manual_seed(0)
    return bertfast.BertModel(cfg).eval()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inference_sees_weight_writes_through_data(mode):
    """EMA updates, weight surgery and some loaders write through .data, which bumps no version
    counter: inference must still use the weights as they are now."""
    model = _tiny()
    ids = torch.randint(1, 50, (2, 7))
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        before = model(ids).last_hidden_state
        attn = model.encoder.layer[0].attention.self
        attn.query.weight.data.mul_(3.0)
        attn.value.bias.data.add_(1.0)
        after = model(ids).last_hidden_state
        fresh = copy.deepcopy(model)(ids).last_hidden_state
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh)


# ---- 4. torch.compile in every grad mode ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_compile_fullgraph_in_every_grad_mode(mode):
    torch._dynamo.reset()
    model = _tiny()
    model.encoder.layer = model.encoder.layer[:1]
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with ctx():
        eager = model(ids, mask).last_hidden_state
        compiled = torch.compile(model, fullgraph=True)(ids, mask).last_hidden_state
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


# ---- 5. inplace=True keeps autograd honest ---------------------------------------------------------


def test_inplace_write_bumps_version_so_autograd_refuses():
    """x saved by another op, then overwritten by inplace=True: torch's own in-place ops make that
    backward raise; ours must too, instead of returning gradients from the new values."""
    n = 16
    w = torch.randn(n, requires_grad=True)
    x = torch.randn(3, n)
    y = x * w  # saves x for w's gradient
    v0 = x._version
    ops.bias_gelu(x, torch.zeros(n), inplace=True)
    assert x._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    x = torch.randn(3, n)
    y = x * w
    ops.bias_residual_layernorm(x, torch.zeros(n), torch.randn(3, n), torch.ones(n), torch.zeros(n), inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_inplace_with_overlapping_inputs_is_right():
    n = 8
    g = torch.Generator().manual_seed(0)
    store = torch.randn(5, n, generator=g)
    w, lb = torch.randn(n, generator=g), torch.randn(n, generator=g)
    for x_rows, r_rows in ((slice(1, 5), slice(0, 4)), (slice(0, 4), slice(0, 4)), (slice(0, 4), slice(1, 5))):
        buf = store.clone()
        want = ops.bias_residual_layernorm_ref(buf[x_rows].clone(), None, buf[r_rows].clone(), w, lb)
        got = ops.bias_residual_layernorm(buf[x_rows], None, buf[r_rows], w, lb, inplace=True)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    buf = store.clone()
    want = ops.bias_gelu_ref(buf[1:].clone(), buf[0].clone())
    torch.testing.assert_close(ops.bias_gelu(buf[1:], buf[0], inplace=True), want, atol=1e-6, rtol=1e-5)
    buf = store.clone()  # bias is x's own first row
    want = ops.bias_gelu_ref(buf.clone(), buf[0].clone())
    torch.testing.assert_close(ops.bias_gelu(buf, buf[0], inplace=True), want, atol=1e-6, rtol=1e-5)


# ---- 7. smaller ones ---------------------------------------------------------------------------------

EXTREMES = [float("-inf"), -1e30, -1e10, -100.0, -7.0, -5.5, 0.0, 5.5, 1e30, float("inf"), float("nan")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_at_extremes_matches_the_definition(backend, approximate):
    x = torch.tensor(EXTREMES)
    want = ops.bias_gelu_ref(x.double(), torch.zeros(len(EXTREMES), dtype=torch.float64), approximate).float()
    assert torch.isnan(want[0]) and want[1] == 0  # GELU(-inf) = -inf * 0, GELU(-1e30) = 0
    with bertfast.use_backend(backend):
        got = ops.bias_gelu(x, torch.zeros(len(EXTREMES)), approximate)
        rows = ops.gelu_layernorm(x[None, 1:6].repeat(2, 1), torch.zeros(5), torch.ones(5), torch.zeros(5), 1e-5,
                                  approximate)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5, equal_nan=True)
    ref_rows = ops.gelu_layernorm_ref(x[None, 1:6].repeat(2, 1).double(), torch.zeros(5), torch.ones(5),
                                      torch.zeros(5), 1e-5, approximate).float()
    torch.testing.assert_close(rows, ref_rows, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_out_of_range_where_the_op_runs(backend):
    """Under torch.compile the public checks cannot read ids back: the op itself must refuse them
    (the reference used to gather row -1 silently)."""
    emb = importlib.import_module("bertfast.ops.embedding_layernorm")

    word, pe, te = torch.randn(5, 8), torch.randn(4, 8), torch.randn(2, 8)
    ids = torch.tensor([1, -1, 3])
    zeros, pos = torch.zeros(3, dtype=torch.long), torch.arange(3)
    with bertfast.use_backend(backend), pytest.raises(IndexError, match="input_ids"):
        emb._fwd(ids, zeros, pos, word, pe, te, torch.ones(8), torch.zeros(8), 1e-12, 0.0, None)
    with bertfast.use_backend(backend), pytest.raises(IndexError, match="position_ids"):
        emb._fwd(torch.tensor([1, 2, 3]), zeros, torch.tensor([0, 1, 4]), word, pe, te, torch.ones(8),
                 torch.zeros(8), 1e-12, 0.0, None)


def test_ids_out_of_range_under_compile():
    torch._dynamo.reset()
    word, pe, te = torch.randn(5, 8), torch.randn(4, 8), torch.randn(2, 8)

    def f(ids):
        return ops.embedding_layernorm(ids, None, None, word, pe, te, torch.ones(8), torch.zeros(8))

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(torch.tensor([[1, 2, 3]])), f(torch.tensor([[1, 2, 3]])))
    for backend in ("reference", "cpp"):
        with bertfast.use_backend(backend), pytest.raises(IndexError, match="input_ids"):
            compiled(torch.tensor([[1, -1, 3]]))


@requires_triton
def test_triton_embedding_clamps_ids():
    """The Triton gather clamps ids into the tables, so an unchecked bad id (a CUDA graph or
    torch.compile, where nothing is read back) never reads outside them."""
    from bertfast.kernels.embedding_layernorm import embedding_layernorm_fwd

    dev = TRITON_DEVICE
    word, pe, te = (torch.randn(n, 8, device=dev) for n in (5, 4, 2))
    args = (word, pe, te, torch.ones(8, device=dev), torch.zeros(8, device=dev), 1e-12, 0.0, 0)

    def ids(*v):
        return torch.tensor(v, device=dev)

    bad = embedding_layernorm_fwd(ids(-7, 99), ids(5, -1), ids(9, -2), *args)[0]
    clamped = embedding_layernorm_fwd(ids(0, 4), ids(1, 0), ids(3, 0), *args)[0]
    torch.testing.assert_close(bad, clamped)


@requires_cuda
def test_gpu_varlen_offsets_checked_eagerly_and_clamped_in_a_cuda_graph():
    """On a GPU: eager calls check device offsets in one read-back; a captured graph cannot read
    them, so the offsets it replays are clamped on the device and bad ones never fault."""
    q = torch.randn(10, 2, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ops.attention(q, q, q, cu_seqlens=torch.tensor([0, 12, 10], dtype=torch.int32, device="cuda"), max_seqlen=12)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device="cuda")
    want = ops.attention(q, q, q, cu_seqlens=cu, max_seqlen=8)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.attention(q, q, q, cu_seqlens=cu, max_seqlen=8)  # warm-up (compiles the kernels)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.attention(q, q, q, cu_seqlens=cu, max_seqlen=8)
    graph.replay()
    torch.testing.assert_close(out, want)
    cu.copy_(torch.tensor([0, 4000, -7], dtype=torch.int32))  # what a buggy caller could leave there
    graph.replay()
    torch.cuda.synchronize()  # no illegal address


@pytest.mark.parametrize("bad, match", [
    ({"to_dict": 1}, "to_dict"), ({"head_dim": 7}, "head_dim"), ({"layer_norm_eps": 0}, "layer_norm_eps"),
    ({"layer_norm_eps": -1e-5}, "layer_norm_eps"), ({"hidden_dropout_prob": 1.0}, "hidden_dropout_prob"),
    ({"attention_probs_dropout_prob": -0.1}, "attention_probs_dropout_prob"),
    ({"classifier_dropout": 1.5}, "classifier_dropout"), ({"num_labels": 0}, "num_labels"),
    ({"pad_token_id": 99999}, "pad_token_id"), ({"hidden_size": True}, "hidden_size"),
])
def test_config_rejects_bad_fields(bad, match):
    with pytest.raises(ValueError, match=match):
        BertConfig(**bad)


def test_config_json_must_be_an_object(tmp_path):
    path = tmp_path / "config.json"
    for text, exc in (("[1, 2]", ValueError), ("3", ValueError), ("{not json", ValueError),
                      (json.dumps({"to_dict": 1}), ValueError)):
        path.write_text(text)
        with pytest.raises(exc, match="config.json"):
            BertConfig.from_pretrained(str(tmp_path))
    with pytest.raises(TypeError, match="JSON object"):
        BertConfig.from_dict([("hidden_size", 8)])


def test_truncated_safetensors_names_the_file(tmp_path):
    model = _tiny()
    model.save_pretrained(str(tmp_path))
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        bertfast.BertModel.from_pretrained(str(tmp_path))
