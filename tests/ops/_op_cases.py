"""What the per-op tests share: the implementations as a test parameter, their inputs, and the
accuracy rule of docs/testing.md.

Each `tests/ops/test_<op>.py` runs one op's implementations ("reference", "cpp", "triton",
"cuda") through the dispatch table: `run_op` forces the implementation with `use_backend`
under BERTFAST_STRICT=1 (so a refusal is an error, never a silent fallback to the reference)
and also checks which table rows dispatch actually selected, so a passing case really ran the
named implementation. Where an implementation cannot run here its cases skip with the reason:
"cpp" when the C++ extension does not build, "triton" without triton (on CPU tensors it runs
under TRITON_INTERPRET=1, which tests/conftest.py sets, in fp32 and fp16 only: the interpreter
cannot do bf16), "cuda" without a CUDA device.
"""
import contextlib

import pytest
import torch
from conftest import HAS_CUDA, HAS_TRITON, TRITON_DEVICE, assert_within_eager_error

import bertfast
from bertfast import dispatch

IMPLS = ("reference", "cpp", "triton", "cuda")
DEVICE = {"reference": "cpu", "cpp": "cpu", "triton": TRITON_DEVICE, "cuda": "cuda"}
# the dtypes each implementation is tested in (the C++ kernels serve fp16 by converting: a test
# of its own); floors of the accuracy rule, per implementation family (docs/testing.md)
DTYPES = {"reference": (torch.float32,), "cpp": (torch.float32, torch.bfloat16),
          "triton": (torch.float32, torch.float16), "cuda": (torch.float32, torch.float16, torch.bfloat16)}
NORM_FLOOR = {"cpp": {torch.float32: 2e-6, torch.bfloat16: 4e-3},
              "triton": {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2},
              "cuda": {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}}
