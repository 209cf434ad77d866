"""Fine-tuning: the task data formats (cls, nli, ner, qa) beside the loop that trains and
evaluates them, and the `bertfast finetune` argument parser."""
from __future__ import annotations

import csv
import json
import math
import os
import warnings
from typing import Dict, List, Optional, Sequence

import torch

from ..data import IGNORE_INDEX, derive_seed, pad_sequences
from .runtime import MetricsLog, Runtime, build_optimizer, progress_bar, refuse_earlier_run, warmup_linear_schedule

# ---- fine-tuning data -----------------------------------------------------------------------

from .args import DATA_FORMATS, TASKS  # noqa: F401 - re-exported
NLI_LABELS = ["entailment", "neutral", "contradiction"]

# `bertfast finetune --help` prints this; docs/cli.md repeats it.



def read_records(path: str, what: str) -> List[dict]:
    """Records of a .jsonl/.json (one object per line), .csv or .tsv (header row) file."""
    if not os.path.isfile(path):
        raise ValueError(f"{what}: {path!r} does not exist or is not a file")
    ext = os.path.splitext(path)[1].lower()
    rows: List[dict] = []
    from ..tasks.common import iter_jsonl, utf8_lines

    with open(path, "rb") as f:  # invalid UTF-8 is an error naming the file and line, as in every command
        if ext in (".jsonl", ".json"):
            for i, rec in iter_jsonl(f, path, what):
                rec["_line"] = i
                rows.append(rec)
        elif ext in (".csv", ".tsv"):
            text = (line for _, line in utf8_lines(f, path, what))
            for i, rec in enumerate(csv.DictReader(text, delimiter="\t" if ext == ".tsv" else ","), 2):
                rec["_line"] = i
                rows.append(rec)
        else:
            raise ValueError(f"{what}: {path!r} must end in .jsonl, .json, .csv or .tsv")
    if not rows:
        raise ValueError(f"{what}: {path!r} holds no records")
    return rows


def _field(rec: dict, names: Sequence[str], path: str, what: str):
    for n in names:
        if n in rec and rec[n] not in (None, ""):
            return rec[n]
    raise ValueError(f"{what}: {path} line {rec['_line']} lacks the field {' or '.join(map(repr, names))}")


def _labels_of(rec, path, what, multi):
    if multi:
        v = rec.get("labels", rec.get("label"))
        if isinstance(v, str):
            v = [x for x in v.split("|") if x]
        if not isinstance(v, list):
            raise ValueError(f"{what}: {path} line {rec['_line']}: multi-label records need a 'labels' list")
        return [str(x) for x in v]
    return str(_field(rec, ("label",), path, what))


def label_set(task: str, records: List[dict], path: str, multi: bool = False, given: Optional[str] = None):
    labels = _label_set(task, records, path, multi, given)
    where = "--labels" if given else f"--train {path}"
    _refuse_numeric_twins(labels, where)
    if task in ("cls", "nli") and not multi and len(labels) < 2:
        # one class trains to loss 0 and then answers it for every text with score 1.0
        raise ValueError(f"{where}: a classifier needs at least two classes, found only {labels}; add examples of "
                         f"the other classes (or name them all with --labels)")
    if task == "ner" and len(labels) < 2:
        warnings.warn(f"{where}: every token has the tag {labels[0]!r}: the tagger will learn to answer it for "
                      f"every word", stacklevel=2)
    return labels


def _refuse_numeric_twins(labels: List[str], where: str) -> None:
    """Labels written as numbers in two spellings (3 and 3.0: JSON int and float, or "03") would
    become two classes that mean one."""
    by_value: Dict[float, List[str]] = {}
    for lab in labels:
        try:
            v = float(lab)
        except ValueError:
            continue
        if math.isfinite(v):
            by_value.setdefault(v, []).append(lab)
    twins = [sorted(v) for v in by_value.values() if len(v) > 1]
    if twins:
        raise ValueError(f"{where}: the labels {' / '.join(repr(t) for t in twins[0])} are one number written two "
                         f"ways and would train as different classes; write each label one way")


