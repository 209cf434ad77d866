"""The task commands: `bertfast fill-mask | embed | search | cluster | classify | tag | answer`,
each a thin layer of argument checks, input reading and JSON output over the task modules beside it.

Inputs never guess: positional arguments are files (one text per line, or JSONL records),
`-` is standard input, literal texts go through --text (--query for search, --question with
--context for answer). A path that does not exist is an error, never a text. Every record is
checked before the model is loaded, so a bad input costs no model load, and the arguments are
parsed and checked before torch is imported (a mistyped flag answers at once). A model folder
whose config.json names another head (its "architectures") is refused before it is loaded.

Runs of a few batches or more show a progress bar on stderr (--quiet: none). embed, search and
cluster follow a sentence-transformers folder (modules.json) as SentenceTransformer.encode
does: its max_seq_length, pooling and Normalize, saying on stderr what they used.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import List, Optional, Sequence

# torch-free: the task modules (and torch) are imported once the arguments are checked
from .common import binary_source, iter_jsonl, truncation_notes, utf8_lines

CLI_COMMANDS = ("fill-mask", "embed", "search", "cluster", "classify", "tag", "answer")

# JSONL input fields of classify/tag/answer: the fine-tuning formats' (bertfast finetune --help)
CLASSIFY_TEXT = ("text", "sentence", "premise", "sentence1")
# the head each command loads: (class, the config.json "architectures" it serves, where to get one)
HEADS = {
    "fill-mask": ("BertForMaskedLM", ("ForMaskedLM", "ForPreTraining"), "fill-mask needs a pre-trained "
                  "BertForPreTraining/BertForMaskedLM checkpoint"),
    "classify": ("BertForSequenceClassification", ("ForSequenceClassification",), "classify needs a model from "
                 "`bertfast finetune --task cls` or `--task nli`"),
    "tag": ("BertForTokenClassification", ("ForTokenClassification",), "tag needs a model from "
            "`bertfast finetune --task ner`"),
    "answer": ("BertForQuestionAnswering", ("ForQuestionAnswering",), "answer needs a model from "
               "`bertfast finetune --task qa`"),
}
CLASSIFY_PAIR = ("text_pair", "hypothesis", "sentence2")
TAG_WORDS = ("tokens", "words")

_EPILOG = {
    "embed": "Texts longer than the model's limit are cut to it, with a note saying how many; --long-texts "
             "windows embeds them whole (the mean over overlapping windows). A sentence-transformers folder "
             "(modules.json) is followed as SentenceTransformer.encode follows it: its max_seq_length, pooling and "
             "Normalize, unless --max-length, --pooling or --no-normalize say otherwise; stderr says what was used. "
             "--out - writes JSON lines {\"text\", \"embedding\"} to standard output.",
    "fill-mask": "input: files with one text per line (- is standard input), or --text; each text holds at least "
                 "one [MASK]. output: one JSON line per candidate: the text, the mask's index in it, the token, its "
                 "probability and the filled sequence.",
    "classify": "input: JSONL records {\"text\": ...} with an optional \"text_pair\" (or \"premise\"/\"hypothesis\", "
                "as fine-tuned for nli), or --text. output: one JSON line per record, the record plus \"label\" and "
                "\"score\" (multi-label models, or --top-k: \"labels\", a list of {label, score}). Label names are "
                "those saved by `bertfast finetune`.",
    "tag": "input: JSONL records {\"text\": ...} or {\"tokens\": [...]} (pre-split words), or --text. output: the "
           "record plus \"words\", \"labels\" (one per word) and \"spans\" (BIO-merged entities).",
    "answer": "input: JSONL records {\"question\": ..., \"context\": ...}, or --question with --context. output: "
              "the record plus \"answer\", \"start\", \"end\" (character offsets in the context) and \"score\" (the "
              "span's probability, P(start) x P(end)); a long context is read in overlapping windows.",
}


def _read_lines(path: str, what: str) -> List[str]:
    """Non-blank lines of a file (`-`: standard input), stripped."""
    if path != "-" and not os.path.isfile(path):
        raise ValueError(f"{what}: no such file {path!r} (texts go through --text or standard input: -)")
    f = binary_source(path)
    try:  # invalid UTF-8 is an error naming the file and line, in every command
        lines = [ln.strip() for _, ln in utf8_lines(f, "standard input" if path == "-" else path, what) if ln.strip()]
    finally:
        if path != "-":
            f.close()
    if not lines:
        raise ValueError(f"{what}: {'standard input' if path == '-' else repr(path)} holds no non-blank lines")
    return lines


def _nonempty(values: Sequence[str], flag: str) -> List[str]:
    for v in values:
        if not v.strip():
            raise ValueError(f"{flag} must not be empty")
    return list(values)


def _texts(args, what: str) -> List[str]:
    """--text values, then the lines of each input file, in order; at least one text."""
    texts = _nonempty(args.text or [], "--text")
    for path in args.inputs:
        texts += _read_lines(path, what)
    if not texts:
        raise ValueError("no input: name files with one text per line, - for standard input, or give --text")
    return texts


def _read_records(sources: Sequence[str], what: str) -> List[dict]:
    """JSON objects, one per non-blank line, of each source (`-`: standard input)."""
    recs = []
    for src in sources:
        if src != "-" and not os.path.isfile(src):
            raise ValueError(f"{what}: no such file {src!r} (JSONL records; - reads standard input)")
        f = binary_source(src)
        try:
            recs += [(f"{src} line {i}", rec) for i, rec in iter_jsonl(f, src, what)]
        finally:
            if src != "-":
                f.close()
    return recs


def _field(where: str, rec: dict, names: Sequence[str], kind=str, required: bool = True):
    for n in names:
        v = rec.get(n)
        if v is None:
            continue
        if kind is str and (not isinstance(v, str) or not v.strip()):
            raise ValueError(f"{where}: {n!r} must be a non-empty string, got {v!r}")
        if kind is list and (not isinstance(v, list) or not v):
            raise ValueError(f"{where}: {n!r} must be a non-empty list of words, got {v!r}")
        return v
    if required:
        raise ValueError(f"{where}: the record has no {' or '.join(map(repr, names))} field")
    return None


def _architectures(folder: str) -> List[str]:
    """config.json's "architectures" (the class that saved the checkpoint), [] when it names none."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            archs = json.load(f).get("architectures") or []
    except (ValueError, AttributeError):
        return []  # the loader names what is wrong with the file
    return [a for a in archs if isinstance(a, str)]


