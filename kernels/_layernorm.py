"""What the LayerNorm-family Triton kernels share (bias_residual_layernorm, embedding_layernorm,
gelu_layernorm): one place decides the row tiling (BLOCK_N / ROWS / num_warps of the forward and
backward row kernels), and `layernorm_rows` is the normalisation of a register tile that every
forward kernel of the family ends with.
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

MAX_N = 8192
# The smallest BLOCK_N: tiny hidden sizes only need to be correct, and a floor keeps the
# number of compiled configurations (and the AOT table) small.
MIN_BLOCK_N = 64
# Target elements per program tile: small rows are packed several to a program so each
# program still moves ~8-16 KB (and weight/bias loads are amortised over ROWS rows).
TILE = 4096
MAX_ROWS = 16
BWD_TILE = 1024


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


def all_block_ns():
    bn, out = MIN_BLOCK_N, []
    while bn <= MAX_N:
        out.append(bn)
        bn *= 2
    return out


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
