"""The C++ CPU backend: csrc/cpu/*.cpp, reached through torch.ops.bertfast.<op>_cpu_{fwd,bwd}.

`load()` makes the kernels available, in this order:
1. already loaded in this process: nothing to do;
2. a prebuilt `bertfast._C` (setup.py builds it when BERTFAST_BUILD_EXT=1 at install time),
   used when its build tag (read from the binary before loading it) names the same sources
   as the ones shipped and a CPU capability this machine has;
3. a JIT build with torch.utils.cpp_extension.load and ninja, cached in torch's extension
   directory under a name keyed by a hash of the sources, the flags and the torch version:
   the first use builds (the build time is printed once, on stderr), later processes load the
   cached library directly, and editing a source makes a new build.
A failure raises with a one-line reason (the compiler's first error line); dispatch then
serves the call elsewhere (one warning when a kernel was expected). `status()` reports the
outcome for `bertfast info`.

Sources live in csrc/cpu in a checkout and in the package data bertfast/csrc/cpu in an
install; BERTFAST_CSRC_DIR points at another directory holding a `cpu/` folder.

Instruction set: chosen from torch.backends.cpu.get_cpu_capability() (what ATen itself uses
on this machine, honouring ATEN_CPU_CAPABILITY), or BERTFAST_CPU_CAPABILITY=avx512|avx2|default;
at::vec::Vectorized<float> is then 16 (AVX512) or 8 (AVX2) lanes wide.

The wrappers below have the backend signatures of each op's `_fwd_reference` /
`_bwd_reference` (see the "---- backends" block in bertfast/ops/<op>.py). What they serve
(fp32/fp16/bf16 on CPU tensors; float64 goes to the reference: the kernels compute in fp32) is
declared in dispatch/table.py.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import platform
import re
import sys
import threading
import time

import torch

_lock = threading.RLock()
_state: dict = {"state": "not loaded", "reason": None, "build_seconds": None, "path": None, "capability": None}
_LOADED: str | None = None  # path of the library loaded into this process
_OPS: dict = {}
_TAG_RE = re.compile(rb"BERTFAST_BUILD_TAG source=(\w+) capability=(\w+);")

_CAP_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt", "-DCPU_CAPABILITY=AVX2",
             "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
}
_CAP_RANK = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}
_BASE_CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-Wno-unused-function"]
_LDFLAGS = ["-fopenmp"]


# ---------------------------------------------------------------------------------------
# sources, flags, build tag

def source_dir(sub: str = "cpu", pattern: str = "*.cpp") -> str | None:
    """The folder holding the C++ sources (csrc/<sub>/<pattern>), or None when none is shipped."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the bertfast package
    candidates = []
    if os.environ.get("BERTFAST_CSRC_DIR"):
        candidates.append(os.environ["BERTFAST_CSRC_DIR"])
    candidates += [os.path.join(os.path.dirname(here), "csrc"), os.path.join(here, "csrc")]
    for c in candidates:
        if glob.glob(os.path.join(c, sub, pattern)):
            return os.path.join(c, sub)
    return None


def source_files(src: str, patterns=("*.cpp", "*.h")) -> list[str]:
    return sorted(f for p in patterns for f in glob.glob(os.path.join(src, p)))


