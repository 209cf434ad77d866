"""The graphs suite: CUDA-graph serving of ragged batches and the graphed, packed pre-training step,
against bertfast eager and transformers in the same run.

- `serve`: MiniLM on real English text, 32 sentences per batch (fill ~0.4): bertfast's
  GraphedEncoder (one graph per total-token bucket) against bertfast eager, transformers SDPA
  eager and transformers replaying one CUDA graph captured at the padded shape 32 x 128 (its
  graphs need a fixed shape: each batch is padded to it).
- `latency`: BERT-base, one full 8 x 128 batch: GraphedEncoder against transformers' CUDA graph
  and both eager forwards.
- `pretrain`: MLM + NSP steps (forward, backward, AdamW) on sentence pairs of real text (the
  length mix of consecutive sentences): bertfast packs the pairs into rows of 128 tokens and
  replays one CUDA graph per step; against its own eager packed and padded steps and
  transformers on the same pairs padded to the longest. Every variant trains on the same pairs
  per call, so tokens/s counts the pairs' real tokens. Dropout 0 everywhere (a graphed step
  cannot draw new dropout masks).
On CPU the same cases run without capture (the graphed variants then measure the bucketing and
packing code's overhead), with smaller models unless --models says otherwise.
"""
from __future__ import annotations

import copy
import math
from typing import List

import torch

from .common import SUBJECT, SuiteOptions, dtype_name
from .runner import Case
from .timing import TimingPlan

NAME = "graphs"
GRAPHED = False  # the graphed variants are compared with every other variant directly
BASELINE_PACKAGES = ("transformers",)
PLOT_METRIC = ("tokens_per_s", "real tokens / s")

SERVE_BATCH, SERVE_LEN = 32, 128
PAIRS_PER_STEP, PAIR_LEN = 32, 128


def plan_cases(opts: SuiteOptions) -> List[Case]:
    dev, dtype = opts.device, opts.dtypes[0]
    cuda = dev.type == "cuda"
    n_batches = 16 if cuda else (2 if opts.quick else 4)
    cases = [_serve_case(dev, dtype, n_batches, opts.quick)]
    if cuda or not opts.quick:
        cases.append(_latency_case(dev, dtype, "base" if cuda else "mini"))
    cases.append(_pretrain_case(dev, dtype, "base" if cuda else "mini", 2))
    return cases


def cleanup():
    from .encoder import cleanup as encoder_cleanup

    encoder_cleanup()


def _tokenizer(vocab_size: int):
    from .. import testing
    from ..tokenizer import Tokenizer
    from .encoder import trained_tokenizer

    path = testing.minilm_path()
    if path is not None:
        return Tokenizer.from_pretrained(path), "all-MiniLM-L6-v2 (bert-base-uncased WordPiece)"
    return trained_tokenizer(vocab_size), "WordPiece trained on this machine's text"


def _padded_to(b: dict, S: int) -> dict:
    """A batch padded (right) to S columns: what a fixed-shape graph needs."""
    out = {}
    for k, v in b.items():
        pad = torch.zeros(v.shape[0], S, dtype=v.dtype, device=v.device)
        pad[:, :v.shape[1]] = v
        out[k] = pad
    return out


def _additive_mask(mask2d: torch.Tensor, dtype) -> torch.Tensor:
    """(B, S) key mask -> (B, 1, S, S) additive mask, which transformers takes as it is (a 2-D
    mask would make it check on the host whether there is padding: no host reads in a capture)."""
    B, S = mask2d.shape
    keep = (mask2d != 0)[:, None, None, :].expand(B, 1, S, S)
    return torch.zeros(B, 1, S, S, dtype=dtype, device=mask2d.device).masked_fill(~keep, torch.finfo(dtype).min)


