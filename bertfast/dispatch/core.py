"""Which implementation serves an op call, decided here and nowhere else.

Every fused op has rows in the dispatch table (dispatch/table.py): its implementations, each
declaring what it serves (dispatch/serves.py). `select(op, call)` returns the `Impl` (a forward
and a backward function) that serves one `Call` (device, dtype, width, direction, layout,
sequence length, mask kind, dropout, causal kind), memoised per distinct call, so the price per
call is one dict lookup; BertModel asks once per forward and passes the answer to the ops'
unchecked entries.

How a call is served:
- BERTFAST_BACKEND=auto (default): first the implementation a measured routing table
  (dispatch/routing.py, consulted for CUDA tensors) names for the call, then the rows of the
  device's backends in AUTO_ORDER (CUDA: triton, reference; CPU: cpp, whose rows are ATen's CPU
  flash attention and the C++ kernels, then the reference).
- BERTFAST_BACKEND=<name> or `with bertfast.use_backend(name):` tries that backend's rows, then
  the reference.
- An implementation serves a call when its declaration accepts it, it loads (imports, builds) and,
  once per device type, a tiny probe call matches the reference. Each verdict is cached.
- A forward whose backward autograd will run ("fwd+bwd") gets its two passes chosen at once: the
  backward from an implementation with the forward's saved-tensor contract (ATen's bf16 CPU flash
  forward pairs with the C++ backward). Kernels with their own autograd (SDPA, varlen_attn) serve
  both passes or none.
- When the reference ends up serving a call a kernel was meant for (a forced backend, or auto on a
  device that has kernels), one warning lists each refused implementation with its reason;
  BERTFAST_STRICT=1 makes it an error. float64 is the oracle's precision: the reference serves it
  by design, silently. A routing table asking for an implementation that cannot serve here warns too.

`explain(op, device_type)` says, for `bertfast info`, what serves a typical call and why every
other row refused it.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

from . import table as _table_mod
from .serves import Call
from .table import AUTO_ORDER, Implementation

BACKENDS = ("triton", "cuda", "cpp", "reference")
# device types on which auto consults the routing tables (the tables hold GPU measurements;
# tests add "cpu")
ROUTED_DEVICES = ("cuda",)


class BackendError(RuntimeError):
    """A backend was forced (or BERTFAST_STRICT=1 is set) and cannot serve the call."""


class Impl:
    """What serves one call: `fwd` and `bwd` (the op's backend signatures; bwd is None for a
    kernel with its own autograd), `backend` its name ("cpp", or "aten_flash+cpp" when the two
    passes come from two implementations)."""

    __slots__ = ("op", "backend", "fwd", "bwd", "own_autograd", "inplace")

    def __init__(self, op: str, fwd_impl: Implementation, bwd_impl: Optional[Implementation]):
        self.op = op
        self.fwd = fwd_impl.fwd
        self.bwd = bwd_impl.bwd if bwd_impl is not None else fwd_impl.bwd
        self.own_autograd = fwd_impl.own_autograd
        self.inplace = fwd_impl.inplace
        same = bwd_impl is None or bwd_impl is fwd_impl
        self.backend = fwd_impl.name if same else f"{fwd_impl.name}+{bwd_impl.name}"

    def __repr__(self):
        return f"Impl({self.op}: {self.backend})"


@dataclass
class OpSpec:
    """What dispatch knows of an op: its table rows and how to probe them."""

    name: str
    # make_probe(device) -> (args, kwargs) of a tiny forward call; compare(got, ref) raises if off
    make_probe: Callable
    compare: Callable
    # typical(device_type) -> a Call `explain` describes (for `bertfast info`)
    typical: Callable
    rows: dict = field(default_factory=dict)  # name -> Implementation, in table order

    @property
    def reference(self) -> Implementation:
        return self.rows["reference"]


_ops: dict = {}
_cache: dict = {}
_encoder_cache: dict = {}  # resolve_encoder's answers
_load_state: dict = {}  # (op, name) -> None (ok) or reason
_probe_state: dict = {}  # (op, name, device_type) -> None (ok) or reason
_warned: set = set()
_local = threading.local()
_lock = threading.RLock()


def register_op(name: str, *, reference: tuple, make_probe: Callable, compare: Callable,
                typical: Callable) -> OpSpec:
    """Called by bertfast/ops/<op>.py: its reference (fwd, bwd) and probe; the other rows come
    from the dispatch table."""
    spec = _ops.get(name)
    if spec is None:
        rows = {r.name: r for r in _table_mod.rows_of(name)}
        if "reference" not in rows:
            raise ValueError(f"the dispatch table has no reference row for {name!r}")
        rows["reference"].fwd, rows["reference"].bwd = reference
        spec = _ops[name] = OpSpec(name, make_probe, compare, typical, rows)
    return spec


def register_impl(op: str, impl: Implementation, first: bool = False) -> None:
    """Add or replace a row at run time (tests' fake implementations); first=True puts it before
    the others (a new row otherwise goes just before the reference)."""
    rows = _ops[op].rows
    rows.pop(impl.name, None)
    items = list(rows.items())
    pos = 0 if first else len(items) - 1
    items.insert(pos, (impl.name, impl))
    rows.clear()
    rows.update(items)
    reset(tables=False)


def registered_ops() -> list:
    return list(_ops)


def spec(op: str) -> OpSpec:
    return _ops[op]


# ---------------------------------------------------------------------------------------------
# the switches

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


# ---------------------------------------------------------------------------------------------
# one implementation: declared, loaded, probed

def _loaded(impl: Implementation) -> Optional[str]:
    key = (impl.op, impl.name)
    if key not in _load_state:
        reason = None
        if impl.load is not None:
            try:
                impl.fwd, impl.bwd = impl.load()
            except Exception as e:  # noqa: BLE001 - any failure means "cannot serve"
                reason = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
        _load_state[key] = reason
    return _load_state[key]


def _probed(spec: OpSpec, impl: Implementation, device_type: str) -> Optional[str]:
    if not impl.probe:
        return None
    key = (impl.op, impl.name, device_type)
    if key not in _probe_state:
        _probe_state[key] = None  # re-entrancy guard: the probe itself may dispatch
        reason = None
        try:
            import torch

            args, kwargs = spec.make_probe(torch.device(device_type))
            ref = spec.reference.fwd(*args, **kwargs)
            got = impl.fwd(*args, **kwargs)
            spec.compare(got, ref)
        except Exception as e:  # noqa: BLE001
            reason = f"probe failed: {type(e).__name__}: {e}".strip().splitlines()[0][:300]
        _probe_state[key] = reason
    return _probe_state[key]


def not_supported_reasons(impl: Implementation, call: Call, pass_: str) -> tuple[list, list]:
    """(capability, semantic) reasons why `impl`'s declaration refuses `pass_` of `call`."""
    cap, sem = impl.declared(pass_).not_supported_reasons(call, _interpret())
    if impl.own_autograd:
        if call.traced:
            sem.append("has its own autograd (torch.compile's graph keeps bertfast's op)")
        if pass_ == "bwd":
            sem.append("has its own autograd (no backward of its own to pair)")
    return cap, sem


def _refusal(spec: OpSpec, impl: Implementation, call: Call, pass_: str) -> Optional[tuple[str, str]]:
    """None when `impl` serves `pass_` of `call` here, else (reason, kind): kind "semantic" (the
    call means something it does not compute), "declared" (device, dtype, width) or "broken"
    (failed to load or to probe)."""
    cap, sem = not_supported_reasons(impl, call, pass_)
    if sem:
        return "; ".join(sem), "semantic"
    if cap:
        return "; ".join(cap), "declared"
    reason = _loaded(impl)
    if reason is None:
        reason = _probed(spec, impl, call.device)
    return (reason, "broken") if reason is not None else None


# ---------------------------------------------------------------------------------------------
# choosing

def _routing_table(op: str, device_type: str):
    if device_type not in ROUTED_DEVICES:
        return None
    from . import routing

    return routing.table_for(op)


def _table_choice(t, op: str, call: Call, pass_: str) -> Optional[str]:
    """The implementation the routing table names for this pass of the call, or None. A table of
    level "op" routes whole calls (a training call only by a "fwd+bwd" entry); one of level
    "call" routes each pass on its own."""
    if t is None:
        return None
    if t.level == "op":
        direction = "fwd+bwd" if call.direction == "fwd+bwd" else "fwd"
        if pass_ == "bwd":
            return None
    else:
        direction = pass_
    return t.lookup(op, direction, call.dtype, call.width, call.layout, call.seq or None)[0]


def _candidates(spec: OpSpec, call: Call, want: str, pass_: str):
    """[(Implementation, routing table that asked for it or None)] in the order they are tried."""
    out, seen = [], set()

    def add(impl, asked=None):
        if impl is not None and impl.name not in seen:
            seen.add(impl.name)
            out.append((impl, asked))

    if want == "auto":
        t = _routing_table(spec.name, call.device)
        name = _table_choice(t, spec.name, call, pass_)
        if name is not None and name != t.default:
            add(spec.rows.get(name), t)
        families = AUTO_ORDER.get(call.device, ("reference",))
        if t is not None and t.default in spec.rows:
            add(spec.rows[t.default])
    else:
        families = (want, "reference")
    for fam in families:
        for impl in spec.rows.values():
            if impl.backend == fam:
                add(impl)
    return out


def _fallback(op: str, want: str, call: Call, refused: list, note: str = "") -> None:
    listed = "; ".join(f"{name}: {reason}" for name, reason in refused)
    msg = f"bertfast: {op} cannot use backend {want!r} for this call ({describe(call)}): {listed}{note}"
    if strict():
        raise BackendError(msg + " [BERTFAST_STRICT=1]")
    key = (op, want, listed)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg + "; falling back", RuntimeWarning, stacklevel=5)


