"""attention's routes to PyTorch's own kernels (rows sdpa and varlen_attn of bertfast/dispatch/table.py,
bertfast/dispatch/torch_attention.py): the committed table is the measured data of a GPU run, the auto
backend hands exactly the cases the table names to the named kernel (and nothing else), forced
backends and compiled graphs keep bertfast's op."""
import json
import os
import sys
import types
import warnings

import pytest
import torch

import bertfast
from bertfast import dispatch, ops
from bertfast.bench import attention as attention_suite
from bertfast.bench import routes
from bertfast.dispatch import core, routing
from bertfast.dispatch import torch_attention as torch_routes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SRC = {"device": "NVIDIA H200", "date": "2026-11-26"}


def test_committed_attention_table_is_the_runs_data():
    """The committed table is what `python -m bertfast.bench.routes` makes of the run it names."""
    routing.reset()
    t = routing.table_for("attention")
    assert t is not None and t.level == "op" and t.default == "triton"
    path = os.path.join(ROOT, t.source["results"])
    with open(path) as f:
        data = json.load(f)
    with open(os.path.join(ROOT, "bertfast", "dispatch", "routing_tables", "attention.json")) as f:
        committed = json.load(f)
    assert routes.attention_table(data, t.source["results"]) == committed
    # the committed table: SDPA's kernel beat ours on the padded bf16 cases its run measured, not varlen
    assert t.lookup("attention", "fwd", torch.bfloat16, 64, "padded", 128)[0] == "sdpa"
    assert t.lookup("attention", "fwd", torch.bfloat16, 64, "varlen", 128)[0] == "triton"
    assert t.lookup("attention", "fwd", torch.bfloat16, 64, "padded", 1024)[0] == "triton"  # never measured
    assert t.lookup("attention", "fwd", torch.float16, 64, "padded", 128)[0] == "triton"


def _results(ours_ms, sdpa_ms, layout="padded", pas="fwd", seq=128):
    key = "sdpa_graph" if layout == "padded" else "varlen_attn_graph"
    return {"suite": "attention", "name": f"{layout} {pas} b8xs{seq} h12x64 bf16", "dtype": "bf16",
            "params": {"layout": layout, "pass": pas, "seq": seq, "head_dim": 64},
            "variants": {"bertfast_triton_graph": {"status": "ok", "median_ms": ours_ms},
                         key: {"status": "ok", "median_ms": sdpa_ms}}}


def test_routes_table_names_the_faster_kernel_per_bucket():
    data = {"environment": {"device_type": "cuda", "device": "GPU", "date": "2026-12-01T00:00"},
            "results": [_results(0.05, 0.04, seq=128), _results(0.05, 0.06, seq=256),
                        _results(0.3, 0.2, "varlen", "fwd+bwd", 512)]}
    t = routing.parse(routes.attention_table(data, "x/bench.json"), "x.json")
    assert t.lookup("attention", "fwd", torch.bfloat16, 64, "padded", 100)[0] == "sdpa"
    assert t.lookup("attention", "fwd", torch.bfloat16, 64, "padded", 200)[0] == "triton"
    assert t.lookup("attention", "fwd+bwd", torch.bfloat16, 64, "varlen", 512)[0] == "varlen_attn"
    assert t.lookup("attention", "fwd", torch.bfloat16, 64, "varlen", 512)[0] == "triton"
    with pytest.raises(ValueError, match="not a GPU run"):
        routes.attention_table({"environment": {"device_type": "cpu"}, "results": []}, "cpu.json")


def _table(entries):
    return {"table": "attention-test", "level": "op", "ops": ["attention"],
            "candidates": ["triton", "sdpa", "varlen_attn"], "default": "triton", "source": SRC, "entries": entries}


def _entry(direction="fwd", layout="padded", max_seq=16, width=32, be="sdpa"):
    return {"op": "attention", "direction": direction, "dtype": "fp32", "max_width": width, "layout": layout,
            "max_seq": max_seq, "backend": be}


@pytest.fixture
def routed(tmp_path, monkeypatch):
    """CPU calls routed by a test table; the sdpa route spied on."""
    def install(entries):
        (tmp_path / "attention.json").write_text(json.dumps(_table(entries)))
        monkeypatch.setenv("BERTFAST_ROUTING_DIR", str(tmp_path))
        dispatch.reset()
        torch_routes.reset()

    calls = []
    real = torch_routes.sdpa

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(core, "ROUTED_DEVICES", ("cpu",))
    monkeypatch.setattr(torch_routes, "sdpa", spy)
    yield install, calls
    monkeypatch.delenv("BERTFAST_ROUTING_DIR", raising=False)
    dispatch.reset()
    torch_routes.reset()


def _qkv(B=2, S=12, H=2, D=32, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, H, D, generator=g).requires_grad_(grad) for _ in range(3)]


def test_auto_serves_the_tables_cases_with_sdpa(routed):
    install, calls = routed
    install([_entry()])
    q, k, v = _qkv()
    out = ops.attention(q, k, v)
    assert calls == [q.shape]
    torch.testing.assert_close(out, ops.attention_ref(q, k, v), atol=1e-5, rtol=1e-5)
    call = dispatch.Call("cpu", torch.float32, 32, "fwd", "padded", 12)
    name, why = dispatch.explain("attention", "cpu", call)
    assert name == "sdpa" and "sdpa for fp32 fwd width 1-32 padded seq <= 16" in why, (name, why)


