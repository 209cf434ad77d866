"""The training runtime shared by pre-training and fine-tuning: the optimizer and schedule,
ranks and devices (torchrun DDP), RNG state capture, atomic files, the metrics log and checkpoints."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import sys
import warnings
from typing import List, Optional

import torch

from .._io import sha256_file

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


def build_optimizer(model, lr: float, weight_decay: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-6,
                    capturable: bool = False):
    """AdamW (fused on CUDA). capturable=True: fused with capturable state and a tensor lr on the
    parameters' device, which a scheduler updates in place, so a CUDA graph can hold the step."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    kw = {}
    device = next(model.parameters()).device
    if device.type == "cuda" or capturable:
        kw["fused"] = True
    if capturable:
        kw["capturable"] = True
        lr = torch.tensor(float(lr), device=device)
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

    def autocast(self, cache: bool = True):
        # bf16 autocast on GPU (no loss scaling needed); CPU trains in fp32, where bf16 autocast
        # is slower than fp32 on most CPUs and hurts exact reproducibility. cache=False for a step
        # captured in a CUDA graph (the weight casts must be part of it)
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
        return contextlib.nullcontext()


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- files ----------------------------------------------------------------------------------


def atomic_write_text(path: str, text: str) -> None:
    from .._io import write_text

    write_text(path, text)


