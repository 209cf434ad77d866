"""The ops suite: the fused LayerNorm-family ops against eager and compiled references, with a
copy of the same bytes timed interleaved as the bandwidth yardstick."""
from __future__ import annotations

from typing import Dict, List

import torch

from .common import COPY, NORM_OPS, SUBJECT, SuiteOptions, compiled, dtype_name, served_by
from .runner import Case
from .timing import Rotate, graphed, n_input_sets

NAME = "ops"
GRAPHED = True
PLOT_METRIC = ("frac_copy_bw", "fraction of measured copy bandwidth")


def plan_cases(opts: SuiteOptions) -> List[Case]:
    """Every op at every (dtype, tokens, hidden), forward and forward+backward; on a CPU with
    --quick the compiled baseline times the forward only (compiling backward takes minutes)."""
    return ops_cases(opts.device, opts.dtypes, opts.tokens, opts.hidden, opts.compile_mode, ops_list=opts.ops,
                     compile_backward=not (opts.quick and opts.device.type == "cpu"))



def op_inputs(op: str, tokens: int, hidden: int, dtype, device, gen, grad: bool):
    """(args, differentiable inputs) of one call of `op` at (tokens, hidden)."""

    def r(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dt).requires_grad_(grad)

    if op == "embedding_layernorm":
        seq = min(128, tokens)
        ids = torch.randint(0, 30522, (tokens // seq, seq), generator=gen, device=device)
        tt = torch.randint(0, 2, ids.shape, generator=gen, device=device)
        pos = torch.arange(seq).expand(ids.shape).contiguous().to(device)
        word, pemb, temb = r(30522, hidden, scale=0.02), r(512, hidden, scale=0.02), r(2, hidden, scale=0.02)
        w, b = r(hidden, scale=0.1), r(hidden, scale=0.1)
        return (ids, tt, pos, word, pemb, temb, w, b, 1e-12), [word, pemb, temb, w, b]
    x = r(tokens, hidden)
    if op == "bias_gelu":
        bias = r(hidden)
        return (x, bias), [x, bias]
    if op == "bias_residual_layernorm":
        bias, res, w, lb = r(hidden), r(tokens, hidden), r(hidden), r(hidden)
        return (x, bias, res, w, lb, 1e-12), [x, bias, res, w, lb]
    if op == "gelu_layernorm":
        bias, w, lb = r(hidden), r(hidden), r(hidden)
        return (x, bias, w, lb, 1e-12), [x, bias, w, lb]
    raise ValueError(op)


def op_bytes(op: str, tokens: int, hidden: int, dtype, backward: bool) -> float:
    """The fewest bytes one call must move: each input read once, each output written once
    (per-row fp32 statistics included; parameter vectors and their gradients, which are tiny,
    counted once). forward+backward = forward bytes + backward bytes."""
    s = torch.empty((), dtype=dtype).element_size()
    act = tokens * hidden * s
    vec = hidden * s
    stats = tokens * 8
    if op == "embedding_layernorm":
        ids = 3 * tokens * 8
        # gathered word rows + position rows (once each) + the output; backward: dout read and
        # dense gradients of the word (30522 rows) and position (512 rows) tables written
        fwd = ids + act + min(tokens, 512) * hidden * s + act + stats + 4 * vec
        bwd = act + ids + stats + (30522 + 512 + 2) * hidden * s + act + 4 * vec
    elif op == "bias_gelu":
        fwd, bwd = 2 * act + vec, 3 * act + 2 * vec
    elif op == "bias_residual_layernorm":
        fwd = 3 * act + stats + 3 * vec
        bwd = 3 * act + stats + 2 * act + 6 * vec  # dout, x, residual in; dx and dresidual out
    elif op == "gelu_layernorm":
        fwd = 2 * act + stats + 3 * vec
        bwd = 2 * act + stats + act + 6 * vec
    else:
        raise ValueError(op)
    return float(fwd + (bwd if backward else 0))


def op_fns(op: str):
    from .. import ops

    return getattr(ops, op), getattr(ops, op + "_ref")


def op_call(fn, backward: bool):
    """One call: forward, or forward + backward through torch.autograd.grad (no .grad
    accumulation between repeats)."""
    if not backward:
        def call(args, diff, dout):
            return fn(*args)
        return call

    def call(args, diff, dout):
        out = fn(*args)
        return torch.autograd.grad(out, diff, dout)

    return call


RACE_BACKENDS = ("triton", "cuda")


def forced_backend(fn, op: str, backend_name: str, device):
    """fn with `backend_name` forced for every call (the backward follows the forward's choice);
    raises at set-up, so the variant is reported as skipped, when that backend cannot serve op
    here instead of silently timing the reference it would fall back to."""
    from .. import dispatch

    checked = []

    def call(*args):
        with dispatch.use_backend(backend_name):
            if not checked:
                served, why = dispatch.explain(op, device.type)
                if served != backend_name:
                    raise RuntimeError(f"{backend_name} cannot serve {op} here: {why}")
                checked.append(True)
            return fn(*args)

    return call


def ops_cases(device, dtypes, tokens_list, hiddens, compile_mode: str, backward_modes=(False, True),
              ops_list=NORM_OPS, compile_backward: bool = True) -> List[Case]:
    cases = []
    # the target shape (most tokens, hidden 768, first dtype) first, so a time budget
    # that runs out cuts the least important cases
    order = sorted(((dt, t, h) for dt in dtypes for t in tokens_list for h in hiddens),
                   key=lambda c: (not (c[2] == 768 and c[1] == max(tokens_list)), c[0] != dtypes[0], c[2] != 768,
                                  -c[1], dtypes.index(c[0]), c[2]))
    for dt, tokens, hidden in order:
        for op in ops_list:
            for bwd in backward_modes:
                target = tokens == max(tokens_list) and hidden == 768 and dt == dtypes[0]
                cases.append(_op_case(op, tokens, hidden, dt, device, bwd, compile_mode,
                                      target and (compile_backward or not bwd)))
    return cases


def _op_case(op, tokens, hidden, dt, device, bwd, compile_mode, is_target) -> Case:
    fast, ref = op_fns(op)
    nbytes = op_bytes(op, tokens, hidden, dt, bwd)

    def make(fn, compile_=False, backend_name=None):
        def factory(meta):
            gen = torch.Generator(device=device).manual_seed(0)  # inputs made on the device: fast
            set_bytes = op_bytes(op, tokens, hidden, dt, False)
            sets = []
            for _ in range(n_input_sets(int(set_bytes), device)):
                args, diff = op_inputs(op, tokens, hidden, dt, device, gen, bwd)
                dout = None
                if bwd:
                    shape = (tokens // min(128, tokens), min(128, tokens), hidden) if op == "embedding_layernorm" \
                        else (tokens, hidden)
                    dout = torch.randn(shape, generator=gen, device=device).to(dt)
                sets.append((args, diff, dout))
            f = compiled(fn) if compile_ else fn
            call = op_call(f, bwd)
            if backend_name is not None:
                meta["backend"] = served_by(op, device)
            meta["input_sets"] = len(sets)
            return Rotate(call, sets)

        return factory

    def copy_factory(meta):
        # a device copy moving the op's byte count (half read, half written), timed interleaved with
        # the op: its fraction of copy bandwidth then holds even when the machine's load drifts
        n = max(1, int(nbytes / 2 / 4))
        sets = [(torch.randn(n, device=device), torch.empty(n, device=device))
                for _ in range(n_input_sets(int(nbytes), device))]
        return Rotate(lambda src, dst: dst.copy_(src), sets)

    variants: Dict[str, object] = {SUBJECT: make(fast, backend_name=True), "eager_ref": make(ref),
                                   COPY: copy_factory}
    if compile_mode == "all" or (compile_mode == "some" and is_target):
        variants["compile_ref"] = make(ref, compile_=True)
    else:
        variants["compile_ref"] = (f"not run: --compile {compile_mode} (compile baselines only at the target shape"
                                   f"{'; --quick on CPU: forward only' if compile_mode == 'some' else ''})")
    if device.type == "cuda":
        # the race of the two GPU implementations, each forced: the Triton kernels and the CUDA C++
        # extension (python -m bertfast.bench.routes turns these into the routing table auto uses)
        for backend_name in RACE_BACKENDS:
            variants["backend_" + backend_name] = make(forced_backend(fast, op, backend_name, device))
        # the same calls replayed from CUDA graphs: no Python or launch overhead between kernels,
        # so these time the kernels themselves (at a few thousand tokens the eager figures above
        # are bounded by the host, not by the GPU)
        for name in (SUBJECT, "eager_ref", "compile_ref", *("backend_" + b for b in RACE_BACKENDS)):
            if callable(variants[name]):
                variants[name + "_graph"] = graphed(variants[name])
    name = f"{op} {'fwd+bwd' if bwd else 'fwd'} {tokens}x{hidden} {dtype_name(dt)}"
    return Case(NAME, name, {"op": op, "pass": "fwd+bwd" if bwd else "fwd", "tokens": tokens, "hidden": hidden},
                variants, bytes=nbytes, dtype=dtype_name(dt), graphed=True)


