"""MLM + NSP pre-training: tokenizer and config set-up, the loop with exact resume, evaluation,
and the `bertfast pretrain` argument parser."""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
import warnings

import torch
import torch.nn.functional as F

from ..data import (IGNORE_INDEX, PretrainingStream, batch_iterator, check_corpus_files, derive_seed,
                    packed_batch_iterator)
from .runtime import (MetricsLog, Runtime, build_optimizer, checkpoint_candidates, corpus_fingerprint, load_checkpoint,
                      progress_bar, refuse_earlier_run, remove_partial_checkpoints, save_checkpoint, set_rng_state,
                      warmup_linear_schedule)

# ---- pre-training ---------------------------------------------------------------------------


def _load_or_train_tokenizer(args, rt: Runtime):
    from ..tokenizer import Tokenizer

    if args.tokenizer:
        return Tokenizer.from_pretrained(args.tokenizer)
    if args.init:
        return Tokenizer.from_pretrained(args.init)
    folder = os.path.join(args.out, "tokenizer")
    if args.resume and os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return Tokenizer.from_pretrained(folder)
    if rt.main:
        tok = Tokenizer.train(args.train, vocab_size=args.vocab_size, lowercase=not args.cased)
        tok.save_pretrained(folder)  # all-or-nothing
    rt.barrier()
    return Tokenizer.from_pretrained(folder)


def _model_config(args, vocab_size: int):
    from ..models import BertConfig

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


def packed_losses(model, batch):
    """_pretraining_losses of a packed batch (bertfast.data.pack_pretraining): (loss, dict of mlm,
    nsp, mlm_correct, mlm_count, nsp_correct, nsp_count), every value a device tensor: no host
    read, so a CUDA graph can capture it."""
    out = model(batch["input_ids"], token_type_ids=batch["token_type_ids"], position_ids=batch["position_ids"],
                cu_seqlens=batch["cu_seqlens"], masked_positions=batch["masked_positions"],
                masked_labels=batch["masked_labels"])
    lab, nsp_lab = batch["masked_labels"], batch["next_sentence_label"]
    mlm = F.cross_entropy(out.prediction_logits.float(), lab)
    nsp = F.cross_entropy(out.seq_relationship_logits.float(), nsp_lab)
    with torch.no_grad():
        aux = {"mlm": mlm.detach(), "nsp": nsp.detach(),
               "mlm_correct": ((out.prediction_logits.argmax(-1) == lab) & (lab != IGNORE_INDEX)).sum(),
               "mlm_count": (lab != IGNORE_INDEX).sum(),
               "nsp_correct": ((out.seq_relationship_logits.argmax(-1) == nsp_lab) & (nsp_lab != IGNORE_INDEX)).sum(),
               "nsp_count": (nsp_lab != IGNORE_INDEX).sum()}
    return mlm + nsp, aux


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
    from ..models import BertForPreTraining

    rt = Runtime(args.device)
    try:
        return _pretrain(args, rt, BertForPreTraining)
    finally:
        rt.close()


