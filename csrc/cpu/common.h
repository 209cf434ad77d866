// Shared pieces of the CPU kernels: dtype conversion of rows, vectorised row reductions,
// LayerNorm statistics, GELU, and deterministic chunked reductions over rows.
//
// Every kernel works on 2-D contiguous rows (rows, hidden). Each row is converted to fp32 once
// (a no-op for fp32 inputs), all arithmetic is fp32, and the result is rounded to the output
// dtype once on store. Work is split over rows with at::parallel_for.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "philox.h"

namespace bertfast_cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();

// ---- dtype conversion of one row

// Load n elements of type T as fp32: fp32 rows are used in place, others are widened into buf.
template <typename T>
inline const float* load_row(const T* src, float* buf, int64_t n) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
  return buf;
}
template <>
inline const float* load_row<float>(const float* src, float*, int64_t) {
  return src;
}
template <>
inline const float* load_row<c10::BFloat16>(const c10::BFloat16* src, float* buf, int64_t n) {
  // bf16 -> fp32 is a 16-bit shift; written with plain integer ops so the loop vectorises.
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(s[i]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    buf[i] = f;
  }
  return buf;
}

// Store n fp32 values as T, rounding once (round-to-nearest-even for bf16, like c10::BFloat16).
template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}
template <>
inline void store_row<float>(const float* src, float* dst, int64_t n) {
  if (src != dst) std::memcpy(dst, src, n * sizeof(float));
}
template <>
inline void store_row<c10::BFloat16>(const float* src, c10::BFloat16* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &src[i], sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    d[i] = std::isnan(src[i]) ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
  }
}

// Where a row's fp32 result goes before store_row: straight into the output for fp32.
template <typename T>
inline float* out_row(T* dst, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    (void)buf;
    return dst;
  } else {
    (void)dst;
    return buf;
  }
}

// ---- outputs

// A fresh output of >= 8 MB is asked to be backed by transparent huge pages (the kernel's
// "madvise" THP mode honours it; "never" ignores it). Large allocations come straight from
// mmap, and their first touch then faults in one 4 KB page at a time: at 8192 x 1024 fp32 that
// took longer than the whole kernel. With 2 MB pages the kernel zeroes the memory in a few
// hundred faults instead of thousands. Harmless for memory that is already mapped.
inline void advise_huge_pages(const at::Tensor& t) {
#ifdef MADV_HUGEPAGE
  const uintptr_t bytes = static_cast<uintptr_t>(t.nbytes());
  if (bytes < (uintptr_t{8} << 20)) return;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  advise_huge_pages(out);
  return out;
}
inline at::Tensor new_output_like(const at::Tensor& x) { return new_output(x.sizes(), x.options()); }

// ---- vector helpers

// Vec::loadu(p, count) zero-fills the lanes past count, so a partial tail adds nothing to sums.
inline Vec ld(const float* p, int64_t cnt) { return cnt == kVec ? Vec::loadu(p) : Vec::loadu(p, cnt); }
inline void st(const Vec& v, float* p, int64_t cnt) {
  if (cnt == kVec) {
    v.store(p);
  } else {
    v.store(p, cnt);
  }
}

// f(i, cnt) over [0, n) in steps of one vector; the main loop gets a constant cnt.
template <typename F>
inline void vloop(int64_t n, const F& f) {
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) f(i, kVec);
  if (i < n) f(i, n - i);
}

// vloop with four vectors per iteration, for long dependency chains (GELU's division and
// polynomials): four independent chains in one block keep the FMA and divide units busy, where
// one vector per step leaves them waiting on its own previous result (the side-by-side figures:
// benchmarks/results/cpu-2026-11-26-b/NOTES.md).
template <typename F>
inline void vloop4(int64_t n, const F& f) {
  int64_t i = 0;
  for (; i + 4 * kVec <= n; i += 4 * kVec) {
    f(i, kVec);
    f(i + kVec, kVec);
    f(i + 2 * kVec, kVec);
    f(i + 3 * kVec, kVec);
  }
  for (; i + kVec <= n; i += kVec) f(i, kVec);
  if (i < n) f(i, n - i);
}

