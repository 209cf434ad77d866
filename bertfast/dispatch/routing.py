"""Measured routing tables: which implementation serves which (op, dtype, width, direction).

Where two GPU implementations of an op compete (the Triton kernels against the CUDA C++
extension; attention against PyTorch's SDPA / varlen kernels), the `auto` backend asks a
committed table which one a GPU run measured faster, case by case. Tables are data: one JSON
file per table in bertfast/dispatch/routing_tables/, loaded once, looked up in a dict per call.

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

Optional, for ops whose cases need more than a width (attention):
      "level": "call" (default) | "op"        # "call": each pass (fwd, bwd) of a call is looked up
                                              #   on its own (dispatch/core.py pairs them);
                                              #   "op": whole calls: a forward by its "fwd" entry, a
                                              #   training call only by a "fwd+bwd" entry (kernels
                                              #   with their own autograd: SDPA, varlen_attn)
      entry "layout": "padded" | "varlen"      # exact match when the caller names a layout
      entry "max_seq": 512                     # inclusive bucket bound on the sequence length, like
                                              #   max_width; absent = any length

direction is "fwd" or "bwd" ("fwd+bwd": a forward whose backward will run, for ops whose two
passes must come from one implementation); dtype is "fp32", "fp16" or "bf16"; max_width is the inclusive
upper bound of a width bucket: a call of width w uses the entry with the smallest max_width >= w
for its (op, direction, dtype). What "width" means is the op's choice (the hidden size for the
LayerNorm family; attention may key on head_dim); the op says how to read it from its backend
arguments (its dispatch.Call's width). A table whose "source" is null holds no
measurement: it must have no entries, and `lookup` says "no measurement".

`lookup(op, direction, dtype, width)` -> (backend, why); `table_for(op)` -> Table or None.
BERTFAST_ROUTING_DIR points at another folder of tables (tests, a fresh GPU run's output).

Tables are written from a GPU run's bench.json by bertfast/bench/routes.py
(`python -m bertfast.bench.routes RUN/bench.json --table attention|layernorm_family --out DIR`).
"""
from __future__ import annotations

import glob
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Optional

from .serves import dtype_name

DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
LEVELS = ("call", "op")
DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class Table:
    name: str
    ops: tuple
    candidates: tuple
    default: str
    source: Optional[dict]
    path: str
    level: str = "call"
    # (op, direction, dtype) -> sorted [(max_width, backend, measured, layout, max_seq)]
    buckets: dict = field(default_factory=dict)
    _memo: dict = field(default_factory=dict)

    def lookup(self, op: str, direction: str, dtype, width: int, layout: Optional[str] = None,
               seq: Optional[int] = None) -> tuple[str, str]:
        """(backend, why) for one call; memoised per distinct key. layout/seq: for tables whose
        entries name a layout or a sequence-length bucket (an entry with a layout matches only
        calls that name the same one; one with max_seq only calls whose seq is given and fits)."""
        key = (op, direction, dtype, width, layout, seq)
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = self._lookup(op, direction, dtype_name(dtype), int(width), layout, seq)
        return hit

    def _lookup(self, op, direction, dt, width, layout, seq):
        if self.source is None:
            return self.default, f"routing table {self.name}: no measurement, {self.default} by default"
        for max_w, backend, measured, e_layout, max_seq in self.buckets.get((op, direction, dt), ()):
            if width > max_w or (e_layout is not None and e_layout != layout):
                continue
            if max_seq is not None and (seq is None or seq > max_seq):
                continue
            fig = f" ({_fmt(measured)})" if measured else ""
            where = f"width <= {max_w}" + (f", {e_layout}" if e_layout else "") + (
                f", seq <= {max_seq}" if max_seq is not None else "")
            return backend, f"routing table {self.name} ({_src(self.source)}): {where}{fig}"
        return self.default, f"routing table {self.name} ({_src(self.source)}): no entry, {self.default} by default"

    def backends(self, op: str) -> set:
        """Every backend this table may choose for `op` (the default included)."""
        out = {self.default}
        for (o, _, _), rows in self.buckets.items():
            if o == op:
                out.update(r[1] for r in rows)
        return out

    def describe(self, op: str) -> str:
        """One line for `bertfast info`: the source and which cases leave the default."""
        if self.source is None:
            return f"routing table {self.name}: no measurement, {self.default} everywhere"
        parts = []
        for (o, d, dt), rows in sorted(self.buckets.items()):
            if o != op:
                continue
            lo, runs = 0, []
            for max_w, b, _, layout, max_seq in rows:
                if runs and runs[-1][:4] == (b, layout, max_w, lo):  # adjacent length buckets, one backend
                    runs[-1] = (b, layout, max_w, lo, max_seq)
                else:
                    runs.append((b, layout, max_w, lo, max_seq))
                if layout is None and max_seq is None:
                    lo = max_w
            for b, layout, max_w, w_lo, max_seq in runs:
                if b != self.default:
                    parts.append(f"{b} for {dt} {d} width {w_lo + 1}-{max_w}" + (f" {layout}" if layout else "")
                                 + (f" seq <= {max_seq}" if max_seq is not None else ""))
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
    level = data.get("level", "call")
    if level not in LEVELS:
        raise bad(f"level must be one of {LEVELS}, got {level!r}")
    t = Table(str(data["table"]), tuple(data["ops"]), cands, data["default"], data["source"], path, level)
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
        layout, max_seq = e.get("layout"), e.get("max_seq")
        if layout is not None and layout not in ("padded", "varlen"):
            raise bad(f"entry {i}: layout must be 'padded' or 'varlen', got {layout!r}")
        if max_seq is not None and (not isinstance(max_seq, int) or max_seq < 1):
            raise bad(f"entry {i}: max_seq must be a positive int, got {max_seq!r}")
        rows = t.buckets.setdefault((e["op"], e["direction"], e["dtype"]), [])
        if any(r[0] == e["max_width"] and r[3] == layout and r[4] == max_seq for r in rows):
            raise bad(f"entry {i}: a second entry for {e['op']} {e['direction']} {e['dtype']} "
                      f"max_width {e['max_width']}" + (f" {layout}" if layout else "")
                      + (f" max_seq {max_seq}" if max_seq is not None else ""))
        rows.append((e["max_width"], e["backend"], e.get("measured") or {}, layout, max_seq))
    for rows in t.buckets.values():
        # the smallest bucket that holds a call wins: by width, then by sequence length
        rows.sort(key=lambda r: (r[0], r[4] if r[4] is not None else float("inf")))
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


def lookup(op: str, direction: str, dtype, width: int, layout: Optional[str] = None,
           seq: Optional[int] = None) -> Optional[tuple[str, str]]:
    """(backend, why) from the table that routes `op`, or None when no table does."""
    t = table_for(op)
    return None if t is None else t.lookup(op, direction, dtype, width, layout, seq)


def reset() -> None:
    global _tables
    _tables = None
