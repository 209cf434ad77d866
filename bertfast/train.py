"""Pre-training (MLM + NSP) and fine-tuning loops, single process or DDP through torchrun.

    bertfast pretrain --train corpus.txt --vocab-size 8000 --config tiny --max-steps 1000 \
        --batch-size 32 --seq-len 128 --out runs/tiny
    torchrun --nproc_per_node 2 -m bertfast pretrain ...        # DDP: gloo on CPU, nccl on GPU
    bertfast finetune --task cls --model runs/tiny --train train.jsonl --eval dev.jsonl --out runs/cls

Pre-training output folder:
    config.json, model.safetensors, tokenizer.json, vocab.txt, tokenizer_config.json  (final model;
        transformers' BertForPreTraining and bertfast's from_pretrained load it)
    metrics.jsonl              one JSON object per logged step (and per evaluation)
    checkpoints/step-N/        model + trainer_state.pt (optimizer, scheduler, RNG, data position)
    checkpoints/latest         name of the newest complete checkpoint (written atomically)

Exact resume: every source of randomness is either saved (optimizer/scheduler/RNG state) or
derived from (seed, step, shard) (dropout is reseeded per micro-batch, the data stream is a pure
function of its position), so `--resume` continues with the very losses an uninterrupted run makes.

Data sharding: the corpus is dealt into `--num-shards` shards (default: the world size); rank r
owns shards r, r+W, ...; micro-batch m of a rank reads owned shard m % len(owned). Hence one process
with --num-shards 2 --grad-accum 2 sees exactly the batches two DDP ranks with --grad-accum 1 see,
and ends with the same parameters.

Fine-tuning data formats (one record per line for .jsonl; a header row for .csv/.tsv):
    cls   {"text": ..., "label": "sports"}          optional "text_pair"; multi-label: "labels": [..]
          csv/tsv columns: text,label[,text_pair]
    nli   {"premise": ..., "hypothesis": ..., "label": "entailment|neutral|contradiction"}
          (sentence1/sentence2 accepted too); csv/tsv columns: premise,hypothesis,label
    ner   {"tokens": ["John", "lives", "in", "Paris"], "tags": ["B-PER", "O", "O", "B-LOC"]}  (jsonl)
    qa    {"question": ..., "context": ..., "answers": {"text": ["..."], "answer_start": [17]}}  (jsonl,
          SQuAD style; an empty answers list means unanswerable)
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .data import (
    IGNORE_INDEX,
    CorpusError,
    PretrainingStream,
    batch_iterator,
    check_corpus_files,
    derive_seed,
    pad_sequences,
)

# ---- optimisation ---------------------------------------------------------------------------


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    """AdamW groups: weight decay on matrices and embeddings only, never on biases or LayerNorm
    (BERT's recipe). Tied parameters appear once."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, lr: float, weight_decay: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-6):
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    kw = {}
    if next(model.parameters()).is_cuda:
        kw["fused"] = True
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, **kw)


