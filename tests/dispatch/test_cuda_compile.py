"""Compile-only check of the CUDA sources (csrc/cuda/*.cu) where nvcc exists, GPU or not.

Every .cu file is compiled once to an object for sm_90a (one -gencode: SASS only, no PTX pass)
with the JIT build's other flags (bertfast/dispatch/cuda.py nvcc_flags, torch's include paths and
defines; torch's headers ship in the CPU wheel too), with `-Xptxas -v`: a compile error fails the
test, and so does any 16-byte-vector kernel that spills registers to local memory (the hot path
is sized to stay within its launch bounds without spills; the scalar fallback for odd widths and
misaligned rows may spill a little). The JIT build on a GPU machine adds sm_80: one
representative of each op family is compiled for it too, device code only (`--cubin`: the host
code is the same for every architecture and the sm_90a object already compiled it). The
families: the LayerNorm rows (bias_residual_layernorm.cu stands for embedding_layernorm.cu and
gelu_layernorm.cu, which use the same row reduction, vector loads and dropout from common.cuh
with fewer operands) and the elementwise bias_gelu.cu. The registers, spills and shared memory
of every kernel are printed (pytest -s) and written to <cache>/report.txt.

Cost: ~30 s of CPU per file for one architecture (the torch headers dominate), so the files are
compiled two at a time (2 cores), each with a progress line; the objects and the ptxas reports
are cached under a hash of the sources, the flags and the nvcc version
(BERTFAST_CUDA_CHECK_CACHE, default ~/.cache/bertfast_cuda_check), so a rerun with unchanged
sources costs nothing and any edit recompiles.
"""
import glob
import hashlib
import os
import re
import shutil
import subprocess

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import progress

from bertfast.dispatch import cuda as _cuda

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SRC = os.path.join(ROOT, "csrc", "cuda")
ARCH = "sm_90a"
# sm_80, device code only: one file per op family (see the module docstring)
SM80_REPRESENTATIVES = ("bias_residual_layernorm", "bias_gelu")
JOBS = max(1, min(2, os.cpu_count() or 1))


