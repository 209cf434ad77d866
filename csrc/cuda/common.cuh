// Shared pieces of the CUDA kernels: dtype conversion, 16-byte vector loads, row reductions,
// the dropout RNG (Philox-4x32-7, the stream of every bertfast backend), GELU, the launch plan
// of a row kernel, and the second stage of the weight/bias gradient reductions.
//
// Every LayerNorm-family kernel maps a row of `n` elements onto a group of threads: one warp
// per row when the row fits in 32 lanes x NV vectors (small hidden sizes: several rows per
// block, no shared memory, no __syncthreads), else one block per row. Lane t of a group of G
// threads owns vectors j = 0..NV-1 at columns (j * G + t) * VEC: consecutive lanes read
// consecutive 16-byte vectors (coalesced), and a lane's columns are the same in every row, so
// the backward keeps its share of the weight/bias gradients in registers across rows.
// The row lives in registers between the statistics and the store: every input byte is read
// once. Statistics and accumulation are fp32; results are rounded once on store.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <unordered_map>

namespace bertfast_cuda {

constexpr int kMaxHidden = 8192;

// ---------------------------------------------------------------------------------------
// element types: ATen dtype -> the CUDA type the kernels use

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
void dispatch_float(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kHalf: f(Tag<__half>{}); break;
    case at::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK(false, what, ": expected float32, float16 or bfloat16, got ", st);
  }
}

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC elements of T moved as one (or, for 32-byte packs of fp32 parameters, two) 16-byte
// transactions; the host checks the alignment before choosing VEC > 1.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC > 16 ? 16 : sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_f(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_f(pk.v[k]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_f(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pk.v[k] = from_f<T>(in[k]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// ---------------------------------------------------------------------------------------
// reductions over a row's group of threads

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of a and b over the row's group (both sums at once: one round of shared memory for two
// values). BLOCK: the whole block, through `red` (64 floats); else the warp alone.
template <bool BLOCK>
__device__ __forceinline__ void row_sum2(float& a, float& b, float* red) {
  a = warp_sum(a);
  b = warp_sum(b);
  if constexpr (BLOCK) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();  // red may still be read by the previous reduction
    if (lane == 0) {
      red[warp] = a;
      red[32 + warp] = b;
    }
    __syncthreads();
    a = lane < nw ? red[lane] : 0.0f;
    b = lane < nw ? red[32 + lane] : 0.0f;
    a = warp_sum(a);
    b = warp_sum(b);
  }
}

template <bool BLOCK>
__device__ __forceinline__ float row_sum(float a, float* red) {
  float b = 0.0f;
  row_sum2<BLOCK>(a, b, red);
  return a;
}

// ---------------------------------------------------------------------------------------
// dropout: Philox-4x32-7, bit for bit the function of bertfast/ops/_rng.py, kernels/_rng.py and
// csrc/cpu/philox.h. Element offset n: counter (lo32(n), hi32(n), 0, 0), key (lo32(seed),
// hi32(seed)); keep iff (word0 >> 8) >= ceil(p * 2^24).

struct Dropout {
  uint32_t k0, k1, threshold;
  float scale;
  bool on;
};

inline Dropout make_dropout(double p, int64_t seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout p must be in [0, 1), got ", p);
  const uint64_t s = static_cast<uint64_t>(seed);
  return {static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32),
          static_cast<uint32_t>(std::ceil(p * 16777216.0)), static_cast<float>(1.0 / (1.0 - p)), p > 0.0};
}

