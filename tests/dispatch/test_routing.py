"""Measured routing tables (bertfast/dispatch/routing.py) and the auto backend's per-call routing."""
import json
import warnings

import pytest
import torch

import bertfast
from bertfast import dispatch, ops
from bertfast.dispatch import core, routing
from bertfast.dispatch.serves import Serves
from bertfast.dispatch.table import Implementation


def _table(entries, source=None, default="triton", ops_=("bias_gelu",)):
    return {"table": "t", "ops": list(ops_), "candidates": ["triton", "cuda"], "default": default,
            "source": source, "entries": entries}


SRC = {"device": "NVIDIA H200", "date": "2026-12-01"}


def _entry(width, be, dtype="bf16", direction="fwd", op="bias_gelu"):
    return {"op": op, "direction": direction, "dtype": dtype, "max_width": width, "backend": be}


def test_committed_tables_parse_and_say_no_measurement():
    routing.reset()
    t = routing.table_for("bias_residual_layernorm")
    assert t is not None and t.default == "triton"
    for op in ("embedding_layernorm", "bias_gelu", "bias_residual_layernorm", "gelu_layernorm"):
        be, why = routing.lookup(op, "fwd", torch.bfloat16, 768)
        if routing.table_for(op).source is None:
            assert be == "triton" and "no measurement" in why


def test_width_buckets_pick_the_smallest_bound_that_holds():
    t = routing.parse(_table([_entry(1024, "cuda"), _entry(4096, "triton"), _entry(8192, "cuda"),
                              _entry(8192, "cuda", direction="bwd", dtype="fp16")], source=SRC))
    assert t.lookup("bias_gelu", "fwd", torch.bfloat16, 1)[0] == "cuda"
    assert t.lookup("bias_gelu", "fwd", torch.bfloat16, 1024)[0] == "cuda"
    assert t.lookup("bias_gelu", "fwd", torch.bfloat16, 1025)[0] == "triton"
    assert t.lookup("bias_gelu", "fwd", torch.bfloat16, 8192)[0] == "cuda"
    be, why = t.lookup("bias_gelu", "fwd", torch.bfloat16, 9000)
    assert be == "triton" and "no entry" in why
    assert t.lookup("bias_gelu", "bwd", torch.bfloat16, 768)[0] == "triton"  # no bf16 bwd entry
    assert t.lookup("bias_gelu", "bwd", torch.float16, 768)[0] == "cuda"
    assert t.lookup("bias_gelu", "fwd", torch.float32, 768)[0] == "triton"
    assert "H200" in t.lookup("bias_gelu", "fwd", torch.bfloat16, 8)[1]
    assert "cuda for bf16 fwd width 1-1024" in t.describe("bias_gelu")


@pytest.mark.parametrize("bad, match", [
    (dict(default="sdpa"), "default"),
    (dict(entries=[_entry(8, "cuda")]), "without a source"),
    (dict(source=SRC, entries=[_entry(8, "cuda", direction="sideways")]), "direction"),
    (dict(source=SRC, entries=[_entry(8, "cuda", dtype="int8")]), "dtype"),
    (dict(source=SRC, entries=[_entry(8, "magic")]), "candidates"),
    (dict(source=SRC, entries=[_entry(0, "cuda")]), "max_width"),
    (dict(source=SRC, entries=[_entry(8, "cuda", op="attention")]), "not in ops"),
    (dict(source=SRC, entries=[_entry(8, "cuda"), _entry(8, "triton")]), "second entry"),
])
def test_bad_tables_name_the_field(bad, match):
    data = _table([])
    data.update(bad)
    with pytest.raises(ValueError, match=match):
        routing.parse(data, "x.json")


