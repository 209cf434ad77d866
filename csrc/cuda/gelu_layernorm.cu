// gelu_layernorm: out = LN(GELU(x + bias)), the MLM head's transform.
//
// Forward: x read once into registers, GELU and the LayerNorm statistics in fp32, one write.
// Backward: a persistent grid strides over rows and recomputes GELU(x + bias) (one read of x
// instead of a write and a read of the GELU output); after the row reduction it re-reads x
// (an L1/L2 hit: the row was just read) for GELU'(x + bias) rather than holding a third
// 32-element array in registers; dweight, dln_bias and dbias are kept per lane in fp32 registers
// and reduced in two stages (one partial row per block, then a fixed-order sum).
#include "common.cuh"

namespace bertfast_cuda {
namespace {

template <typename T, int VEC, bool BLOCK>
__global__ void __launch_bounds__(max_threads_of<VEC>()) gln_fwd_kernel(
    const T* __restrict__ x, const void* __restrict__ bias, const void* __restrict__ w, const void* __restrict__ lb,
    bool pf, T* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd, int64_t M, int n, float eps,
    bool tanh_form) {
  constexpr int NV = nv_of<VEC>();
  __shared__ float red[64];
  const RowGroup<BLOCK> grp;
  const int64_t row = grp.first;
  if (row >= M) return;  // warp rows only: a whole warp leaves, no block barrier follows
  const int64_t base = row * n;
  float h[NV][VEC];
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int col = grp.col(j, VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) h[j][k] = 0.0f;
    if (col < n) {
      float a[VEC], b[VEC];
      load_f<T, VEC>(x + base + col, a);
      load_param<T, VEC>(bias, pf, col, b);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        h[j][k] = gelu_f(a[k] + b[k], tanh_form);
        sum += h[j][k];
      }
    }
  }
  layernorm_store<T, VEC, NV, BLOCK>(h, sum, grp, row, n, eps, w, lb, pf, false, 0u, 1.0f, y, mean, rstd, red);
}

