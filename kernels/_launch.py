"""Cached compiled launches: a Triton kernel launched without the JIT's per-call argument binding.

`kernel[grid](*args, **meta)` goes through JITFunction.run on every call: it binds and
specialises every argument again (a Python function generated per kernel, one native call per
argument), builds the cache key as a string, reads the current device, stream and knobs, checks
the kernel's global variables, and only then calls the compiled kernel's launcher. That is most
of a launch's host time (published figures: ~9-13 us per JIT launch against ~3-5 us for a
cached compiled launch; on a GPU a BERT layer's kernels take microseconds, so this decides the
speed of eager serving and training at small batches).

FastKernel keeps, per (device, caller key, integer-argument classes), the CompiledKernel the JIT
chose on the first call, and later calls go straight to its launcher with the constexpr
arguments pre-bound. What the JIT specialises on must not change between calls that share an
entry, so:
- the caller's `key` covers what decides `meta` (constexprs, num_warps, num_stages) and the
  dtypes of the tensor arguments (the op, dtype, hidden size and configuration of a launch);
- the integer arguments' classes are part of the entry's key (the JIT compiles a variant for
  a value of 1, for multiples of 16 and for values outside int32), computed here per call;
- pointers must be 16-byte aligned (what the JIT assumes for vector loads when they are): a call
  with any unaligned tensor takes the JIT path, which compiles its own variant.
The launch signature is the same in triton 3.6 (GPU machines) and 3.9 (CPU machines):
`compiled.run(grid0, grid1, grid2, stream, function, packed_metadata, launch_metadata,
enter_hook, exit_hook, *every_argument_including_constexprs)`.

The fast path passes no launch metadata and no hooks (the launchers skip None hooks); the JIT
path serves instead: under TRITON_INTERPRET=1 (the kernel is an InterpretedFunction), when a
launch hook is set (knobs.runtime's HookChains hold calls: profilers such as proton), when the kernel's
constexprs are not its trailing parameters, with BERTFAST_FAST_LAUNCH=0, and for good when the
first fast launch of an entry fails (a triton whose launcher differs): correctness never
depends on the fast path.
"""
from __future__ import annotations

import os

ENABLED = os.environ.get("BERTFAST_FAST_LAUNCH", "1").strip() not in ("0", "false", "False")

_I32_MIN, _I32_MAX = -0x80000000, 0x7FFFFFFF
_drv = None
_knobs = None


def _device_stream():
    """(current device index, its current stream handle): what JITFunction.run launches on."""
    global _drv
    if _drv is None:
        from triton.runtime import driver

        active = driver.active
        _drv = (active.get_current_device, active.get_current_stream)
    dev = _drv[0]()
    return dev, _drv[1](dev)


def _hook_active(hook) -> bool:
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)  # triton 3.6 / 3.9: a HookChain, active when it holds calls
    return calls is None or len(calls) > 0


def _hooks_set() -> bool:
    """A launch hook is installed (a profiler such as proton reads each launch's metadata): then
    the JIT path launches, which builds that metadata; the fast path passes no hooks."""
    global _knobs
    if _knobs is None:
        from triton import knobs

        _knobs = knobs.runtime
    return _hook_active(_knobs.launch_enter_hook) or _hook_active(_knobs.launch_exit_hook)


class FastKernel:
    """A @triton.jit kernel with a cache of its compiled variants; call as
    `FastKernel(fn)(grid, key, args, **meta)` in place of `fn[grid](*args, **meta)`, where
    `args` are the kernel's non-constexpr arguments in order (tensors, ints, floats) and `key`
    is hashable and determines meta and the tensors' dtypes (see the module docstring)."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")
        params = getattr(fn, "params", None)
        self._fast = False
        if params is not None and hasattr(fn, "device_caches"):  # a JITFunction (not the interpreter's)
            flags = [p.is_constexpr for p in params]
            n_args = flags.index(True) if True in flags else len(flags)
            self._n_args = n_args
            self._tail_params = [(p.name, p.default) for p in params[n_args:]]
            self._nospec = [p.do_not_specialize for p in params[:n_args]]
            # the launcher takes every argument in signature order: args, then the constexprs
            self._fast = ENABLED and all(flags[n_args:])
        self._layout = None  # (tensor positions, (position, specialised) of the ints), from the first call
        self._cache: dict = {}
        self.jit_launches = 0  # launches that went through the JIT (tests and the host bench read them)

    def __call__(self, grid, key, args, **meta):
        if self._fast and not _hooks_set():
            layout = self._layout
            if layout is None:
                layout = self._layout = self._arg_layout(args)
            ptrs, ints = layout
            aligned = 0
            for i in ptrs:
                aligned |= args[i].data_ptr()
            if not aligned & 15:
                cls = 0
                for i, spec in ints:
                    v = args[i]
                    c = 0 if _I32_MIN <= v <= _I32_MAX else 4
                    if spec:
                        c |= 1 if v == 1 else (2 if v & 15 == 0 else 0)
                    cls = cls * 8 + c
                dev, stream = _device_stream()
                entry = self._cache.get((dev, key, cls))
                if entry is not None:
                    run, function, packed, tail, verified = entry
                    if verified:
                        run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                            function, packed, None, None, None, *args, *tail)
                        return
                    return self._first_fast_launch((dev, key, cls), entry, grid, stream, args, meta)
                return self._compile(grid, (dev, key, cls), args, meta)
        self.jit_launches += 1
        self.fn[grid](*args, **meta)

    def _arg_layout(self, args):
        if len(args) != self._n_args:
            raise TypeError(f"{self.__name__}: expected {self._n_args} non-constexpr arguments, got {len(args)}")
        ptrs = tuple(i for i, a in enumerate(args) if hasattr(a, "data_ptr"))
        ints = tuple((i, not self._nospec[i]) for i, a in enumerate(args) if isinstance(a, int) and not
                     isinstance(a, bool))
        return ptrs, ints

    def _compile(self, grid, ck, args, meta):
        """A miss: the JIT compiles (or finds) the variant and launches it; keep its handle."""
        self.jit_launches += 1
        compiled = self.fn[grid](*args, **meta)
        try:
            if hasattr(compiled, "result"):  # triton's asynchronous compile mode returns a future
                compiled = compiled.result()
            tail = tuple(meta[name] if name in meta else default for name, default in self._tail_params)
            self._cache[ck] = (compiled.run, compiled.function, compiled.packed_metadata, tail, False)
        except Exception:  # noqa: BLE001 - a triton without these attributes: the JIT serves for good
            self._fast = False

    def _first_fast_launch(self, ck, entry, grid, stream, args, meta):
        run, function, packed, tail, _ = entry
        try:
            run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream, function, packed,
                None, None, None, *args, *tail)
        except Exception:  # noqa: BLE001 - a launcher with another signature: the JIT serves for good
            self._fast = False
            self._cache.clear()
            self.jit_launches += 1
            self.fn[grid](*args, **meta)
            return
        self._cache[ck] = (run, function, packed, tail, True)
