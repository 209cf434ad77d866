"""Sharded embedding of a large corpus into a folder, by one process or many (torchrun), resumable.

    torchrun --nproc-per-node 4 -m bertfast embed --model M corpus.txt --out DIR
    python -m bertfast embed --model M corpus.txt --out DIR --shard-size 100000    # one process

The corpus (one text per non-blank line) is cut into contiguous shards: one per rank by default,
or `--shard-size` texts each. Shard i holds rows [start, end) of the corpus in DIR/shard-00000.npy,
(end - start, hidden) float32, rows in corpus order; shards are dealt to the ranks round-robin.
Inside a shard `tasks.embed` batches texts of similar length together (fewer padding tokens) and
returns the rows in input order, so the vectors are those of one process embedding the corpus.

DIR/index.json names the job (what decides the vectors: the SHA-256 of the model's weights,
config and tokenizer files, the corpus fingerprint, pooling, layer, normalize, max_length) and
the shard layout; it is written before any shard. Each shard is written to a temporary file and
renamed, then its record shard-NNNNN.json (rows, width, dtype, SHA-256): a shard counts as done
only when its file matches its record, so a rerun of the same job (after a crash, a pre-emption,
or with another number of processes) computes only the missing or damaged shards. A folder that
holds another job (other weights in the same model folder included) is refused. `load(DIR)`
returns the whole (N, hidden) matrix, every shard verified.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import List, Optional

import numpy as np
import torch

from .._io import sha256_file

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


# what decides the vectors besides the job's options: these files of the model folder, by content
MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "vocab.txt",
               "tokenizer_config.json", "special_tokens_map.json")


def model_fingerprint(folder: str) -> dict:
    """{file: SHA-256} of the model folder's files that decide the vectors (MODEL_FILES present)."""
    return {name: sha256_file(os.path.join(folder, name)) for name in MODEL_FILES
            if os.path.isfile(os.path.join(folder, name))}


def _write_json(path: str, obj: dict) -> None:
    from .._io import write_json

    write_json(path, obj, indent=1)


def _read_index(out: str) -> Optional[dict]:
    path = os.path.join(out, INDEX)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e}); delete the folder to start over") from None
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(index, dict) or not isinstance(index.get("job"), dict) or not isinstance(shards, list) or \
            not all(isinstance(x, dict) and isinstance(x.get("file"), str) and isinstance(x.get("start"), int)
                    and isinstance(x.get("end"), int) for x in shards):
        got = f"a JSON {type(index).__name__}" if not isinstance(index, dict) else "an object without a valid layout"
        raise ValueError(f"{path}: not a sharded-embedding index (a JSON object with 'job' and 'shards'), got {got}; "
                         f"delete the folder to start over")
    return index


def _record_name(shard: dict) -> str:
    return os.path.splitext(shard["file"])[0] + ".json"


def _write_shard(out: str, shard: dict, emb: np.ndarray) -> None:
    """The shard's .npy, then its record (rows, width, dtype, SHA-256), each all-or-nothing."""
    from .._io import save_numpy

    path = os.path.join(out, shard["file"])
    save_numpy(path, emb)
    _write_json(os.path.join(out, _record_name(shard)), {"rows": int(emb.shape[0]), "hidden": int(emb.shape[1]),
                                                         "dtype": str(emb.dtype), "sha256": sha256_file(path)})


def _shard_done(out: str, shard: dict) -> bool:
    """The shard's file exists, is a 2-D float32 array of its rows, and matches its record's SHA-256
    (a file of the wrong width or dtype, zero-filled, or swapped in by hand does not count)."""
    path = os.path.join(out, shard["file"])
    if not os.path.isfile(path):
        return False
    try:
        with open(os.path.join(out, _record_name(shard)), encoding="utf-8") as f:
            rec = json.load(f)
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    if not isinstance(rec, dict) or arr.ndim != 2 or arr.dtype != np.float32:
        return False
    if arr.shape != (shard["end"] - shard["start"], rec.get("hidden")) or rec.get("rows") != arr.shape[0]:
        return False
    return rec.get("sha256") == sha256_file(path)


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
        job = {"model_sha256": model_fingerprint(args.model), "corpus_sha256": fingerprint(texts),
               "texts": len(texts),
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
                if f.startswith("shard-") and f.endswith((".npy", ".json")):
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
                            long_texts=job["long_texts"],
                            progress_bar=rank == 0 and not getattr(args, "quiet", False))
                _write_shard(out, s, emb.numpy().astype(np.float32))
        _barrier(world)
        if rank != 0:
            return {}
        missing = [s["file"] for s in index["shards"] if not _shard_done(out, s)]
        if missing:
            raise RuntimeError(f"shards {missing[:5]} were not written; rerun the same command to finish")
        widths = {int(np.load(os.path.join(out, s["file"]), mmap_mode="r").shape[1]) for s in index["shards"]}
        if len(widths) != 1:
            raise RuntimeError(f"--out {out!r}: shards of different widths {sorted(widths)}; delete the folder and "
                               f"start over")
        hidden = widths.pop()
        _write_json(os.path.join(out, INDEX), {**index, "hidden": hidden, "complete": True})
        return {"out": out, "shape": [len(texts), hidden], "shards": len(index["shards"]),
                "written": len(index["shards"]) - len(done_before), "skipped": len(done_before), "processes": world}
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
