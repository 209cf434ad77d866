"""Which backend serves which op call.

Every fused op has a `reference` implementation (plain PyTorch, always available) and may
have others: `triton` (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), `cuda`
(CUDA C++ extension) and `cpp` (the C++ CPU extension). A backend registers a forward and
a backward for an op, the device types it serves, and a loader that imports whatever it
needs (triton, the compiled extension) and raises with a reason when it cannot.

Selection is per (op, device type) and cached, so the per-call cost is one dict lookup:
- BERTFAST_BACKEND=auto (default): CUDA tensors try triton -> reference, CPU tensors
  cpp -> reference; `triton` on CPU only when forced and TRITON_INTERPRET=1.
  Where a measured routing table (bertfast/routing.py) routes some of an op's cases on CUDA to
  another backend (the CUDA C++ kernels, say), auto serves each call by (direction, dtype,
  width) from the table: the selected implementation is then a router over the table's
  backends, and it costs one more dict lookup per call. A table without a measurement routes
  nothing, and the backends it names are never loaded (no build for nothing).
- BERTFAST_BACKEND=<name> or `with bertfast.use_backend(name):` forces one backend; when it
  cannot serve a call the reference serves it, with one warning naming the op and the reason.
- BERTFAST_STRICT=1 turns every such fallback into an error.

A backend is trusted only after a probe: one tiny launch per (op, backend, device type)
whose result must match the reference. The verdict is cached for the process.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

BACKENDS = ("triton", "cuda", "cpp", "reference")
ANY_DEVICE = ("*",)  # the reference serves tensors on any device
_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpp", "reference")}
# device types on which auto consults the routing tables (tests add "cpu")
_ROUTED_DEVICES = ("cuda",)


class BackendError(RuntimeError):
    """A backend was forced (or BERTFAST_STRICT=1 is set) and cannot serve the call."""


@dataclass
class Impl:
    """One backend's implementation of one op."""

    op: str
    backend: str
    fwd: Callable
    bwd: Callable
    devices: tuple
    # Imports/builds what the backend needs; raises (ImportError, RuntimeError, ...) with a
    # reason when it cannot. Called once, lazily, at first use.
    load: Optional[Callable[[], None]] = None
    extra: dict = field(default_factory=dict)


@dataclass
class OpSpec:
    """What the backend layer needs to know about an op to probe its implementations."""

    name: str
    # make_probe(device) -> (args, kwargs) for a tiny forward call
    make_probe: Callable
    # compare(out_backend, out_reference) -> None or raises AssertionError
    compare: Callable
    impls: dict = field(default_factory=dict)
    # route_key(direction, args) -> (dtype, width) of a backend call, for the routing table
    route_key: Optional[Callable] = None


def arg_route_key(fwd_index: int = 0, bwd_index: int = 1) -> Callable:
    """A route_key reading (dtype, last dimension) of one tensor argument: args[fwd_index] of a
    forward call, args[bwd_index] of a backward call (the default: x, and x after dout)."""
    def key(direction, args):
        t = args[fwd_index if direction == "fwd" else bwd_index]
        return t.dtype, t.shape[-1]

    return key


_ops: dict[str, OpSpec] = {}
_cache: dict = {}
_load_state: dict = {}  # (op, backend) -> None (ok) or reason str
_probe_state: dict = {}  # (op, backend, device_type) -> None (ok) or reason str
_warned: set = set()
_local = threading.local()
_lock = threading.Lock()


def register_op(name: str, make_probe: Callable, compare: Callable, route_key: Optional[Callable] = None) -> OpSpec:
    """route_key: how the routing table reads (dtype, width) from the op's backend arguments
    (default arg_route_key(): the first argument of a forward, the second of a backward)."""
    spec = _ops.get(name)
    if spec is None:
        spec = _ops[name] = OpSpec(name, make_probe, compare, route_key=route_key or arg_route_key())
    return spec


