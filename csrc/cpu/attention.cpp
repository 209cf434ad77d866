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
#include <ATen/cpu/vec/functional.h>

#include "common.h"

namespace bertfast_cpu {
namespace {

constexpr int64_t kBlockM = 72;  // queries per block (a multiple of the GEMM row blocks): S (72 x Lk) stays in L2

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

// Register blocking: MR rows x NV vectors of accumulators, sized to the register file (32
// vector registers with AVX-512, 16 with AVX2): 24 (12) accumulators, NV loads of B and one
// broadcast of A per k. Column panels of 4 vectors serve S = Q K^T (N = keys); panels of 2 or 1
// vectors serve O = P V and the backward's products with head_dim 32/64 columns, where tall row
// blocks keep the FMA units busy (with 8 accumulators they wait on load latency; before and
// after: benchmarks/results/cpu-2026-11-26-c/NOTES.md).
constexpr int kWideRegs = kVec >= 16;
constexpr int kMR4 = kWideRegs ? 6 : 3;   // rows with 4-vector panels
constexpr int kMR2 = kWideRegs ? 12 : 6;  // rows with 2-vector panels
constexpr int kMR1 = kWideRegs ? 12 : 8;  // rows with 1-vector panels

// rows [0, M) of one column panel: full MR blocks, then the remaining rows as one smaller block
template <int MR, int NV>
inline void panel_rows(int64_t M, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                       int64_t ldc, bool acc) {
  int64_t i = 0;
  for (; i + MR <= M; i += MR) micro<MR, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, acc);
  if constexpr (MR > 1) {
    const int64_t rest = M - i;
    if (rest > 0) {
      constexpr int kHalf = MR / 2;
      if (rest >= kHalf) {
        micro<kHalf, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, acc);
        i += kHalf;
      }
      panel_rows<(kHalf > 1 ? kHalf : 1), NV>(M - i, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, acc);
    }
  }
}

// C (M x N) (+)= A (M x K) * B (K x N), fp32, N a multiple of kVec (panels are zero padded).
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool acc) {
  int64_t j = 0;
  for (; j + 4 * kVec <= N; j += 4 * kVec) panel_rows<kMR4, 4>(M, K, A, lda, B + j, ldb, C + j, ldc, acc);
  for (; j + 2 * kVec <= N; j += 2 * kVec) panel_rows<kMR2, 2>(M, K, A, lda, B + j, ldb, C + j, ldc, acc);
  for (; j < N; j += kVec) panel_rows<kMR1, 1>(M, K, A, lda, B + j, ldb, C + j, ldc, acc);
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

// dst[c * ld + r] = src[r * stride + c] for r < rows, c < cols, in 16 x 16 tiles transposed in
// registers (ATen's transpose_mxn: masked loads, shuffles; a scalar loop where the ISA has no
// such kernel). The scalar element-by-element transpose of K was ~10% of the forward's time.
inline void transpose_into(const float* src, int64_t stride, int64_t rows, int64_t cols, float* dst, int64_t ld) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int m = static_cast<int>(std::min<int64_t>(16, rows - r0));
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int n = static_cast<int>(std::min<int64_t>(16, cols - c0));
      at::vec::transpose_mxn<float>(src + r0 * stride + c0, stride, dst + c0 * ld + r0, ld, m, n);
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

// pack_cols without the row copy (the forward needs no K rows): fp32 rows are transposed
// straight from their strided source.
template <typename T>
inline void pack_cols_only(const T* base, int64_t stride, int64_t rows, int64_t d, int64_t ld, float* dst,
                           float* rows_buf, int64_t ld_rows) {
  if constexpr (std::is_same<T, float>::value) {
    for (int64_t c = 0; c < d; ++c) std::fill(dst + c * ld + rows, dst + (c + 1) * ld, 0.0f);
    transpose_into(base, stride, rows, d, dst, ld);
  } else {
    pack_cols(base, stride, rows, d, ld, dst, rows_buf, ld_rows);
  }
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
  int64_t sq, sk, sv;  // token (row) strides of q, k, v in elements; heads are packed within a row
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

// Horizontal max / sum as a log2(kVec)-step shuffle tree (ATen's vec_reduce_all): a row of BERT
// scores is only a few vectors long, and a scalar chain over 16 lanes cost as much as its exps.
inline float tree_max(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, v);
}
inline float tree_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, v);
}

