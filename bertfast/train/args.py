"""The argument parsers of `bertfast pretrain` and `bertfast finetune`.

Kept apart from the training loops and free of torch, so that `--help` and argument errors
answer at once, before torch (seconds to import) is loaded.
"""
from __future__ import annotations

import argparse

from .._help import HelpFormatter

TASKS = ("cls", "nli", "ner", "qa")

DATA_FORMATS = """data formats (one record per line for .jsonl; a header row for .csv/.tsv):
  cls  {"text": "...", "label": "sports"}  optional "text_pair"; multi-label (--multi-label): "labels": [...]
       csv/tsv columns: text,label[,text_pair]
  nli  {"premise": "...", "hypothesis": "...", "label": "entailment|neutral|contradiction"}
       (sentence1/sentence2 accepted too); csv/tsv columns: premise,hypothesis,label
  ner  {"tokens": ["John", "lives", "in", "Paris"], "tags": ["B-PER", "O", "O", "B-LOC"]}  (jsonl)
  qa   {"question": "...", "context": "...", "answers": {"text": ["..."], "answer_start": [17]}}
       (jsonl, SQuAD style; an empty answers list means unanswerable)
The output folder holds the model, its tokenizer and the label names; predict with it:
  bertfast classify|tag|answer --model OUT records.jsonl"""


def pretrain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bertfast pretrain", description="MLM + NSP pre-training from BERT-format text "
                                "files (one sentence per line, a blank line between documents).",
                                formatter_class=HelpFormatter)
    p.add_argument("--train", nargs="+", help="corpus files (required unless --eval-only)")
    p.add_argument("--eval", nargs="+", help="held-out corpus files, evaluated every --eval-every steps")
    p.add_argument("--out", help="output folder (model, tokenizer, metrics.jsonl, checkpoints/)")
    p.add_argument("--init", help="start from this model folder (BertForPreTraining weights + tokenizer) instead "
                   "of random weights")
    p.add_argument("--eval-only", action="store_true", help="only evaluate --init on --eval (MLM/NSP loss and "
                   "accuracy, all --eval-batches of it; 0 = the whole corpus) and print the result")
    p.add_argument("--tokenizer", help="tokenizer folder; without it a WordPiece vocab is trained on --train")
    p.add_argument("--vocab-size", type=int, default=8000,
                   help="WordPiece vocabulary trained on --train when no --tokenizer/--init")
    p.add_argument("--cased", action="store_true", help="keep case when training a vocabulary")
    p.add_argument("--config", default="tiny", help="tiny | mini | base | large, or a config.json path")
    p.add_argument("--dropout", type=float, help="override hidden and attention dropout")
    p.add_argument("--attention-dropout", type=float, help="override attention dropout only (0 skips the "
                   "attention-probability masks, the costliest part of a small model's CPU step)")
    p.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per micro-batch per rank")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per NSP pair sequence")
    p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate")
    p.add_argument("--warmup-steps", type=int, help="default: 10%% of --max-steps")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases and norms)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    p.add_argument("--mlm-probability", type=float, default=0.15, help="share of tokens masked (80/10/10)")
    p.add_argument("--whole-word-mask", action="store_true", help="mask every piece of a chosen word")
    p.add_argument("--short-seq-prob", type=float, default=0.1,
                   help="share of pairs shorter than --seq-len, as BERT does")
    p.add_argument("--dense-mlm", action="store_true", help="project every position to the vocabulary "
                   "(default: only the masked ones)")
    p.add_argument("--num-shards", type=int, help="data shards (default: world size)")
    p.add_argument("--seed", type=int, default=0, help="weights, data order, masking, dropout")
    p.add_argument("--log-every", type=int, default=10, help="steps per metrics.jsonl line")
    p.add_argument("--eval-every", type=int, default=200, help="steps between --eval evaluations (0: never)")
    p.add_argument("--eval-batches", type=int, default=20, help="batches per evaluation")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (0: never)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in "
                   "--out/checkpoints (damaged ones are skipped with a warning)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds an earlier run "
                   "(its metrics.jsonl, model and checkpoints are replaced); without it such an --out is refused")
    p.add_argument("--force-resume", action="store_true", help="resume even when settings that break an exact "
                   "resume (--seed, --batch-size, --seq-len, ...) differ from the checkpoint's")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when there is one")
    p.add_argument("--threads", type=int, help="torch CPU threads per process")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--pack", action="store_true", help="pack several NSP pairs per row of --pack-budget tokens "
                   "(--batch-size rows per micro-batch; cu_seqlens per pair, positions restarting per pair)")
    p.add_argument("--pack-budget", type=int, help="tokens per packed row (default: --seq-len)")
    p.add_argument("--pairs-per-row", type=int, help="pair slots per packed row (default: one per 32 tokens)")
    p.add_argument("--cuda-graph", action="store_true", help="capture forward, backward, clipping and the AdamW "
                   "step in one CUDA graph (needs --pack, --dropout 0, --grad-accum 1, one CUDA process)")
    return p


def finetune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bertfast finetune", description="Fine-tune a checkpoint for a task: a "
                                "classification (cls, nli), tagging (ner) or extractive QA (qa) head on its encoder.",
                                epilog=DATA_FORMATS, formatter_class=HelpFormatter)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--model", required=True, help="checkpoint folder with config, weights and tokenizer")
    p.add_argument("--train", required=True, help=".jsonl/.csv/.tsv training file")
    p.add_argument("--eval", help=".jsonl/.csv/.tsv evaluation file (evaluated after each epoch)")
    p.add_argument("--out", required=True, help="output folder: model, tokenizer, label names, metrics.jsonl")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out (its metrics.jsonl "
                   "and model); without it such an --out is refused")
    p.add_argument("--labels", help="comma-separated label set (default: those of --train)")
    p.add_argument("--multi-label", action="store_true", help="cls: several labels per text (sigmoid + BCE)")
    p.add_argument("--threshold", type=float, default=0.5, help="multi-label decision threshold")
    p.add_argument("--crf", action="store_true", help="ner: a linear-chain CRF head (Viterbi decoding)")
    p.add_argument("--crf-constraints", choices=["auto", "bio", "none"], default="auto",
                   help="ner --crf: forbid invalid BIO transitions when decoding (auto: when the labels are BIO)")
    p.add_argument("--epochs", type=int, default=3, help="passes over --train")
    p.add_argument("--batch-size", type=int, default=32, help="examples (qa: windows) per step")
    p.add_argument("--max-seq-len", type=int, default=128, help="tokens per example; longer "
                   "ones are cut (a note says how many), qa contexts are windowed")
    p.add_argument("--doc-stride", type=int, default=64, help="qa: context tokens shared by adjacent windows")
    p.add_argument("--max-answer-len", type=int, default=30, help="qa evaluation: longest answer in tokens")
    p.add_argument("--lr", type=float, default=5e-5, help="peak AdamW learning rate")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="share of the steps with "
                   "a linear warm-up (then linear decay)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases and norms)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    p.add_argument("--seed", type=int, default=0, help="head initialisation, data order, dropout")
    p.add_argument("--log-every", type=int, default=10, help="steps per metrics.jsonl loss line")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when there is one")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p
