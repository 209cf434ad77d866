"""The fused ops of bertfast, each with a plain-PyTorch reference (`<op>_ref`)."""
from .attention import attention, attention_ref
from .bias_gelu import bias_gelu, bias_gelu_ref
from .bias_residual_layernorm import bias_residual_layernorm, bias_residual_layernorm_ref
from .bias_residual_layernorm_bf16 import bias_residual_layernorm_bf16, bias_residual_layernorm_bf16_ref
from .embedding_layernorm import embedding_layernorm, embedding_layernorm_ref
from .gelu_layernorm import gelu_layernorm, gelu_layernorm_ref

# the fused ops with forward and backward (bias_residual_layernorm_bf16 is an inference-only helper of
# the bf16 CPU encoder, beside them)
OPS = ("embedding_layernorm", "attention", "bias_gelu", "bias_residual_layernorm", "gelu_layernorm")

__all__ = ["OPS", "attention", "attention_ref", "bias_gelu", "bias_gelu_ref", "bias_residual_layernorm",
           "bias_residual_layernorm_bf16", "bias_residual_layernorm_bf16_ref", "bias_residual_layernorm_ref",
           "embedding_layernorm", "embedding_layernorm_ref", "gelu_layernorm", "gelu_layernorm_ref"]
