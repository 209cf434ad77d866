// attention: softmax(Q K^T * scale + key_bias [+ causal]) V, padded (B,S,H,D) or packed varlen
// (total,H,D) with cu_seqlens, forward and backward (FlashAttention-2's recomputation).
//
// Work is split over (sequence, head) pairs; a task packs its head's K and V into fp32 panels
// once, then walks blocks of up to 64 queries: S = Q K^T with a register-blocked fp32 micro-GEMM
// (at::vec), the masked softmax in fp32 (row max, exp_u20 as SDPA's CPU kernel, sum, lse), dropout from the shared Philox
// stream, and O = P V. Only real tokens are computed: a varlen batch costs sum(L_b^2), not
// B * max_L^2, which is where it beats SDPA over a padded batch. A (b, h) pair owns its slice
// of every output (dK and dV accumulate within the task), so results do not depend on the
// thread count. Rows that see no key give zeros and lse = +inf.
#include "common.h"

namespace bertfast_cpu {
namespace {

constexpr int64_t kBlockM = 64;  // queries per block: S (64 x Lk) stays in L2 for BERT lengths

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[MR rows, NV vectors] (+)= A[MR x K] * B[K x NV*kVec]; A row-major (lda), B row-major (ldb).
template <int MR, int NV>
inline void micro(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                  bool acc) {
  Vec c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = acc ? Vec::loadu(C + r * ldc + v * kVec) : Vec(0.0f);
  for (int64_t k = 0; k < K; ++k) {
    Vec b[NV];
    for (int v = 0; v < NV; ++v) b[v] = Vec::loadu(B + k * ldb + v * kVec);
    for (int r = 0; r < MR; ++r) {
      const Vec a(A[r * lda + k]);
      for (int v = 0; v < NV; ++v) c[r][v] = at::vec::fmadd(a, b[v], c[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v].store(C + r * ldc + v * kVec);
}

template <int MR>
inline void micro_row_block(int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                            int64_t ldc, bool acc) {
  int64_t j = 0;
  for (; j + 2 * kVec <= N; j += 2 * kVec) micro<MR, 2>(K, A, lda, B + j, ldb, C + j, ldc, acc);
  for (; j < N; j += kVec) micro<MR, 1>(K, A, lda, B + j, ldb, C + j, ldc, acc);
}

// C (M x N) (+)= A (M x K) * B (K x N), fp32, N a multiple of kVec (panels are zero padded).
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool acc) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) micro_row_block<4>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, acc);
  for (; i < M; ++i) micro_row_block<1>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, acc);
}

// Rows of one head: row r of the sequence is at base + r * stride (stride = H * D elements).
template <typename T>
inline void pack_rows(const T* base, int64_t stride, int64_t rows, int64_t d, int64_t ld, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    float* o = dst + r * ld;
    const T* s = base + r * stride;
    for (int64_t c = 0; c < d; ++c) o[c] = static_cast<float>(s[c]);
    for (int64_t c = d; c < ld; ++c) o[c] = 0.0f;
  }
}

// dst[c * ld + r] = src[r * stride + c] for r < rows, c < cols. Rows go in blocks of 16 so each
// destination cache line is written whole while the 16 source lines stay in L1 (a plain
// row-by-row transpose scatters every store to a different line and dominated the run time).
template <typename T>
inline void transpose_into(const T* src, int64_t stride, int64_t rows, int64_t cols, float* dst, int64_t ld) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t r1 = std::min(rows, r0 + 16);
    for (int64_t c = 0; c < cols; ++c) {
      float* d = dst + c * ld;
      for (int64_t r = r0; r < r1; ++r) d[r] = static_cast<float>(src[r * stride + c]);
    }
  }
}

// Transposed: dst[c * ld + r] = row r, column c (columns padded to ld with zeros). The rows are
// first copied contiguously into `rows_buf` (ld_rows >= d): streaming whole rows out of the
// (tokens, heads, dim) tensor and transposing in cache is several times faster than
// gathering one element of every row at a time.
template <typename T>
inline void pack_cols(const T* base, int64_t stride, int64_t rows, int64_t d, int64_t ld, float* dst,
                      float* rows_buf, int64_t ld_rows) {
  pack_rows(base, stride, rows, d, ld_rows, rows_buf);
  for (int64_t c = 0; c < d; ++c) std::fill(dst + c * ld + rows, dst + (c + 1) * ld, 0.0f);
  transpose_into(rows_buf, ld_rows, rows, d, dst, ld);
}