def test_two_tables_cannot_route_one_op(tmp_path, monkeypatch):
    for name in ("a", "b"):
        (tmp_path / f"{name}.json").write_text(json.dumps(_table([])))
    monkeypatch.setenv("BERTFAST_ROUTING_DIR", str(tmp_path))
    routing.reset()
    try:
        with pytest.raises(ValueError, match="both route 'bias_gelu'"):
            routing.tables()
    finally:
        monkeypatch.delenv("BERTFAST_ROUTING_DIR")
        routing.reset()


def _fake_row(name, fwd, bwd, load=None):
    """A row `name` of bias_gelu declared for CPU tensors, forced as backend `name`."""
    def loader():
        if load is not None:
            load()
        return fwd, bwd

    core.register_impl("bias_gelu", Implementation("bias_gelu", name, name, Serves(devices=("cpu",)), loader),
                       first=True)


@pytest.fixture
def routed_cpu(tmp_path, monkeypatch):
    """bias_gelu with two fake CPU backends, 'triton' (the table's default) and 'cuda', a table that
    sends fp32 forwards of width <= 16 to 'cuda', and auto consulting tables for CPU tensors."""
    calls = []
    spec = core.spec("bias_gelu")
    saved = dict(spec.rows)
    ref = spec.reference

    def fake(name):
        def fwd(*a, **k):
            calls.append((name, "fwd", a[0].shape[-1]))
            return ref.fwd(*a)

        def bwd(*a):
            calls.append((name, "bwd", a[1].shape[-1]))
            return ref.bwd(*a)

        _fake_row(name, fwd, bwd)

    fake("cuda")
    fake("triton")
    (tmp_path / "t.json").write_text(json.dumps(_table([_entry(16, "cuda", dtype="fp32")], source=SRC)))
    monkeypatch.setenv("BERTFAST_ROUTING_DIR", str(tmp_path))
    monkeypatch.setattr(core, "ROUTED_DEVICES", ("cpu",))
    monkeypatch.setitem(core.AUTO_ORDER, "cpu", ("triton", "reference"))
    dispatch.reset()
    try:
        yield calls
    finally:
        spec.rows.clear()
        spec.rows.update(saved)
        monkeypatch.delenv("BERTFAST_ROUTING_DIR")
        dispatch.reset()


def test_auto_routes_each_call_by_width_and_direction(routed_cpu):
    calls = routed_cpu
    call = dispatch.Call("cpu", torch.float32, 16, "fwd+bwd")
    name, why = dispatch.explain("bias_gelu", "cpu", call)
    assert name == "cuda+triton" and "cuda for fp32 fwd width 1-16" in why, (name, why)
    calls.clear()  # explain probed both
    for n in (8, 16, 17):
        x = torch.randn(3, n, requires_grad=True)
        ops.bias_gelu(x, torch.randn(n)).sum().backward()
    assert calls == [("cuda", "fwd", 8), ("triton", "bwd", 8), ("cuda", "fwd", 16), ("triton", "bwd", 16),
                     ("triton", "fwd", 17), ("triton", "bwd", 17)]
    calls.clear()
    with bertfast.use_backend("cuda"):  # forcing a backend bypasses the table
        ops.bias_gelu(torch.randn(3, 17), torch.randn(17))
    assert calls == [("cuda", "fwd", 17)]


def test_a_routed_backend_that_cannot_load_falls_back_with_one_warning(routed_cpu):
    def load():
        raise RuntimeError("nvcc exploded")

    c = core.spec("bias_gelu").rows["cuda"]
    _fake_row("cuda", c.fwd, c.bwd, load=load)
    with pytest.warns(RuntimeWarning, match="cannot use backend 'cuda' .*nvcc exploded.*routing table t"):
        ops.bias_gelu(torch.randn(2, 8), torch.randn(8))
    assert dispatch.select("bias_gelu", dispatch.Call("cpu", torch.float32, 8)).backend == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.bias_gelu(torch.randn(2, 8), torch.randn(8))


