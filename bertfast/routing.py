"""Measured routing tables: which implementation serves which (op, dtype, width, direction).

Where two GPU implementations of an op compete (the Triton kernels against the CUDA C++
extension; attention against PyTorch's SDPA / varlen kernels), the `auto` backend asks a
committed table which one a GPU run measured faster, case by case. Tables are data: one JSON
file per table in bertfast/routing_tables/, loaded once, looked up in a dict per call.

File format (every key required unless marked optional):

    {
      "table": "layernorm_family",              # a name, used in messages
      "ops": ["bias_gelu", ...],                # the ops this table routes (one table per op)
      "candidates": ["triton", "cuda"],         # the backends it chooses between
      "default": "triton",                      # served where no entry matches
      "source": null | {                        # the GPU run the entries come from
          "device": "NVIDIA H200", "date": "2026-12-01", "torch": "2.11.0+cu130",
          "commit": "abc123...", "results": "benchmarks/results/<run>/bench.json"},
      "entries": [
        {"op": "bias_gelu", "direction": "fwd", "dtype": "bf16", "max_width": 1024,
         "backend": "cuda",
         "measured": {"cuda_us": 21.0, "triton_us": 30.5, "shape": "32768x768"}}   # optional
      ]
    }

direction is "fwd" or "bwd"; dtype is "fp32", "fp16" or "bf16"; max_width is the inclusive
upper bound of a width bucket: a call of width w uses the entry with the smallest max_width >= w
for its (op, direction, dtype). What "width" means is the op's choice (the hidden size for the
LayerNorm family; attention may key on head_dim); the op says how to read it from its backend
arguments (backend.register_op's route_key). A table whose "source" is null holds no
measurement: it must have no entries, and `lookup` says "no measurement".

`lookup(op, direction, dtype, width)` -> (backend, why); `table_for(op)` -> Table or None.
BERTFAST_ROUTING_DIR points at another folder of tables (tests, a fresh GPU run's output).
"""
from __future__ import annotations

import glob
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Optional

DIRECTIONS = ("fwd", "bwd")
DTYPES = ("fp32", "fp16", "bf16")
_DTYPE_NAMES = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16",
                "torch.float64": "fp64"}


def dtype_name(dtype) -> str:
    """'bf16' / 'fp16' / 'fp32' (/ 'fp64') for a torch dtype (or its str)."""
    return _DTYPE_NAMES.get(str(dtype), str(dtype))


@dataclass
class Table:
    name: str
    ops: tuple
    candidates: tuple
    default: str
    source: Optional[dict]
    path: str
    # (op, direction, dtype) -> sorted [(max_width, backend, measured)]
    buckets: dict = field(default_factory=dict)
    _memo: dict = field(default_factory=dict)

    def lookup(self, op: str, direction: str, dtype, width: int) -> tuple[str, str]:
        """(backend, why) for one call; memoised per distinct key."""
        key = (op, direction, dtype, width)
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = self._lookup(op, direction, dtype_name(dtype), int(width))
        return hit

    def _lookup(self, op, direction, dt, width):
        if self.source is None:
            return self.default, f"routing table {self.name}: no measurement, {self.default} by default"
        for max_w, backend, measured in self.buckets.get((op, direction, dt), ()):
            if width <= max_w:
                fig = f" ({_fmt(measured)})" if measured else ""
                return backend, f"routing table {self.name} ({_src(self.source)}): width <= {max_w}{fig}"
        return self.default, f"routing table {self.name} ({_src(self.source)}): no entry, {self.default} by default"

    def backends(self, op: str) -> set:
        """Every backend this table may choose for `op` (the default included)."""
        out = {self.default}
        for (o, _, _), rows in self.buckets.items():
            if o == op:
                out.update(b for _, b, _ in rows)
        return out

    def describe(self, op: str) -> str:
        """One line for `bertfast info`: the source and which cases leave the default."""
        if self.source is None:
            return f"routing table {self.name}: no measurement, {self.default} everywhere"
        parts = []
        for (o, d, dt), rows in sorted(self.buckets.items()):
            if o != op:
                continue
            lo = 0
            for max_w, b, _ in rows:
                if b != self.default:
                    parts.append(f"{b} for {dt} {d} width {lo + 1}-{max_w}")
                lo = max_w
        chosen = "; ".join(parts) if parts else f"{self.default} everywhere"
        return f"routing table {self.name} ({_src(self.source)}): {chosen}; else {self.default}"