def warmup_linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up from 0 to the peak lr over warmup_steps, then linear decay to 0 at total_steps."""
    warmup_steps, total_steps = max(0, int(warmup_steps)), max(1, int(total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- distributed runtime --------------------------------------------------------------------


class Runtime:
    """Rank, world and device; initialises torch.distributed when launched by torchrun."""

    def __init__(self, device: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
        use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
        if use_cuda and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA device is available")
        if use_cuda:
            torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.distributed = self.world > 1
        if self.distributed and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.distributed:
            torch.distributed.barrier()

    def all_mean(self, values: List[float]) -> List[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return (t / self.world).tolist()

    def all_sum(self, values: List[float]) -> List[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, obj):
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def close(self):
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def autocast(self):
        # bf16 autocast on GPU (no loss scaling needed); CPU trains in fp32, where bf16 autocast
        # is slower than fp32 on most CPUs and hurts exact reproducibility.
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- files ----------------------------------------------------------------------------------


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


class MetricsLog:
    """metrics.jsonl, appended line by line; on resume, lines past the checkpoint are dropped so
    the file reads as one uninterrupted run."""

    def __init__(self, path: str, enabled: bool, resume_step: Optional[int] = None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is None:
            _atomic_write_text(path, "")
        elif os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            _atomic_write_text(path, "".join(keep))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, file=sys.stderr)


# ---- pre-training ---------------------------------------------------------------------------


def _load_or_train_tokenizer(args, rt: Runtime):
    from .tokenizer import Tokenizer

    if args.tokenizer:
        return Tokenizer.from_pretrained(args.tokenizer)
    if args.init:
        return Tokenizer.from_pretrained(args.init)
    folder = os.path.join(args.out, "tokenizer")
    if args.resume and os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return Tokenizer.from_pretrained(folder)
    if rt.main:
        tok = Tokenizer.train(args.train, vocab_size=args.vocab_size, lowercase=not args.cased)
        tmp = folder + f".tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    rt.barrier()
    return Tokenizer.from_pretrained(folder)


def _model_config(args, vocab_size: int):
    from .models import BertConfig

    over = {"vocab_size": vocab_size, "max_position_embeddings": max(512, args.seq_len)}
    if args.dropout is not None:
        over.update(hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
    if args.attention_dropout is not None:
        over["attention_probs_dropout_prob"] = args.attention_dropout
    if os.path.isfile(args.config):
        cfg = BertConfig.from_json_file(args.config).to_dict()
        cfg.update(over)
        return BertConfig.from_dict(cfg)
    return BertConfig.preset(args.config, **over)


def _latest_checkpoint(out: str) -> Optional[str]:
    latest = os.path.join(out, "checkpoints", "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(out, "checkpoints", name)
    return path if os.path.isfile(os.path.join(path, "trainer_state.pt")) else None


def _save_checkpoint(out: str, step: int, model, optimizer, scheduler, rt: Runtime, extra: dict, keep: int):
    """All ranks call this (RNG states are gathered); rank 0 writes step-N.tmp, renames it to
    step-N (atomic) and then points `latest` at it (atomic), so a crash leaves the previous
    checkpoint intact."""
    rngs = rt.gather(_rng_state())
    if rt.main:
        root = os.path.join(out, "checkpoints")
        os.makedirs(root, exist_ok=True)
        name = f"step-{step:08d}"
        final, tmp = os.path.join(root, name), os.path.join(root, name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rngs, "world_size": rt.world, **extra}
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write_text(os.path.join(root, "latest"), name)
        steps = sorted(d for d in os.listdir(root) if d.startswith("step-") and ".tmp" not in d)
        for old in steps[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    rt.barrier()


def _pretraining_losses(model, batch, sparse: bool):
    """(loss, mlm_loss, nsp_loss, mlm_correct, mlm_count, nsp_correct, nsp_count), computed here
    rather than by the head so the two losses can be logged apart."""
    labels = batch["labels"]
    out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], labels=labels,
                sparse_prediction=sparse)
    logits = out.prediction_logits
    if sparse:
        lab = labels.reshape(-1)[labels.reshape(-1) != IGNORE_INDEX]
    else:
        sel = labels.reshape(-1) != IGNORE_INDEX
        logits, lab = logits.reshape(-1, logits.shape[-1])[sel], labels.reshape(-1)[sel]
    mlm = F.cross_entropy(logits.float(), lab) if lab.numel() else logits.sum() * 0.0
    nsp_logits = out.seq_relationship_logits.float()
    nsp_lab = batch["next_sentence_label"].reshape(-1)
    nsp = F.cross_entropy(nsp_logits, nsp_lab)
    with torch.no_grad():
        mc = (logits.argmax(-1) == lab).sum().item()
        nc = (nsp_logits.argmax(-1) == nsp_lab).sum().item()
    return mlm + nsp, mlm, nsp, mc, lab.numel(), nc, nsp_lab.numel()


@torch.no_grad()
def evaluate_pretraining(model, batches, rt: Runtime, sparse: bool = True) -> dict:
    was = model.training
    model.eval()
    tot = {"mlm": 0.0, "nsp": 0.0, "mc": 0, "mn": 0, "nc": 0, "nn": 0, "b": 0}
    for batch in batches:
        batch = {k: v.to(rt.device) for k, v in batch.items()}
        with rt.autocast():
            _, mlm, nsp, mc, mn, nc, nn_ = _pretraining_losses(model, batch, sparse)
        tot["mlm"] += mlm.item() * mn
        tot["nsp"] += nsp.item() * nn_
        tot["mc"] += mc
        tot["mn"] += mn
        tot["nc"] += nc
        tot["nn"] += nn_
    model.train(was)
    return {"eval_mlm_loss": tot["mlm"] / max(1, tot["mn"]), "eval_mlm_acc": tot["mc"] / max(1, tot["mn"]),
            "eval_nsp_loss": tot["nsp"] / max(1, tot["nn"]), "eval_nsp_acc": tot["nc"] / max(1, tot["nn"]),
            "eval_examples": tot["nn"]}


def pretrain(args) -> dict:
    """Run pre-training from parsed arguments (see `pretrain_parser`). Returns the last metrics."""
    from .models import BertForPreTraining

    rt = Runtime(args.device)
    try:
        return _pretrain(args, rt, BertForPreTraining)
    finally:
        rt.close()


def _validate_pretrain_args(args):
    for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "vocab_size", "eval_batches"):
        v = getattr(args, name)
        if not isinstance(v, int) or v < (0 if name == "eval_batches" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if args.seq_len < 8:
        raise ValueError(f"--seq-len must be >= 8 (room for [CLS] A [SEP] B [SEP]), got {args.seq_len}")
    if args.eval_only:
        if not args.eval or not args.init:
            raise ValueError("--eval-only needs --init (the model folder) and --eval (corpus files)")
    elif not args.train:
        raise ValueError("--train must name at least one corpus file")
    else:
        check_corpus_files(args.train, "--train")
    if args.init and not os.path.isfile(os.path.join(args.init, "config.json")):
        raise ValueError(f"--init must be a model folder with config.json, got {args.init!r}")
    if args.eval:
        check_corpus_files(args.eval, "--eval")
    if not os.path.isfile(args.config):
        from .models.config import PRESETS

        if args.config not in PRESETS:
            raise ValueError(f"--config must be one of {sorted(PRESETS)} or a config.json path, got {args.config!r}")
    if args.tokenizer and not os.path.isdir(args.tokenizer):
        raise ValueError(f"--tokenizer must be a folder with tokenizer.json or vocab.txt, got {args.tokenizer!r}")
    if not args.eval_only and not args.out:
        raise ValueError("--out must name the output folder")
    if args.resume and _latest_checkpoint(args.out) is None:
        raise ValueError(f"--resume: no complete checkpoint under {os.path.join(args.out, 'checkpoints')}")


def _pretrain(args, rt: Runtime, model_cls) -> dict:
    _validate_pretrain_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    num_shards = args.num_shards or rt.world
    if num_shards % rt.world:
        raise ValueError(f"--num-shards must be a multiple of the world size {rt.world}, got {num_shards}")
    if args.eval_only:
        return _eval_only(args, rt, model_cls)
    if rt.main:
        os.makedirs(args.out, exist_ok=True)
    rt.barrier()
    tok = _load_or_train_tokenizer(args, rt)
    torch.manual_seed(args.seed)
    if args.init:
        model = model_cls.from_pretrained(args.init).to(rt.device)
    else:
        model = model_cls(_model_config(args, tok.vocab_size)).to(rt.device)
    model.train()
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    warmup = args.warmup_steps if args.warmup_steps is not None else int(0.1 * args.max_steps)
    scheduler = warmup_linear_schedule(optimizer, warmup, args.max_steps)

    owned = [s for s in range(num_shards) if s % rt.world == rt.rank]
    consumed = {s: 0 for s in range(num_shards)}  # examples read from each shard
    step, tokens_seen = 0, 0
    ckpt = _latest_checkpoint(args.out) if args.resume else None
    if ckpt:
        from .models.hub import load_state, read_state_dict

        load_state(model, read_state_dict(ckpt), strict=True, source=ckpt)
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, tokens_seen = state["step"], state.get("tokens_seen", 0)
        consumed.update({int(k): v for k, v in state["consumed"].items()})
        if state["num_shards"] != num_shards:
            raise ValueError(f"--num-shards {num_shards} differs from the checkpoint's {state['num_shards']}")
        if state["world_size"] == rt.world:
            _set_rng_state(state["rng"][rt.rank])
        elif rt.main:
            warnings.warn(f"resuming on {rt.world} ranks a checkpoint saved on {state['world_size']}: "
                          "data and dropout continue exactly, other RNG streams restart", stacklevel=2)
    metrics = MetricsLog(os.path.join(args.out, "metrics.jsonl"), rt.main, step if ckpt else None)

    ddp_model = model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)

    def stream(shard):
        return PretrainingStream(args.train, tok, args.seq_len, seed=args.seed, shard=shard, num_shards=num_shards,
                                 mlm_probability=args.mlm_probability, whole_word_mask=args.whole_word_mask,
                                 short_seq_prob=args.short_seq_prob)

    iters = {s: batch_iterator(stream(s), args.batch_size, start=consumed[s]) for s in owned}
    eval_batches = _eval_stream_batches(args, tok, args.eval_batches) if args.eval and rt.main else []

    def run_eval():
        rec = None
        if rt.main and eval_batches:
            rec = {"step": step, **evaluate_pretraining(model, eval_batches, rt, not args.dense_mlm)}
            metrics.write(rec)
        rt.barrier()
        return rec

    extra_state = lambda: {"consumed": consumed, "num_shards": num_shards, "tokens_seen": tokens_seen,  # noqa: E731
                           "args": vars(args)}
    if step == 0 and args.eval_every:
        run_eval()
    bar = _progress(args.max_steps, step, rt.main and not args.no_progress, "pretrain")
    window = {"mlm": 0.0, "nsp": 0.0, "mc": 0, "mn": 0, "nc": 0, "nn": 0, "tok": 0, "n": 0, "t": time.perf_counter()}
    last = {}
    while step < args.max_steps:
        micro_total = args.grad_accum
        for j in range(micro_total):
            m = step * micro_total + j
            shard = owned[m % len(owned)]
            batch = next(iters[shard])
            consumed_local = args.batch_size
            batch = {k: v.to(rt.device, non_blocking=True) for k, v in batch.items()}
            # Dropout is reseeded from (step, shard): the same micro-batch gets the same masks
            # whichever rank or process runs it and after any resume.
            torch.manual_seed(derive_seed(args.seed, "dropout", step, shard))
            sync = j == micro_total - 1 or not rt.distributed
            ctx = contextlib.nullcontext() if sync else ddp_model.no_sync()
            with ctx:
                with rt.autocast():
                    loss, mlm, nsp, mc, mn, nc, nn_ = _pretraining_losses(ddp_model, batch, not args.dense_mlm)
                (loss / micro_total).backward()
            window["mlm"] += mlm.item()
            window["nsp"] += nsp.item()
            window["mc"] += mc
            window["mn"] += mn
            window["nc"] += nc
            window["nn"] += nn_
            window["tok"] += int(batch["attention_mask"].sum())
            window["n"] += 1
            # Every rank advances every shard's counter the same way, so rank 0 can save all of them.
            for r in range(rt.world):
                r_owned = [s for s in range(num_shards) if s % rt.world == r]
                consumed[r_owned[m % len(r_owned)]] += consumed_local
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % args.log_every == 0 or step == args.max_steps:
            n = window["n"]
            mlm_l, nsp_l = rt.all_mean([window["mlm"] / n, window["nsp"] / n])
            mc, mn, nc, nn_, toks = rt.all_sum([window["mc"], window["mn"], window["nc"], window["nn"], window["tok"]])
            dt = time.perf_counter() - window["t"]
            tokens_seen += int(toks)
            last = {"step": step, "mlm_loss": mlm_l, "nsp_loss": nsp_l, "mlm_acc": mc / max(1, mn),
                    "nsp_acc": nc / max(1, nn_), "lr": lr, "grad_norm": float(grad_norm),
                    "tokens_per_s": toks / max(dt, 1e-9), "tokens_seen": tokens_seen}
            metrics.write(last)
            bar.set_postfix(mlm=f"{mlm_l:.3f}", nsp=f"{nsp_l:.3f}", lr=f"{lr:.1e}")
            window = {k: 0 for k in window}
            window["t"] = time.perf_counter()
        if args.eval_every and (step % args.eval_every == 0 or step == args.max_steps):
            rec = run_eval()
            if rec:
                last.update(rec)
        if args.save_every and (step % args.save_every == 0 or step == args.max_steps):
            _save_checkpoint(args.out, step, model, optimizer, scheduler, rt, extra_state(), args.keep_checkpoints)
        if window["n"] == 0:  # evaluation and saving do not count against training throughput
            window["t"] = time.perf_counter()
    bar.close()
    if rt.main:
        model.save_pretrained(args.out)
        tok.save_pretrained(args.out)
    rt.barrier()
    return last


def _eval_stream_batches(args, tok, max_batches):
    es = PretrainingStream(args.eval, tok, args.seq_len, seed=args.seed + 1, epochs=1,
                           mlm_probability=args.mlm_probability, whole_word_mask=args.whole_word_mask,
                           short_seq_prob=0.0)
    out = []
    for i, b in enumerate(batch_iterator(es, args.batch_size, drop_last=False)):
        if max_batches and i >= max_batches:
            break
        out.append(b)
    return out


def _eval_only(args, rt: Runtime, model_cls) -> dict:
    """MLM/NSP loss and accuracy of a saved model on held-out corpus files; writes nothing."""
    from .tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(args.tokenizer or args.init)
    model = model_cls.from_pretrained(args.init).to(rt.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    return evaluate_pretraining(model, _eval_stream_batches(args, tok, args.eval_batches), rt, not args.dense_mlm)


def pretrain_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bertfast pretrain", description="MLM + NSP pre-training from BERT-format text "
                                "files (one sentence per line, a blank line between documents).")
    p.add_argument("--train", nargs="+", help="corpus files (required unless --eval-only)")
    p.add_argument("--eval", nargs="+", help="held-out corpus files, evaluated every --eval-every steps")
    p.add_argument("--out", help="output folder (model, tokenizer, metrics.jsonl, checkpoints/)")
    p.add_argument("--init", help="start from this model folder (BertForPreTraining weights + tokenizer) instead "
                   "of random weights")
    p.add_argument("--eval-only", action="store_true", help="only evaluate --init on --eval (MLM/NSP loss and "
                   "accuracy, all --eval-batches of it; 0 = the whole corpus) and print the result")
    p.add_argument("--tokenizer", help="tokenizer folder; without it a WordPiece vocab is trained on --train")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--cased", action="store_true", help="keep case when training a vocabulary")
    p.add_argument("--config", default="tiny", help="tiny | mini | base | large, or a config.json path")
    p.add_argument("--dropout", type=float, help="override hidden and attention dropout")
    p.add_argument("--attention-dropout", type=float, help="override attention dropout only (0 skips the "
                   "attention-probability masks, the costliest part of a small model's CPU step)")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per micro-batch per rank")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, help="default: 10%% of --max-steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--mlm-probability", type=float, default=0.15)
    p.add_argument("--whole-word-mask", action="store_true")
    p.add_argument("--short-seq-prob", type=float, default=0.1)
    p.add_argument("--dense-mlm", action="store_true", help="project every position to the vocabulary "
                   "(default: only the masked ones)")
    p.add_argument("--num-shards", type=int, help="data shards (default: world size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoints/latest")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch CPU threads per process")
    p.add_argument("--no-progress", action="store_true")
    return p


# ---- fine-tuning data -----------------------------------------------------------------------

TASKS = ("cls", "nli", "ner", "qa")
NLI_LABELS = ["entailment", "neutral", "contradiction"]


def read_records(path: str, what: str) -> List[dict]:
    """Records of a .jsonl/.json (one object per line), .csv or .tsv (header row) file."""
    if not os.path.isfile(path):
        raise ValueError(f"{what}: {path!r} does not exist or is not a file")
    ext = os.path.splitext(path)[1].lower()
    rows: List[dict] = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if ext in (".jsonl", ".json"):
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{what}: {path} line {i} is not JSON ({e.msg})") from e
                    if not isinstance(rec, dict):
                        raise ValueError(f"{what}: {path} line {i} must be a JSON object")
                    rec["_line"] = i
                    rows.append(rec)
            elif ext in (".csv", ".tsv"):
                for i, rec in enumerate(csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ","), 2):
                    rec["_line"] = i
                    rows.append(rec)
            else:
                raise ValueError(f"{what}: {path!r} must end in .jsonl, .json, .csv or .tsv")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}: {path!r} is not UTF-8 text") from e
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
        enc = tok.encodings(texts, [str(p or "") for p in pairs] if has_pair else None, truncation=True,
                            max_length=max_seq_len)
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
        for r, e, tags in zip(records, encode_words(tok, words_list, max_seq_len), tags_list):
            labels, prev = [], None
            for w in e.word_ids:
                # Only a word's first piece carries its label; continuations and specials are ignored.
                labels.append(IGNORE_INDEX if w is None or w == prev else tags[w])
                prev = w
            feats.append({"input_ids": e.ids, "token_type_ids": e.type_ids, "labels": labels,
                          "word_ids": e.word_ids, "tags": tags})
    elif task == "qa":
        from .tasks import qa_windows

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


def encode_words(tok, words_list: List[List[str]], max_seq_len: int):
    """Encodings of pre-split words (word_ids map pieces back to words), truncated to max_seq_len."""
    raw = tok._tok
    raw.enable_truncation(max_seq_len)
    try:
        return raw.encode_batch(words_list, is_pretokenized=True)
    finally:
        raw.no_truncation()


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
    from . import tasks as T

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
                pred_words = T.word_labels(lg[:len(f["input_ids"])].argmax(-1).tolist(), f["word_ids"])
                n = len(pred_words)
                gold_tags = [id2label[t] for t in f["tags"][:n]]
                pred_tags = [id2label[p] for p in pred_words]
                correct += sum(a == b for a, b in zip(gold_tags, pred_tags))
                total += n
                g = {(s["start"], s["end"], s["type"]) for s in T.bio_spans(gold_tags)}
                p = {(s["start"], s["end"], s["type"]) for s in T.bio_spans(pred_tags)}
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


def finetune(args) -> dict:
    rt = Runtime(args.device)
    try:
        return _finetune(args, rt)
    finally:
        rt.close()


def _finetune(args, rt: Runtime) -> dict:
    from .models import BertConfig, BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification
    from .tokenizer import Tokenizer

    if args.task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {args.task!r}")
    if not os.path.isdir(args.model):
        raise ValueError(f"--model must be a checkpoint folder (config.json + weights), got {args.model!r}")
    for name in ("epochs", "batch_size", "max_seq_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    multi = bool(args.multi_label)
    if multi and args.task != "cls":
        raise ValueError("--multi-label applies to --task cls only")
    tok = Tokenizer.from_pretrained(args.model)
    train_recs = read_records(args.train, "--train")
    eval_recs = read_records(args.eval, "--eval") if args.eval else []
    labels = label_set(args.task, train_recs, args.train, multi, args.labels) if args.task != "qa" else None
    label2id = {lab: i for i, lab in enumerate(labels)} if labels else None
    # Features (and so every label check) are built before anything is written.
    train_feats = build_features(args.task, train_recs, tok, args.train, "--train", label2id, args.max_seq_len,
                                 multi, args.doc_stride)
    eval_feats = build_features(args.task, eval_recs, tok, args.eval, "--eval", label2id, args.max_seq_len, multi,
                                args.doc_stride) if eval_recs else []
    cfg = BertConfig.from_pretrained(args.model).to_dict()
    cfg.pop("architectures", None)
    if labels:
        cfg.update(num_labels=len(labels), id2label={i: lab for i, lab in enumerate(labels)}, label2id=label2id)
    else:
        cfg.update(num_labels=2, id2label=None, label2id=None)
    if args.task == "cls":
        cfg["problem_type"] = "multi_label_classification" if multi else "single_label_classification"
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
    bar = _progress(total, 0, rt.main and not args.no_progress, f"finetune {args.task}")
    step, last = 0, {}
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_feats), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        mine = order[rt.rank::rt.world][:steps_per_epoch * args.batch_size]
        run_loss, run_n = 0.0, 0
        for b in range(steps_per_epoch):
            chunk = [train_feats[i] for i in mine[b * args.batch_size:(b + 1) * args.batch_size]]
            batch = {k: v.to(rt.device) for k, v in collate_features(chunk, tok.pad_token_id, args.task).items()}
            torch.manual_seed(derive_seed(args.seed, "dropout", step, rt.rank))
            with rt.autocast():
                out = ddp_model(**batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            run_loss += out.loss.item()
            run_n += 1
            bar.update(1)
            if step % args.log_every == 0:
                (loss,) = rt.all_mean([run_loss / run_n])
                metrics.write({"step": step, "epoch": epoch, "loss": loss, "lr": lr})
                bar.set_postfix(loss=f"{loss:.4f}")
                run_loss, run_n = 0.0, 0
        if eval_feats and rt.main:
            last = {"step": step, "epoch": epoch + 1,
                    **evaluate_finetune(args.task, model, eval_feats, tok, rt, args.batch_size, id2label, multi,
                                        args.threshold, args.max_answer_len)}
            metrics.write(last)
            bar.write(json.dumps(last))
        rt.barrier()
    bar.close()
    if rt.main:
        model.save_pretrained(args.out)
        tok.save_pretrained(args.out)
    rt.barrier()
    return last


def finetune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bertfast finetune", description="Fine-tune a checkpoint for a task. Data "
                                "formats: see `python -c 'import bertfast.train as t; print(t.__doc__)'`.")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--model", required=True, help="checkpoint folder with config, weights and tokenizer")
    p.add_argument("--train", required=True, help=".jsonl/.csv/.tsv training file")
    p.add_argument("--eval", help=".jsonl/.csv/.tsv evaluation file (evaluated after each epoch)")
    p.add_argument("--out", required=True)
    p.add_argument("--labels", help="comma-separated label set (default: those of --train)")
    p.add_argument("--multi-label", action="store_true", help="cls: several labels per text (sigmoid + BCE)")
    p.add_argument("--threshold", type=float, default=0.5, help="multi-label decision threshold")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--doc-stride", type=int, default=64, help="qa: context tokens shared by adjacent windows")
    p.add_argument("--max-answer-len", type=int, default=30)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int)
    p.add_argument("--no-progress", action="store_true")
    return p


def cli_main(cmd: str, argv: Sequence[str]) -> int:
    parser = {"pretrain": pretrain_parser, "finetune": finetune_parser}.get(cmd)
    if parser is None:
        print(f"bertfast: train handles pretrain and finetune, not {cmd!r}", file=sys.stderr)
        return 2
    args = parser().parse_args(list(argv))
    try:
        result = pretrain(args) if cmd == "pretrain" else finetune(args)
    except (CorpusError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"bertfast {cmd}: error: {e}", file=sys.stderr)
        return 1
    if result and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0