__device__ __forceinline__ uint32_t philox_word0(uint32_t k0, uint32_t k1, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0u, c3 = 0u;
#pragma unroll
  for (int r = 0; r < 7; ++r) {
    const uint32_t hb = __umulhi(c2, 0xCD9E8D57u), lb = c2 * 0xCD9E8D57u;
    const uint32_t ha = __umulhi(c0, 0xD2511F53u), la = c0 * 0xD2511F53u;
    c0 = hb ^ c1 ^ k0;
    c2 = ha ^ c3 ^ k1;
    c1 = lb;
    c3 = la;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

__device__ __forceinline__ bool dropout_keep(const Dropout& d, uint64_t offset) {
  return (philox_word0(d.k0, d.k1, offset) >> 8) >= d.threshold;
}

// ---------------------------------------------------------------------------------------
// GELU in fp32, as torch.nn.functional.gelu (erf form, or approximate="tanh"), and its derivative
// (bertfast.ops._common.gelu_grad)

__device__ __forceinline__ float gelu_f(float h, bool tanh_form) {
  if (tanh_form) return 0.5f * h * (1.0f + tanhf(0.7978845608028654f * (h + 0.044715f * h * h * h)));
  return 0.5f * h * (1.0f + erff(h * 0.7071067811865476f));
}

__device__ __forceinline__ float gelu_grad_f(float h, bool tanh_form) {
  if (tanh_form) {
    const float t = tanhf(0.7978845608028654f * (h + 0.044715f * h * h * h));
    return 0.5f * (1.0f + t) + 0.5f * h * (1.0f - t * t) * 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * h * h);
  }
  const float cdf = 0.5f * (1.0f + erff(h * 0.7071067811865476f));
  return cdf + h * expf(-0.5f * h * h) * 0.3989422804014327f;
}

// ---------------------------------------------------------------------------------------
// the row group of a thread (see the top of this file)

template <bool BLOCK>
struct RowGroup {
  int lane, size;
  int64_t first, step;  // first row of this group, distance to its next row in a persistent loop
  __device__ __forceinline__ RowGroup() {
    lane = threadIdx.x;
    size = BLOCK ? blockDim.x : 32;
    first = BLOCK ? blockIdx.x : static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
    step = BLOCK ? gridDim.x : static_cast<int64_t>(gridDim.x) * blockDim.y;
  }
  __device__ __forceinline__ int col(int j, int vec) const { return (j * size + lane) * vec; }
};

// Variants of a row kernel: VEC = 16 bytes of T, NV = 32 / VEC vectors per lane (32 elements:
// one warp per row while n <= 1024, one block of <= 256 threads per row up to 8192), or VEC = 1
// with NV = 16 scalar elements per lane, one block of <= 512 threads per row (rows whose size or
// pointers do not allow 16-byte accesses). 32 fp32 values per lane per live array keeps the
// vector backward (two row arrays and three gradient accumulators) within the 255 registers of
// a 256-thread launch bound without spills. The scalar fallback (odd widths, misaligned rows) has
// an address per element and spills a little in some backward kernels: 16 x 512 spills least of
// the shapes tried (32 x 256 spilled up to 172 bytes); tests/dispatch/test_cuda_compile.py reports them.
constexpr int kElemsPerLane = 32, kNVScalar = 16, kWarpsPerBlock = 4;

template <int VEC>
constexpr int nv_of() { return VEC == 1 ? kNVScalar : kElemsPerLane / VEC; }
template <int VEC>
constexpr int max_threads_of() { return VEC == 1 ? 512 : 256; }

struct RowPlan {
  bool vector, block;
  int threads;  // per row group: 32 (warp rows) or the block size
  dim3 block_dim;
  int64_t row_groups_per_block;
};

inline bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The plan for rows of n elements of `elem` bytes; `aligned`: every pointer the kernel accesses
// in vectors is 16-byte aligned.
inline RowPlan plan_rows(int n, int elem, bool aligned) {
  RowPlan p{};
  const int vec = 16 / elem;
  p.vector = aligned && n % vec == 0;
  const int units = p.vector ? n / vec : n;  // vectors (or elements) per row
  const int nv = p.vector ? kElemsPerLane / vec : kNVScalar;
  if (p.vector && units <= 32 * nv) {
    p.block = false;
    p.threads = 32;
    p.block_dim = dim3(32, kWarpsPerBlock);
    p.row_groups_per_block = kWarpsPerBlock;
  } else {
    p.block = true;
    int t = (units + nv - 1) / nv;
    t = ((t + 31) / 32) * 32;
    p.threads = t < 32 ? 32 : t;
    p.block_dim = dim3(p.threads, 1);
    p.row_groups_per_block = 1;
  }
  return p;
}

// Calls f(std::integral_constant<int, VEC>, std::bool_constant<BLOCK>) for the plan's variant.
template <typename T, typename F>
inline void with_variant(const RowPlan& p, F&& f) {
  constexpr int V = 16 / sizeof(T);
  if (!p.vector) {
    f(std::integral_constant<int, 1>{}, std::true_type{});
  } else if (p.block) {
    f(std::integral_constant<int, V>{}, std::true_type{});
  } else {
    f(std::integral_constant<int, V>{}, std::false_type{});
  }
}

// Parameters (LayerNorm weight/bias, the GEMM bias) are read in the activations' type T, or in
// fp32 when any of them is not T (bf16 activations with fp32 parameters under autocast): a
// uniform branch per load instead of a second set of kernels or a cast kernel per call.
template <typename T, int VEC>
__device__ __forceinline__ void load_param(const void* p, bool fp32, int col, float (&out)[VEC]) {
  if (fp32) {
    load_f<float, VEC>(static_cast<const float*>(p) + col, out);
  } else {
    load_f<T, VEC>(static_cast<const T*>(p) + col, out);
  }
}

// ---------------------------------------------------------------------------------------
// the LayerNorm pieces every row kernel shares

// Forward: the statistics of the row h (this lane's NV x VEC values, zeros past n; `sum` is the
// lane's sum of them; the variance is a second pass over the registers), then
// y = (h - mean) * rstd * w + lb, stored once; lane 0 stores mean and rstd. With drop_on
// (dropout after the norm: embedding_layernorm) element (j, k) is multiplied by drop_scale if
// bit j * VEC + k of `keep` is set, else by 0 (the mask is drawn before, while few registers are live).
template <typename T, int VEC, int NV, bool BLOCK>
__device__ __forceinline__ void layernorm_store(const float (&h)[NV][VEC], float sum, const RowGroup<BLOCK>& grp,
                                                int64_t row, int n, float eps, const void* w, const void* lb, bool pf,
                                                bool drop_on, uint32_t keep, float drop_scale, T* __restrict__ y,
                                                float* __restrict__ mean, float* __restrict__ rstd, float* red) {
  static_assert(NV * VEC <= 32, "the dropout bits of a lane's elements must fit one 32-bit word");
  const float mu = row_sum<BLOCK>(sum, red) / n;
  float sq = 0.0f;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    if (grp.col(j, VEC) < n) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) sq += (h[j][k] - mu) * (h[j][k] - mu);
    }
  }
  const float rs = rsqrtf(row_sum<BLOCK>(sq, red) / n + eps);
  const int64_t base = row * n;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int col = grp.col(j, VEC);
    if (col < n) {
      float wv[VEC], bv[VEC], o[VEC];
      load_param<T, VEC>(w, pf, col, wv);
      load_param<T, VEC>(lb, pf, col, bv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        o[k] = (h[j][k] - mu) * rs * wv[k] + bv[k];
        if (drop_on) o[k] *= ((keep >> (j * VEC + k)) & 1u) ? drop_scale : 0.0f;  // a multiply, as the reference
      }
      store_f<T, VEC>(y + base + col, o);
    }
  }
  if (grp.lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// Backward, the part every LayerNorm op shares. In: xh holds the row h the forward normalised
// and g the gradient reaching the norm's output (dropout already applied), this lane's values,
// zeros past n. Out: xh = xhat = (h - mean) * rstd, g = dy * w; dw += dy * xhat, dlb += dy; and
// the group's means c1 = mean(g * xhat), c2 = mean(g), so that dh = (g - xhat * c1 - c2) * rstd.
template <typename T, int VEC, int NV, bool BLOCK>
__device__ __forceinline__ void layernorm_grad_terms(float (&xh)[NV][VEC], float (&g)[NV][VEC], float (&dw)[NV][VEC],
                                                     float (&dlb)[NV][VEC], float mu, float rs,
                                                     const RowGroup<BLOCK>& grp, int n, const void* w, bool pf,
                                                     float& c1, float& c2, float* red) {
  float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int col = grp.col(j, VEC);
    if (col < n) {
      float wv[VEC];
      load_param<T, VEC>(w, pf, col, wv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float dy = g[j][k];
        xh[j][k] = (xh[j][k] - mu) * rs;
        g[j][k] = dy * wv[k];
        s1 += g[j][k] * xh[j][k];
        s2 += g[j][k];
        dw[j][k] += dy * xh[j][k];
        dlb[j][k] += dy;
      }
    }
  }
  row_sum2<BLOCK>(s1, s2, red);
  c1 = s1 / n;
  c2 = s2 / n;
}

