"""`bertfast verify`: check the backends against the references, or compile the Triton kernels AOT.

    bertfast verify                          every backend that can run here, against the reference,
                                             on small inputs: a table op / backend / device / ok / max err
    bertfast verify --aot sm_90a --aot sm_80 compile every Triton kernel configuration the launchers can
                                             choose for those GPUs (no GPU needed) and print registers,
                                             spills and shared memory; exit 1 on any compile failure
Options of --aot: --full (every dtype/flag variant, not only the heaviest), --kernel SUBSTR (filter),
--jobs N (compile in N processes).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

# ---------------------------------------------------------------------------------------
# numerical verification


def _cases(device, dtype):
    """(op, call) pairs: call() runs the public op with autograd and returns the outputs and
    the input gradients, so a backend's forward and backward are both checked."""
    import torch

    from . import ops

    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def leaf(t):
        return t.detach().clone().requires_grad_(True)

    m, n = 6, 37
    x, r, dy = rnd(m, n), rnd(m, n), rnd(m, n)
    b, w, lb = rnd(n), rnd(n) + 1.0, rnd(n)
    ids = torch.tensor([1, 5, 5, 0, 9, 5], device=device)
    tt = torch.tensor([0, 1, 1, 0, 1, 0], device=device)
    pos = torch.tensor([0, 1, 2, 3, 4, 0], device=device)
    word, pe, te = rnd(11, n), rnd(8, n), rnd(2, n)

    def run(fn, inputs):
        inputs = [leaf(t) for t in inputs]
        out = fn(*inputs)
        out.backward(dy if out.dim() == 2 else dy.reshape(out.shape))
        return [out.detach()] + [t.grad for t in inputs]

    return [
        ("bias_gelu", lambda: run(lambda a, c: ops.bias_gelu(a, c), [x, b])),
        ("bias_gelu(tanh)", lambda: run(lambda a, c: ops.bias_gelu(a, c, approximate="tanh"), [x, b])),
        ("bias_residual_layernorm",
         lambda: run(lambda a, c, d, e, f: ops.bias_residual_layernorm(a, c, d, e, f, 1e-5), [x, b, r, w, lb])),
        ("gelu_layernorm", lambda: run(lambda a, c, e, f: ops.gelu_layernorm(a, c, e, f, 1e-5), [x, b, w, lb])),
        ("embedding_layernorm",
         lambda: run(lambda a, c, d, e, f: ops.embedding_layernorm(ids, tt, pos, a, c, d, e, f, 1e-5),
                     [word, pe, te, w, lb])),
    ]


def _devices():
    import torch

    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    return devs


def _candidates(op: str, device: str):
    """Backends with an implementation of `op` declared for `device` here (reference excluded)."""
    from .dispatch import core

    return core.backends_for(op, device)


def _why_not(op: str, name: str, device: str, dtype):
    """Why backend `name` cannot serve a small call of `op` here (None: it can)."""
    from .dispatch import core

    call = core.spec(op).typical(device)._replace(dtype=dtype, seq=5, direction="fwd")
    return core.why_not(op, name, call)


def verify_numerics(backends=None) -> int:
    """Run every backend (or only those named in `backends`) that can serve here against the
    reference: forward and input gradients on small inputs. Returns 1 if any fails."""
    import torch

    from . import dispatch, ops  # noqa: F401 - registers every op

    rows, failed = [], 0
    for device in _devices():
        dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if device == "cuda" else [])
        for dtype in dtypes:
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            for op, call in _cases(device, dtype):
                base = op.split("(")[0]
                if base not in dispatch.registered_ops():
                    continue
                with dispatch.use_backend("reference"):
                    ref = call()
                for name in _candidates(base, device):
                    if backends and name not in backends:
                        continue
                    reason = _why_not(base, name, device, dtype)
                    if reason is not None:
                        rows.append((op, name, device, str(dtype).replace("torch.", ""), "skip", reason[:60]))
                        continue
                    try:
                        with dispatch.use_backend(name):
                            got = call()
                        err = max(((a.float() - c.float()).abs().max().item() / (1.0 + c.float().abs().max().item()))
                                  for a, c in zip(got, ref) if c is not None)
                        ok = err <= tol
                        rows.append((op, name, device, str(dtype).replace("torch.", ""), "ok" if ok else "FAIL",
                                     f"{err:.2e}"))
                    except Exception as e:  # noqa: BLE001 - report, keep going
                        ok = False
                        rows.append((op, name, device, str(dtype).replace("torch.", ""), "FAIL",
                                     f"{type(e).__name__}: {e}"[:60]))
                    failed += not ok
        # ops without a case above (e.g. attention): forward on the op's own probe inputs
        for op in dispatch.registered_ops():
            if op in {c[0].split("(")[0] for c in _cases("cpu", torch.float32)}:
                continue
            for name in _candidates(op, device):
                if backends and name not in backends:
                    continue
                # the op's typical dtype on CPU (bf16 for the bf16 inference add-and-norm), else fp32
                dtype = dispatch.core.spec(op).typical(device).dtype if device == "cpu" else torch.float32
                reason = _why_not(op, name, device, dtype)
                rows.append((op, name, device, "probe", "ok" if reason is None else "skip",
                             "forward probe matches" if reason is None else reason[:60]))
    _table(("op", "backend", "device", "dtype", "ok", "max rel err"), rows)
    if not rows:
        print("no backend other than the reference can run here")
    print(summary_line(rows))
    return 1 if failed else 0


