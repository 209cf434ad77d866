// embedding_layernorm: out = dropout(LN(word[ids] + type[tt] + pos[pos_ids])), BERT's embeddings.
//
// Forward: per row, three row gathers summed in fp32 in Hugging Face's order ((word + type) +
// pos), LayerNorm, dropout, one write. Backward in two passes:
//   A. per row (parallel over fixed row chunks): recompute h, dh = LN backward of the
//      (dropout-masked) gradient, kept as fp32 rows; dweight / dbias partials per chunk.
//   B. scatter dh into the three tables, parallel over *columns*: every task walks all rows in
//      order for its column range, so repeated ids accumulate in row order whatever the thread
//      count (deterministic, no atomics, no sort).
#include "common.h"

namespace bertfast_cpu {
namespace {

at::Tensor ids_i64(const at::Tensor& ids, int64_t table_rows, const char* name) {
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, name, " must be int32 or int64");
  at::Tensor out = ids.reshape({-1}).to(at::kLong).contiguous();
  const int64_t* p = out.data_ptr<int64_t>();
  for (int64_t i = 0, N = out.numel(); i < N; ++i) {
    TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < table_rows, name, " must be in [0, ", table_rows, "), got ", p[i]);
  }
  return out;
}

// The next token's word row is a random row of a table far larger than the caches: fetching it
// while the current row is normalised hides the miss (before and after:
// benchmarks/results/cpu-2026-11-26-b/NOTES.md).
template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0, bytes = n * static_cast<int64_t>(sizeof(T)); off < bytes; off += 64) {
    __builtin_prefetch(p + off, 0, 3);
  }
}

// h = (word + type) + pos for one row, fp32, from rows of T.
template <typename T>
inline void emb_h(const T* wr, const T* tr, const T* pr, float* bw, float* bt, float* bp, int64_t n, float* h) {
  const float* a = load_row(wr, bw, n);
  const float* b = load_row(tr, bt, n);
  const float* c = load_row(pr, bp, n);
  vloop(n, [&](int64_t i, int64_t cn) { st((ld(a + i, cn) + ld(b + i, cn)) + ld(c + i, cn), h + i, cn); });
}