inline void transpose(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd) {
  transpose_into(src, lds, rows, cols, dst, ldd);
}

struct Geometry {
  int64_t B, H, D, Dv, max_q, max_k, total_q;
  bool varlen, causal;
  const int32_t* cu_q;
  const int32_t* cu_k;
  const float* key_bias;  // (B, Sk) or nullptr
  const int64_t* klen;    // padded layout: keys up to the last one the bias leaves visible, per sequence
  float scale;
  double p;
  uint64_t seed;
  int64_t q_start(int64_t b) const { return varlen ? cu_q[b] : b * max_q; }
  int64_t k_start(int64_t b) const { return varlen ? cu_k[b] : b * max_k; }
  int64_t len_q(int64_t b) const { return varlen ? cu_q[b + 1] - cu_q[b] : max_q; }
  int64_t len_k(int64_t b) const { return varlen ? cu_k[b + 1] - cu_k[b] : klen[b]; }
  // causal alignment: key j is visible to query i iff j <= i + shift (bottom-right, per sequence)
  int64_t causal_shift(int64_t b) const { return varlen ? len_k(b) - len_q(b) : max_k - max_q; }
  // index of lse(b, h, i): (B, H, Sq) padded, (H, total_q) varlen
  int64_t lse_index(int64_t b, int64_t h, int64_t i) const {
    return varlen ? h * total_q + cu_q[b] + i : (b * H + h) * max_q + i;
  }
};

// Scores of query row i (local index) -> additive mask applied, in place; returns the number of
// keys this row may see (keys past it are -inf), for causal rows a prefix.
inline int64_t mask_row(const Geometry& g, int64_t b, int64_t i, int64_t lk, float* s) {
  int64_t visible = lk;
  if (g.causal) visible = std::max<int64_t>(0, std::min<int64_t>(lk, i + g.causal_shift(b) + 1));
  const Vec vs(g.scale);
  if (g.key_bias) {
    const float* kb = g.key_bias + b * g.max_k;
    vloop(visible, [&](int64_t j, int64_t c) { st(ld(s + j, c) * vs + ld(kb + j, c), s + j, c); });
  } else {
    vloop(visible, [&](int64_t j, int64_t c) { st(ld(s + j, c) * vs, s + j, c); });
  }
  return visible;
}

inline float row_max(const float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  Vec vm(m);
  vloop(n, [&](int64_t j, int64_t c) {
    Vec v = ld(s + j, c);
    if (c != kVec) v = Vec::set(Vec(m), v, c);
    vm = at::vec::maximum(vm, v);
  });
  alignas(64) float tmp[kVec];
  vm.store(tmp);
  for (int64_t k = 0; k < kVec; ++k) m = std::max(m, tmp[k]);
  return m;
}

