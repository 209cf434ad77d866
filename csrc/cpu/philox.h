// Philox-4x32 with 7 rounds: the dropout RNG every bertfast backend shares.
//
// The same function as bertfast/ops/_rng.py (the oracle) and kernels/_rng.py (Triton), bit
// for bit: for element offset n, counter = (lo32(n), hi32(n), 0, 0), key = (lo32(seed),
// hi32(seed)); the first output word x decides, keep iff (x >> 8) >= ceil(p * 2^24).
// Masks are a pure function of (seed, offset), so the backward regenerates the forward's
// mask instead of storing it, and any partition of the work over threads draws the same bits.
#pragma once

#include <cmath>
#include <cstdint>

namespace bertfast_cpu {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 7;

inline uint32_t philox_word0(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint64_t pb = static_cast<uint64_t>(c2) * kPhiloxRoundB;
    const uint64_t pa = static_cast<uint64_t>(c0) * kPhiloxRoundA;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

inline uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(std::ceil(p * 16777216.0)); }

// The fp32 multiplier the reference applies: keep.float() * (1 / (1 - p)), the scalar rounded to
// fp32 as PyTorch does for a float32 tensor times a Python float.
inline float dropout_scale(double p) { return static_cast<float>(1.0 / (1.0 - p)); }

// scale_out[i] = keep(offset0 + i) ? scale : 0 for i in [0, n). Written as a flat loop over
// independent lanes (no early exits) so the compiler vectorises the 32x32->64 multiplies.
inline void dropout_row(uint64_t seed, uint32_t threshold, float scale, int64_t offset0, int64_t n,
                        float* scale_out) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t x = philox_word0(seed, static_cast<uint64_t>(offset0 + i));
    scale_out[i] = (x >> 8) >= threshold ? scale : 0.0f;
  }
}

}  // namespace bertfast_cpu
