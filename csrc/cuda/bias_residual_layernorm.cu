// bias_residual_layernorm: out = LN(dropout(x + bias) + residual), BERT's add-and-norm.
//
// Forward: the row h = dropout(x + bias) + residual is built in registers from one read of x and
// residual, its mean and variance reduced over the row's warp (or block) in fp32, and the output
// written once; mean/rstd (fp32) are stored for the backward.
// Backward: a persistent grid (as many blocks as are resident) strides over rows, recomputes h
// from x, bias, residual and the dropout seed (the mask bits of a lane's 32 elements are kept in
// one register between the two passes), writes dresidual and dx, and keeps its lanes' shares of
// dweight, dln_bias and dbias in fp32 registers; each block writes one partial row and a second
// kernel sums them in a fixed order (deterministic, no atomics).
#include "common.cuh"

namespace bertfast_cuda {
namespace {

template <typename T, int VEC, bool BLOCK>
__global__ void __launch_bounds__(max_threads_of<VEC>()) brln_fwd_kernel(
    const T* __restrict__ x, const void* __restrict__ bias, const T* __restrict__ res, const void* __restrict__ w,
    const void* __restrict__ lb, bool pf, T* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
    int64_t M, int n, float eps, Dropout drop) {
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
      float a[VEC], r[VEC];
      load_f<T, VEC>(x + base + col, a);
      if (bias != nullptr) {
        float b[VEC];
        load_param<T, VEC>(bias, pf, col, b);
#pragma unroll
        for (int k = 0; k < VEC; ++k) a[k] += b[k];
      }
      if (drop.on) {
        // a multiply (not a select) like the reference: a dropped element is (x + bias) * 0
#pragma unroll
        for (int k = 0; k < VEC; ++k) a[k] *= dropout_keep(drop, base + col + k) ? drop.scale : 0.0f;
      }
      load_f<T, VEC>(res + base + col, r);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        h[j][k] = a[k] + r[k];
        sum += h[j][k];
      }
    }
  }
  layernorm_store<T, VEC, NV, BLOCK>(h, sum, grp, row, n, eps, w, lb, pf, false, 0u, 1.0f, y, mean, rstd, red);
}