def _choose(spec: OpSpec, call: Call, want: str, pass_: str, contract: Optional[str] = None):
    refused = []  # (name, reason) of the device's kernels that refused, for the fallback message
    for impl, asked in _candidates(spec, call, want, pass_):
        if contract is not None and impl.contract != contract:
            continue
        r = _refusal(spec, impl, call, pass_)
        if r is None:
            if impl.name == "reference" and refused and call.dtype_name != "fp64":
                _fallback(spec.name, want, call, refused)
            return impl
        reason, kind = r
        if asked is not None and kind != "semantic":
            _fallback(spec.name, impl.name, call, [(impl.name, reason)],
                      f"; the routing table {asked.name} asked for it")
        elif kind != "semantic" or want != "auto":
            refused.append((impl.name, reason))
    return spec.reference  # unreachable: the reference declares everything


def _select(spec: OpSpec, call: Call, want: str) -> Impl:
    if call.direction != "fwd+bwd":
        impl = _choose(spec, call, want, call.direction)
        return Impl(spec.name, impl, None)
    f = _choose(spec, call, want, "fwd")
    if f.own_autograd:
        return Impl(spec.name, f, None)
    b = _choose(spec, call, want, "bwd", contract=f.contract)
    return Impl(spec.name, f, b)


def select(op: str, call: Call) -> Impl:
    """The implementation that serves `call` of `op` right now."""
    want = requested()
    key = (op, call, want)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    with _lock:
        impl = _cache[key] = _select(_ops[op], call, want)
        return impl


