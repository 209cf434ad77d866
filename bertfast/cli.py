"""The `bertfast` command. Each subcommand lives in its own module as `cli_main(argv)`;
this file only routes, so `bertfast --help` stays fast (nothing heavy is imported)."""
from __future__ import annotations

import importlib
import sys

# the shared --help formatter lives in a leaf module so that the commands of lower packages
# (train, tasks) use it without importing this top-level router
from ._help import HelpFormatter  # noqa: F401

COMMANDS = {
    "info": ("bertfast._info", "versions, devices and which backend serves each op"),
    "verify": ("bertfast.verify", "check every backend against the references; --aot sm_90a compiles Triton"),
    "bench": ("bertfast.bench", "benchmarks: ops, attention, encoder (ratios vs eager, compile, SDPA, HF)"),
    "pretrain": ("bertfast.train.cli", "MLM + NSP pre-training from text files"),
    "finetune": ("bertfast.train.cli", "fine-tune a checkpoint: cls | nli | ner | qa"),
    "fill-mask": ("bertfast.tasks.commands", "top-k tokens for each [MASK] in a text"),
    "embed": ("bertfast.tasks.commands", "sentence embeddings of texts"),
    "search": ("bertfast.tasks.commands", "top-k cosine search of queries over a corpus"),
    "cluster": ("bertfast.tasks.commands", "k-means over sentence embeddings"),
    "classic": ("bertfast.classic.cli", "word2vec, TextCNN, ELMo, RNN seq2seq, Transformer, GPT: train and use"),
    "compare": ("bertfast.classic.cli", "classic sentence classifiers vs BERT fine-tuned on the same real task"),
    "classify": ("bertfast.tasks.commands", "labels of texts or pairs, fine-tuned cls/nli model (JSONL in and out)"),
    "tag": ("bertfast.tasks.commands", "word labels and entity spans, fine-tuned ner model (JSONL in and out)"),
    "answer": ("bertfast.tasks.commands", "answer questions from a context, fine-tuned qa model (JSONL in and out)"),
}



def _usage() -> str:
    lines = ["usage: bertfast <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"bertfast: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    return int(module.cli_main(cmd, rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
