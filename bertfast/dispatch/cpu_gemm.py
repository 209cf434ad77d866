"""CPU inference GEMMs: per shape, the fastest GEMM library torch ships, weights packed once.

The encoder's four GEMMs per layer (fused QKV, attention output, intermediate, output) are
most of a full batch's time on a CPU. torch reaches two GEMM libraries there, and which is
faster depends on the shape and the machine:

    "mkl"          torch.mm / addmm (what F.linear runs): the weights as they are, nothing packed
    "onednn"       torch.ops.mkldnn._linear_pointwise on weights reordered once into oneDNN's
                   blocked layout (torch.ops.mkldnn._reorder_linear_weight); the bias is a
                   post-op; GELU stays in our bias_gelu kernel after the GEMM
    "onednn_gelu"  the same GEMM with bias + GELU as oneDNN post-ops (one pass instead of two)

and, for int8 (dynamic quantisation: int8 weights with one scale per output channel,
activations quantised per call from their own range; VNNI instructions):

    "fbgemm"       torch.ops.quantized.linear_dynamic on weights packed by FBGEMM
    "onednn_int8"  the same op on weights packed by oneDNN

MKL's own prepacked GEMM (torch.ops.mkl._mkl_linear) is not a candidate: it packs for one
batch size and runs the unpacked GEMM at every other, and ragged batches change it per call.
The residual add stays in our bias_residual_layernorm kernel: LayerNorm needs its own pass
over each row after the GEMM anyway, and that pass reads the bias and the residual for free
(oneDNN's binary-add post-op would save nothing).

Which one serves is decided per (precision, epilogue, M bucket, K, N): measured once per
machine on first use (candidates interleaved, median of rounds) and remembered in a JSON file
under ~/.cache/bertfast (BERTFAST_CACHE_DIR), keyed by the CPU model, the torch version and the
thread count, like the GPU routing tables but measured where it runs. BERTFAST_CPU_GEMM forces
one implementation ("mkl", "onednn", "onednn_gelu", "fbgemm", "onednn_int8"; "auto" measures;
"off": the encoder keeps its F.linear path, no packing, no measurement).

In fp32 nothing is kept: each call runs on the parameters as they are (oneDNN is as fast on
the plain weight as on a reordered copy, and writes through `.data` bump no version counter, so
a kept copy could go stale unseen). In bf16 and int8 the converted weights are made at first use
and kept beside the parameters (a weak table keyed by
the first weight, so pickling, deepcopy and state dicts never see them); every call compares
the parameters' version counters and storage pointers with those the pack was made from, so
an optimizer step, an in-place edit or a `.data` swap is seen on the next call; an in-place write
through `.data` is not (call `release(model)` after one, or set the precision again). This path is
for inference only: the engine calls it under no_grad / inference_mode on CPU tensors, never
when autograd records, under torch.compile or autocast (those keep F.linear).

Precisions: "fp32" (default), "bf16" (activations cast to bf16 per GEMM, weights packed in bf16,
output bf16; needs AVX512-BF16 or AMX) and "int8" (fp32 in and out; needs VNNI).

In int8, each GEMM follows its int8 plan where it has one (dispatch/int8_plan.py: smoothed, its
widest input channels in fp32 beside, or kept in bf16 / fp32; made by models/int8_calibration.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import warnings
import weakref
from typing import Callable, Optional, Sequence

import torch

from . import int8_plan as int8_plan_mod
from .int8_plan import int8_plan, recording, recording_inputs, set_int8_plan  # noqa: F401 (this module's API)

PRECISIONS = ("fp32", "bf16", "int8")
EPILOGUES = ("none", "bias", "gelu", "gelu_tanh")
IMPLS = ("mkl", "onednn", "onednn_gelu", "fbgemm", "onednn_int8")
_GELU = {"gelu": "none", "gelu_tanh": "tanh"}  # oneDNN's post-op algorithm names
_MAX_BUCKET = 4096  # rows beyond this share the 4096-row decision (measured at 4096)


# --------------------------------------------------------------------------------------
# what this CPU can do


def check_precision(precision: str) -> str:
    """`precision` itself when this CPU runs it fast; else a ValueError / RuntimeError that says why."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and not has_bf16():
        raise RuntimeError("precision='bf16' needs a CPU with AVX512-BF16 or AMX instructions; this one has neither "
                           "(bf16 GEMMs would be emulated, slower than fp32). Use precision='fp32'.")
    if precision == "int8":
        if not torch.cpu._is_vnni_supported():
            raise RuntimeError("precision='int8' needs a CPU with VNNI instructions (AVX512-VNNI or AVX-VNNI); this "
                               "one has none (int8 products would saturate or crawl). Use precision='fp32'.")
        if not {"fbgemm", "onednn"} & set(torch.backends.quantized.supported_engines):
            raise RuntimeError("precision='int8' needs torch's fbgemm or onednn quantized engine; this torch build "
                               f"has only {torch.backends.quantized.supported_engines}")
    return precision


