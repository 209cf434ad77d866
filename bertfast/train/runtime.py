"""The training runtime shared by pre-training and fine-tuning: the optimizer and schedule,
ranks and devices (torchrun DDP), RNG state capture, atomic files, the metrics log and checkpoints."""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
from typing import List, Optional

import torch

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
            atomic_write_text(path, "")
        elif os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(keep))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def progress_bar(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, file=sys.stderr)


def latest_checkpoint(out: str) -> Optional[str]:
    latest = os.path.join(out, "checkpoints", "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(out, "checkpoints", name)
    return path if os.path.isfile(os.path.join(path, "trainer_state.pt")) else None


def save_checkpoint(out: str, step: int, model, optimizer, scheduler, rt: Runtime, extra: dict, keep: int,
                    tokenizer=None):
    """All ranks call this (RNG states are gathered); rank 0 writes step-N.tmp, renames it to
    step-N (atomic) and then points `latest` at it (atomic), so a crash leaves the previous
    checkpoint intact. With the tokenizer beside the weights, every checkpoint is a folder the
    command line and from_pretrained take as it is."""
    rngs = rt.gather(rng_state())
    if rt.main:
        root = os.path.join(out, "checkpoints")
        os.makedirs(root, exist_ok=True)
        name = f"step-{step:08d}"
        final, tmp = os.path.join(root, name), os.path.join(root, name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, tokenizer=tokenizer)
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rngs, "world_size": rt.world, **extra}
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(os.path.join(root, "latest"), name)
        steps = sorted(d for d in os.listdir(root) if d.startswith("step-") and ".tmp" not in d)
        for old in steps[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    rt.barrier()