def _src(source: dict) -> str:
    return " ".join(str(source[k]) for k in ("device", "date") if source.get(k)) or "unnamed run"


def _fmt(measured: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in measured.items())


def parse(data: dict, path: str = "<dict>") -> Table:
    """A Table from a decoded JSON object; ValueError naming the file and the bad field."""
    def bad(msg):
        return ValueError(f"routing table {path}: {msg}")

    for k in ("table", "ops", "candidates", "default", "source", "entries"):
        if k not in data:
            raise bad(f"missing key {k!r}")
    cands = tuple(data["candidates"])
    if data["default"] not in cands:
        raise bad(f"default {data['default']!r} is not one of the candidates {cands}")
    if data["source"] is not None and not isinstance(data["source"], dict):
        raise bad("source must be null or an object naming the GPU run")
    if data["source"] is None and data["entries"]:
        raise bad("entries without a source: name the GPU run they were measured on")
    t = Table(str(data["table"]), tuple(data["ops"]), cands, data["default"], data["source"], path)
    for i, e in enumerate(data["entries"]):
        for k in ("op", "direction", "dtype", "max_width", "backend"):
            if k not in e:
                raise bad(f"entry {i} has no {k!r}")
        if e["op"] not in t.ops:
            raise bad(f"entry {i}: op {e['op']!r} is not in ops {t.ops}")
        if e["direction"] not in DIRECTIONS:
            raise bad(f"entry {i}: direction must be one of {DIRECTIONS}, got {e['direction']!r}")
        if e["dtype"] not in DTYPES:
            raise bad(f"entry {i}: dtype must be one of {DTYPES}, got {e['dtype']!r}")
        if e["backend"] not in cands:
            raise bad(f"entry {i}: backend {e['backend']!r} is not one of the candidates {cands}")
        if not isinstance(e["max_width"], int) or e["max_width"] < 1:
            raise bad(f"entry {i}: max_width must be a positive int, got {e['max_width']!r}")
        rows = t.buckets.setdefault((e["op"], e["direction"], e["dtype"]), [])
        if any(r[0] == e["max_width"] for r in rows):
            raise bad(f"entry {i}: a second entry for {e['op']} {e['direction']} {e['dtype']} "
                      f"max_width {e['max_width']}")
        rows.append((e["max_width"], e["backend"], e.get("measured") or {}))
    for rows in t.buckets.values():
        rows.sort(key=lambda r: r[0])
    return t


_lock = threading.Lock()
_tables: Optional[dict] = None  # op -> Table


def table_dir() -> str:
    return os.environ.get("BERTFAST_ROUTING_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                  "routing_tables")


def tables() -> dict:
    """op -> Table, from every *.json in table_dir() (loaded once; reset() forgets them)."""
    global _tables
    if _tables is None:
        with _lock:
            if _tables is None:
                out = {}
                for path in sorted(glob.glob(os.path.join(table_dir(), "*.json"))):
                    with open(path) as fh:
                        t = parse(json.load(fh), path)
                    for op in t.ops:
                        if op in out:
                            raise ValueError(f"routing tables {out[op].path} and {path} both route {op!r}")
                        out[op] = t
                _tables = out
    return _tables


def table_for(op: str) -> Optional[Table]:
    return tables().get(op)


def lookup(op: str, direction: str, dtype, width: int) -> Optional[tuple[str, str]]:
    """(backend, why) from the table that routes `op`, or None when no table does."""
    t = table_for(op)
    return None if t is None else t.lookup(op, direction, dtype, width)


def reset() -> None:
    global _tables
    _tables = None