def candidates(precision: str, epilogue: str) -> tuple:
    """The implementations that can serve a GEMM of this precision and epilogue here."""
    if precision == "int8":
        engines = torch.backends.quantized.supported_engines
        return tuple(n for n, e in (("fbgemm", "fbgemm"), ("onednn_int8", "onednn")) if e in engines)
    out = ["mkl"]
    if torch.backends.mkldnn.is_available():
        out.append("onednn")
        if epilogue in _GELU:
            out.append("onednn_gelu")
    return tuple(out)


# --------------------------------------------------------------------------------------
# packed weights


def _stamp(tensors) -> Optional[tuple]:
    """What identifies the parameters' current values: version counter and storage of each
    (None: inference tensors, which keep no version counter; those are never packed)."""
    try:
        return tuple((t._version, t.data_ptr(), t.dtype, tuple(t.shape)) for t in tensors)
    except RuntimeError:
        return None


def _quantize_rows(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 with one scale per output channel (row of w)."""
    scale = (w.abs().amax(dim=1).double() / 127.0).clamp_min(1e-12)
    with warnings.catch_warnings():  # torch marks its quantized tensor type deprecated; its kernels are the point
        warnings.simplefilter("ignore")
        return torch.quantize_per_channel(w.float(), scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)


class _Pack:
    """One GEMM's weights (several concatenate along N, e.g. Q, K and V) in one implementation's
    layout, and the bias beside them in the dtype that implementation adds it in."""

    def __init__(self, impl: str, precision: str, weights, biases, fold_bias: bool, rows_hint: int,
                 plan: Optional[tuple] = None):
        w = weights[0].detach() if len(weights) == 1 else torch.cat([t.detach() for t in weights])
        b = None if biases is None else biases[0].detach() if len(biases) == 1 else torch.cat(
            [t.detach() for t in biases])
        self.impl, self.n, self.inv_smooth, self.outliers = impl, w.shape[0], None, None
        if impl in ("fbgemm", "onednn_int8"):
            self.bias = None if b is None else b.float().contiguous()
            act_amax, _keep, outliers = plan or (None, "int8", None)
            if outliers is not None:  # int8 plan: these input channels in an fp32 GEMM beside
                self.outliers = (outliers, w[:, outliers].float().t().contiguous())
            if act_amax is not None:  # int8 plan: smoothed (dispatch/int8_plan.py)
                smooth = int8_plan_mod.smoothing(act_amax, w)
                w, self.inv_smooth = w.float() * smooth, (1.0 / smooth).contiguous()
            if outliers is not None:  # zeroed in the int8 GEMM's input and weight: out of its range
                if self.inv_smooth is not None:
                    self.inv_smooth = self.inv_smooth.index_fill(0, outliers, 0.0)
                w = w.float().index_fill(1, outliers, 0.0)
            with _ENGINE_LOCK:  # the engine is a process-wide setting read when packing
                before = torch.backends.quantized.engine
                torch.backends.quantized.engine = "fbgemm" if impl == "fbgemm" else "onednn"
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        # a folded bias is added in fp32 after dequantising
                        self.weight = torch.ops.quantized.linear_prepack(_quantize_rows(w),
                                                                         self.bias if fold_bias else None)
                finally:
                    torch.backends.quantized.engine = before
            return
        dtype = torch.bfloat16 if precision == "bf16" else w.dtype
        w = w.to(dtype).contiguous()
        if impl == "mkl":
            self.weight = w
            self.bias = None if b is None else b.to(dtype).contiguous()
        elif precision == "fp32":  # oneDNN on the parameter itself (see _pack_for)
            self.weight = w
            self.bias = None if b is None else b.float().contiguous()
        else:  # oneDNN: reordered once; its bias post-op adds an fp32 bias to bf16 products too
            self.weight = torch.ops.mkldnn._reorder_linear_weight(w, rows_hint)
            self.bias = None if b is None else b.float().contiguous()

    def __call__(self, x: torch.Tensor, epilogue: str, out: Optional[torch.Tensor]) -> torch.Tensor:
        """x @ W^T; + bias when epilogue is "bias"; bias and GELU too for "onednn_gelu"."""
        impl = self.impl
        if impl in ("fbgemm", "onednn_int8"):
            if self.inv_smooth is not None:  # smoothed (outlier channels, if any, zeroed with it)
                xq = torch.mul(x, self.inv_smooth, out=int8_plan_mod.scratch(x))
                y = torch.ops.quantized.linear_dynamic(xq, self.weight, False)
                if self.outliers is not None:
                    y.addmm_(x.index_select(1, self.outliers[0]), self.outliers[1])
                return y
            if self.outliers is None:
                return torch.ops.quantized.linear_dynamic(x, self.weight, False)
            # outlier channels only: a copy of x without them would cost a pass over it (a third of
            # this GEMM's time), so they are zeroed in x itself for the int8 GEMM and written back
            idx, w_out = self.outliers
            x_out = x.index_select(1, idx)
            x.index_fill_(1, idx, 0.0)
            try:
                y = torch.ops.quantized.linear_dynamic(x, self.weight, False)
            finally:
                x.index_copy_(1, idx, x_out)
            return y.addmm_(x_out, w_out)
        if impl == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias if epilogue == "bias" else None,
                                                      "none", [], "")
        if impl == "onednn_gelu":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu", [], _GELU[epilogue])
        if out is not None and (out.dtype != x.dtype or out.shape != (x.shape[0], self.n)):
            out = None
        if epilogue == "bias":
            if out is None:
                return torch.addmm(self.bias, x, self.weight.t())
            return torch.addmm(self.bias, x, self.weight.t(), out=out)
        return torch.mm(x, self.weight.t()) if out is None else torch.mm(x, self.weight.t(), out=out)


# packs per first weight, by id (a tensor's == is elementwise, so no WeakKeyDictionary):
# {id(weight): (weakref to it, {(ids of all weights and biases, precision, impl, bias folded): (stamp, _Pack)})};
# an entry goes when its weight is collected
_PACKS: dict = {}
_PACK_LOCK = threading.RLock()  # reentrant: a collected weight's callback may run while it is held


def _table(weight: torch.Tensor, create: bool) -> Optional[dict]:
    """The packs of `weight` (call with _PACK_LOCK held)."""
    key = id(weight)
    hit = _PACKS.get(key)
    if hit is not None and hit[0]() is weight:
        return hit[1]
    if not create:
        return None

    def gone(_ref, key=key):
        with _PACK_LOCK:
            if _PACKS.get(key, (None,))[0] is _ref:
                del _PACKS[key]

    table: dict = {}
    _PACKS[key] = (weakref.ref(weight, gone), table)
    return table
_ENGINE_LOCK = threading.Lock()


def _pack_for(impl: str, precision: str, weights, biases, fold_bias: bool, rows: int,
              plan: Optional[tuple] = None) -> Optional[_Pack]:
    params = tuple(weights) + (tuple(biases) if biases is not None else ())
    if precision == "fp32":
        # fp32 keeps no copy of the weights: writes through `.data` (EMA updates, weight surgery,
        # some loaders) bump no version counter, so a kept copy could go stale unseen. oneDNN runs
        # as fast on the plain weight as on its reordered copy, and concatenating Q, K and V per
        # call costs a copy of one layer's QKV weights, small beside their GEMM.
        return _Pack(impl, precision, weights, biases, fold_bias, rows)
    stamp = _stamp(params)
    if stamp is None:
        return None
    stamp += (id(plan),)  # a new int8 plan makes the pack again
    key = (tuple(id(p) for p in params), precision, impl, fold_bias)
    with _PACK_LOCK:
        hit = _table(weights[0], True).get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    pack = _Pack(impl, precision, weights, biases, fold_bias, rows, plan)  # outside the lock: packing takes ms
    with _PACK_LOCK:
        # a weight edited since: the stale pack is replaced, not kept beside
        _table(weights[0], True)[key] = (stamp, pack)
    return pack


def pack_count(weight: torch.Tensor) -> int:
    """How many packs are held for the GEMMs whose first weight is `weight` (tests, diagnostics)."""
    with _PACK_LOCK:
        return len(_table(weight, False) or {})


def release(module: torch.nn.Module) -> None:
    """Drop the packed weights and int8 plans made from `module`'s parameters (packs come back on
    the next call; plans when the model calibrates again)."""
    with _PACK_LOCK:
        for p in module.parameters():
            if _table(p, False) is not None:
                del _PACKS[id(p)]
            int8_plan_mod.drop(p)


# --------------------------------------------------------------------------------------
# the choice: forced, or measured once per machine and remembered


def bucket(rows: int) -> int:
    """The M bucket of a call: the next power of two from 16 up, 4096 for anything larger."""
    b = 16
    while b < rows and b < _MAX_BUCKET:
        b *= 2
    return b


def _cpu_name() -> str:
    name, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in (platform.processor(), platform.machine()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    # the model name alone can hide a generation (a VM may say only "AMD EPYC"): the flags tell them apart
    return f"{name} [{hashlib.sha1(flags.encode()).hexdigest()[:8]}]" if flags else name


def cache_path() -> str:
    """The JSON file this machine's measured choices live in."""
    root = os.environ.get("BERTFAST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "bertfast")
    cpu = "".join(c if c.isalnum() else "-" for c in _cpu_name()).strip("-")[:80]
    return os.path.join(root, f"cpu_gemm-{cpu}-torch{torch.__version__}-{torch.get_num_threads()}t.json")


_CHOICES: dict = {}  # path -> {key: impl}
_CHOICE_LOCK = threading.Lock()


def _key(precision: str, epilogue: str, rows: int, k: int, n: int) -> str:
    return f"{precision}/{epilogue}/{bucket(rows)}/{k}/{n}"


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return {k: v["impl"] for k, v in data.get("entries", {}).items() if v.get("impl") in IMPLS}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}  # absent or damaged: measured again


