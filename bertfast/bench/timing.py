"""How a call is timed: CPU blocks of torch.utils.benchmark (one variant, or several interleaved
block by block), CUDA events through triton's do_bench; input rotation past the last-level cache,
and CUDA-graph replays of a variant."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .environment import llc_bytes



@dataclass
class Timing:
    median_ms: float
    iqr_ms: float
    q1_ms: float
    q3_ms: float
    n: int
    first_call_s: float  # includes compilation / autotuning / build, for the record


def quantiles(xs: List[float]):
    xs = sorted(xs)

    def q(p):
        k = (len(xs) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return q(0.25), q(0.5), q(0.75)


@dataclass
class TimingPlan:
    """How hard to measure: repeats (median over them), target seconds per CPU block,
    the cap on seconds per measurement, and GPU do_bench's warm-up/repetition windows (ms)."""

    repeats: int = 15
    block_s: float = 0.05
    max_s: float = 3.0
    warmup: int = 2
    gpu_warmup_ms: float = 25.0
    gpu_rep_ms: float = 100.0
    # time with the host's clock, variants interleaved, on every device (CUDA included): for cases
    # whose figure is the host's time per call (the host suite), not the GPU's
    host: bool = False


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, plan: TimingPlan) -> Timing:
    """Median/IQR of fn's run time. fn rotates its own inputs on every call."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    if device.type == "cuda":
        return time_cuda(fn, device, plan, first)
    # warm-up, which also estimates the cost of a call
    t0 = time.perf_counter()
    for _ in range(plan.warmup):
        fn()
    est = max((time.perf_counter() - t0) / max(plan.warmup, 1), 1e-7)
    number = max(1, int(plan.block_s / est))
    # at least 3 blocks, at most `repeats`, and stop near max_s for the slow (end-to-end) cases
    repeats = max(3, min(plan.repeats, int(plan.max_s / (est * number)) or 1))
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    times = [timer.timeit(number).median * 1e3 for _ in range(repeats)]
    q1, med, q3 = quantiles(times)
    return Timing(med, q3 - q1, q1, q3, repeats * number, first)


def time_cuda(fn, device, plan: TimingPlan, first: float) -> Timing:
    # a rough per-call estimate so slow cases (a training step) still get enough repeats
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    sync(device)
    est_ms = (time.perf_counter() - t0) / 3 * 1e3
    warm = max(plan.gpu_warmup_ms, 2 * est_ms)
    rep = min(max(plan.gpu_rep_ms, plan.repeats * est_ms), plan.max_s * 1e3)
    try:
        from triton.testing import do_bench

        times = do_bench(fn, warmup=warm, rep=rep, return_mode="all")
    except ImportError:
        times = cuda_events(fn, warm, rep)
    times = [float(t) for t in times]
    q1, med, q3 = quantiles(times)
    return Timing(med, q3 - q1, q1, q3, len(times), first)


def cuda_events(fn, warm_ms, rep_ms) -> List[float]:
    """CUDA-event timing without triton: flush L2 before each call, as do_bench does."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    for _ in range(max(1, int(warm_ms / est))):
        fn()
    n = max(5, int(rep_ms / est))
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in ev:
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in ev]


def n_input_sets(set_bytes: int, device: torch.device, cap: int = 8) -> int:
    """How many input sets to rotate so that the rotation does not fit in the last-level
    cache (2x its size; at least 2 sets, at most `cap`)."""
    if device.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or (50 << 20)
    else:
        cache = min(llc_bytes(), 64 << 20)  # VMs report the host's whole L3; 64 MB bounds memory use
    return int(max(2, min(cap, math.ceil(2 * cache / max(set_bytes, 1)))))


class Rotate:
    """fn(*inputs[i]) for i = 0, 1, 2, ... modulo the number of input sets."""

    def __init__(self, fn, sets):
        self.fn, self.sets, self.i = fn, sets, 0

    def __call__(self):
        s = self.sets[self.i % len(self.sets)]
        self.i += 1
        return self.fn(*s)


def time_cpu_interleaved(ready: dict, plan: TimingPlan, Timer, ests: dict,
                          deadline: Optional[float] = None) -> Dict[str, Timing]:
    """Block-interleaved CPU timing of several variants; median and IQR over each one's blocks.
    ests: seconds per call from the warm-up (measured again here where missing)."""
    ests = dict(ests)
    for vname, fn in ready.items():
        if not ests.get(vname):
            t0 = time.perf_counter()
            fn()
            ests[vname] = time.perf_counter() - t0
        ests[vname] = max(ests[vname], 1e-7)
    numbers = {v: max(1, int(plan.block_s / e)) for v, e in ests.items()}
    round_s = sum(ests[v] * numbers[v] for v in ready)
    repeats = max(3, min(plan.repeats, int(plan.max_s * len(ready) / round_s) or 1))
    timers = {v: Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
              for v, fn in ready.items()}
    times: Dict[str, List[float]] = {v: [] for v in ready}
    for r in range(repeats):
        if r >= 2 and deadline is not None and time.time() > deadline:
            break  # the suite's time budget is spent: keep the rounds measured so far (at least 2)
        for v, timer in timers.items():
            times[v].append(timer.timeit(numbers[v]).median * 1e3)
    out = {}
    for v, ts in times.items():
        q1, med, q3 = quantiles(ts)
        out[v] = Timing(med, q3 - q1, q1, q3, len(ts) * numbers[v], 0.0)
    return out


def peak_memory_mb(fn, device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20

def capture(fn):
    """fn captured in a CUDA graph (after two warm-up calls on a side stream, outside the capture:
    compilation, autotuning, allocator growth); returns the graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def graph_replay_ms(fn) -> float:
    """Median ms of fn replayed from a CUDA graph: kernel time without host time
    (triton.testing.do_bench, L2 flushed between replays)."""
    from triton.testing import do_bench

    return float(do_bench(capture(fn).replay, warmup=10, rep=40, return_mode="median"))


def graphed(factory):
    """A variant factory whose calls are captured once per input set in CUDA graphs and replayed."""
    def graph_factory(meta):
        rot = factory(meta)
        graphs = [(capture(lambda st=st: rot.fn(*st)),) for st in rot.sets]
        meta["cuda_graph"] = True

        def replay(g, _inputs=rot):  # the graphs read rot's input tensors: keep them alive
            g.replay()

        return Rotate(replay, graphs)

    return graph_factory


