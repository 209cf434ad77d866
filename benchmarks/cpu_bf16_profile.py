"""precision="bf16" against fp32: where a forward's time goes, and the speed and quality ratios.

    python benchmarks/cpu_bf16_profile.py                                # every workload, 3 profiled + 5 timed rounds
    python benchmarks/cpu_bf16_profile.py --workloads minilm_full --rounds 1 --timed 3

Three systems on the cpu-peers workloads (bench/cpu_peers.py: MiniLM 32x128, BERT-base 8x128 with
random weights, 256 held-out real sentences in batches of 32 through MiniLM): bertfast fp32,
bertfast bf16, and bf16 through casts (the same model with the bf16 add-and-norm switched off, so
each GEMM input is cast to bf16 and each bf16 GEMM output promoted to fp32 before the
add-and-norm: the path before ops/bias_residual_layernorm_bf16.py). Systems interleaved round by
round in one process (a load change hits them alike), 2 threads by default.

Prints, per workload: a table of torch.profiler self time per op kind (GEMM, cast/copy, attention,
add+LayerNorm, bias+GELU, other) and its share, averaged over the profiled rounds; the median wall
time of each system over the timed rounds and the ratios fp32 / bf16 and casts / bf16; and the
quality of each bf16 system's mean-pooled sentence vectors against fp32's (lowest and mean cosine,
top-10 neighbour agreement; bench/cpu_peers.quality).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # a source checkout

KINDS = [("GEMM", ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm")),
         ("cast/copy", ("aten::copy_", "aten::_to_copy", "aten::cat")),
         ("attention", ("bertfast::attention_cpu_fwd", "aten::_scaled_dot_product_flash_attention_for_cpu")),
         ("add+LayerNorm", ("bertfast::bias_residual_layernorm_cpu_fwd",
                            "bertfast::bias_residual_layernorm_bf16_cpu_fwd")),
         ("bias+GELU", ("bertfast::bias_gelu_cpu_fwd",))]
SYSTEMS = ("fp32", "bf16 (casts)", "bf16")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="minilm_full,base_full,minilm_ragged")
    ap.add_argument("--rounds", type=int, default=3, help="profiled rounds per system")
    ap.add_argument("--timed", type=int, default=5, help="timed rounds per system")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from torch.profiler import ProfilerActivity, profile

    import bertfast.models._engine as engine
    from bertfast.bench import cpu_peers
    from bertfast.models import BertModel

    torch.set_num_threads(args.threads)
    bf16_add_norm = engine.select_add_norm_bf16
    for workload in args.workloads.split(","):
        path = cpu_peers.model_dir(workload)
        fp32 = BertModel.from_pretrained(path).eval()
        bf16 = BertModel.from_pretrained(path).eval().set_inference_precision("bf16")
        batches = cpu_peers.batches(workload)

        def pool(hidden, mask):  # mean over the valid tokens, unit length (all-MiniLM-L6-v2's sentence vector)
            m = mask.unsqueeze(-1).float()
            return torch.nn.functional.normalize((hidden.float() * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)

        def run(model, casts):
            # the casting path: no bf16 add-and-norm is selected, so the engine takes the fp32 one
            engine.select_add_norm_bf16 = (lambda *a: None) if casts else bf16_add_norm
            try:
                with torch.inference_mode():
                    return torch.cat([pool(model(b["input_ids"], b["attention_mask"]).last_hidden_state,
                                           b["attention_mask"]) for b in batches])
            finally:
                engine.select_add_norm_bf16 = bf16_add_norm

        systems = {"fp32": (fp32, False), "bf16 (casts)": (bf16, True), "bf16": (bf16, False)}
        vectors = {s: run(*a) for s, a in systems.items()}  # warm-up: GEMM choices, packing, probes
        self_ms = {s: {} for s in systems}
        for _ in range(args.rounds):
            for s, a in systems.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    run(*a)
                for e in prof.key_averages():
                    self_ms[s][e.key] = self_ms[s].get(e.key, 0.0) + e.self_cpu_time_total / 1e3 / args.rounds
        walls = {s: [] for s in systems}
        for _ in range(args.timed):
            for s, a in systems.items():
                t0 = time.perf_counter()
                run(*a)
                walls[s].append(time.perf_counter() - t0)
        print(f"\n{workload}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}: profiled self time "
              f"per pass, ms (share)")
        print("| kind | " + " | ".join(systems) + " |\n|---|" + "---|" * len(systems))
        total = {s: sum(self_ms[s].values()) for s in systems}
        known = {k for _, keys in KINDS for k in keys}
        for kind, keys in KINDS + [("other", None)]:
            cells = []
            for s in systems:
                v = sum(t for k, t in self_ms[s].items() if (k in keys if keys else k not in known))
                cells.append(f"{v:.0f} ({v / total[s]:.0%})")
            print(f"| {kind} | " + " | ".join(cells) + " |")
        print("| total | " + " | ".join(f"{total[s]:.0f}" for s in systems) + " |")
        med = {s: statistics.median(w) for s, w in walls.items()}
        print("wall, median of %d: " % args.timed + ", ".join(f"{s} {v * 1e3:.0f} ms" for s, v in med.items())
              + f"; fp32 / bf16 {med['fp32'] / med['bf16']:.2f}x, casts / bf16 {med['bf16 (casts)'] / med['bf16']:.2f}x")
        for s in ("bf16 (casts)", "bf16"):
            q = cpu_peers.quality(vectors[s], vectors["fp32"])
            print(f"quality of {s} against fp32: " + ", ".join(f"{k} {v:.6f}" for k, v in q.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
