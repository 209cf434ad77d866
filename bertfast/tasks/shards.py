"""Sharded embedding of a large corpus into a folder, by one process or many (torchrun), resumable.

    torchrun --nproc-per-node 4 -m bertfast embed --model M corpus.txt --out DIR
    python -m bertfast embed --model M corpus.txt --out DIR --shard-size 100000    # one process

The corpus (one text per non-blank line) is cut into contiguous shards: one per rank by default,
or `--shard-size` texts each. Shard i holds rows [start, end) of the corpus in DIR/shard-00000.npy,
(end - start, hidden) float32, rows in corpus order; shards are dealt to the ranks round-robin.
Inside a shard `tasks.embed` batches texts of similar length together (fewer padding tokens) and
returns the rows in input order, so the vectors are those of one process embedding the corpus.

DIR/index.json names the job (model, corpus fingerprint, pooling, layer, normalize, max_length)
and the shard layout; it is written before any shard. Each shard is written to a temporary file
and renamed, so a shard file that exists is complete: a rerun of the same job (after a crash,
a pre-emption, or with another number of processes) computes only the missing shards. A folder
that holds another job is refused. `load(DIR)` returns the whole (N, hidden) matrix.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import List, Optional

import numpy as np
import torch

INDEX = "index.json"


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.npy"


def fingerprint(texts: List[str]) -> str:
    """sha256 of the texts (one per line): a rerun against an edited corpus is another job."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def layout(n: int, shards: int) -> List[dict]:
    """`shards` contiguous row ranges covering [0, n), sizes differing by at most one."""
    shards = max(1, min(shards, n))
    cuts = [n * i // shards for i in range(shards + 1)]
    return [{"file": _shard_name(i), "start": cuts[i], "end": cuts[i + 1]} for i in range(shards)]


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _read_index(out: str) -> Optional[dict]:
    path = os.path.join(out, INDEX)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _shard_done(out: str, shard: dict) -> bool:
    path = os.path.join(out, shard["file"])
    if not os.path.isfile(path):
        return False
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.ndim == 2 and arr.shape[0] == shard["end"] - shard["start"]


def plan(out: str, job: dict, n: int, world: int, shard_size: Optional[int]) -> dict:
    """The index of this job in `out`: the one already there (its layout kept), else a fresh one.
    Raises ValueError when `out` holds another job."""
    index = _read_index(out)
    if index is not None:
        if index.get("job") != job:
            diff = sorted(k for k in set(job) | set(index.get("job", {})) if index.get("job", {}).get(k) != job.get(k))
            raise ValueError(f"--out {out!r} holds the embeddings of another job (differs in {diff}); "
                             f"choose another folder, or delete it to start over")
        return index
    if shard_size is not None and shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1 texts, got {shard_size}")
    shards = -(-n // shard_size) if shard_size else world
    return {"job": job, "rows": n, "shards": layout(n, shards), "complete": False}


def load(out: str) -> np.ndarray:
    """The (N, hidden) float32 embeddings of a finished sharded job, rows in corpus order."""
    index = _read_index(out)
    if index is None:
        raise FileNotFoundError(f"no {INDEX} in {out!r}: not a sharded embedding folder")
    missing = [s["file"] for s in index["shards"] if not _shard_done(out, s)]
    if missing:
        raise ValueError(f"{out!r} is not complete: shards {missing[:5]} are missing; rerun the same command to "
                         f"compute them")
    return np.concatenate([np.load(os.path.join(out, s["file"])) for s in index["shards"]])


def _dist():
    """(rank, world, local_rank) from torchrun's environment, with a gloo group for the barriers."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def run(args, texts: List[str], load_model) -> dict:
    """The `bertfast embed --out DIR` job on this rank; returns rank 0's summary (other ranks: {})."""
    from .embedding import embed

    rank, world, local_rank = _dist()
    try:
        out = args.out
        job = {"model": os.path.abspath(args.model), "corpus_sha256": fingerprint(texts), "texts": len(texts),
               "pooling": args.pooling, "layer": args.layer, "normalize": bool(args.normalize),
               "max_length": getattr(args, "max_length", None), "long_texts": getattr(args, "long_texts", "truncate")}
        if os.path.exists(out) and not os.path.isdir(out):
            raise ValueError(f"--out {out!r} is a file; a sharded embedding needs a folder (or a .npy name)")
        fresh = _read_index(out) is None
        index = plan(out, job, len(texts), world, getattr(args, "shard_size", None))
        done_before = set() if fresh else {s["file"] for s in index["shards"] if _shard_done(out, s)}
        if rank == 0 and fresh:
            os.makedirs(out, exist_ok=True)
            for f in os.listdir(out):  # shards without an index belong to no job: never reused
                if f.startswith("shard-") and f.endswith(".npy"):
                    os.remove(os.path.join(out, f))
            _write_json(os.path.join(out, INDEX), index)
        _barrier(world)  # the index exists and every rank has seen which shards were done before
        mine = [s for i, s in enumerate(index["shards"]) if i % world == rank and s["file"] not in done_before]
        if mine:
            model, tok = load_model()
            if torch.cuda.is_available() and world > 1:
                torch.cuda.set_device(local_rank)
                model.to(f"cuda:{local_rank}")
            for s in mine:
                emb = embed(model, tok, texts[s["start"]:s["end"]], args.pooling, args.layer, args.batch_size,
                            max_length=getattr(args, "max_length", None), normalize=args.normalize,
                            cuda_graphs=None if getattr(args, "cuda_graphs", True) else False,
                            long_texts=job["long_texts"])
                path = os.path.join(out, s["file"])
                tmp = f"{path}.tmp{os.getpid()}.npy"
                np.save(tmp, emb.numpy().astype(np.float32))
                os.replace(tmp, path)  # a shard file that exists is complete
        _barrier(world)
        if rank != 0:
            return {}
        missing = [s["file"] for s in index["shards"] if not _shard_done(out, s)]
        if missing:
            raise RuntimeError(f"shards {missing[:5]} were not written; rerun the same command to finish")
        hidden = int(np.load(os.path.join(out, index["shards"][0]["file"]), mmap_mode="r").shape[1])
        _write_json(os.path.join(out, INDEX), {**index, "hidden": hidden, "complete": True})
        return {"out": out, "shape": [len(texts), hidden], "shards": len(index["shards"]),
                "written": len(index["shards"]) - len(done_before), "skipped": len(done_before), "processes": world}
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
