"""The CUDA C++ kernels (csrc/cuda via bertfast/dispatch/cuda.py) on a GPU, against the references.

Every test forces the `cuda` backend with BERTFAST_STRICT=1 (a silent fallback fails), at the
widths the kernels switch variants on (1, 17: scalar rows; 384, 1000: warp rows; 4096, 8192:
block rows), in fp32, fp16 and bf16. Accuracy rule (docs/testing.md): against a float64 oracle the
kernel's error is at most twice eager PyTorch's in the same precision, plus a small floor.
Dropout masks must be those of the Triton kernels and the reference bit for bit, and repeated
backward passes bitwise equal. They skip without a CUDA device; names carry "gpu" so
benchmarks/gpu_check.sh runs them in its first pass.
"""
import importlib

import pytest
import torch
from conftest import assert_within_eager_error, requires_cuda

import bertfast
from bertfast import dispatch, ops
from bertfast.dispatch import Call

pytestmark = requires_cuda
DEV = "cuda"
HIDDEN = (1, 17, 384, 1000, 4096, 8192)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SEED = (1 << 40) + 12345  # both 32-bit halves of the Philox key


@pytest.fixture(scope="module", autouse=True)
def _built():
    from bertfast.dispatch import cuda as _cuda

    _cuda.load()  # a build failure on a GPU machine is an error, not a skip
    assert _cuda.status()["state"] in ("built", "cached"), _cuda.status()


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    monkeypatch.setenv("BERTFAST_STRICT", "1")


def _mod(op):
    return importlib.import_module(f"bertfast.ops.{op}")


def _cu(op):
    """The CUDA backend's fwd/bwd of op (bertfast/dispatch/cuda.py)."""
    from bertfast.dispatch import cuda as _cuda

    return getattr(_cuda, f"{op}_fwd"), getattr(_cuda, f"{op}_bwd")


def _tri(op):
    return importlib.import_module(f"bertfast.kernels.{op}")


def _rand(*shape, dtype=torch.float32, gen, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=gen) * scale + shift).to(device=DEV, dtype=dtype)


def _run(fn, inputs, dout, backend_name):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None and t.is_floating_point() else t
              for t in inputs]
    with bertfast.use_backend(backend_name):
        out = fn(*leaves)
        out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves if t is not None and t.is_floating_point()]


def _check(fn, fn_ref, inputs, dout, names):
    got = _run(fn, inputs, dout, "cuda")
    low = _run(fn_ref, inputs, dout, "reference")
    up = [t.double() if t is not None and t.is_floating_point() else t for t in inputs]
    oracle = _run(fn_ref, up, dout.double(), "reference")
    assert_within_eager_error(names, got, low, oracle, FLOOR[dout.dtype])


def _rows(n):
    return 300 if n <= 1000 else 37  # many rows: several per persistent block; odd counts: tails


def _emb_inputs(n, dtype, gen, rows, vocab=50, n_pos=40, n_types=2, id_dtype=torch.int64):
    ids = torch.randint(0, vocab, (rows,), generator=gen).to(DEV, id_dtype)
    tt = torch.randint(0, n_types, (rows,), generator=gen).to(DEV, id_dtype)
    pos = torch.randint(0, n_pos, (rows,), generator=gen).to(DEV, id_dtype)
    tables = [_rand(vocab, n, dtype=dtype, gen=gen), _rand(n_pos, n, dtype=dtype, gen=gen),
              _rand(n_types, n, dtype=dtype, gen=gen)]
    return ids, tt, pos, tables, _rand(n, dtype=dtype, gen=gen, shift=1.0), _rand(n, dtype=dtype, gen=gen)


