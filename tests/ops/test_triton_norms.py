"""Triton kernels of the LayerNorm/GELU family against their plain-PyTorch references.

Without CUDA they run on CPU tensors through the Triton interpreter (conftest sets
TRITON_INTERPRET=1): fp32 and fp16 at tiny, odd shapes. BERTFAST_STRICT=1 makes any silent
fallback to the reference an error, so a passing test really ran the kernels. Accuracy rule
(FlashAttention's): the kernel's error against a float64 oracle is at most twice the error
eager PyTorch makes in the same precision, plus a small floor.
"""
import importlib

import pytest
import torch
from conftest import HAS_CUDA, TRITON_DEVICE, assert_within_eager_error, requires_cuda, requires_triton

import bertfast
from bertfast import ops

pytestmark = requires_triton
DEV = TRITON_DEVICE
HIDDEN = (1, 17, 384, 1000)
DTYPES = (torch.float32, torch.float16)
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _mod(op):
    return importlib.import_module(f"bertfast.ops.{op}")


def _kmod(op):
    return importlib.import_module(f"bertfast.kernels.{op}")


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    monkeypatch.setenv("BERTFAST_STRICT", "1")


def _rand(*shape, dtype=torch.float32, gen, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=gen) * scale + shift).to(device=DEV, dtype=dtype)


