"""precision="int8": where its error comes from, and what each fix costs in speed.

    python benchmarks/cpu_int8_variants.py --sensitivity            # per GEMM kind and per layer (quality only)
    python benchmarks/cpu_int8_variants.py --speed --rounds 7       # variants: quality, and speed against fp32

Quality is measured as bench/cpu_peers.py measures it: all-MiniLM-L6-v2 sentence vectors (mean-pooled,
unit length) of 256 held-out real sentences against transformers' fp32 vectors: lowest and mean
cosine, top-10 neighbour agreement. A variant is a set of int8 plans (dispatch/cpu_gemm.set_int8_plan)
put over the ones the model calibrated itself: per GEMM, plain int8 (one activation scale per call),
smoothed int8, int8 with its widest input channels in fp32 beside, or kept in bf16 / fp32. The activation maxima are the calibration pass's
(models/int8_calibration.py: seeded random ids).

--sensitivity quantises one GEMM kind (QKV, attention output, FFN input, FFN output), or one
layer, at a time, every other GEMM in fp32, and prints the input ranges per GEMM (largest channel
maximum against the median channel's). --speed times every variant against bertfast fp32 on
MiniLM 32x128, BERT-base 8x128 (random weights) and the ragged 256 sentences in batches of 32,
variants interleaved round by round (a load change hits them alike), median per variant.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

KINDS = ("qkv", "attn_out", "ffn_up", "ffn_down")


def gemm_weights(model):
    """{(layer, kind): the GEMM's first weight} of a bertfast BertModel."""
    out = {}
    for i, layer in enumerate(model.encoder.layer):
        out[(i, "qkv")] = layer.attention.self.query.weight
        out[(i, "attn_out")] = layer.attention.output.dense.weight
        out[(i, "ffn_up")] = layer.intermediate.dense.weight
        out[(i, "ffn_down")] = layer.output.dense.weight
    return out


def input_maxima(model):
    """{(layer, kind): max|x| per input channel} over the calibration pass."""
    import torch

    from bertfast.dispatch import cpu_gemm
    from bertfast.models import int8_calibration

    ids = int8_calibration.calibration_ids(model.config)
    model.set_inference_precision("int8")
    with torch.inference_mode(), cpu_gemm.recording_inputs() as seen:
        model(ids)
    return {key: seen[id(w)][0] for key, w in gemm_weights(model).items()}


def apply(model, policy, maxima):
    """Puts the plans `policy((layer, kind)) -> "int8" | "smooth" | "bf16" | "fp32"` on `model`."""
    import torch

    from bertfast.dispatch import cpu_gemm

    model.set_inference_precision("int8")
    with torch.inference_mode():  # the model's own calibration first, so it does not overwrite these later
        model(torch.tensor([[101, 102]]))
    for key, w in gemm_weights(model).items():
        mode = policy(key)
        outliers = maxima[key].topk(int(mode[6:])).indices if mode.startswith("split:") else None
        cpu_gemm.set_int8_plan(w, maxima[key] if mode == "smooth" else None, mode if mode in ("bf16", "fp32") else "int8",
                               outliers)


def _variants(layers: int) -> dict:
    """name -> policy (None: the precision as it ships)."""
    def smoothed(ffn_out):
        return lambda k: "smooth" if k[1] in ("qkv", "ffn_up") else ffn_out(k[0]) if k[1] == "ffn_down" else "int8"

    return {
        "int8, per-tensor everywhere (before plans)": lambda k: "int8",
        "int8, smoothed everywhere": lambda k: "smooth",
        "QKV + FFN input smoothed, the rest plain int8": smoothed(lambda i: "int8"),
        "QKV + FFN input smoothed, FFN output bf16 (default with bf16 GEMMs)": smoothed(lambda i: "bf16"),
        f"QKV + FFN input smoothed, FFN output bf16 in layers 0-{layers // 2 - 1}":
            smoothed(lambda i: "bf16" if i < layers // 2 else "int8"),
        "QKV + FFN input smoothed, FFN output int8 + its 8 widest channels fp32 (default without)":
            smoothed(lambda i: "split:8"),
        "int8 as it ships on this CPU": None,
    }


def ragged():
    from bertfast.bench import cpu_peers

    return cpu_peers.batches("minilm_ragged")


def reference(batches):
    import torch
    import transformers

    from bertfast.bench import cpu_peers

    hf = transformers.AutoModel.from_pretrained(cpu_peers.model_dir("minilm_ragged"), attn_implementation="eager").eval()
    with torch.inference_mode():
        return torch.cat([cpu_peers._pool(hf(**b).last_hidden_state, b["attention_mask"]) for b in batches])


def vectors(model, batches):
    import torch

    from bertfast.bench import cpu_peers

    with torch.inference_mode():
        return torch.cat([cpu_peers._pool(model(b["input_ids"], b["attention_mask"]).last_hidden_state,
                                          b["attention_mask"]) for b in batches])


def _minilm():
    from bertfast import BertModel
    from bertfast.bench import cpu_peers

    return BertModel.from_pretrained(cpu_peers.model_dir("minilm_ragged")).eval()


def _row(name, q):
    print(f"| {name} | {q['cos_min']:.5f} | {q['cos_mean']:.5f} | {q['top10_agreement']:.3f} |", flush=True)


def sensitivity():
    from bertfast.bench import cpu_peers

    batches = ragged()
    ref = reference(batches)
    model = _minilm()
    maxima = input_maxima(model)
    print("| GEMM input | largest channel max | median channel max | ratio | top channels |\n|---|---|---|---|---|")
    for key in sorted(maxima):
        a = maxima[key]
        print(f"| layer {key[0]} {key[1]} | {a.max():.1f} | {a.median():.2f} | {a.max() / a.median():.0f} | "
              f"{a.topk(3).indices.tolist()} |")
    print("\n| int8 GEMMs (the rest fp32) | lowest cosine | mean cosine | top-10 agreement |\n|---|---|---|---|")
    n = len(model.encoder.layer)
    for kind in KINDS:
        for how in ("int8", "smooth"):
            apply(model, lambda k, kind=kind, how=how: how if k[1] == kind else "fp32", maxima)
            _row(f"{kind} only, {'plain' if how == 'int8' else 'smoothed'}", cpu_peers.quality(vectors(model, batches), ref))
    for layer in range(n):
        apply(model, lambda k, layer=layer: "int8" if k[0] == layer else "fp32", maxima)
        _row(f"layer {layer} only, plain", cpu_peers.quality(vectors(model, batches), ref))


def speed(rounds: int, workloads):
    import torch

    from bertfast import BertModel
    from bertfast.bench import cpu_peers

    batches = ragged()
    ref = reference(batches)
    for workload in workloads:
        make = _minilm if workload != "base_full" else (
            lambda: BertModel.from_pretrained(cpu_peers.model_dir("base_full")).eval())
        data = batches if workload == "minilm_ragged" else cpu_peers.batches(workload)
        fp32 = make()
        maxima = input_maxima(make())
        models = {"fp32": fp32}
        for name, policy in _variants(len(fp32.encoder.layer)).items():
            if workload == "base_full" and "per-tensor" not in name and "default" not in name:
                continue  # BERT-base: the shipped choice and its neighbours only (memory)
            m = make()
            if policy is None:
                m.set_inference_precision("int8")
            else:
                apply(m, policy, maxima)
            models[name] = m
        times = {name: [] for name in models}

        def run(m):
            with torch.inference_mode():
                for b in data:
                    m(b["input_ids"], b["attention_mask"])

        for m in models.values():
            run(m)  # warm: packs, measured GEMM choices, calibration
        for _ in range(rounds):
            for name, m in models.items():
                t0 = time.perf_counter()
                run(m)
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["fp32"])
        print(f"\n{workload} ({torch.get_num_threads()} threads, {rounds} rounds interleaved; fp32 {base * 1e3:.0f} ms)")
        print("| variant | speed vs fp32 | lowest cosine | mean cosine | top-10 |\n|---|---|---|---|---|")
        for name, m in models.items():
            q = cpu_peers.quality(vectors(m, batches), ref) if workload == "minilm_ragged" else None
            qs = f"{q['cos_min']:.5f} | {q['cos_mean']:.5f} | {q['top10_agreement']:.3f}" if q else "- | - | -"
            print(f"| {name} | {base / statistics.median(times[name]):.2f}x | {qs} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sensitivity", action="store_true")
    p.add_argument("--speed", action="store_true")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workloads", default="minilm_ragged,minilm_full,base_full")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    if args.sensitivity:
        sensitivity()
    if args.speed:
        speed(args.rounds, args.workloads.split(","))


if __name__ == "__main__":
    main()