def _check_floats(args) -> None:
    """Every float option finite and in range (NaN compares false with everything, so each test is
    written to fail on it): an infinite or NaN learning rate would train NaN into every weight."""
    ranges = {  # name: (accepts the value?, what is expected)
        "lr": (lambda v: v > 0, "> 0"), "weight_decay": (lambda v: v >= 0, ">= 0"),
        "max_grad_norm": (lambda v: v > 0, "> 0"), "mlm_probability": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "short_seq_prob": (lambda v: 0 <= v <= 1, "in [0, 1]"), "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "attention_dropout": (lambda v: 0 <= v < 1, "in [0, 1)")}
    for name, (ok, want) in ranges.items():
        v = getattr(args, name, None)
        if v is None:
            continue
        flag = f"--{name.replace('_', '-')}"
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{flag} must be a finite number, got {v!r}")
        if not ok(v):
            raise ValueError(f"{flag} must be {want}, got {v!r}")


def _validate_pretrain_args(args):
    for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "vocab_size", "eval_batches"):
        v = getattr(args, name)
        if not isinstance(v, int) or v < (0 if name == "eval_batches" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    _check_floats(args)
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
        from ..models.config import PRESETS

        if args.config not in PRESETS:
            raise ValueError(f"--config must be one of {sorted(PRESETS)} or a config.json path, got {args.config!r}")
    if args.tokenizer and not os.path.isdir(args.tokenizer):
        raise ValueError(f"--tokenizer must be a folder with tokenizer.json or vocab.txt, got {args.tokenizer!r}")
    if not args.eval_only and not args.out:
        raise ValueError("--out must name the output folder")
    if args.cuda_graph:
        if not args.pack:
            raise ValueError("--cuda-graph needs --pack (a captured step has static shapes: packed rows of a fixed "
                             "token budget)")
        if args.grad_accum != 1:
            raise ValueError(f"--cuda-graph captures one whole step: --grad-accum must be 1, got {args.grad_accum}")
    if args.pack_budget is not None and args.pack_budget < args.seq_len:
        raise ValueError(f"--pack-budget must be >= --seq-len ({args.seq_len}) so every pair fits a row, "
                         f"got {args.pack_budget}")
    if args.resume and getattr(args, "overwrite", False):
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if args.resume and not checkpoint_candidates(args.out):
        raise ValueError(f"--resume: no checkpoint under {os.path.join(args.out, 'checkpoints')}")
    if not args.eval_only and not args.resume:
        refuse_earlier_run(args.out, getattr(args, "overwrite", False), resumable=True)


def _stop_if_not_finite(mlm: float, nsp: float, where: str) -> None:
    """A NaN or infinite loss stops the run at once, naming the step: training on would only spread
    NaN into the weights and the next checkpoint (the packed and graphed steps keep their losses on
    the device, so they are checked when a log step reads them)."""
    if not (math.isfinite(mlm) and math.isfinite(nsp)):
        raise FloatingPointError(f"non-finite loss at {where}: mlm {mlm}, nsp {nsp}; stopped before the optimizer "
                                 f"step. Lower --lr, or --resume from an earlier checkpoint")


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
        remove_partial_checkpoints(args.out)  # left by a run killed while saving
        if getattr(args, "overwrite", False) and not args.resume:
            # the earlier run's checkpoints would outrank this run's (a later --resume, the pruning
            # of --keep-checkpoints); its metrics.jsonl restarts below, its model is replaced at the end
            shutil.rmtree(os.path.join(args.out, "checkpoints"), ignore_errors=True)
    rt.barrier()
    tok = _load_or_train_tokenizer(args, rt)
    torch.manual_seed(args.seed)
    if args.init:
        model = model_cls.from_pretrained(args.init).to(rt.device)
        tok.check_fits(model.config.vocab_size, f"--init {args.init}")
    else:
        model = model_cls(_model_config(args, tok.vocab_size)).to(rt.device)
    model.train()
    graphed = None
    if args.cuda_graph:
        if rt.device.type != "cuda" or rt.distributed:
            raise ValueError("--cuda-graph needs one process on a CUDA device")
        drop = max(model.config.hidden_dropout_prob, model.config.attention_probs_dropout_prob)
        if drop > 0:
            raise ValueError(f"--cuda-graph needs --dropout 0 (the model has dropout {drop}): dropout seeds are drawn "
                             "on the host per kernel launch, so a replayed graph would reuse one mask")
    optimizer = build_optimizer(model, args.lr, args.weight_decay, capturable=args.cuda_graph)
    warmup = args.warmup_steps if args.warmup_steps is not None else int(0.1 * args.max_steps)
    scheduler = warmup_linear_schedule(optimizer, warmup, args.max_steps)

    owned = [s for s in range(num_shards) if s % rt.world == rt.rank]
    consumed = {s: 0 for s in range(num_shards)}  # examples read from each shard
    step, tokens_seen = 0, 0
    ckpt = None
    # the corpus by content: an edited file under the same name would resume at shifted positions
    run_args = {**vars(args), "corpus_sha256": corpus_fingerprint(args.train)}
    if args.resume:
        # the newest intact checkpoint (damaged ones skipped with a warning); tensors and plain
        # values only (weights_only=True): a planted pickle cannot run
        state = load_checkpoint(args.out, model, optimizer, scheduler, run_args, force=args.force_resume)
        ckpt = state["path"]
        step, tokens_seen = state["step"], state.get("tokens_seen", 0)
        consumed.update({int(k): v for k, v in state["consumed"].items()})
        if state["num_shards"] != num_shards:
            raise ValueError(f"--num-shards {num_shards} differs from the checkpoint's {state['num_shards']}")
        if state["world_size"] == rt.world:
            set_rng_state(state["rng"][rt.rank])
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

    if args.pack:  # rows of --pack-budget tokens, several pairs each: (batch, examples, real tokens)
        iters = {s: packed_batch_iterator(stream(s), args.batch_size, args.pack_budget or args.seq_len, consumed[s],
                                          args.pairs_per_row) for s in owned}
    else:
        iters = {s: batch_iterator(stream(s), args.batch_size, start=consumed[s]) for s in owned}
    if args.cuda_graph:
        from ..graphs import GraphedTrainStep

        # bf16 autocast without its weight-cast cache: the casts are captured with the step
        graphed = GraphedTrainStep(model, optimizer, packed_losses, args.max_grad_norm,
                                   autocast=lambda: rt.autocast(cache=False))
    eval_batches = _eval_stream_batches(args, tok, args.eval_batches) if args.eval and rt.main else []

    def run_eval():
        rec = None
        if rt.main and eval_batches:
            rec = {"step": step, **evaluate_pretraining(model, eval_batches, rt, not args.dense_mlm)}
            metrics.write(rec)
        rt.barrier()
        return rec

    extra_state = lambda: {"consumed": consumed, "num_shards": num_shards, "tokens_seen": tokens_seen,  # noqa: E731
                           "args": run_args}
    if step == 0 and args.eval_every:
        run_eval()
    bar = progress_bar(args.max_steps, step, rt.main and not args.no_progress, "pretrain")
    window = {"mlm": 0.0, "nsp": 0.0, "mc": 0, "mn": 0, "nc": 0, "nn": 0, "tok": 0, "n": 0, "t": time.perf_counter()}
    last = {}
    while step < args.max_steps:
        micro_total = args.grad_accum
        for j in range(micro_total):
            m = step * micro_total + j
            shard = owned[m % len(owned)]
            if args.pack:
                batch, consumed_local, n_tokens = next(iters[shard])
            else:
                batch, consumed_local = next(iters[shard]), args.batch_size
                n_tokens = int(batch["attention_mask"].sum())  # counted on the host copy: no device read
            batch = {k: v.to(rt.device, non_blocking=True) for k, v in batch.items()}
            # Dropout is reseeded from (step, shard): the same micro-batch gets the same masks
            # whichever rank or process runs it and after any resume.
            torch.manual_seed(derive_seed(args.seed, "dropout", step, shard))
            sync = j == micro_total - 1 or not rt.distributed
            ctx = contextlib.nullcontext() if sync else ddp_model.no_sync()
            if graphed is not None:  # forward, backward, clipping and the AdamW step: one replay
                aux = graphed(batch)
            else:
                with ctx:
                    with rt.autocast():
                        if args.pack:
                            loss, aux = packed_losses(ddp_model, batch)
                        else:
                            loss, mlm, nsp, mc, mn, nc, nn_ = _pretraining_losses(ddp_model, batch, not args.dense_mlm)
                            aux = {"mlm": mlm.item(), "nsp": nsp.item(), "mlm_correct": mc, "mlm_count": mn,
                                   "nsp_correct": nc, "nsp_count": nn_}
                            _stop_if_not_finite(aux["mlm"], aux["nsp"], f"step {step + 1} (micro-batch {j + 1} "
                                                f"of {micro_total})")
                    (loss / micro_total).backward()
            # packed steps keep their figures on the device until a log step reads them
            for key, name in (("mlm", "mlm"), ("nsp", "nsp"), ("mc", "mlm_correct"), ("mn", "mlm_count"),
                              ("nc", "nsp_correct"), ("nn", "nsp_count")):
                window[key] += aux[name].detach() if isinstance(aux[name], torch.Tensor) else aux[name]
            window["tok"] += n_tokens
            window["n"] += 1
            if args.pack:  # each rank packs its own number of examples: they add up over the ranks
                inc = [0] * num_shards
                inc[shard] = consumed_local
                for s, v in enumerate(rt.all_sum(inc)):
                    consumed[s] += int(v)
            else:
                # Every rank advances every shard's counter the same way, so rank 0 can save all of them.
                for r in range(rt.world):
                    r_owned = [s for s in range(num_shards) if s % rt.world == r]
                    consumed[r_owned[m % len(r_owned)]] += consumed_local
        logging = (step + 1) % args.log_every == 0 or step + 1 == args.max_steps
        lr = scheduler.get_last_lr()[0]
        lr = float(lr) if logging else lr  # a tensor under --cuda-graph: read on log steps only
        if graphed is not None:
            grad_norm = aux["grad_norm"]
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        bar.update(1)
        if step % args.log_every == 0 or step == args.max_steps:
            n = window["n"]
            mlm_l, nsp_l = rt.all_mean([float(window["mlm"]) / n, float(window["nsp"]) / n])
            _stop_if_not_finite(mlm_l, nsp_l, f"a step in {step - n // args.grad_accum + 1} .. {step}")
            mc, mn, nc, nn_, toks = rt.all_sum([float(window[k]) for k in ("mc", "mn", "nc", "nn", "tok")])
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
            save_checkpoint(args.out, step, model, optimizer, scheduler, rt, extra_state(), args.keep_checkpoints,
                            tokenizer=tok)
        if window["n"] == 0:  # evaluation and saving do not count against training throughput
            window["t"] = time.perf_counter()
    bar.close()
    if rt.main:
        model.save_pretrained(args.out, tokenizer=tok)
    rt.barrier()
    return {"out": args.out, **last}  # the command's last line names the folder it wrote


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
    from ..tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(args.tokenizer or args.init)
    model = model_cls.from_pretrained(args.init).to(rt.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    return evaluate_pretraining(model, _eval_stream_batches(args, tok, args.eval_batches), rt, not args.dense_mlm)


