"""A benchmark never drops a promised baseline quietly: a transformers that is installed but fails
to import is named at the top of the terminal table and of bench.md, and `bertfast bench` exits
non-zero; a transformers that is simply not installed is a note and the run exits 0. One tiny
encoder case (2 x 8 tokens, a 2-layer model) each."""
import json
import os
import subprocess
import sys

from bertfast.bench import baselines
from bertfast.bench import cli as bench_cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLASH = "cannot import name 'CUDAProperties' from 'kernels' (a stand-in for a broken install)"


def _args(out):
    return ["--suite", "encoder", "--device", "cpu", "--quick", "--dtype", "fp32", "--models", "tiny",
            "--shapes", "2x8", "--text-batches", "tiny=0", "--compile", "none", "--repeats", "3", "--threads", "1",
            "--budget", "600", "--out", str(out), "--no-plots", "--no-progress"]


def test_bench_names_a_baseline_that_fails_to_import_and_exits_nonzero(tmp_path):
    # a `transformers` that is found but raises on import, first on the path: what a release
    # that clashes with another installed package looks like to the benchmark
    fake = tmp_path / "shim" / "transformers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"raise ImportError({CLASH!r})\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "shim"), ROOT]))
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bertfast", "bench", *_args(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("NOT MEASURED"):]
    assert "transformers (ERROR, import error; used by the encoder suite)" in table and CLASH in table
    assert "encoder hf_sdpa: not measured in 1 of 1 case" in table
    assert table.index("transformers (ERROR") < table.index("[encoder]")  # above the figures
    head = (out / "bench.md").read_text().splitlines()[:6]
    assert any("transformers (ERROR, import error" in line and CLASH in line for line in head), head
    assert "failed to import" in proc.stderr and CLASH in proc.stderr
    data = json.loads((out / "bench.json").read_text())
    (case,) = data["results"]
    assert case["variants"]["bertfast"]["status"] == "ok"  # what can run is still measured
    assert case["variants"]["hf_sdpa"]["status"] == "skipped"


def test_bench_notes_a_baseline_package_that_is_not_installed(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` sees when absent
    assert baselines.probe("transformers")[0] == baselines.NOT_INSTALLED
    assert bench_cli.cli_main("bench", _args(tmp_path)) == 0
    printed = capsys.readouterr().out
    assert "note: transformers is not installed" in printed
    head = (tmp_path / "bench.md").read_text().splitlines()[:6]
    assert any("transformers (not installed; used by the encoder suite)" in line for line in head), head
    assert not any("ERROR" in line for line in head)


def test_planned_skips_are_not_listed_as_missing():
    results = [{"suite": "attention", "name": "a", "variants": {
        "bertfast": {"status": "ok"}, "compile_ref": {"status": "skipped", "reason": "not run: --compile none"},
        "sdpa_cudnn": {"status": "skipped", "reason": "CUDA-only SDPA backend", "planned": True},
        "eager_ref": {"status": "skipped", "reason": "time budget of this suite used up"}}}]
    assert baselines.not_measured(results, {}) == [
        "attention eager_ref: not measured in 1 of 1 case: time budget of this suite used up"]


def test_first_run_kernel_build_is_not_charged_to_the_budgets(tmp_path, monkeypatch, one_thread):
    """`make bench` on a new machine: the one-time C++ build happens before the budgets start, so
    a build longer than the whole quick run's 5-minute cap still leaves every case measured. The
    build is simulated by a clock that jumps 300 s while the kernels are prepared."""
    import time as real_time
    import types

    from bertfast.bench import runner as runner_mod
    from bertfast.bench import timing as timing_mod

    offset = [0.0]
    clock = types.SimpleNamespace(time=lambda: real_time.time() + offset[0], perf_counter=real_time.perf_counter,
                                  sleep=real_time.sleep)
    for mod in (bench_cli, runner_mod, timing_mod):
        monkeypatch.setattr(mod, "time", clock)

    def slow_first_build(device, dtypes):
        offset[0] += 300.0
        return 300.0

    monkeypatch.setattr(bench_cli, "prepare_kernels", slow_first_build)
    # no --budget: the quick CPU defaults (per-suite shares and the 235 s cap) apply
    out = bench_cli.run(["--suite", "ops", "--device", "cpu", "--quick", "--dtype", "fp32", "--tokens", "64",
                         "--hidden", "32", "--ops", "bias_gelu", "--compile", "none", "--repeats", "3", "--threads", "1",
                         "--out", str(tmp_path), "--no-plots", "--no-progress"])
    assert out["meta"]["kernels_ready_s"] == 300.0
    assert len(out["results"]) == 2
    for r in out["results"]:
        assert r["variants"]["bertfast"]["status"] == "ok", r["variants"]["bertfast"]
        assert r["variants"]["eager_ref"]["status"] == "ok", r["variants"]["eager_ref"]
