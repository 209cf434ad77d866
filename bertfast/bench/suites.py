"""The registry of benchmark suites: `--suite NAME` runs the module named here.

A suite is one module of this package that defines:

    NAME          its --suite name
    GRAPHED       True when its CUDA cases also replay variants from CUDA graphs (`<variant>_graph`,
                  compared among themselves as speedup_graph, not with the eager variants)
    PLOT_METRIC   (result key, axis label) of the figure its plot shows per variant
    BASELINE_PACKAGES  optional: the packages its baselines import (names in baselines.PACKAGES),
                  checked before the run: one that is installed but fails to import fails the run
    plan_cases(opts: common.SuiteOptions) -> List[runner.Case]
    finish(case, result, ceilings)   optional: figures known only after the case ran
    cleanup()                        optional: drop what the suite cached between cases

Adding a suite: write the module, add one line to SUITES below. The order of SUITES is the
order suites run in and appear in the reports.
"""
from __future__ import annotations

import importlib
from types import ModuleType

SUITES = {
    "ops": "bertfast.bench.ops",
    "attention": "bertfast.bench.attention",
    "encoder": "bertfast.bench.encoder",
    "host": "bertfast.bench.host",
    "graphs": "bertfast.bench.graphs",
    "st": "bertfast.bench.sentence_transformers",
    "cpu-peers": "bertfast.bench.cpu_peers",
}


def get(name: str) -> ModuleType:
    """The module of suite `name` (imported on first use: a suite's imports stay its own)."""
    if name not in SUITES:
        raise ValueError(f"bench: --suite must be among {tuple(SUITES)}, got {name!r}")
    return importlib.import_module(SUITES[name])


def graphed(name: str) -> bool:
    return name in SUITES and bool(getattr(get(name), "GRAPHED", False))
