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

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512F__)
// (hi32, lo32) of a * b for 16 uint32 lanes and a constant b: _mm512_mul_epu32 multiplies the
// even lanes into 64-bit products; the odd lanes go through a 32-bit shift.
inline void philox_mulhilo(__m512i a, __m512i b, __m512i& hi, __m512i& lo) {
  const __m512i pe = _mm512_mul_epu32(a, b);
  const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), b);
  lo = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
}

// philox_word0 of the 16 offsets offset0 .. offset0 + 15.
inline __m512i philox_word0_x16(uint64_t seed, uint64_t offset0) {
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i base_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset0)));
  __m512i c0 = _mm512_add_epi32(base_lo, iota);
  __m512i c1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset0 >> 32)));
  c1 = _mm512_mask_add_epi32(c1, _mm512_cmplt_epu32_mask(c0, base_lo), c1, _mm512_set1_epi32(1));  // carry
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m512i ra = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m512i rb = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundB));
  for (int r = 0; r < kPhiloxRounds; ++r) {
    __m512i hb, lb, ha, la;
    philox_mulhilo(c2, rb, hb, lb);
    philox_mulhilo(c0, ra, ha, la);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hb, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    c2 = _mm512_xor_si512(_mm512_xor_si512(ha, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c1 = lb;
    c3 = la;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}
#endif

// scale_out[i] = keep(offset0 + i) ? scale : 0 for i in [0, n). AVX512: 16 lanes of 32-bit
// Philox at a time (~7x the auto-vectorised scalar code); elsewhere a flat loop over
// independent lanes that the compiler vectorises.
inline void dropout_row(uint64_t seed, uint32_t threshold, float scale, int64_t offset0, int64_t n,
                        float* scale_out) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512F__)
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(threshold));
  const __m512 sc = _mm512_set1_ps(scale);
  for (; i < n; i += 16) {
    const __m512i x = philox_word0_x16(seed, static_cast<uint64_t>(offset0 + i));
    const __mmask16 keep = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(x, 8), thr);
    const __m512 v = _mm512_maskz_mov_ps(keep, sc);
    if (n - i >= 16) {
      _mm512_storeu_ps(scale_out + i, v);
    } else {
      _mm512_mask_storeu_ps(scale_out + i, static_cast<__mmask16>((1u << (n - i)) - 1), v);
    }
  }
#endif
  for (; i < n; ++i) {
    const uint32_t x = philox_word0(seed, static_cast<uint64_t>(offset0 + i));
    scale_out[i] = (x >> 8) >= threshold ? scale : 0.0f;
  }
}

}  // namespace bertfast_cpu