ATTENTION_FLOOR = {torch.float32: 2e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}
# hidden widths the LayerNorm/GELU family is tested at: odd ones, BERT's, and (CUDA C++) the widths
# its kernels switch variants on; the interpreter stays at small ones
NORM_HIDDEN = {"cpp": (1, 17, 384, 768, 1000), "triton": (1, 17, 384, 1000), "cuda": (1, 17, 384, 1000, 4096, 8192)}
SEED = (1 << 40) + 12345  # a dropout seed that exercises both 32-bit halves of the Philox key
DTYPE_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def _marks(impl):
    if impl == "triton":
        return [pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")]
    if impl == "cuda":
        # cuda_ext: benchmarks/gpu_check.sh runs these after building the extension, not before
        return [pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"), pytest.mark.cuda_ext]
    return []


def impl_param(impl, *values, id=""):
    """One case of an implementation: pytest.param(impl, *values) with its skip marks; the id starts
    with the implementation's name (so `-k cpp`, `-k cuda` select its cases)."""
    return pytest.param(impl, *values, id=f"{impl}-{id}" if id else impl, marks=_marks(impl))


def impls(*names):
    """The implementations `names` as a parameter list (no other values)."""
    return [impl_param(name) for name in names]


def norm_cases(*impl_names, extra=((None, ""),)):
    """(impl, dtype, n, extra) cases of a LayerNorm/GELU-family op: every implementation's dtypes x
    hidden widths x the op's own variants `extra` ((value, id) pairs)."""
    out = []
    for impl in impl_names:
        for dtype in DTYPES[impl]:
            for n in NORM_HIDDEN[impl]:
                for value, vid in extra:
                    out.append(impl_param(impl, dtype, n, value, id="-".join(x for x in (DTYPE_ID[dtype], str(n), vid)
                                                                                  if x)))
    return out


def require(impl):
    """Skip (with the reason) when `impl` cannot run on this machine."""
    if impl == "cpp":
        from bertfast.dispatch import cpp

        try:
            cpp.load()
        except Exception as e:  # noqa: BLE001 - any build failure: these cases cannot run here
            pytest.skip(f"the C++ extension does not build here: {e}")
        if cpp.status()["state"] not in ("built", "cached", "prebuilt"):
            pytest.skip(f"the C++ extension does not build here: {cpp.status()}")
    elif impl == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    elif impl == "cuda":
        if not HAS_CUDA:
            pytest.skip("needs a CUDA device")
        from bertfast.dispatch import cuda

        cuda.load()  # on a GPU machine a build failure is an error, not a skip
        assert cuda.status()["state"] in ("built", "cached"), cuda.status()


@pytest.fixture(autouse=True)
def strict_impl(request, monkeypatch):
    """Every op test runs with BERTFAST_STRICT=1; a case with an `impl` parameter skips when that
    implementation cannot run here. Imported by each test_<op>.py (autouse there)."""
    monkeypatch.setenv("BERTFAST_STRICT", "1")
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "impl" in callspec.params:
        require(callspec.params["impl"])


def _families(op, backend):
    """The forceable backend of each table row in a selection's name ("cpp", or "aten_flash+cpp")."""
    spec = dispatch.core.spec(op)
    return {spec.rows[name].backend if name in spec.rows else "reference" for name in backend.split("+")}


@contextlib.contextmanager
def forced(impl):
    """use_backend(impl) under BERTFAST_STRICT=1, and afterwards a check that every dispatch
    selection made inside the block chose a row of `impl` (float64 calls excepted: the reference
    serves the oracle's precision by design)."""
    seen, fp64 = [], []
    real = dispatch.select

    def spy(op, call):
        sel = real(op, call)
        (fp64 if call.dtype_name == "fp64" else seen).append((op, sel.backend))
        return sel

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BERTFAST_STRICT", "1")
        mp.setattr(dispatch, "select", spy)
        with bertfast.use_backend(impl):
            yield seen
    assert seen or fp64 or impl == "reference", f"nothing was dispatched inside use_backend({impl!r})"
    for op, backend in seen:
        assert _families(op, backend) == {impl}, f"{op}: {backend} served a call forced to {impl}"


def row(op, impl, call, name=None):
    """The (fwd, bwd) of `impl`'s dispatch-table row serving `call`, with the op's backend signatures,
    for tests of what the public op does not expose (lse, saved statistics, masks): the row dispatch
    selects when `impl` is forced (strict), or the table row `name` of that backend, which must
    serve the call here (declared, loaded and probed)."""
    if name is None:
        with forced(impl):
            sel = dispatch.select(op, call)
        return sel.fwd, sel.bwd
    spec = dispatch.core.spec(op)
    r = spec.rows[name]
    assert r.backend == impl, (name, r.backend, impl)
    refused = dispatch.core._refusal(spec, r, call, "fwd")
    assert refused is None, f"{op}: row {name} does not serve {call}: {refused}"
    return r.fwd, r.bwd


def rand(*shape, dtype=torch.float32, gen, device="cpu", scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)


def run_op(fn, inputs, dout, impl="reference"):
    """fn(*inputs) with autograd, `impl` forced: [output, grad of every floating input]."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None and t.is_floating_point() else t
              for t in inputs]
    with forced(impl):  # backward inside the block too: dispatch selects per call, both passes
        out = fn(*leaves)
        out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves if t is not None and t.is_floating_point()]


def check_op(impl, fn, fn_ref, inputs, dout, names, floor):
    """The accuracy rule, every output and gradient: `impl` running fn vs the reference fn_ref in
    float64 from the same inputs (the oracle) and in the inputs' own precision (eager's error)."""
    got = run_op(fn, inputs, dout, impl)
    low = run_op(fn_ref, inputs, dout)
    up = [t.double() if t is not None and t.is_floating_point() else t for t in inputs]
    oracle = run_op(fn_ref, up, dout.double())
    return assert_within_eager_error(names, got, low, oracle, floor)


def check_one_row(impl, make_inputs, fns, names, n=17):
    """One token row (a one-token sequence, the last row of a ragged batch) at an odd width, fp32:
    make_inputs(rows, n, dtype, generator, device) gives the op's inputs, fns its (op, reference)."""
    g, dev = torch.Generator().manual_seed(7), DEVICE[impl]
    inputs, dy = make_inputs((1,), n, torch.float32, g, dev), rand(1, n, gen=g, device=dev)
    return check_op(impl, *fns, inputs, dy, names, NORM_FLOOR[impl][torch.float32])


def low_and_params(impl, dtype):
    """(activation dtype, LayerNorm/bias parameter dtype) of a case: the C++ kernels are tested the
    way autocast calls them, low-precision activations with fp32 LayerNorm parameters; the GPU
    kernels with everything in one dtype (their mixed case is a test of its own)."""
    return dtype, (torch.float32 if impl == "cpp" else dtype)


def norm_rows(impl, n):
    """Row shapes: several small ones on CPU (the interpreter is slow), many on a GPU (several rows
    per persistent block, odd counts for the tails)."""
    if impl == "cuda":
        return (300,) if n <= 1000 else (37,)
    if impl == "cpp":
        return (3, 13) if n < 768 else (37,)
    return (5,)


def emb_inputs(n, dtype, gen, rows, vocab=6, n_pos=5, n_types=2, id_dtype=torch.int64, device="cpu",
               param_dtype=None):
    """ids, type ids, positions (`rows`, a shape), the three tables and the LayerNorm weight and bias.
    Few distinct ids for many rows: every table row is hit several times."""
    ids, tt, pos = (torch.randint(0, m, rows if isinstance(rows, tuple) else (rows,), generator=gen)
                    .to(device, id_dtype) for m in (vocab, n_types, n_pos))
    tables = [rand(m, n, dtype=dtype, gen=gen, device=device) for m in (vocab, n_pos, n_types)]
    p = param_dtype or dtype
    return ids, tt, pos, tables, rand(n, dtype=p, gen=gen, device=device, shift=1.0), rand(n, dtype=p, gen=gen,
                                                                                            device=device)


def gradcheck_inputs(*shape, grad=True, seed=None):
    """float64 inputs for gradcheck of the references."""
    g = torch.Generator().manual_seed(hash(shape) % 1000 if seed is None else seed)
    return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_(grad)


def same_with_1_and_2_threads(fn):
    """fn() (a list of tensors) run with one and with two torch threads: bitwise equal."""
    prev = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(fn())
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(*runs):
        assert a is None or torch.equal(a, b), "results differ between 1 and 2 threads"


def check_inplace(fn, x0):
    """inplace=True (BertModel's inference path) with the C++ kernels: the result lands in x's memory,
    equal to the out-of-place result; with autograd x must survive for the backward (no overwrite,
    gradients as the reference's); the reference, which has no in-place path, ignores the flag."""
    with forced("cpp"):
        want = fn(x0.clone())
        x = x0.clone()
        got = fn(x, inplace=True)
        assert got.data_ptr() == x.data_ptr()
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        xg = x0.clone().requires_grad_()
        out = fn(xg, inplace=True)
        assert out.data_ptr() != xg.data_ptr()
        torch.testing.assert_close(xg.detach(), x0, atol=0, rtol=0)  # untouched
        (gx,) = torch.autograd.grad(out.square().sum(), xg)
    with forced("reference"):
        xr = x0.clone().requires_grad_()
        (rx,) = torch.autograd.grad(fn(xr).square().sum(), xr)
        x = x0.clone()
        assert fn(x, inplace=True).data_ptr() != x.data_ptr()
    torch.testing.assert_close(gx, rx, atol=1e-4, rtol=1e-4)


def assert_repeats_bitwise(fn, times=3):
    """fn() (a tuple of tensors or None) repeated: the same bits every time (deterministic backward)."""
    runs = [fn() for _ in range(times)]
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            assert a is None or torch.equal(a, c)


def gpu_big_cases():
    """(impl, dtype, n) of the Triton kernels at BERT-size and larger widths: GPU-only cases."""
    return [impl_param("triton", dt, n, id=f"{DTYPE_ID[dt]}-{n}-gpu")
            for dt in (torch.bfloat16, torch.float16, torch.float32) for n in (384, 768, 1024, 4096, 8192, 3000)]


def gpu_big_rows(n):
    """Rows of a gpu_big_cases case: a BERT batch's tokens, fewer at the widest rows."""
    return 4096 if n <= 1024 else 512


def require_gpu(impl):
    if DEVICE[impl] != "cuda":
        pytest.skip("needs a CUDA device")
