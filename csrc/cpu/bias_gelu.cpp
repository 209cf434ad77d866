// bias_gelu: out = GELU(x + bias), erf form (BERT's) or tanh form.
//
// Elementwise, so the rows are just a convenient unit of work: forward reads x once and writes
// out once; backward reads dout and x once, writes dx once and reduces dbias per fixed row
// chunk (deterministic, see Chunks).
#include "common.h"

namespace bertfast_cpu {
namespace {

template <typename T>
void bias_gelu_fwd_kernel(const T* x, const float* bias, T* out, int64_t rows, int64_t n, bool tanh_form) {
  at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * n;
      T* y = out + r * n;
      if (tanh_form) {
        vloop4(n, [&](int64_t i, int64_t c) { stT(gelu_tanh(ldT(xr + i, c) + ld(bias + i, c)), y + i, c); });
      } else {
        vloop4(n, [&](int64_t i, int64_t c) { stT(gelu_erf(ldT(xr + i, c) + ld(bias + i, c)), y + i, c); });
      }
    }
  });
}

at::Tensor bias_gelu_fwd(const at::Tensor& x_, const at::Tensor& bias, bool tanh_form, bool inplace) {
  TORCH_CHECK(x_.dim() >= 1 && x_.device().is_cpu(), "x must be a CPU tensor with at least one dimension");
  const at::Tensor x = x_.contiguous();
  const int64_t n = x.size(-1), rows = n == 0 ? 0 : x.numel() / n;
  const at::Tensor b = vec_f32(bias);
  // inplace: out overwrites x (see bias_residual_layernorm.cpp); elementwise, so always safe
  at::Tensor out = inplace && x.is_same(x_) ? x_ : new_output_like(x);
  BERTFAST_DISPATCH(x.scalar_type(), "bias_gelu", [&] {
    bias_gelu_fwd_kernel<scalar_t>(x.data_ptr<scalar_t>(), b.data_ptr<float>(), out.data_ptr<scalar_t>(), rows, n,
                                   tanh_form);
  });
  return out;
}

template <typename T>
void bias_gelu_bwd_kernel(const T* dout, const T* x, const float* bias, T* dx, float* partial, int64_t rows,
                          int64_t n, bool tanh_form) {
  const Chunks ch(rows);
  at::parallel_for(0, ch.count, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      float* db = partial + chunk * n;
      std::fill(db, db + n, 0.0f);
      const int64_t rend = std::min(rows, (chunk + 1) * ch.size);
      for (int64_t r = chunk * ch.size; r < rend; ++r) {
        const T* xr = x + r * n;
        const T* dy = dout + r * n;
        T* o = dx + r * n;
        vloop4(n, [&](int64_t i, int64_t c) {
          const Vec d = ldT(dy + i, c) * gelu_grad(ldT(xr + i, c) + ld(bias + i, c), tanh_form);
          stT(d, o + i, c);
          st(ld(db + i, c) + d, db + i, c);
        });
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd(const at::Tensor& dout_, const at::Tensor& x_,
                                                 const at::Tensor& bias, bool tanh_form) {
  TORCH_CHECK(x_.dim() >= 1 && x_.device().is_cpu(), "x must be a CPU tensor with at least one dimension");
  const at::Tensor x = x_.contiguous(), dout = dout_.contiguous().to(x.scalar_type());
  TORCH_CHECK(dout.sizes() == x.sizes(), "dout must have the shape of x");
  const int64_t n = x.size(-1), rows = n == 0 ? 0 : x.numel() / n;
  const at::Tensor b = vec_f32(bias);
  at::Tensor dx = new_output_like(x);
  const Chunks ch(rows);
  at::Tensor partial = at::zeros({std::max<int64_t>(ch.count, 1), 1, n}, x.options().dtype(at::kFloat));
  BERTFAST_DISPATCH(x.scalar_type(), "bias_gelu backward", [&] {
    bias_gelu_bwd_kernel<scalar_t>(dout.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), b.data_ptr<float>(),
                                   dx.data_ptr<scalar_t>(), partial.data_ptr<float>(), rows, n, tanh_form);
  });
  return {dx, sum_chunks(partial)[0].to(bias.scalar_type())};
}

}  // namespace
}  // namespace bertfast_cpu

TORCH_LIBRARY_FRAGMENT(bertfast, m) {
  m.def("bias_gelu_cpu_fwd(Tensor x, Tensor bias, bool tanh, bool inplace=False) -> Tensor");
  m.def("bias_gelu_cpu_bwd(Tensor dout, Tensor x, Tensor bias, bool tanh) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bertfast, CPU, m) {
  m.impl("bias_gelu_cpu_fwd", &bertfast_cpu::bias_gelu_fwd);
  m.impl("bias_gelu_cpu_bwd", &bertfast_cpu::bias_gelu_bwd);
}
