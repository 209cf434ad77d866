"""Launch parameters every Triton kernel file shares: how many programs a persistent grid gets
(from the compiled kernel's register count), dropout's (threshold, scale) launch arguments, Triton
type names, and the entries of the ahead-of-time compile list (`bertfast verify --aot`).
"""
from __future__ import annotations

import functools
import math

import torch

@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_per_sm_cache: dict = {}


def _programs_per_sm(kernel, args, constexprs: dict, num_warps: int, device: torch.device) -> int:
    """How many programs of this kernel fit on one SM at once, from its real register count
    (the fused-softmax tutorial's technique: compile without launching, read n_regs)."""
    key = (kernel.__name__ if hasattr(kernel, "__name__") else id(kernel), tuple(sorted(constexprs.items())),
           tuple(a.dtype if isinstance(a, torch.Tensor) else type(a) for a in args), num_warps, device.index)
    per_sm = _per_sm_cache.get(key)
    if per_sm is None:
        threads = 32 * num_warps
        per_sm = max(1, 32 // num_warps)  # if the compiled kernel cannot be inspected
        try:
            compiled = kernel.warmup(*args, grid=(1,), num_warps=num_warps, **constexprs)
            compiled._init_handles()
            props = torch.cuda.get_device_properties(device)
            regs = max(int(compiled.n_regs), 1) * threads
            regs_per_sm = getattr(props, "regs_per_multiprocessor", 65536)
            threads_per_sm = getattr(props, "max_threads_per_multi_processor", 2048)
            per_sm = max(1, min(regs_per_sm // regs, threads_per_sm // threads, 32))
        except Exception:  # noqa: BLE001 - an estimate only; the heuristic above is safe
            pass
        _per_sm_cache[key] = per_sm
    return per_sm


_capacity: dict = {}  # (id(kernel), caller's key, device index) -> programs resident at once


def num_programs(device: torch.device, n_tiles: int, num_warps: int, kernel=None, args=(), constexprs=None,
                 key=None) -> int:
    """Grid size of a persistent backward kernel: exactly as many programs as can be resident
    at once (one wave, no tail), never more than there are row tiles. `kernel`, `args` and
    `constexprs` (any partial buffers may be placeholders) let it read the compiled register count.
    With `key` (hashable, deciding the kernel's variant: its FastKernel key) the answer is cached
    per (key, device) and `args` may be a callable that builds them, called only on a miss: a
    launch then pays one dict lookup here, not a placeholder allocation and a key of every argument."""
    if device.type != "cuda":  # the interpreter: a few programs, so the partial-sum path is exercised
        return max(1, min(4, n_tiles))
    index = device.index if device.index is not None else torch.cuda.current_device()
    ck = (id(kernel), key, index)
    cap = _capacity.get(ck) if key is not None else None
    if cap is None:
        if callable(args):
            args = args()
        if kernel is not None:
            per_sm = _programs_per_sm(kernel, args, constexprs or {}, num_warps, torch.device("cuda", index))
        else:
            per_sm = max(1, 32 // num_warps)
        cap = _sm_count(index) * per_sm
        if key is not None:
            _capacity[ck] = cap
    return max(1, min(cap, n_tiles))


def dropout_args(p: float):
    """(threshold, scale) for a launch: threshold = ceil(p * 2**24) exactly as
    bertfast/ops/_rng.dropout_threshold (kernels do not import ops; the tests compare the masks
    bit for bit), scale = 1/(1-p), rounded to fp32 by the launch like the reference's."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    if p == 0.0:
        return 0, 1.0
    return int(math.ceil(p * 16777216.0)), 1.0 / (1.0 - p)


def tl_type(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
            torch.int32: "i32", torch.int64: "i64"}[dtype]


DIV16 = [["tt.divisibility", 16]]


def aot_spec(fn, signature: dict, constexprs: dict, num_warps: int, config: str, div16=()) -> dict:
    """One AOT entry: enough for triton.compile(ASTSource(fn, signature, constexprs, attrs),
    target=GPUTarget('cuda', cc, 32), options={'num_warps': num_warps}). `div16` names the
    arguments the JIT would see as 16-divisible (pointers from the caching allocator, hidden
    sizes that are multiples of 16): without it the AOT build would not vectorise loads and
    the register counts would not be those of the real launches."""
    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    names = fn.arg_names
    attrs = {(names.index(a),): DIV16 for a in div16}
    return {"kernel": fn.__name__, "fn": fn, "signature": sig, "constexprs": dict(constexprs),
            "attrs": attrs, "num_warps": num_warps, "config": config}
