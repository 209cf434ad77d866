"""Triton kernels of bias_gelu: GELU(x + bias), erf form (BERT's) or tanh form.

Elementwise over a (M, N) view of x: each program owns a [BLOCK_M, BLOCK_N] tile (bias is
loaded once per tile), math in fp32, one cast on store. The backward writes dx and reduces
dbias in two stages: a fixed number G of programs per column tile stride over row tiles with
an fp32 register accumulator, write one (G, N) partial row each, and a sum finishes it.

The GELU math itself (`gelu`, `gelu_grad`) is kernels/_gelu.py, shared with gelu_layernorm.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._gelu import gelu, gelu_grad
from ._launch import FastKernel
from ._launch_params import aot_spec, num_programs

TILE = 4096  # elements per program: 16 per thread at 8 warps (two 16-byte vectors of bf16)


@triton.jit
def _bias_gelu_fwd_kernel(X, B, Y, M, N, TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = (rows < M)[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    h += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, gelu(h, TANH).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(DY, X, B, DX, DB_part, M, N, TANH: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    n_prog = tl.num_programs(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tile in range(pid_m, tl.cdiv(M, BLOCK_M), n_prog):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + b[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        dx = dy * gelu_grad(h, TANH)  # dy = 0 on masked lanes, so dx is too
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        acc += dx
    tl.store(DB_part + pid_m * N + cols, tl.sum(acc, axis=0), mask=cmask)


@functools.lru_cache(maxsize=None)
def config(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): BLOCK_N is the power of two in [256, 1024] that pads N
    least (768 -> 256 x 3, 3072 -> 1024 x 3), or next_pow2(N) (>= 32) below 256."""
    if n < 256:
        bn = max(32, triton.next_power_of_2(n))
    else:
        bn = min((256, 512, 1024), key=lambda b: (triton.cdiv(n, b) * b - n, -b))
    return TILE // bn, bn, 8


def _check(x: torch.Tensor, bias: torch.Tensor, approximate: str):
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    n = bias.shape[0]
    if x.shape[-1] != n:
        raise ValueError(f"bias must have shape ({x.shape[-1]},), got {tuple(bias.shape)}")
    return x.numel() // max(n, 1), n


_fwd, _bwd = FastKernel(_bias_gelu_fwd_kernel), FastKernel(_bias_gelu_bwd_kernel)


def bias_gelu_fwd(x, bias, approximate):
    m, n = _check(x, bias, approximate)
    x, bias = x.contiguous(), bias.contiguous()  # the kernels read rows and the bias at unit stride
    y = torch.empty_like(x)
    if m == 0:
        return y
    bm, bn, warps = config(n)
    tanh = approximate == "tanh"
    _fwd((triton.cdiv(m, bm), triton.cdiv(n, bn)), (n, tanh, x.dtype, bias.dtype), (x, bias, y, m, n),
         TANH=tanh, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    return y


def bias_gelu_bwd(dout, x, bias, approximate):
    m, n = _check(x, bias, approximate)
    dout, x, bias = dout.contiguous(), x.contiguous(), bias.contiguous()
    dx = torch.empty_like(x)
    bm, bn, warps = config(n)
    n_col = triton.cdiv(n, bn)
    const = dict(TANH=approximate == "tanh", BLOCK_M=bm, BLOCK_N=bn)
    # G row-programs per column tile, G * n_col filling the GPU once
    key = (n, const["TANH"], dout.dtype, x.dtype, bias.dtype)
    g = max(1, num_programs(x.device, triton.cdiv(m, bm) * n_col, warps, _bias_gelu_bwd_kernel,
                            lambda: (dout, x, bias, dx, torch.empty((1, n), dtype=torch.float32, device=x.device), m,
                                     n), const, key=key) // n_col)
    g = min(g, triton.cdiv(m, bm))
    parts = torch.empty((g, n), dtype=torch.float32, device=x.device)
    _bwd((g, n_col), key, (dout, x, bias, dx, parts, m, n), num_warps=warps, **const)
    return dx, parts.sum(0).to(bias.dtype)


def aot_specs(full: bool = False) -> list:
    """Every tile configuration `config` can choose, bf16 erf (full=True: every dtype, both forms)."""
    dtypes = ("bf16", "fp16", "fp32") if full else ("bf16",)
    forms = (False, True) if full else (False,)
    specs = []
    for bn in (32, 64, 128, 256, 512, 1024):
        bm, _, warps = config(bn)
        for dt in dtypes:
            for tanh in forms:
                cfg = f"BLOCK_M={bm} BLOCK_N={bn} warps={warps} {dt} {'tanh' if tanh else 'erf'}"
                specs.append(aot_spec(_bias_gelu_fwd_kernel, {"X": f"*{dt}", "B": f"*{dt}", "Y": f"*{dt}",
                                                              "M": "i32", "N": "i32"},
                                      {"TANH": tanh, "BLOCK_M": bm, "BLOCK_N": bn}, warps, cfg,
                                      div16=("X", "B", "Y", "N")))
                specs.append(aot_spec(_bias_gelu_bwd_kernel, {"DY": f"*{dt}", "X": f"*{dt}", "B": f"*{dt}",
                                                              "DX": f"*{dt}", "DB_part": "*fp32", "M": "i32",
                                                              "N": "i32"},
                                      {"TANH": tanh, "BLOCK_M": bm, "BLOCK_N": bn}, warps, cfg,
                                      div16=("DY", "X", "B", "DX", "DB_part", "N")))
    return specs
