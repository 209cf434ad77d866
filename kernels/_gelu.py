"""GELU and its derivative on fp32 register values, erf form (BERT's) or tanh form: shared by
the bias_gelu and gelu_layernorm kernels."""
import triton
import triton.language as tl


@triton.jit
def _tanh(u):
    # tanh(u) = 1 - 2 / (exp(2u) + 1): saturates cleanly at +-1 (exp -> inf or 0) and needs no
    # libdevice call, so it runs the same in the interpreter and on every Triton version.
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def gelu(h, TANH: tl.constexpr):
    """GELU of fp32 h, as torch.nn.functional.gelu(approximate='tanh' if TANH else 'none').
    Constants: 1/sqrt(2) = 0.70710678..., sqrt(2/pi) = 0.79788456..., 1/sqrt(2*pi) = 0.39894228..."""
    if TANH:
        return 0.5 * h * (1.0 + _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))
    else:
        return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))


@triton.jit
def gelu_grad(h, TANH: tl.constexpr):
    """d GELU(h) / dh for fp32 h (bertfast.ops._common.gelu_grad)."""
    if TANH:
        t = _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h * h)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        return cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