def _run(fn, inputs, dout, backend=None):
    """fn(*inputs) with autograd: [output, grad of every floating input] (None for the others)."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None and t.is_floating_point() else t
              for t in inputs]
    # backward inside the block too: the backend is selected per call, forward and backward
    with bertfast.use_backend(backend or "reference"):
        out = fn(*leaves)
        out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves if t is not None and t.is_floating_point()]


def _check(fn_kernel, fn_ref, inputs, dout, names):
    """Kernel (triton backend) vs the reference run in float64 (oracle) and in the inputs' own
    precision (the eager error that sets the tolerance)."""
    got = _run(fn_kernel, inputs, dout, backend="triton")
    low = _run(fn_ref, inputs, dout)
    up = [t.double() if t is not None and t.is_floating_point() else t for t in inputs]
    oracle = _run(fn_ref, up, dout.double())
    return assert_within_eager_error(names, got, low, oracle, FLOOR[dout.dtype])


# ---------------------------------------------------------------------------------------
# bias_gelu


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", HIDDEN)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu(n, dtype, approximate):
    g = torch.Generator().manual_seed(n)
    x, dy = _rand(2, 3, n, dtype=dtype, gen=g, scale=2.0), _rand(2, 3, n, dtype=dtype, gen=g)
    b = _rand(n, dtype=dtype, gen=g)
    _check(lambda x, b: ops.bias_gelu(x, b, approximate), lambda x, b: ops.bias_gelu_ref(x, b, approximate),
           [x, b], dy, ["out", "dx", "dbias"])


def test_bias_gelu_non_contiguous():
    g = torch.Generator().manual_seed(1)
    x = _rand(40, 5, gen=g).t()  # (5, 40), column-major
    b, dy = _rand(40, gen=g), _rand(5, 40, gen=g)
    assert not x.is_contiguous()
    _check(ops.bias_gelu, ops.bias_gelu_ref, [x, b], dy, ["out", "dx", "dbias"])


# ---------------------------------------------------------------------------------------
# bias_residual_layernorm


def _brln(eps=1e-5, p=0.0):
    return (lambda x, b, r, w, lb: ops.bias_residual_layernorm(x, b, r, w, lb, eps, p),
            lambda x, b, r, w, lb: ops.bias_residual_layernorm_ref(x, b, r, w, lb, eps))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", HIDDEN)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_bias_residual_layernorm(n, dtype, has_bias):
    g = torch.Generator().manual_seed(n)
    x, r, dy = (_rand(5, n, dtype=dtype, gen=g) for _ in range(3))
    b = _rand(n, dtype=dtype, gen=g) if has_bias else None
    w, lb = _rand(n, dtype=dtype, gen=g, shift=1.0), _rand(n, dtype=dtype, gen=g)
    names = ["out", "dx"] + (["dbias"] if has_bias else []) + ["dresidual", "dweight", "dln_bias"]
    _check(*_brln(), [x, b, r, w, lb], dy, names)


def test_bias_residual_layernorm_non_contiguous_3d():
    g = torch.Generator().manual_seed(2)
    x = _rand(2, 33, 3, gen=g).transpose(1, 2)  # (2, 3, 33) non-contiguous
    r = _rand(2, 3, 66, gen=g)[..., ::2]  # strided last dim
    b, w, lb, dy = _rand(33, gen=g), _rand(33, gen=g, shift=1.0), _rand(33, gen=g), _rand(2, 3, 33, gen=g)
    assert not x.is_contiguous() and not r.is_contiguous()
    _check(*_brln(), [x, b, r, w, lb], dy, ["out", "dx", "dbias", "dresidual", "dweight", "dln_bias"])


def test_bias_residual_layernorm_many_rows_partial_sums():
    """More row tiles than programs: exercises the strided loop and the (G, N) partial sums."""
    g = torch.Generator().manual_seed(3)
    n = 40
    x, r, dy = (_rand(70, n, gen=g) for _ in range(3))
    b, w, lb = _rand(n, gen=g), _rand(n, gen=g, shift=1.0), _rand(n, gen=g)
    _check(*_brln(), [x, b, r, w, lb], dy, ["out", "dx", "dbias", "dresidual", "dweight", "dln_bias"])


# ---------------------------------------------------------------------------------------
# gelu_layernorm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", HIDDEN)
def test_gelu_layernorm(n, dtype):
    g = torch.Generator().manual_seed(n)
    approximate = "tanh" if n == 17 else "none"
    x, dy = _rand(4, n, dtype=dtype, gen=g, scale=2.0), _rand(4, n, dtype=dtype, gen=g)
    b, w, lb = _rand(n, dtype=dtype, gen=g), _rand(n, dtype=dtype, gen=g, shift=1.0), _rand(n, dtype=dtype, gen=g)
    _check(lambda x, b, w, lb: ops.gelu_layernorm(x, b, w, lb, 1e-5, approximate),
           lambda x, b, w, lb: ops.gelu_layernorm_ref(x, b, w, lb, 1e-5, approximate),
           [x, b, w, lb], dy, ["out", "dx", "dbias", "dweight", "dln_bias"])


def test_gelu_layernorm_non_contiguous():
    g = torch.Generator().manual_seed(4)
    x = _rand(24, 6, gen=g).t()
    b, w, lb, dy = _rand(24, gen=g), _rand(24, gen=g, shift=1.0), _rand(24, gen=g), _rand(6, 24, gen=g)
    _check(lambda *a: ops.gelu_layernorm(*a, 1e-5), lambda *a: ops.gelu_layernorm_ref(*a, 1e-5),
           [x, b, w, lb], dy, ["out", "dx", "dbias", "dweight", "dln_bias"])


# ---------------------------------------------------------------------------------------
# embedding_layernorm


def _emb_inputs(n, dtype, id_dtype, gen, rows=7, vocab=6, n_pos=5, n_types=2):
    # few distinct ids for many rows: every table row is hit several times
    ids = torch.randint(0, vocab, (rows,), generator=gen).to(DEV, id_dtype)
    tt = torch.randint(0, n_types, (rows,), generator=gen).to(DEV, id_dtype)
    pos = torch.randint(0, n_pos, (rows,), generator=gen).to(DEV, id_dtype)
    tables = [_rand(vocab, n, dtype=dtype, gen=gen), _rand(n_pos, n, dtype=dtype, gen=gen),
              _rand(n_types, n, dtype=dtype, gen=gen)]
    w, b = _rand(n, dtype=dtype, gen=gen, shift=1.0), _rand(n, dtype=dtype, gen=gen)
    return ids, tt, pos, tables, w, b


def _emb_check(n, dtype, id_dtype, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    ids, tt, pos, (word, pe, te), w, b = _emb_inputs(n, dtype, id_dtype, g, **kw)
    dy = _rand(ids.shape[0], n, dtype=dtype, gen=g)
    return _check(lambda *a: ops.embedding_layernorm(ids, tt, pos, *a, 1e-5),
                  lambda *a: ops.embedding_layernorm_ref(ids, tt, pos, *a, 1e-5),
                  [word, pe, te, w, b], dy, ["out", "dword", "dpos", "dtype", "dweight", "dbias"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", HIDDEN)
def test_embedding_layernorm(n, dtype):
    _emb_check(n, dtype, torch.int64 if n % 2 else torch.int32, seed=n)


@pytest.mark.parametrize("n_types", [1, 3], ids=["one_type_row", "atomic_type_rows"])
def test_embedding_layernorm_type_table_sizes(n_types):
    _emb_check(24, torch.float32, torch.int64, n_types=n_types)


def test_embedding_layernorm_all_ids_equal():
    """Every token hits the same word, position and type row: maximal repeated-id accumulation."""
    _emb_check(20, torch.float32, torch.int32, rows=9, vocab=1, n_pos=1, n_types=1)


def test_embedding_layernorm_8192_path():
    """BLOCK_N = 8192 keeps its per-type sums in memory instead of registers."""
    _emb_check(4500, torch.float32, torch.int64, rows=3)


def test_embedding_layernorm_deterministic():
    g = torch.Generator().manual_seed(5)
    ids, tt, pos, tables, w, b = _emb_inputs(19, torch.float32, torch.int64, g, rows=11)
    dy = _rand(11, 19, gen=g)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_run(lambda *a: ops.embedding_layernorm(ids, tt, pos, *a, 1e-5), [*tables, w, b], dy, "triton")
                for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(prev)
    ref = _run(lambda *a: ops.embedding_layernorm_ref(ids, tt, pos, *a, 1e-5), [*tables, w, b], dy)
    for a, c, r in zip(*runs, ref):
        assert torch.equal(a, c)
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


def test_embedding_layernorm_padded_batch_non_contiguous_ids():
    """(batch, seq) ids given as a non-contiguous view; default position/type ids."""
    g = torch.Generator().manual_seed(6)
    n = 24
    ids = torch.randint(0, 9, (5, 2), generator=g).to(DEV).t()  # (2, 5) non-contiguous
    word, pe, te = _rand(9, n, gen=g), _rand(8, n, gen=g), _rand(2, n, gen=g)
    w, b, dy = _rand(n, gen=g, shift=1.0), _rand(n, gen=g), _rand(2, 5, n, gen=g)
    pos = torch.arange(5, device=DEV).expand(2, 5)
    _check(lambda *a: ops.embedding_layernorm(ids, None, None, *a, 1e-5),
           lambda *a: ops.embedding_layernorm_ref(ids, torch.zeros_like(ids), pos, *a, 1e-5),
           [word, pe, te, w, b], dy, ["out", "dword", "dpos", "dtype", "dweight", "dbias"])


# ---------------------------------------------------------------------------------------
# dropout: the kernels' masks are the reference's, bit for bit


SEED = (1 << 40) + 12345  # exercises both 32-bit halves of the Philox key


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_mask_matches_reference_embedding(dtype):
    g = torch.Generator().manual_seed(7)
    ids, tt, pos, tables, w, b = _emb_inputs(37, dtype, torch.int64, g, rows=9)
    args = (ids, tt, pos, *tables, w, b, 1e-5, 0.3, SEED)
    got = _kmod("embedding_layernorm").embedding_layernorm_fwd(*args)
    ref = _mod("embedding_layernorm")._fwd_reference(*args)
    assert torch.equal(got[0] == 0, ref[0] == 0)
    torch.testing.assert_close(got[0], ref[0], atol=FLOOR[dtype] * 4, rtol=FLOOR[dtype])
    dy = _rand(9, 37, dtype=dtype, gen=g)
    gb = _kmod("embedding_layernorm").embedding_layernorm_bwd(dy, *args[:8], ref[1], ref[2], 1e-5, 0.3, SEED)
    rb = _mod("embedding_layernorm")._bwd_reference(dy, *args[:8], ref[1], ref[2], 1e-5, 0.3, SEED)
    for a, r in zip(gb, rb):
        torch.testing.assert_close(a.float(), r.float(), atol=FLOOR[dtype] * 8, rtol=FLOOR[dtype] * 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_dropout_mask_matches_reference_brln(dtype, has_bias):
    g = torch.Generator().manual_seed(8)
    n = 45
    x, r = _rand(6, n, dtype=dtype, gen=g), _rand(6, n, dtype=dtype, gen=g)
    b = _rand(n, dtype=dtype, gen=g) if has_bias else None
    w, lb = _rand(n, dtype=dtype, gen=g, shift=1.0), _rand(n, dtype=dtype, gen=g)
    km, rm = _kmod("bias_residual_layernorm"), _mod("bias_residual_layernorm")
    got = km.bias_residual_layernorm_fwd(x, b, r, w, lb, 1e-5, 0.25, SEED)
    ref = rm._fwd_reference(x, b, r, w, lb, 1e-5, 0.25, SEED)
    for a, c in zip(got, ref):
        torch.testing.assert_close(a, c, atol=FLOOR[dtype] * 4, rtol=FLOOR[dtype])
    dy = _rand(6, n, dtype=dtype, gen=g)
    gb = km.bias_residual_layernorm_bwd(dy, x, b, r, w, lb, ref[1], ref[2], 1e-5, 0.25, SEED)
    rb = rm._bwd_reference(dy, x, b, r, w, lb, ref[1], ref[2], 1e-5, 0.25, SEED)
    # dx is exactly 0 where the mask dropped the element: the kernel's mask is the reference's
    assert torch.equal(gb[0] == 0, rb[0] == 0)
    assert 0.1 < (rb[0] == 0).float().mean().item() < 0.4
    for a, c in zip(gb, rb):
        if c is not None:
            torch.testing.assert_close(a.float(), c.float(), atol=FLOOR[dtype] * 8, rtol=FLOOR[dtype] * 4)


def test_dropout_mask_statistics_and_seed():
    """P(drop) ~= p; a fixed torch.manual_seed reproduces the mask; another seed changes it."""
    g = torch.Generator().manual_seed(9)
    n, rows, p = 128, 64, 0.3
    ids, tt, pos, tables, w, b = _emb_inputs(n, torch.float32, torch.int64, g, rows=rows)

    def fwd(seed):
        torch.manual_seed(seed)
        with bertfast.use_backend("triton"):
            return ops.embedding_layernorm(ids, tt, pos, *tables, w, b, 1e-5, dropout_p=p)

    a, b2, c = fwd(0), fwd(0), fwd(1)
    assert torch.equal(a, b2)
    assert not torch.equal(a == 0, c == 0)
    frac = (a == 0).float().mean().item()
    assert abs(frac - p) < 0.02, f"dropped fraction {frac:.3f}, expected {p}"
    torch.manual_seed(0)
    with bertfast.use_backend("reference"):
        ref = ops.embedding_layernorm(ids, tt, pos, *tables, w, b, 1e-5, dropout_p=p)
    assert torch.equal(a == 0, ref == 0)
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)


def test_dropout_backward_consistent_with_forward():
    """Autograd through the triton backend with dropout: the backward regenerates the forward's
    mask (same seed), so gradients match the reference backend run under the same torch seed."""
    g = torch.Generator().manual_seed(10)
    n = 33
    x, r, dy = (_rand(7, n, gen=g) for _ in range(3))
    b, w, lb = _rand(n, gen=g), _rand(n, gen=g, shift=1.0), _rand(n, gen=g)

    def fn(*a):
        return ops.bias_residual_layernorm(*a, 1e-5, dropout_p=0.2)

    torch.manual_seed(123)
    got = _run(fn, [x, b, r, w, lb], dy, "triton")
    torch.manual_seed(123)
    ref = _run(fn, [x, b, r, w, lb], dy, "reference")
    assert torch.equal(got[1] == 0, ref[1] == 0)  # dx zero exactly where dropped
    for a, c in zip(got, ref):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# launch parameters and the verify command


def test_launch_configs():
    k = _kmod("_layernorm")
    for n in (1, 17, 384, 768, 1000, 1024, 4096, 8192):
        for bn, rows, warps in (k.fwd_config(n), k.bwd_config(n)):
            assert bn >= n and bn & (bn - 1) == 0 and rows >= 1 and 1 <= warps <= 16
            # 16-byte vectors of fp16/bf16 at least: >= 8 elements per thread
            assert rows * bn >= 8 * 32 * warps or bn == k.MIN_BLOCK_N
    with pytest.raises(ValueError, match="hidden size"):
        k.fwd_config(8193)
    from bertfast.ops._rng import dropout_threshold

    lp = _kmod("_launch_params")
    for p in (0.0, 1e-9, 0.1, 0.25, 0.3, 0.5, 0.9, 0.999999):
        assert lp.dropout_args(p)[0] == (dropout_threshold(p) if p else 0)
    bg = _kmod("bias_gelu")
    assert bg.config(768)[1] == 256 and bg.config(3072)[1] == 1024 and bg.config(4096)[1] == 1024


def test_zero_rows():
    k = _kmod("bias_residual_layernorm")
    x = torch.empty(0, 8, device=DEV)
    w = torch.ones(8, device=DEV)
    y, mean, rstd = k.bias_residual_layernorm_fwd(x, None, x, w, w, 1e-5, 0.0, 0)
    assert y.shape == (0, 8) and mean.shape == (0,)
    assert _kmod("bias_gelu").bias_gelu_fwd(x, w, "none").shape == (0, 8)


def test_aot_specs_cover_launcher_configs():
    """Every config a launcher can choose for hidden sizes 1..8192 is in aot_specs()."""
    for op in ("bias_residual_layernorm", "gelu_layernorm", "embedding_layernorm"):
        km = _kmod(op)
        brl = _kmod("_layernorm")
        cfgs = {(s["kernel"], s["constexprs"]["BLOCK_N"], s["constexprs"]["ROWS"], s["num_warps"])
                for s in km.aot_specs()}
        for n in (1, 65, 384, 768, 1000, 2048, 3000, 8192):
            for cfg, kind in ((brl.fwd_config(n), "fwd"), (brl.bwd_config(n), "bwd")):
                assert any(c[0].endswith(f"{kind}_kernel") and c[1:] == cfg for c in cfgs), (op, n, kind, cfg)
    bg = _kmod("bias_gelu")
    cfgs = {(s["constexprs"]["BLOCK_M"], s["constexprs"]["BLOCK_N"], s["num_warps"]) for s in bg.aot_specs()}
    for n in (1, 17, 100, 384, 768, 1000, 3072, 4096, 8192):
        assert bg.config(n) in cfgs


def test_verify_numerics_triton(capsys):
    from bertfast import verify

    rc = verify.verify_numerics(backends=("triton",))
    out = capsys.readouterr().out
    assert rc == 0, out
    for op in ("bias_gelu", "bias_residual_layernorm", "gelu_layernorm", "embedding_layernorm"):
        assert any(line.startswith(op) and " triton " in line and " ok " in line for line in out.splitlines()), out


# ---------------------------------------------------------------------------------------
# GPU only: bf16 and big shapes


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("n", [384, 768, 1024, 4096, 8192, 3000])
def test_gpu_big_shapes(n, dtype):
    g = torch.Generator().manual_seed(n)
    m = 4096 if n <= 1024 else 512
    x, r, dy = (_rand(m, n, dtype=dtype, gen=g) for _ in range(3))
    b, w, lb = _rand(n, dtype=dtype, gen=g), _rand(n, dtype=dtype, gen=g, shift=1.0), _rand(n, dtype=dtype, gen=g)
    _check(*_brln(), [x, b, r, w, lb], dy, ["out", "dx", "dbias", "dresidual", "dweight", "dln_bias"])
    _check(lambda *a: ops.gelu_layernorm(*a, 1e-5), lambda *a: ops.gelu_layernorm_ref(*a, 1e-5),
           [x, b, w, lb], dy, ["out", "dx", "dbias", "dweight", "dln_bias"])
    _check(ops.bias_gelu, ops.bias_gelu_ref, [x, b], dy, ["out", "dx", "dbias"])
    _emb_check(n, dtype, torch.int64, rows=m, vocab=1000, n_pos=512)


@requires_cuda
def test_gpu_dropout_exact_bf16():
    assert HAS_CUDA
    test_dropout_mask_matches_reference_brln(torch.bfloat16, True)
    test_dropout_mask_matches_reference_embedding(torch.bfloat16)