def _check_head(cmd: str, folder: str) -> None:
    """Refuses a folder whose config.json names a head this command cannot use, naming the one it has."""
    if cmd not in HEADS:
        return  # embed/search/cluster read the encoder of any checkpoint
    _, serves, hint = HEADS[cmd]
    archs = _architectures(folder)
    if archs and not any(a.endswith(serves) for a in archs):
        raise ValueError(f"--model {folder!r} is a {' / '.join(archs)} (config.json \"architectures\"), not a "
                         f"{' or '.join('*' + s for s in serves)}: {hint}")


def _load(cls_name: str, folder: str, cmd: Optional[str] = None):
    if not os.path.isdir(folder):
        raise ValueError(f"--model must be a checkpoint folder (config.json + weights + tokenizer), got {folder!r}")
    if cmd is not None:
        _check_head(cmd, folder)
    import torch

    from .. import models
    from ..tokenizer import Tokenizer

    try:
        tok = Tokenizer.from_pretrained(folder)
    except FileNotFoundError:
        raise ValueError(f"--model {folder!r} has no tokenizer (tokenizer.json or vocab.txt): save it beside the "
                         f"weights, e.g. model.save_pretrained(folder, tokenizer=tok)") from None
    cls = getattr(models, cls_name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, info = cls.from_pretrained(folder, output_loading_info=True)
    tok.check_fits(model.config.vocab_size, f"--model {folder}")
    # a folder whose config.json names no architecture: the head's weights tell
    heads = {"BertForMaskedLM": "cls.predictions", "BertForSequenceClassification": "classifier",
             "BertForTokenClassification": "classifier", "BertForQuestionAnswering": "qa_outputs"}
    if cls_name in heads:
        prefix, hint = heads[cls_name], {c: h for c, _, h in HEADS.values()}[cls_name]
        if any(k.startswith(prefix) for k in info["missing_keys"]):
            raise ValueError(f"--model {folder!r} has no {prefix}.* head: {hint}")
    # embeddings never read the pooler: a checkpoint without one (MLM, fine-tuned tagger) is complete for them
    quiet = cls_name == "BertModel" and info["missing_keys"] and all(
        k.startswith("pooler.") for k in info["missing_keys"])
    for w in caught:  # only now: a refused model should give one error line, not warnings first
        if not (quiet and "were not in the checkpoint" in str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(dev).eval(), tok


def _embed_to_folder(out: str) -> bool:
    """embed's --out: a .npy file, or a folder (an existing one, or a name without an extension) of shards."""
    if out == "-":
        return False
    folder = os.path.isdir(out) or not os.path.splitext(out)[1]
    if not folder and not out.endswith(".npy"):
        raise ValueError(f"--out must name a .npy file or a folder (no extension), got {out!r}")
    if not folder and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"--out must be a folder under torchrun (shards per process), got {out!r}")
    return folder


def _write_jsonl(rows, out: Optional[str]) -> None:
    """JSON lines to standard output, or to `out` written whole and then renamed (never half a file);
    standard JSON: a non-finite score is null, never NaN."""
    from .._io import json_safe, write_text

    lines = (json.dumps(json_safe(r), ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
    if out is None:
        for line in lines:
            print(line, end="")
        return
    write_text(out, "".join(lines))


def _parser(cmd: str) -> argparse.ArgumentParser:
    from ..cli import COMMANDS, HelpFormatter

    p = argparse.ArgumentParser(prog=f"bertfast {cmd}", description=COMMANDS[cmd][1], epilog=_EPILOG.get(cmd),
                                formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder (config.json, weights, tokenizer)")
    pooling = dict(choices=["mean", "cls", "max"], help="sentence vector: token mean, [CLS] or max (default: a "
                   "sentence-transformers folder's pooling, else mean)")
    max_length = dict(type=int, help="tokens per text, [CLS] and [SEP] included (default: a sentence-transformers "
                      "folder's max_seq_length, else the model's limit)")
    long_texts = dict(default="truncate", choices=["truncate", "windows"],
                      help="texts over the model's limit: cut them (a note says how many), or embed each whole as "
                           "the mean over overlapping windows")
    if cmd == "fill-mask":
        p.add_argument("inputs", nargs="*", metavar="FILE", help="files with one text per line; - is standard input")
        p.add_argument("--text", action="append", help="a text with [MASK] (repeatable), before the files' lines")
        p.add_argument("--top-k", type=int, default=5, help="candidates per mask")
    elif cmd in ("embed", "cluster"):
        p.add_argument("inputs", nargs="*", metavar="FILE", help="files with one text per line; - is standard input")
        p.add_argument("--text", action="append", help="a text (repeatable), embedded before the files' lines")
        p.add_argument("--pooling", **pooling)
        p.add_argument("--max-length", **max_length)
        p.add_argument("--long-texts", **long_texts)
        p.add_argument("--batch-size", type=int, default=32, help="texts per forward")
        if cmd == "embed":
            p.add_argument("--layer", type=int, default=-1, help="hidden state to pool: 0 embeddings, -1 last layer")
            p.add_argument("--normalize", action=argparse.BooleanOptionalAction, help="L2-normalise each embedding "
                           "(default: when a sentence-transformers folder has a Normalize module)")
            p.add_argument("--out", required=True, help="a .npy file (N, hidden) float32, rows in input order; - "
                           "for JSON lines on standard output; or a folder: shards + index.json, split over "
                           "torchrun's processes, resumable (see bertfast.tasks.shards)")
            p.add_argument("--shard-size", type=int, help="texts per shard of a folder --out (default: one per "
                           "process)")
        else:
            p.add_argument("--k", type=int, required=True, help="number of clusters")
            p.add_argument("--seed", type=int, default=0, help="k-means++ seed")
    elif cmd == "search":
        p.add_argument("--corpus", required=True, help="file with one text per line (- is standard input)")
        p.add_argument("--query", action="append", help="a query (repeatable: each is searched on its own)")
        p.add_argument("--queries", help="file with one query per line (- is standard input)")
        p.add_argument("--k", type=int, default=5, help="hits per query")
        p.add_argument("--pooling", **pooling)
        p.add_argument("--max-length", **max_length)
        p.add_argument("--long-texts", **long_texts)
    else:  # classify, tag, answer: JSONL in, JSONL out
        p.add_argument("inputs", nargs="*", metavar="FILE", help="JSONL files, one record per line; - is "
                       "standard input")
        if cmd == "answer":
            p.add_argument("--question", help="a question (with --context), answered before the files' records")
            p.add_argument("--context", help="the text --question is answered from")
            p.add_argument("--max-answer-len", type=int, default=30, help="longest answer, in tokens")
            p.add_argument("--max-seq-len", type=int, help="tokens per window, question and context (default: 384, or "
                           "the model's limit when lower)")
            p.add_argument("--doc-stride", type=int, default=128, help="context tokens shared by adjacent windows")
        else:
            p.add_argument("--text", action="append", help="a text (repeatable), before the files' records")
        if cmd == "classify":
            p.add_argument("--top-k", type=int, help="the k best labels with scores instead of the best one")
            p.add_argument("--threshold", type=float, default=0.5, help="multi-label models: sigmoid cut-off")
        p.add_argument("--batch-size", type=int, default=32, help="texts (answer: context windows) per forward")
        p.add_argument("--out", help="output .jsonl file (default: standard output)")
    if cmd in ("embed", "search", "cluster", "classify"):
        p.add_argument("--precision", choices=["fp32", "bf16", "int8"],
                       help="CPU inference GEMMs: fp32 (default), bf16 (AVX512-BF16/AMX) or int8 (dynamic "
                            "quantisation, VNNI); refused on a CPU without the instructions")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no note of the settings used")
    if cmd in ("embed", "search", "cluster"):
        p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                       help="run the eager forward on CUDA (default: CUDA graphs per token bucket)")
    return p


def cli_main(cmd: str, argv: Sequence[str]) -> int:
    if cmd not in CLI_COMMANDS:
        print(f"bertfast: tasks handles {', '.join(CLI_COMMANDS)}, not {cmd!r}", file=sys.stderr)
        return 2
    args = _parser(cmd).parse_args(list(argv))
    try:
        with truncation_notes(cmd):
            return _run_cli(cmd, args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"bertfast {cmd}: error: {e}", file=sys.stderr)
        return 1


def _embedding_settings(args, cmd: str) -> None:
    """embed/search/cluster: pooling, max_length (and embed's normalize) from the flags, else from a
    sentence-transformers folder as SentenceTransformer.encode reads it, else mean pooling, the
    model's limit, raw vectors; set on args (the sharded job's index records them). Says on
    stderr what a sentence-transformers folder led to."""
    from .st_folder import st_settings

    st = st_settings(args.model) if os.path.isdir(args.model) else None
    folder, used = st or {}, []
    if args.pooling is None and folder.get("pooling"):
        args.pooling = folder["pooling"]
        used.append(f"{args.pooling} pooling")
    if args.max_length is None and folder.get("max_length"):
        args.max_length = folder["max_length"]
        used.append(f"max_seq_length {args.max_length}")
    if cmd == "embed" and args.normalize is None and folder.get("normalize"):
        args.normalize = True
        used.append("unit vectors (Normalize)")
    args.pooling = args.pooling or "mean"
    if cmd == "embed":
        args.normalize = bool(args.normalize)
    if st is not None and not args.quiet:
        print(f"bertfast {cmd}: a sentence-transformers folder ({' -> '.join(st['modules'])}), followed as "
              f"SentenceTransformer.encode follows it: {', '.join(used) or 'nothing beyond the flags'} "
              f"(--pooling, --max-length{', --no-normalize' if cmd == 'embed' else ''} override)", file=sys.stderr)


def _positive(args, *names) -> None:
    for n in names:
        v = getattr(args, n, None)
        if v is not None and v < 1:
            raise ValueError(f"--{n.replace('_', '-')} must be >= 1, got {v}")


def _load_for(cls_name: str, args, cmd: Optional[str] = None):
    """_load, with --precision set on the model where the command has it."""
    model, tok = _load(cls_name, args.model, cmd)
    if getattr(args, "precision", None):
        from ..models.precision import set_inference_precision

        set_inference_precision(model, args.precision)
    return model, tok


def _run_cli(cmd: str, args) -> int:
    _positive(args, "batch_size", "top_k", "k", "max_answer_len", "max_seq_len", "shard_size", "max_length")
    show = not args.quiet
    if getattr(args, "precision", None):  # before any file is read or model loaded
        from ..dispatch.cpu_gemm import check_precision

        try:
            check_precision(args.precision)
        except RuntimeError as e:
            raise ValueError(f"--precision {args.precision}: {e}") from None
    if cmd == "fill-mask":
        texts = _texts(args, "fill-mask")
        for i, t in enumerate(texts):
            if "[MASK]" not in t:
                raise ValueError(f"text {i + 1} has no [MASK] token: {t!r}")
        model, tok = _load("BertForMaskedLM", args.model, cmd)
        from .mask_filling import fill_mask

        for t, per_mask in zip(texts, fill_mask(model, tok, texts, args.top_k)):
            for i, cands in enumerate(per_mask):
                for c in cands:
                    print(json.dumps({"text": t, "mask": i, "token": c["token"], "score": round(c["score"], 6),
                                      "sequence": c["sequence"]}, ensure_ascii=False))
    elif cmd == "embed":
        to_folder = _embed_to_folder(args.out)
        texts = _texts(args, "embed")
        _embedding_settings(args, cmd)
        if to_folder:
            from .shards import run

            summary = run(args, texts, lambda: _load_for("BertModel", args))
            if summary:  # rank 0's
                print(json.dumps(summary))
            return 0
        model, tok = _load_for("BertModel", args)
        from .embedding import embed

        emb = embed(model, tok, texts, args.pooling, args.layer, args.batch_size, max_length=args.max_length,
                    normalize=args.normalize, cuda_graphs=None if args.cuda_graphs else False,
                    long_texts=args.long_texts, progress_bar=show)
        if args.out == "-":
            for t, v in zip(texts, emb.tolist()):
                print(json.dumps({"text": t, "embedding": v}, ensure_ascii=False))
            return 0
        import numpy as np

        from .._io import save_numpy

        save_numpy(args.out, emb.numpy().astype(np.float32))  # never a half-written output
        print(json.dumps({"out": args.out, "shape": list(emb.shape)}))
    elif cmd == "search":
        if args.queries == "-" and args.corpus == "-":
            raise ValueError("--corpus and --queries cannot both read standard input")
        queries = _nonempty(args.query or [], "--query")
        if args.queries:
            queries += _read_lines(args.queries, "--queries")
        if not queries:
            raise ValueError("no query: give --query TEXT (repeatable) or --queries FILE")
        corpus = _read_lines(args.corpus, "--corpus")
        _embedding_settings(args, cmd)
        model, tok = _load_for("BertModel", args)
        from .embedding import search

        scores, idx = search(model, tok, queries, corpus, args.k, args.pooling,
                             cuda_graphs=None if args.cuda_graphs else False, long_texts=args.long_texts,
                             max_length=args.max_length, progress_bar=show)
        for qn, (q, row_s, row_i) in enumerate(zip(queries, scores.tolist(), idx.tolist())):
            for rank, (s, i) in enumerate(zip(row_s, row_i), 1):
                print(json.dumps({"query": qn, "query_text": q, "rank": rank, "score": round(s, 6), "line": i + 1,
                                  "text": corpus[i]}, ensure_ascii=False))
    elif cmd == "cluster":
        texts = _texts(args, "cluster")
        if not 1 <= args.k <= len(texts):
            raise ValueError(f"--k must be in [1, {len(texts)}] (the number of texts), got {args.k}")
        _embedding_settings(args, cmd)
        model, tok = _load_for("BertModel", args)
        from .embedding import embed, kmeans

        labels, _ = kmeans(embed(model, tok, texts, args.pooling, batch_size=args.batch_size,
                                 max_length=args.max_length, cuda_graphs=None if args.cuda_graphs else False,
                                 long_texts=args.long_texts, progress_bar=show),
                           args.k, seed=args.seed)
        for i, (lab, t) in enumerate(zip(labels.tolist(), texts), 1):
            print(json.dumps({"line": i, "cluster": lab, "text": t}, ensure_ascii=False))
    else:
        _run_head_cli(cmd, args)
    return 0


def _run_head_cli(cmd: str, args) -> None:
    """classify / tag / answer: every record is checked before the model is loaded."""
    if args.out is not None and os.path.isdir(args.out):  # before any model load
        raise ValueError(f"--out {args.out!r} is a folder; name the JSONL file to write")
    recs = []
    if cmd == "answer":
        if (args.question is None) != (args.context is None):
            raise ValueError("--question and --context go together")
        if args.question is not None:
            recs.append(("--question", {"question": args.question, "context": args.context}))
    else:
        recs += [("--text", {"text": t}) for t in _nonempty(args.text or [], "--text")]
    recs += _read_records(args.inputs, cmd)
    if not recs:
        raise ValueError("no input: name JSONL files, - for standard input, or give "
                         + ("--question and --context" if cmd == "answer" else "--text"))
    rows = [rec for _, rec in recs]
    if cmd == "classify":
        texts = [_field(w, r, CLASSIFY_TEXT) for w, r in recs]
        pairs = [_field(w, r, CLASSIFY_PAIR, required=False) for w, r in recs]
        # as fine-tuning encodes them: when any record has a pair, the others get an empty one
        pairs = [p or "" for p in pairs] if any(pairs) else None
        model, tok = _load_for("BertForSequenceClassification", args, cmd)
        from .classification import classify

        preds = classify(model, tok, texts, pairs, threshold=args.threshold, top_k=args.top_k,
                         batch_size=args.batch_size, progress_bar=not args.quiet)
        out = [{**r, **(p if isinstance(p, dict) else {"labels": p})} for r, p in zip(rows, preds)]
    elif cmd == "tag":
        inputs = []
        for w, r in recs:
            words = _field(w, r, TAG_WORDS, kind=list, required=False)
            inputs.append([str(x) for x in words] if words is not None else _field(w, r, ("text",)))
        model, tok = _load("BertForTokenClassification", args.model, cmd)
        from .tagging import tag_batch

        tags = tag_batch(model, tok, inputs, batch_size=args.batch_size, progress_bar=not args.quiet)
        out = [{**r, **t} for r, t in zip(rows, tags)]
    else:
        pairs = [(_field(w, r, ("question",)), _field(w, r, ("context",))) for w, r in recs]
        model, tok = _load("BertForQuestionAnswering", args.model, cmd)
        from .question_answering import answer_batch

        preds = answer_batch(model, tok, pairs, args.max_answer_len, args.max_seq_len, args.doc_stride,
                             args.batch_size, progress_bar=not args.quiet)
        out = [{**r, **a} for r, a in zip(rows, preds)]
    _write_jsonl(out, args.out)
