"""Where the GPU time goes: a short profile to run beside benchmarks/gpu_check.sh.

  python benchmarks/gpu_profile.py [--out DIR]

1. BERT-base inference (bf16, 256 x 128 full rows, and the same rows at fill ~0.4): bertfast
   and transformers (sdpa), the ten heaviest CUDA kernels of each and their share of the
   forward, the host-side time per forward, and how many device-to-host reads it made.
2. The host cost of one fused op call (bias_residual_layernorm forward + backward at a size
   where the kernels take microseconds): cProfile's heaviest Python functions.
Writes profile.txt to --out (default $OUT or .) and prints a summary.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _batch(B, S, fill, device, vocab=30522, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (B, S), generator=g)
    if fill >= 1.0:
        lens = torch.full((B,), S)
    else:  # lengths uniform around fill * S, like real sentence batches padded to the longest
        lens = torch.randint(max(2, int(0.1 * S)), int(2 * fill * S) - int(0.1 * S), (B,), generator=g).clamp(2, S)
        lens[0] = S
    mask = (torch.arange(S)[None, :] < lens[:, None]).long()
    return dict(input_ids=(ids * mask).to(device), attention_mask=mask.to(device),
                token_type_ids=torch.zeros_like(ids).to(device)), float(mask.float().mean())


def _profile_forward(model, batch, n=5):
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(3):
            model(**batch)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            model(**batch)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                model(**batch)
            torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sorted((e for e in events if getattr(e, "device_time_total", 0) > 0 and e.device_type.name == "CUDA"),
                     key=lambda e: -e.device_time_total)
    dev_total = sum(e.device_time_total for e in kernels) / n
    # every value read back to the host is one device-to-host copy (item, tolist, nonzero's size)
    reads = sum(e.count for e in events if "DtoH" in e.key) / n
    rows = [(e.key[:70], e.device_time_total / n, e.count // n) for e in kernels[:10]]
    return wall * 1e3, dev_total / 1e3, reads, rows


def encoder(out):
    import transformers

    from bertfast import models

    dev = torch.device("cuda")
    cfg = models.BertConfig.preset("base")
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("id2label", "label2id", "architectures")}
    torch.manual_seed(0)
    hf = transformers.BertModel(transformers.BertConfig(**d, attn_implementation="sdpa")).eval().to(dev, torch.bfloat16)
    bf = models.from_hf(hf).eval()
    for B, S, fill in ((256, 128, 1.0), (256, 128, 0.4)):
        batch, real_fill = _batch(B, S, fill, dev)
        for name, m in (("bertfast", bf), ("hf_sdpa", hf)):
            wall, dev_ms, reads, rows = _profile_forward(m, batch)
            head = (f"[encoder] base b{B}x{S} fill {real_fill:.2f} {name}: {wall:.2f} ms/forward wall, "
                    f"{dev_ms:.2f} ms of kernels ({100 * dev_ms / wall:.0f}% busy), {reads:.1f} host reads")
            print(head)
            out.write(head + "\n")
            for k, t, c in rows:
                out.write(f"    {t / 1e3:8.3f} ms  x{c:<4d} {k}\n")


def op_host_cost(out):
    from bertfast import ops

    dev = torch.device("cuda")
    m, n = 4096, 768
    x, r = (torch.randn(m, n, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    b, w, lb = (torch.randn(n, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)

    def step(fn):
        y = fn(x, b, r, w, lb, 1e-12)
        return torch.autograd.grad(y, (x, b, r, w, lb), dy)

    for name, fn in (("bertfast", ops.bias_residual_layernorm), ("eager_ref", ops.bias_residual_layernorm_ref)):
        for _ in range(20):
            step(fn)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            step(fn)
        host = (time.perf_counter() - t0) / 200 * 1e6  # launches only: the queue never drains
        torch.cuda.synchronize()
        line = f"[op] bias_residual_layernorm fwd+bwd {m}x{n} bf16 {name}: {host:.0f} us of host time per call"
        print(line)
        out.write(line + "\n")
        if name == "bertfast":
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(200):
                step(fn)
            pr.disable()
            torch.cuda.synchronize()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
            out.write(s.getvalue())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_profile: no CUDA device")
        return
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile.txt"), "w") as out:
        out.write(f"{torch.cuda.get_device_name(0)} torch {torch.__version__}\n")
        for part in (encoder, op_host_cost):
            try:
                part(out)
            except Exception as e:  # noqa: BLE001 - one part failing keeps the other
                print(f"{part.__name__}: {type(e).__name__}: {e}")
                out.write(f"{part.__name__}: {type(e).__name__}: {e}\n")
            out.flush()


if __name__ == "__main__":
    main()
