"""A benchmark case (the same work done by several variants) and the runner that sets every
variant up, times them side by side and turns times into figures and speedups."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from .common import COPY, SUBJECT, reason
from .timing import Timing, TimingPlan, peak_memory_mb, sync, time_cpu_interleaved, time_cuda



@dataclass
class Case:
    """One benchmark point: the same work done by several variants (bertfast and baselines).

    variants maps a name to a factory `(meta) -> fn` (fn() does one rotated call; meta is a
    dict the factory may annotate, e.g. which backend served) or to a string: why that
    variant is skipped here."""

    suite: str
    name: str
    params: dict
    variants: Dict[str, object]
    bytes: Optional[float] = None  # fewest bytes the work must move (memory-bound figures)
    flops: Optional[float] = None  # useful FLOPs (compute-bound figures)
    tokens: Optional[int] = None  # real (non-padding) tokens per call
    dtype: Optional[str] = None
    peak_memory: bool = False  # also record the peak device memory of one call (CUDA)
    plan: Optional[TimingPlan] = None
    extra: dict = field(default_factory=dict)
    graphed: bool = False  # `<variant>_graph` variants are CUDA-graph replays, compared among themselves


class Runner:
    """Runs a Case: sets every variant up (first call, warm-up), then times them.

    On CPU the variants are timed interleaved, block by block (A B C A B C ...), so a change
    in the load from other processes during the case hits every variant alike and the ratios
    stay meaningful on a shared machine. On CUDA each variant is timed in turn with do_bench."""

    def __init__(self, device, plan: TimingPlan, ceilings: dict, deadline: Optional[float], progress=None):
        self.device, self.plan, self.ceilings = device, plan, ceilings
        self.deadline = deadline
        self.soft_deadline: Optional[float] = None
        self.progress = progress

    def run(self, case: Case) -> dict:
        res = {"suite": case.suite, "name": case.name, "params": case.params, "dtype": case.dtype,
               "bytes": case.bytes, "flops": case.flops, "tokens": case.tokens, "variants": {}, **case.extra}
        plan = case.plan or self.plan
        ready = {}
        self._est = {}
        for vname, factory in case.variants.items():
            out, fn = self._setup(vname, factory, plan)
            res["variants"][vname] = out
            if fn is not None:
                ready[vname] = fn
        try:
            timings = self._measure(ready, plan)
            for vname, t in timings.items():
                res["variants"][vname].update(self._figures(case, t, ready[vname]))
        finally:
            ready.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if self.progress is not None:
            self.progress.update(len(case.variants))
        subj = res["variants"].get(SUBJECT, {})
        res["speedup"] = {}
        graphed = case.graphed
        if subj.get("status") == "ok":
            for vname, v in res["variants"].items():
                if vname not in (SUBJECT, COPY) and v.get("status") == "ok" and not (
                        graphed and vname.endswith("_graph")):
                    res["speedup"][vname] = v["median_ms"] / subj["median_ms"]
            cp = res["variants"].get(COPY, {})
            if cp.get("status") == "ok":
                for v in res["variants"].values():
                    if v.get("status") == "ok":
                        v["frac_copy_bw_interleaved"] = cp["median_ms"] / v["median_ms"]
        sg = res["variants"].get(SUBJECT + "_graph", {})
        if graphed and sg.get("status") == "ok":
            res["speedup_graph"] = {k[:-len("_graph")]: v["median_ms"] / sg["median_ms"]
                                    for k, v in res["variants"].items()
                                    if k.endswith("_graph") and k != SUBJECT + "_graph" and v.get("status") == "ok"}
        return res

    def _setup(self, vname, factory, plan):
        if isinstance(factory, str):  # left out when the case was planned (a flag, the device)
            return {"status": "skipped", "reason": factory, "planned": True}, None
        if self.deadline is not None and time.time() > self.deadline:
            return {"status": "skipped", "reason": "time budget of this suite used up"}, None
        if "compile" in vname and self.soft_deadline is not None and time.time() > self.soft_deadline:
            # compiling costs tens of seconds each: past half the budget they make way for the rest
            return {"status": "skipped", "reason": "time budget: compile baselines dropped past half of it"}, None
        meta: dict = {}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                fn = factory(meta)
                fn()  # first call: compilation, autotuning, extension build, lazy init
                sync(self.device)
                meta["first_call_s"] = round(time.perf_counter() - t0, 3)
                if self.device.type == "cpu" or plan.host:
                    t0 = time.perf_counter()
                    for _ in range(plan.warmup):
                        fn()
                    # no warm-up (the slow end-to-end cases): the first call is the estimate
                    self._est[vname] = ((time.perf_counter() - t0) / plan.warmup if plan.warmup
                                        else meta["first_call_s"])
            return {"status": "pending", **meta}, fn
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run here is reported, not fatal
            return {"status": "skipped" if vname != SUBJECT else "error", "reason": reason(e), **meta}, None

    def _measure(self, ready: dict, plan: TimingPlan) -> Dict[str, Timing]:
        if not ready:
            return {}
        out = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.device.type == "cuda" and not plan.host:
                for vname, fn in ready.items():
                    try:
                        out[vname] = time_cuda(fn, self.device, plan, 0.0)
                    except Exception as e:  # noqa: BLE001
                        out[vname] = e
                return out
            from torch.utils.benchmark import Timer

            return time_cpu_interleaved(ready, plan, Timer, self._est, self.deadline)

    def _figures(self, case: Case, t, fn) -> dict:
        if isinstance(t, Exception):
            return {"status": "error", "reason": reason(t)}
        out = {"status": "ok", "median_ms": t.median_ms, "iqr_ms": t.iqr_ms, "q1_ms": t.q1_ms, "q3_ms": t.q3_ms,
               "n": t.n}
        sec = t.median_ms * 1e-3
        if case.bytes:
            out["gbps"] = case.bytes / sec / 1e9
            out["frac_copy_bw"] = out["gbps"] / self.ceilings["copy_gbps"]
        if case.flops:
            out["tflops"] = case.flops / sec / 1e12
            mm = self.ceilings.get("matmul_tflops", {}).get(case.dtype or "fp32")
            if mm:
                out["frac_matmul"] = out["tflops"] / mm
        if case.tokens:
            out["tokens_per_s"] = case.tokens / sec
        if case.peak_memory and self.device.type == "cuda":
            out["peak_memory_mb"] = peak_memory_mb(fn, self.device)
        return out


