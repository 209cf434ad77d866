"""Which implementation serves each fused-op call, decided in one place.

- table.py: every (op, implementation) row: what it declares it serves, where it lives (real
  imports, made on first use), which BERTFAST_BACKEND name forces it;
- serves.py: the declarations' vocabulary (`Call`, `Serves`, `not_supported_reasons`);
- core.py: `select(op, call)`, probes, the BERTFAST_BACKEND / use_backend / BERTFAST_STRICT
  switches, `explain` for `bertfast info`;
- routing.py + routing_tables/: the measured tables a GPU run writes (bench/routes.py);
- cpp.py, cuda.py: the C++ CPU and CUDA C++ extensions' build wrappers and entry points;
- torch_attention.py: PyTorch's attention kernels (ATen CPU flash, SDPA, varlen_attn) with the
  attention op's backend signatures;
- cpu_gemm.py: CPU inference GEMMs through the library measured fastest per shape.

Importing this package imports neither torch nor triton; the implementations load on first use.
"""
from .core import (  # noqa: F401
    BACKENDS,
    BackendError,
    Impl,
    explain,
    register_op,
    registered_ops,
    requested,
    reset,
    resolve_encoder,
    select,
    strict,
    use_backend,
)
from .serves import Call  # noqa: F401