// Scores row i (local index, raw Q K^T) -> exp(scale * s + key_bias - max), unnormalised, in
// place, zeros past the keys the row sees; two passes (max, then exp and sum) with the scale and
// bias applied on the fly. Returns the sum l and sets *mx (the row's max scaled score); a row that
// sees no key returns l = 0 and leaves zeros.
inline float softmax_row_unnormalised(const Geometry& g, int64_t b, int64_t i, int64_t lk, int64_t Lkp, float* s,
                                      float* mx_out) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  int64_t vis = lk;
  if (g.causal) vis = std::max<int64_t>(0, std::min<int64_t>(lk, i + g.causal_shift(b) + 1));
  const float* kb = g.key_bias ? g.key_bias + b * g.max_k : nullptr;
  const Vec vs(g.scale);
  Vec vm(kNegInf);
  float mx;
  if (kb) {
    vloop(vis, [&](int64_t j, int64_t c) {
      Vec x = ld(s + j, c) * vs + ld(kb + j, c);
      if (c != kVec) x = Vec::set(Vec(kNegInf), x, c);
      vm = at::vec::maximum(vm, x);
    });
    mx = tree_max(vm);
  } else {  // scale > 0: the max of the raw scores, scaled once
    vloop(vis, [&](int64_t j, int64_t c) {
      Vec x = ld(s + j, c);
      if (c != kVec) x = Vec::set(Vec(kNegInf), x, c);
      vm = at::vec::maximum(vm, x);
    });
    mx = tree_max(vm) * g.scale;
  }
  *mx_out = mx;
  if (vis == 0 || mx == kNegInf) {
    std::fill(s, s + Lkp, 0.0f);
    return 0.0f;
  }
  const Vec nmx(-mx);
  Vec acc(0.0f);
  vloop(vis, [&](int64_t j, int64_t c) {
    const Vec x = kb ? ld(s + j, c) * vs + ld(kb + j, c) + nmx : at::vec::fmadd(ld(s + j, c), vs, nmx);
    Vec e = x.exp_u20();
    if (c != kVec) e = Vec::set(Vec(0.0f), e, c);
    st(e, s + j, c);
    acc += e;
  });
  std::fill(s + vis, s + Lkp, 0.0f);
  return tree_sum(acc);
}

