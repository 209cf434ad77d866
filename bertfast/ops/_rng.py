"""The dropout RNG every backend shares: Philox-4x32 with 7 rounds, counter-based.

A dropout mask is a pure function of (seed, element offset): the forward draws one 63-bit
seed from torch's default CPU generator (so `torch.manual_seed` reproduces masks on every
device, with no GPU sync), and the backward regenerates the mask from the same seed instead
of storing it. The Triton kernels (kernels/_rng.py) and the C++ kernels compute the same
function bit for bit; this file is the plain-PyTorch version (the oracle).

For element offset n (int64): counter = (lo32(n), hi32(n), 0, 0), key = (lo32(seed),
hi32(seed)); the first output word x of Philox decides: keep iff (x >> 8) >= threshold,
threshold = ceil(p * 2**24). P(keep) = 1 - p up to 2**-24.
"""
from __future__ import annotations

import math

import torch

PHILOX_ROUNDS = 7
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
M32 = 0xFFFFFFFF


def draw_seed() -> int:
    """One 63-bit seed from torch's default (CPU) generator: no device sync."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def draw_seeds(n: int) -> list:
    """n seeds as draw_seed's, in one draw (a model forward takes all its dropout seeds at once)."""
    return torch.randint(0, 2**62, (n,), dtype=torch.int64).tolist()


def dropout_threshold(p: float) -> int:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return int(math.ceil(p * 16777216.0))


def _mul32(a: torch.Tensor, b: int):
    """(hi32, lo32) of a * b for a: int64 tensor of uint32 values, b: a uint32 constant,
    without int64 overflow (b is split into 16-bit halves)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    u = a * b_hi
    t = a * b_lo
    hi = (u + (t >> 16)) >> 16
    lo = (((u & 0xFFFF) << 16) + t) & M32
    return hi, lo


def philox_word0(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """First Philox-4x32-7 output word (as int64 holding a uint32) for each int64 offset."""
    offsets = offsets.to(torch.int64)
    c0 = offsets & M32
    c1 = (offsets >> 32) & M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & M32, (seed >> 32) & M32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mul32(c2, ROUND_B)
        hi_a, lo_a = _mul32(c0, ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & M32, (k1 + KEY_B) & M32
    return c0


def keep_mask(seed: int, p: float, offsets: torch.Tensor) -> torch.Tensor:
    """Bool mask, True where the element at each offset is kept by dropout with rate p."""
    return (philox_word0(seed, offsets) >> 8) >= dropout_threshold(p)


def dropout_scale_mask(seed: int, p: float, shape, device) -> torch.Tensor:
    """float32 tensor of `shape`: 1/(1-p) where kept, 0 where dropped; offsets are the
    row-major element indices of `shape`."""
    n = math.prod(shape)
    offs = torch.arange(n, device=device, dtype=torch.int64).reshape(shape)
    return keep_mask(seed, p, offs).to(torch.float32) * (1.0 / (1.0 - p))