def _label_set(task, records, path, multi, given):
    if given:
        return [x.strip() for x in given.split(",") if x.strip()]
    if task == "nli":
        found = {_labels_of(r, path, "--train", False) for r in records}
        if found <= set(NLI_LABELS):
            return list(NLI_LABELS)
        return sorted(found)
    if task == "cls":
        found = set()
        for r in records:
            v = _labels_of(r, path, "--train", multi)
            found.update(v if multi else [v])
        return sorted(found, key=lambda s: (len(s), s) if s.isdigit() else (0, s))
    if task == "ner":
        found = set()
        for r in records:
            found.update(str(t) for t in _field(r, ("tags", "ner_tags", "labels"), path, "--train"))
        return sorted(found, key=lambda t: (t != "O", t[2:], t))
    raise ValueError(f"task {task!r} has no label set")


def _label_id(label: str, label2id: dict, rec: dict, path: str, what: str) -> int:
    if label not in label2id:
        raise ValueError(f"{what}: {path} line {rec['_line']}: label {label!r} is not one of {sorted(label2id)}")
    return label2id[label]


def build_features(task: str, records: List[dict], tok, path: str, what: str, label2id: Optional[dict],
                   max_seq_len: int, multi: bool = False, doc_stride: int = 64) -> List[dict]:
    """Model-ready features (lists of ids and labels) for the records of one file."""
    feats = []
    if task in ("cls", "nli"):
        a_names = ("text", "sentence") if task == "cls" else ("premise", "sentence1")
        b_names = ("text_pair",) if task == "cls" else ("hypothesis", "sentence2")
        texts = [str(_field(r, a_names, path, what)) for r in records]
        pairs = [r.get(b_names[0], r.get(b_names[-1])) for r in records]
        if task == "nli":
            pairs = [str(_field(r, b_names, path, what)) for r in records]
        has_pair = any(p not in (None, "") for p in pairs)
        pairs = [str(p or "") for p in pairs] if has_pair else None
        enc = tok.encodings(texts, pairs, truncation=True, max_length=max_seq_len)
        _note_cut(what, sum(len(e.ids) > max_seq_len for e in tok.encodings(texts, pairs)), len(texts),
                  max_seq_len)
        for r, e in zip(records, enc):
            lab = _labels_of(r, path, what, multi)
            if multi:
                y = [0.0] * len(label2id)
                for x in lab:
                    y[_label_id(x, label2id, r, path, what)] = 1.0
            else:
                y = _label_id(lab, label2id, r, path, what)
            feats.append({"input_ids": e.ids, "token_type_ids": e.type_ids, "labels": y})
    elif task == "ner":
        words_list, tags_list = [], []
        for r in records:
            words = [str(w) for w in _field(r, ("tokens", "words"), path, what)]
            tags = [str(t) for t in _field(r, ("tags", "ner_tags", "labels"), path, what)]
            if len(words) != len(tags):
                raise ValueError(f"{what}: {path} line {r['_line']}: {len(words)} tokens but {len(tags)} tags")
            words_list.append(words)
            tags_list.append([_label_id(t, label2id, r, path, what) for t in tags])
        _note_cut(what, sum(len(e.ids) > max_seq_len for e in tok.word_encodings(words_list)),
                  len(words_list), max_seq_len, " (their last words are not trained on)")
        for r, e, tags in zip(records, encode_words(tok, words_list, max_seq_len), tags_list):
            labels, prev = [], None
            for w in e.word_ids:
                # Only a word's first piece carries its label; continuations and specials are ignored.
                labels.append(IGNORE_INDEX if w is None or w == prev else tags[w])
                prev = w
            feats.append({"input_ids": e.ids, "token_type_ids": e.type_ids, "labels": labels,
                          "word_ids": e.word_ids, "tags": tags})
    elif task == "qa":
        from ..tasks import qa_windows

        for i, r in enumerate(records):
            q = str(_field(r, ("question",), path, what))
            ctx = str(_field(r, ("context",), path, what))
            ans = r.get("answers") or {}
            texts = ans.get("text", []) if isinstance(ans, dict) else []
            starts = ans.get("answer_start", []) if isinstance(ans, dict) else []
            if "answer_text" in r and r["answer_text"] != "":
                texts, starts = [r["answer_text"]], [int(r["answer_start"])]
            span = None
            if texts:
                s = int(starts[0])
                if ctx[s:s + len(texts[0])] != texts[0]:
                    raise ValueError(f"{what}: {path} line {r['_line']}: answer_start {s} does not point at "
                                     f"{texts[0]!r} in the context")
                span = (s, s + len(texts[0]))
            for w in qa_windows(tok, q, ctx, max_seq_len, doc_stride):
                sp = ep = 0  # [CLS]: the answer is not in this window
                if span is not None:
                    tok_s = [k for k, (a, b) in enumerate(w["offsets"]) if w["is_context"][k] and b > span[0]
                             and a < span[1]]
                    if tok_s and w["offsets"][tok_s[0]][0] <= span[0] and w["offsets"][tok_s[-1]][1] >= span[1]:
                        sp, ep = tok_s[0], tok_s[-1]
                feats.append({**w, "start_positions": sp, "end_positions": ep, "example": i,
                              "answers": list(texts), "context": ctx})
    else:
        raise ValueError(f"--task must be one of {TASKS}, got {task!r}")
    return feats


