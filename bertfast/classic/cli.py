"""`bertfast classic <system> <action>` and `bertfast compare`.

    bertfast classic data docstrings --out DIR            # real labelled data: train.tsv, test.tsv
    bertfast classic data reversal --out DIR [--from F]   # source<TAB>target pairs from real words
    bertfast classic word2vec train --train F.. --out DIR [--loss negative|softmax] [--test F..]
    bertfast classic word2vec neighbours --model DIR WORD
    bertfast classic word2vec analogy --model DIR A B C   # A - B + C
    bertfast classic {bow,textcnn} train --train TSV --out DIR [--test TSV]   # label<TAB>text
    bertfast classic {bow,textcnn,elmo} predict --model DIR TEXT.. | FILE
    bertfast classic elmo train --train F.. --out DIR [--labelled TSV] [--test TSV]
    bertfast classic {seq2seq,transformer} train --train TSV --out DIR [--test TSV]  # source<TAB>target
    bertfast classic {seq2seq,transformer} translate --model DIR [--beam K] TEXT.. | FILE
    bertfast classic gpt train --train F.. --out DIR [--level word|char] [--test F..]
    bertfast classic gpt sample --model DIR --prompt TEXT [--temperature --top-k --top-p --no-cache]

Every train command prints one JSON line of results (loss first/last, seconds, the held-out
metric and its trivial baseline when --test is given) and writes a model folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Sequence

from . import SYSTEMS

ACTIONS = {
    "data": ("docstrings", "reversal"),
    "word2vec": ("train", "neighbours", "analogy"),
    "bow": ("train", "predict"),
    "textcnn": ("train", "predict"),
    "elmo": ("train", "predict"),
    "seq2seq": ("train", "translate"),
    "transformer": ("train", "translate"),
    "gpt": ("train", "sample"),
}


def _usage() -> str:
    return (__doc__ or "").split("\n\n")[1]


def _texts_arg(values: List[str]) -> List[str]:
    if len(values) == 1 and os.path.isfile(values[0]):
        with open(values[0], encoding="utf-8", errors="replace") as f:
            return [ln.strip() for ln in f if ln.strip()]
    return values


def _common_train_args(p: argparse.ArgumentParser, steps: int, batch: int, lr: float) -> None:
    p.add_argument("--out", required=True, help="folder to write the model to")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--log-every", type=int, default=100)


def _parser(system: str, action: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"bertfast classic {system} {action}")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    if system == "data":
        p.add_argument("--out", required=True, help="folder for train.tsv and test.tsv")
        p.add_argument("--test-fraction", type=float, default=0.2)
        if action == "reversal":
            p.add_argument("--from", dest="sources", nargs="*", default=None,
                           help="text files whose words to use (default: the machine's licence and doc texts)")
        return p
    if action == "train":
        if system == "word2vec":
            p.add_argument("--train", nargs="+", required=True, help="text files")
            p.add_argument("--test", nargs="*", default=None, help="held-out text files (pair AUC)")
            p.add_argument("--loss", choices=["negative", "softmax"], default="negative")
            p.add_argument("--dim", type=int, default=64)
            p.add_argument("--vocab", type=int, default=10_000)
            p.add_argument("--window", type=int, default=2)
            p.add_argument("--negatives", type=int, default=5)
            _common_train_args(p, 3000, 256, 0.01)
        elif system in ("bow", "textcnn"):
            p.add_argument("--train", required=True, help="label<TAB>text file")
            p.add_argument("--test", default=None, help="held-out label<TAB>text file")
            p.add_argument("--vocab", type=int, default=20_000)
            if system == "textcnn":
                p.add_argument("--dim", type=int, default=128)
                p.add_argument("--windows", type=int, nargs=3, default=[3, 4, 5])
                p.add_argument("--filters", type=int, default=100)
                p.add_argument("--dropout", type=float, default=0.5)
                _common_train_args(p, 1000, 50, 1e-3)
            else:
                _common_train_args(p, 500, 64, 0.05)
        elif system == "elmo":
            p.add_argument("--train", nargs="+", required=True, help="text files for the language model")
            p.add_argument("--labelled", default=None, help="label<TAB>text file: also train a classifier")
            p.add_argument("--test", default=None, help="held-out label<TAB>text file (with --labelled)")
            p.add_argument("--vocab", type=int, default=10_000)
            p.add_argument("--hidden", type=int, default=128)
            p.add_argument("--layers", type=int, default=2)
            p.add_argument("--classifier-steps", type=int, default=500)
            _common_train_args(p, 1500, 32, 2e-3)
        elif system in ("seq2seq", "transformer"):
            p.add_argument("--train", required=True, help="source<TAB>target file")
            p.add_argument("--test", default=None, help="held-out source<TAB>target file")
            p.add_argument("--vocab", type=int, default=10_000)
            p.add_argument("--hidden", type=int, default=256)
            if system == "seq2seq":
                p.add_argument("--emb", type=int, default=128)
                p.add_argument("--cell", choices=["gru", "lstm"], default="gru")
            else:
                p.add_argument("--layers", type=int, default=3)
                p.add_argument("--heads", type=int, default=4)
                p.add_argument("--ffn", type=int, default=1024)
            _common_train_args(p, 2000, 64, 2e-3 if system == "seq2seq" else 1e-3)
        elif system == "gpt":
            p.add_argument("--train", nargs="+", required=True, help="text files")
            p.add_argument("--test", nargs="*", default=None, help="held-out text files (perplexity)")
            p.add_argument("--level", choices=["word", "char"], default="word")
            p.add_argument("--vocab", type=int, default=10_000)
            p.add_argument("--hidden", type=int, default=256)
            p.add_argument("--layers", type=int, default=4)
            p.add_argument("--heads", type=int, default=4)
            p.add_argument("--ffn", type=int, default=1024)
            p.add_argument("--max-len", type=int, default=128)
            _common_train_args(p, 2000, 32, 1e-3)
        return p
    p.add_argument("--model", required=True, help="folder written by the train action")
    if action == "neighbours":
        p.add_argument("word")
        p.add_argument("--k", type=int, default=10)
    elif action == "analogy":
        p.add_argument("words", nargs=3, metavar="WORD", help="A B C: the words nearest to A - B + C")
        p.add_argument("--k", type=int, default=5)
    elif action in ("predict", "translate"):
        p.add_argument("texts", nargs="+", help="texts, or one file with a text per line")
        if action == "translate":
            p.add_argument("--beam", type=int, default=1)
            p.add_argument("--max-len", type=int, default=64)
    elif action == "sample":
        p.add_argument("--prompt", required=True)
        p.add_argument("--max-new-tokens", type=int, default=40)
        p.add_argument("--samples", type=int, default=3)
        p.add_argument("--temperature", type=float, default=0.8)
        p.add_argument("--top-k", type=int, default=40)
        p.add_argument("--top-p", type=float, default=0.95)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--no-cache", action="store_true", help="reread the whole sequence every step")
    return p


def cli_main(cmd: str, argv: Sequence[str]) -> int:
    if cmd == "compare":
        from .compare import cli_main as compare_main

        return compare_main(argv)
    argv = list(argv)
    if len(argv) < 2 or argv[0] not in ACTIONS or argv[1] not in ACTIONS[argv[0]]:
        if argv and argv[0] in ("-h", "--help"):
            print(_usage())
            return 0
        print("usage:\n" + _usage(), file=sys.stderr)
        return 2
    system, action = argv[0], argv[1]
    args = _parser(system, action).parse_args(argv[2:])
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        result = _run(system, action, args)
    except (ValueError, OSError) as e:
        print(f"bertfast classic {system} {action}: error: {e}", file=sys.stderr)
        return 1
    if result is not None:
        print(json.dumps(result))
    return 0


# ---- load / save -----------------------------------------------------------------------------


def _build(system: str, meta: dict):
    from . import bow, elmo, gpt, seq2seq, textcnn, transformer, word2vec

    cfg = meta["config"]
    if system == "elmo":
        bilm = elmo.BiLM(**cfg["bilm"])
        return elmo.ELMoClassifier(bilm, **cfg["classifier"]) if cfg.get("classifier") else bilm
    cls = {"word2vec": word2vec.SkipGram, "bow": bow.BagOfWords, "textcnn": textcnn.TextCNN,
           "seq2seq": seq2seq.Seq2Seq, "transformer": transformer.TransformerSeq2Seq, "gpt": gpt.GPT}[system]
    return cls(**cfg)


def load(folder: str, system: str):
    """(model in eval mode, vocabularies, meta) of a folder written by `bertfast classic <system> train`."""
    from .text import load_folder

    meta, state, vocabs = load_folder(folder, system)
    model = _build(system, meta)
    model.load_state_dict(state)
    return model.eval(), vocabs, meta


def _save(folder, system, model, vocabs, extra=None):
    from .text import save_folder

    if system == "elmo":
        bilm = getattr(model, "bilm", model)
        config = {"bilm": bilm.config, "classifier": model.config if model is not bilm else None}
    else:
        config = model.config
    save_folder(folder, system, config, model, vocabs, extra)


def _loss_summary(hist: dict) -> dict:
    from .training import mean_first_last

    first, last = mean_first_last(hist["losses"])
    return {"steps": hist["steps"], "seconds": round(hist["seconds"], 2), "loss_first": round(first, 4),
            "loss_last": round(last, 4)}


# ---- actions ---------------------------------------------------------------------------------


def _run(system: str, action: str, args):
    from . import datasets, text

    if system == "data":
        if action == "docstrings":
            texts, labels = datasets.docstring_topics()
        else:
            sents = text.read_lines(args.sources, "--from") if args.sources else _machine_sentences()
            labels, texts = datasets.reversal_pairs(sents)  # written as source<TAB>target
        (tr_x, tr_y), (te_x, te_y) = datasets.split(texts, labels, args.test_fraction)
        text.write_tsv(os.path.join(args.out, "train.tsv"), tr_y, tr_x)
        text.write_tsv(os.path.join(args.out, "test.tsv"), te_y, te_x)
        return {"out": args.out, "train": len(tr_x), "test": len(te_x), "classes": sorted(set(labels))
                if action == "docstrings" else None}
    if action == "train":
        return _train(system, args)
    model, vocabs, meta = load(args.model, system)
    if action == "neighbours":
        from .word2vec import neighbours

        return {"word": args.word, "neighbours": [[w, round(s, 4)] for w, s in
                                                  neighbours(model, vocabs["words"], args.word, args.k)]}
    if action == "analogy":
        from .word2vec import analogy

        return {"query": "{} - {} + {}".format(*args.words),
                "answers": [[w, round(s, 4)] for w, s in analogy(model, vocabs["words"], *args.words, k=args.k)]}
    texts = _texts_arg(args.texts) if hasattr(args, "texts") else []
    if action == "predict":
        classes = meta["classes"]
        if system == "bow":
            from .bow import predict

            preds = predict(model, vocabs["words"], classes, texts)
        else:
            if system == "elmo" and not hasattr(model, "bilm"):
                raise ValueError(f"--model {args.model!r} is a language model only: train it with --labelled")
            from .training import predict_classes

            preds = predict_classes(model, vocabs["words"], classes, texts)
        for t, y in zip(texts, preds):
            print(json.dumps({"label": y, "text": t}))
        return None
    if action == "translate":
        from .seq2seq import translate

        for t, y in zip(texts, translate(model, vocabs["source"], vocabs["target"], texts, args.beam, args.max_len)):
            print(json.dumps({"source": t, "output": y}))
        return None
    if action == "sample":
        import torch

        from .gpt import complete

        outs = complete(model, vocabs["tokens"], args.prompt, args.max_new_tokens, args.samples,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        generator=torch.Generator().manual_seed(args.seed), use_cache=not args.no_cache)
        for o in outs:
            print(json.dumps({"prompt": args.prompt, "continuation": o}))
        return None
    raise ValueError(f"unknown action {action!r}")


def _machine_sentences() -> List[str]:
    from ..testing import system_sentences

    return system_sentences(20_000)


def _kw(args) -> dict:
    return dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, time_limit=args.time_limit,
                log_every=args.log_every)


def _train(system: str, args) -> dict:
    from . import text
    from .training import accuracy, majority_accuracy

    out = {"system": system, "out": args.out}
    if system == "word2vec":
        from . import word2vec as w

        model, vocab, hist = w.train(text.read_lines(args.train), args.vocab, args.dim, args.window, args.loss,
                                     args.negatives, **_kw(args))
        out.update(_loss_summary(hist), loss=args.loss, pairs=hist["pairs"])
        if args.test:
            pairs = w.skipgram_pairs([vocab.encode(s) for s in text.read_lines(args.test, "--test")], args.window)
            noise = w.noise_distribution(vocab.counts)
            out["test_pair_auc"] = round(w.pair_auc(model.score, pairs, noise), 4)
            out["frequency_baseline_auc"] = round(w.pair_auc(lambda c, o: vocab.counts[o], pairs, noise), 4)
        _save(args.out, system, model, {"words": vocab})
        return out
    if system in ("bow", "textcnn"):
        texts, labels = text.read_labelled(args.train)
        if system == "bow":
            from . import bow

            model, vocab, classes, hist = bow.train(texts, labels, args.vocab, **_kw(args))
        else:
            from . import textcnn

            model, vocab, classes, hist = textcnn.train(texts, labels, args.vocab, args.dim, args.windows,
                                                        args.filters, args.dropout, **_kw(args))
        out.update(_loss_summary(hist), classes=classes)
        if args.test:
            te_x, te_y = text.read_labelled(args.test, "--test")
            if system == "bow":
                from .bow import predict

                preds = predict(model, vocab, classes, te_x)
            else:
                from .training import predict_classes

                preds = predict_classes(model, vocab, classes, te_x)
            out.update(test_accuracy=round(accuracy(preds, te_y), 4),
                       majority_baseline=round(majority_accuracy(labels, te_y), 4))
        _save(args.out, system, model, {"words": vocab}, {"classes": classes})
        return out
    if system == "elmo":
        from . import elmo

        lm_texts = text.read_lines(args.train)
        model, vocab, hist = elmo.train_lm(lm_texts, args.vocab, args.hidden, args.layers, **_kw(args))
        out.update(_loss_summary(hist), train_perplexity=round(elmo.lm_perplexity(model, vocab, lm_texts[:2000]), 2),
                   unigram_perplexity=round(elmo.unigram_perplexity(vocab, lm_texts[:2000]), 2))
        classes = None
        if args.labelled:
            texts, labels = text.read_labelled(args.labelled, "--labelled")
            kw = _kw(args)
            kw["steps"] = args.classifier_steps
            model, classes, chist = elmo.train_classifier(model, vocab, texts, labels, **kw)
            out["classifier"] = _loss_summary(chist)
            if args.test:
                from .training import predict_classes

                te_x, te_y = text.read_labelled(args.test, "--test")
                out.update(test_accuracy=round(accuracy(predict_classes(model, vocab, classes, te_x), te_y), 4),
                           majority_baseline=round(majority_accuracy(labels, te_y), 4))
        _save(args.out, system, model, {"words": vocab}, {"classes": classes})
        return out
    if system in ("seq2seq", "transformer"):
        from . import seq2seq

        sources, targets = text.read_pairs(args.train)
        if system == "seq2seq":
            model, sv, tv, hist = seq2seq.train(sources, targets, emb=args.emb, hidden=args.hidden, cell=args.cell,
                                                vocab_size=args.vocab, **_kw(args))
        else:
            from . import transformer

            model, sv, tv, hist = transformer.train(sources, targets, hidden=args.hidden, layers=args.layers,
                                                    heads=args.heads, ffn=args.ffn, vocab_size=args.vocab,
                                                    **_kw(args))
        out.update(_loss_summary(hist))
        if args.test:
            from .decoding import token_accuracy

            te_s, te_t = text.read_pairs(args.test, "--test")
            pred = seq2seq.translate(model, sv, tv, te_s)
            out["test_exact_match"] = round(accuracy(pred, te_t), 4)
            out["test_token_accuracy"] = round(token_accuracy([p.split() for p in pred], [t.split() for t in te_t]), 4)
            out["copy_baseline_token_accuracy"] = round(
                token_accuracy([s.split() for s in te_s], [t.split() for t in te_t]), 4)
        _save(args.out, system, model, {"source": sv, "target": tv})
        return out
    if system == "gpt":
        from . import elmo, gpt

        model, vocab, hist = gpt.train(text.read_lines(args.train), args.level, args.vocab, args.hidden, args.layers,
                                       args.heads, args.ffn, max_len=args.max_len, **_kw(args))
        out.update(_loss_summary(hist))
        if args.test:
            te = text.read_lines(args.test, "--test")
            out["test_perplexity"] = round(gpt.perplexity(model, vocab, te, args.max_len), 2)
            out["unigram_perplexity"] = round(elmo.unigram_perplexity(vocab, te, args.max_len), 2)
        _save(args.out, system, model, {"tokens": vocab})
        return out
    raise ValueError(f"system must be one of {SYSTEMS}, got {system!r}")