// Load / store one vector of T as fp32 in registers (no row buffer): bf16 widening and
// round-to-nearest-even narrowing with intrinsics where the ISA has them, a scalar loop elsewhere.
template <typename T>
inline Vec ldT(const T* p, int64_t cnt) {
  alignas(64) float tmp[kVec] = {};
  for (int64_t i = 0; i < cnt; ++i) tmp[i] = static_cast<float>(p[i]);
  return Vec::loadu(tmp);
}
template <>
inline Vec ldT<float>(const float* p, int64_t cnt) {
  return ld(p, cnt);
}
template <typename T>
inline void stT(const Vec& v, T* p, int64_t cnt) {
  alignas(64) float tmp[kVec];
  v.store(tmp);
  for (int64_t i = 0; i < cnt; ++i) p[i] = static_cast<T>(tmp[i]);
}
template <>
inline void stT<float>(const Vec& v, float* p, int64_t cnt) {
  st(v, p, cnt);
}

#if defined(CPU_CAPABILITY_AVX512)
template <>
inline Vec ldT<c10::BFloat16>(const c10::BFloat16* p, int64_t cnt) {
  const __m256i raw = cnt == kVec ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                  : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << cnt) - 1), p);
  return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
}
template <>
inline void stT<c10::BFloat16>(const Vec& v, c10::BFloat16* p, int64_t cnt) {
  const __m512 f = v;
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
  const __m256i h = _mm512_cvtepi32_epi16(r);
  if (cnt == kVec) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  } else {
    _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << cnt) - 1), h);
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
template <>
inline Vec ldT<c10::BFloat16>(const c10::BFloat16* p, int64_t cnt) {
  alignas(16) uint16_t tmp[8] = {};
  const uint16_t* src = reinterpret_cast<const uint16_t*>(p);
  if (cnt != kVec) {
    std::memcpy(tmp, p, cnt * sizeof(uint16_t));
    src = tmp;
  }
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
}
template <>
inline void stT<c10::BFloat16>(const Vec& v, c10::BFloat16* p, int64_t cnt) {
  const __m256 f = v;
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  if (cnt == kVec) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  } else {
    alignas(16) uint16_t tmp[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
    std::memcpy(p, tmp, cnt * sizeof(uint16_t));
  }
}
#else
template <>
inline Vec ldT<c10::BFloat16>(const c10::BFloat16* p, int64_t cnt) {
  alignas(64) float tmp[kVec] = {};
  load_row(p, tmp, cnt);
  return Vec::loadu(tmp);
}
template <>
inline void stT<c10::BFloat16>(const Vec& v, c10::BFloat16* p, int64_t cnt) {
  alignas(64) float tmp[kVec];
  v.store(tmp);
  store_row(tmp, p, cnt);
}
#endif

// Horizontal sum in a fixed lane order (deterministic).
inline float hsum(const Vec& v) {
  alignas(64) float tmp[kVec];
  v.store(tmp);
  float s = 0.0f;
  for (int64_t i = 0; i < kVec; ++i) s += tmp[i];
  return s;
}

// mean / rstd of an fp32 row h whose sum (as a vector of lane sums, tail lanes zero) was
// accumulated while h was written: one more pass over the row (in L1) for the variance.
inline void stats_from_sum(const float* h, int64_t n, const Vec& sum, float eps, float& mean, float& rstd) {
  const float m = hsum(sum) / static_cast<float>(n);
  const Vec vm(m);
  Vec acc2(0.0f);
  vloop(n, [&](int64_t i, int64_t c) {
    Vec d = ld(h + i, c) - vm;
    if (c != kVec) d = Vec::set(Vec(0.0f), d, c);
    acc2 = at::vec::fmadd(d, d, acc2);
  });
  mean = m;
  rstd = 1.0f / std::sqrt(hsum(acc2) / static_cast<float>(n) + eps);
}

