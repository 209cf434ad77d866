"""Triton kernels of bias_residual_layernorm: LN(dropout(x + bias) + residual) * weight + ln_bias.

Forward: one program normalises ROWS rows held in registers as a [ROWS, BLOCK_N] tile; every
input byte is read once, statistics are fp32, the output is cast once on store, and the
per-row mean/rstd (fp32) are stored for the backward.

Backward: a persistent grid of G programs (as many as fit on the GPU at once, from the
compiled kernel's register count: one wave, no tail) strides over row tiles; each recomputes
h from x, bias, the regenerated dropout mask and residual, writes dx and dresidual, and
keeps its share of the weight/ln_bias/bias gradients in fp32 registers. At the end each
program writes one row of a (G, N) fp32 partial buffer, and a sum over G finishes the
reduction: two stages, no contended atomics, deterministic. Recomputing h costs one more
read of x and residual but saves the forward a write of h and the backward a read of it.

This file also holds the launch-parameter helpers the other LayerNorm-family kernels reuse
(embedding_layernorm, gelu_layernorm): one place decides BLOCK_N / ROWS / num_warps.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._rng import dropout_keep

MAX_N = 8192
# The smallest BLOCK_N: tiny hidden sizes only need to be correct, and a floor keeps the
# number of compiled configurations (and the AOT table) small.
MIN_BLOCK_N = 64
# Target elements per program tile: small rows are packed several to a program so each
# program still moves ~8-16 KB (and weight/bias loads are amortised over ROWS rows).
TILE = 4096
MAX_ROWS = 16
BWD_TILE = 1024


# ---------------------------------------------------------------------------------------
# launch-parameter helpers (shared by the LayerNorm-family kernels)

def block_n(n: int) -> int:
    if not 1 <= n <= MAX_N:
        raise ValueError(f"hidden size (last dimension) must be in [1, {MAX_N}] for the Triton kernels, got {n}")
    return max(MIN_BLOCK_N, triton.next_power_of_2(n))


@functools.lru_cache(maxsize=None)
def fwd_config(n: int) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps) of a forward row kernel: 16 elements per thread, so a
    16-byte vector of fp16/bf16 per load and no spills up to 8192 columns."""
    bn = block_n(n)
    rows = max(1, min(MAX_ROWS, TILE // bn))
    warps = max(4, min(16, rows * bn // 512))
    return bn, rows, warps


@functools.lru_cache(maxsize=None)
def bwd_config(n: int) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps) of a backward row kernel. It holds more live tensors than the
    forward (dy, h, xhat, three fp32 gradient accumulators), so its tiles are smaller: 8 elements
    per thread and BWD_TILE elements per iteration, which keeps programs small so many are
    resident per SM and their load phases overlap; 16 elements per thread at 8192 columns
    (16 warps: a 512-thread program may use 128 registers per thread; 32 warps would cap it at
    64 and spill)."""
    bn = block_n(n)
    rows = max(1, min(MAX_ROWS, BWD_TILE // bn))
    warps = max(4, min(16, rows * bn // 256))
    return bn, rows, warps


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


def num_programs(device: torch.device, n_tiles: int, num_warps: int, kernel=None, args=(), constexprs=None) -> int:
    """Grid size of a persistent backward kernel: exactly as many programs as can be resident
    at once (one wave, no tail), never more than there are row tiles. `kernel`, `args` and
    `constexprs` (any partial buffers may be placeholders) let it read the compiled register count."""
    if device.type != "cuda":  # the interpreter: a few programs, so the partial-sum path is exercised
        return max(1, min(4, n_tiles))
    index = device.index if device.index is not None else torch.cuda.current_device()
    if kernel is not None:
        per_sm = _programs_per_sm(kernel, args, constexprs or {}, num_warps, torch.device("cuda", index))
    else:
        per_sm = max(1, 32 // num_warps)
    return max(1, min(_sm_count(index) * per_sm, n_tiles))


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


# ---------------------------------------------------------------------------------------
# kernels

@triton.jit
def layernorm_rows(h, mask, cols, cmask, W, LB, N, eps):
    """LayerNorm of a (ROWS, BLOCK_N) fp32 tile whose masked lanes hold 0: (y, mean, rstd),
    statistics in fp32 (shared by every forward kernel of the family)."""
    mean = tl.sum(h, axis=1) / N
    d = tl.where(mask, h - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / N
    rstd = tl.math.rsqrt(var + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    lb = tl.load(LB + cols, mask=cmask, other=0.0).to(tl.float32)
    return d * rstd[:, None] * w[None, :] + lb[None, :], mean, rstd


@triton.jit(do_not_specialize=["seed", "threshold"])
def _brln_fwd_kernel(X, B, R, W, LB, Y, Mean, Rstd, M, N, eps, seed, threshold, scale,
                     HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                     BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    # int64 element offsets: M * N may exceed 2**31; they are also the dropout offsets.
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_DROPOUT:
        seed = seed.to(tl.int64)
        keep = dropout_keep(seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, offs, threshold)
        # multiply (not where) so dropped elements are h * 0, bit-for-bit like the reference
        h = h * tl.where(keep, scale, 0.0)
    h += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    y, mean, rstd = layernorm_rows(h, mask, cols, cmask, W, LB, N, eps)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=rmask)
    tl.store(Rstd + rows, rstd, mask=rmask)


@triton.jit(do_not_specialize=["seed", "threshold"])
def _brln_bwd_kernel(DY, X, B, R, W, Mean, Rstd, DX, DR, DW_part, DLB_part, DB_part, M, N,
                     seed, threshold, scale,
                     HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                     BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    # At 8192 columns the three fp32 accumulators alone take 48 registers per thread: re-read
    # weight/bias from L1/L2 in each iteration instead of holding them, to avoid spills.
    if BLOCK_N < 8192:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = seed.to(tl.int64)
        seed_lo = seed & 0xFFFFFFFF
        seed_hi = (seed >> 32) & 0xFFFFFFFF
    dw_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    dlb_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    n_tiles = tl.cdiv(M, ROWS)
    for tile in range(pid, n_tiles, n_prog):
        rows = tile * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        if BLOCK_N >= 8192:
            w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h += b[None, :]
        if HAS_DROPOUT:
            s = tl.where(dropout_keep(seed_lo, seed_hi, offs, threshold), scale, 0.0)
            h = h * s
        h += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=rmask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)
        # the mask is not needed for the sums (dy, so g, is 0 on padded lanes) but keeps ptxas at
        # 0 spills at 8192 columns (checked with `bertfast verify --aot`)
        xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        g = dy * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / N
        c2 = tl.sum(g, axis=1) / N
        dh = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DR + offs, dh.to(DR.dtype.element_ty), mask=mask)
        if HAS_DROPOUT:
            dx = dh * s
        else:
            dx = dh
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        dlb_acc += dy
        if HAS_BIAS:
            db_acc += tl.where(mask, dx, 0.0)
    tl.store(DW_part + pid * N + cols, tl.sum(dw_acc, axis=0), mask=cmask)
    tl.store(DLB_part + pid * N + cols, tl.sum(dlb_acc, axis=0), mask=cmask)
    if HAS_BIAS:
        tl.store(DB_part + pid * N + cols, tl.sum(db_acc, axis=0), mask=cmask)


# ---------------------------------------------------------------------------------------
# launchers (the backend contract of bertfast/ops/bias_residual_layernorm.py)

def bias_residual_layernorm_fwd(x, bias, residual, weight, ln_bias, eps, p, seed):
    m, n = x.shape
    x, residual = x.contiguous(), residual.contiguous()
    bn, rows, warps = fwd_config(n)
    y = torch.empty_like(x)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return y, mean, rstd
    threshold, scale = dropout_args(p)
    _brln_fwd_kernel[(triton.cdiv(m, rows),)](
        x, bias if bias is not None else x, residual, weight, ln_bias, y, mean, rstd, m, n, eps, seed,
        threshold, scale, HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0.0, BLOCK_N=bn, ROWS=rows,
        num_warps=warps)
    return y, mean, rstd


def bias_residual_layernorm_bwd(dout, x, bias, residual, weight, ln_bias, mean, rstd, eps, p, seed):
    m, n = x.shape
    dout, x, residual = dout.contiguous(), x.contiguous(), residual.contiguous()
    bn, rows, warps = bwd_config(n)
    dx = torch.empty_like(x)
    dres = torch.empty_like(residual)
    threshold, scale = dropout_args(p)
    const = dict(HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0.0, BLOCK_N=bn, ROWS=rows)

    def args(parts):
        return (dout, x, bias if bias is not None else x, residual, weight, mean, rstd, dx, dres, parts[0], parts[1],
                parts[-1], m, n, seed, threshold, scale)

    nparts = 3 if bias is not None else 2
    g = num_programs(x.device, triton.cdiv(m, rows), warps, _brln_bwd_kernel,
                     args(torch.empty((nparts, 1, n), dtype=torch.float32, device=x.device)), const)
    parts = torch.empty((nparts, g, n), dtype=torch.float32, device=x.device)
    _brln_bwd_kernel[(g,)](*args(parts), num_warps=warps, **const)
    sums = parts.sum(1)
    dbias = sums[2].to(bias.dtype) if bias is not None else None
    return dx, dbias, dres, sums[0].to(weight.dtype), sums[1].to(ln_bias.dtype)


# ---------------------------------------------------------------------------------------
# ahead-of-time compile list

def all_block_ns():
    bn, out = MIN_BLOCK_N, []
    while bn <= MAX_N:
        out.append(bn)
        bn *= 2
    return out


def aot_specs(full: bool = False) -> list:
    """Every (kernel, BLOCK_N/ROWS/num_warps) the launchers can choose, in bf16 with bias and
    dropout on (the variant with the most live registers). full=True adds every dtype and
    the bias/dropout-off variants."""
    dtypes = ("bf16", "fp16", "fp32") if full else ("bf16",)
    flags = ((True, True), (True, False), (False, False)) if full else ((True, True),)
    specs = []
    for bn in all_block_ns():
        for dt in dtypes:
            for has_bias, has_drop in flags:
                tag = f"{dt} bias={int(has_bias)} dropout={int(has_drop)}"
                _, rows, warps = fwd_config(bn)
                specs.append(aot_spec(
                    _brln_fwd_kernel,
                    {"X": f"*{dt}", "B": f"*{dt}", "R": f"*{dt}", "W": f"*{dt}", "LB": f"*{dt}", "Y": f"*{dt}",
                     "Mean": "*fp32", "Rstd": "*fp32", "M": "i32", "N": "i32", "eps": "fp32", "seed": "i64",
                     "threshold": "i32", "scale": "fp32"},
                    {"HAS_BIAS": has_bias, "HAS_DROPOUT": has_drop, "BLOCK_N": bn, "ROWS": rows}, warps,
                    f"BLOCK_N={bn} ROWS={rows} warps={warps} {tag}",
                    div16=("X", "B", "R", "W", "LB", "Y", "Mean", "Rstd", "N")))
                _, rows, warps = bwd_config(bn)
                specs.append(aot_spec(
                    _brln_bwd_kernel,
                    {"DY": f"*{dt}", "X": f"*{dt}", "B": f"*{dt}", "R": f"*{dt}", "W": f"*{dt}", "Mean": "*fp32",
                     "Rstd": "*fp32", "DX": f"*{dt}", "DR": f"*{dt}", "DW_part": "*fp32", "DLB_part": "*fp32",
                     "DB_part": "*fp32", "M": "i32", "N": "i32", "seed": "i64", "threshold": "i32",
                     "scale": "fp32"},
                    {"HAS_BIAS": has_bias, "HAS_DROPOUT": has_drop, "BLOCK_N": bn, "ROWS": rows}, warps,
                    f"BLOCK_N={bn} ROWS={rows} warps={warps} {tag}",
                    div16=("DY", "X", "B", "R", "W", "Mean", "Rstd", "DX", "DR", "DW_part", "DLB_part", "DB_part",
                           "N")))
    return specs