def describe(call: Call) -> str:
    parts = [call.device, call.dtype_name, f"width {call.width}", call.direction]
    if call.layout != "rows":
        parts.append(call.layout + (f" seq {call.seq}" if call.seq else ""))
    if call.mask != "none":
        parts.append(f"{call.mask} mask")
    if call.dropout:
        parts.append("dropout")
    if call.causal != "none":
        parts.append(f"causal {call.causal}")
    return " ".join(parts)


class EncoderImpls(NamedTuple):
    attention: Impl
    bias_residual_layernorm: Impl
    bias_gelu: Impl


def resolve_encoder(device_type: str, gemm_dtype, residual_dtype, hidden_size: int, intermediate_size: int,
                    head_dim: int, packed: bool, seq: int, masked: bool, dropout: bool, grad: bool) -> EncoderImpls:
    """What serves the op calls of one encoder forward (BertModel asks once per forward; its layers
    pass the answers to the ops' unchecked entries). gemm_dtype: the dtype of the projections'
    outputs (autocast's, else the hidden states'); residual_dtype: the residual stream's (the
    add-and-norm promotes to it); packed: varlen attention over the batch's PackedLayout with
    longest sequence `seq`, else padded (batch, seq) with a key mask when `masked`; grad: autograd
    records (torch.is_grad_enabled()). Memoised as a whole: one dict lookup per forward."""
    key = (device_type, gemm_dtype, residual_dtype, hidden_size, intermediate_size, head_dim, packed, seq, masked,
           dropout, grad, requested())
    hit = _encoder_cache.get(key)
    if hit is not None:
        return hit
    direction = "fwd+bwd" if grad else "fwd"
    att = Call(device_type, gemm_dtype, head_dim, direction, "varlen" if packed else "padded", seq,
               "key" if masked else "none", dropout, "none")
    out = _encoder_cache[key] = EncoderImpls(
        select("attention", att),
        select("bias_residual_layernorm", Call(device_type, residual_dtype, hidden_size, direction)),
        select("bias_gelu", Call(device_type, gemm_dtype, intermediate_size, direction)))
    return out