// out = (h - mean) * rstd * w + b (* drop), stored as T
template <typename T>
inline void ln_apply_store(const float* h, const float* w, const float* b, float mean, float rstd, int64_t n,
                           const float* drop, T* out) {
  const Vec vm(mean), vr(rstd);
  vloop(n, [&](int64_t i, int64_t c) {
    Vec y = at::vec::fmadd((ld(h + i, c) - vm) * vr, ld(w + i, c), ld(b + i, c));
    if (drop) y = y * ld(drop + i, c);
    stT(y, out + i, c);
  });
}

// LayerNorm backward of one row, given h (fp32), dy (fp32, after any dropout), the saved
// statistics and w. Writes dh and accumulates dw += dy * xhat, db += dy.
inline void ln_bwd_row(const float* h, const float* dy, const float* w, float mean, float rstd, int64_t n,
                       float* dh, float* dw, float* db) {
  const Vec vm(mean), vr(rstd);
  Vec s1(0.0f), s2(0.0f);
  vloop(n, [&](int64_t i, int64_t c) {
    const Vec xhat = (ld(h + i, c) - vm) * vr;
    const Vec d = ld(dy + i, c);
    const Vec g = d * ld(w + i, c);
    Vec gx = g * xhat;
    if (c != kVec) gx = Vec::set(Vec(0.0f), gx, c);
    s1 += gx;
    s2 += g;
    st(at::vec::fmadd(d, xhat, ld(dw + i, c)), dw + i, c);
    st(ld(db + i, c) + d, db + i, c);
  });
  const float inv_n = 1.0f / static_cast<float>(n);
  const Vec c1(hsum(s1) * inv_n), c2(hsum(s2) * inv_n);
  vloop(n, [&](int64_t i, int64_t c) {
    const Vec xhat = (ld(h + i, c) - vm) * vr;
    const Vec g = ld(dy + i, c) * ld(w + i, c);
    st((g - xhat * c1 - c2) * vr, dh + i, c);
  });
}

// ---- GELU (ATen's CPU formulas)

// erf as x * P(x^2) / Q(x^2) on [-4, 4] (beyond, erf is +-1 in fp32): a rational fit made for
// this file (minimax in absolute error over [0, 4], 5.8e-8 in exact arithmetic, <= 4.3e-7 when
// evaluated in fp32). Only FMAs and one division: ATen's erf (Abramowitz-Stegun 7.1.26) needs an
// exp as well, and GELU is compute-bound on AVX-512, so this is what sets the op's speed.
// ATen's own F.gelu runs oneDNN's JIT kernel; eager bias+GELU is two passes on top of that.
inline Vec erf_rational(const Vec& x_in) {
  const Vec x = at::vec::minimum(at::vec::maximum(x_in, Vec(-4.0f)), Vec(4.0f));
  const Vec t = x * x;
  Vec p = at::vec::fmadd(Vec(1.9223373e-08f), t, Vec(-1.9902393e-06f));
  p = at::vec::fmadd(p, t, Vec(1.5545241e-04f));
  p = at::vec::fmadd(p, t, Vec(4.2892201e-03f));
  p = at::vec::fmadd(p, t, Vec(5.2421723e-02f));
  p = at::vec::fmadd(p, t, Vec(2.1384959e-01f));
  p = at::vec::fmadd(p, t, Vec(1.1283786e+00f));
  Vec q = at::vec::fmadd(Vec(1.0971266e-03f), t, Vec(1.5543449e-02f));
  q = at::vec::fmadd(q, t, Vec(1.2076094e-01f));
  q = at::vec::fmadd(q, t, Vec(5.2284700e-01f));
  q = at::vec::fmadd(q, t, Vec(1.0f));
  // |erf| <= 1 exactly: the fit overshoots to 1 + 1.2e-7 at the clamp, and GELU's 1 + erf(x) would
  // then be -1.2e-7 instead of 0 for every x < -5.7 (GELU(-1e30) = 6e22, GELU(-inf) = +inf)
  return at::vec::minimum(at::vec::maximum(x * p / q, Vec(-1.0f)), Vec(1.0f));
}