def _note_cut(what: str, n_cut: int, total: int, max_seq_len: int, consequence: str = "") -> None:
    if n_cut:
        from ..tasks import TruncationWarning

        warnings.warn(f"{what}: {n_cut} of {total} records are longer than --max-seq-len {max_seq_len} tokens and "
                      f"were cut to it{consequence}", TruncationWarning, stacklevel=3)


def encode_words(tok, words_list: List[List[str]], max_seq_len: int):
    """Encodings of pre-split words (word_ids map pieces back to words), truncated to max_seq_len."""
    return tok.word_encodings(words_list, max_seq_len)


def collate_features(feats: List[dict], pad_id: int, task: str) -> Dict[str, torch.Tensor]:
    batch = {"input_ids": pad_sequences([f["input_ids"] for f in feats], pad_id),
             "token_type_ids": pad_sequences([f["token_type_ids"] for f in feats], 0)}
    batch["attention_mask"] = pad_sequences([[1] * len(f["input_ids"]) for f in feats], 0)
    if task == "qa":
        batch["start_positions"] = torch.tensor([f["start_positions"] for f in feats])
        batch["end_positions"] = torch.tensor([f["end_positions"] for f in feats])
    elif task == "ner":
        batch["labels"] = pad_sequences([f["labels"] for f in feats], IGNORE_INDEX)
    else:
        y = [f["labels"] for f in feats]
        batch["labels"] = torch.tensor(y, dtype=torch.float32 if isinstance(y[0], list) else torch.long)
    return batch


# ---- fine-tuning ----------------------------------------------------------------------------