def _save(path: str, key: str, entry: dict) -> None:
    """Adds one entry to the file, all or nothing (a temporary beside it, then a rename); a
    read-only or full disk only costs the next process a measurement."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data.get("entries"), dict):
                raise ValueError
        except (OSError, ValueError, AttributeError):
            data = {"cpu": _cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(), "entries": {}}
        data["entries"][key] = entry
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".cpu_gemm-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        warnings.warn(f"bertfast: could not save the CPU GEMM choice to {path}: {e}", stacklevel=3)


def forced() -> Optional[str]:
    """BERTFAST_CPU_GEMM when it names an implementation (None: "auto", measured)."""
    raw = os.environ.get("BERTFAST_CPU_GEMM", "auto").strip().lower() or "auto"
    if raw == "auto":
        return None
    if raw == "off":  # the encoder keeps F.linear; a direct call here gets the plain GEMM
        return "mkl"
    if raw not in IMPLS:
        raise ValueError(f"BERTFAST_CPU_GEMM must be 'auto', 'off' or one of {IMPLS}, got {raw!r}")
    return raw


def measure(precision: str, epilogue: str, rows: int, k: int, n: int,
            finish: Optional[Callable] = None, rounds: int = 5) -> dict:
    """Microseconds per call of every candidate at (bucket(rows), k, n) on random data, candidates
    interleaved round by round (a load change hits them alike), median over the rounds. `finish`
    (y, bias) -> result: the epilogue a candidate does not fuse, as the caller runs it."""
    m = bucket(rows)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen)
    w = torch.nn.Parameter(torch.randn(n, k, generator=gen) * k ** -0.5, requires_grad=False)
    b = torch.nn.Parameter(torch.randn(n, generator=gen) * 0.1, requires_grad=False)
    calls = {name: (lambda name=name: _run(name, precision, epilogue, x, (w,), (b,), finish, None))
             for name in candidates(precision, epilogue)}
    times: dict = {name: [] for name in calls}
    with torch.inference_mode():
        for call in calls.values():
            call()  # packs, and warms the library's kernel cache
        for _ in range(rounds):
            for name, call in calls.items():
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
    with _PACK_LOCK:
        _PACKS.pop(id(w), None)
    return {name: statistics.median(ts) * 1e6 for name, ts in times.items()}


def choose(precision: str, epilogue: str, rows: int, k: int, n: int, finish: Optional[Callable] = None) -> str:
    """The implementation that serves this GEMM: BERTFAST_CPU_GEMM when set, else this machine's
    measured fastest (measured now if no earlier process did)."""
    impl = forced()
    if impl is not None:
        if impl == "onednn_gelu" and epilogue not in _GELU:
            impl = "onednn"  # oneDNN everywhere, with the GELU post-op where there is a GELU
        if impl not in candidates(precision, epilogue):
            raise ValueError(f"BERTFAST_CPU_GEMM={impl} cannot serve a {precision} GEMM with epilogue {epilogue!r} "
                             f"here; it takes one of {candidates(precision, epilogue)}")
        return impl
    path, key = cache_path(), _key(precision, epilogue, rows, k, n)
    with _CHOICE_LOCK:
        table = _CHOICES.get(path)
        if table is None:
            table = _CHOICES[path] = _load(path)
        if key in table:
            return table[key]
        us = measure(precision, epilogue, rows, k, n, finish)
        best = min(us, key=us.get)
        table[key] = best
        _save(path, key, {"impl": best, "us": {name: round(v, 1) for name, v in us.items()}})
        return best


def forget_choices() -> None:
    """Drop the choices read into this process (the file stays; tests point BERTFAST_CACHE_DIR elsewhere)."""
    with _CHOICE_LOCK:
        _CHOICES.clear()


# --------------------------------------------------------------------------------------
# the call


def _run(impl: str, precision: str, epilogue: str, x: torch.Tensor, weights, biases, finish, out, plan=None):
    pack = _pack_for(impl, precision, weights, biases, epilogue == "bias", bucket(x.shape[0]), plan)
    if pack is None:  # inference-tensor weights: no version counter to trust a pack with
        w = weights[0] if len(weights) == 1 else torch.cat(list(weights))
        b = None if biases is None else biases[0] if len(biases) == 1 else torch.cat(list(biases))
        y = torch.nn.functional.linear(x, w, b if epilogue == "bias" else None)
        return y if epilogue in ("none", "bias") else finish(y, b)
    if precision == "bf16" and x.dtype != torch.bfloat16:
        x = x.to(torch.bfloat16)
    y = pack(x, epilogue, out)
    if epilogue in _GELU and impl != "onednn_gelu":
        return finish(y, pack.bias)
    return y


def linear(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Optional[Sequence[torch.Tensor]] = None,
           epilogue: str = "none", precision: str = "fp32", finish: Optional[Callable] = None,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """An encoder GEMM on CPU rows x (M, K), inference only, through this machine's fastest library.

    weights: the (N_i, K) weights whose concatenation along N is the GEMM's (one for most
    layers; Q, K and V for the fused projection); biases: theirs, or None.
    epilogue: "none" -> x @ W^T (the caller adds the bias later, e.g. in its add-and-norm kernel);
    "bias" -> x @ W^T + b; "gelu" / "gelu_tanh" -> GELU(x @ W^T + b), fused into the GEMM where the
    chosen library does that faster, else `finish(y, bias)` (the caller's bias+GELU kernel,
    writing over y) runs it. precision: "fp32", "bf16" (result bf16) or "int8" (result fp32).
    out: a buffer the unpacked GEMM may write into (others return fresh memory)."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if epilogue in _GELU and finish is None:
        raise ValueError(f"epilogue={epilogue!r} needs finish, the bias+GELU a library without the post-op runs after")
    rows, k = x.shape
    n = sum(w.shape[0] for w in weights)
    plan, keep = None, "int8"
    table = int8_plan_mod.recording_table()
    if table is not None:  # a calibration pass: the fp32 product, and the input's range
        amax = x.detach().abs().amax(0).float()
        seen = table.get(id(weights[0]))
        table[id(weights[0])] = (amax if seen is None else torch.maximum(seen[0], amax), n)
        keep = "fp32"
    elif precision == "int8":
        plan = int8_plan(weights[0])
        keep = plan[1] if plan is not None else "int8"
    if keep != "int8":
        precision = "bf16" if keep == "bf16" and has_bf16() else "fp32"
        y = _run(_kept_impl(precision, epilogue, rows, k, n, finish), precision, epilogue, x, weights, biases,
                 finish, out if precision == "fp32" else None)
        return y.float()  # int8 mode returns fp32 (a no-op for fp32)
    impl = choose(precision, epilogue, rows, k, n, finish)
    return _run(impl, precision, epilogue, x, weights, biases, finish, out, plan)


def has_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _kept_impl(precision: str, epilogue: str, rows: int, k: int, n: int, finish) -> str:
    """The library of a GEMM an int8 plan keeps in bf16/fp32: measured like any other; a forced int8
    library (BERTFAST_CPU_GEMM=fbgemm|onednn_int8) means oneDNN for it."""
    if forced() in ("fbgemm", "onednn_int8"):
        return "onednn" if "onednn" in candidates(precision, epilogue) else "mkl"
    return choose(precision, epilogue, rows, k, n, finish)