def _hf_graph_fn(model, batches, device, S):
    """transformers' forward with a mask captured once at (rows, S); each call pads the next
    batch to S, builds its additive mask, copies both in and replays."""
    dtype = next(model.parameters()).dtype
    padded = [_padded_to(b, S) for b in batches]
    static = {k: v.clone() for k, v in padded[0].items() if k != "attention_mask"}
    static["attention_mask"] = _additive_mask(padded[0]["attention_mask"], dtype)
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s), torch.inference_mode():
        for _ in range(3):
            model(**static)
    torch.cuda.current_stream(device).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(g):
        model(**static)

    def fn():
        for b in padded:
            static["input_ids"].copy_(b["input_ids"], non_blocking=True)
            static["token_type_ids"].copy_(b["token_type_ids"], non_blocking=True)
            static["attention_mask"].copy_(_additive_mask(b["attention_mask"], dtype), non_blocking=True)
            g.replay()

    return fn


def _graphed_fn(graphed, batches):
    def fn():
        out = None
        for b in batches:
            out = graphed(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        return out

    return fn


def _serve_case(device, dtype, n_batches, quick) -> Case:
    from .encoder import infer_fn, encoder_models, real_text_batches

    info: dict = {}
    case_ref: dict = {}

    def batches(m):
        if "batches" not in info:
            tok, info["tokenizer"] = _tokenizer(m.config.vocab_size)
            bs = real_text_batches(tok, n_batches, batch=SERVE_BATCH, max_len=SERVE_LEN)
            info["batches"] = [{k: v.to(device) for k, v in b.items()} for b in bs]
        return info["batches"]

    def variant(kind):
        def factory(meta):
            from ..graphs import GraphedEncoder

            m = encoder_models("minilm", device, dtype)
            bs = batches(m)
            real = sum(int(b["attention_mask"].sum()) for b in bs)
            meta["fill"] = round(real / sum(b["attention_mask"].numel() for b in bs), 4)
            meta["tokenizer"] = info["tokenizer"]
            meta["weights"] = m.weights
            case_ref["case"].tokens = real  # per call: one pass over every batch
            if kind == "bertfast":
                g = GraphedEncoder(m.bf, max_tokens=SERVE_BATCH * SERVE_LEN, max_seqs=SERVE_BATCH,
                                   max_seqlen=SERVE_LEN, lazy=True)  # the buckets the text needs
                fn = _graphed_fn(g, bs)
                fn()  # captures the buckets this text uses
                meta["graphs"] = g.report()
                meta["graph_memory_mb"] = round(g.memory_bytes / 2**20, 1)
                return fn
            if kind == "bertfast_eager":
                return infer_fn(m.bf, bs)
            if m.hf is None:
                raise RuntimeError(m.hf_reason)
            if kind == "hf_sdpa":
                return infer_fn(m.hf, bs)
            return _hf_graph_fn(m.hf, bs, device, SERVE_LEN)
        return factory

    variants = {SUBJECT: variant("bertfast"), "bertfast_eager": variant("bertfast_eager"),
                "hf_sdpa": variant("hf_sdpa")}
    variants["hf_graph"] = variant("hf_graph") if device.type == "cuda" else "CUDA only"
    case = Case(NAME, f"minilm serve real text {n_batches}x{SERVE_BATCH} graphed {dtype_name(dtype)}",
                {"model": "minilm", "kind": "serve", "batches": n_batches, "batch": SERVE_BATCH}, variants,
                dtype=dtype_name(dtype),
                plan=TimingPlan(repeats=5 if quick else 9, block_s=0.0, max_s=4.0 if quick else 20.0, warmup=1))
    case_ref["case"] = case
    return case


def _latency_case(device, dtype, mname, B=8, S=128) -> Case:
    from .encoder import graph_fn, encoder_models, fixed_batches

    def variant(kind):
        def factory(meta):
            from ..graphs import GraphedEncoder

            m = encoder_models(mname, device, dtype)
            bs = fixed_batches(m, B, S, device)
            rot = {"i": 0}

            def rotating(call):  # one batch per call, the next set each time
                def fn():
                    rot["i"] += 1
                    return call(bs[rot["i"] % len(bs)])
                return fn

            def forward(model):
                def call(b):
                    with torch.inference_mode():
                        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                     token_type_ids=b["token_type_ids"])
                return call

            if kind == "bertfast":
                g = GraphedEncoder(m.bf, buckets=[B * S], max_seqs=B, max_seqlen=S)
                meta["graph_memory_mb"] = round(g.memory_bytes / 2**20, 1)
                return rotating(lambda b: g(b["input_ids"], b["attention_mask"], b["token_type_ids"]))
            if kind == "bertfast_eager":
                return rotating(forward(m.bf))
            if kind == "bertfast_fixed_graph":  # the whole forward at one shape, no mask (full rows only)
                return graph_fn(m.bf, bs, device)
            if m.hf is None:
                raise RuntimeError(m.hf_reason)
            if kind == "hf_sdpa":
                return rotating(forward(m.hf))
            return graph_fn(m.hf, bs, device)
        return factory

    variants = {SUBJECT: variant("bertfast"), "bertfast_eager": variant("bertfast_eager"),
                "hf_sdpa": variant("hf_sdpa")}
    if device.type == "cuda":
        variants["hf_graph"] = variant("hf_graph")
        variants["bertfast_fixed_graph"] = variant("bertfast_fixed_graph")
    else:
        variants["hf_graph"] = "CUDA only"
    return Case(NAME, f"{mname} latency b{B}x{S} graphed {dtype_name(dtype)}",
                {"model": mname, "kind": "latency", "batch": B, "seq": S, "fill": 1.0}, variants,
                tokens=B * S, dtype=dtype_name(dtype))


