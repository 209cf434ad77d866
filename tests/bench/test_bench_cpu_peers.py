"""The cpu-peers bench suite: its plan, the skip reasons of absent engines, and the quality
figures (cosine, top-10 neighbour agreement) it prints."""
import importlib.util

import torch

from bertfast.bench import cpu_peers, suites
from bertfast.bench.common import SuiteOptions


def test_registered_and_planned():
    assert suites.get("cpu-peers") is cpu_peers
    cases = cpu_peers.plan_cases(SuiteOptions(device=torch.device("cpu"), dtypes=[torch.float32], quick=True))
    assert [c.params["workload"] for c in cases] == list(cpu_peers.WORKLOADS)
    for c in cases:
        assert {"transformers", "bertfast"} <= set(c.variants)
    embed = cases[-1]
    assert "bertfast_tasks" in embed.variants and "torch_compile" not in embed.variants
    assert cpu_peers.plan_cases(SuiteOptions(device=torch.device("meta"), dtypes=[torch.float32])) == []


def test_absent_engine_is_a_skip_reason(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert "openvino is not installed" in cpu_peers.missing("openvino")
    cases = cpu_peers.plan_cases(SuiteOptions(device=torch.device("cpu"), dtypes=[torch.float32]))
    assert all(isinstance(c.variants["openvino"], str) for c in cases)


def test_quality_figures():
    torch.manual_seed(0)
    ref = torch.randn(40, 8)
    q = cpu_peers.quality(ref.clone(), ref)
    assert q["cos_min"] > 0.99999 and q["top10_agreement"] == 1.0
    # a permutation of the rows keeps every vector's neighbourhood size but not which rows they are
    shuffled = ref[torch.randperm(40)]
    q = cpu_peers.quality(shuffled, ref)
    assert q["cos_min"] < 0.9 and q["top10_agreement"] < 0.7
    # small noise: cosines near 1, neighbours mostly kept
    q = cpu_peers.quality(ref + 1e-3 * torch.randn(40, 8), ref)
    assert q["cos_min"] > 0.999 and q["top10_agreement"] > 0.9


def _script():
    """benchmarks/bench_cpu_peers.py, imported from its path (benchmarks/ is not a package)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_cpu_peers.py")
    spec = importlib.util.spec_from_file_location("bench_cpu_peers_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fresh_process_child_builds_the_named_workload(monkeypatch, tmp_path, capsys):
    import json

    import numpy as np

    script = _script()
    built = []
    monkeypatch.setattr(cpu_peers, "build", lambda system, workload: built.append((system, workload))
                        or (lambda: torch.ones(2, 3)))
    out = tmp_path / "v.npy"
    script.main(["--child", "--system", "bertfast", "--workload", "minilm_full", "--repeats", "2", "--out", str(out)])
    assert built == [("bertfast", "minilm_full")]
    assert np.load(out).shape == (2, 3)
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(report["times"]) == 2 and report["median_s"] >= 0


def test_fresh_process_parent_alternates_and_reports(monkeypatch, tmp_path):
    import json

    import numpy as np

    script = _script()
    calls = []
    speed = {"transformers": 2.0, "bertfast": 1.0}

    def fake_child(system, workload, args, out):
        calls.append(system)
        np.save(out, np.ones((4, 3), dtype=np.float32))
        return {"median_s": speed[system], "times": [speed[system]]}

    monkeypatch.setattr(script, "_run_child", fake_child)
    report_path = tmp_path / "r.json"
    assert script.main(["--workload", "minilm_full", "--systems", "bertfast", "--rounds", "2",
                        "--json", str(report_path)]) == 0
    # the baseline joins, and the second round starts one place further along
    assert calls == ["transformers", "bertfast", "bertfast", "transformers"]
    entry = json.loads(report_path.read_text())["workloads"]["minilm_full"]["bertfast"]
    assert entry["vs_transformers"] == 2.0 and entry["max_abs_diff"] == 0.0


def test_ragged_batches_come_in_the_texts_order():
    """The ragged workload keeps the sentences' own order (sorting them by length is what the
    embed workload's SentenceTransformer.encode does): its padded batches are mostly padding."""
    import transformers

    texts = cpu_peers.sentences("minilm_ragged")
    tok = transformers.AutoTokenizer.from_pretrained(cpu_peers.model_dir("minilm_ragged"))
    first = cpu_peers.batches("minilm_ragged")[0]
    want = tok(texts[:32], padding=True, truncation=True, max_length=128, return_tensors="pt")
    assert torch.equal(first["input_ids"], want["input_ids"])
    masks = [b["attention_mask"] for b in cpu_peers.batches("minilm_ragged")]
    fill = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert fill < 0.6