template <typename T, int VEC, bool BLOCK>
__global__ void __launch_bounds__(max_threads_of<VEC>()) brln_bwd_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const void* __restrict__ bias, const T* __restrict__ res,
    const void* __restrict__ w, bool pf, const float* __restrict__ mean, const float* __restrict__ rstd,
    T* __restrict__ dx, T* __restrict__ dres, float* __restrict__ part, int64_t M, int n, Dropout drop) {
  constexpr int NV = nv_of<VEC>();
  static_assert(NV * VEC <= 32, "the dropout bits of a lane's elements must fit one 32-bit word");
  __shared__ float red[64];
  // warp rows: the block's warps add their gradient shares here (3 x n floats, n <= 32 * NV * VEC)
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
    // xh, g: h and dout until layernorm_grad_terms makes them xhat and dout * weight
    float xh[NV][VEC], g[NV][VEC];
    uint32_t keep = 0u;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int col = grp.col(j, VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) g[j][k] = xh[j][k] = 0.0f;
      if (col < n) {
        float a[VEC], r[VEC];
        load_f<T, VEC>(x + base + col, a);
        load_f<T, VEC>(res + base + col, r);
        load_f<T, VEC>(dy + base + col, g[j]);
        if (bias != nullptr) {
          float b[VEC];
          load_param<T, VEC>(bias, pf, col, b);
#pragma unroll
          for (int k = 0; k < VEC; ++k) a[k] += b[k];
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          if (drop.on) {
            const bool kept = dropout_keep(drop, base + col + k);
            keep |= static_cast<uint32_t>(kept) << (j * VEC + k);
            a[k] *= kept ? drop.scale : 0.0f;
          }
          xh[j][k] = a[k] + r[k];
        }
      }
    }
    float c1, c2;
    layernorm_grad_terms<T, VEC, NV, BLOCK>(xh, g, acc[0], acc[1], mean[row], rstd[row], grp, n, w, pf, c1, c2, red);
    const float rs = rstd[row];
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int col = grp.col(j, VEC);
      if (col < n) {
        float dh[VEC], dxv[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          dh[k] = (g[j][k] - xh[j][k] * c1 - c2) * rs;
          dxv[k] = drop.on ? dh[k] * (((keep >> (j * VEC + k)) & 1u) ? drop.scale : 0.0f) : dh[k];
          acc[2][j][k] += dxv[k];
        }
        store_f<T, VEC>(dres + base + col, dh);
        store_f<T, VEC>(dx + base + col, dxv);
      }
    }
  }
  write_partials<3, NV, VEC, BLOCK>(grp, acc, n, part, colsum);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> brln_fwd(const at::Tensor& x_, const std::optional<at::Tensor>& bias_,
                                                       const at::Tensor& res_, const at::Tensor& weight_,
                                                       const at::Tensor& ln_bias_, double eps, double p, int64_t seed) {
  check_rows(x_, "x");
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), res = res_.contiguous();
  TORCH_CHECK(res.sizes() == x.sizes() && res.scalar_type() == x.scalar_type(), "residual must match x");
  const int64_t M = x.size(0);
  const int n = static_cast<int>(x.size(1));
  check_vec(weight_, n, "weight");
  check_vec(ln_bias_, n, "ln_bias");
  const bool has_bias = bias_.has_value() && bias_->defined();
  if (has_bias) check_vec(*bias_, n, "bias");
  const bool pf = params_in_fp32(x.scalar_type(), {&weight_, &ln_bias_, has_bias ? &*bias_ : nullptr});
  const at::Tensor w = as_param(weight_, pf), lb = as_param(ln_bias_, pf);
  const at::Tensor b = has_bias ? as_param(*bias_, pf) : at::Tensor();
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, mean, rstd};
  const Dropout drop = make_dropout(p, seed);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool al = aligned16(x.data_ptr()) && aligned16(res.data_ptr()) && aligned16(y.data_ptr()) &&
                  aligned16(w.data_ptr()) && aligned16(lb.data_ptr()) && (!has_bias || aligned16(b.data_ptr()));
  dispatch_float(x.scalar_type(), "bias_residual_layernorm", [&](auto tt) {
    using T = typename decltype(tt)::type;
    const RowPlan plan = plan_rows(n, sizeof(T), al);
    with_variant<T>(plan, [&](auto vec, auto blk) {
      const int64_t grid = (M + plan.row_groups_per_block - 1) / plan.row_groups_per_block;
      brln_fwd_kernel<T, vec.value, blk.value><<<grid, plan.block_dim, 0, stream>>>(
          static_cast<const T*>(x.data_ptr()), has_bias ? b.data_ptr() : nullptr, static_cast<const T*>(res.data_ptr()),
          w.data_ptr(), lb.data_ptr(), pf, static_cast<T*>(y.data_ptr()), mean.data_ptr<float>(),
          rstd.data_ptr<float>(), M, n, static_cast<float>(eps), drop);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> brln_bwd(
    const at::Tensor& dout_, const at::Tensor& x_, const std::optional<at::Tensor>& bias_, const at::Tensor& res_,
    const at::Tensor& weight_, const at::Tensor& ln_bias_, const at::Tensor& mean_, const at::Tensor& rstd_,
    double eps, double p, int64_t seed) {
  (void)eps;
  check_rows(x_, "x");
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), res = res_.contiguous();
  const at::Tensor dout = dout_.scalar_type() == x.scalar_type() ? dout_.contiguous()
                                                                 : dout_.to(x.scalar_type()).contiguous();
  TORCH_CHECK(res.sizes() == x.sizes() && dout.sizes() == x.sizes(), "residual and dout must match x");
  const at::Tensor mean = stats_f32(mean_), rstd = stats_f32(rstd_);
  const int64_t M = x.size(0);
  const int n = static_cast<int>(x.size(1));
  check_vec(weight_, n, "weight");
  const bool has_bias = bias_.has_value() && bias_->defined();
  if (has_bias) check_vec(*bias_, n, "bias");
  const bool pf = params_in_fp32(x.scalar_type(), {&weight_, &ln_bias_, has_bias ? &*bias_ : nullptr});
  const at::Tensor w = as_param(weight_, pf);
  const at::Tensor b = has_bias ? as_param(*bias_, pf) : at::Tensor();
  const auto popt = x.options().dtype(pf ? at::kFloat : x.scalar_type());
  at::Tensor dx = at::empty_like(x), dres = at::empty_like(res);
  at::Tensor dw = at::empty({n}, popt), dlb = at::empty({n}, popt), db = at::empty({has_bias ? n : 0}, popt);
  if (M == 0) {
    dw.zero_();
    dlb.zero_();
    db.zero_();
  } else {
    const Dropout drop = make_dropout(p, seed);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const bool al = aligned16(x.data_ptr()) && aligned16(res.data_ptr()) && aligned16(dout.data_ptr()) &&
                    aligned16(dx.data_ptr()) && aligned16(dres.data_ptr()) && aligned16(w.data_ptr()) &&
                    (!has_bias || aligned16(b.data_ptr()));
    dispatch_float(x.scalar_type(), "bias_residual_layernorm backward", [&](auto tt) {
      using T = typename decltype(tt)::type;
      const RowPlan plan = plan_rows(n, sizeof(T), al);
      with_variant<T>(plan, [&](auto vec, auto blk) {
        auto kernel = brln_bwd_kernel<T, vec.value, blk.value>;
        const int64_t work = (M + plan.row_groups_per_block - 1) / plan.row_groups_per_block;
        const int64_t G = persistent_grid(kernel, plan.block_dim.x * plan.block_dim.y, 0, work, x.get_device());
        at::Tensor part = at::empty({3, G, n}, x.options().dtype(at::kFloat));
        kernel<<<G, plan.block_dim, 0, stream>>>(
            static_cast<const T*>(dout.data_ptr()), static_cast<const T*>(x.data_ptr()),
            has_bias ? b.data_ptr() : nullptr, static_cast<const T*>(res.data_ptr()), w.data_ptr(), pf,
            mean.data_ptr<float>(), rstd.data_ptr<float>(), static_cast<T*>(dx.data_ptr()),
            static_cast<T*>(dres.data_ptr()), part.data_ptr<float>(), M, n, drop);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        // part rows: dweight, dln_bias, dbias
        sum_partials_as(popt.dtype().toScalarType(), part, G, n, has_bias ? 3 : 2, &dw, &dlb, &db, stream);
      });
    });
  }
  // gradients in each parameter's dtype; no bias: an empty placeholder (the Python side returns None)
  return {dx, has_bias ? db.to(bias_->scalar_type()) : db, dres, dw.to(weight_.scalar_type()),
          dlb.to(ln_bias_.scalar_type())};
}

}  // namespace
}  // namespace bertfast_cuda

TORCH_LIBRARY_FRAGMENT(bertfast, m) {
  m.def(
      "bias_residual_layernorm_cuda_fwd(Tensor x, Tensor? bias, Tensor residual, Tensor weight, Tensor ln_bias, "
      "float eps, float p, int seed) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bias_residual_layernorm_cuda_bwd(Tensor dout, Tensor x, Tensor? bias, Tensor residual, Tensor weight, "
      "Tensor ln_bias, Tensor mean, Tensor rstd, float eps, float p, int seed) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bertfast, CUDA, m) {
  m.impl("bias_residual_layernorm_cuda_fwd", &bertfast_cuda::brln_fwd);
  m.impl("bias_residual_layernorm_cuda_bwd", &bertfast_cuda::brln_bwd);
}