def summary_line(rows) -> str:
    """The last line of `bertfast verify`: checks passed, failed and skipped, over which backends
    and devices, and the verdict."""
    count = {k: sum(r[4] == k for r in rows) for k in ("ok", "FAIL", "skip")}
    backends = sorted({r[1] for r in rows if r[4] != "skip"})
    devices = sorted({r[2] for r in rows})
    verdict = "FAILED" if count["FAIL"] else "all checks passed" if count["ok"] else "nothing checked"
    return (f"verify: {verdict}: {count['ok']} ok, {count['FAIL']} failed, {count['skip']} skipped "
            f"({', '.join(backends) or 'no backend'} against the reference on {', '.join(devices) or 'no device'})")


# ---------------------------------------------------------------------------------------
# ahead-of-time compilation


def kernel_modules():
    """Every module of bertfast.kernels (not `_`-private helpers), discovered by listing the
    package so new kernel files are picked up without registration."""
    import importlib
    import pkgutil

    import bertfast.kernels as pkg

    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))
    return [(n, importlib.import_module(f"bertfast.kernels.{n}")) for n in names]


def _arch_cc(arch: str) -> int:
    m = re.fullmatch(r"sm_?(\d+)a?", arch.strip().lower())
    if not m:
        raise ValueError(f"--aot must name an architecture like sm_90a or sm_80, got {arch!r}")
    return int(m.group(1))


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED / LOCAL of the (single) kernel in a cubin, via cuobjdump ({} when
    this triton ships no cuobjdump: the table then shows '?', which is not a failure)."""
    if not os.path.exists(_cuobjdump()):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                             timeout=60).stdout
    finally:
        os.unlink(path)
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        if m:
            usage[key] = int(m.group(1))
    return usage


def compile_spec(spec: dict, cc: int):
    """triton.compile one aot_specs() entry for compute capability `cc`: returns a usage dict."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"],
                                    attrs=spec.get("attrs") or None)
    opts = {"num_warps": spec["num_warps"]}
    if "num_stages" in spec:
        opts["num_stages"] = spec["num_stages"]
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)
    usage = resource_usage(compiled.asm["cubin"])
    # Triton kernels take their shared memory dynamically (metadata.shared, the launch size);
    # cuobjdump's SHARED is only the static part. Report the larger.
    usage["SHARED"] = max(usage.get("SHARED", 0), int(getattr(compiled.metadata, "shared", 0) or 0))
    return usage


def _compile_job(item):
    """Process-pool worker: (module name, spec index, full, arch) -> (usage, error, seconds).
    Specs hold JIT functions, which do not pickle, so the worker rebuilds them by index."""
    import importlib

    name, idx, full, arch = item
    t0 = time.time()
    try:
        mod = importlib.import_module(f"bertfast.kernels.{name}")
        spec = (mod.aot_specs(full=True) if full else mod.aot_specs())[idx]
        return compile_spec(spec, _arch_cc(arch)), None, time.time() - t0
    except Exception as e:  # noqa: BLE001 - reported in the table
        return None, f"{type(e).__name__}: {e}".splitlines()[0][:200], time.time() - t0


def _meant_for(spec: dict, arch: str, archs) -> bool:
    """A spec that names the architectures its configuration is chosen for ("archs") is only
    compiled for those: a launcher never runs a Hopper tile list on Ampere, so its spills
    there would be noise. It is compiled for every requested arch when it names none of them."""
    meant = spec.get("archs")
    if not meant or not any(a in meant for a in archs):
        return True
    return arch in meant


def plan(specs, archs, full: bool = False) -> list:
    """The (module name, spec index, spec, arch) compiles of a sweep over `specs` ((module name,
    index, spec) triples) for `archs`, in order.

    A spec that names its architectures ("archs": the attention tile lists of one GPU family) is
    compiled for those. A spec that names none is architecture-neutral: its kernel uses neither
    tensor-core dots nor tensor descriptors (the LayerNorm/GELU family), so Triton lowers it to the
    same TTGIR for every NVIDIA target (blocked layouts, vector loads, warp reductions) and its
    configurations differ from each other only in tile sizes. The first requested architecture
    compiles every configuration; each further one compiles one representative per kernel, the
    last configuration aot_specs() lists for it (they list tiles from the smallest to the
    largest, so it is the one with the most registers per thread): that exercises what does
    differ there, the LLVM lowering of the kernel's operations to that target's PTX and ptxas.
    full=True compiles every configuration for every architecture."""
    last = {}
    for name, idx, s in specs:
        last[(name, s["kernel"])] = idx
    work = []
    for i, arch in enumerate(archs):
        for name, idx, s in specs:
            if not _meant_for(s, arch, archs):
                continue
            if not full and i > 0 and not s.get("archs") and last[(name, s["kernel"])] != idx:
                continue
            work.append((name, idx, s, arch))
    return work


