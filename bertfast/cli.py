"""The `bertfast` command. Each subcommand lives in its own module as `cli_main(argv)`;
this file only routes, so `bertfast --help` stays fast (nothing heavy is imported)."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "info": ("bertfast._info", "versions, devices and which backend serves each op"),
    "verify": ("bertfast.verify", "check every backend against the references; --aot sm_90a compiles Triton"),
    "bench": ("bertfast.bench", "benchmarks: ops, attention, encoder (ratios vs eager, compile, SDPA, HF)"),
    "pretrain": ("bertfast.train", "MLM + NSP pre-training from text files"),
    "finetune": ("bertfast.train", "fine-tune a checkpoint: cls | nli | ner | qa"),
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every command's --help: each option's default after its help, unless there is none to show
    (required options, unset optionals, off switches). In descriptions and epilogs, an indented
    line (a data format, an example) is kept as written; other lines are wrapped."""

    def _get_help_string(self, action):
        d = action.default
        shown = not (action.required or d in (None, False, [], "") or d == argparse.SUPPRESS)
        if not shown or "%(default)" in (action.help or "") or "(default:" in (action.help or ""):
            return action.help  # nothing to show, or the help already says it
        return super()._get_help_string(action)

    def _fill_text(self, text, width, indent):
        return "\n".join(indent + line if line[:1].isspace() or not line.strip()
                         else argparse.HelpFormatter._fill_text(self, line, width, indent)
                         for line in text.splitlines())


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