def source_hash(src: str, patterns=("*.cpp", "*.h")) -> str:
    """Hash of the file names and contents under `src`: names a build of exactly these sources.
    setup.py computes the same hash for the prebuilt extension."""
    h = hashlib.sha256()
    for f in source_files(src, patterns):
        h.update(os.path.basename(f).encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    return "h" + h.hexdigest()[:16]


def capability() -> str:
    """The instruction set to compile for: AVX512, AVX2 or DEFAULT (portable C++)."""
    forced = os.environ.get("BERTFAST_CPU_CAPABILITY", "").strip().upper()
    if forced:
        if forced not in _CAP_FLAGS:
            raise ValueError(f"BERTFAST_CPU_CAPABILITY must be one of {sorted(_CAP_FLAGS)}, got {forced!r}")
        return forced
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "DEFAULT"
    try:
        cap = torch.backends.cpu.get_cpu_capability().upper()
    except Exception:  # noqa: BLE001 - old torch: no capability query, stay portable
        return "DEFAULT"
    return cap if cap in _CAP_FLAGS else "DEFAULT"


def compile_flags(cap: str) -> list[str]:
    return _BASE_CFLAGS + _CAP_FLAGS[cap]


def read_build_tag(path: str) -> tuple[str, str] | None:
    """(source hash, capability) baked into a built library, read from the file (not loaded)."""
    try:
        with open(path, "rb") as fh:
            m = _TAG_RE.search(fh.read())
    except OSError:
        return None
    return (m.group(1).decode(), m.group(2).decode()) if m else None


def ext_root() -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions")
    tv = re.sub(r"[^0-9A-Za-z_]", "_", torch.__version__)
    return os.path.join(root, f"py{sys.version_info.major}{sys.version_info.minor}_torch{tv}")


def first_error_line(text: str) -> str:
    for line in text.splitlines():
        if "error" in line.lower() and ("error:" in line or "Error" in line) and "Error building" not in line:
            return line.strip()[:300]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0][:300] if lines else "unknown error"


# ---------------------------------------------------------------------------------------
# loading

def _load_library(path: str) -> None:
    global _LOADED
    torch.ops.load_library(path)
    _LOADED = path


def _try_prebuilt(src: str | None, cap: str) -> str | None:
    """Load bertfast._C when it fits this machine and these sources; return why not otherwise."""
    spec = importlib.util.find_spec("bertfast._C")
    if spec is None or not spec.origin:
        return "no prebuilt bertfast._C"
    tag = read_build_tag(spec.origin)
    if tag is None:
        return f"{spec.origin} has no build tag"
    built_hash, built_cap = tag
    if _CAP_RANK.get(built_cap, 99) > _CAP_RANK.get(cap, 0):
        return f"prebuilt for {built_cap}, this CPU runs {cap}"
    if src is not None and built_hash != source_hash(src):
        return "prebuilt from other sources"
    _load_library(spec.origin)
    _state.update(state="prebuilt", path=spec.origin, capability=built_cap, reason=None)
    return None


