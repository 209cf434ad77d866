// bias_residual_layernorm_bf16: BERT's add-and-norm in bf16 CPU inference,
// out = LN(x + bias + residual), where x is a bf16 GEMM output and the residual stream is fp32
// (or bf16), with a bf16 copy of the result written in the same pass for the next GEMM.
//
// Why a kernel of its own: in bf16 inference every GEMM takes bf16 rows and returns bf16 rows,
// while the residual stream stays fp32. Through the plain add-and-norm that costs two casts per
// add-and-norm (the GEMM output widened to fp32 before it, the result narrowed to bf16 for the
// next GEMM after it), each a full pass over the rows in memory. Here x is widened in registers
// as it is read and the result is narrowed as it is stored, so the casts cost no pass at all.
// Statistics are fp32, as in every LayerNorm kernel; each output is rounded once on store
// (round-to-nearest-even, like Tensor.to(torch.bfloat16)), so the bf16 copy is bit for bit the
// cast of the fp32 result. Inference only: no dropout, no saved statistics, no backward.
#include "common.h"

namespace bertfast_cpu {
namespace {

template <typename TX, typename TR>
void brl_bf16_kernel(const TX* x, const float* bias, const TR* res, const float* w, const float* lb, TR* out,
                     c10::BFloat16* low, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(n);
    float* h = buf.data();
    for (int64_t r = r0; r < r1; ++r) {
      const TX* xr = x + r * n;
      const TR* rr = res + r * n;
      // h = x + bias + residual in fp32, and its sum, in one pass over the inputs (the row
      // stays in L1 for the variance and the normalisation)
      Vec sum(0.0f);
      vloop(n, [&](int64_t i, int64_t c) {
        Vec v = ldT(xr + i, c);
        if (bias) v = v + ld(bias + i, c);
        v = v + ldT(rr + i, c);
        st(v, h + i, c);
        sum += v;
      });
      float m, rs;
      stats_from_sum(h, n, sum, eps, m, rs);
      // one pass writes both outputs: the residual stream's dtype and the bf16 copy
      TR* orow = out + r * n;
      c10::BFloat16* lrow = low ? low + r * n : nullptr;
      const Vec vm(m), vr(rs);
      vloop(n, [&](int64_t i, int64_t c) {
        const Vec y = at::vec::fmadd((ld(h + i, c) - vm) * vr, ld(w + i, c), ld(lb + i, c));
        stT(y, orow + i, c);
        if (lrow) stT(y, lrow + i, c);
      });
    }
  });
}

// x: (rows, n) bf16 or fp32; residual: (rows, n) fp32 or bf16; out: where the result goes, in
// residual's dtype (None: fresh memory; it may be residual itself: a row is read before it is
// written); out_low: where the bf16 copy goes (None: fresh memory when `low`). Returns
// (out, the bf16 copy or an empty tensor without `low`).
std::tuple<at::Tensor, at::Tensor> brl_bf16_fwd(const at::Tensor& x_, const std::optional<at::Tensor>& bias_,
                                                const at::Tensor& res_, const at::Tensor& weight,
                                                const at::Tensor& ln_bias, double eps,
                                                const std::optional<at::Tensor>& out_,
                                                const std::optional<at::Tensor>& out_low_, bool low) {
  check_rows(x_, "x");
  check_rows(res_, "residual");
  const at::Tensor x = x_.contiguous(), res = res_.contiguous();
  TORCH_CHECK(res.sizes() == x.sizes(), "residual must have the shape of x ", x.sizes(), ", got ", res.sizes());
  const auto xt = x.scalar_type(), rt = res.scalar_type();
  TORCH_CHECK(xt == at::kBFloat16 || xt == at::kFloat, "x must be bfloat16 or float32, got ", xt);
  TORCH_CHECK(rt == at::kBFloat16 || rt == at::kFloat, "residual must be float32 or bfloat16, got ", rt);
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(weight.numel() == n && ln_bias.numel() == n, "weight and ln_bias must have ", n, " elements");
  const bool has_bias = bias_.has_value() && bias_->defined();
  TORCH_CHECK(!has_bias || bias_->numel() == n, "bias must have ", n, " elements, got ", bias_->numel());
  const at::Tensor w = vec_f32(weight), lb = vec_f32(ln_bias);
  const at::Tensor b = has_bias ? vec_f32(*bias_) : at::Tensor();
  at::Tensor out;
  if (out_.has_value() && out_->defined()) {
    out = *out_;
    TORCH_CHECK(out.is_contiguous() && out.sizes() == x.sizes() && out.scalar_type() == rt,
                "out must be a contiguous ", rt, " tensor of shape ", x.sizes());
  } else {
    out = new_output(x.sizes(), res.options());
  }
  at::Tensor lo;
  if (low) {
    if (out_low_.has_value() && out_low_->defined()) {
      lo = *out_low_;
      TORCH_CHECK(lo.is_contiguous() && lo.sizes() == x.sizes() && lo.scalar_type() == at::kBFloat16,
                  "out_low must be a contiguous bfloat16 tensor of shape ", x.sizes());
    } else {
      lo = new_output(x.sizes(), x.options().dtype(at::kBFloat16));
    }
  } else {
    lo = at::empty({0}, x.options().dtype(at::kBFloat16));
  }
  const float* bp = has_bias ? b.data_ptr<float>() : nullptr;
  c10::BFloat16* lp = low ? lo.data_ptr<c10::BFloat16>() : nullptr;
  const float e = static_cast<float>(eps);
  auto run = [&](auto x_tag, auto r_tag) {
    using TX = decltype(x_tag);
    using TR = decltype(r_tag);
    brl_bf16_kernel<TX, TR>(x.data_ptr<TX>(), bp, res.data_ptr<TR>(), w.data_ptr<float>(), lb.data_ptr<float>(),
                            out.data_ptr<TR>(), lp, rows, n, e);
  };
  if (xt == at::kBFloat16) {
    if (rt == at::kFloat) run(c10::BFloat16{}, float{}); else run(c10::BFloat16{}, c10::BFloat16{});
  } else {
    if (rt == at::kFloat) run(float{}, float{}); else run(float{}, c10::BFloat16{});
  }
  return {out, lo};
}

}  // namespace
}  // namespace bertfast_cpu

TORCH_LIBRARY_FRAGMENT(bertfast, m) {
  m.def(
      "bias_residual_layernorm_bf16_cpu_fwd(Tensor x, Tensor? bias, Tensor residual, Tensor weight, Tensor ln_bias, "
      "float eps, Tensor? out, Tensor? out_low, bool low) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bertfast, CPU, m) {
  m.impl("bias_residual_layernorm_bf16_cpu_fwd", &bertfast_cpu::brl_bf16_fwd);
}
