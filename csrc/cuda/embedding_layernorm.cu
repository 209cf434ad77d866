// embedding_layernorm: out = dropout(LN(word[ids] + type[tt] + pos[pos_ids])), BERT's embeddings.
//
// Forward: per token, three row gathers summed in fp32 in Hugging Face's order ((word + type) +
// pos), LayerNorm statistics over the row's warp (or block), dropout after the norm, one write.
// Backward: a persistent grid recomputes the gathered row h, forms dh = LN'(dout * mask) and
// scatters it into the three tables, which accumulate in fp32 (a zeroed fp32 buffer cast to the
// table dtype at the end; fp32 tables accumulate in place), as the Triton kernel does:
// - default: fp32 atomics into the word and position rows (repeated ids add up; contention is
//   low). Every token hits one of the 1-2 token-type rows, so those are summed per block in
//   shared memory first and added to the table once per block and column.
// - torch.are_deterministic_algorithms_enabled(): the kernel stores dh (fp32, one row per
//   token) and the tables are built with index_put_(accumulate=True), which PyTorch runs
//   deterministically in that mode, so no result depends on the order of atomics.
// dweight/dbias: per-lane fp32 registers, one partial row per block, a fixed-order sum.
#include <ATen/Context.h>

#include "common.cuh"

namespace bertfast_cuda {
namespace {

constexpr int kTypeRowsInShared = 2;

// Token, type and position ids are int32 or int64, each on its own: read through a flag (a
// uniform branch) rather than one kernel per combination.
__device__ __forceinline__ int64_t load_id(const void* ids, bool i64, int64_t r) {
  return i64 ? static_cast<const int64_t*>(ids)[r] : static_cast<int64_t>(static_cast<const int32_t*>(ids)[r]);
}

inline bool is_i64(const at::Tensor& t) { return t.scalar_type() == at::kLong; }

inline at::Tensor check_ids(const at::Tensor& ids, int64_t N, const char* name) {
  TORCH_CHECK(ids.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, name, " must be int32 or int64, got ",
              ids.scalar_type());
  TORCH_CHECK(ids.numel() == N, name, " must have one id per token (", N, "), got ", ids.numel());
  return ids.reshape({-1}).contiguous();
}

// fp32 h = (word[id] + type[tt]) + pos[p] for one vector of a row.
template <typename T, int VEC>
__device__ __forceinline__ void gather_sum(const T* word, const T* type_emb, const T* pos_emb, int64_t id, int64_t tt,
                                           int64_t ps, int n, int col, float (&h)[VEC]) {
  float a[VEC], b[VEC], c[VEC];
  load_f<T, VEC>(word + id * n + col, a);
  load_f<T, VEC>(type_emb + tt * n + col, b);
  load_f<T, VEC>(pos_emb + ps * n + col, c);
#pragma unroll
  for (int k = 0; k < VEC; ++k) h[k] = (a[k] + b[k]) + c[k];
}

template <typename T, int VEC, bool BLOCK>
__global__ void __launch_bounds__(max_threads_of<VEC>()) emb_fwd_kernel(
    const void* __restrict__ ids, const void* __restrict__ tts, const void* __restrict__ pss, bool ids64, bool tts64,
    bool pss64, const T* __restrict__ word, const T* __restrict__ pos_emb, const T* __restrict__ type_emb,
    const void* __restrict__ w, const void* __restrict__ lb, bool pf,
    T* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd, int64_t M, int n, float eps, Dropout drop) {
  constexpr int NV = nv_of<VEC>();
  __shared__ float red[64];
  const RowGroup<BLOCK> grp;
  const int64_t row = grp.first;
  if (row >= M) return;  // warp rows only: a whole warp leaves, no block barrier follows
  const int64_t id = load_id(ids, ids64, row), tt = load_id(tts, tts64, row), ps = load_id(pss, pss64, row);
  float h[NV][VEC];
  float sum = 0.0f;
  uint32_t keep = 0u;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int col = grp.col(j, VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) h[j][k] = 0.0f;
    if (col < n) {
      gather_sum<T, VEC>(word, type_emb, pos_emb, id, tt, ps, n, col, h[j]);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        sum += h[j][k];
        // output offsets are the dropout offsets
        if (drop.on) keep |= static_cast<uint32_t>(dropout_keep(drop, row * n + col + k)) << (j * VEC + k);
      }
    }
  }
  layernorm_store<T, VEC, NV, BLOCK>(h, sum, grp, row, n, eps, w, lb, pf, drop.on, keep, drop.scale, y, mean, rstd,
                                     red);
}

