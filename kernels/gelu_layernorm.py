"""Triton kernels of gelu_layernorm: LN(GELU(x + bias)) * weight + ln_bias (the MLM head transform).

Forward: ROWS rows per program in registers, x read once, GELU and LayerNorm statistics in
fp32, one cast on store; mean/rstd (fp32) stored for the backward.
Backward: a persistent grid of G programs recomputes GELU(x + bias) (cheaper than storing
it: one read of x instead of a write + read of h), writes dx, and reduces dbias, dweight and
dln_bias in two stages ((G, N) fp32 partials, then a sum); no atomics.
Launch parameters come from kernels/bias_residual_layernorm.py (fwd_config / bwd_config).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._gelu import gelu, gelu_grad
from ._launch import FastKernel
from ._launch_params import aot_spec, num_programs
from ._layernorm import all_block_ns, bwd_config, fwd_config, layernorm_rows


@triton.jit
def _gelu_ln_fwd_kernel(X, B, W, LB, Y, Mean, Rstd, M, N, eps, TANH: tl.constexpr, BLOCK_N: tl.constexpr,
                        ROWS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    pre = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    pre += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    h = gelu(pre, TANH)  # GELU(0) = 0: padded lanes stay out of the sums
    y, mean, rstd = layernorm_rows(h, mask, cols, cmask, W, LB, N, eps)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=rmask)
    tl.store(Rstd + rows, rstd, mask=rmask)


@triton.jit
def _gelu_ln_bwd_kernel(DY, X, B, W, Mean, Rstd, DX, DB_part, DW_part, DLB_part, M, N, TANH: tl.constexpr,
                        BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if BLOCK_N < 8192:  # at 8192 columns re-read them per row instead (registers; see brln)
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    dlb_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(M, ROWS), n_prog):
        if BLOCK_N >= 8192:
            w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
            b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        rows = tile * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        pre = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + b[None, :]
        mean = tl.load(Mean + rows, mask=rmask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)
        # no mask needed: dy (so g) is 0 on padded lanes and rstd is 0 on padded rows, so they add
        # nothing to the sums; padded lanes of dh/dx are garbage that is never stored
        xhat = (gelu(pre, TANH) - mean[:, None]) * rstd[:, None]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        g = dy * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / N
        c2 = tl.sum(g, axis=1) / N
        dh = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        dx = tl.where(mask, dh * gelu_grad(pre, TANH), 0.0)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        dlb_acc += dy
        db_acc += dx
    tl.store(DW_part + pid * N + cols, tl.sum(dw_acc, axis=0), mask=cmask)
    tl.store(DLB_part + pid * N + cols, tl.sum(dlb_acc, axis=0), mask=cmask)
    tl.store(DB_part + pid * N + cols, tl.sum(db_acc, axis=0), mask=cmask)


_fwd, _bwd = FastKernel(_gelu_ln_fwd_kernel), FastKernel(_gelu_ln_bwd_kernel)


def _tanh(approximate: str) -> bool:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return approximate == "tanh"


def gelu_layernorm_fwd(x, bias, weight, ln_bias, eps, approximate):
    m, n = x.shape
    # the kernel reads rows and every vector at unit stride
    x, bias, weight, ln_bias = x.contiguous(), bias.contiguous(), weight.contiguous(), ln_bias.contiguous()
    bn, rows, warps = fwd_config(n)
    y = torch.empty_like(x)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return y, mean, rstd
    tanh = _tanh(approximate)
    _fwd((triton.cdiv(m, rows),), (n, tanh, x.dtype, bias.dtype, weight.dtype, ln_bias.dtype),
         (x, bias, weight, ln_bias, y, mean, rstd, m, n, eps), TANH=tanh, BLOCK_N=bn, ROWS=rows, num_warps=warps)
    return y, mean, rstd


def gelu_layernorm_bwd(dout, x, bias, weight, ln_bias, mean, rstd, eps, approximate):
    m, n = x.shape
    dout, x = dout.contiguous(), x.contiguous()
    bias, weight, ln_bias = bias.contiguous(), weight.contiguous(), ln_bias.contiguous()
    bn, rows, warps = bwd_config(n)
    dx = torch.empty_like(x)
    const = dict(TANH=_tanh(approximate), BLOCK_N=bn, ROWS=rows)

    def args(parts):
        return (dout, x, bias, weight, mean, rstd, dx, parts[0], parts[1], parts[2], m, n)

    key = (n, const["TANH"], dout.dtype, x.dtype, bias.dtype, weight.dtype)
    g = num_programs(x.device, triton.cdiv(m, rows), warps, _gelu_ln_bwd_kernel,
                     lambda: args(torch.empty((3, 1, n), dtype=torch.float32, device=x.device)), const, key=key)
    parts = torch.empty((3, g, n), dtype=torch.float32, device=x.device)
    _bwd((g,), key, args(parts), num_warps=warps, **const)
    sums = parts.sum(1)
    if bias.dtype == weight.dtype == ln_bias.dtype:
        sums = sums.to(weight.dtype)  # one cast for the (usual) parameters of one dtype, not one per gradient
    return dx, sums[0].to(bias.dtype), sums[1].to(weight.dtype), sums[2].to(ln_bias.dtype)


def aot_specs(full: bool = False) -> list:
    """Every (BLOCK_N, ROWS, num_warps) the launchers can choose, bf16 erf-GELU (full=True:
    every dtype and the tanh form)."""
    dtypes = ("bf16", "fp16", "fp32") if full else ("bf16",)
    forms = (False, True) if full else (False,)
    specs = []
    for bn in all_block_ns():
        for dt in dtypes:
            for tanh in forms:
                tag = f"{dt} {'tanh' if tanh else 'erf'}"
                _, rows, warps = fwd_config(bn)
                specs.append(aot_spec(
                    _gelu_ln_fwd_kernel,
                    {"X": f"*{dt}", "B": f"*{dt}", "W": f"*{dt}", "LB": f"*{dt}", "Y": f"*{dt}", "Mean": "*fp32",
                     "Rstd": "*fp32", "M": "i32", "N": "i32", "eps": "fp32"},
                    {"TANH": tanh, "BLOCK_N": bn, "ROWS": rows}, warps, f"BLOCK_N={bn} ROWS={rows} warps={warps} {tag}",
                    div16=("X", "B", "W", "LB", "Y", "Mean", "Rstd", "N")))
                _, rows, warps = bwd_config(bn)
                specs.append(aot_spec(
                    _gelu_ln_bwd_kernel,
                    {"DY": f"*{dt}", "X": f"*{dt}", "B": f"*{dt}", "W": f"*{dt}", "Mean": "*fp32", "Rstd": "*fp32",
                     "DX": f"*{dt}", "DB_part": "*fp32", "DW_part": "*fp32", "DLB_part": "*fp32", "M": "i32",
                     "N": "i32"},
                    {"TANH": tanh, "BLOCK_N": bn, "ROWS": rows}, warps, f"BLOCK_N={bn} ROWS={rows} warps={warps} {tag}",
                    div16=("DY", "X", "B", "W", "Mean", "Rstd", "DX", "DB_part", "DW_part", "DLB_part", "N")))
    return specs
