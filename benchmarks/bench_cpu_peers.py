"""The cpu-peers comparison with every system alone in a fresh process, alternated, N rounds.

    python benchmarks/bench_cpu_peers.py                                   # every workload, every system
    python benchmarks/bench_cpu_peers.py --workload minilm_full --systems transformers,bertfast,openvino
    python benchmarks/bench_cpu_peers.py --rounds 5 --threads 2 --json out.json

A child process builds one system for one workload (bertfast.bench.cpu_peers.build), warms up
with one call, times --repeats more and reports the median; nothing another system loaded,
allocated or spun up is in its process. Within a round the systems run one after the other, and
each round starts one place further along the list, so a drift in the machine's speed falls on
every system alike. The parent prints, per workload, each system's median time and its speed over
transformers (transformers' time / the system's: > 1 is faster) per round and as the median over
rounds; on the real-text workloads also the quality of each system's sentence vectors against
transformers' (lowest and mean cosine, top-10 neighbour agreement). The in-process suite is
`bertfast bench --suite cpu-peers`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # a source checkout


def child(args) -> None:
    import numpy as np
    import torch

    from bertfast.bench import cpu_peers

    torch.set_num_threads(args.threads)
    # the parent passes one --workload (the option appends, so it arrives as a list of one)
    fn = cpu_peers.build(args.system, args.workload[0])
    out = fn()  # warm-up: exports, compiles, packs, measures the GEMM choice once
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    np.save(args.out, out.float().numpy())
    print(json.dumps({"median_s": statistics.median(times), "times": times}))


def _run_child(system: str, workload: str, args, out: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--system", system, "--workload", workload,
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--out", out]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        lines = (p.stderr or p.stdout).strip().splitlines()
        return {"error": lines[-1][:300] if lines else f"exit {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", action="append", help="minilm_full, base_full, minilm_ragged, embed (repeatable; "
                    "default: all)")
    ap.add_argument("--systems", help="comma-separated (default: every one installed)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per child after its warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write every round's figures here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--system", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    import numpy as np
    import torch

    from bertfast.bench import cpu_peers

    for name, v in (("--rounds", args.rounds), ("--repeats", args.repeats), ("--threads", args.threads)):
        if v < 1:
            ap.error(f"{name} must be >= 1, got {v}")
    workloads = args.workload or list(cpu_peers.WORKLOADS)
    for w in workloads:
        if w not in cpu_peers.WORKLOADS:
            ap.error(f"--workload must be among {cpu_peers.WORKLOADS}, got {w!r}")
    wanted = args.systems.split(",") if args.systems else list(cpu_peers.SYSTEMS)
    if cpu_peers.BASELINE not in wanted:
        wanted.insert(0, cpu_peers.BASELINE)
    report = {"threads": args.threads, "rounds": args.rounds, "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for w in workloads:
            systems = []
            for s in wanted:
                why = cpu_peers.missing(s) if s != "bertfast_tasks" else None
                if s == "torch_compile" and w == "embed":
                    why = "not run end to end"
                if why:
                    print(f"  {w}: {s} skipped: {why}")
                else:
                    systems.append(s)
            rounds = []
            for r in range(args.rounds):
                order = systems[r % len(systems):] + systems[:r % len(systems)]
                res = {}
                for s in order:
                    res[s] = _run_child(s, w, args, os.path.join(tmp, f"{w}-{s}.npy"))
                rounds.append(res)
                base = res.get(cpu_peers.BASELINE, {}).get("median_s")
                line = "  ".join(f"{s} {base / res[s]['median_s']:.2f}x" if base and "median_s" in res[s]
                                 else f"{s} {res[s].get('error', '?')}" for s in systems)
                print(f"{w} round {r + 1}: {line}", flush=True)
            ref_path = os.path.join(tmp, f"{w}-{cpu_peers.BASELINE}.npy")
            summary = {}
            for s in systems:
                ts = [rd[s]["median_s"] for rd in rounds if "median_s" in rd[s]]
                bs = [rd[cpu_peers.BASELINE]["median_s"] / rd[s]["median_s"] for rd in rounds
                      if "median_s" in rd[s] and "median_s" in rd.get(cpu_peers.BASELINE, {})]
                entry = {"median_ms": statistics.median(ts) * 1e3 if ts else None,
                         "vs_transformers": statistics.median(bs) if bs else None, "per_round": bs}
                out_path = os.path.join(tmp, f"{w}-{s}.npy")
                if s != cpu_peers.BASELINE and os.path.exists(out_path) and os.path.exists(ref_path):
                    a, ref = torch.from_numpy(np.load(out_path)), torch.from_numpy(np.load(ref_path))
                    if w.endswith("_full"):
                        entry["max_abs_diff"] = float((a - ref).abs().max())
                    else:
                        entry.update(cpu_peers.quality(a, ref))
                summary[s] = entry
            report["workloads"][w] = summary
            print(f"\n{w} ({args.rounds} rounds, fresh processes, {args.threads} threads): median speed over "
                  f"transformers")
            for s, e in summary.items():
                q = "  ".join(f"{k} {v:.6f}" if isinstance(v, float) else "" for k, v in e.items()
                              if k in ("max_abs_diff", "cos_min", "cos_mean", "top10_agreement"))
                vs = f"{e['vs_transformers']:.2f}x" if e["vs_transformers"] else "-"
                ms = f"{e['median_ms']:.1f} ms" if e["median_ms"] else "-"
                print(f"  {s:16s} {ms:>12s}  {vs:>7s}  {q}")
            print(flush=True)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