// type_rows_shared: 0 (type rows go through global atomics) or the type table's row count (<= 2),
// summed per block in the dynamic shared memory (type_rows_shared * n floats) first.
template <typename T, int VEC, bool BLOCK>
__global__ void __launch_bounds__(max_threads_of<VEC>()) emb_bwd_kernel(
    const T* __restrict__ dy, const void* __restrict__ ids, const void* __restrict__ tts,
    const void* __restrict__ pss, bool ids64, bool tts64, bool pss64, const T* __restrict__ word,
    const T* __restrict__ pos_emb,
    const T* __restrict__ type_emb, const void* __restrict__ w, bool pf, const float* __restrict__ mean,
    const float* __restrict__ rstd, float* __restrict__ dword, float* __restrict__ dpos, float* __restrict__ dtype,
    float* __restrict__ dh_rows, float* __restrict__ part, int64_t M, int n, Dropout drop, bool deterministic,
    int type_rows_shared) {
  constexpr int NV = nv_of<VEC>();
  __shared__ float red[64];
  __shared__ float colsum[BLOCK ? 1 : 2 * 32 * NV * VEC];
  extern __shared__ float type_acc[];
  const RowGroup<BLOCK> grp;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
  for (int i = tid; i < type_rows_shared * n; i += nt) type_acc[i] = 0.0f;
  if (type_rows_shared) __syncthreads();
  float acc[2][NV][VEC];  // dweight, dbias
#pragma unroll
  for (int j = 0; j < NV; ++j) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[0][j][k] = acc[1][j][k] = 0.0f;
  }
  for (int64_t row = grp.first; row < M; row += grp.step) {
    const int64_t base = row * n;
    const int64_t id = load_id(ids, ids64, row), tt = load_id(tts, tts64, row), ps = load_id(pss, pss64, row);
    // xh, g: the gathered row h and dout * mask until layernorm_grad_terms makes them xhat and g
    float xh[NV][VEC], g[NV][VEC];
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int col = grp.col(j, VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) g[j][k] = xh[j][k] = 0.0f;
      if (col < n) {
        gather_sum<T, VEC>(word, type_emb, pos_emb, id, tt, ps, n, col, xh[j]);
        load_f<T, VEC>(dy + base + col, g[j]);
        if (drop.on) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) g[j][k] *= dropout_keep(drop, base + col + k) ? drop.scale : 0.0f;
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
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float dh = (g[j][k] - xh[j][k] * c1 - c2) * rs;
          if (deterministic) {
            dh_rows[base + col + k] = dh;
          } else {
            atomicAdd(dword + id * n + col + k, dh);
            atomicAdd(dpos + ps * n + col + k, dh);
            if (type_rows_shared) {
              atomicAdd(type_acc + tt * n + col + k, dh);
            } else {
              atomicAdd(dtype + tt * n + col + k, dh);
            }
          }
        }
      }
    }
  }
  write_partials<2, NV, VEC, BLOCK>(grp, acc, n, part, colsum);  // ends with a block barrier in warp rows
  if (type_rows_shared) {
    __syncthreads();
    for (int i = tid; i < type_rows_shared * n; i += nt) atomicAdd(dtype + i, type_acc[i]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emb_fwd(const at::Tensor& ids_, const at::Tensor& tt_,
                                                       const at::Tensor& pos_, const at::Tensor& word_,
                                                       const at::Tensor& pe_, const at::Tensor& te_,
                                                       const at::Tensor& weight_, const at::Tensor& bias_, double eps,
                                                       double p, int64_t seed) {
  check_rows(word_, "word_emb");
  const c10::cuda::CUDAGuard guard(word_.device());
  const at::Tensor word = word_.contiguous();
  const int n = static_cast<int>(word.size(1));
  TORCH_CHECK(pe_.dim() == 2 && pe_.size(1) == n && pe_.scalar_type() == word.scalar_type(),
              "pos_emb must be (rows, ", n, ") in word_emb's dtype");
  TORCH_CHECK(te_.dim() == 2 && te_.size(1) == n && te_.scalar_type() == word.scalar_type(),
              "type_emb must be (rows, ", n, ") in word_emb's dtype");
  const at::Tensor pe = pe_.contiguous(), te = te_.contiguous();
  const int64_t M = ids_.numel();
  const at::Tensor ids = check_ids(ids_, M, "input_ids"), tt = check_ids(tt_, M, "token_type_ids"),
                   pos = check_ids(pos_, M, "position_ids");
  check_vec(weight_, n, "weight");
  check_vec(bias_, n, "bias");
  const bool pf = params_in_fp32(word.scalar_type(), {&weight_, &bias_});
  const at::Tensor w = as_param(weight_, pf), lb = as_param(bias_, pf);
  at::Tensor y = at::empty({M, n}, word.options());
  at::Tensor mean = at::empty({M}, word.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({M}, word.options().dtype(at::kFloat));
  if (M == 0) return {y, mean, rstd};
  const Dropout drop = make_dropout(p, seed);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool al = aligned16(word.data_ptr()) && aligned16(pe.data_ptr()) && aligned16(te.data_ptr()) &&
                  aligned16(y.data_ptr()) && aligned16(w.data_ptr()) && aligned16(lb.data_ptr());
  dispatch_float(word.scalar_type(), "embedding_layernorm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const RowPlan plan = plan_rows(n, sizeof(T), al);
    with_variant<T>(plan, [&](auto vec, auto blk) {
      const int64_t grid = (M + plan.row_groups_per_block - 1) / plan.row_groups_per_block;
      emb_fwd_kernel<T, vec.value, blk.value><<<grid, plan.block_dim, 0, stream>>>(
          ids.data_ptr(), tt.data_ptr(), pos.data_ptr(), is_i64(ids), is_i64(tt), is_i64(pos), static_cast<const T*>(word.data_ptr()),
          static_cast<const T*>(pe.data_ptr()), static_cast<const T*>(te.data_ptr()), w.data_ptr(), lb.data_ptr(), pf,
          static_cast<T*>(y.data_ptr()), mean.data_ptr<float>(), rstd.data_ptr<float>(), M, n,
          static_cast<float>(eps), drop);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emb_bwd(
    const at::Tensor& dout_, const at::Tensor& ids_, const at::Tensor& tt_, const at::Tensor& pos_,
    const at::Tensor& word_, const at::Tensor& pe_, const at::Tensor& te_, const at::Tensor& weight_,
    const at::Tensor& bias_, const at::Tensor& mean_, const at::Tensor& rstd_, double eps, double p, int64_t seed) {
  (void)eps;
  check_rows(word_, "word_emb");
  const c10::cuda::CUDAGuard guard(word_.device());
  const at::Tensor word = word_.contiguous(), pe = pe_.contiguous(), te = te_.contiguous();
  const int n = static_cast<int>(word.size(1));
  TORCH_CHECK(pe.scalar_type() == word.scalar_type() && te.scalar_type() == word.scalar_type(),
              "pos_emb and type_emb must be in word_emb's dtype");
  const int64_t M = ids_.numel();
  const at::Tensor ids = check_ids(ids_, M, "input_ids"), tt = check_ids(tt_, M, "token_type_ids"),
                   pos = check_ids(pos_, M, "position_ids");
  const at::Tensor dout = dout_.scalar_type() == word.scalar_type() ? dout_.contiguous()
                                                                    : dout_.to(word.scalar_type()).contiguous();
  TORCH_CHECK(dout.numel() == M * n, "dout must be (tokens, hidden)");
  const at::Tensor mean = stats_f32(mean_), rstd = stats_f32(rstd_);
  check_vec(weight_, n, "weight");
  const bool pf = params_in_fp32(word.scalar_type(), {&weight_, &bias_});
  const at::Tensor w = as_param(weight_, pf);
  const auto popt = word.options().dtype(pf ? at::kFloat : word.scalar_type());
  const auto f32 = word.options().dtype(at::kFloat);
  // fp32 accumulation buffers (the gradients themselves for fp32 tables)
  at::Tensor dword = at::zeros(word.sizes(), f32), dpos = at::zeros(pe.sizes(), f32), dtype = at::zeros(te.sizes(), f32);
  at::Tensor dw = at::empty({n}, popt), db = at::empty({n}, popt);
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  if (M == 0) {
    dw.zero_();
    db.zero_();
  } else {
    const Dropout drop = make_dropout(p, seed);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    at::Tensor dh = deterministic ? at::empty({M, n}, f32) : at::Tensor();
    const int type_rows = static_cast<int>(te.size(0));
    const int shared_rows = (!deterministic && type_rows <= kTypeRowsInShared &&
                             static_cast<size_t>(type_rows) * n * sizeof(float) <= 32 * 1024)
                                ? type_rows
                                : 0;
    const size_t smem = static_cast<size_t>(shared_rows) * n * sizeof(float);
    const bool al = aligned16(word.data_ptr()) && aligned16(pe.data_ptr()) && aligned16(te.data_ptr()) &&
                    aligned16(dout.data_ptr()) && aligned16(w.data_ptr());
    dispatch_float(word.scalar_type(), "embedding_layernorm backward", [&](auto tag) {
      using T = typename decltype(tag)::type;
      const RowPlan plan = plan_rows(n, sizeof(T), al);
      with_variant<T>(plan, [&](auto vec, auto blk) {
        auto kernel = emb_bwd_kernel<T, vec.value, blk.value>;
        const int64_t work = (M + plan.row_groups_per_block - 1) / plan.row_groups_per_block;
        const int64_t G = persistent_grid(kernel, plan.block_dim.x * plan.block_dim.y, smem, work, word.get_device());
        at::Tensor part = at::empty({2, G, n}, f32);
        kernel<<<G, plan.block_dim, smem, stream>>>(
            static_cast<const T*>(dout.data_ptr()), ids.data_ptr(), tt.data_ptr(), pos.data_ptr(), is_i64(ids), is_i64(tt), is_i64(pos),
            static_cast<const T*>(word.data_ptr()), static_cast<const T*>(pe.data_ptr()),
            static_cast<const T*>(te.data_ptr()), w.data_ptr(), pf, mean.data_ptr<float>(), rstd.data_ptr<float>(),
            dword.data_ptr<float>(), dpos.data_ptr<float>(), dtype.data_ptr<float>(),
            deterministic ? dh.data_ptr<float>() : nullptr, part.data_ptr<float>(), M, n, drop, deterministic,
            shared_rows);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        sum_partials_as(popt.dtype().toScalarType(), part, G, n, 2, &dw, &db, nullptr, stream);
      });
    });
    if (deterministic) {
      for (auto [buf, idx] : {std::pair<at::Tensor*, const at::Tensor*>{&dword, &ids}, {&dpos, &pos}, {&dtype, &tt}}) {
        c10::List<std::optional<at::Tensor>> index;
        index.push_back(idx->to(at::kLong));
        buf->index_put_(index, dh, true);
      }
    }
  }
  return {dword.to(word_.scalar_type()), dpos.to(pe_.scalar_type()), dtype.to(te_.scalar_type()),
          dw.to(weight_.scalar_type()), db.to(bias_.scalar_type())};
}

}  // namespace
}  // namespace bertfast_cuda

TORCH_LIBRARY_FRAGMENT(bertfast, m) {
  m.def(
      "embedding_layernorm_cuda_fwd(Tensor ids, Tensor tt, Tensor pos, Tensor word, Tensor pos_emb, Tensor type_emb, "
      "Tensor weight, Tensor bias, float eps, float p, int seed) -> (Tensor, Tensor, Tensor)");
  m.def(
      "embedding_layernorm_cuda_bwd(Tensor dout, Tensor ids, Tensor tt, Tensor pos, Tensor word, Tensor pos_emb, "
      "Tensor type_emb, Tensor weight, Tensor bias, Tensor mean, Tensor rstd, float eps, float p, int seed) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bertfast, CUDA, m) {
  m.impl("embedding_layernorm_cuda_fwd", &bertfast_cuda::emb_fwd);
  m.impl("embedding_layernorm_cuda_bwd", &bertfast_cuda::emb_bwd);
}
