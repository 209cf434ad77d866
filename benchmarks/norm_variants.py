"""Where the LayerNorm-family Triton kernels lose bandwidth: every op at the target shapes under
alternative tilings, and stage-dropping comparisons, timed on the GPU from CUDA graphs.

    python benchmarks/norm_variants.py [--out DIR] [--budget 120] [--dry-run]

For each op (embedding_layernorm, bias_gelu, bias_residual_layernorm, gelu_layernorm) at
32768 x 768 (bias_gelu also at 32768 x 3072, the FFN width), bf16, forward and forward+backward,
it times the launcher's own configuration and the alternatives (rows per program x warps for the
row kernels, BLOCK_M x BLOCK_N x warps for bias_gelu), each as a fraction of a device copy of the
same bytes timed the same way. The configuration functions are swapped in the op's kernel module
for one timing, so nothing else changes. Stage-dropping comparisons come from the ops themselves:
gelu_layernorm vs bias_residual_layernorm forward (the GELU's cost on a LayerNorm row), bias_gelu
vs a copy (GELU alone). Writes norm_variants.{json,md} to --out; prints one line per (op, shape,
pass): default, best, copy.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bertfast.bench.timing import graph_replay_ms  # noqa: E402

OPS = ("bias_residual_layernorm", "gelu_layernorm", "embedding_layernorm", "bias_gelu")
# BERT's widths: the LayerNorms run at the hidden size, bias_gelu at the FFN's intermediate size too
SHAPES = {"bias_gelu": ((32768, 768), (32768, 3072))}
DEFAULT_SHAPES = ((32768, 768),)


def row_variants(n: int):
    """(BLOCK_N, ROWS, num_warps) alternatives for the LayerNorm-family row kernels at width n."""
    from bertfast.kernels._layernorm import block_n

    bn = block_n(n)
    out = []
    for rows in (1, 2, 4, 8, 16):
        for warps in (4, 8, 16):
            if rows * bn > 16384 or rows * bn < 32 * warps * 2:  # registers / at least 2 elements a thread
                continue
            out.append((bn, rows, warps))
    return out


def gelu_variants(n: int):
    import triton

    bn_max = min(triton.next_power_of_2(n), 4096)
    out = []
    for bn in sorted({min(bn_max, b) for b in (256, 512, 1024, 2048, 4096)}):
        for bm in (1, 2, 4, 8, 16):
            for warps in (4, 8):
                if 1024 <= bm * bn <= 8192:
                    out.append((bm, bn, warps))
    return out


def _op_fn(op, tokens, hidden, backward):
    from bertfast import dispatch
    from bertfast.bench.ops import op_call, op_fns, op_inputs

    gen = torch.Generator(device="cuda").manual_seed(0)
    args, diff = op_inputs(op, tokens, hidden, torch.bfloat16, "cuda", gen, backward)
    fast, _ = op_fns(op)
    dout = None
    if backward:
        shape = (tokens // 128, 128, hidden) if op == "embedding_layernorm" else (tokens, hidden)
        dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    call = op_call(fast, backward)

    def fn():
        with dispatch.use_backend("triton"):
            return call(args, diff, dout)

    return fn


def _copy_ms(nbytes):
    n = max(1, int(nbytes / 2 / 4))
    a, b = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    return graph_replay_ms(lambda: b.copy_(a))


def measure(op, tokens, hidden, backward):
    import importlib

    from bertfast.bench.ops import op_bytes

    km = importlib.import_module(f"bertfast.kernels.{op}")
    nbytes = op_bytes(op, tokens, hidden, torch.bfloat16, backward)
    rec = {"op": op, "tokens": tokens, "hidden": hidden, "pass": "fwd+bwd" if backward else "fwd", "bytes": nbytes,
           "copy_us": _copy_ms(nbytes) * 1e3, "variants": []}
    fn = _op_fn(op, tokens, hidden, backward)
    rec["default_us"] = graph_replay_ms(fn) * 1e3
    if op == "bias_gelu":
        names, variants = ("config",), [((v,), v) for v in gelu_variants(hidden)]
    else:
        # the forward and backward row kernels take their tiling from separate functions: vary the
        # forward's in a forward timing, the backward's in a forward+backward one
        names = ("bwd_config",) if backward else ("fwd_config",)
        variants = [((v,), v) for v in row_variants(hidden)]
    for _, v in variants:
        saved = {n: getattr(km, n) for n in names}
        try:
            for n in names:
                setattr(km, n, lambda width, v=v: v)
            us = graph_replay_ms(_op_fn(op, tokens, hidden, backward)) * 1e3
            rec["variants"].append({"config": list(v), "us": us, "frac_copy": rec["copy_us"] / us})
        except Exception as e:  # noqa: BLE001 - a tiling that does not compile or fit is reported
            rec["variants"].append({"config": list(v), "error": f"{type(e).__name__}: {e}"[:200]})
        finally:
            for n, f in saved.items():
                setattr(km, n, f)
    ok = [x for x in rec["variants"] if "us" in x]
    rec["best"] = min(ok, key=lambda x: x["us"]) if ok else None
    rec["default_frac_copy"] = rec["copy_us"] / rec["default_us"]
    return rec


def _line(r):
    b = r.get("best") or {}
    return (f"{r['op']:<24} {r['tokens']}x{r['hidden']:<5} {r['pass']:<8} default {r['default_us']:.1f} us "
            f"({100 * r['default_frac_copy']:.0f}% copy) | best {b.get('us', float('nan')):.1f} us "
            f"({100 * b.get('frac_copy', float('nan')):.0f}%) {b.get('config')} | copy {r['copy_us']:.1f} us")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".")
    p.add_argument("--budget", type=float, default=120.0)
    p.add_argument("--dry-run", action="store_true", help="list the variants and exit (no GPU needed)")
    a = p.parse_args(argv)
    if a.dry_run:
        for hidden in (768, 3072):
            print(f"rows {hidden}: {row_variants(hidden)}")
            print(f"bias_gelu {hidden}: {gelu_variants(hidden)}")
        return 0
    if not torch.cuda.is_available():
        print("norm_variants: needs a CUDA device (torch sees none)")
        return 2
    import triton

    t0 = time.time()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "results": [], "not_measured": []}
    for backward in (False, True):
        for op in OPS:
            for tokens, hidden in SHAPES.get(op, DEFAULT_SHAPES):
                if time.time() - t0 > a.budget:
                    out["not_measured"].append(f"{op} {tokens}x{hidden} {'fwd+bwd' if backward else 'fwd'}")
                    continue
                r = measure(op, tokens, hidden, backward)
                out["results"].append(r)
                print(_line(r), flush=True)
    out["elapsed_s"] = round(time.time() - t0, 1)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "norm_variants.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(a.out, "norm_variants.md"), "w") as f:
        f.write(f"# norm-family tilings: {out['device']}, torch {out['torch']}, triton {out['triton']}\n\n```\n")
        f.write("\n".join(_line(r) for r in out["results"]) + "\n```\n")
        if out["not_measured"]:
            f.write("\nnot measured (budget): " + ", ".join(out["not_measured"]) + "\n")
    print(f"norm_variants: {len(out['results'])} cases in {out['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
