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