def pretraining_pairs(tok, n: int, max_len: int = PAIR_LEN, seed: int = 0):
    """n MLM + NSP examples (PretrainingStream's dicts) from consecutive sentences of real text:
    [CLS] A [SEP] B [SEP], truncated to max_len, masked as BERT does."""
    import random

    from ..data import Masker, truncate_pair
    from .encoder import real_sentences

    sents = real_sentences(2 * n + 1)
    enc = tok.encodings(sents, add_special_tokens=False)
    masker = Masker(tok)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = list(enc[2 * i].ids) or [tok.cls_token_id], list(enc[2 * i + 1].ids) or [tok.sep_token_id]
        truncate_pair(a, b, max_len - 3, rng)
        ids = torch.tensor([tok.cls_token_id] + a + [tok.sep_token_id] + b + [tok.sep_token_id])
        tt = torch.zeros_like(ids)
        tt[len(a) + 2:] = 1
        masked, labels = masker(ids, seed * 1000003 + i)
        out.append({"input_ids": masked, "token_type_ids": tt, "labels": labels,
                    "next_sentence_label": torch.tensor(rng.randint(0, 1))})
    return out


def _packed_step_batches(examples, sets: int, per_step: int, budget: int):
    """`sets` packed batches of `per_step` pairs each, all of one shape (rows enough for the
    fullest), and the same pairs as padded batches."""
    from ..data import collate_pretraining, pack_pretraining

    groups = [examples[i * per_step:(i + 1) * per_step] for i in range(sets)]
    pairs = 8
    rows = max(math.ceil(sum(len(e["input_ids"]) for e in g) / budget) for g in groups)
    while True:
        packed = [pack_pretraining(g, rows, budget, pairs) for g in groups]
        if all(n == per_step for _, n in packed):
            break
        rows += 1
    return [p for p, _ in packed], [collate_pretraining(g) for g in groups], rows


