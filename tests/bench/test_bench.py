"""The benchmark harness on tiny shapes: it runs every suite, writes JSON + markdown, and
every ratio it reports is finite. Seconds, not minutes: tiny ops, a 2-layer model, no
torch.compile (the compile baselines are exercised by `bertfast bench` itself)."""
import json
import math
import os

import pytest
import torch

from bertfast import bench
from bertfast.bench import attention as attention_suite
from bertfast.bench import cli as bench_cli
from bertfast.bench import encoder as encoder_suite
from bertfast.bench import ops as ops_suite
from bertfast.bench import timing


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run of all three suites at tiny shapes; 1 thread, so that when other processes hold
    the cores no parallel region stalls on a descheduled thread."""
    tmp_path = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()  # restored: the rest of the session keeps its thread count
    try:
        out = _run_tiny(tmp_path)
    finally:
        torch.set_num_threads(threads)
    return tmp_path, out


def _run_tiny(tmp_path):
    # --budget: generous, so a very busy machine slows the run down but never skips a variant
    return bench.run(["--suite", "ops,attention,encoder", "--device", "cpu", "--quick", "--dtype", "fp32",
                     "--tokens", "64", "--hidden", "32", "--sizes", "16", "--models", "tiny", "--compile", "none",
                     "--repeats", "3", "--threads", "1", "--train",
                     "--skip", "sdpa_flash,sdpa_math,bertfast_dense_mlm,attention:eager_ref",
                     "--budget", "3000", "--out", str(tmp_path), "--no-plots", "--no-progress"])


def test_bench_tiny_writes_json_and_markdown(tiny_run):
    tmp_path, out = tiny_run
    data = json.loads((tmp_path / "bench.json").read_text())
    md = (tmp_path / "bench.md").read_text()
    env = data["environment"]
    for key in ("device", "torch", "triton", "transformers", "date", "git_commit", "torch_threads"):
        assert key in env
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["matmul_tflops"]["fp32"] > 0
    suites = {r["suite"] for r in data["results"]}
    assert suites == {"ops", "attention", "encoder"}
    n_ratios = 0
    for r in data["results"]:
        assert r["variants"]["bertfast"]["status"] == "ok", r["variants"]["bertfast"]
        for name, v in r["variants"].items():
            assert v["status"] in ("ok", "skipped"), (r["name"], name, v)
            if v["status"] == "ok":
                assert v["median_ms"] > 0 and math.isfinite(v["median_ms"])
            else:
                assert v["reason"]
        for ratio in r["speedup"].values():
            assert math.isfinite(ratio) and ratio > 0
            n_ratios += 1
    assert n_ratios >= len(data["results"])  # every case has at least one baseline beside it
    assert "## ops" in md and "## attention" in md and "## encoder" in md
    # SUITE:VARIANT skips in that suite only
    for r in data["results"]:
        if r["suite"] in ("ops", "attention"):
            want = "skipped" if r["suite"] == "attention" else "ok"
            assert r["variants"]["eager_ref"]["status"] == want, (r["name"], r["variants"]["eager_ref"])
    train = [r for r in data["results"] if r["params"].get("kind") == "train"]
    assert train and train[0]["variants"]["bertfast"]["tokens_per_s"] > 0
    assert len(out["results"]) == len(data["results"])


def test_bench_memory_bound_figures(tiny_run):
    tmp_path, _ = tiny_run
    data = json.loads((tmp_path / "bench.json").read_text())
    for r in data["results"]:
        if r["suite"] != "ops":
            continue
        v = r["variants"]["bertfast"]
        assert v["gbps"] > 0 and 0 < v["frac_copy_bw"] < 100
        assert r["variants"]["copy_same_bytes"]["status"] == "ok" and v["frac_copy_bw_interleaved"] > 0
        assert "copy_same_bytes" not in r["speedup"]  # a ceiling, not a baseline


def test_op_bytes_counts_forward_and_backward():
    f = ops_suite.op_bytes("bias_gelu", 1024, 768, torch.bfloat16, backward=False)
    fb = ops_suite.op_bytes("bias_gelu", 1024, 768, torch.bfloat16, backward=True)
    assert f == pytest.approx(2 * 1024 * 768 * 2 + 768 * 2)
    assert fb > 2 * f


def test_rotation_exceeds_cache():
    dev = torch.device("cpu")
    assert timing.n_input_sets(1 << 40, dev) == 2
    assert 2 <= timing.n_input_sets(1 << 20, dev) <= 8


def test_varlen_lengths_fill():
    lens = attention_suite.varlen_lengths(256, 512)
    fill = sum(lens) / (256 * 512)
    assert 0.5 < fill < 0.7 and max(lens) == 512 and min(lens) >= 1


def test_encoder_shapes_option():
    """--shapes picks the fixed-length encoder batches; a malformed shape is a clear error."""
    args = bench.build_parser().parse_args(["--suite", "encoder", "--shapes", "3x17,1x128"])
    fixed = [bench_cli.parse_shape(x) for x in bench_cli.parse_list(args.shapes)]
    assert fixed == [(3, 17), (1, 128)]
    cases = encoder_suite.encoder_cases(torch.device("cpu"), torch.float32, False, "none", models_list=("minilm",),
                                real_batches={}, fixed=fixed)
    assert [c.params["batch"] for c in cases] == [3, 1] and [c.params["seq"] for c in cases] == [17, 128]
    for bad in ("8", "8x", "0x128", "ax3"):
        with pytest.raises(SystemExit, match="BATCHxSEQ"):
            bench_cli.parse_shape(bad)


def test_host_suite_times_host_us_per_layer_and_per_call():
    """`bertfast bench --suite host`: the encoder forward and MLM step of a 12-layer width-32
    model and one fused-op call, bertfast beside transformers / the public op, host microseconds
    per layer (per call for the op), on the host's clock. Tiny timing plan: seconds."""
    from bertfast.bench import host as host_suite
    from bertfast.bench import suites
    from bertfast.bench.runner import Runner

    assert suites.get("host") is host_suite
    dev = torch.device("cpu")
    tiny = timing.TimingPlan(repeats=3, block_s=0.002, max_s=0.2, warmup=1, host=True)
    cases = [host_suite._encoder_case(dev, torch.float32, 32, train=t, quick=True) for t in (False, True)]
    cases.append(host_suite._op_case(dev, torch.float32, 32, quick=True))
    runner = Runner(dev, tiny, {"copy_gbps": 1.0}, None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a parallel region on a shared machine waits for descheduled threads
    try:
        for case in cases:
            case.plan = tiny
            res = runner.run(case)
            host_suite.finish(case, res, {})
            per = host_suite.LAYERS if res["params"]["kind"] != "op" else 1
            base = "public_op" if per == 1 else "transformers"
            for name in ("bertfast", base):
                v = res["variants"][name]
                assert v["status"] == "ok", (case.name, name, v)
                assert v["host_us"] == pytest.approx(v["median_ms"] * 1e3 / per)
            assert math.isfinite(res["speedup"][base]) and res["speedup"][base] > 0
    finally:
        torch.set_num_threads(threads)
        host_suite.cleanup()


def test_merge_joins_runs(tiny_run, tmp_path):
    """--merge: several runs (one per suite, each with its own flags) as one JSON/markdown set."""
    src, _ = tiny_run
    data = json.loads((src / "bench.json").read_text())
    paths = []
    for suite in ("ops", "encoder"):
        part = dict(data, results=[r for r in data["results"] if r["suite"] == suite], command=f"run {suite}")
        p = tmp_path / f"{suite}.json"
        p.write_text(json.dumps(part))
        paths.append(str(p))
    out = bench.run(["--merge", ",".join(paths), "--out", str(tmp_path / "m"), "--no-plots"])
    merged = json.loads((tmp_path / "m" / "bench.json").read_text())
    assert [r["suite"] for r in merged["results"]] == [r["suite"] for r in data["results"] if r["suite"] != "attention"]
    assert [r["command"] for r in merged["runs"]] == ["run ops", "run encoder"]
    md = (tmp_path / "m" / "bench.md").read_text()
    assert "## ops" in md and "## encoder" in md and "## attention" not in md
    assert len(out["results"]) == len(merged["results"])


def test_report_numbers_are_plain_ms_with_sensible_digits(tiny_run):
    from bertfast.bench import report

    assert report.ms_pm(1180.4, 120.2) == "1180 ± 120"  # was "1.18e+03 ± 1.2e+02"
    assert report.ms_pm(0.41234, 0.031) == "0.412 ± 0.031"
    assert report.ms_pm(12.345, 0.5) == "12.3 ± 0.5"
    assert report.num(123456.0, 4) == "123456" and report.num(0.01234, 3) == "0.0123" and report.num(None) == "-"
    import re

    md = (tiny_run[0] / "bench.md").read_text()
    assert not re.search(r"\d(\.\d+)?e[+-]\d", md), "exponent notation in the markdown"


def test_plot_legends_sit_outside_the_bars(tiny_run, tmp_path, monkeypatch):
    """Each legend is drawn below its axes, so it never covers the end of a bar."""
    plt = pytest.importorskip("matplotlib.pyplot")
    from bertfast.bench import report

    data = json.loads((tiny_run[0] / "bench.json").read_text())
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    paths = report.write_plots(data["results"], data, str(tmp_path), "t")
    assert paths and len(figs) == len(paths)
    for fig in figs:
        fig.canvas.draw()
        for ax in fig.axes:
            leg = ax.get_legend()
            assert leg is not None
            assert not leg.get_window_extent().overlaps(ax.get_window_extent()), ax.get_xlabel()


def test_graphs_suite_plans_and_packs_the_same_pairs():
    """The graphs suite's pre-training case trains every variant on the same pairs: packed rows
    (one shape for every step) hold exactly the padded batches' real tokens."""
    from bertfast.bench import graphs
    from bertfast.bench.common import SuiteOptions
    from bertfast.data import IGNORE_INDEX

    cases = graphs.plan_cases(SuiteOptions(device=torch.device("cpu"), dtypes=[torch.float32], quick=True))
    assert [c.params["kind"] for c in cases] == ["serve", "pretrain"]
    assert all("bertfast" in c.variants and "hf_graph" not in c.variants or isinstance(c.variants["hf_graph"], str)
               for c in cases)
    g = torch.Generator().manual_seed(0)
    exs = []
    for i in range(12):
        n = int(torch.randint(5, 60, (), generator=g))
        labels = torch.full((n,), IGNORE_INDEX)
        labels[1] = 7
        exs.append({"input_ids": torch.randint(5, 100, (n,), generator=g),
                    "token_type_ids": torch.zeros(n, dtype=torch.long), "labels": labels,
                    "next_sentence_label": torch.tensor(i % 2)})
    packed, padded, rows = graphs._packed_step_batches(exs, sets=2, per_step=6, budget=64)
    assert {tuple(p["input_ids"].shape) for p in packed} == {(rows, 64)}
    for p, q in zip(packed, padded):
        slots = p["cu_seqlens"].diff().view(rows, -1)[:, :-1]  # every slot but each row's filler
        assert int(slots.sum()) == int(q["attention_mask"].sum())
        assert int((p["next_sentence_label"] != IGNORE_INDEX).sum()) == 6


def test_ops_race_variant_refuses_a_backend_that_cannot_serve():
    """The ops suite's backend_<name> variants force one backend; one that cannot serve the op
    here raises at set-up (reported as skipped) instead of timing the reference fallback."""
    from bertfast import ops

    x, b = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(RuntimeError, match="cuda cannot serve bias_gelu"):
        ops_suite.forced_backend(ops.bias_gelu, "bias_gelu", "cuda", torch.device("cpu"))(x, b)
    out = ops_suite.forced_backend(ops.bias_gelu, "bias_gelu", "reference", torch.device("cpu"))(x, b)
    torch.testing.assert_close(out, ops.bias_gelu_ref(x, b))


def test_plots_of_a_suite_with_no_baseline(tiny_run, tmp_path):
    """A suite where only bertfast ran (every baseline skipped) still plots (no legend), and a
    plot failure never costs the JSON/markdown."""
    pytest.importorskip("matplotlib")
    from bertfast.bench import report

    src, _ = tiny_run
    data = json.loads((src / "bench.json").read_text())
    results = [dict(r, variants={"bertfast": r["variants"]["bertfast"]}, speedup={}) for r in data["results"]
               if r["suite"] == "ops"][:1]
    paths = report.write_plots(results, data, str(tmp_path), "solo")
    assert [os.path.basename(p) for p in paths] == ["solo_ops.png"]
