// gelu_layernorm: out = LN(GELU(x + bias)), the MLM head's transform.
//
// Forward: one read of x, one write of out per row (GELU output kept in an L1 row buffer).
// Backward: recompute pre = x + bias and GELU(pre) from x, one pass per row writing dx;
// dbias / dweight / dln_bias reduced per fixed row chunk (deterministic, see Chunks).
#include "common.h"

namespace bertfast_cpu {
namespace {

inline void gelu_row(const float* x, const float* bias, int64_t n, bool tanh_form, float* h) {
  if (tanh_form) {
    vloop4(n, [&](int64_t i, int64_t c) { st(gelu_tanh(ld(x + i, c) + ld(bias + i, c)), h + i, c); });
  } else {
    vloop4(n, [&](int64_t i, int64_t c) { st(gelu_erf(ld(x + i, c) + ld(bias + i, c)), h + i, c); });
  }
}

template <typename T>
void gln_fwd_kernel(const T* x, const float* bias, const float* w, const float* lb, T* out, float* mean,
                    float* rstd, int64_t rows, int64_t n, float eps, bool tanh_form) {
  at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(n);
    float* h = buf.data();
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * n;
      Vec sum(0.0f);
      vloop4(n, [&](int64_t i, int64_t c) {
        Vec v = gelu(ldT(xr + i, c) + ld(bias + i, c), tanh_form);
        if (c != kVec) v = Vec::set(Vec(0.0f), v, c);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> gln_fwd(const at::Tensor& x_, const at::Tensor& bias,
                                                       const at::Tensor& weight, const at::Tensor& ln_bias, double eps,
                                                       bool tanh_form) {
  check_rows(x_, "x");
  const at::Tensor x = x_.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  const at::Tensor b = vec_f32(bias), w = vec_f32(weight), lb = vec_f32(ln_bias);
  at::Tensor out = new_output_like(x);
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  BERTFAST_DISPATCH(x.scalar_type(), "gelu_layernorm", [&] {
    gln_fwd_kernel<scalar_t>(x.data_ptr<scalar_t>(), b.data_ptr<float>(), w.data_ptr<float>(), lb.data_ptr<float>(),
                             out.data_ptr<scalar_t>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, n,
                             static_cast<float>(eps), tanh_form);
  });
  return {out, mean, rstd};
}

template <typename T>
void gln_bwd_kernel(const T* dout, const T* x, const float* bias, const float* w, const float* mean,
                    const float* rstd, T* dx, float* partial, int64_t rows, int64_t n, bool tanh_form) {
  const Chunks ch(rows);
  // partial: (chunks, 3, n) = dweight, dln_bias, dbias per chunk
  at::parallel_for(0, ch.count, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> buf(5 * n);
    float *bx = buf.data(), *bd = bx + n, *pre = bd + n, *h = pre + n, *dh = h + n;
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      float* dw = partial + chunk * 3 * n;
      float *dlb = dw + n, *db = dlb + n;
      std::fill(dw, dw + 3 * n, 0.0f);
      const int64_t rend = std::min(rows, (chunk + 1) * ch.size);
      for (int64_t r = chunk * ch.size; r < rend; ++r) {
        const float* xr = load_row(x + r * n, bx, n);
        const float* dy = load_row(dout + r * n, bd, n);
        vloop4(n, [&](int64_t i, int64_t c) {
          const Vec v = ld(xr + i, c) + ld(bias + i, c);
          st(v, pre + i, c);
          st(gelu(v, tanh_form), h + i, c);
        });
        ln_bwd_row(h, dy, w, mean[r], rstd[r], n, dh, dw, dlb);
        vloop4(n, [&](int64_t i, int64_t c) {
          const Vec d = ld(dh + i, c) * gelu_grad(ld(pre + i, c), tanh_form);
          st(d, dh + i, c);
          st(ld(db + i, c) + d, db + i, c);
        });
        store_row(dh, dx + r * n, n);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gln_bwd(
    const at::Tensor& dout_, const at::Tensor& x_, const at::Tensor& bias, const at::Tensor& weight,
    const at::Tensor& ln_bias, const at::Tensor& mean_, const at::Tensor& rstd_, double eps, bool tanh_form) {
  (void)eps;
  check_rows(x_, "x");
  const at::Tensor x = x_.contiguous(), dout = dout_.contiguous().to(x.scalar_type());
  const at::Tensor mean = mean_.contiguous().to(at::kFloat), rstd = rstd_.contiguous().to(at::kFloat);
  const int64_t rows = x.size(0), n = x.size(1);
  const at::Tensor b = vec_f32(bias), w = vec_f32(weight);
  at::Tensor dx = new_output_like(x);
  const Chunks ch(rows);
  at::Tensor partial = at::zeros({std::max<int64_t>(ch.count, 1), 3, n}, x.options().dtype(at::kFloat));
  BERTFAST_DISPATCH(x.scalar_type(), "gelu_layernorm backward", [&] {
    gln_bwd_kernel<scalar_t>(dout.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), b.data_ptr<float>(),
                             w.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                             dx.data_ptr<scalar_t>(), partial.data_ptr<float>(), rows, n, tanh_form);
  });
  const at::Tensor sums = sum_chunks(partial);
  return {dx, sums[2].to(bias.scalar_type()), sums[0].to(weight.scalar_type()), sums[1].to(ln_bias.scalar_type())};
}

}  // namespace
}  // namespace bertfast_cpu

TORCH_LIBRARY_FRAGMENT(bertfast, m) {
  m.def(
      "gelu_layernorm_cpu_fwd(Tensor x, Tensor bias, Tensor weight, Tensor ln_bias, float eps, bool tanh) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "gelu_layernorm_cpu_bwd(Tensor dout, Tensor x, Tensor bias, Tensor weight, Tensor ln_bias, Tensor mean, "
      "Tensor rstd, float eps, bool tanh) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bertfast, CPU, m) {
  m.impl("gelu_layernorm_cpu_fwd", &bertfast_cpu::gln_fwd);
  m.impl("gelu_layernorm_cpu_bwd", &bertfast_cpu::gln_bwd);
}
