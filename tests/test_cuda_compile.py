"""Compile-only check of the CUDA sources (csrc/cuda/*.cu) where nvcc exists, GPU or not.

Every .cu file is compiled to an object for sm_90a with the JIT build's flags (bertfast/_cuda.py
nvcc_flags, torch's include paths and defines; torch's headers ship in the CPU wheel too), with
`-Xptxas -v`: a compile error fails the test, and so does any 16-byte-vector kernel that spills
registers to local memory (the hot path is sized to stay within its launch bounds without
spills; the scalar fallback for odd widths and misaligned rows may spill a little). The
registers, spills and shared memory of every kernel are printed (pytest -s) and written to
<cache>/report.txt.

Cost: ~40 CPU-seconds per file for one architecture, so the files are
compiled concurrently (one nvcc each) for sm_90a only (the JIT build adds sm_80 and PTX on a GPU
machine); the objects and the ptxas report are cached under a hash of the sources, the flags and
the nvcc version (BERTFAST_CUDA_CHECK_CACHE, default ~/.cache/bertfast_cuda_check), so a rerun
with unchanged sources costs nothing and any edit recompiles.
"""
import glob
import hashlib
import os
import re
import shutil
import subprocess

import pytest
import torch

from bertfast import _cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "csrc", "cuda")
ARCH = "sm_90a"