def test_training_calls_route_only_by_a_fwd_bwd_entry(routed):
    install, calls = routed
    install([_entry("fwd")])
    q, k, v = _qkv(grad=True)
    ops.attention(q, k, v).sum().backward()
    assert calls == []  # a forward-only entry: the training call stays on bertfast's kernel
    install([_entry("fwd+bwd")])
    q2, k2, v2 = _qkv(grad=True)
    out = ops.attention(q2, k2, v2)
    assert calls == [q2.shape]
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q2, k2, v2), g)
    qr, kr, vr = (t.detach().requires_grad_() for t in (q2, k2, v2))
    want = torch.autograd.grad(ops.attention_ref(qr, kr, vr), (qr, kr, vr), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["dropout", "mask", "longer", "wider", "causal_cross", "forced", "compiling"])
def test_calls_outside_the_table_or_semantics_stay_on_bertfast(routed, monkeypatch, case):
    install, calls = routed
    install([_entry(max_seq=16, width=32)])
    q, k, v = _qkv()
    kw = {}
    if case == "dropout":
        kw["dropout_p"] = 0.1
    elif case == "mask":
        kw["attention_mask"] = torch.ones(2, 12, dtype=torch.bool)
    elif case == "longer":
        q, k, v = _qkv(S=17)
    elif case == "wider":
        q, k, v = _qkv(D=64)
    elif case == "causal_cross":
        q = q[:, :5]
        kw["causal"] = True
    elif case == "compiling":
        monkeypatch.setattr(sys.modules["bertfast.ops.attention"], "_compiling", lambda: True)
    if case == "forced":
        with bertfast.use_backend("reference"):
            ops.attention(q, k, v)
    else:
        ops.attention(q, k, v, **kw)
    assert calls == []


def test_causal_self_attention_is_routed_and_exact(routed):
    install, calls = routed
    install([_entry()])
    q, k, v = _qkv()
    out = ops.attention(q, k, v, causal=True)
    assert len(calls) == 1
    torch.testing.assert_close(out, ops.attention_ref(q, k, v, causal=True), atol=1e-5, rtol=1e-5)


def test_an_unavailable_route_falls_back_with_one_warning(routed, monkeypatch):
    install, _ = routed
    install([_entry(layout="varlen", be="varlen_attn")])
    q = torch.randn(10, 2, 32)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.warns(RuntimeWarning, match="varlen_attn: does not serve cpu tensors.*routing table"):
        out = ops.attention(q, q, q, cu_seqlens=cu, max_seqlen=6)
    torch.testing.assert_close(out, ops.attention_ref(q, q, q, cu_q=cu, cu_k=cu, max_q=6, max_k=6),
                               atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.attention(q, q, q, cu_seqlens=cu, max_seqlen=6)  # warned once
    dispatch.reset()
    monkeypatch.setenv("BERTFAST_STRICT", "1")
    with pytest.raises(dispatch.BackendError, match="varlen_attn"):
        ops.attention(q, q, q, cu_seqlens=cu, max_seqlen=6)


@pytest.mark.parametrize("param", ["window_size", "is_causal"])
def test_varlen_adapter_speaks_both_torch_signatures(monkeypatch, param):
    """torch 2.10/2.11 name causal masking is_causal, later releases window_size=(-1, 0)."""
    seen = {}
    if param == "window_size":
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
            seen.update(scale=scale, window_size=window_size)
            return query
    else:
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
            seen.update(is_causal=is_causal, q=query)
            return query
    mod = types.ModuleType("torch.nn.attention.varlen")
    mod.varlen_attn = fake
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", mod)
    torch_routes.reset()
    q = torch.ones(4, 2, 16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    torch_routes.varlen(q, q, q, cu, cu, 4, 4, 0.5, True)
    if param == "window_size":
        assert seen == {"scale": 0.5, "window_size": (-1, 0)}
    else:  # no scale keyword: the scale is folded into q (0.5 * sqrt(16) = 2)
        assert seen["is_causal"] is True and torch.equal(seen["q"], q * 2.0)
    torch_routes.reset()


def test_varlen_lengths_hit_the_asked_fill():
    for fill in (0.4, 0.6):
        lens = attention_suite.varlen_lengths(512, 256, fill=fill)
        assert abs(sum(lens) / (512 * 256) - fill) < 0.05 and max(lens) == 256 and min(lens) >= 1
    with pytest.raises(ValueError, match="fill"):
        attention_suite.varlen_lengths(4, 8, fill=0.0)


def test_compiled_graphs_keep_bertfasts_op_without_graph_breaks(routed):
    """fullgraph=True with a routing table active: the routing code traces (no graph break) and
    the compiled graph keeps bertfast's op (a route is an eager-mode decision)."""
    install, calls = routed
    install([_entry()])
    q, k, v = _qkv()
    f = torch.compile(lambda q, k, v: ops.attention(q, k, v), fullgraph=True)
    with torch.no_grad():
        out = f(q, k, v)
    assert calls == []
    torch.testing.assert_close(out, ops.attention_ref(q, k, v), atol=1e-5, rtol=1e-5)