template <typename T>
void attn_fwd_kernel(const Geometry& g, const T* q, const T* k, const T* v, T* out, float* lse) {
  const int64_t H = g.H, D = g.D, Dv = g.Dv;
  const int64_t Dvp = round_up(Dv, kVec), Lkp_max = round_up(std::max<int64_t>(g.max_k, 1), 2 * kVec);
  const bool dropout = g.p > 0.0;
  const uint32_t thr = dropout_threshold(g.p);
  const float dscale = dropout_scale(g.p);
  // task t -> (b = t % B, h = t / B): the two halves of the range each get every sequence,
  // which balances uneven sequence lengths across threads.
  at::parallel_for(0, g.B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> kt(D * Lkp_max), kr(g.max_k * D + kVec), vp(g.max_k * Dvp + kVec), qb(kBlockM * D),
        sb(kBlockM * Lkp_max), ob(kBlockM * Dvp), drop(Lkp_max);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t % g.B, h = t / g.B;
      const int64_t lq = g.len_q(b), lk = g.len_k(b), qs = g.q_start(b), ks = g.k_start(b);
      if (lq <= 0) continue;
      const int64_t Lkp = round_up(std::max<int64_t>(lk, 1), 2 * kVec);
      pack_cols(k + (ks * H + h) * D, H * D, lk, D, Lkp, kt.data(), kr.data(), D);
      pack_rows(v + (ks * H + h) * Dv, H * Dv, lk, Dv, Dvp, vp.data());
      for (int64_t i0 = 0; i0 < lq; i0 += kBlockM) {
        const int64_t m = std::min(kBlockM, lq - i0);
        pack_rows(q + ((qs + i0) * H + h) * D, H * D, m, D, D, qb.data());
        gemm(m, Lkp, D, qb.data(), D, kt.data(), Lkp, sb.data(), Lkp, false);
        for (int64_t r = 0; r < m; ++r) {
          const int64_t i = i0 + r;
          float* s = sb.data() + r * Lkp;
          const int64_t vis = mask_row(g, b, i, lk, s);
          const float mx = row_max(s, vis);
          float* lse_p = lse + g.lse_index(b, h, i);
          if (vis == 0 || mx == -std::numeric_limits<float>::infinity()) {  // sees no key
            *lse_p = std::numeric_limits<float>::infinity();
            std::fill(s, s + Lkp, 0.0f);
            continue;
          }
          const Vec vmx(mx);
          Vec acc(0.0f);
          vloop(vis, [&](int64_t j, int64_t c) {
            Vec e = (ld(s + j, c) - vmx).exp_u20();
            if (c != kVec) e = Vec::set(Vec(0.0f), e, c);
            st(e, s + j, c);
            acc += e;
          });
          const float l = hsum(acc);
          *lse_p = mx + std::log(l);
          const Vec inv(1.0f / l);
          if (dropout) {
            dropout_row(g.seed, thr, dscale, ((b * H + h) * g.max_q + i) * g.max_k, vis, drop.data());
            vloop(vis, [&](int64_t j, int64_t c) { st(ld(s + j, c) * inv * ld(drop.data() + j, c), s + j, c); });
          } else {
            vloop(vis, [&](int64_t j, int64_t c) { st(ld(s + j, c) * inv, s + j, c); });
          }
          std::fill(s + vis, s + Lkp, 0.0f);
        }
        gemm(m, Dvp, lk, sb.data(), Lkp, vp.data(), Dvp, ob.data(), Dvp, false);
        for (int64_t r = 0; r < m; ++r) {
          T* o = out + ((qs + i0 + r) * H + h) * Dv;
          for (int64_t c = 0; c < Dv; ++c) o[c] = static_cast<T>(ob[r * Dvp + c]);
        }
      }
    }
  });
}

Geometry make_geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& key_bias, const std::optional<at::Tensor>& cu_q,
                       const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, double p, double scale,
                       bool causal, int64_t seed, at::Tensor& kb_keep, at::Tensor& cuq_keep, at::Tensor& cuk_keep,
                       std::vector<int64_t>& klen) {
  Geometry g{};
  g.varlen = cu_q.has_value() && cu_q->defined();
  g.H = q.size(-2);
  g.D = q.size(-1);
  g.Dv = v.size(-1);
  g.causal = causal;
  g.scale = static_cast<float>(scale);
  g.p = p;
  g.seed = static_cast<uint64_t>(seed);
  g.key_bias = nullptr;
  if (g.varlen) {
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "varlen attention takes (total, heads, head_dim)");
    TORCH_CHECK(cu_k.has_value() && cu_k->defined(), "cu_k is required with cu_q");
    cuq_keep = cu_q->to(at::kInt).contiguous();
    cuk_keep = cu_k->to(at::kInt).contiguous();
    g.cu_q = cuq_keep.data_ptr<int32_t>();
    g.cu_k = cuk_keep.data_ptr<int32_t>();
    g.B = cuq_keep.numel() - 1;
    g.max_q = max_q;
    g.max_k = max_k;
    g.total_q = q.size(0);
    for (int64_t b = 0; b < g.B; ++b) {
      TORCH_CHECK(g.cu_q[b + 1] - g.cu_q[b] <= max_q && g.cu_k[b + 1] - g.cu_k[b] <= max_k,
                  "a sequence is longer than max_seqlen");
    }
  } else {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "padded attention takes (batch, seq, heads, head_dim)");
    g.B = q.size(0);
    g.max_q = q.size(1);
    g.max_k = k.size(1);
    g.total_q = g.B * g.max_q;
    g.cu_q = g.cu_k = nullptr;
    klen.assign(g.B, g.max_k);
    if (key_bias.has_value() && key_bias->defined()) {
      kb_keep = key_bias->to(at::kFloat).contiguous();
      TORCH_CHECK(kb_keep.numel() == g.B * g.max_k, "key_bias must be (batch, key_len)");
      g.key_bias = kb_keep.data_ptr<float>();
      // Right padding (HF's layout) masks a suffix of keys with -inf: those keys get probability
      // 0 exactly, so skipping them computes the same values for a fraction of the work.
      for (int64_t b = 0; b < g.B; ++b) {
        int64_t n = g.max_k;
        while (n > 0 && g.key_bias[b * g.max_k + n - 1] == -std::numeric_limits<float>::infinity()) --n;
        klen[b] = n;
      }
    }
    g.klen = klen.data();
  }
  return g;
}