template <typename T>
void emb_fwd_kernel(const int64_t* ids, const int64_t* tt, const int64_t* pos, const T* word, const T* pe,
                    const T* te, const float* w, const float* b, T* out, float* mean, float* rstd, int64_t N,
                    int64_t n, float eps, double p, int64_t seed) {
  const bool dropout = p > 0.0;
  const uint32_t thr = dropout_threshold(p);
  const float scale = dropout_scale(p);
  at::parallel_for(0, N, row_grain(n), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(2 * n);
    float *h = buf.data(), *drop = h + n;
    for (int64_t r = r0; r < r1; ++r) {
      const T* wr = word + ids[r] * n;
      const T* tr = te + tt[r] * n;
      const T* pr = pe + pos[r] * n;
      if (r + 1 < r1) prefetch_row(word + ids[r + 1] * n, n);
      Vec sum(0.0f);
      vloop(n, [&](int64_t i, int64_t c) {
        const Vec v = (ldT(wr + i, c) + ldT(tr + i, c)) + ldT(pr + i, c);  // HF's order
        st(v, h + i, c);
        sum += v;
      });
      float m, rs;
      stats_from_sum(h, n, sum, eps, m, rs);
      mean[r] = m;
      rstd[r] = rs;
      if (dropout) dropout_row(static_cast<uint64_t>(seed), thr, scale, r * n, n, drop);
      ln_apply_store(h, w, b, m, rs, n, dropout ? static_cast<const float*>(drop) : nullptr, out + r * n);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emb_fwd(const at::Tensor& ids_, const at::Tensor& tt_,
                                                       const at::Tensor& pos_, const at::Tensor& word_,
                                                       const at::Tensor& pe_, const at::Tensor& te_,
                                                       const at::Tensor& weight, const at::Tensor& bias, double eps,
                                                       double p, int64_t seed) {
  check_rows(word_, "word_emb");
  const at::Tensor word = word_.contiguous(), pe = pe_.contiguous().to(word.scalar_type()),
                   te = te_.contiguous().to(word.scalar_type());
  const int64_t n = word.size(1);
  const at::Tensor ids = ids_i64(ids_, word.size(0), "input_ids"), tt = ids_i64(tt_, te.size(0), "token_type_ids"),
                   pos = ids_i64(pos_, pe.size(0), "position_ids");
  const int64_t N = ids.numel();
  TORCH_CHECK(tt.numel() == N && pos.numel() == N, "ids, token_type_ids and position_ids must have one length");
  const at::Tensor w = vec_f32(weight), b = vec_f32(bias);
  at::Tensor out = new_output({N, n}, word.options());
  at::Tensor mean = at::empty({N}, word.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({N}, word.options().dtype(at::kFloat));
  BERTFAST_DISPATCH(word.scalar_type(), "embedding_layernorm", [&] {
    emb_fwd_kernel<scalar_t>(ids.data_ptr<int64_t>(), tt.data_ptr<int64_t>(), pos.data_ptr<int64_t>(),
                             word.data_ptr<scalar_t>(), pe.data_ptr<scalar_t>(), te.data_ptr<scalar_t>(),
                             w.data_ptr<float>(), b.data_ptr<float>(), out.data_ptr<scalar_t>(),
                             mean.data_ptr<float>(), rstd.data_ptr<float>(), N, n, static_cast<float>(eps), p, seed);
  });
  return {out, mean, rstd};
}

// Where the rows of dh accumulate for one table: fp32 tables accumulate in place; other dtypes
// accumulate in fp32 over the distinct ids only (compact rows), then round once into the table.
template <typename T>
struct ScatterTarget {
  at::Tensor out;           // (table_rows, n) in T, zero-filled
  at::Tensor acc;           // fp32 accumulator: out itself for fp32, else (distinct ids, n)
  std::vector<int64_t> row_of;   // accumulator row of each dh row
  std::vector<int64_t> id_of;    // table row of each accumulator row (non-fp32 only)

  ScatterTarget(const int64_t* ids, int64_t N, int64_t table_rows, int64_t n, const at::TensorOptions& opts) {
    out = at::zeros({table_rows, n}, opts);
    row_of.resize(N);
    if constexpr (std::is_same_v<T, float>) {
      acc = out;
      std::copy(ids, ids + N, row_of.begin());
    } else {
      std::vector<int64_t> slot(table_rows, -1);
      for (int64_t r = 0; r < N; ++r) {
        if (slot[ids[r]] < 0) {
          slot[ids[r]] = static_cast<int64_t>(id_of.size());
          id_of.push_back(ids[r]);
        }
        row_of[r] = slot[ids[r]];
      }
      acc = at::zeros({static_cast<int64_t>(id_of.size()), n}, opts.dtype(at::kFloat));
    }
  }

  void finish(int64_t n) {
    if constexpr (!std::is_same_v<T, float>) {
      const float* a = acc.template data_ptr<float>();
      T* o = out.template data_ptr<T>();
      at::parallel_for(0, static_cast<int64_t>(id_of.size()), row_grain(n), [&](int64_t s0, int64_t s1) {
        for (int64_t s = s0; s < s1; ++s) store_row(a + s * n, o + id_of[s] * n, n);
      });
    }
  }
};

template <typename T>
void emb_bwd_rows(const T* dout, const int64_t* ids, const int64_t* tt, const int64_t* pos, const T* word,
                  const T* pe, const T* te, const float* w, const float* mean, const float* rstd, float* dh,
                  float* partial, int64_t N, int64_t n, double p, int64_t seed) {
  const bool dropout = p > 0.0;
  const uint32_t thr = dropout_threshold(p);
  const float scale = dropout_scale(p);
  const Chunks ch(N);
  at::parallel_for(0, ch.count, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> buf(6 * n);
    float *bw = buf.data(), *bt = bw + n, *bp = bt + n, *h = bp + n, *bd = h + n, *drop = bd + n;
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      float* dw = partial + chunk * 2 * n;
      float* db = dw + n;
      std::fill(dw, dw + 2 * n, 0.0f);
      const int64_t rend = std::min(N, (chunk + 1) * ch.size);
      for (int64_t r = chunk * ch.size; r < rend; ++r) {
        if (r + 1 < rend) prefetch_row(word + ids[r + 1] * n, n);
        emb_h(word + ids[r] * n, te + tt[r] * n, pe + pos[r] * n, bw, bt, bp, n, h);
        const float* d0 = load_row(dout + r * n, bd, n);
        const float* dy = d0;
        if (dropout) {
          dropout_row(static_cast<uint64_t>(seed), thr, scale, r * n, n, drop);
          vloop(n, [&](int64_t i, int64_t c) { st(ld(d0 + i, c) * ld(drop + i, c), drop + i, c); });
          dy = drop;
        }
        ln_bwd_row(h, dy, w, mean[r], rstd[r], n, dh + r * n, dw, db);
      }
    }
  });
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> emb_scatter(const float* dh, const int64_t* ids, const int64_t* tt,
                                                           const int64_t* pos, int64_t N, int64_t n,
                                                           int64_t word_rows, int64_t pos_rows, int64_t type_rows,
                                                           const at::TensorOptions& opts) {
  ScatterTarget<T> tw(ids, N, word_rows, n, opts), tp(pos, N, pos_rows, n, opts), tt_(tt, N, type_rows, n, opts);
  float* aw = tw.acc.template data_ptr<float>();
  float* ap = tp.acc.template data_ptr<float>();
  float* at_ = tt_.acc.template data_ptr<float>();
  const int64_t grain = std::max<int64_t>(16, (16384 + N - 1) / std::max<int64_t>(N, 1));
  at::parallel_for(0, n, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t r = 0; r < N; ++r) {
      const float* d = dh + r * n;
      float* x0 = aw + tw.row_of[r] * n;
      float* x1 = ap + tp.row_of[r] * n;
      float* x2 = at_ + tt_.row_of[r] * n;
      for (int64_t i = c0; i < c1; i += kVec) {
        const int64_t c = std::min<int64_t>(kVec, c1 - i);
        const Vec v = ld(d + i, c);
        st(ld(x0 + i, c) + v, x0 + i, c);
        st(ld(x1 + i, c) + v, x1 + i, c);
        st(ld(x2 + i, c) + v, x2 + i, c);
      }
    }
  });
  tw.finish(n);
  tp.finish(n);
  tt_.finish(n);
  return {tw.out, tp.out, tt_.out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emb_bwd(
    const at::Tensor& dout_, const at::Tensor& ids_, const at::Tensor& tt_, const at::Tensor& pos_,
    const at::Tensor& word_, const at::Tensor& pe_, const at::Tensor& te_, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean_, const at::Tensor& rstd_, double eps, double p, int64_t seed) {
  (void)eps;
  check_rows(word_, "word_emb");
  const at::Tensor word = word_.contiguous(), pe = pe_.contiguous().to(word.scalar_type()),
                   te = te_.contiguous().to(word.scalar_type());
  const int64_t n = word.size(1);
  const at::Tensor ids = ids_i64(ids_, word.size(0), "input_ids"), tt = ids_i64(tt_, te.size(0), "token_type_ids"),
                   pos = ids_i64(pos_, pe.size(0), "position_ids");
  const int64_t N = ids.numel();
  const at::Tensor dout = dout_.contiguous().to(word.scalar_type());
  TORCH_CHECK(dout.numel() == N * n, "dout must be (tokens, hidden)");
  const at::Tensor mean = mean_.contiguous().to(at::kFloat), rstd = rstd_.contiguous().to(at::kFloat);
  const at::Tensor w = vec_f32(weight);
  const Chunks ch(N);
  at::Tensor partial = at::zeros({std::max<int64_t>(ch.count, 1), 2, n}, word.options().dtype(at::kFloat));
  at::Tensor dh = at::empty({N, n}, word.options().dtype(at::kFloat));
  std::tuple<at::Tensor, at::Tensor, at::Tensor> tables;
  BERTFAST_DISPATCH(word.scalar_type(), "embedding_layernorm backward", [&] {
    emb_bwd_rows<scalar_t>(dout.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), tt.data_ptr<int64_t>(),
                           pos.data_ptr<int64_t>(), word.data_ptr<scalar_t>(), pe.data_ptr<scalar_t>(),
                           te.data_ptr<scalar_t>(), w.data_ptr<float>(), mean.data_ptr<float>(),
                           rstd.data_ptr<float>(), dh.data_ptr<float>(), partial.data_ptr<float>(), N, n, p, seed);
    tables = emb_scatter<scalar_t>(dh.data_ptr<float>(), ids.data_ptr<int64_t>(), tt.data_ptr<int64_t>(),
                                   pos.data_ptr<int64_t>(), N, n, word.size(0), pe.size(0), te.size(0),
                                   word.options());
  });
  const at::Tensor sums = sum_chunks(partial);
  return {std::get<0>(tables), std::get<1>(tables).to(pe_.scalar_type()), std::get<2>(tables).to(te_.scalar_type()),
          sums[0].to(weight.scalar_type()), sums[1].to(bias.scalar_type())};
}

}  // namespace
}  // namespace bertfast_cpu

TORCH_LIBRARY_FRAGMENT(bertfast, m) {
  m.def(
      "embedding_layernorm_cpu_fwd(Tensor ids, Tensor tt, Tensor pos, Tensor word, Tensor pos_emb, Tensor type_emb, "
      "Tensor weight, Tensor bias, float eps, float p, int seed) -> (Tensor, Tensor, Tensor)");
  m.def(
      "embedding_layernorm_cpu_bwd(Tensor dout, Tensor ids, Tensor tt, Tensor pos, Tensor word, Tensor pos_emb, "
      "Tensor type_emb, Tensor weight, Tensor bias, Tensor mean, Tensor rstd, float eps, float p, int seed) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bertfast, CPU, m) {
  m.impl("embedding_layernorm_cpu_fwd", &bertfast_cpu::emb_fwd);
  m.impl("embedding_layernorm_cpu_bwd", &bertfast_cpu::emb_bwd);
}
