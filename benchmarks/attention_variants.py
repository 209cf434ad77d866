"""Every launch configuration of the Triton attention kernels, timed on the GPU one at a time,
beside PyTorch's kernels: which tiles (and whether Hopper's TMA loads) win per head_dim and
sequence-length bucket.

    python benchmarks/attention_variants.py [--out DIR] [--budget 150] [--head-dims 64,128]
                                            [--seqs 128,256,512] [--dry-run]

For each bucket (layout padded / varlen at fill ~0.6, head_dim, sequence length; bf16, ~16k
tokens per batch, 12x64 or 8x128 heads) it times, replayed from CUDA graphs (kernel time, no host
time; triton.testing.do_bench, median):
  fwd    every forward configuration of the GPU family (CONFIGS) and every tensor-descriptor (TMA)
         variant (DESC_CONFIGS), against SDPA (padded) / varlen_attn (varlen)
  bwd    forward + backward with each dK/dV configuration (dQ at its default) and each dQ
         configuration (dK/dV at its default), against the same PyTorch kernel's forward + backward
and prints, per bucket, the default configuration's time, the best one and PyTorch's. Writes
attention_variants.json (every timing) and attention_variants.md to --out. Buckets run most
important first (padded and varlen at head_dim 64, the BERT case); --budget seconds cuts the rest,
which are listed as not measured. The default config lists in kernels/attention.py are what these
figures should reorder.
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


def _inputs(layout, B, S, H, D, fill, device, grad):
    from bertfast.bench.attention import varlen_lengths

    g = torch.Generator(device=device).manual_seed(0)
    if layout == "padded":
        lens = [S] * B
        shape = (B, S, H, D)
    else:
        lens = varlen_lengths(B, S, fill=fill)
        shape = (sum(lens), H, D)
    # q/k/v as views of one fused projection, as the encoder calls it
    qkv = torch.randn(*shape[:-2], 3, H, D, generator=g, device=device, dtype=torch.bfloat16)
    q, k, v = (t.requires_grad_(grad) if grad else t for t in (qkv[..., i, :, :].detach() for i in range(3)))
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    return q, k, v, cu.to(device), lens


def _ours(layout, q, k, v, cu, S, grad, forced):
    from bertfast import dispatch, ops
    from bertfast.kernels import attention as K

    def call():
        K._forced.clear()
        K._forced.update(forced)
        try:
            with dispatch.use_backend("triton"):
                out = ops.attention(q, k, v, cu_seqlens=cu, max_seqlen=S) if layout == "varlen" \
                    else ops.attention(q, k, v)
                if grad:
                    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        finally:
            K._forced.clear()

    return call


def _theirs(layout, q, k, v, cu, S, grad):
    from bertfast.dispatch import torch_attention as T

    def call():
        out = T.varlen(q, k, v, cu, cu, S, S, q.shape[-1] ** -0.5, False) if layout == "varlen" \
            else T.sdpa(q, k, v, q.shape[-1] ** -0.5, False)
        if grad:
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    return call


def plan(head_dims, seqs):
    buckets = []
    for D in head_dims:
        for layout in ("padded", "varlen"):
            for S in seqs:
                buckets.append((layout, D, S))
    # the BERT case first: head_dim 64 before 128
    return sorted(buckets, key=lambda b: (b[1] != 64, b[1], b[0] != "padded", b[2]))


def run_bucket(layout, D, S, fam, grad):
    from bertfast.kernels import attention as K

    H = 768 // D if D <= 64 else 1024 // D
    B = max(1, 16384 // S)
    q, k, v, cu, lens = _inputs(layout, B, S, H, D, 0.6, "cuda", grad)
    rows = []
    dt = torch.bfloat16
    if not grad:
        variants = [("fwd", c) for c in K.candidates("fwd", D, dt, family=fam)]
        if K.desc_aligned(q, k, v):
            variants += [("fwd", c) for c in K.candidates("fwd", D, dt, family=fam, desc=True)]
    else:
        variants = [("dkdv", c) for c in K.candidates("dkdv", D, dt, family=fam)]
        variants += [("dq", c) for c in K.candidates("dq", D, dt, family=fam)]
    default = {kern: K.pick_config(kern, D, dt, S, S, family=fam, interpret=False) for kern in ("fwd", "dkdv", "dq")}
    rec = {"layout": layout, "head_dim": D, "heads": H, "batch": B, "seq": S, "pass": "fwd+bwd" if grad else "fwd",
           "fill": round(sum(lens) / (B * S), 3), "default": {k: str(c) for k, c in default.items()}, "timings": []}
    try:
        rec["default_us"] = graph_replay_ms(_ours(layout, q, k, v, cu, S, grad, {})) * 1e3
    except Exception as e:  # noqa: BLE001
        rec["default_us"] = None
        rec["default_error"] = f"{type(e).__name__}: {e}"[:200]
    for kern, cfg in variants:
        try:
            us = graph_replay_ms(_ours(layout, q, k, v, cu, S, grad, {kern: cfg})) * 1e3
            rows.append({"kernel": kern, "config": str(cfg), "us": us})
        except Exception as e:  # noqa: BLE001 - a config that does not fit (shared memory) is reported
            rows.append({"kernel": kern, "config": str(cfg), "error": f"{type(e).__name__}: {e}"[:200]})
    rec["timings"] = rows
    try:
        rec["torch_us"] = graph_replay_ms(_theirs(layout, q, k, v, cu, S, grad)) * 1e3
    except Exception as e:  # noqa: BLE001
        rec["torch_us"] = None
        rec["torch_error"] = f"{type(e).__name__}: {e}"[:200]
    ok = [r for r in rows if "us" in r]
    rec["best"] = min(ok, key=lambda r: r["us"]) if ok else None
    return rec


def _line(r):
    peer = "sdpa" if r["layout"] == "padded" else "varlen_attn"
    best = r.get("best") or {}
    fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    return (f"{r['layout']:<7} {r['pass']:<8} d{r['head_dim']:<4} s{r['seq']:<4} default {fmt(r.get('default_us'))} us"
            f" | best {fmt(best.get('us'))} us {best.get('kernel', '')} {best.get('config', '')}"
            f" | {peer} {fmt(r.get('torch_us'))} us")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".")
    p.add_argument("--budget", type=float, default=150.0, help="seconds; buckets past it are not measured")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--seqs", default="128,256,512")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    a = p.parse_args(argv)
    buckets = plan([int(x) for x in a.head_dims.split(",")], [int(x) for x in a.seqs.split(",")])
    if a.dry_run:
        for b in buckets:
            print("bucket", *b)
        return 0
    if not torch.cuda.is_available():
        print("attention_variants: needs a CUDA device (torch sees none)")
        return 2
    from bertfast.kernels import attention as K

    fam = K.device_family(torch.device("cuda"))
    t0 = time.time()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "family": fam, "results": [],
           "not_measured": []}
    import triton

    out["triton"] = triton.__version__
    for layout, D, S in buckets:
        for grad in (False, True):
            if time.time() - t0 > a.budget:
                out["not_measured"].append(f"{layout} d{D} s{S} {'fwd+bwd' if grad else 'fwd'}")
                continue
            r = run_bucket(layout, D, S, fam, grad)
            out["results"].append(r)
            print(_line(r), flush=True)
    out["elapsed_s"] = round(time.time() - t0, 1)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "attention_variants.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(a.out, "attention_variants.md"), "w") as f:
        f.write(f"# attention variants: {out['device']}, torch {out['torch']}, triton {out['triton']}\n\n")
        f.write("CUDA-graph replays, median us; best = fastest configuration of this run\n\n```\n")
        f.write("\n".join(_line(r) for r in out["results"]) + "\n```\n")
        if out["not_measured"]:
            f.write("\nnot measured (budget): " + ", ".join(out["not_measured"]) + "\n")
    print(f"attention_variants: {len(out['results'])} buckets in {out['elapsed_s']} s; "
          f"{len(out['not_measured'])} not measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