// ---------------------------------------------------------------------------------------
// launch helpers

inline int sm_count(int device) {
  static int cache[128] = {0};
  if (device < 0 || device >= 128) device = 0;
  if (cache[device] == 0) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    cache[device] = v > 0 ? v : 1;
  }
  return cache[device];
}

// Grid of a persistent kernel: as many blocks as are resident at once (one wave, no tail), from
// the compiled kernel's real register and shared-memory use, never more than there is work for.
template <typename K>
inline int64_t persistent_grid(K kernel, int threads, size_t smem, int64_t work_blocks, int device) {
  struct Key {
    const void* kernel;
    int threads, device;
    size_t smem;
    bool operator==(const Key& o) const {
      return kernel == o.kernel && threads == o.threads && device == o.device && smem == o.smem;
    }
  };
  struct Hash {
    size_t operator()(const Key& k) const {
      return std::hash<const void*>()(k.kernel) ^ (static_cast<size_t>(k.threads) << 1) ^ (k.smem << 12) ^
             (static_cast<size_t>(k.device) << 40);
    }
  };
  static std::mutex mu;
  static std::unordered_map<Key, int, Hash> per_sm_cache;
  const Key key{reinterpret_cast<const void*>(kernel), threads, device, smem};
  int per_sm;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = per_sm_cache.find(key);
    if (it == per_sm_cache.end()) {
      int v = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, kernel, threads, smem));
      it = per_sm_cache.emplace(key, v > 0 ? v : 1).first;
    }
    per_sm = it->second;
  }
  const int64_t g = static_cast<int64_t>(per_sm) * sm_count(device);
  return work_blocks < g ? (work_blocks > 0 ? work_blocks : 1) : g;
}

