"""embedding_layernorm (bertfast/ops/embedding_layernorm.py): LN(word[ids] + pos[pos_ids] + type[tt_ids]),
then dropout; every implementation against the reference.

The implementation is the test parameter (tests/ops/_op_cases.py: forced through the dispatch
table under BERTFAST_STRICT=1, the selected row checked). Accuracy rule: docs/testing.md; dropout
masks are compared bit for bit. Few distinct ids over many rows: the backward's scatter of
repeated ids is what most often goes wrong.
"""
import importlib

import pytest
import torch
from _op_cases import (DEVICE, NORM_FLOOR, SEED, check_op, emb_inputs, forced, gpu_big_cases, gpu_big_rows,
                       gradcheck_inputs, impl_param, impls, low_and_params, norm_cases, norm_rows, rand, require_gpu,
                       row, run_op, same_with_1_and_2_threads,
                       strict_impl)  # noqa: F401 - strict_impl: the autouse fixture

from bertfast import ops
from bertfast.dispatch import Call

OP = "embedding_layernorm"
NAMES = ["out", "dword", "dpos", "dtype", "dweight", "dbias"]


def _ref_mod():
    return importlib.import_module(f"bertfast.ops.{OP}")


def _fns(ids, tt, pos):
    return (lambda *a: ops.embedding_layernorm(ids, tt, pos, *a, 1e-5),
            lambda *a: ops.embedding_layernorm_ref(ids, tt, pos, *a, 1e-5))


def _check(impl, n, dtype, seed=0, rows=7, param_dtype=None, **kw):
    g = torch.Generator().manual_seed(seed)
    dev = DEVICE[impl]
    ids, tt, pos, tables, w, b = emb_inputs(n, dtype, g, rows, device=dev, param_dtype=param_dtype, **kw)
    dy = rand(*ids.shape, n, dtype=dtype, gen=g, device=dev)
    return check_op(impl, *_fns(ids, tt, pos), [*tables, w, b], dy, NAMES, NORM_FLOOR[impl][dtype])


@pytest.mark.parametrize("impl, dtype, n, _", norm_cases("cpp", "triton", "cuda"))
def test_embedding_layernorm_matches_oracle(impl, dtype, n, _):
    """int32 ids at even widths, int64 at odd ones; small tables under the interpreter."""
    low, params = low_and_params(impl, dtype)
    small = impl == "triton" and DEVICE[impl] == "cpu"
    _check(impl, n, low, seed=n, rows=7 if small else norm_rows(impl, n), param_dtype=params,
           vocab=6 if small else 50, n_pos=5 if small else 40, id_dtype=torch.int64 if n % 2 else torch.int32)


@pytest.mark.parametrize("impl", impls("cpp", "triton", "cuda"))
def test_embedding_layernorm_one_row(impl):
    """One token (a one-token sequence, the last row of a ragged batch)."""
    _check(impl, 17, torch.float32, seed=7, rows=1)


@pytest.mark.parametrize("impl", impls("reference"))
def test_embedding_layernorm_gradcheck_repeated_ids(impl):
    ids = torch.tensor([[1, 5, 5, 0], [5, 5, 2, 9]])
    tt = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 0]])
    tables = [gradcheck_inputs(11, 17), gradcheck_inputs(8, 17), gradcheck_inputs(2, 17)]
    w, b = gradcheck_inputs(17, seed=2), gradcheck_inputs(17, seed=3)
    # fast_mode: a random projection of the Jacobian (one backward) instead of every column, so
    # 400 inputs do not cost 800 forwards; a wrong gradient still fails it
    with forced(impl):
        assert torch.autograd.gradcheck(lambda *a: ops.embedding_layernorm(ids, tt, None, *a, eps=1e-5),
                                        (*tables, w, b), fast_mode=True)


@pytest.mark.parametrize("impl, n_types", [impl_param(i, t, id=name) for i in ("triton", "cuda")
                                           for t, name in ((1, "one_type_row"), (3, "atomic_type_rows"))])
def test_embedding_layernorm_type_table_sizes(impl, n_types):
    if impl == "cuda":
        _check(impl, 768, torch.bfloat16, seed=3, rows=257, vocab=50, n_pos=40, n_types=n_types)
    else:
        _check(impl, 24, torch.float32, n_types=n_types)


