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

The row tiling and `layernorm_rows` come from kernels/_layernorm.py (shared by the LayerNorm
family), grid sizing and AOT entries from kernels/_launch_params.py.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._launch import FastKernel
from ._launch_params import aot_spec, dropout_args, num_programs
from ._layernorm import all_block_ns, bwd_config, fwd_config, layernorm_rows
from ._rng import dropout_keep

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

_brln_fwd, _brln_bwd = FastKernel(_brln_fwd_kernel), FastKernel(_brln_bwd_kernel)


def _unit(v):
    return None if v is None else v.contiguous()


def bias_residual_layernorm_fwd(x, bias, residual, weight, ln_bias, eps, p, seed):
    m, n = x.shape
    x, residual = x.contiguous(), residual.contiguous()
    # the kernel reads every vector at unit stride
    bias, weight, ln_bias = _unit(bias), weight.contiguous(), ln_bias.contiguous()
    bn, rows, warps = fwd_config(n)
    y = torch.empty_like(x)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return y, mean, rstd
    threshold, scale = dropout_args(p)
    # the key: what decides the constexprs, num_warps and the pointer dtypes (kernels/_launch.py)
    key = (n, p > 0.0, x.dtype, residual.dtype, weight.dtype, ln_bias.dtype, bias.dtype if bias is not None else None)
    _brln_fwd((triton.cdiv(m, rows),), key,
              (x, bias if bias is not None else x, residual, weight, ln_bias, y, mean, rstd, m, n, eps, seed, threshold,
               scale), HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0.0, BLOCK_N=bn, ROWS=rows, num_warps=warps)
    return y, mean, rstd


def bias_residual_layernorm_bwd(dout, x, bias, residual, weight, ln_bias, mean, rstd, eps, p, seed):
    m, n = x.shape
    dout, x, residual = dout.contiguous(), x.contiguous(), residual.contiguous()
    bias, weight, ln_bias = _unit(bias), weight.contiguous(), ln_bias.contiguous()
    bn, rows, warps = bwd_config(n)
    dx = torch.empty_like(x)
    dres = torch.empty_like(residual)
    threshold, scale = dropout_args(p)
    const = dict(HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0.0, BLOCK_N=bn, ROWS=rows)

    def args(parts):
        return (dout, x, bias if bias is not None else x, residual, weight, mean, rstd, dx, dres, parts[0], parts[1],
                parts[-1], m, n, seed, threshold, scale)

    nparts = 3 if bias is not None else 2
    key = (n, p > 0.0, dout.dtype, x.dtype, residual.dtype, weight.dtype, bias.dtype if bias is not None else None)
    g = num_programs(x.device, triton.cdiv(m, rows), warps, _brln_bwd_kernel,
                     lambda: args(torch.empty((nparts, 1, n), dtype=torch.float32, device=x.device)), const, key=key)
    parts = torch.empty((nparts, g, n), dtype=torch.float32, device=x.device)
    _brln_bwd((g,), key, args(parts), num_warps=warps, **const)
    sums = parts.sum(1)
    if weight.dtype == ln_bias.dtype and (bias is None or bias.dtype == weight.dtype):
        sums = sums.to(weight.dtype)  # one cast for the (usual) parameters of one dtype, not one per gradient
    dbias = sums[2].to(bias.dtype) if bias is not None else None
    return dx, dbias, dres, sums[0].to(weight.dtype), sums[1].to(ln_bias.dtype)


# ---------------------------------------------------------------------------------------
# ahead-of-time compile list

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
