"""Host time per layer, bertfast and transformers each alone in a fresh process, alternated.

`bertfast bench --suite host` times both side by side in one process (interleaved blocks). This
script is the end-to-end check of the same figures without any sharing: every round starts one
process per library (in alternating order), each builds the host suite's twin models (12 layers,
1 x 8 tokens, 6 valid) and times only its own library with a perf_counter loop; the ratio per
round is bertfast / transformers (below 1: bertfast spends less host time), and the median over
rounds is printed.

    python benchmarks/host_alternated.py [--rounds 5] [--width 64] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(which: str, width: int, device: str, seconds: float) -> dict:
    """Host us per layer of the encoder forward and of the MLM step for `which` alone."""
    import torch

    from bertfast.bench import host

    torch.set_num_threads(1)  # a parallel region on a busy machine waits for descheduled threads
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    bf, hf = host._twins(dev, dtype, width)
    model = bf if which == "bertfast" else hf
    if isinstance(model, str):
        raise SystemExit(model)
    b = host._batch(dev)
    inputs = {k: v for k, v in b.items() if k != "labels"}

    def forward():
        with torch.inference_mode():
            model.bert(**inputs)

    def step():
        model(**b).loss.backward()

    out = {}
    for name, fn, train in (("forward", forward, False), ("step", step, True)):
        model.train(train)
        for _ in range(5):
            fn()
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 5:
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / 5)
        out[name] = statistics.median(times) * 1e6 / host.LAYERS
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seconds", type=float, default=3.0, help="timing per figure per process")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.width, args.device, args.seconds)))
        return
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    ratios = {"forward": [], "step": []}
    for r in range(args.rounds):
        got = {}
        for which in (("bertfast", "transformers") if r % 2 == 0 else ("transformers", "bertfast")):
            res = subprocess.run([sys.executable, __file__, "--child", which, "--width", str(args.width),
                                  "--device", args.device, "--seconds", str(args.seconds)],
                                 capture_output=True, text=True, env=env, check=True)
            got[which] = json.loads(res.stdout.strip().splitlines()[-1])
        for k in ratios:
            ratios[k].append(got["bertfast"][k] / got["transformers"][k])
        print(f"round {r}: " + "  ".join(f"{k} bertfast {got['bertfast'][k]:.1f} / transformers "
                                         f"{got['transformers'][k]:.1f} us per layer = {ratios[k][-1]:.3f}"
                                         for k in ratios), flush=True)
    print("median bertfast/transformers host time per layer: " +
          ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in ratios.items()) +
          f" (width {args.width}, {args.rounds} rounds, fresh process each, alternated)")


if __name__ == "__main__":
    main()