inline Vec gelu_erf(const Vec& x) {
  const Vec kAlpha(static_cast<float>(M_SQRT1_2));
  return x * Vec(0.5f) * (Vec(1.0f) + erf_rational(x * kAlpha));
}
inline Vec gelu_tanh(const Vec& x) {
  const Vec kBeta(static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5));
  const Vec kKappa(0.044715f);
  const Vec inner = kBeta * (x + kKappa * x * x * x);
  return Vec(0.5f) * x * (Vec(1.0f) + inner.tanh());
}
inline Vec gelu(const Vec& x, bool tanh_form) { return tanh_form ? gelu_tanh(x) : gelu_erf(x); }

// d GELU / dx, as bertfast.ops._common.gelu_grad computes it.
inline Vec gelu_grad(const Vec& x, bool tanh_form) {
  if (tanh_form) {
    const Vec k(static_cast<float>(std::sqrt(2.0 / M_PI)));
    const Vec a(0.044715f);
    const Vec t = (k * (x + a * x * x * x)).tanh();
    const Vec one(1.0f), half(0.5f);
    return half * (one + t) + half * x * (one - t * t) * k * (one + Vec(3.0f * 0.044715f) * x * x);
  }
  const Vec cdf = Vec(0.5f) * (Vec(1.0f) + erf_rational(x * Vec(static_cast<float>(M_SQRT1_2))));
  const Vec pdf = (Vec(-0.5f) * x * x).exp_u20() * Vec(static_cast<float>(1.0 / std::sqrt(2.0 * M_PI)));
  return cdf + x * pdf;
}

// ---- parallel loops

// Rows per task so that a task has at least ~16K elements of work: tiny inputs stay on one
// thread instead of paying the fork/join.
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

// Deterministic reductions over rows (weight and bias gradients): rows are cut into fixed
// chunks whose size depends only on the shape, never on the thread count; each chunk sums its
// rows in order into its own partial, and the partials are added in chunk order. The result
// is bitwise the same with 1 or N threads.
struct Chunks {
  int64_t rows, size, count;
  explicit Chunks(int64_t rows_) : rows(rows_) {
    size = std::max<int64_t>(16, (rows + 63) / 64);
    count = rows == 0 ? 0 : (rows + size - 1) / size;
  }
};

// partial: (count, k, n) fp32; returns (k, n) fp32 summed over chunks in order.
inline at::Tensor sum_chunks(const at::Tensor& partial) {
  const int64_t count = partial.size(0), k = partial.size(1), n = partial.size(2);
  at::Tensor out = at::zeros({k, n}, partial.options());
  const float* p = partial.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, k * n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t j = 0; j < count; ++j) {
      const float* pj = p + j * k * n;
      for (int64_t i = b; i < e; ++i) o[i] += pj[i];
    }
  });
  return out;
}

// Dispatch over the three floating dtypes the kernels take (fp64 is served by the reference).
#define BERTFAST_DISPATCH(dtype, name, ...)                                                   \
  [&] {                                                                                     \
    switch (dtype) {                                                                        \
      case at::kFloat: {                                                                    \
        using scalar_t = float;                                                             \
        return __VA_ARGS__();                                                               \
      }                                                                                     \
      case at::kBFloat16: {                                                                 \
        using scalar_t = c10::BFloat16;                                                     \
        return __VA_ARGS__();                                                               \
      }                                                                                     \
      case at::kHalf: {                                                                     \
        using scalar_t = c10::Half;                                                         \
        return __VA_ARGS__();                                                               \
      }                                                                                     \
      default:                                                                              \
        TORCH_CHECK(false, name, ": expected float32, bfloat16 or float16, got ", dtype); \
    }                                                                                       \
  }()

// fp32 copies of the small per-column vectors (weight, bias): the row loops then read fp32.
inline at::Tensor vec_f32(const at::Tensor& t) { return t.contiguous().to(at::kFloat); }

inline void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D (rows, hidden), got ", t.dim(), " dims");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

}  // namespace bertfast_cpu