class MetricsLog:
    """metrics.jsonl, appended line by line; on resume, lines past the checkpoint are dropped so
    the file reads as one uninterrupted run."""

    def __init__(self, path: str, enabled: bool, resume_step: Optional[int] = None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is None:
            atomic_write_text(path, "")
        elif os.path.exists(path):
            # a run killed mid-write leaves a torn last line: it is dropped, not a reason to stop
            keep = [json.dumps(rec) + "\n" for rec in read_metrics(path) if rec.get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(keep))

    def write(self, record: dict) -> None:
        if self.enabled:
            from .._io import json_safe

            with open(self.path, "a", encoding="utf-8") as f:  # standard JSON: NaN is written as null
                f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")


def earlier_run(out: str) -> List[str]:
    """What an earlier run left in `out` that a new run would overwrite or mix with its own: a
    metrics.jsonl with lines in it, a saved model (config.json), pre-training checkpoints."""
    found = []
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        found.append("metrics.jsonl")
    if os.path.isfile(os.path.join(out, "config.json")):
        found.append("a saved model (config.json)")
    if checkpoint_candidates(out):
        found.append("checkpoints/")
    return found


def refuse_earlier_run(out: str, overwrite: bool, resumable: bool) -> None:
    """A new run into an --out that holds an earlier one is refused unless --overwrite: a rerun must
    not silently empty the earlier run's metrics.jsonl or replace its model."""
    found = earlier_run(out) if out and not overwrite else []
    if found:
        raise ValueError(f"--out {out} already holds a run ({', '.join(found)}), which a new run would overwrite: "
                         f"pass --overwrite to replace it{', --resume to continue it' if resumable else ''}, or "
                         f"choose another --out")


def read_metrics(path: str) -> List[dict]:
    """The records of a metrics.jsonl; lines that are not a JSON object (a torn last line) are skipped."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for ln in f:
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def progress_bar(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, file=sys.stderr)


# ---- checkpoints ------------------------------------------------------------------------------
#
# checkpoints/step-NNNNNNNN/: config.json + model.safetensors (the model), trainer_state.pt (step,
# data position, optimizer, scheduler, RNG states: tensors and plain Python values only, loaded
# with weights_only=True, so a planted pickle cannot run), and manifest.json, written last: every
# other file's size and SHA-256. `latest` names the newest one. A resume takes the newest intact
# checkpoint (`latest`'s first), skipping damaged ones with a warning.

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"

# pre-training arguments whose change breaks an exact resume (data order, masks, schedule, model)
EXACT_ARGS = ("seed", "batch_size", "seq_len", "grad_accum", "max_steps", "lr", "warmup_steps", "weight_decay",
              "max_grad_norm", "mlm_probability", "whole_word_mask", "short_seq_prob", "dense_mlm", "train",
              "tokenizer", "vocab_size", "cased", "config", "dropout", "attention_dropout", "init", "corpus_sha256")


def corpus_fingerprint(files) -> List[str]:
    """The SHA-256 of each corpus file, in order: what an exact resume must read again. The same
    pass checks the whole file is UTF-8 (an error names the file and line), so a bad byte deep in a
    corpus stops the run before its first step rather than hours into it."""
    import codecs

    out = []
    for path in [files] if isinstance(files, str) else list(files or ()):
        h, dec, lines = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")(), 0
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
                try:
                    dec.decode(chunk)
                except UnicodeDecodeError as e:
                    line = lines + chunk[:max(0, e.start)].count(b"\n") + 1
                    raise ValueError(f"--train: {path} line {line} is not UTF-8 text; save the corpus as "
                                     f"UTF-8") from None
                lines += chunk.count(b"\n")
            try:
                dec.decode(b"", final=True)
            except UnicodeDecodeError:
                raise ValueError(f"--train: {path} ends inside a UTF-8 character (truncated?)") from None
        out.append(h.hexdigest())
    return out


def write_manifest(folder: str) -> None:
    files = sorted(f for f in os.listdir(folder) if f != MANIFEST)
    entries = {f: {"bytes": os.path.getsize(os.path.join(folder, f)), "sha256": sha256_file(os.path.join(folder, f))}
               for f in files}
    atomic_write_text(os.path.join(folder, MANIFEST), json.dumps({"files": entries}, indent=1))


def checkpoint_problem(folder: str) -> Optional[str]:
    """Why the checkpoint folder cannot be trusted (missing, truncated or changed files), or None."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"no readable {MANIFEST} (a save that did not finish?): {type(e).__name__}"
    for need in ("config.json", "model.safetensors", STATE_FILE):
        if need not in files:
            return f"{need} is not in its manifest"
    for name, meta in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != meta.get("bytes"):
            return f"{name} has {os.path.getsize(path)} bytes, the manifest says {meta.get('bytes')} (truncated?)"
        if sha256_file(path) != meta.get("sha256"):
            return f"{name} does not match its SHA-256 in the manifest (damaged)"
    return None


def checkpoint_candidates(out: str) -> List[str]:
    """Checkpoint folders under out/checkpoints, the one `latest` names first, then newest first.
    Folders of saves that did not finish (*.tmp*) are not candidates."""
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    steps = sorted((d for d in os.listdir(root) if d.startswith("step-") and ".tmp" not in d
                    and os.path.isdir(os.path.join(root, d))), reverse=True)
    try:
        with open(os.path.join(root, "latest"), encoding="utf-8") as f:
            pointed = f.read().strip()
    except OSError:
        pointed = ""
    if pointed in steps:
        steps.remove(pointed)
        steps.insert(0, pointed)
    return [os.path.join(root, d) for d in steps]


def latest_checkpoint(out: str) -> Optional[str]:
    """The newest intact checkpoint folder (see checkpoint_problem), or None."""
    for path in checkpoint_candidates(out):
        if checkpoint_problem(path) is None:
            return path
    return None


def remove_partial_checkpoints(out: str) -> None:
    """Temporary folders of saves that never finished (a killed or crashed run): removed at start."""
    root = os.path.join(out, "checkpoints")
    if os.path.isdir(root):
        for d in os.listdir(root):
            if ".tmp" in d:
                path = os.path.join(root, d)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)