// Second stage of the weight/bias gradients: out_k[c] = sum over g of part[k][g][c] (fp32, in a
// fixed order: deterministic), rounded once to the parameter dtype. part: (ngrad, G, n).
template <typename P>
__global__ void sum_partials_kernel(const float* __restrict__ part, int64_t G, int n, P* out0, P* out1, P* out2) {
  __shared__ float red[16][33];
  const int c = blockIdx.x * 32 + threadIdx.x, k = blockIdx.y;
  float s = 0.0f;
  if (c < n) {
    const float* p = part + static_cast<int64_t>(k) * G * n + c;
    for (int64_t g = threadIdx.y; g < G; g += 16) s += p[g * n];
  }
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < n) {
    float t = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; ++i) t += red[i][threadIdx.x];
    P* out = k == 0 ? out0 : (k == 1 ? out1 : out2);
    out[c] = from_f<P>(t);
  }
}

template <typename P>
inline void sum_partials(const at::Tensor& part, int64_t G, int n, int ngrad, P* out0, P* out1, P* out2,
                         cudaStream_t stream) {
  const dim3 grid((n + 31) / 32, ngrad);
  sum_partials_kernel<P><<<grid, dim3(32, 16), 0, stream>>>(part.data_ptr<float>(), G, n, out0, out1, out2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// In warp-row kernels the warps of a block hold gradient shares for the same columns: add them
// up in shared memory, warp after warp (a fixed order: deterministic), then write one partial
// row per block. In block-row kernels every lane owns distinct columns: write them directly.
// acc: NG arrays of NV x VEC per lane; part: (NG, G, n) with G = gridDim.x.
template <int NG, int NV, int VEC, bool BLOCK>
__device__ __forceinline__ void write_partials(const RowGroup<BLOCK>& grp, float (&acc)[NG][NV][VEC], int n,
                                               float* __restrict__ part, float* smem) {
  const int64_t G = gridDim.x;
  if constexpr (BLOCK) {
    (void)smem;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int col = grp.col(j, VEC);
      if (col < n) {
#pragma unroll
        for (int g = 0; g < NG; ++g) {
          float* dst = part + (g * G + blockIdx.x) * n + col;
#pragma unroll
          for (int k = 0; k < VEC; ++k) dst[k] = acc[g][j][k];
        }
      }
    }
  } else {
    for (int w = 0; w < static_cast<int>(blockDim.y); ++w) {
      if (static_cast<int>(threadIdx.y) == w) {
#pragma unroll
        for (int j = 0; j < NV; ++j) {
          const int col = grp.col(j, VEC);
          if (col < n) {
#pragma unroll
            for (int g = 0; g < NG; ++g) {
#pragma unroll
              for (int k = 0; k < VEC; ++k) {
                float& s = smem[g * n + col + k];
                s = (w == 0 ? 0.0f : s) + acc[g][j][k];
              }
            }
          }
        }
      }
      __syncthreads();
    }
    const int tid = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
    for (int i = tid; i < NG * n; i += nt) {
      const int g = i / n, c = i - g * n;
      part[(g * G + blockIdx.x) * n + c] = smem[i];
    }
  }
}

// ---------------------------------------------------------------------------------------
// argument checks of the host wrappers

inline void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, name, " must be 2-D (rows, hidden), got ", x.dim(), " dimensions");
  TORCH_CHECK(x.size(1) >= 1 && x.size(1) <= kMaxHidden, name, ": hidden size must be in [1, ", kMaxHidden,
              "], got ", x.size(1));
}