def register_impl(op: str, backend: str, *, fwd, bwd, devices, load=None, **extra) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _ops[op].impls[backend] = Impl(op, backend, fwd, bwd, tuple(devices), load, extra)
    _cache.clear()


def registered_ops() -> list[str]:
    return list(_ops)


def _env_backend() -> str:
    name = os.environ.get("BERTFAST_BACKEND", "auto").strip().lower() or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"BERTFAST_BACKEND must be 'auto' or one of {BACKENDS}, got {name!r}")
    return name


def strict() -> bool:
    return os.environ.get("BERTFAST_STRICT", "0").strip() not in ("", "0", "false", "False")


def requested() -> str:
    """The backend asked for right now: use_backend(...) if active, else BERTFAST_BACKEND."""
    forced = getattr(_local, "forced", None)
    return forced if forced is not None else _env_backend()


@contextlib.contextmanager
def use_backend(name: str):
    """Force `name` ('auto', 'triton', 'cuda', 'cpp' or 'reference') inside the block."""
    name = name.strip().lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"use_backend: name must be 'auto' or one of {BACKENDS}, got {name!r}")
    prev = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = prev


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _serves(impl: Impl, device_type: str) -> bool:
    if device_type in impl.devices or impl.devices == ANY_DEVICE:
        return True
    # Under TRITON_INTERPRET=1 the Triton kernels run on CPU tensors (tests, no GPU).
    return impl.backend == "triton" and device_type == "cpu" and _interpret()


def _loaded(impl: Impl) -> Optional[str]:
    key = (impl.op, impl.backend)
    if key not in _load_state:
        reason = None
        if impl.load is not None:
            try:
                impl.load()
            except Exception as e:  # noqa: BLE001 - any failure means "cannot serve"
                reason = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
        _load_state[key] = reason
    return _load_state[key]


def _probed(spec: OpSpec, impl: Impl, device_type: str) -> Optional[str]:
    key = (impl.op, impl.backend, device_type)
    if key not in _probe_state:
        _probe_state[key] = None  # re-entrancy guard: the probe itself dispatches
        reason = None
        try:
            import torch

            args, kwargs = spec.make_probe(torch.device(device_type))
            ref = spec.impls["reference"].fwd(*args, **kwargs)
            got = impl.fwd(*args, **kwargs)
            spec.compare(got, ref)
        except Exception as e:  # noqa: BLE001
            reason = f"probe failed: {type(e).__name__}: {e}".strip().splitlines()[0][:300]
        _probe_state[key] = reason
    return _probe_state[key]


def _why_not(spec: OpSpec, name: str, device_type: str) -> Optional[str]:
    impl = spec.impls.get(name)
    if impl is None:
        return f"no {name} implementation of {spec.name}"
    if not _serves(impl, device_type):
        extra = " (set TRITON_INTERPRET=1 to run Triton on CPU)" if name == "triton" else ""
        return f"{name} does not serve {device_type} tensors{extra}"
    reason = _loaded(impl)
    if reason is None and name != "reference":
        reason = _probed(spec, impl, device_type)
    return reason


def _fallback(op: str, name: str, reason: str) -> None:
    msg = f"bertfast: {op} cannot use backend {name!r} ({reason})"
    if strict():
        raise BackendError(msg + " [BERTFAST_STRICT=1]")
    msg += "; falling back"
    if (op, name, reason) not in _warned:
        _warned.add((op, name, reason))
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def select(op: str, device_type: str) -> Impl:
    """The implementation that serves `op` on tensors of `device_type` right now."""
    want = requested()
    key = (op, device_type, want)
    impl = _cache.get(key)
    if impl is not None:
        return impl
    with _lock:
        spec = _ops[op]
        if want == "auto":
            table = _table(op, device_type)
            chosen = "reference"
            for name in _auto_order(op, device_type, table):
                reason = _why_not(spec, name, device_type)
                if reason is None:
                    chosen = name
                    break
                impl = spec.impls.get(name)
                if impl is not None and _serves(impl, device_type):
                    # registered for this device but failed to load or probe: say so once
                    _fallback(op, name, reason)
            if table is not None and chosen == table.default:
                routed = _router(spec, table, chosen, device_type)
                if routed is not None:
                    _cache[key] = routed
                    return routed
        else:
            reason = _why_not(spec, want, device_type)
            chosen = want
            if reason is not None:
                _fallback(op, want, reason)
                chosen = "reference"
        impl = spec.impls[chosen]
        _cache[key] = impl
        return impl


