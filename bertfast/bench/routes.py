"""Routing tables from a GPU run: which implementation served each case faster, as data for
bertfast/dispatch/routing.py.

    python -m bertfast.bench.routes RESULTS/bench.json [--table attention|layernorm_family]
                                    [--out bertfast/dispatch/routing_tables]

Attention (an "op"-level table: PyTorch's kernels as rows of bertfast/dispatch/table.py): for every CUDA attention case
of the run, bertfast's own kernel (`bertfast_triton_graph`, or `bertfast_graph` in runs made before
routing existed) against the PyTorch kernel a route would call (`sdpa_graph` for the padded
layout: PyTorch's own choice of SDPA backend; `varlen_attn_graph` for varlen), both replayed from
CUDA graphs so the figures are kernel time, not host time. Each measured (direction, dtype,
head_dim, layout, sequence length) becomes an entry naming the faster one, so every bucket is
explicit: a call is served by the smallest measured bucket that holds it (head_dim <= width,
length <= max_seq) and by bertfast's kernel past the longest measured length. Nothing is written
for cases the run did not measure.

LayerNorm family (a "call"-level table: the auto backend's per-pass choice, bertfast/dispatch/core.py):
the ops suite times the Triton kernels and the CUDA C++ extension each forced (`backend_triton`,
`backend_cuda`, and their `_graph` replays, preferred: kernel time). Per (op, dtype, hidden) the
largest token count decides; a forward is its fwd case, a backward its fwd+bwd case minus its fwd
case; CUDA C++ replaces Triton where it is faster by more than MARGIN (noise does not flip a case).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from .common import NORM_OPS

ROUTE_OF_LAYOUT = {"padded": ("sdpa", "sdpa_graph"), "varlen": ("varlen_attn", "varlen_attn_graph")}


def _ms(variants: dict, name: str) -> Optional[float]:
    v = variants.get(name, {})
    return v.get("median_ms") if v.get("status") == "ok" else None


def attention_table(data: dict, source_path: str) -> dict:
    env = data.get("environment", {})
    if env.get("device_type") != "cuda":
        raise ValueError(f"{source_path}: not a GPU run (device_type {env.get('device_type')!r})")
    best: dict = {}
    for r in data["results"]:
        if r.get("suite") != "attention":
            continue
        prm, v = r["params"], r["variants"]
        ours = _ms(v, "bertfast_triton_graph") or _ms(v, "bertfast_graph")
        route, key = ROUTE_OF_LAYOUT[prm["layout"]]
        theirs = _ms(v, key)
        if ours is None or theirs is None:
            continue
        k = ("fwd+bwd" if prm["pass"] == "fwd+bwd" else "fwd", r["dtype"], int(prm["head_dim"]), prm["layout"],
             int(prm["seq"]))
        # several head counts per bucket: keep the case least favourable to the route
        ratio = theirs / ours
        if k not in best or ratio > best[k][0]:
            best[k] = (ratio, ours, theirs, route, r["name"])
    entries = []
    for (direction, dtype, hd, layout, seq), (ratio, ours, theirs, route, name) in sorted(best.items()):
        entries.append({"op": "attention", "direction": direction, "dtype": dtype, "max_width": hd, "layout": layout,
                        "max_seq": seq, "backend": route if theirs < ours else "triton",
                        "measured": {"triton_us": round(ours * 1e3, 1), f"{route}_us": round(theirs * 1e3, 1),
                                     "case": name}})
    return {
        "table": "attention",
        "level": "op",
        "ops": ["attention"],
        "candidates": ["triton", "sdpa", "varlen_attn"],
        "default": "triton",
        "source": {"device": env.get("device"), "date": str(env.get("date", ""))[:10], "torch": env.get("torch"),
                   "triton": env.get("triton"), "commit": env.get("git_commit"), "results": source_path},
        "entries": entries,
    }


MARGIN = 0.03  # CUDA C++ replaces Triton only when faster by more than this fraction
NORM_BACKENDS = ("triton", "cuda")


def _backend_ms(variants: dict, backend: str, graph: bool) -> Optional[float]:
    for name in ((f"backend_{backend}_graph", f"backend_{backend}") if graph else (f"backend_{backend}",)):
        if _ms(variants, name) is not None:
            return _ms(variants, name)
    return None


def layernorm_family_table(data: dict, source_path: str, graph: bool = True, margin: float = MARGIN) -> dict:
    """The Triton / CUDA C++ routing table of the LayerNorm-family ops from a GPU run (see the top)."""
    env = data.get("environment", {})
    if env.get("device_type") != "cuda":
        raise ValueError(f"{source_path}: not a GPU run (device_type {env.get('device_type')!r})")
    times: dict = {}  # (op, dtype, hidden) -> {pass: (tokens, {backend: ms})}
    for r in data["results"]:
        prm = r.get("params", {})
        if r.get("suite") != "ops" or prm.get("op") not in NORM_OPS:
            continue
        ms = {b: _backend_ms(r["variants"], b, graph) for b in NORM_BACKENDS}
        if any(v is None for v in ms.values()):
            continue
        slot = times.setdefault((prm["op"], r["dtype"], int(prm["hidden"])), {})
        if int(prm["tokens"]) >= slot.get(prm["pass"], (-1, None))[0]:
            slot[prm["pass"]] = (int(prm["tokens"]), ms)
    entries = []
    for (op, dtype, hidden), slot in sorted(times.items()):
        if "fwd" not in slot:
            continue
        tokens, fwd = slot["fwd"]
        per_dir = {"fwd": fwd}
        if slot.get("fwd+bwd", (None,))[0] == tokens:
            per_dir["bwd"] = {b: slot["fwd+bwd"][1][b] - fwd[b] for b in NORM_BACKENDS}
        for direction, ms in per_dir.items():
            best = "cuda" if ms["cuda"] < (1 - margin) * ms["triton"] else "triton"
            entries.append({"op": op, "direction": direction, "dtype": dtype, "max_width": hidden, "backend": best,
                            "measured": {**{f"{b}_us": round(v * 1e3, 1) for b, v in ms.items()},
                                         "tokens": tokens}})
    return {
        "table": "layernorm_family",
        "ops": list(NORM_OPS),
        "candidates": list(NORM_BACKENDS),
        "default": "triton",
        "source": {"device": env.get("device"), "date": str(env.get("date", ""))[:10], "torch": env.get("torch"),
                   "triton": env.get("triton"), "commit": env.get("git_commit"), "results": source_path}
        if entries else None,
        "entries": entries,
    }


TABLES = {"attention": attention_table, "layernorm_family": layernorm_family_table}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bertfast.bench.routes", description=__doc__.split("\n\n")[0])
    p.add_argument("bench_json", help="bench.json of a GPU run (bertfast bench --device cuda)")
    p.add_argument("--table", choices=sorted(TABLES), default="attention", help="which table (default attention)")
    p.add_argument("--out", default=None, help="folder to write <table>.json into (default: print it)")
    args = p.parse_args(argv)
    with open(args.bench_json, encoding="utf-8") as f:
        data = json.load(f)
    table = TABLES[args.table](data, os.path.relpath(args.bench_json))
    text = json.dumps(table, indent=1) + "\n"
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"{args.table}.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"routes: {len(table['entries'])} {args.table} entries -> {path}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