@torch.no_grad()
def evaluate_finetune(task: str, model, feats: List[dict], tok, rt: Runtime, batch_size: int, id2label: dict,
                      multi: bool = False, threshold: float = 0.5, max_answer_len: int = 30) -> dict:
    from .. import tasks as T

    model.eval()
    res: Dict[str, float] = {}
    correct = total = 0
    tp = fp = fn = 0
    qa_best: Dict[int, tuple] = {}
    loss_sum, loss_n = 0.0, 0
    for i in range(0, len(feats), batch_size):
        chunk = feats[i:i + batch_size]
        batch = {k: v.to(rt.device) for k, v in collate_features(chunk, tok.pad_token_id, task).items()}
        with rt.autocast():
            out = model(**batch)
        loss_sum += out.loss.item() * len(chunk)
        loss_n += len(chunk)
        if task in ("cls", "nli"):
            logits = out.logits.float().cpu()
            if multi:
                pred = torch.sigmoid(logits) >= threshold
                gold = batch["labels"].cpu() > 0.5
                correct += int((pred == gold).all(-1).sum())
                tp += int((pred & gold).sum())
                fp += int((pred & ~gold).sum())
                fn += int((~pred & gold).sum())
            else:
                correct += int((logits.argmax(-1) == batch["labels"].cpu()).sum())
            total += len(chunk)
        elif task == "ner":
            logits = out.logits.float().cpu()
            for f, lg in zip(chunk, logits):
                # aligned by word index: a word without pieces has no prediction (None), and words
                # past the last one the truncated encoding reaches are not scored
                n = 1 + max((w for w in f["word_ids"] if w is not None), default=-1)
                pred_words = T.word_labels(T.piece_tags(model, lg[:len(f["input_ids"])], f["word_ids"]),
                                           f["word_ids"], n)
                gold_tags = [id2label[t] for t in f["tags"][:n]]
                pred_tags = [None if p is None else id2label[p] for p in pred_words]
                scored = [(a, b) for a, b in zip(gold_tags, pred_tags) if b is not None]
                correct += sum(a == b for a, b in scored)
                total += len(scored)
                g = {(s["start"], s["end"], s["type"]) for s in T.bio_spans(gold_tags)}
                pred_spans = T.bio_spans(["O" if t is None else t for t in pred_tags])
                p = {(s["start"], s["end"], s["type"]) for s in pred_spans}
                tp, fp, fn = tp + len(g & p), fp + len(p - g), fn + len(g - p)
        else:
            st, en = out.start_logits.float().cpu(), out.end_logits.float().cpu()
            for f, s_l, e_l in zip(chunk, st, en):
                n = len(f["input_ids"])
                span = T.best_span(s_l[:n], e_l[:n], torch.tensor(f["is_context"]), max_answer_len)
                if span is not None and (f["example"] not in qa_best or span[2] > qa_best[f["example"]][0]):
                    a, b = f["offsets"][span[0]][0], f["offsets"][span[1]][1]
                    qa_best[f["example"]] = (span[2], f["context"][a:b], f["answers"])
                elif f["example"] not in qa_best:
                    qa_best[f["example"]] = (-math.inf, "", f["answers"])
    res["eval_loss"] = loss_sum / max(1, loss_n)
    if task in ("cls", "nli"):
        res["eval_accuracy"] = correct / max(1, total)
        if multi:
            res["eval_micro_f1"] = 2 * tp / max(1, 2 * tp + fp + fn)
    elif task == "ner":
        res["eval_token_accuracy"] = correct / max(1, total)
        res["eval_entity_f1"] = 2 * tp / max(1, 2 * tp + fp + fn)
    else:
        em = f1 = 0.0
        for _score, pred, answers in qa_best.values():
            golds = answers or [""]
            em += max(float(T.normalize_answer(pred) == T.normalize_answer(g)) for g in golds)
            f1 += max(T.answer_f1(pred, g) for g in golds)
        res["eval_exact_match"] = em / max(1, len(qa_best))
        res["eval_f1"] = f1 / max(1, len(qa_best))
    model.train()
    return res