def exactness_differences(saved: dict, now: dict) -> List[str]:
    """The arguments of EXACT_ARGS that differ between a checkpoint's run and this one."""
    diffs = []
    for k in EXACT_ARGS:
        if k == "corpus_sha256" and k in saved and k in now and saved[k] != now[k]:
            diffs.append("the --train files' content changed since the checkpoint (SHA-256 differs)")
        elif k in saved and k in now and saved[k] != now[k]:
            diffs.append(f"--{k.replace('_', '-')}: checkpoint {saved[k]!r}, now {now[k]!r}")
    return diffs


def load_checkpoint(out: str, model, optimizer, scheduler, args: Optional[dict] = None, force: bool = False) -> dict:
    """Restore the newest intact checkpoint into model/optimizer/scheduler and return its training
    state (with "path"). Damaged ones are skipped with a warning naming them and why. With `args`,
    a checkpoint whose run used other EXACT_ARGS is refused (the differences listed) unless `force`."""
    from ..models.hub import load_state, read_state_dict

    skipped = []
    for path in checkpoint_candidates(out):
        problem = checkpoint_problem(path)
        if problem is None:
            try:
                state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
                weights = read_state_dict(path)
            except Exception as e:  # noqa: BLE001 - whatever is unreadable, an older checkpoint may do
                problem = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if problem is not None:
            skipped.append(f"{os.path.basename(path)} ({problem})")
            continue
        if args is not None:
            diffs = exactness_differences(state.get("args", {}), args)
            if diffs and not force:
                raise ValueError(f"--resume: {path} was written by a run with other settings, so the resumed run "
                                 f"would not continue it exactly: {'; '.join(diffs)}. Pass the checkpoint's values, "
                                 f"or --force-resume to continue anyway")
            if diffs:
                warnings.warn(f"--force-resume: continuing {path} with changed settings: {'; '.join(diffs)}",
                              stacklevel=2)
        load_state(model, weights, strict=True, source=path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if skipped:
            warnings.warn(f"--resume: skipped damaged checkpoints {', '.join(skipped)}; resuming from {path} "
                          f"(step {state.get('step')})", stacklevel=2)
        return {**state, "path": path}
    where = os.path.join(out, "checkpoints")
    raise ValueError(f"--resume: no intact checkpoint under {where}" + (f": {'; '.join(skipped)}" if skipped else ""))


def save_checkpoint(out: str, step: int, model, optimizer, scheduler, rt: Runtime, extra: dict, keep: int,
                    tokenizer=None):
    """All ranks call this (RNG states are gathered); rank 0 writes step-N.tmp, adds the manifest
    last, renames the folder to step-N (atomic) and then points `latest` at it (atomic), so a crash
    leaves the previous checkpoint intact. With the tokenizer beside the weights, every checkpoint
    is a folder the command line and from_pretrained take as it is. A full disk stops the run with
    a clear error and the partial folder removed."""
    from .._io import WriteError, is_no_space, save_torch

    rngs = rt.gather(rng_state())
    if rt.main:
        root = os.path.join(out, "checkpoints")
        os.makedirs(root, exist_ok=True)
        name = f"step-{step:08d}"
        final, tmp = os.path.join(root, name), os.path.join(root, name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(tmp, tokenizer=tokenizer)
            state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "rng": rngs, "world_size": rt.world, **extra}
            save_torch(state, os.path.join(tmp, STATE_FILE))
            write_manifest(tmp)
        except Exception as e:  # noqa: BLE001 - torch.save and safetensors wrap ENOSPC in their own errors
            shutil.rmtree(tmp, ignore_errors=True)
            if is_no_space(e):
                err = WriteError(errno.ENOSPC, f"no space left on device while writing checkpoint {tmp} (step "
                                               f"{step}); the partial folder was removed and the previous checkpoint "
                                               f"is intact. Free space (or lower --keep-checkpoints) and --resume")
                err.path = tmp
                raise err from e
            raise
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(os.path.join(root, "latest"), name)
        steps = sorted(d for d in os.listdir(root) if d.startswith("step-") and ".tmp" not in d)
        for old in steps[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    rt.barrier()