@pytest.mark.parametrize("impl, ids_dtype", [impl_param("cpp", d, id=str(d)[6:]) for d in (torch.int32, torch.int64)])
def test_embedding_layernorm_ids_dtypes_and_repeats(impl, ids_dtype):
    """vocab 3: almost every id repeats many times; the scatter must sum them all."""
    for dtype in (torch.float32, torch.bfloat16):
        _check(impl, 96, dtype, rows=(4, 50), param_dtype=torch.float32, vocab=3, n_pos=40, id_dtype=ids_dtype)


@pytest.mark.parametrize("impl", impls("triton"))
def test_embedding_layernorm_all_ids_equal(impl):
    """Every token hits the same word, position and type row: maximal repeated-id accumulation."""
    _check(impl, 20, torch.float32, rows=9, vocab=1, n_pos=1, n_types=1, id_dtype=torch.int32)


@pytest.mark.parametrize("impl", impls("triton"))
def test_embedding_layernorm_8192_path(impl):
    """BLOCK_N = 8192 keeps its per-type sums in memory instead of registers."""
    _check(impl, 4500, torch.float32, rows=3)


@pytest.mark.parametrize("impl", impls("cpp", "triton"))
def test_embedding_layernorm_default_and_mixed_dtype_ids(impl):
    """(batch, seq) ids as a non-contiguous view, int32 word ids with int64 type ids, default
    position and type ids: the reference's result with the ids spelled out."""
    g = torch.Generator().manual_seed(6)
    dev, n = DEVICE[impl], 24
    ids = torch.randint(0, 9, (5, 2), generator=g, dtype=torch.int32).to(dev).t()  # (2, 5) non-contiguous
    tt = torch.randint(0, 2, (2, 5), generator=g).to(dev)  # int64
    tables = [rand(9, n, gen=g, device=dev), rand(8, n, gen=g, device=dev), rand(2, n, gen=g, device=dev)]
    w, b, dy = rand(n, gen=g, device=dev, shift=1.0), rand(n, gen=g, device=dev), rand(2, 5, n, gen=g, device=dev)
    pos = torch.arange(5, device=dev).expand(2, 5)
    for given_tt, ref_tt in ((None, torch.zeros_like(ids)), (tt, tt)):
        got = run_op(lambda *a: ops.embedding_layernorm(ids, given_tt, None, *a, 1e-5), [*tables, w, b], dy, impl)
        ref = run_op(lambda *a: ops.embedding_layernorm_ref(ids, ref_tt, pos, *a, 1e-5), [*tables, w, b], dy)
        for a, c in zip(got, ref):
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", impls("cpp"))
def test_embedding_layernorm_out_of_range_ids_raise(impl):
    fwd, _ = row(OP, impl, Call("cpu", torch.float32, 8, "fwd"))
    with pytest.raises((RuntimeError, IndexError)):
        fwd(torch.tensor([3, 10]), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
            torch.randn(10, 8), torch.randn(4, 8), torch.randn(2, 8), torch.ones(8), torch.zeros(8), 1e-12, 0.0, 0)