# ---------------------------------------------------------------------------------------
# every op against its reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", HIDDEN)
def test_gpu_cuda_bias_gelu(n, dtype):
    g = torch.Generator().manual_seed(n)
    x, dy = _rand(_rows(n), n, dtype=dtype, gen=g), _rand(_rows(n), n, dtype=dtype, gen=g)
    b = _rand(n, dtype=dtype, gen=g)
    for approximate in ("none", "tanh"):
        _check(lambda *a: ops.bias_gelu(*a, approximate=approximate),
               lambda *a: ops.bias_gelu_ref(*a, approximate=approximate), [x, b], dy, ["out", "dx", "dbias"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", HIDDEN)
def test_gpu_cuda_bias_residual_layernorm(n, dtype):
    g = torch.Generator().manual_seed(n)
    m = _rows(n)
    x, r, dy = (_rand(m, n, dtype=dtype, gen=g) for _ in range(3))
    b, w, lb = _rand(n, dtype=dtype, gen=g), _rand(n, dtype=dtype, gen=g, shift=1.0), _rand(n, dtype=dtype, gen=g)
    names = ["out", "dx", "dbias", "dresidual", "dweight", "dln_bias"]
    _check(lambda *a: ops.bias_residual_layernorm(*a, 1e-5), lambda *a: ops.bias_residual_layernorm_ref(*a, 1e-5),
           [x, b, r, w, lb], dy, names)
    _check(lambda x_, r_, w_, lb_: ops.bias_residual_layernorm(x_, None, r_, w_, lb_, 1e-5),
           lambda x_, r_, w_, lb_: ops.bias_residual_layernorm_ref(x_, None, r_, w_, lb_, 1e-5),
           [x, r, w, lb], dy, ["out", "dx", "dresidual", "dweight", "dln_bias"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", HIDDEN)
def test_gpu_cuda_gelu_layernorm(n, dtype):
    g = torch.Generator().manual_seed(n)
    x, dy = _rand(_rows(n), n, dtype=dtype, gen=g), _rand(_rows(n), n, dtype=dtype, gen=g)
    b, w, lb = _rand(n, dtype=dtype, gen=g), _rand(n, dtype=dtype, gen=g, shift=1.0), _rand(n, dtype=dtype, gen=g)
    for approximate in ("none", "tanh"):
        _check(lambda *a: ops.gelu_layernorm(*a, 1e-5, approximate=approximate),
               lambda *a: ops.gelu_layernorm_ref(*a, 1e-5, approximate=approximate),
               [x, b, w, lb], dy, ["out", "dx", "dbias", "dweight", "dln_bias"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", HIDDEN)
def test_gpu_cuda_embedding_layernorm(n, dtype):
    g = torch.Generator().manual_seed(n)
    m = _rows(n)
    ids, tt, pos, tables, w, b = _emb_inputs(n, dtype, g, m, id_dtype=torch.int32 if n % 2 else torch.int64)
    dy = _rand(m, n, dtype=dtype, gen=g)
    _check(lambda *a: ops.embedding_layernorm(ids, tt, pos, *a, 1e-5),
           lambda *a: ops.embedding_layernorm_ref(ids, tt, pos, *a, 1e-5),
           [*tables, w, b], dy, ["out", "dword", "dpos", "dtype", "dweight", "dbias"])


@pytest.mark.parametrize("n_types", [1, 3], ids=["one_type_row", "atomic_type_rows"])
def test_gpu_cuda_embedding_type_table_sizes(n_types):
    g = torch.Generator().manual_seed(3)
    ids, tt, pos, tables, w, b = _emb_inputs(768, torch.bfloat16, g, 257, n_types=n_types)
    dy = _rand(257, 768, dtype=torch.bfloat16, gen=g)
    _check(lambda *a: ops.embedding_layernorm(ids, tt, pos, *a, 1e-5),
           lambda *a: ops.embedding_layernorm_ref(ids, tt, pos, *a, 1e-5),
           [*tables, w, b], dy, ["out", "dword", "dpos", "dtype", "dweight", "dbias"])


def test_gpu_cuda_fp32_params_with_bf16_activations():
    """autocast's mix: bf16 activations, fp32 LayerNorm/bias parameters (read as fp32, gradients in fp32)."""
    g = torch.Generator().manual_seed(11)
    n, m = 768, 129
    x, r, dy = (_rand(m, n, dtype=torch.bfloat16, gen=g) for _ in range(3))
    b, w, lb = _rand(n, gen=g), _rand(n, gen=g, shift=1.0), _rand(n, gen=g)
    _check(lambda *a: ops.bias_residual_layernorm(*a, 1e-5), lambda *a: ops.bias_residual_layernorm_ref(*a, 1e-5),
           [x, b, r, w, lb], dy, ["out", "dx", "dbias", "dresidual", "dweight", "dln_bias"])
    _check(lambda *a: ops.gelu_layernorm(*a, 1e-5), lambda *a: ops.gelu_layernorm_ref(*a, 1e-5),
           [x, b, w, lb], dy, ["out", "dx", "dbias", "dweight", "dln_bias"])
    _check(ops.bias_gelu, ops.bias_gelu_ref, [x, b], dy, ["out", "dx", "dbias"])


def test_gpu_cuda_misaligned_and_non_contiguous_inputs():
    """Rows that start off a 16-byte boundary take the scalar variant; strided views are copied."""
    g = torch.Generator().manual_seed(12)
    n, m = 384, 65
    buf = _rand(m * n + 1, dtype=torch.bfloat16, gen=g)
    x = buf[1:].view(m, n)  # 2-byte offset: no 16-byte vectors
    r = _rand(n, m, dtype=torch.bfloat16, gen=g).t()  # non-contiguous
    dy = _rand(m, n, dtype=torch.bfloat16, gen=g)
    b, w, lb = (_rand(n, dtype=torch.bfloat16, gen=g, shift=s) for s in (0.0, 1.0, 0.0))
    _check(lambda *a: ops.bias_residual_layernorm(*a, 1e-5), lambda *a: ops.bias_residual_layernorm_ref(*a, 1e-5),
           [x, b, r, w, lb], dy, ["out", "dx", "dbias", "dresidual", "dweight", "dln_bias"])
    _check(ops.bias_gelu, ops.bias_gelu_ref, [x, b], dy, ["out", "dx", "dbias"])


def test_gpu_cuda_zero_rows():
    g = torch.Generator().manual_seed(13)
    x = torch.empty(0, 64, device=DEV)
    b, w, lb = _rand(64, gen=g), _rand(64, gen=g), _rand(64, gen=g)
    fwd, bwd = _cu("bias_residual_layernorm")
    y, mean, rstd = fwd(x, b, x, w, lb, 1e-5, 0.0, 0)
    assert y.shape == (0, 64) and mean.shape == (0,)
    dx, db, dres, dw, dlb = bwd(x, x, b, x, w, lb, mean, rstd, 1e-5, 0.0, 0)
    assert dx.shape == (0, 64) and not dw.any() and not db.any()


# ---------------------------------------------------------------------------------------
# dropout: the CUDA kernels draw the Triton kernels' (and the reference's) masks


# bf16 only against Triton: each (dtype, width) compiles Triton kernels, and gpu_check.sh gives this
# file under a minute; the mask bits do not depend on the dtype (offsets and seed only)
RACE_DTYPES = (torch.bfloat16,)


@pytest.mark.parametrize("dtype", RACE_DTYPES, ids=str)
@pytest.mark.parametrize("n", [17, 768, 3072])
def test_gpu_cuda_dropout_masks_equal_triton_brln(n, dtype):
    g = torch.Generator().manual_seed(n)
    m = 97
    x, r, dy = (_rand(m, n, dtype=dtype, gen=g) for _ in range(3))
    b, w, lb = _rand(n, dtype=dtype, gen=g), _rand(n, dtype=dtype, gen=g, shift=1.0), _rand(n, dtype=dtype, gen=g)
    fwd, bwd = _cu("bias_residual_layernorm")
    tk = _tri("bias_residual_layernorm")
    got = fwd(x, b, r, w, lb, 1e-5, 0.25, SEED)
    tri = tk.bias_residual_layernorm_fwd(x, b, r, w, lb, 1e-5, 0.25, SEED)
    ref = _mod("bias_residual_layernorm")._fwd_reference(x, b, r, w, lb, 1e-5, 0.25, SEED)
    for a, c in zip(got, ref):
        torch.testing.assert_close(a, c, atol=FLOOR[dtype] * 4, rtol=FLOOR[dtype])
    gb = bwd(dy, x, b, r, w, lb, got[1], got[2], 1e-5, 0.25, SEED)
    tb = tk.bias_residual_layernorm_bwd(dy, x, b, r, w, lb, tri[1], tri[2], 1e-5, 0.25, SEED)
    # dx is exactly 0 where an element was dropped: the masks are the same bits
    assert torch.equal(gb[0] == 0, tb[0] == 0)
    assert 0.15 < (gb[0] == 0).float().mean().item() < 0.35


@pytest.mark.parametrize("dtype", RACE_DTYPES, ids=str)
@pytest.mark.parametrize("n", [17, 768, 3072])
def test_gpu_cuda_dropout_masks_equal_triton_embedding(n, dtype):
    g = torch.Generator().manual_seed(n)
    ids, tt, pos, tables, w, b = _emb_inputs(n, dtype, g, 97)
    args = (ids, tt, pos, *tables, w, b, 1e-5, 0.3, SEED)
    fwd, bwd = _cu("embedding_layernorm")
    got = fwd(*args)
    tri = _tri("embedding_layernorm").embedding_layernorm_fwd(*args)
    ref = _mod("embedding_layernorm")._fwd_reference(*args)
    assert torch.equal(got[0] == 0, tri[0] == 0)
    assert torch.equal(got[0] == 0, ref[0] == 0)
    torch.testing.assert_close(got[0], ref[0], atol=FLOOR[dtype] * 4, rtol=FLOOR[dtype])
    dy = _rand(97, n, dtype=dtype, gen=g)
    gb = bwd(dy, *args[:8], got[1], got[2], 1e-5, 0.3, SEED)
    rb = _mod("embedding_layernorm")._bwd_reference(dy, *args[:8], ref[1], ref[2], 1e-5, 0.3, SEED)
    for a, r in zip(gb, rb):
        torch.testing.assert_close(a.float(), r.float(), atol=FLOOR[dtype] * 8, rtol=FLOOR[dtype] * 4)


def test_gpu_cuda_dropout_autograd_matches_triton_under_one_seed():
    """Forward on one backend, backward on the other: interchangeable mid-training."""
    g = torch.Generator().manual_seed(14)
    n, m = 768, 64
    x, r, dy = (_rand(m, n, dtype=torch.bfloat16, gen=g) for _ in range(3))
    b, w, lb = (_rand(n, dtype=torch.bfloat16, gen=g, shift=s) for s in (0.0, 1.0, 0.0))
    fwd, bwd = _cu("bias_residual_layernorm")
    tk = _tri("bias_residual_layernorm")
    y_c = fwd(x, b, r, w, lb, 1e-5, 0.1, SEED)
    y_t = tk.bias_residual_layernorm_fwd(x, b, r, w, lb, 1e-5, 0.1, SEED)
    torch.testing.assert_close(y_c[0], y_t[0], atol=3e-2, rtol=2e-2)
    mixed = bwd(dy, x, b, r, w, lb, y_t[1], y_t[2], 1e-5, 0.1, SEED)  # triton's saved stats, cuda's backward
    same = tk.bias_residual_layernorm_bwd(dy, x, b, r, w, lb, y_t[1], y_t[2], 1e-5, 0.1, SEED)
    for a, c in zip(mixed, same):
        torch.testing.assert_close(a.float(), c.float(), atol=6e-2, rtol=3e-2)


# ---------------------------------------------------------------------------------------
# determinism, backend selection, both extensions in one process


@pytest.mark.parametrize("n", [768, 3072])
def test_gpu_cuda_backward_is_deterministic(n):
    g = torch.Generator().manual_seed(15)
    m = 2049
    x, r, dy = (_rand(m, n, dtype=torch.bfloat16, gen=g) for _ in range(3))
    b, w, lb = (_rand(n, dtype=torch.bfloat16, gen=g, shift=s) for s in (0.0, 1.0, 0.0))
    fwd, bwd = _cu("bias_residual_layernorm")
    y = fwd(x, b, r, w, lb, 1e-5, 0.1, SEED)
    runs = [bwd(dy, x, b, r, w, lb, y[1], y[2], 1e-5, 0.1, SEED) for _ in range(3)]
    gfwd, gbwd = _cu("gelu_layernorm")
    yg = gfwd(x, b, w, lb, 1e-5, "none")
    runs_g = [gbwd(dy, x, b, w, lb, yg[1], yg[2], 1e-5, "none") for _ in range(3)]
    runs_b = [_cu("bias_gelu")[1](dy, x, b, "none") for _ in range(3)]
    for rs in (runs, runs_g, runs_b):
        for other in rs[1:]:
            for a, c in zip(rs[0], other):
                assert a is None or torch.equal(a, c)
    ids, tt, pos, tables, w2, b2 = _emb_inputs(n, torch.bfloat16, g, m, vocab=7)
    efwd, ebwd = _cu("embedding_layernorm")
    ye = efwd(ids, tt, pos, *tables, w2, b2, 1e-5, 0.0, 0)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs_e = [ebwd(dy, ids, tt, pos, *tables, w2, b2, ye[1], ye[2], 1e-5, 0.0, 0) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, c in zip(*runs_e):
        assert torch.equal(a, c)


def test_gpu_cuda_forced_by_env_and_auto_follows_the_table(monkeypatch):
    monkeypatch.setenv("BERTFAST_BACKEND", "cuda")
    for op in ("embedding_layernorm", "bias_gelu", "bias_residual_layernorm", "gelu_layernorm"):
        assert dispatch.select(op, Call("cuda", torch.bfloat16, 768, "fwd+bwd")).backend == "cuda"
    monkeypatch.setenv("BERTFAST_BACKEND", "auto")
    dispatch.reset()
    from bertfast.dispatch import routing

    for op in ("bias_gelu", "bias_residual_layernorm"):
        name, why = dispatch.explain(op, "cuda")
        if routing.table_for(op).source is None:
            assert name == "triton" and "no measurement" in why, (name, why)
        else:
            assert "cuda" in name or "triton" in name, (name, why)


def test_gpu_cuda_and_cpu_extensions_load_in_one_process():
    from bertfast.dispatch import cpp, cuda

    cpp.load()
    cuda.load()
    assert hasattr(torch.ops.bertfast, "bias_gelu_cpu_fwd") and hasattr(torch.ops.bertfast, "bias_gelu_cuda_fwd")
    x, b = torch.randn(4, 8), torch.randn(8)
    torch.testing.assert_close(torch.ops.bertfast.bias_gelu_cpu_fwd(x, b, False, False).cuda(),
                               torch.ops.bertfast.bias_gelu_cuda_fwd(x.cuda(), b.cuda(), False))


def test_gpu_cuda_compiles_under_torch_compile():
    """torch.compile sees the public op through its fake implementation; the kernel runs inside."""
    g = torch.Generator().manual_seed(16)
    x, r = _rand(8, 768, dtype=torch.bfloat16, gen=g), _rand(8, 768, dtype=torch.bfloat16, gen=g)
    b, w, lb = (_rand(768, dtype=torch.bfloat16, gen=g, shift=s) for s in (0.0, 1.0, 0.0))
    with bertfast.use_backend("cuda"):
        f = torch.compile(lambda *a: ops.bias_residual_layernorm(*a, 1e-5), fullgraph=True)
        out = f(x, b, r, w, lb)
    torch.testing.assert_close(out, ops.bias_residual_layernorm_ref(x, b, r, w, lb, 1e-5), atol=3e-2, rtol=2e-2)