std::tuple<at::Tensor, at::Tensor> attn_fwd(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                            const std::optional<at::Tensor>& key_bias,
                                            const std::optional<at::Tensor>& cu_q,
                                            const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
                                            double p, double scale, bool causal, int64_t seed) {
  const at::Tensor q = q_.contiguous(), k = k_.contiguous().to(q.scalar_type()), v = v_.contiguous().to(q.scalar_type());
  at::Tensor kb, cq, ck;
  std::vector<int64_t> klen;
  const Geometry g =
      make_geometry(q, k, v, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed, kb, cq, ck, klen);
  auto out_shape = q.sizes().vec();
  out_shape.back() = g.Dv;
  // zeros: rows outside every sequence (none in a well-formed batch) and dead rows stay 0
  at::Tensor out = at::zeros(out_shape, q.options());
  at::Tensor lse = g.varlen ? at::empty({g.H, g.total_q}, q.options().dtype(at::kFloat))
                            : at::empty({g.B, g.H, g.max_q}, q.options().dtype(at::kFloat));
  BERTFAST_DISPATCH(q.scalar_type(), "attention", [&] {
    attn_fwd_kernel<scalar_t>(g, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                              out.data_ptr<scalar_t>(), lse.data_ptr<float>());
  });
  return {out, lse};
}