inline void check_vec(const at::Tensor& v, int64_t n, const char* name) {
  TORCH_CHECK(v.is_cuda() && v.dim() == 1 && v.size(0) == n, name, " must be a CUDA vector of ", n, " elements");
}

// The parameters as the kernels read them (see load_param): all in x's dtype, or all in fp32.
inline bool params_in_fp32(at::ScalarType x_dtype, std::initializer_list<const at::Tensor*> ps) {
  for (const at::Tensor* p : ps) {
    if (p != nullptr && p->defined() && p->scalar_type() != x_dtype) return true;
  }
  return false;
}

inline at::Tensor as_param(const at::Tensor& v, bool fp32) {
  if (!v.defined()) return v;
  return fp32 && v.scalar_type() != at::kFloat ? v.to(at::kFloat).contiguous() : v.contiguous();
}

// The second stage of the gradient reductions for parameters of dtype `pt`.
inline void sum_partials_as(at::ScalarType pt, const at::Tensor& part, int64_t G, int n, int ngrad, at::Tensor* o0,
                            at::Tensor* o1, at::Tensor* o2, cudaStream_t stream) {
  dispatch_float(pt, "parameter gradients", [&](auto tag) {
    using P = typename decltype(tag)::type;
    auto ptr = [](at::Tensor* t) { return t != nullptr && t->defined() ? static_cast<P*>(t->data_ptr()) : nullptr; };
    sum_partials<P>(part, G, n, ngrad, ptr(o0), ptr(o1), ptr(o2), stream);
  });
}

inline at::Tensor stats_f32(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t.contiguous()
                                                                                        : t.to(at::kFloat).contiguous(); }

}  // namespace bertfast_cuda