# ---------------------------------------------------------------------------------------------
# explaining (bertfast info, bertfast verify)

def backends_for(op: str, device_type: str) -> list:
    """The forceable backends (reference excluded) with a row of `op` declared for `device_type`."""
    out = []
    for impl in _ops[op].rows.values():
        if impl.backend not in (None, "reference") and impl.backend not in out and \
                impl.serves.device_reason(device_type, _interpret()) is None:
            out.append(impl.backend)
    return out


def why_not(op: str, backend: str, call: Call) -> Optional[str]:
    """None when a row of `backend` serves `call` here (declared, loaded, probed), else every
    row's reason."""
    spec = _ops[op]
    reasons = []
    pass_ = "fwd" if call.direction == "fwd+bwd" else call.direction
    for impl in spec.rows.values():
        if impl.backend == backend:
            r = _refusal(spec, impl, call, pass_)
            if r is None:
                return None
            reasons.append(f"{impl.name}: {r[0]}")
    return "; ".join(reasons) or f"no {backend} implementation of {op}"


def explain(op: str, device_type: str, call: Optional[Call] = None) -> tuple[str, str]:
    """(what serves, why) for `call` (default: the op's typical call on `device_type`): the
    serving implementation, then every other row of the op with the reason it refused or was not
    needed, and the routing table's cases."""
    spec = _ops[op]
    call = call or spec.typical(device_type)
    want = requested()
    chosen = select(op, call)
    served = set(chosen.backend.split("+"))
    notes = []
    for impl in spec.rows.values():
        if impl.name in served:
            continue
        pass_ = "fwd" if call.direction == "fwd+bwd" else call.direction
        r = None
        cap, sem = not_supported_reasons(impl, call, pass_)
        if sem or cap:
            r = "; ".join(sem + cap)
        elif (impl.op, impl.name) in _load_state and _load_state[(impl.op, impl.name)]:
            r = _load_state[(impl.op, impl.name)]
        elif (impl.op, impl.name, call.device) in _probe_state and _probe_state[(impl.op, impl.name, call.device)]:
            r = _probe_state[(impl.op, impl.name, call.device)]
        elif want != "auto" and impl.backend != want:
            r = f"not the forced backend {want!r}"
        elif impl.backend is None:
            r = "only where a routing table names it"
        else:
            r = f"not needed, {chosen.backend} serves first"
        notes.append(f"{impl.name}: {r}")
    t = _routing_table(op, device_type) if want == "auto" else None
    if t is not None:
        notes.append(t.describe(op))
    return chosen.backend, f"for {describe(call)}" + ("; " + "; ".join(notes) if notes else "")


def reset(tables: bool = True) -> None:
    """Forget cached selections, load and probe verdicts and warnings (tests use this)."""
    _cache.clear()
    _encoder_cache.clear()
    _load_state.clear()
    _probe_state.clear()
    _warned.clear()
    if tables:
        from . import routing

        routing.reset()