def _jit_build(src: str, cap: str) -> None:
    from torch.utils import cpp_extension

    src_hash = source_hash(src)
    cflags = compile_flags(cap)
    # One build folder per (flags, torch version): ninja there recompiles only the sources that
    # changed; the library's name carries the source hash, so a later process finds a library
    # built from exactly its sources without running ninja or a compiler.
    key = hashlib.sha256(" ".join(cflags + [torch.__version__]).encode()).hexdigest()[:10]
    build_dir = os.path.join(ext_root(), f"bertfast_cpu_{cap.lower()}_{key}")
    name = f"bertfast_cpu_{src_hash}"
    lib = os.path.join(build_dir, name + ".so")
    if os.path.isfile(lib) and read_build_tag(lib) == (src_hash, cap):
        _load_library(lib)
        _state.update(state="cached", path=lib, capability=cap, reason=None)
        return
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("cannot build the C++ CPU kernels: ninja is not installed (pip install ninja)")
    os.makedirs(build_dir, exist_ok=True)
    # The build tag (source hash) goes into a generated file, not into the flags: a flag change
    # would make ninja recompile every source.
    tag_src = os.path.join(build_dir, "build_tag.cpp")
    tag_text = f'#define BERTFAST_SOURCE_HASH {src_hash}\n#include "{os.path.join(src, "build_info.cpp")}"\n'
    if not os.path.isfile(tag_src) or open(tag_src).read() != tag_text:
        with open(tag_src + ".tmp", "w") as fh:
            fh.write(tag_text)
        os.replace(tag_src + ".tmp", tag_src)
    sources = [f for f in source_files(src) if f.endswith(".cpp") and os.path.basename(f) != "build_info.cpp"]
    clear_stale_lock(build_dir)
    # ninja's default (cores + 2 jobs) oversubscribes small shared machines; MAX_JOBS still wins.
    jobs_set = "MAX_JOBS" in os.environ
    if not jobs_set:
        os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, 8)))
    jobs = int(os.environ["MAX_JOBS"]) if os.environ["MAX_JOBS"].isdigit() else 1
    # Said before the wait, not after it: the first build is silent for most of a minute otherwise.
    # The sources take about a minute of CPU time in all (docs/install.md), so even one job ends
    # in about a minute; more jobs only shorten it.
    print(f"bertfast: building the C++ CPU kernels once ({cap}), about a minute with {jobs} compile "
          f"job{'s' * (jobs > 1)}; later runs load the cached build", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        cpp_extension.load(name=name, sources=sources + [tag_src], extra_cflags=cflags + [f"-I{src}"],
                           extra_ldflags=_LDFLAGS, build_directory=build_dir, is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - report the compiler's first error, not ninja's wall of text
        raise RuntimeError(f"C++ CPU kernels failed to build ({cap}): {first_error_line(str(e))}") from None
    finally:
        if not jobs_set:
            os.environ.pop("MAX_JOBS", None)
    dt = time.perf_counter() - t0
    global _LOADED
    _LOADED = lib  # cpp_extension.load(is_python_module=False) loaded it into torch.ops
    _state.update(state="built", path=lib, capability=cap, build_seconds=round(dt, 1), reason=None)
    print(f"bertfast: built the C++ CPU kernels ({cap}) in {dt:.1f} s; cached in {build_dir}", file=sys.stderr)


def clear_stale_lock(build_dir: str, max_age_s: float = 900.0) -> None:
    """torch's build lock is a plain file: a build killed midway leaves it behind and every later
    process would wait on it forever. A lock older than any real build (15 min) is removed."""
    lock = os.path.join(build_dir, "lock")
    try:
        if time.time() - os.path.getmtime(lock) > max_age_s:
            os.remove(lock)
    except OSError:
        pass


def load() -> None:
    """Make torch.ops.bertfast.*_cpu_* available; raise with a one-line reason when impossible."""
    with _lock:
        if _LOADED is not None:
            return
        key = None
        try:
            cap = capability()
            src = source_dir()
            key = (src, cap, source_hash(src) if src else None)
            # Every op's backend loader calls load(): a build that failed for these very sources
            # fails again at once instead of recompiling once per op.
            if _state.get("state") == "failed" and _state.get("key") == key:
                raise RuntimeError(_state["error"])
            why_not_prebuilt = _try_prebuilt(src, cap)
            if why_not_prebuilt is not None:
                if src is None:
                    raise RuntimeError(f"no C++ sources (csrc/cpu) shipped and {why_not_prebuilt}")
                _jit_build(src, cap)
            _bind_ops()
        except Exception as e:
            if not (_state.get("state") == "failed" and _state.get("key") == key):
                _state.update(state="failed", key=key, error=str(e).splitlines()[0][:300],
                              reason=f"{type(e).__name__}: {e}".splitlines()[0][:300])
            raise


def _bind_ops() -> None:
    ns = torch.ops.bertfast
    for op in ("embedding_layernorm", "bias_gelu", "bias_residual_layernorm", "gelu_layernorm", "attention"):
        for d in ("fwd", "bwd"):
            _OPS[f"{op}_{d}"] = getattr(ns, f"{op}_cpu_{d}").default
    _OPS["bias_residual_layernorm_bf16_fwd"] = ns.bias_residual_layernorm_bf16_cpu_fwd.default  # inference only


def status() -> dict:
    """For `bertfast info`: state (not loaded / prebuilt / cached / built / failed), reason,
    build_seconds (this process's build, if any), path and capability of the library."""
    return {k: v for k, v in _state.items() if k not in ("key", "error")}


# ---------------------------------------------------------------------------------------
# backend entry points (signatures: the `_fwd_reference` / `_bwd_reference` of each op)

def embedding_layernorm_fwd(ids, tt, pos, word, pos_emb, type_emb, weight, bias, eps, p, seed):
    return _OPS["embedding_layernorm_fwd"](ids, tt, pos, word, pos_emb, type_emb, weight, bias, float(eps), float(p),
                                           int(seed))


def embedding_layernorm_bwd(dout, ids, tt, pos, word, pos_emb, type_emb, weight, bias, mean, rstd, eps, p, seed):
    return _OPS["embedding_layernorm_bwd"](dout, ids, tt, pos, word, pos_emb, type_emb, weight, bias, mean, rstd,
                                           float(eps), float(p), int(seed))


def bias_gelu_fwd(x, bias, approximate, inplace=False):
    """inplace=True writes the result over x when x is contiguous (bertfast.ops.bias_gelu(inplace=True))."""
    return _OPS["bias_gelu_fwd"](x, bias, approximate == "tanh", inplace)


def bias_gelu_bwd(dout, x, bias, approximate):
    return _OPS["bias_gelu_bwd"](dout, x, bias, approximate == "tanh")


def bias_residual_layernorm_fwd(x, bias, residual, weight, ln_bias, eps, p, seed, inplace=False):
    """inplace=True writes the result over x when x is contiguous (see bias_gelu_fwd)."""
    return _OPS["bias_residual_layernorm_fwd"](x, bias, residual, weight, ln_bias, float(eps), float(p), int(seed),
                                               inplace)


def bias_residual_layernorm_bwd(dout, x, bias, residual, weight, ln_bias, mean, rstd, eps, p, seed):
    dx, dbias, dres, dw, dlb = _OPS["bias_residual_layernorm_bwd"](dout, x, bias, residual, weight, ln_bias, mean,
                                                                   rstd, float(eps), float(p), int(seed))
    return dx, (None if bias is None else dbias), dres, dw, dlb


def bias_residual_layernorm_bf16_fwd(x, bias, residual, weight, ln_bias, eps, out=None, out_low=None, low=True):
    """bf16 inference add-and-norm: (out in residual's dtype, its bf16 copy or None)."""
    y, lo = _OPS["bias_residual_layernorm_bf16_fwd"](x, bias, residual, weight, ln_bias, float(eps), out, out_low,
                                                     bool(low))
    return y, (lo if low else None)


def gelu_layernorm_fwd(x, bias, weight, ln_bias, eps, approximate):
    return _OPS["gelu_layernorm_fwd"](x, bias, weight, ln_bias, float(eps), approximate == "tanh")


def gelu_layernorm_bwd(dout, x, bias, weight, ln_bias, mean, rstd, eps, approximate):
    return _OPS["gelu_layernorm_bwd"](dout, x, bias, weight, ln_bias, mean, rstd, float(eps), approximate == "tanh")


def attention_fwd(q, k, v, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed):
    """Padded (B, S, H, D) with an fp32 (B, Sk) key bias, or varlen (total, H, D) with cu_seqlens;
    returns (out, lse) as bertfast.ops.attention's backend contract."""
    return _OPS["attention_fwd"](q, k, v, key_bias, cu_q, cu_k, int(max_q), int(max_k), float(p), float(scale),
                                 bool(causal), int(seed))


def attention_bwd(dout, q, k, v, out, lse, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed):
    """FlashAttention-2's backward (P recomputed from the saved lse) in C++: returns (dq, dk, dv)."""
    return _OPS["attention_bwd"](dout, q, k, v, out, lse, key_bias, cu_q, cu_k, int(max_q), int(max_k), float(p),
                                 float(scale), bool(causal), int(seed))