def _nvcc():
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME and os.path.isfile(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        return os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
pytestmark = [pytest.mark.skipif(NVCC is None, reason="nvcc not found"), pytest.mark.slow]


def _flags():
    from torch.utils import cpp_extension

    inc = cpp_extension.include_paths()
    flags = [f"-I{p}" for p in inc] + [f"-I{SRC}"]
    flags += ["-DTORCH_EXTENSION_NAME=bertfast_cuda_check", "-DTORCH_API_INCLUDE_EXTENSION_H",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
    if not any(os.path.isfile(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in inc):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # a CPU wheel lacks this generated header
    flags += cpp_extension.COMMON_NVCC_FLAGS + [_cuda.torch_cxx_std()]
    flags += [f for f in _cuda.nvcc_flags(("90a",)) if not f.startswith("-gencode")]
    return flags + [f"-arch={ARCH}", "-Xptxas", "-v", "-Xcompiler", "-fPIC"]


def _key(files, flags):
    h = hashlib.sha256()
    h.update(subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout.encode())
    h.update(" ".join(flags).encode())
    for f in sorted(glob.glob(os.path.join(SRC, "*"))):
        h.update(os.path.basename(f).encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:16]


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


_KERNEL = re.compile(r"([a-z_]+_kernel)I(13__nv_bfloat16|6__half|f)(?:Li(\d+)ELb([01])E)?E")
_TYPES = {"13__nv_bfloat16": "bf16", "6__half": "fp16", "f": "fp32"}


def _demangled(name: str) -> str:
    """'brln_bwd_kernel<bf16, VEC 8, warp rows>' from the mangled name (enough to tell variants apart)."""
    m = _KERNEL.search(name)
    if not m:
        return name
    if m.group(3) is None:
        return f"{m.group(1)}<{_TYPES[m.group(2)]}>"
    return f"{m.group(1)}<{_TYPES[m.group(2)]}, VEC {m.group(3)}, {'block' if m.group(4) == '1' else 'warp'} rows>"


def parse_ptxas(text: str) -> list[dict]:
    """One dict per kernel: name, registers, stack, spill_stores, spill_loads, smem."""
    out, cur = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"name": m.group(1), "arch": m.group(2)}
            out.append(cur)
            continue
        if cur is None:
            continue
        m = _PROPS.search(line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _USED.search(line)
        if m:
            cur.update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    return out


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    files = sorted(glob.glob(os.path.join(SRC, "*.cu")))
    assert files, "no csrc/cuda/*.cu"
    flags = _flags()
    cache = os.path.join(os.environ.get("BERTFAST_CUDA_CHECK_CACHE")
                         or os.path.join(os.path.expanduser("~"), ".cache", "bertfast_cuda_check"), _key(files, flags))
    os.makedirs(cache, exist_ok=True)
    logs = {}
    procs = {}
    for f in files:
        base = os.path.splitext(os.path.basename(f))[0]
        log = os.path.join(cache, base + ".ptxas.txt")
        if os.path.isfile(log) and os.path.isfile(os.path.join(cache, base + ".o")):
            logs[base] = (0, open(log).read())
            continue
        procs[base] = subprocess.Popen([NVCC, "-c", f, "-o", os.path.join(cache, base + ".o.tmp")] + flags,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for base, p in procs.items():
        text, _ = p.communicate(timeout=900)
        logs[base] = (p.returncode, text)
        if p.returncode == 0:
            with open(os.path.join(cache, base + ".ptxas.txt"), "w") as fh:
                fh.write(text)
            os.replace(os.path.join(cache, base + ".o.tmp"), os.path.join(cache, base + ".o"))
    return cache, logs


def test_every_cuda_source_compiles_for_sm90a(compiled):
    _, logs = compiled
    errors = {b: "\n".join(ln for ln in t.splitlines() if "error" in ln.lower())[:2000] or t[-2000:]
              for b, (rc, t) in logs.items() if rc != 0}
    if errors:
        pytest.fail("nvcc failed:\n" + "\n\n".join(f"{b}:\n{e}" for b, e in errors.items()), pytrace=False)


def test_no_vector_kernel_spills_and_every_op_has_kernels(compiled):
    cache, logs = compiled
    rows = []
    for base, (rc, text) in sorted(logs.items()):
        if rc == 0:
            rows += [dict(k, file=base) for k in parse_ptxas(text)]
    report = [f"{'kernel':<52} {'regs':>4} {'stack':>5} {'spill st/ld':>11} {'smem':>6}"]
    for r in rows:
        report.append(f"{_demangled(r['name'])[:52]:<52} {r.get('registers', -1):>4} "
                      f"{r.get('stack', 0):>5} {r.get('spill_stores', 0):>5}/{r.get('spill_loads', 0):<5} "
                      f"{r.get('smem', 0):>6}")
    text = "\n".join(report)
    with open(os.path.join(cache, "report.txt"), "w") as fh:
        fh.write(text + "\n")
    print("\n" + text)
    for op in _cuda.OPS:
        assert any(r["file"] == op and "fwd_kernel" in r["name"] for r in rows), f"no forward kernel for {op}"
        assert any(r["file"] == op and "bwd_kernel" in r["name"] for r in rows), f"no backward kernel for {op}"
    # the 16-byte-vector variants (every aligned row whose width is a multiple of 8 bf16 / 4 fp32
    # elements: all BERT widths) must not spill; the scalar fallback (VEC 1) may, a little
    vector = [r for r in rows if "VEC 1," not in _demangled(r["name"])]
    spills = [r for r in vector if r.get("spill_stores", 0) or r.get("spill_loads", 0)]
    assert not spills, "kernels spill registers:\n" + "\n".join(
        f"{_demangled(r['name'])}: {r['spill_stores']} B stores, {r['spill_loads']} B loads" for r in spills)
    scalar_spill = max((r.get("spill_stores", 0) for r in rows if r not in vector), default=0)
    assert scalar_spill <= 256, f"the scalar fallback spills {scalar_spill} B: more than the 120 B it was sized at"


def test_parse_ptxas_reads_registers_and_spills():
    text = ("ptxas info    : Compiling entry function '_Z9k_kernelIfLi4ELb1EEvv' for 'sm_90a'\n"
            "ptxas info    : Function properties for _Z9k_kernelIfLi4ELb1EEvv\n"
            "    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
            "ptxas info    : Used 96 registers, used 1 barriers, 256 bytes smem\n")
    (k,) = parse_ptxas(text)
    assert (k["registers"], k["stack"], k["spill_stores"], k["spill_loads"], k["smem"]) == (96, 24, 8, 12, 256)
