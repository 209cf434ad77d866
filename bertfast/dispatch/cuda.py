"""The CUDA C++ backend: csrc/cuda/*.cu, reached through torch.ops.bertfast.<op>_cuda_{fwd,bwd}.

`load()` makes the kernels available, only where they can run: a CUDA build of torch
(torch.version.cuda), a visible CUDA device, nvcc (torch's CUDA_HOME) and ninja. Otherwise it
raises with a one-line reason and dispatch serves the call elsewhere (one warning
when the `cuda` backend was asked for). A CPU-only machine never tries to build anything.

Build: torch.utils.cpp_extension.load with ninja, on first use, cached in torch's extension
directory under a name keyed by a hash of the sources, the flags and the torch version (later
processes load the cached library directly; editing a source makes a new build). The default
targets are `-gencode=arch=compute_90a,code=sm_90a` (H100/H200), sm_80 (A100) and compute_80
PTX (anything newer); BERTFAST_CUDA_ARCH=native builds for the visible device only (a faster
first build: benchmarks/gpu_check.sh uses it), or a list such as "90a,80".

The schemas (csrc/cuda/*.cu) are named <op>_cuda_fwd/_bwd, distinct from the C++ CPU
extension's <op>_cpu_fwd/_bwd, so both libraries load into one process. The wrappers below have
the backend signatures of each op's `_fwd_reference` / `_bwd_reference`; what they serve (float64
goes to the reference; the bias_gelu backward stops at 8192 columns) is declared in
dispatch/table.py.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
import time

import torch

from . import cpp as _cpp
from .cpp import clear_stale_lock, ext_root, first_error_line

_lock = threading.RLock()
_state: dict = {"state": "not loaded", "reason": None, "build_seconds": None, "path": None, "arch": None}
_LOADED: str | None = None
_OPS: dict = {}

DEFAULT_ARCHS = ("90a", "80")  # SASS for these; PTX of the lowest for newer GPUs
# torch's cpp_extension adds its own C++ standard (c++17 or c++20 by version) and
# --expt-relaxed-constexpr, the no-half-operator defines and -fPIC
_CUDA_FLAGS = ["-O3"]
_CFLAGS = ["-O3"]
OPS = ("embedding_layernorm", "bias_gelu", "bias_residual_layernorm", "gelu_layernorm")


_PATTERNS = ("*.cu", "*.cuh")


def source_dir() -> str | None:
    """The folder holding the CUDA sources (csrc/cuda/*.cu), or None when none is shipped."""
    return _cpp.source_dir("cuda", "*.cu")


def source_files(src: str) -> list[str]:
    return _cpp.source_files(src, _PATTERNS)


def source_hash(src: str) -> str:
    return _cpp.source_hash(src, _PATTERNS)


def archs() -> tuple:
    """The SASS targets, e.g. ("90a", "80"): BERTFAST_CUDA_ARCH (a list, or "native" for the
    visible device), else DEFAULT_ARCHS."""
    want = os.environ.get("BERTFAST_CUDA_ARCH", "").strip().lower()
    if not want:
        return DEFAULT_ARCHS
    if want == "native":
        major, minor = torch.cuda.get_device_capability()
        # Hopper's arch-specific features (sm_90a) and Blackwell's (sm_100a) need the "a" target
        return (f"{major}{minor}" + ("a" if major >= 9 else ""),)
    out = tuple(a.strip().replace(".", "").replace("sm_", "") for a in want.replace(";", ",").split(",") if a.strip())
    for a in out:
        if not a.rstrip("a").isdigit():
            raise ValueError(f"BERTFAST_CUDA_ARCH must be 'native' or a list like '90a,80', got {want!r}")
    return out


def arch_flags(targets: tuple) -> list[str]:
    """-gencode flags: SASS for every target, plus PTX of the lowest one (forward compatibility)."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in targets]
    low = min(targets, key=lambda a: int(a.rstrip("a")))
    flags.append(f"-gencode=arch=compute_{low},code=compute_{low}")
    return flags


def nvcc_flags(targets: tuple) -> list[str]:
    """Every nvcc flag the JIT build passes besides torch's own (include paths, the no-half-operator
    defines, TORCH_EXTENSION_NAME, the C++ standard); tests/dispatch/test_cuda_compile.py compiles with the same."""
    return _CUDA_FLAGS + arch_flags(targets)


def torch_cxx_std() -> str:
    """The -std= flag torch's cpp_extension gives nvcc when none is passed (c++20 from torch 2.10 on)."""
    from torch.utils import cpp_extension

    with open(cpp_extension.__file__) as fh:
        return "-std=c++20" if "'-std=c++20'" in fh.read() else "-std=c++17"


def _why_unavailable() -> str | None:
    if not torch.version.cuda:
        return f"this torch ({torch.__version__}) is not a CUDA build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    from torch.utils import cpp_extension

    if not cpp_extension.CUDA_HOME:
        return "nvcc not found (set CUDA_HOME)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _jit_build(src: str) -> None:
    global _LOADED
    from torch.utils import cpp_extension

    targets = archs()
    cuda_flags = nvcc_flags(targets)
    src_hash = source_hash(src)
    key = hashlib.sha256(" ".join(cuda_flags + _CFLAGS + [torch.__version__, str(torch.version.cuda)])
                         .encode()).hexdigest()[:10]
    build_dir = os.path.join(ext_root(), f"bertfast_cuda_{key}")
    name = f"bertfast_cuda_{src_hash}"
    lib = os.path.join(build_dir, name + ".so")
    arch = ",".join(targets)
    if os.path.isfile(lib):
        torch.ops.load_library(lib)
        _LOADED = lib
        _state.update(state="cached", path=lib, arch=arch, reason=None)
        return
    os.makedirs(build_dir, exist_ok=True)
    clear_stale_lock(build_dir)
    jobs_set = "MAX_JOBS" in os.environ
    if not jobs_set:
        os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, 16)))
    t0 = time.perf_counter()
    try:
        cpp_extension.load(name=name, sources=[f for f in source_files(src) if f.endswith(".cu")],
                           extra_cflags=_CFLAGS, extra_cuda_cflags=cuda_flags + [f"-I{src}"],
                           build_directory=build_dir, is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - report nvcc's first error, not ninja's wall of text
        raise RuntimeError(f"CUDA kernels failed to build ({arch}): {first_error_line(str(e))}") from None
    finally:
        if not jobs_set:
            os.environ.pop("MAX_JOBS", None)
    dt = time.perf_counter() - t0
    _LOADED = lib
    _state.update(state="built", path=lib, arch=arch, build_seconds=round(dt, 1), reason=None)
    print(f"bertfast: built the CUDA kernels (sm {arch}) in {dt:.1f} s; cached in {build_dir}", file=sys.stderr)


def load() -> None:
    """Make torch.ops.bertfast.*_cuda_* available; raise with a one-line reason when impossible."""
    with _lock:
        if _LOADED is not None:
            return
        if _state.get("state") == "failed":
            raise RuntimeError(_state["error"])  # every op's loader calls load(): fail once, not per op
        try:
            why = _why_unavailable()
            if why is not None:
                raise RuntimeError(why)
            src = source_dir()
            if src is None:
                raise RuntimeError("no CUDA sources (csrc/cuda) shipped")
            _jit_build(src)
            _bind_ops()
        except Exception as e:
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            _state.update(state="failed", error=str(e).splitlines()[0][:300], reason=msg)
            raise


def _bind_ops() -> None:
    ns = torch.ops.bertfast
    for op in OPS:
        for d in ("fwd", "bwd"):
            overload = getattr(ns, f"{op}_cuda_{d}").default
            # the overload's C++ callable: one Python frame less per call (OpOverload.__call__ only forwards)
            _OPS[f"{op}_{d}"] = getattr(overload, "_op", overload)


def status() -> dict:
    """For `bertfast info`: state (not loaded / cached / built / failed), reason, build_seconds,
    path and arch of the library."""
    return {k: v for k, v in _state.items() if k != "error"}


# ---------------------------------------------------------------------------------------
# backend entry points (signatures: the `_fwd_reference` / `_bwd_reference` of each op)

def embedding_layernorm_fwd(ids, tt, pos, word, pos_emb, type_emb, weight, bias, eps, p, seed):
    return _OPS["embedding_layernorm_fwd"](ids, tt, pos, word, pos_emb, type_emb, weight, bias, eps, p, seed)


def embedding_layernorm_bwd(dout, ids, tt, pos, word, pos_emb, type_emb, weight, bias, mean, rstd, eps, p, seed):
    return _OPS["embedding_layernorm_bwd"](dout, ids, tt, pos, word, pos_emb, type_emb, weight, bias, mean, rstd, eps,
                                           p, seed)


def bias_gelu_fwd(x, bias, approximate, inplace=False):
    """inplace is accepted for the backend contract and ignored (only the CPU kernels use it)."""
    return _OPS["bias_gelu_fwd"](x, bias, approximate == "tanh")


def bias_gelu_bwd(dout, x, bias, approximate):
    return _OPS["bias_gelu_bwd"](dout, x, bias, approximate == "tanh")


def bias_residual_layernorm_fwd(x, bias, residual, weight, ln_bias, eps, p, seed, inplace=False):
    return _OPS["bias_residual_layernorm_fwd"](x, bias, residual, weight, ln_bias, eps, p, seed)


def bias_residual_layernorm_bwd(dout, x, bias, residual, weight, ln_bias, mean, rstd, eps, p, seed):
    dx, dbias, dres, dw, dlb = _OPS["bias_residual_layernorm_bwd"](dout, x, bias, residual, weight, ln_bias, mean,
                                                                   rstd, eps, p, seed)
    return dx, (None if bias is None else dbias), dres, dw, dlb


def gelu_layernorm_fwd(x, bias, weight, ln_bias, eps, approximate):
    return _OPS["gelu_layernorm_fwd"](x, bias, weight, ln_bias, eps, approximate == "tanh")


def gelu_layernorm_bwd(dout, x, bias, weight, ln_bias, mean, rstd, eps, approximate):
    return _OPS["gelu_layernorm_bwd"](dout, x, bias, weight, ln_bias, mean, rstd, eps, approximate == "tanh")