template <typename T>
void attn_fwd_kernel(const Geometry& g, const T* q, const T* k, const T* v, T* out, float* lse) {
  const int64_t H = g.H, D = g.D, Dv = g.Dv;
  const int64_t Dvp = round_up(Dv, kVec), Lkp_max = round_up(std::max<int64_t>(g.max_k, 1), 2 * kVec);
  const bool dropout = g.p > 0.0;
  const uint32_t thr = dropout_threshold(g.p);
  const float dscale = dropout_scale(g.p);
  // fp32 Q is read and O written in place (token stride sq / H * Dv); other dtypes, and O rows
  // that are not whole vectors, go through fp32 row buffers. K and V are always packed: read in
  // place at the token stride of a fused QKV tensor (4.6 KB for MiniLM), V's rows for O = P V map
  // to a few L1 sets and evict each other (that GEMM ran 20% slower than from a packed copy).
  constexpr bool kF32 = std::is_same<T, float>::value;
  const bool direct_o = kF32 && Dv % kVec == 0;
  // task t -> (b = t % B, h = t / B): the two halves of the range each get every sequence,
  // which balances uneven sequence lengths across threads.
  at::parallel_for(0, g.B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> kt(D * Lkp_max), kr(g.max_k * D + kVec), vp(g.max_k * Dvp + kVec), qb(kF32 ? 0 : kBlockM * D),
        sb(kBlockM * Lkp_max), ob(direct_o ? 0 : kBlockM * Dvp), drop(Lkp_max), inv_l(kBlockM), row_mx(kBlockM),
        row_l(kBlockM);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t % g.B, h = t / g.B;
      const int64_t lq = g.len_q(b), lk = g.len_k(b), qs = g.q_start(b), ks = g.k_start(b);
      if (lq <= 0) continue;
      const int64_t Lkp = round_up(std::max<int64_t>(lk, 1), 2 * kVec);
      pack_cols_only(k + ks * g.sk + h * D, g.sk, lk, D, Lkp, kt.data(), kr.data(), D);
      pack_rows(v + ks * g.sv + h * Dv, g.sv, lk, Dv, Dvp, vp.data());
      for (int64_t i0 = 0; i0 < lq; i0 += kBlockM) {
        const int64_t m = std::min(kBlockM, lq - i0);
        const float* qa;
        if constexpr (kF32) {
          qa = reinterpret_cast<const float*>(q + (qs + i0) * g.sq + h * D);
        } else {
          pack_rows(q + (qs + i0) * g.sq + h * D, g.sq, m, D, D, qb.data());
          qa = qb.data();
        }
        gemm(m, Lkp, D, qa, kF32 ? g.sq : D, kt.data(), Lkp, sb.data(), Lkp, false);
        for (int64_t r = 0; r < m; ++r) {
          const int64_t i = i0 + r;
          float* s = sb.data() + r * Lkp;
          const float l = softmax_row_unnormalised(g, b, i, lk, Lkp, s, &row_mx[r]);
          row_l[r] = l;
          if (l == 0.0f) continue;  // sees no key: zeros out, lse = +inf (below)
          if (dropout) {  // dropped probabilities; l stays the undropped sum
            dropout_row(g.seed, thr, dscale, ((b * H + h) * g.max_q + i) * g.max_k, lk, drop.data());
            vloop(lk, [&](int64_t j, int64_t c) { st(ld(s + j, c) * ld(drop.data() + j, c), s + j, c); });
          }
        }
        // lse = max + log(l) for the block's rows at once (a vector log instead of m scalar ones)
        vloop(m, [&](int64_t r, int64_t c) {
          const Vec l = ld(row_l.data() + r, c);
          const auto seen = l > Vec(0.0f);
          const Vec lse_v = Vec::blendv(Vec(std::numeric_limits<float>::infinity()), ld(row_mx.data() + r, c) + l.log(), seen);
          st(Vec::blendv(Vec(0.0f), Vec(1.0f) / l, seen), inv_l.data() + r, c);
          st(lse_v, lse + g.lse_index(b, h, i0 + r), c);  // consecutive queries: consecutive lse
        });
        // O = (E V) / l: the 1/l of each row is applied to its Dv outputs, not to its lk weights
        float* oc = direct_o ? reinterpret_cast<float*>(out + ((qs + i0) * H + h) * Dv) : ob.data();
        const int64_t ldo = direct_o ? H * Dv : Dvp;
        gemm(m, Dvp, lk, sb.data(), Lkp, vp.data(), Dvp, oc, ldo, false);
        for (int64_t r = 0; r < m; ++r) {
          const Vec inv(inv_l[r]);
          float* orow = oc + r * ldo;
          if (direct_o) {
            vloop(Dv, [&](int64_t c0, int64_t c) { st(ld(orow + c0, c) * inv, orow + c0, c); });
          } else {
            T* o = out + ((qs + i0 + r) * H + h) * Dv;
            for (int64_t c = 0; c < Dv; ++c) o[c] = static_cast<T>(orow[c] * inv_l[r]);
          }
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
  g.sq = q.stride(-3);
  g.sk = k.stride(-3);
  g.sv = v.stride(-3);
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
    TORCH_CHECK_VALUE(cuq_keep.numel() == cuk_keep.numel() && g.B >= 1, "cu_seqlens: expected (batch + 1,) offsets");
    TORCH_CHECK_VALUE(max_q >= 0 && max_k >= 0, "max_seqlen must be >= 0");
    // Every offset is read as a row index below: the Python entry checks them, this is the last
    // guard (O(batch)) between a caller's offsets and the memory they address.
    const int64_t totals[2] = {q.size(0), k.size(0)}, maxes[2] = {max_q, max_k};
    const int32_t* cus[2] = {g.cu_q, g.cu_k};
    for (int s = 0; s < 2; ++s) {
      const int32_t* cu = cus[s];
      TORCH_CHECK_VALUE(cu[0] == 0 && cu[g.B] == totals[s], "cu_seqlens must start at 0 and end at the number of "
                        "packed tokens (", totals[s], "), got ", cu[0], " .. ", cu[g.B]);
      for (int64_t b = 0; b < g.B; ++b) {
        TORCH_CHECK_VALUE(cu[b + 1] >= cu[b], "cu_seqlens must be non-decreasing, got ", cu[b], " then ", cu[b + 1]);
        TORCH_CHECK_VALUE(cu[b + 1] - cu[b] <= maxes[s], "max_seqlen (", maxes[s], ") must cover the longest "
                          "sequence: sequence ", b, " has ", cu[b + 1] - cu[b], " tokens");
      }
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

// The forward reads tokens as rows of (heads, head_dim) at any token stride: Q, K and V as views
// into one fused QKV projection ((tokens, 3, heads, head_dim) unbound) are used in place. Other
// layouts (a strided head_dim, heads not packed, batches not evenly spaced) are copied.
at::Tensor token_rows(const at::Tensor& t) {
  const int64_t n = t.dim();
  if (n < 3) return t.contiguous();  // make_geometry reports the rank
  bool ok = (t.size(-1) == 1 || t.stride(-1) == 1) && (t.size(-2) == 1 || t.stride(-2) == t.size(-1)) &&
            t.stride(-3) >= t.size(-2) * t.size(-1);
  if (n == 4) ok = ok && (t.size(0) == 1 || t.stride(0) == t.size(1) * t.stride(1));
  return ok ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor> attn_fwd(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                            const std::optional<at::Tensor>& key_bias,
                                            const std::optional<at::Tensor>& cu_q,
                                            const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
                                            double p, double scale, bool causal, int64_t seed) {
  const at::Tensor q = token_rows(q_), k = token_rows(k_.to(q_.scalar_type())), v = token_rows(v_.to(q_.scalar_type()));
  at::Tensor kb, cq, ck;
  std::vector<int64_t> klen;
  const Geometry g =
      make_geometry(q, k, v, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed, kb, cq, ck, klen);
  auto out_shape = q.sizes().vec();
  out_shape.back() = g.Dv;
  // every row of every sequence is written (rows that see no key as zeros); only rows outside
  // every sequence (varlen tokens before cu_q[0] or past cu_q[B], none in a well-formed batch)
  // are zeroed here
  at::Tensor out = new_output(out_shape, q.options());
  if (g.varlen) {
    const int64_t first = g.cu_q[0], last = g.cu_q[g.B];
    if (first > 0) out.narrow(0, 0, std::min<int64_t>(first, g.total_q)).zero_();
    if (last < g.total_q) out.narrow(0, last, g.total_q - last).zero_();
  }
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
        transpose_into(pb.data(), Lkp, m, lk, tb.data(), kBlockM);
        gemm(lk, Dvp, m, tb.data(), kBlockM, dob.data(), Dvp, dvb.data(), Dvp, true);
        transpose_into(dpb.data(), Lkp, m, lk, tb.data(), kBlockM);
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