def _nvcc():
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME and os.path.isfile(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        return os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
pytestmark = [pytest.mark.skipif(NVCC is None, reason="nvcc not found"), pytest.mark.slow]


def _flags(arch: str = ARCH):
    from torch.utils import cpp_extension

    inc = cpp_extension.include_paths()
    flags = [f"-I{p}" for p in inc] + [f"-I{SRC}"]
    flags += ["-DTORCH_EXTENSION_NAME=bertfast_cuda_check", "-DTORCH_API_INCLUDE_EXTENSION_H",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
    if not any(os.path.isfile(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in inc):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # a CPU wheel lacks this generated header
    flags += cpp_extension.COMMON_NVCC_FLAGS + [_cuda.torch_cxx_std()]
    flags += [f for f in _cuda.nvcc_flags((arch.replace("sm_", ""),)) if not f.startswith("-gencode")]
    # SASS for `arch` only: `-arch=sm_90a` would also run the whole device compile a second time
    # for compute_90 PTX, which checks nothing more
    num = arch.replace("sm_", "")
    return flags + [f"-gencode=arch=compute_{num},code={arch}", "-Xptxas", "-v", "-Xcompiler", "-fPIC"]


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


def _jobs():
    """(name, arch, source, nvcc arguments after the source, output) of every compile: each .cu to
    an object for sm_90a, the sm_80 representatives to a cubin."""
    jobs = []
    for f in sorted(glob.glob(os.path.join(SRC, "*.cu"))):
        base = os.path.splitext(os.path.basename(f))[0]
        jobs.append((base, ARCH, f, ["-c"] + _flags(ARCH), base + ".o"))
        if base in SM80_REPRESENTATIVES:
            jobs.append((base, "sm_80", f, ["--cubin"] + _flags("sm_80"), base + ".sm_80.cubin"))
    return jobs


@pytest.fixture(scope="module")
def compiled():
    """{(file, arch): (nvcc exit status, nvcc output)} of every compile, from the cache or compiled
    now, JOBS at a time, one progress line per file."""
    jobs = _jobs()
    assert jobs, "no csrc/cuda/*.cu"
    assert {b for b, *_ in jobs} >= set(SM80_REPRESENTATIVES), "an sm_80 representative has no .cu file"
    cache = os.path.join(os.environ.get("BERTFAST_CUDA_CHECK_CACHE")
                         or os.path.join(os.path.expanduser("~"), ".cache", "bertfast_cuda_check"),
                         _key([j[2] for j in jobs], sorted(" ".join(j[3]) for j in jobs)))
    os.makedirs(cache, exist_ok=True)
    logs, todo = {}, []
    for base, arch, src, args, out in jobs:
        log = os.path.join(cache, f"{base}.{arch}.ptxas.txt")
        if os.path.isfile(log) and os.path.isfile(os.path.join(cache, out)):
            with open(log) as fh:
                logs[(base, arch)] = (0, fh.read())
        else:
            todo.append((base, arch, src, args, out, log))
    if todo:
        progress(f"nvcc: compiling {len(todo)} CUDA source(s), {JOBS} at a time (~30 s of CPU each; cached after)")
    t_start = time.time()

    def run(job):
        base, arch, src, args, out, log = job
        t0 = time.time()
        p = subprocess.run([NVCC, src, "-o", os.path.join(cache, out + ".tmp")] + args,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1800)
        if p.returncode == 0:  # both files complete or neither: a killed run leaves no half entry
            with open(log + ".tmp", "w") as fh:
                fh.write(p.stdout)
            os.replace(os.path.join(cache, out + ".tmp"), os.path.join(cache, out))
            os.replace(log + ".tmp", log)
        progress(f"nvcc: {base}.cu for {arch} {'ok' if p.returncode == 0 else 'FAILED'} in {time.time() - t0:.0f} s"
                 f" ({time.time() - t_start:.0f} s so far)")
        return (base, arch), (p.returncode, p.stdout)

    with ThreadPoolExecutor(JOBS) as ex:
        logs.update(ex.map(run, todo))
    return cache, logs


def test_every_cuda_source_compiles_for_sm90a_and_each_family_for_sm80(compiled):
    _, logs = compiled
    assert {b for b, a in logs if a == ARCH} == {os.path.splitext(os.path.basename(f))[0]
                                                  for f in glob.glob(os.path.join(SRC, "*.cu"))}
    assert {b for b, a in logs if a == "sm_80"} == set(SM80_REPRESENTATIVES)
    errors = {f"{b} ({a})": "\n".join(ln for ln in t.splitlines() if "error" in ln.lower())[:2000] or t[-2000:]
              for (b, a), (rc, t) in logs.items() if rc != 0}
    if errors:
        pytest.fail("nvcc failed:\n" + "\n\n".join(f"{b}:\n{e}" for b, e in errors.items()), pytrace=False)


def test_no_vector_kernel_spills_and_every_op_has_kernels(compiled):
    cache, logs = compiled
    rows = []
    for (base, _arch), (rc, text) in sorted(logs.items()):
        if rc == 0:
            rows += [dict(k, file=base) for k in parse_ptxas(text)]
    report = [f"{'kernel':<52} {'arch':<6} {'regs':>4} {'stack':>5} {'spill st/ld':>11} {'smem':>6}"]
    for r in rows:
        report.append(f"{_demangled(r['name'])[:52]:<52} {r['arch']:<6} {r.get('registers', -1):>4} "
                      f"{r.get('stack', 0):>5} {r.get('spill_stores', 0):>5}/{r.get('spill_loads', 0):<5} "
                      f"{r.get('smem', 0):>6}")
    text = "\n".join(report)
    with open(os.path.join(cache, "report.txt"), "w") as fh:
        fh.write(text + "\n")
    print("\n" + text)
    for op in _cuda.OPS:
        for arch in (ARCH, "sm_80") if op in SM80_REPRESENTATIVES else (ARCH,):
            for kind in ("fwd_kernel", "bwd_kernel"):
                assert any(r["file"] == op and r["arch"] == arch and kind in r["name"] for r in rows), (op, arch, kind)
    # the 16-byte-vector variants (every aligned row whose width is a multiple of 8 bf16 / 4 fp32
    # elements: all BERT widths) must not spill; the scalar fallback (VEC 1) may, a little
    vector = [r for r in rows if "VEC 1," not in _demangled(r["name"])]
    spills = [r for r in vector if r.get("spill_stores", 0) or r.get("spill_loads", 0)]
    assert not spills, "kernels spill registers:\n" + "\n".join(
        f"{_demangled(r['name'])} ({r['arch']}): {r['spill_stores']} B stores, {r['spill_loads']} B loads" for r in spills)
    scalar_spill = max((r.get("spill_stores", 0) for r in rows if r not in vector), default=0)
    assert scalar_spill <= 256, f"the scalar fallback spills {scalar_spill} B: more than the 120 B it was sized at"


def test_parse_ptxas_reads_registers_and_spills():
    text = ("ptxas info    : Compiling entry function '_Z9k_kernelIfLi4ELb1EEvv' for 'sm_90a'\n"
            "ptxas info    : Function properties for _Z9k_kernelIfLi4ELb1EEvv\n"
            "    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
            "ptxas info    : Used 96 registers, used 1 barriers, 256 bytes smem\n")
    (k,) = parse_ptxas(text)
    assert (k["registers"], k["stack"], k["spill_stores"], k["spill_loads"], k["smem"]) == (96, 24, 8, 12, 256)