def check_finetune_options(args) -> None:
    """Every numeric option checked for type, finiteness and range before anything is read or
    written (NaN compares false with everything, so each test is written to fail on it)."""
    for name in ("epochs", "batch_size", "max_seq_len", "log_every", "max_answer_len", "doc_stride"):
        v = getattr(args, name, 1)
        low = 0 if name == "doc_stride" else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")
    if getattr(args, "threads", None) is not None and (not isinstance(args.threads, int) or args.threads < 1):
        raise ValueError(f"--threads must be a positive integer, got {args.threads!r}")
    ranges = {  # name: (lowest, highest, lowest allowed itself)
        "lr": (0.0, math.inf, False), "weight_decay": (0.0, math.inf, True), "max_grad_norm": (0.0, math.inf, False),
        "warmup_ratio": (0.0, 1.0, True), "threshold": (0.0, 1.0, True)}
    for name, (lo, hi, lo_ok) in ranges.items():
        v = getattr(args, name, None)
        if v is None:
            continue
        flag = f"--{name.replace('_', '-')}"
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{flag} must be a finite number, got {v!r}")
        if not (v >= lo if lo_ok else v > lo) or v > hi:
            want = f"in [{lo:g}, {hi:g}]" if hi != math.inf else (f">= {lo:g}" if lo_ok else f"> {lo:g}")
            raise ValueError(f"{flag} must be {want}, got {v!r}")


