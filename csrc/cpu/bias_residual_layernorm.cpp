// bias_residual_layernorm: out = LN(dropout(x + bias) + residual), BERT's add-and-norm.
//
// Forward: one pass over x and residual per row (the fp32 row h stays in L1 for the two
// statistics passes and the normalisation). Backward: recompute h from x, bias, residual and
// the dropout seed (no saved activations besides mean/rstd), one pass per row writing dx and
// dresidual; weight/bias gradients are reduced per fixed row chunk (see Chunks).
#include "common.h"

namespace bertfast_cpu {
namespace {

// h = dropout(x + bias) + residual for one row, in fp32. drop: per-element scale or nullptr.
inline void brl_h(const float* x, const float* bias, const float* res, const float* drop, int64_t n, float* h) {
  vloop(n, [&](int64_t i, int64_t c) {
    Vec v = ld(x + i, c);
    if (bias) v = v + ld(bias + i, c);
    if (drop) v = v * ld(drop + i, c);
    st(v + ld(res + i, c), h + i, c);
  });
}

template <typename T>
void brl_fwd_kernel(const T* x, const float* bias, const T* res, const float* w, const float* lb, T* out,
                    float* mean, float* rstd, int64_t rows, int64_t n, float eps, double p, int64_t seed) {
  const bool dropout = p > 0.0;
  const uint32_t thr = dropout_threshold(p);
  const float scale = dropout_scale(p);
  at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(2 * n);
    float *h = buf.data(), *drop = h + n;
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * n;
      const T* rr = res + r * n;
      if (dropout) dropout_row(static_cast<uint64_t>(seed), thr, scale, r * n, n, drop);
      // h = dropout(x + bias) + residual, and its sum, in one pass over the inputs
      Vec sum(0.0f);
      vloop(n, [&](int64_t i, int64_t c) {
        Vec v = ldT(xr + i, c);
        if (bias) v = v + ld(bias + i, c);
        if (dropout) v = v * ld(drop + i, c);
        v = v + ldT(rr + i, c);
        st(v, h + i, c);
        sum += v;
      });
      float m, rs;
      stats_from_sum(h, n, sum, eps, m, rs);
      mean[r] = m;
      rstd[r] = rs;
      ln_apply_store(h, w, lb, m, rs, n, static_cast<const float*>(nullptr), out + r * n);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> brl_fwd(const at::Tensor& x_, const std::optional<at::Tensor>& bias_,
                                                       const at::Tensor& res_, const at::Tensor& weight,
                                                       const at::Tensor& ln_bias, double eps, double p, int64_t seed,
                                                       bool inplace) {
  check_rows(x_, "x");
  const at::Tensor x = x_.contiguous(), res = res_.contiguous();
  TORCH_CHECK(res.sizes() == x.sizes() && res.scalar_type() == x.scalar_type(), "residual must match x");
  const int64_t rows = x.size(0), n = x.size(1);
  const bool has_bias = bias_.has_value() && bias_->defined();
  const at::Tensor w = vec_f32(weight), lb = vec_f32(ln_bias);
  const at::Tensor b = has_bias ? vec_f32(*bias_) : at::Tensor();
  // inplace: the output overwrites x (a GEMM result nothing else reads, in inference): no
  // fresh allocation, whose first-touch page faults cost more than the kernel at these sizes.
  // Safe row by row: a row of x is read into the fp32 buffer before that row is written.
  at::Tensor out = inplace && x.is_same(x_) ? x_ : new_output_like(x);
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  BERTFAST_DISPATCH(x.scalar_type(), "bias_residual_layernorm", [&] {
    brl_fwd_kernel<scalar_t>(x.data_ptr<scalar_t>(), has_bias ? b.data_ptr<float>() : nullptr,
                             res.data_ptr<scalar_t>(), w.data_ptr<float>(), lb.data_ptr<float>(),
                             out.data_ptr<scalar_t>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, n,
                             static_cast<float>(eps), p, seed);
  });
  return {out, mean, rstd};
}

template <typename T>
void brl_bwd_kernel(const T* dout, const T* x, const float* bias, const T* res, const float* w, const float* mean,
                    const float* rstd, T* dx, T* dres, float* partial, int64_t rows, int64_t n, double p,
                    int64_t seed) {
  const bool dropout = p > 0.0;
  const uint32_t thr = dropout_threshold(p);
  const float scale = dropout_scale(p);
  const Chunks ch(rows);
  // partial: (chunks, 3, n) = dweight, dln_bias, dbias per chunk
  at::parallel_for(0, ch.count, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> buf(6 * n);
    float *bx = buf.data(), *br = bx + n, *bd = br + n, *h = bd + n, *dh = h + n, *drop = dh + n;
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      float* dw = partial + chunk * 3 * n;
      float *dlb = dw + n, *db = dlb + n;
      std::fill(dw, dw + 3 * n, 0.0f);
      const int64_t rend = std::min(rows, (chunk + 1) * ch.size);
      for (int64_t r = chunk * ch.size; r < rend; ++r) {
        const float* xr = load_row(x + r * n, bx, n);
        const float* rr = load_row(res + r * n, br, n);
        const float* dy = load_row(dout + r * n, bd, n);
        if (dropout) dropout_row(static_cast<uint64_t>(seed), thr, scale, r * n, n, drop);
        brl_h(xr, bias, rr, dropout ? drop : nullptr, n, h);
        ln_bwd_row(h, dy, w, mean[r], rstd[r], n, dh, dw, dlb);
        // dresidual = dh; dx = dh * mask; dbias += dx
        store_row(dh, dres + r * n, n);
        if (dropout) vloop(n, [&](int64_t i, int64_t c) { st(ld(dh + i, c) * ld(drop + i, c), dh + i, c); });
        if (bias) vloop(n, [&](int64_t i, int64_t c) { st(ld(db + i, c) + ld(dh + i, c), db + i, c); });
        store_row(dh, dx + r * n, n);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> brl_bwd(
    const at::Tensor& dout_, const at::Tensor& x_, const std::optional<at::Tensor>& bias_, const at::Tensor& res_,
    const at::Tensor& weight, const at::Tensor& ln_bias, const at::Tensor& mean_, const at::Tensor& rstd_,
    double eps, double p, int64_t seed) {
  (void)eps;
  check_rows(x_, "x");
  const at::Tensor x = x_.contiguous(), res = res_.contiguous(), dout = dout_.contiguous().to(x.scalar_type());
  const at::Tensor mean = mean_.contiguous().to(at::kFloat), rstd = rstd_.contiguous().to(at::kFloat);
  const int64_t rows = x.size(0), n = x.size(1);
  const bool has_bias = bias_.has_value() && bias_->defined();
  const at::Tensor w = vec_f32(weight);
  const at::Tensor b = has_bias ? vec_f32(*bias_) : at::Tensor();
  at::Tensor dx = new_output_like(x), dres = new_output_like(res);
  const Chunks ch(rows);
  at::Tensor partial = at::empty({std::max<int64_t>(ch.count, 1), 3, n}, x.options().dtype(at::kFloat));
  if (ch.count == 0) partial.zero_();
  BERTFAST_DISPATCH(x.scalar_type(), "bias_residual_layernorm backward", [&] {
    brl_bwd_kernel<scalar_t>(dout.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                             has_bias ? b.data_ptr<float>() : nullptr, res.data_ptr<scalar_t>(), w.data_ptr<float>(),
                             mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr<scalar_t>(),
                             dres.data_ptr<scalar_t>(), partial.data_ptr<float>(), rows, n, p, seed);
  });
  const at::Tensor sums = sum_chunks(partial);
  // no bias: an empty placeholder (the Python wrapper returns None for it)
  at::Tensor dbias = has_bias ? sums[2].to(bias_->scalar_type()) : at::empty({0}, x.options());
  return {dx, dbias, dres, sums[0].to(weight.scalar_type()), sums[1].to(ln_bias.scalar_type())};
}

}  // namespace
}  // namespace bertfast_cpu

TORCH_LIBRARY_FRAGMENT(bertfast, m) {
  m.def(
      "bias_residual_layernorm_cpu_fwd(Tensor x, Tensor? bias, Tensor residual, Tensor weight, Tensor ln_bias, "
      "float eps, float p, int seed, bool inplace=False) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bias_residual_layernorm_cpu_bwd(Tensor dout, Tensor x, Tensor? bias, Tensor residual, Tensor weight, "
      "Tensor ln_bias, Tensor mean, Tensor rstd, float eps, float p, int seed) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bertfast, CPU, m) {
  m.impl("bias_residual_layernorm_cpu_fwd", &bertfast_cpu::brl_fwd);
  m.impl("bias_residual_layernorm_cpu_bwd", &bertfast_cpu::brl_bwd);
}