def _table(op: str, device_type: str):
    if device_type not in _ROUTED_DEVICES:
        return None
    from . import routing

    t = routing.table_for(op)
    return t if t is not None and t.level == "call" else None  # "op" tables are the op's own business


def _auto_order(op: str, device_type: str, table) -> tuple:
    base = _AUTO_ORDER.get(device_type, ("reference",))
    if table is None:
        return base
    return (table.default,) + tuple(b for b in base if b != table.default)


def _router(spec: OpSpec, table, base: str, device_type: str) -> Optional[Impl]:
    """An Impl that serves each call from the backend the routing table names for its
    (direction, dtype, width), over `base` and every other backend of the table that loads and
    probes here; None when the table routes nothing of this op away from `base`. A table's
    backend that cannot serve falls back to `base` with one warning."""
    impls = {base: spec.impls[base]}
    for name in sorted(table.backends(spec.name) - {base}):
        reason = _why_not(spec, name, device_type)
        if reason is None:
            impls[name] = spec.impls[name]
        else:
            _fallback(spec.name, name, f"{reason}; the routing table {table.name} asked for it")
    if len(impls) == 1:
        return None
    op, route_key, lookup = spec.name, spec.route_key, table.lookup
    memo: dict = {}

    def pick(direction, args):
        dtype, width = route_key(direction, args)
        k = (direction, dtype, width)
        impl = memo.get(k)
        if impl is None:
            impl = memo[k] = impls.get(lookup(op, direction, dtype, width)[0], impls[base])
        return impl

    def fwd(*args, **kwargs):
        return pick("fwd", args).fwd(*args, **kwargs)

    def bwd(*args):
        return pick("bwd", args).bwd(*args)

    name = "|".join([n for n in impls if n != base] + [base])  # e.g. "cuda|triton"
    return Impl(op, name, fwd, bwd, spec.impls[base].devices, extra={"routes": impls, "table": table})


def explain(op: str, device_type: str) -> tuple[str, str]:
    """(backend, why) for `bertfast info`: which backend serves `op` and why the ones before it
    don't; a routed op reads e.g. ("cuda|triton", "<the table's cases>")."""
    want = requested()
    spec = _ops[op]
    name, why = _explain(op, device_type, want, spec)
    if want == "auto" and device_type in _ROUTED_DEVICES:
        from . import routing

        t = routing.table_for(op)
        if t is not None and t.level == "op":  # the op routes some calls before its backends
            why = (why + "; " if why != "first choice" else "") + "before the backends: " + t.describe(op)
    return name, why


def _explain(op: str, device_type: str, want: str, spec: OpSpec) -> tuple[str, str]:
    table = _table(op, device_type) if want == "auto" else None
    order = _auto_order(op, device_type, table) if want == "auto" else (want, "reference")
    notes = []
    for name in order:
        reason = _why_not(spec, name, device_type)
        if reason is None:
            if table is not None and name == table.default:
                routed = select(op, device_type)
                if "routes" in routed.extra:
                    return routed.backend, table.describe(op)
                notes.append(table.describe(op))
            return name, "; ".join(notes) if notes else "first choice"
        notes.append(f"{name}: {reason}")
    return "reference", "; ".join(notes)


def reset() -> None:
    """Forget cached selections, load and probe verdicts and warnings (tests use this)."""
    _cache.clear()
    _load_state.clear()
    _probe_state.clear()
    _warned.clear()
    from . import routing

    routing.reset()