def _progress(done: int, total: int, item, result, t_start: float) -> None:
    """One line on stderr per finished compile: a sweep of hundreds of compiles is never silent."""
    name, _idx, s, arch = item
    _usage, err, dt = result
    print(f"[{done}/{total}] {name}.{s['kernel']} {arch} {'FAIL' if err else 'ok'} {dt:.1f}s "
          f"({time.time() - t_start:.0f} s)", file=sys.stderr, flush=True)


def verify_aot(archs, full=False, kernel_filter=None, jobs=1) -> int:
    mods = kernel_modules()
    specs = []
    for name, mod in mods:
        if not hasattr(mod, "aot_specs"):
            continue
        for idx, s in enumerate(mod.aot_specs(full=True) if full else mod.aot_specs()):
            if kernel_filter and kernel_filter not in f"{name}.{s['kernel']}":
                continue
            specs.append((name, idx, s))
    if not specs:
        print("no aot_specs() entries found in bertfast.kernels", file=sys.stderr)
        return 1
    work = plan(specs, archs, full)
    items = [(name, idx, full, arch) for name, idx, _s, arch in work]
    print(f"verify --aot: {len(work)} compiles for {', '.join(archs)} with {jobs} job{'s' * (jobs > 1)}",
          file=sys.stderr, flush=True)
    t_start = time.time()
    results = []
    if jobs > 1:
        # processes, not threads: most of a compile holds the GIL (MLIR passes, LLVM)
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
            for item, res in zip(work, ex.map(_compile_job, items)):
                results.append(res)
                _progress(len(results), len(work), item, res, t_start)
    else:
        for item, it in zip(work, items):
            results.append(_compile_job(it))
            _progress(len(results), len(work), item, results[-1], t_start)
    rows, failures, spilled = [], 0, 0
    for (name, _idx, s, arch), (u, err, dt) in zip(work, results):
        kern = f"{name}.{s['kernel']}"
        if err is not None:
            failures += 1
            rows.append((kern, s["config"], arch, "FAIL", "-", "-", err))
            continue
        spills = u.get("STACK", 0) + u.get("LOCAL", 0) if "REG" in u else "?"
        spilled += spills != "?" and spills > 0
        rows.append((kern, s["config"], arch, str(u.get("REG", "?")), str(spills), str(u.get("SHARED", "?")),
                     f"{dt:.1f}s"))
    _table(("kernel", "config", "arch", "registers", "spills(B)", "shared(B)", "note"), rows)
    print(f"\n{len(results) - failures}/{len(results)} compiled; {failures} failed; {spilled} with spills "
          f"(spills = STACK + LOCAL bytes per thread from cuobjdump --dump-resource-usage)")
    return 1 if failures else 0


def _table(header, rows) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    sys.stdout.flush()


def cli_main(cmd, argv) -> int:
    from .cli import HelpFormatter

    ap = argparse.ArgumentParser(prog=f"bertfast {cmd}", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--aot", action="append", default=[], metavar="ARCH",
                    help="compile every Triton kernel configuration for this GPU architecture (sm_90a, sm_80); "
                         "repeatable")
    ap.add_argument("--full", action="store_true", help="with --aot: every dtype/flag variant")
    ap.add_argument("--kernel", default=None, help="with --aot: only kernels whose module.kernel name contains this")
    ap.add_argument("--backend", action="append", default=[], metavar="NAME",
                    help="without --aot: check only this backend (triton, cuda, cpp); repeatable")
    ap.add_argument("--jobs", type=int, default=1, help="with --aot: parallel compile processes")
    args = ap.parse_args(argv)
    if args.aot:
        for a in args.aot:
            try:
                _arch_cc(a)  # reject bad names before any work
            except ValueError as e:
                print(f"bertfast verify: {e}", file=sys.stderr)
                return 2
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            # Under the interpreter @triton.jit functions are not compilable; the env var is read
            # when triton is imported, so run again in a fresh process without it.
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            return subprocess.call([sys.executable, "-m", "bertfast", cmd, *argv], env=env)
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 3.6 default
        return verify_aot(args.aot, full=args.full, kernel_filter=args.kernel, jobs=max(1, args.jobs))
    return verify_numerics(backends=tuple(args.backend) or None)
