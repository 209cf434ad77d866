"""`bertfast bench`: flags, defaults, per-suite time budgets, the driver loop, --render and --merge."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

from . import suites as registry
from .baselines import IMPORT_ERROR, NOT_INSTALLED, check_packages, import_errors
from .ceilings import measure_ceilings
from .common import DTYPES, NORM_OPS, SUBJECT, SuiteOptions, dtype_name, reason
from .environment import environment
from .report import merge, num, print_table, render, save
from .runner import Runner
from .timing import TimingPlan



def parse_list(s, conv=str):
    return [conv(x) for x in str(s).split(",") if x.strip()]


def parse_shape(text: str) -> Tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise SystemExit(f"bertfast bench: --shapes takes BATCHxSEQ with positive integers, e.g. 8x128; got {text!r}")
    return int(parts[0]), int(parts[1])


def build_parser():
    from ..cli import HelpFormatter

    p = argparse.ArgumentParser(prog="bertfast bench", formatter_class=HelpFormatter,
                                description="one harness for the op, attention and encoder benchmarks")
    p.add_argument("--suite", default="ops,attention,encoder",
                   help="comma list of ops, attention, encoder, host (host time per layer and per op call), st "
                        "(SentenceTransformer.encode plain vs bertfast.accelerate), cpu-peers (bertfast fp32/bf16/"
                        "int8 against transformers, torch.compile, ONNX Runtime, OpenVINO, CTranslate2 on CPU); "
                        "host, st and cpu-peers are not in the default")
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
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats: a few minutes on a CPU")
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
    p.add_argument("--skip", default=None, help="variants not to run (comma list, e.g. bertfast_ref,hf_compile; "
                                                "SUITE:VARIANT for one suite only); reported as skipped")
    p.add_argument("--merge", default=None, metavar="JSON,JSON",
                   help="measure nothing: merge earlier runs' JSON files (comma list) into --out/--prefix")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="measure nothing: rewrite the markdown and plots of an earlier run's JSON beside it")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def _defaults(args, device):
    cuda = device.type == "cuda"
    q = args.quick
    dtypes = parse_list(args.dtype) if args.dtype else (["bf16"] if cuda else (["fp32"] if q else ["fp32", "bf16"]))
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"bench: --dtype must be among {sorted(DTYPES)}, got {d!r}")
    dtypes = [DTYPES[d] for d in dtypes]
    tokens = parse_list(args.tokens, int) if args.tokens else (
        ([4096, 32768] if not q else [32768]) if cuda else ([2048] if q else [8192]))
    hidden = parse_list(args.hidden, int) if args.hidden else (
        ([384, 768, 1024, 4096] if not q else [768, 4096]) if cuda else ([768] if q else [384, 768, 1024]))
    sizes = parse_list(args.sizes, int) if args.sizes else ([128, 256, 512] if (cuda or not q) else [128])
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
            vals = parse_list(spec, float)
            for i, s in enumerate(suites):
                self.per[s] = vals[i] if i < len(vals) else vals[-1]

    total_deadline: Optional[float] = None

    def deadline(self, suite):
        d = time.time() + self.per[suite] if suite in self.per else None
        if self.total_deadline is not None:
            d = self.total_deadline if d is None else min(d, self.total_deadline)
        return d


def run(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.render:
        return render(args.render, plots=not args.no_plots)
    if args.merge:
        return merge(parse_list(args.merge), args.out, args.prefix, plots=not args.no_plots)
    threads_note = set_threads(args.threads)
    dev_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev_name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda asked for, but torch sees no CUDA device")
    device = torch.device(dev_name)
    suite_names = parse_list(args.suite)
    for s in suite_names:
        if s not in registry.SUITES:
            raise SystemExit(f"bench: --suite must be among {tuple(registry.SUITES)}, got {s!r}")
    dtypes, tokens, hidden, sizes, compile_mode, plan = _defaults(args, device)
    models_list = parse_list(args.models)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    t_start = time.time()
    print(f"bench: device {device}, dtypes {[dtype_name(d) for d in dtypes]}, threads {torch.get_num_threads()} "
          f"({threads_note}), "
          f"suites {suite_names}{' (quick)' if args.quick else ''}", flush=True)

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
    meta["baseline_packages"] = check_packages(suite_names)
    for p in meta["baseline_packages"]:
        if p["status"] == IMPORT_ERROR:
            print(f"bench: ERROR: {p['package']} is installed but fails to import, so the {', '.join(p['suites'])} "
                  f"baselines that need it cannot run (the run goes on and exits non-zero): {p['reason']}",
                  flush=True)
        elif p["status"] == NOT_INSTALLED:
            print(f"bench: note: {p['reason']}; the {', '.join(p['suites'])} comparisons that need it are left out",
                  flush=True)
    meta["kernels_ready_s"] = prepare_kernels(device, dtypes)
    meta["ceilings"] = measure_ceilings(device, dtypes, plan, args.quick)
    c = meta["ceilings"]
    print(f"bench: ceilings: copy {num(c['copy_gbps'])} GB/s, matmul "
          + ", ".join(f"{k} {num(v)} TFLOP/s" for k, v in c["matmul_tflops"].items()), flush=True)

    opts = SuiteOptions(device=device, dtypes=dtypes, quick=args.quick, compile_mode=compile_mode, tokens=tokens,
                        hidden=hidden, ops=tuple(parse_list(args.ops)), sizes=sizes, models=tuple(models_list),
                        shapes=[parse_shape(x) for x in parse_list(args.shapes)] if args.shapes else None,
                        text_batches=({k: int(v) for k, v in (x.split("=") for x in parse_list(args.text_batches))}
                                      if args.text_batches else None),
                        train=args.train)
    plans: Dict[str, list] = {s: registry.get(s).plan_cases(opts) for s in registry.SUITES if s in suite_names}
    if args.filter:
        subs = parse_list(args.filter)
        plans = {k: [c for c in cs if any(x in c.name for x in subs)] for k, cs in plans.items()}
    if args.skip:
        for suite, cs in plans.items():
            for c in cs:
                for v in parse_list(args.skip):
                    if ":" in v:  # SUITE:VARIANT skips the variant in that suite only
                        only, v = v.split(":", 1)
                        if only != suite:
                            continue
                    if v in c.variants and v != SUBJECT:
                        c.variants[v] = "not run: --skip"
    total = sum(len(c.variants) for cs in plans.values() for c in cs)
    quick_cpu_default = args.budget is None and args.quick and device.type == "cpu"
    if quick_cpu_default:
        # keeps `make bench` under 5 minutes even on a slow or shared machine: what does not fit is
        # reported as skipped ("time budget"), never silently dropped
        args.budget = "90,45,100"
    meta["budget_s"] = args.budget
    budget = _Budget(args.budget, list(plans))
    if quick_cpu_default:
        # whatever the suites' shares: 5 minutes with startup and plots, counted from the end of the
        # one-time kernel build (prepare_kernels), which a first run on a machine adds on top
        budget.total_deadline = t_start + 235 + meta["kernels_ready_s"]
    results: List[dict] = []
    progress = _progress(total, args.no_progress)
    runner = Runner(device, plan, meta["ceilings"], None, progress)
    out_paths = {}
    try:
        for suite, cases in plans.items():
            mod = registry.get(suite)
            runner.deadline = budget.deadline(suite)
            runner.soft_deadline = None
            if runner.deadline is not None:
                runner.soft_deadline = time.time() + (runner.deadline - time.time()) / 2
            for case in cases:
                if progress is not None:
                    progress.set_description(case.name[:40])
                res = runner.run(case)
                if hasattr(mod, "finish"):
                    mod.finish(case, res, meta["ceilings"])
                results.append(res)
                meta["elapsed_s"] = round(time.time() - t_start, 1)
                save(results, meta, args.out, args.prefix, plots=False)  # partial results survive a kill
    except KeyboardInterrupt:
        print("\nbench: interrupted; writing what was measured", file=sys.stderr)
        meta["interrupted"] = True
    finally:
        if progress is not None:
            progress.close()
        for suite in plans:
            getattr(registry.get(suite), "cleanup", lambda: None)()
        meta["elapsed_s"] = round(time.time() - t_start, 1)
        out_paths = save(results, meta, args.out, args.prefix, plots=not args.no_plots)
    print_table(results, meta=meta)
    print(f"\nbench: {len(results)} cases in {meta['elapsed_s']:.0f} s -> {out_paths.get('json')}, "
          f"{out_paths.get('markdown')}, {len(out_paths.get('plots', []))} plot(s)", flush=True)
    return {"results": results, "meta": meta, "paths": out_paths}


def set_threads(spec) -> str:
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


def prepare_kernels(device, dtypes) -> float:
    """One tiny forward and backward of every fused op on a CPU, before any time budget starts:
    the first call on a new machine builds the C++ CPU kernels (a minute or more, with its own
    progress line), and that one-time cost would otherwise be charged to the first suite's budget
    and push its cases and compile baselines out. Returns the seconds spent; a failure is left to
    the cases, which report it. Nothing on a GPU: Triton compiles per tile configuration, so tiny
    calls would compile kernels no case uses (gpu_check.sh builds the CUDA extension itself)."""
    from .. import ops

    if device.type != "cpu":
        return 0.0
    t0 = time.time()
    print("bench: preparing the kernels (a first run on this machine builds them once)", flush=True)
    gen = torch.Generator().manual_seed(0)
    for dt in dtypes:
        def r(*shape):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dt).requires_grad_(True)

        x, b, res, w, lb = r(4, 64), r(64), r(4, 64), r(64), r(64)
        ids = torch.tensor([[1, 2, 3, 4]], device=device)
        q, k, v = r(1, 4, 2, 32), r(1, 4, 2, 32), r(1, 4, 2, 32)
        calls = [lambda: ops.bias_gelu(x, b), lambda: ops.bias_residual_layernorm(x, b, res, w, lb, 1e-12),
                 lambda: ops.gelu_layernorm(x, b, w, lb, 1e-12),
                 lambda: ops.embedding_layernorm(ids, torch.zeros_like(ids), torch.arange(4, device=device)[None],
                                                 r(8, 64), r(8, 64), r(2, 64), w, lb, 1e-12),
                 lambda: ops.attention(q, k, v)]
        for call in calls:
            try:
                call().float().sum().backward()
            except Exception as e:  # noqa: BLE001 - the cases meet the same failure and report it
                print(f"bench: preparing the kernels: {reason(e)}", file=sys.stderr, flush=True)
    dt_s = time.time() - t0
    print(f"bench: kernels ready in {dt_s:.1f} s (not charged to any suite's time budget)", flush=True)
    return round(dt_s, 1)


def cli_main(cmd="bench", argv=None) -> int:
    signal.signal(signal.SIGTERM, _sigterm)
    out = run(argv)
    broken = import_errors(out["meta"])
    if broken:
        print("bench: exit status 1: promised baselines failed to import: "
              + "; ".join(f"{p['package']}: {p['reason']}" for p in broken), file=sys.stderr, flush=True)
        return 1
    return 1 if out["meta"].get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(cli_main("bench", sys.argv[1:]))