def _pretrain_case(device, dtype, mname, sets) -> Case:
    info: dict = {}
    case_ref: dict = {}

    def prepared():
        if "packed" not in info:
            from .. import models
            from .encoder import MINILM_ARCH, hf_config

            cfg_kw = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
            cfg = models.BertConfig(**MINILM_ARCH, **cfg_kw) if mname == "minilm" else \
                models.BertConfig.preset(mname, **cfg_kw)
            tok, info["tokenizer"] = _tokenizer(cfg.vocab_size)
            if tok.vocab_size > cfg.vocab_size:
                cfg = models.BertConfig.from_dict({**cfg.to_dict(), "vocab_size": tok.vocab_size})
            exs = pretraining_pairs(tok, sets * PAIRS_PER_STEP)
            packed, padded, rows = _packed_step_batches(exs, sets, PAIRS_PER_STEP, PAIR_LEN)
            info["packed"] = [{k: v.to(device) for k, v in b.items()} for b in packed]
            info["padded"] = [{k: v.to(device) for k, v in b.items()} for b in padded]
            info["rows"] = rows
            info["tokens"] = sum(int(b["attention_mask"].sum()) for b in padded) / sets
            info["fill_padded"] = round(sum(int(b["attention_mask"].sum()) for b in padded)
                                        / sum(b["attention_mask"].numel() for b in padded), 4)
            info["fill_packed"] = round(info["tokens"] * sets / (sets * rows * PAIR_LEN), 4)
            torch.manual_seed(0)
            try:
                import transformers

                info["hf"] = transformers.BertForPreTraining(hf_config(cfg)).to(device, dtype)
                info["bf"] = models.from_hf(info["hf"])
            except Exception as e:  # noqa: BLE001 - transformers absent or failing: bertfast alone
                info["hf_reason"] = f"transformers: {type(e).__name__}: {e}"
                info["bf"] = models.BertForPreTraining(cfg).to(device, dtype)
        return info

    def variant(kind):
        def factory(meta):
            from ..graphs import GraphedTrainStep
            from ..train.pretrain import packed_losses

            p = prepared()
            case_ref["case"].tokens = p["tokens"]
            meta.update(tokenizer=p["tokenizer"], rows=p["rows"], fill_padded=p["fill_padded"],
                        fill_packed=p["fill_packed"], pairs_per_step=PAIRS_PER_STEP,
                        weights=f"random, {dtype_name(dtype)} parameters, fused AdamW, dropout 0")
            if kind.startswith("hf"):
                if "hf" not in p:
                    raise RuntimeError(p["hf_reason"])
                model = copy.deepcopy(p["hf"]).train()
            else:
                model = copy.deepcopy(p["bf"]).train()
            fused = {"fused": True} if device.type == "cuda" else {}
            state = {"i": 0}
            if kind in ("bertfast", "bertfast_packed_eager"):
                opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-5, device=device), fused=True,
                                        capturable=True)
                step = GraphedTrainStep(model, opt, packed_losses, max_grad_norm=1.0,
                                        capture=None if kind == "bertfast" else False)
                bs = p["packed"]

                def fn():
                    state["i"] += 1
                    return step(bs[state["i"] % len(bs)])
                return fn
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, **fused)
            bs = p["padded"]
            kw = {"sparse_prediction": True} if kind == "bertfast_padded" else {}

            def fn():
                state["i"] += 1
                b = bs[state["i"] % len(bs)]
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            token_type_ids=b["token_type_ids"], labels=b["labels"],
                            next_sentence_label=b["next_sentence_label"], **kw)
                loss = out.loss if hasattr(out, "loss") else out[0]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            return fn
        return factory

    variants = {SUBJECT: variant("bertfast"), "bertfast_packed_eager": variant("bertfast_packed_eager"),
                "bertfast_padded": variant("bertfast_padded"), "hf_eager": variant("hf_eager")}
    if device.type != "cuda":  # without capture the subject is this very code
        variants["bertfast_packed_eager"] = "CUDA only (on CPU the subject runs the packed step eagerly)"
    case = Case(NAME, f"{mname} pretrain packed MLM+NSP {PAIRS_PER_STEP} pairs/step graphed {dtype_name(dtype)}",
                {"model": mname, "kind": "pretrain", "pairs": PAIRS_PER_STEP, "budget": PAIR_LEN}, variants,
                dtype=dtype_name(dtype), peak_memory=True)
    case_ref["case"] = case
    return case