template <typename T>
void attn_bwd_kernel(const Geometry& g, const T* dout, const T* q, const T* k, const T* v, const T* out,
                     const float* lse, T* dq, T* dk, T* dv) {
  const int64_t H = g.H, D = g.D, Dv = g.Dv;
  const int64_t Dp = round_up(D, kVec), Dvp = round_up(Dv, kVec);
  const int64_t Lkp_max = round_up(std::max<int64_t>(g.max_k, 1), 2 * kVec);
  const bool dropout = g.p > 0.0;
  const uint32_t thr = dropout_threshold(g.p);
  const float dscale = dropout_scale(g.p);
  at::parallel_for(0, g.B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> kt(D * Lkp_max), kr(g.max_k * Dp + kVec), vt(Dv * Lkp_max), dkb(g.max_k * Dp + kVec),
        dvb(g.max_k * Dvp + kVec), qb(kBlockM * Dp), dob(kBlockM * Dvp), pb(kBlockM * Lkp_max),
        dpb(kBlockM * Lkp_max), tb(Lkp_max * kBlockM), dqb(kBlockM * Dp), delta(kBlockM), drop(Lkp_max);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t % g.B, h = t / g.B;
      const int64_t lq = g.len_q(b), lk = g.len_k(b), qs = g.q_start(b), ks = g.k_start(b);
      if (lk <= 0) continue;
      const int64_t Lkp = round_up(lk, 2 * kVec);
      pack_cols(k + (ks * H + h) * D, H * D, lk, D, Lkp, kt.data(), kr.data(), Dp);  // kr: K rows, kept
      pack_cols(v + (ks * H + h) * Dv, H * Dv, lk, Dv, Lkp, vt.data(), dvb.data(), Dvp);  // dvb: scratch here
      std::fill(dkb.begin(), dkb.begin() + lk * Dp, 0.0f);
      std::fill(dvb.begin(), dvb.begin() + lk * Dvp, 0.0f);
      for (int64_t i0 = 0; i0 < lq; i0 += kBlockM) {
        const int64_t m = std::min(kBlockM, lq - i0);
        pack_rows(q + ((qs + i0) * H + h) * D, H * D, m, D, Dp, qb.data());
        pack_rows(dout + ((qs + i0) * H + h) * Dv, H * Dv, m, Dv, Dvp, dob.data());
        for (int64_t r = 0; r < m; ++r) {  // delta_i = dO_i . O_i
          const T* o = out + ((qs + i0 + r) * H + h) * Dv;
          float s = 0.0f;
          for (int64_t c = 0; c < Dv; ++c) s += dob[r * Dvp + c] * static_cast<float>(o[c]);
          delta[r] = s;
        }
        gemm(m, Lkp, D, qb.data(), Dp, kt.data(), Lkp, pb.data(), Lkp, false);      // S
        gemm(m, Lkp, Dv, dob.data(), Dvp, vt.data(), Lkp, dpb.data(), Lkp, false);  // dP = dO V^T
        for (int64_t r = 0; r < m; ++r) {
          const int64_t i = i0 + r;
          float* s = pb.data() + r * Lkp;
          float* dp = dpb.data() + r * Lkp;
          const int64_t vis = mask_row(g, b, i, lk, s);
          const float l = lse[g.lse_index(b, h, i)];
          if (vis == 0 || std::isinf(l)) {
            std::fill(s, s + Lkp, 0.0f);
            std::fill(dp, dp + Lkp, 0.0f);
            continue;
          }
          const Vec vl(l), vd(delta[r]), vsc(g.scale);
          if (dropout) dropout_row(g.seed, thr, dscale, ((b * H + h) * g.max_q + i) * g.max_k, vis, drop.data());
          // s <- P (dropped, for dV), dp <- dS = P * (dP * drop - delta) * scale
          vloop(vis, [&](int64_t j, int64_t c) {
            const Vec pr = (ld(s + j, c) - vl).exp_u20();
            Vec dpv = ld(dp + j, c);
            Vec pd = pr;
            if (dropout) {
              const Vec dr = ld(drop.data() + j, c);
              dpv = dpv * dr;
              pd = pr * dr;
            }
            st(pd, s + j, c);
            st(pr * (dpv - vd) * vsc, dp + j, c);
          });
          std::fill(s + vis, s + Lkp, 0.0f);
          std::fill(dp + vis, dp + Lkp, 0.0f);
        }
        // dV += Pd^T dO ; dK += dS^T Q ; dQ = dS K
        transpose(pb.data(), m, lk, Lkp, tb.data(), kBlockM);
        gemm(lk, Dvp, m, tb.data(), kBlockM, dob.data(), Dvp, dvb.data(), Dvp, true);
        transpose(dpb.data(), m, lk, Lkp, tb.data(), kBlockM);
        gemm(lk, Dp, m, tb.data(), kBlockM, qb.data(), Dp, dkb.data(), Dp, true);
        gemm(m, Dp, lk, dpb.data(), Lkp, kr.data(), Dp, dqb.data(), Dp, false);
        for (int64_t r = 0; r < m; ++r) {
          T* o = dq + ((qs + i0 + r) * H + h) * D;
          for (int64_t c = 0; c < D; ++c) o[c] = static_cast<T>(dqb[r * Dp + c]);
        }
      }
      for (int64_t j = 0; j < lk; ++j) {
        T* ok = dk + ((ks + j) * H + h) * D;
        T* ov = dv + ((ks + j) * H + h) * Dv;
        for (int64_t c = 0; c < D; ++c) ok[c] = static_cast<T>(dkb[j * Dp + c]);
        for (int64_t c = 0; c < Dv; ++c) ov[c] = static_cast<T>(dvb[j * Dvp + c]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& out_,
    const at::Tensor& lse_, const std::optional<at::Tensor>& key_bias, const std::optional<at::Tensor>& cu_q,
    const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, double p, double scale, bool causal,
    int64_t seed) {
  const at::Tensor q = q_.contiguous(), k = k_.contiguous().to(q.scalar_type()), v = v_.contiguous().to(q.scalar_type());
  const at::Tensor dout = dout_.contiguous().to(q.scalar_type()), out = out_.contiguous().to(q.scalar_type());
  const at::Tensor lse = lse_.contiguous().to(at::kFloat);
  at::Tensor kb, cq, ck;
  std::vector<int64_t> klen;
  const Geometry g =
      make_geometry(q, k, v, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed, kb, cq, ck, klen);
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  BERTFAST_DISPATCH(q.scalar_type(), "attention backward", [&] {
    attn_bwd_kernel<scalar_t>(g, dout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                              v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<float>(),
                              dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace bertfast_cpu

TORCH_LIBRARY_FRAGMENT(bertfast, m) {
  m.def(
      "attention_cpu_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_bias, Tensor? cu_q, Tensor? cu_k, int max_q, "
      "int max_k, float p, float scale, bool causal, int seed) -> (Tensor, Tensor)");
  m.def(
      "attention_cpu_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_bias, "
      "Tensor? cu_q, Tensor? cu_k, int max_q, int max_k, float p, float scale, bool causal, int seed) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bertfast, CPU, m) {
  m.impl("attention_cpu_fwd", &bertfast_cpu::attn_fwd);
  m.impl("attention_cpu_bwd", &bertfast_cpu::attn_bwd);
}
