// bias_gelu: out = GELU(x + bias), the FFN intermediate activation (erf form, or tanh).
//
// Forward: elementwise over the flat tensor in 16-byte vectors (a vector never crosses a row:
// the host picks VEC only when it divides the hidden size), grid-stride, math in fp32, one cast
// on store. Backward: a persistent grid of row groups writes dx = dout * GELU'(x + bias) and keeps
// its lanes' share of dbias in fp32 registers; one partial row per block, then a fixed-order sum
// (deterministic, no atomics).
#include "common.cuh"

namespace bertfast_cuda {
namespace {

template <typename T, int VEC>
__global__ void __launch_bounds__(256) bias_gelu_fwd_kernel(const T* __restrict__ x, const void* __restrict__ bias,
                                                            bool pf, T* __restrict__ y, int64_t total_vecs, int n,
                                                            bool tanh_form) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < total_vecs; v += stride) {
    const int64_t e = v * VEC;
    const int col = static_cast<int>(e % n);
    float a[VEC], b[VEC];
    load_f<T, VEC>(x + e, a);
    load_param<T, VEC>(bias, pf, col, b);
#pragma unroll
    for (int k = 0; k < VEC; ++k) a[k] = gelu_f(a[k] + b[k], tanh_form);
    store_f<T, VEC>(y + e, a);
  }
}

template <typename T, int VEC, bool BLOCK>
__global__ void __launch_bounds__(max_threads_of<VEC>()) bias_gelu_bwd_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const void* __restrict__ bias, bool pf, T* __restrict__ dx,
    float* __restrict__ part, int64_t M, int n, bool tanh_form) {
  constexpr int NV = nv_of<VEC>();
  __shared__ float colsum[BLOCK ? 1 : 32 * NV * VEC];
  const RowGroup<BLOCK> grp;
  float acc[1][NV][VEC];
#pragma unroll
  for (int j = 0; j < NV; ++j) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[0][j][k] = 0.0f;
  }
  for (int64_t row = grp.first; row < M; row += grp.step) {
    const int64_t base = row * n;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int col = grp.col(j, VEC);
      if (col < n) {
        float a[VEC], b[VEC], d[VEC];
        load_f<T, VEC>(x + base + col, a);
        load_f<T, VEC>(dy + base + col, d);
        load_param<T, VEC>(bias, pf, col, b);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          d[k] *= gelu_grad_f(a[k] + b[k], tanh_form);
          acc[0][j][k] += d[k];
        }
        store_f<T, VEC>(dx + base + col, d);
      }
    }
  }
  write_partials<1, NV, VEC, BLOCK>(grp, acc, n, part, colsum);
}

at::Tensor bias_gelu_fwd(const at::Tensor& x_, const at::Tensor& bias_, bool tanh_form) {
  TORCH_CHECK(x_.is_cuda() && x_.dim() >= 1, "x must be a CUDA tensor with at least one dimension");
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const int n = static_cast<int>(x.size(-1));
  check_vec(bias_, n, "bias");
  const bool pf = params_in_fp32(x.scalar_type(), {&bias_});
  const at::Tensor b = as_param(bias_, pf);
  at::Tensor y = at::empty_like(x);
  const int64_t total = x.numel();
  if (total == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool al = aligned16(x.data_ptr()) && aligned16(y.data_ptr()) && aligned16(b.data_ptr());
  dispatch_float(x.scalar_type(), "bias_gelu", [&](auto tt) {
    using T = typename decltype(tt)::type;
    constexpr int V = 16 / sizeof(T);
    auto launch = [&](auto vec) {
      const int64_t vecs = total / vec.value;
      const int64_t cap = static_cast<int64_t>(sm_count(x.get_device())) * 16;
      const int64_t blocks = std::min<int64_t>((vecs + 255) / 256, cap);
      bias_gelu_fwd_kernel<T, vec.value><<<blocks, 256, 0, stream>>>(static_cast<const T*>(x.data_ptr()),
                                                                      b.data_ptr(), pf, static_cast<T*>(y.data_ptr()),
                                                                      vecs, n, tanh_form);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (al && n % V == 0) {
      launch(std::integral_constant<int, V>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd(const at::Tensor& dout_, const at::Tensor& x_,
                                                 const at::Tensor& bias_, bool tanh_form) {
  TORCH_CHECK(x_.is_cuda() && x_.dim() >= 1, "x must be a CUDA tensor with at least one dimension");
  const c10::cuda::CUDAGuard guard(x_.device());
  const int n = static_cast<int>(x_.size(-1));
  TORCH_CHECK(n >= 1 && n <= kMaxHidden, "bias_gelu backward: hidden size must be in [1, ", kMaxHidden, "], got ", n);
  const at::Tensor x = x_.contiguous().view({-1, n});
  const at::Tensor dout = (dout_.scalar_type() == x.scalar_type() ? dout_.contiguous()
                                                                  : dout_.to(x.scalar_type()).contiguous()).view({-1, n});
  TORCH_CHECK(dout.sizes() == x.sizes(), "dout must match x");
  check_vec(bias_, n, "bias");
  const bool pf = params_in_fp32(x.scalar_type(), {&bias_});
  const at::Tensor b = as_param(bias_, pf);
  const int64_t M = x.size(0);
  at::Tensor dx = at::empty_like(x_, at::MemoryFormat::Contiguous);
  at::Tensor db = at::empty({n}, x.options().dtype(pf ? at::kFloat : x.scalar_type()));
  if (M == 0) {
    db.zero_();
  } else {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const bool al = aligned16(x.data_ptr()) && aligned16(dout.data_ptr()) && aligned16(dx.data_ptr()) &&
                    aligned16(b.data_ptr());
    dispatch_float(x.scalar_type(), "bias_gelu backward", [&](auto tt) {
      using T = typename decltype(tt)::type;
      const RowPlan plan = plan_rows(n, sizeof(T), al);
      with_variant<T>(plan, [&](auto vec, auto blk) {
        auto kernel = bias_gelu_bwd_kernel<T, vec.value, blk.value>;
        const int64_t work = (M + plan.row_groups_per_block - 1) / plan.row_groups_per_block;
        const int64_t G = persistent_grid(kernel, plan.block_dim.x * plan.block_dim.y, 0, work, x.get_device());
        at::Tensor part = at::empty({1, G, n}, x.options().dtype(at::kFloat));
        kernel<<<G, plan.block_dim, 0, stream>>>(static_cast<const T*>(dout.data_ptr()),
                                                 static_cast<const T*>(x.data_ptr()), b.data_ptr(), pf,
                                                 static_cast<T*>(dx.data_ptr()), part.data_ptr<float>(), M, n,
                                                 tanh_form);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        sum_partials_as(db.scalar_type(), part, G, n, 1, &db, nullptr, nullptr, stream);
      });
    });
  }
  return {dx, db.to(bias_.scalar_type())};
}

}  // namespace
}  // namespace bertfast_cuda

TORCH_LIBRARY_FRAGMENT(bertfast, m) {
  m.def("bias_gelu_cuda_fwd(Tensor x, Tensor bias, bool tanh) -> Tensor");
  m.def("bias_gelu_cuda_bwd(Tensor dout, Tensor x, Tensor bias, bool tanh) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bertfast, CUDA, m) {
  m.impl("bias_gelu_cuda_fwd", &bertfast_cuda::bias_gelu_fwd);
  m.impl("bias_gelu_cuda_bwd", &bertfast_cuda::bias_gelu_bwd);
}