def test_a_table_without_measurement_never_loads_its_other_backends(tmp_path, monkeypatch):
    loads = []
    spec = core.spec("bias_gelu")
    saved = dict(spec.rows)
    ref = spec.reference
    for name in ("cuda", "triton"):
        _fake_row(name, ref.fwd, ref.bwd, load=lambda name=name: loads.append(name))
    (tmp_path / "t.json").write_text(json.dumps(_table([])))
    monkeypatch.setenv("BERTFAST_ROUTING_DIR", str(tmp_path))
    monkeypatch.setattr(core, "ROUTED_DEVICES", ("cpu",))
    monkeypatch.setitem(core.AUTO_ORDER, "cpu", ("triton", "reference"))
    dispatch.reset()
    try:
        ops.bias_gelu(torch.randn(2, 8), torch.randn(8))
        assert loads == ["triton"]
        name, why = dispatch.explain("bias_gelu", "cpu")
        assert name == "triton" and "no measurement" in why
    finally:
        spec.rows.clear()
        spec.rows.update(saved)
        monkeypatch.delenv("BERTFAST_ROUTING_DIR")
        dispatch.reset()


def _bench_result(op, pas, tokens, hidden, dtype, triton_ms, cuda_ms):
    return {"suite": "ops", "params": {"op": op, "pass": pas, "tokens": tokens, "hidden": hidden}, "dtype": dtype,
            "variants": {"backend_triton_graph": {"status": "ok", "median_ms": triton_ms},
                         "backend_cuda_graph": {"status": "ok", "median_ms": cuda_ms},
                         "backend_triton": {"status": "ok", "median_ms": 99.0},
                         "backend_cuda": {"status": "ok", "median_ms": 1.0}}}


def test_layernorm_family_table_from_a_run_routes_by_direction_and_width():
    from bertfast.bench import routes

    bench = {"environment": {"device_type": "cuda", "device": "NVIDIA H200", "torch": "2.11.0+cu130",
                             "date": "2026-12-01T00:00:00+00:00", "git_commit": "abcdef1234567890"},
             "results": [
                 _bench_result("bias_gelu", "fwd", 32768, 768, "bf16", 0.050, 0.040),       # cuda 20% faster
                 _bench_result("bias_gelu", "fwd+bwd", 32768, 768, "bf16", 0.200, 0.199),   # bwd: 0.150 vs 0.159
                 _bench_result("bias_gelu", "fwd", 32768, 3072, "bf16", 0.100, 0.099),      # within the margin
                 _bench_result("bias_gelu", "fwd", 1024, 768, "bf16", 0.001, 0.900),        # fewer tokens: ignored
                 _bench_result("attention", "fwd", 32768, 768, "bf16", 1.0, 0.1),           # not a norm op
             ]}
    out = routes.layernorm_family_table(bench, "run/bench.json")
    assert out["source"]["device"] == "NVIDIA H200" and out["source"]["date"] == "2026-12-01"
    got = {(e["direction"], e["max_width"]): e["backend"] for e in out["entries"]}
    assert got == {("fwd", 768): "cuda", ("bwd", 768): "triton", ("fwd", 3072): "triton"}
    t = routing.parse(out)
    assert t.lookup("bias_gelu", "fwd", torch.bfloat16, 512)[0] == "cuda"
    assert t.lookup("bias_gelu", "fwd", torch.bfloat16, 1024)[0] == "triton"
    eager = routes.layernorm_family_table(bench, "run/bench.json", graph=False)  # host time included
    assert {e["backend"] for e in eager["entries"] if e["direction"] == "fwd"} == {"cuda"}
    empty = routes.layernorm_family_table({"environment": {"device_type": "cuda"}, "results": []}, "x")
    assert empty["source"] is None and routing.parse(empty).default == "triton"  # nothing measured
    with pytest.raises(ValueError, match="not a GPU run"):
        routes.layernorm_family_table({"environment": {"device_type": "cpu"}, "results": []}, "x")