def _stop_if_not_finite(loss: float, step: int, epoch: int) -> None:
    """A NaN or infinite loss stops fine-tuning before its optimizer step (as pre-training does):
    training on spreads NaN into every weight, and --out must not receive such a model."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss} at step {step + 1} (epoch {epoch + 1}); stopped before "
                                 f"the optimizer step and nothing was saved. Lower --lr or --max-grad-norm")


def finetune(args) -> dict:
    rt = Runtime(args.device)
    try:
        return _finetune(args, rt)
    finally:
        rt.close()


def _finetune(args, rt: Runtime) -> dict:
    from ..models import BertConfig, BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification
    from ..tokenizer import Tokenizer

    if args.task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {args.task!r}")
    if getattr(args, "crf", False) and args.task != "ner":
        raise ValueError(f"--crf is a sequence-labelling head: it needs --task ner, got --task {args.task}")
    if not os.path.isdir(args.model):
        raise ValueError(f"--model must be a checkpoint folder (config.json + weights), got {args.model!r}")
    check_finetune_options(args)
    refuse_earlier_run(args.out, getattr(args, "overwrite", False), resumable=False)
    if args.threads:
        torch.set_num_threads(args.threads)
    multi = bool(args.multi_label)
    if multi and args.task != "cls":
        raise ValueError("--multi-label applies to --task cls only")
    tok = Tokenizer.from_pretrained(args.model)
    base_config = BertConfig.from_pretrained(args.model)
    if args.max_seq_len > base_config.longest_sequence:
        raise ValueError(f"--max-seq-len is {args.max_seq_len}, more tokens than the model holds: at most "
                         f"{base_config.longest_sequence} (max_position_embeddings in {args.model}/config.json)")
    train_recs = read_records(args.train, "--train")
    eval_recs = read_records(args.eval, "--eval") if args.eval else []
    labels = label_set(args.task, train_recs, args.train, multi, args.labels) if args.task != "qa" else None
    label2id = {lab: i for i, lab in enumerate(labels)} if labels else None
    # Features (and so every label check) are built before anything is written.
    train_feats = build_features(args.task, train_recs, tok, args.train, "--train", label2id, args.max_seq_len,
                                 multi, args.doc_stride)
    eval_feats = build_features(args.task, eval_recs, tok, args.eval, "--eval", label2id, args.max_seq_len, multi,
                                args.doc_stride) if eval_recs else []
    cfg = base_config.to_dict()
    tok.check_fits(cfg["vocab_size"], f"--model {args.model}")
    cfg.pop("architectures", None)
    if labels:
        cfg.update(num_labels=len(labels), id2label={i: lab for i, lab in enumerate(labels)}, label2id=label2id)
    else:
        cfg.update(num_labels=2, id2label=None, label2id=None)
    if args.task == "cls":
        cfg["problem_type"] = "multi_label_classification" if multi else "single_label_classification"
    if args.task == "ner" and getattr(args, "crf", False):
        cfg.update(use_crf=True, crf_constraints=_crf_constraints(getattr(args, "crf_constraints", "auto"), labels))
    cls = {"cls": BertForSequenceClassification, "nli": BertForSequenceClassification,
           "ner": BertForTokenClassification, "qa": BertForQuestionAnswering}[args.task]
    torch.manual_seed(args.seed)
    with warnings.catch_warnings():
        # The new head is expected to be missing from the encoder checkpoint.
        warnings.filterwarnings("ignore", message=".*were not in the checkpoint.*")
        warnings.filterwarnings("ignore", message=".*checkpoint weights were not used.*")
        model = cls.from_pretrained(args.model, config=BertConfig.from_dict(cfg))
    model.to(rt.device).train()
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    # Each rank takes every world-th example of a per-epoch permutation; equal batch counts per
    # rank keep DDP's collectives in step.
    per_rank = len(train_feats) // rt.world
    steps_per_epoch = max(1, per_rank // args.batch_size)
    total = steps_per_epoch * args.epochs
    scheduler = warmup_linear_schedule(optimizer, int(args.warmup_ratio * total), total)
    ddp_model = model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if rt.main:
        os.makedirs(args.out, exist_ok=True)
    metrics = MetricsLog(os.path.join(args.out, "metrics.jsonl"), rt.main)
    id2label = {i: lab for i, lab in enumerate(labels)} if labels else {}
    bar = progress_bar(total, 0, rt.main and not args.no_progress, f"finetune {args.task}")
    step, last, train_loss = 0, {}, float("nan")
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_feats), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        mine = order[rt.rank::rt.world][:steps_per_epoch * args.batch_size]
        run_loss, run_n, epoch_loss = 0.0, 0, 0.0
        for b in range(steps_per_epoch):
            chunk = [train_feats[i] for i in mine[b * args.batch_size:(b + 1) * args.batch_size]]
            batch = {k: v.to(rt.device) for k, v in collate_features(chunk, tok.pad_token_id, args.task).items()}
            torch.manual_seed(derive_seed(args.seed, "dropout", step, rt.rank))
            with rt.autocast():
                out = ddp_model(**batch)
            loss_value = out.loss.item()
            _stop_if_not_finite(loss_value, step, epoch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            run_loss += loss_value
            epoch_loss += loss_value
            run_n += 1
            bar.update(1)
            if step % args.log_every == 0:
                (loss,) = rt.all_mean([run_loss / run_n])
                metrics.write({"step": step, "epoch": epoch, "loss": loss, "lr": lr})
                bar.set_postfix(loss=f"{loss:.4f}")
                run_loss, run_n = 0.0, 0
        (train_loss,) = rt.all_mean([epoch_loss / steps_per_epoch])
        if eval_feats and rt.main:
            last = {"step": step, "epoch": epoch + 1,
                    **evaluate_finetune(args.task, model, eval_feats, tok, rt, args.batch_size, id2label, multi,
                                        args.threshold, args.max_answer_len)}
            metrics.write(last)
            if epoch + 1 < args.epochs:  # the last epoch's line is the summary the command prints
                bar.write(json.dumps(last))
        rt.barrier()
    bar.close()
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:  # the last optimizer step can overflow after a finite loss
        raise FloatingPointError(f"the trained weights hold NaN or inf ({len(bad)} tensors, e.g. {bad[0]}); nothing "
                                 f"was saved to {args.out}. Lower --lr or --max-grad-norm")
    if rt.main:
        model.save_pretrained(args.out, tokenizer=tok)
    rt.barrier()
    # with or without --eval: where the model went and how training ended, then the last evaluation
    return {"out": args.out, "task": args.task, "steps": step, "epochs": args.epochs,
            "train_loss": round(train_loss, 6), **last}


def _crf_constraints(given: str, labels: List[str]) -> Optional[str]:
    """'bio' or None for config.crf_constraints; 'auto' is 'bio' when every label is O, B-X or I-X."""
    if given == "auto":
        bio = all(lab == "O" or (lab[:2] in ("B-", "I-") and len(lab) > 2) for lab in labels)
        return "bio" if bio else None
    return None if given == "none" else given