@pytest.mark.parametrize("impl", impls("triton"))
def test_embedding_layernorm_deterministic(impl):
    g = torch.Generator().manual_seed(5)
    ids, tt, pos, tables, w, b = emb_inputs(19, torch.float32, g, 11)
    dy = rand(11, 19, gen=g)
    fn, fn_ref = _fns(ids, tt, pos)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [run_op(fn, [*tables, w, b], dy, impl) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(prev)
    ref = run_op(fn_ref, [*tables, w, b], dy)
    for a, c, r in zip(*runs, ref):
        assert torch.equal(a, c)
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", impls("cpp"))
def test_embedding_layernorm_same_with_1_and_2_threads(impl):
    g = torch.Generator().manual_seed(0)
    ids, tt, pos, tables, w, b = emb_inputs(384, torch.float32, g, 1000, vocab=7, n_pos=40)
    dy = rand(1000, 384, gen=g)

    def run():
        torch.manual_seed(11)  # the dropout seed comes from torch's generator
        return run_op(lambda *a: ops.embedding_layernorm(ids, tt, pos, *a, dropout_p=0.1), [*tables, w, b], dy, impl)

    same_with_1_and_2_threads(run)


@pytest.mark.parametrize("impl, n", [impl_param("cuda", n, id=str(n)) for n in (768, 3072)])
def test_embedding_layernorm_backward_deterministic(impl, n):
    g = torch.Generator().manual_seed(15)
    ids, tt, pos, tables, w, b = emb_inputs(n, torch.bfloat16, g, 2049, vocab=7, n_pos=40, device="cuda")
    dy = rand(2049, n, dtype=torch.bfloat16, gen=g, device="cuda")
    fwd, bwd = row(OP, impl, Call("cuda", torch.bfloat16, n, "fwd+bwd"))
    y = fwd(ids, tt, pos, *tables, w, b, 1e-5, 0.0, 0)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [bwd(dy, ids, tt, pos, *tables, w, b, y[1], y[2], 1e-5, 0.0, 0) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("impl, dtype, n", gpu_big_cases())
def test_embedding_layernorm_gpu_big_shapes(impl, dtype, n):
    require_gpu(impl)
    _check(impl, n, dtype, seed=n, rows=gpu_big_rows(n), vocab=1000, n_pos=512)


# ---------------------------------------------------------------------------------------
# dropout


@pytest.mark.parametrize("impl, dtype, n", [
    impl_param("cpp", torch.float32, 17, id="fp32-17"), impl_param("cpp", torch.float32, 768, id="fp32-768"),
    impl_param("triton", torch.float32, 37, id="fp32-37"), impl_param("triton", torch.float16, 37, id="fp16-37"),
    impl_param("triton", torch.bfloat16, 37, id="bf16-37-gpu"),
])
def test_embedding_layernorm_dropout_mask_matches_reference(impl, dtype, n):
    """Same seed: the reference's Philox mask bit for bit; dropout is the last step, so the zeros of
    the output are exactly the dropped elements."""
    if dtype == torch.bfloat16:
        require_gpu(impl)  # the interpreter cannot do bf16
    g = torch.Generator().manual_seed(7)
    dev, rows = DEVICE[impl], (33 if impl == "cpp" else 9)
    ids, tt, pos, tables, w, b = emb_inputs(n, dtype, g, rows, vocab=20, n_pos=40, device=dev)
    args = (ids, tt, pos, *tables, w, b, 1e-5, 0.3, SEED)
    fwd, bwd = row(OP, impl, Call(dev, dtype, n, "fwd+bwd", dropout=True))
    rm = _ref_mod()
    got, ref = fwd(*args), rm._fwd_reference(*args)
    assert torch.equal(got[0] == 0, ref[0] == 0)
    f = 1e-4 if impl == "cpp" else NORM_FLOOR[impl][dtype]
    torch.testing.assert_close(got[0], ref[0], atol=f * 4, rtol=f)
    dy = rand(rows, n, dtype=dtype, gen=g, device=dev)
    gb = bwd(dy, *args[:8], ref[1], ref[2], 1e-5, 0.3, SEED)
    rb = rm._bwd_reference(dy, *args[:8], ref[1], ref[2], 1e-5, 0.3, SEED)
    for a, r in zip(gb, rb):
        torch.testing.assert_close(a.float(), r.float(), atol=max(f * 8, 1e-3 if impl == "cpp" else 0), rtol=f * 4)


@pytest.mark.parametrize("impl", impls("triton"))
def test_embedding_layernorm_dropout_statistics_and_seed(impl):
    """P(drop) ~= p; a fixed torch.manual_seed reproduces the mask (the reference's); another seed
    changes it."""
    g = torch.Generator().manual_seed(9)
    n, rows, p = 128, 64, 0.3
    dev = DEVICE[impl]
    ids, tt, pos, tables, w, b = emb_inputs(n, torch.float32, g, rows, device=dev)

    def fwd(seed, name=impl):
        torch.manual_seed(seed)
        with forced(name):
            return ops.embedding_layernorm(ids, tt, pos, *tables, w, b, 1e-5, dropout_p=p)

    a, b2, c = fwd(0), fwd(0), fwd(1)
    assert torch.equal(a, b2)
    assert not torch.equal(a == 0, c == 0)
    frac = (a == 0).float().mean().item()
    assert abs(frac - p) < 0.02, f"dropped fraction {frac:.3f}, expected {p}"
    ref = fwd(0, "reference")
    assert torch.equal(a == 0, ref == 0)
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl, n", [impl_param("cuda", n, id=str(n)) for n in (17, 768, 3072)])
def test_embedding_layernorm_dropout_masks_equal_triton(impl, n):
    """The CUDA C++ kernel draws the Triton kernel's (and the reference's) mask."""
    g = torch.Generator().manual_seed(n)
    ids, tt, pos, tables, w, b = emb_inputs(n, torch.bfloat16, g, 97, vocab=50, n_pos=40, device="cuda")
    args = (ids, tt, pos, *tables, w, b, 1e-5, 0.3, SEED)
    call = Call("cuda", torch.bfloat16, n, "fwd+bwd", dropout=True)
    (fwd, bwd), (tfwd, _) = row(OP, impl, call), row(OP, "triton", call)
    rm = _ref_mod()
    got, tri, ref = fwd(*args), tfwd(*args), rm._fwd_reference(*args)
    assert torch.equal(got[0] == 0, tri[0] == 0)
    assert torch.equal(got[0] == 0, ref[0] == 0)
    f = NORM_FLOOR[impl][torch.bfloat16]
    torch.testing.assert_close(got[0], ref[0], atol=f * 4, rtol=f)
    dy = rand(97, n, dtype=torch.bfloat16, gen=g, device="cuda")
    gb = bwd(dy, *args[:8], got[1], got[2], 1e-5, 0.3, SEED)
    rb = rm._bwd_reference(dy, *args[:8], ref[1], ref[2], 1e-5, 0.3, SEED)
    for a, r in zip(gb, rb):
        torch.testing.assert_close(a.float(), r.float(), atol=f * 8, rtol=f * 4)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: ops.embedding_layernorm(torch.tensor([[1, 20]]), None, None, torch.randn(10, 4), torch.randn(8, 4),
                                     torch.randn(2, 4), torch.ones(4), torch.zeros(4)), IndexError, "input_ids"),
    (lambda: ops.embedding_layernorm(torch.tensor([[1.0]]), None, None, torch.randn(10, 4), torch.randn(8, 4),
                                     torch.randn(2, 4), torch.ones(4), torch.zeros(4)), TypeError, "input_ids"),
    (lambda: ops.embedding_layernorm(torch.ones(1, 9, dtype=torch.long), None, None, torch.randn(10, 4),
                                     torch.randn(8, 4), torch.randn(2, 4), torch.ones(4), torch.zeros(4)),
     ValueError, "position"),
], ids=["ids_range", "ids_dtype", "positions"])
def test_embedding_layernorm_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("impl", impls("cpp", "triton", "cuda"))
def test_embedding_layernorm_row_reads_strided_vectors(impl):
    """The row's own entry points with a strided LayerNorm weight and bias: the results of
    contiguous ones, forward and backward."""
    g = torch.Generator().manual_seed(2)
    dev = DEVICE[impl]
    ids, tt, pos, tables, w, b = emb_inputs(24, torch.float32, g, 6, vocab=7, n_pos=8, device=dev)
    dy = rand(6, 24, gen=g, device=dev)
    fwd, bwd = row(OP, impl, Call(dev, torch.float32, 24, "fwd+bwd"))
    w2, b2 = rand(48, gen=g, device=dev)[::2], rand(48, gen=g, device=dev)[::2]
    outs = []
    for wt, bs in ((w2, b2), (w2.contiguous(), b2.contiguous())):
        y = fwd(ids, tt, pos, *tables, wt, bs, 1e-5, 0.0, 0)
        outs.append([*y, *bwd(dy, ids, tt, pos, *tables, wt, bs, y[1], y[2], 1e-5, 0.0, 0)])
    for a, c in zip(*outs):
        torch.testing.assert_close(a, c)
