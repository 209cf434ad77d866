"""Where a CPU forward's time goes: the share in GEMMs, and their rate against the library alone.

    python benchmarks/cpu_gemm_profile.py                       # MiniLM 32x128 and BERT-base 8x128, fp32/bf16/int8
    python benchmarks/cpu_gemm_profile.py --precision fp32 --threads 2

For each model and precision: bertfast's forward (inference mode, every token valid) under
torch.profiler; the GEMM ops' self time (aten::mm/addmm, oneDNN's _linear_pointwise, the
quantized linear_dynamic) as a share of the forward, their GFLOP/s inside the forward, and the
GFLOP/s of the same GEMMs timed alone through the implementation dispatch/cpu_gemm chose (the
library's rate here). A forward whose GEMM share is high and whose in-forward rate is near the
alone rate has nothing left to win outside the GEMM library.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GEMM_OPS = ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise", "quantized::linear_dynamic", "aten::linear")


def _model(name):
    import torch

    from bertfast import BertConfig, BertModel
    from bertfast.testing import minilm_path

    if name == "minilm":
        return BertModel.from_pretrained(minilm_path()).eval(), (32, 128)
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    return BertModel(cfg).eval(), (8, 128)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="minilm,base")
    ap.add_argument("--precision", default="fp32,bf16,int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bertfast.dispatch import cpu_gemm

    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        model, (B, S) = _model(name)
        cfg = model.config
        ids = torch.randint(1000, 20000, (B, S))
        mask = torch.ones_like(ids)
        M, H, I, L = B * S, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
        shapes = [(H, 3 * H, "bias"), (H, H, "none"), (H, I, "gelu"), (I, H, "none")]
        flops = 2 * M * sum(k * n for k, n, _ in shapes) * L
        for precision in args.precision.split(","):
            model.set_inference_precision(precision)
            with torch.inference_mode():
                model(ids, mask)
                model(ids, mask)
                walls = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    model(ids, mask)
                    walls.append(time.perf_counter() - t0)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    model(ids, mask)
            total = sum(e.self_cpu_time_total for e in prof.key_averages())
            gemm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS)
            # the same GEMMs alone, through the implementation chosen for them
            alone = 0.0
            for k, n, ep in shapes:
                us = cpu_gemm.measure(precision, ep, M, k, n, finish=lambda y, b: y, rounds=3)
                impl = cpu_gemm.choose(precision, ep, M, k, n, finish=lambda y, b: y)
                alone += us[impl] * 1e-6 * L
            wall = statistics.median(walls)
            in_fwd = flops / (gemm * 1e-6) / 1e9 if gemm else float("nan")
            print(f"{name} {B}x{S} {precision}: forward {wall * 1e3:.0f} ms; GEMM share {gemm / total:.0%} of "
                  f"profiled op time; GEMM {in_fwd:.0f} GFLOP/s in the forward vs {flops / alone / 1e9:.0f} GFLOP/s "
                  f"alone ({in_fwd / (flops / alone / 1e9):.0%} of the library's rate here)", flush=True)
            rest = sorted((e for e in prof.key_averages() if e.key not in GEMM_OPS), key=lambda e: -e.self_cpu_time_total)
            print("    the rest: " + ", ".join(f"{e.key} {e.self_cpu_time_total / total:.0%}" for e in rest[:5]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
