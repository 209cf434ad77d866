"""The dropout RNG every implementation shares (bertfast/ops/_rng.py): Philox 4x32-7 as plain
Python computes it, and the keep rate and scale of its masks. The ops' tests compare each
implementation's masks with the reference's bit for bit (tests/ops/test_<op>.py).
"""
import math

import torch

from bertfast.ops import _rng


def test_dropout_rate_and_scale():
    keep = _rng.keep_mask(12345, 0.1, torch.arange(200_000))
    rate = 1 - keep.float().mean().item()
    assert abs(rate - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 200_000)
    m = _rng.dropout_scale_mask(1, 0.2, (100, 100), "cpu")
    assert set(torch.unique(m).tolist()) == {0.0, 1.25}


def test_philox_matches_plain_python():
    M = 0xFFFFFFFF

    def philox(seed, n):
        c0, c1, c2, c3, k0, k1 = n & M, n >> 32, 0, 0, seed & M, seed >> 32 & M
        for _ in range(7):
            p2, p0 = c2 * 0xCD9E8D57, c0 * 0xD2511F53
            c0, c1, c2, c3 = (p2 >> 32) ^ c1 ^ k0, p2 & M, (p0 >> 32) ^ c3 ^ k1, p0 & M
            k0, k1 = (k0 + 0x9E3779B9) & M, (k1 + 0xBB67AE85) & M
        return c0

    offs = [0, 1, 2, 2**31 - 1, 2**32 + 5, 2**40 + 11]
    seed = 0x0123456789ABCDEF
    assert _rng.philox_word0(seed, torch.tensor(offs)).tolist() == [philox(seed, o) for o in offs]