template <typename T, int VEC, bool BLOCK>
__global__ void __launch_bounds__(max_threads_of<VEC>()) gln_bwd_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const void* __restrict__ bias, const void* __restrict__ w,
    bool pf, const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx,
    float* __restrict__ part, int64_t M, int n, bool tanh_form) {
  constexpr int NV = nv_of<VEC>();
  __shared__ float red[64];
  __shared__ float colsum[BLOCK ? 1 : 3 * 32 * NV * VEC];
  const RowGroup<BLOCK> grp;
  float acc[3][NV][VEC];  // dweight, dln_bias, dbias
#pragma unroll
  for (int j = 0; j < NV; ++j) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[0][j][k] = acc[1][j][k] = acc[2][j][k] = 0.0f;
  }
  for (int64_t row = grp.first; row < M; row += grp.step) {
    const int64_t base = row * n;
    // xh, g: GELU(x + bias) and dout until layernorm_grad_terms makes them xhat and dout * weight
    float xh[NV][VEC], g[NV][VEC];
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int col = grp.col(j, VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) g[j][k] = xh[j][k] = 0.0f;
      if (col < n) {
        float a[VEC], b[VEC];
        load_f<T, VEC>(x + base + col, a);
        load_f<T, VEC>(dy + base + col, g[j]);
        load_param<T, VEC>(bias, pf, col, b);
#pragma unroll
        for (int k = 0; k < VEC; ++k) xh[j][k] = gelu_f(a[k] + b[k], tanh_form);
      }
    }
    float c1, c2;
    layernorm_grad_terms<T, VEC, NV, BLOCK>(xh, g, acc[0], acc[1], mean[row], rstd[row], grp, n, w, pf, c1, c2, red);
    const float rs = rstd[row];
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int col = grp.col(j, VEC);
      if (col < n) {
        float a[VEC], b[VEC], dxv[VEC];
        load_f<T, VEC>(x + base + col, a);
        load_param<T, VEC>(bias, pf, col, b);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          dxv[k] = (g[j][k] - xh[j][k] * c1 - c2) * rs * gelu_grad_f(a[k] + b[k], tanh_form);
          acc[2][j][k] += dxv[k];
        }
        store_f<T, VEC>(dx + base + col, dxv);
      }
    }
  }
  write_partials<3, NV, VEC, BLOCK>(grp, acc, n, part, colsum);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gln_fwd(const at::Tensor& x_, const at::Tensor& bias_,
                                                       const at::Tensor& weight_, const at::Tensor& ln_bias_, double eps,
                                                       bool tanh_form) {
  check_rows(x_, "x");
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const int64_t M = x.size(0);
  const int n = static_cast<int>(x.size(1));
  check_vec(bias_, n, "bias");
  check_vec(weight_, n, "weight");
  check_vec(ln_bias_, n, "ln_bias");
  const bool pf = params_in_fp32(x.scalar_type(), {&bias_, &weight_, &ln_bias_});
  const at::Tensor b = as_param(bias_, pf), w = as_param(weight_, pf), lb = as_param(ln_bias_, pf);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, mean, rstd};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool al = aligned16(x.data_ptr()) && aligned16(y.data_ptr()) && aligned16(b.data_ptr()) &&
                  aligned16(w.data_ptr()) && aligned16(lb.data_ptr());
  dispatch_float(x.scalar_type(), "gelu_layernorm", [&](auto tt) {
    using T = typename decltype(tt)::type;
    const RowPlan plan = plan_rows(n, sizeof(T), al);
    with_variant<T>(plan, [&](auto vec, auto blk) {
      const int64_t grid = (M + plan.row_groups_per_block - 1) / plan.row_groups_per_block;
      gln_fwd_kernel<T, vec.value, blk.value><<<grid, plan.block_dim, 0, stream>>>(
          static_cast<const T*>(x.data_ptr()), b.data_ptr(), w.data_ptr(), lb.data_ptr(), pf,
          static_cast<T*>(y.data_ptr()), mean.data_ptr<float>(), rstd.data_ptr<float>(), M, n, static_cast<float>(eps),
          tanh_form);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gln_bwd(const at::Tensor& dout_, const at::Tensor& x_,
                                                                   const at::Tensor& bias_, const at::Tensor& weight_,
                                                                   const at::Tensor& ln_bias_, const at::Tensor& mean_,
                                                                   const at::Tensor& rstd_, double eps, bool tanh_form) {
  (void)eps;
  check_rows(x_, "x");
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const at::Tensor dout = dout_.scalar_type() == x.scalar_type() ? dout_.contiguous()
                                                                 : dout_.to(x.scalar_type()).contiguous();
  TORCH_CHECK(dout.sizes() == x.sizes(), "dout must match x");
  const at::Tensor mean = stats_f32(mean_), rstd = stats_f32(rstd_);
  const int64_t M = x.size(0);
  const int n = static_cast<int>(x.size(1));
  check_vec(bias_, n, "bias");
  check_vec(weight_, n, "weight");
  const bool pf = params_in_fp32(x.scalar_type(), {&bias_, &weight_, &ln_bias_});
  const at::Tensor b = as_param(bias_, pf), w = as_param(weight_, pf);
  const auto popt = x.options().dtype(pf ? at::kFloat : x.scalar_type());
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::empty({n}, popt), dlb = at::empty({n}, popt), db = at::empty({n}, popt);
  if (M == 0) {
    dw.zero_();
    dlb.zero_();
    db.zero_();
  } else {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const bool al = aligned16(x.data_ptr()) && aligned16(dout.data_ptr()) && aligned16(dx.data_ptr()) &&
                    aligned16(b.data_ptr()) && aligned16(w.data_ptr());
    dispatch_float(x.scalar_type(), "gelu_layernorm backward", [&](auto tt) {
      using T = typename decltype(tt)::type;
      const RowPlan plan = plan_rows(n, sizeof(T), al);
      with_variant<T>(plan, [&](auto vec, auto blk) {
        auto kernel = gln_bwd_kernel<T, vec.value, blk.value>;
        const int64_t work = (M + plan.row_groups_per_block - 1) / plan.row_groups_per_block;
        const int64_t G = persistent_grid(kernel, plan.block_dim.x * plan.block_dim.y, 0, work, x.get_device());
        at::Tensor part = at::empty({3, G, n}, x.options().dtype(at::kFloat));
        kernel<<<G, plan.block_dim, 0, stream>>>(static_cast<const T*>(dout.data_ptr()),
                                                 static_cast<const T*>(x.data_ptr()), b.data_ptr(), w.data_ptr(), pf,
                                                 mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                                 static_cast<T*>(dx.data_ptr()), part.data_ptr<float>(), M, n,
                                                 tanh_form);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        // part rows: dweight, dln_bias, dbias
        sum_partials_as(popt.dtype().toScalarType(), part, G, n, 3, &dw, &dlb, &db, stream);
      });
    });
  }
  return {dx, db.to(bias_.scalar_type()), dw.to(weight_.scalar_type()), dlb.to(ln_bias_.scalar_type())};
}

}  // namespace
}  // namespace bertfast_cuda

TORCH_LIBRARY_FRAGMENT(bertfast, m) {
  m.def(
      "gelu_layernorm_cuda_fwd(Tensor x, Tensor bias, Tensor weight, Tensor ln_bias, float eps, bool tanh) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "gelu_layernorm_cuda_bwd(Tensor dout, Tensor x, Tensor bias, Tensor weight, Tensor ln_bias, Tensor mean, "
      "Tensor rstd, float eps, bool tanh) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bertfast, CUDA, m) {
  m.impl("gelu_layernorm_cuda_fwd", &bertfast_cuda::gln_fwd);
  m.impl("gelu_layernorm_cuda_bwd", &bertfast_cuda::gln_bwd);
}
