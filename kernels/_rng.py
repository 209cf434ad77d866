"""Philox-4x32-7 dropout RNG for the Triton kernels: bit-identical to bertfast/ops/_rng.py.

Written out here instead of calling tl.rand so the stream does not depend on the Triton
version (tl.randint's handling of 64-bit offsets and its round count have changed between
releases) and so the C++ and PyTorch implementations can match it exactly.
"""
import triton
import triton.language as tl


@triton.jit
def philox_word0(seed_lo, seed_hi, offsets):
    """First output word (uint32) of Philox-4x32-7 at int64 `offsets`;
    key = (seed_lo, seed_hi) as uint32 scalars, counter = (lo32(offset), hi32(offset), 0, 0)."""
    offsets = offsets.to(tl.int64)
    c0 = (offsets & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((offsets >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = c0 * 0
    c3 = c0 * 0
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    for _ in tl.static_range(7):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
        c1 = _c2 * 0xCD9E8D57
        c3 = _c0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0


@triton.jit
def dropout_keep(seed_lo, seed_hi, offsets, threshold):
    """True where the element at `offsets` survives dropout: (word0 >> 8) >= threshold,
    threshold = ceil(p * 2**24) (ops/_rng.dropout_threshold)."""
    return (philox_word0(seed_lo, seed_hi, offsets) >> 8).to(tl.int32) >= threshold


def split_seed(seed: int):
    """(seed_lo, seed_hi) as Python ints for a kernel launch."""
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
