"""The C++ CPU kernels (csrc/cpu via bertfast/dispatch/cpp.py) against the plain-PyTorch references.

Every test forces the `cpp` backend with BERTFAST_STRICT=1, so a silent fallback to the
reference fails the test. Accuracy rule (docs/testing.md): against a float64 oracle, a kernel's
error must stay within 2x the error eager PyTorch makes in the same precision, plus a small
floor. The first test session builds the extension (cached afterwards).
"""
import importlib
import warnings

import pytest
import torch

import bertfast
import bertfast.dispatch.cpp as cpp
from bertfast import dispatch, ops
from bertfast.dispatch import Call
from bertfast.ops._rng import keep_mask

HIDDEN = (1, 17, 384, 768, 1000)
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 4e-3}


@pytest.fixture(scope="module", autouse=True)
def _built():
    cpp.load()  # a build failure is an error here, not a skip: CI must build the kernels
    assert cpp.status()["state"] in ("built", "cached", "prebuilt"), cpp.status()


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    monkeypatch.setenv("BERTFAST_STRICT", "1")


# ---------------------------------------------------------------------------------------
# helpers

def _make(op, shape, n, seed=0, ids_dtype=torch.int64, vocab=50):
    """fp32 master inputs of `op`: (positional args, index of float tensors that get grads)."""
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g)

    if op == "bias_gelu":
        return [r(*shape, n), r(n)]
    if op == "gelu_layernorm":
        return [r(*shape, n), r(n), 1 + 0.1 * r(n), r(n)]
    if op == "bias_residual_layernorm":
        return [r(*shape, n), r(n), r(*shape, n), 1 + 0.1 * r(n), r(n)]
    if op == "embedding_layernorm":
        ids = torch.randint(0, vocab, shape, generator=g).to(ids_dtype)
        tt = torch.randint(0, 2, shape, generator=g).to(ids_dtype)
        pos = torch.randint(0, 40, shape, generator=g).to(ids_dtype)
        return [ids, tt, pos, r(vocab, n), r(40, n), r(2, n), 1 + 0.1 * r(n), r(n)]
    raise ValueError(op)


def _cast(args, dtype, op):
    """Activations (and tables) in `dtype`; the LayerNorm/bias vectors stay fp32 like a model's params
    would in mixed precision... except for the embedding tables, which share the output dtype."""
    out = []
    for i, a in enumerate(args):
        if not a.is_floating_point():
            out.append(a)
            continue
        low = a.dim() > 1 or op == "bias_gelu"
        out.append(a.to(dtype if low else torch.float32).detach().requires_grad_())
    return out


def _run(op, args, backend_name, kwargs=None, dout=None):
    """(output, grads of the float inputs) through the public op with one backend."""
    fn = getattr(ops, op)
    with bertfast.use_backend(backend_name):
        out = fn(*args, **(kwargs or {}))
        if dout is None:
            return out, None
        out.backward(dout.to(out.dtype))
    grads = [a.grad for a in args if a.is_floating_point()]
    return out, grads


def _check(got, low, oracle, dtype, what):
    """|got - oracle| <= 2 |low - oracle| + floor * max(1, |oracle|max)."""
    got, low, oracle = got.double(), low.double(), oracle.double()
    err = (got - oracle).abs().max().item()
    ref_err = (low - oracle).abs().max().item()
    scale = max(1.0, oracle.abs().max().item())
    bound = 2 * ref_err + FLOOR[dtype] * scale
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (eager {dtype} error {ref_err:.3g})"


def _compare(op, shape, n, dtype, kwargs=None, seed=0, **make_kw):
    master = _make(op, shape, n, seed, **make_kw)
    dout = torch.randn(*shape, n, generator=torch.Generator().manual_seed(seed + 1))
    oracle_args = [a.double().requires_grad_() if a.is_floating_point() else a for a in master]
    o_out, o_grads = _run(op, oracle_args, "reference", kwargs, dout.double())
    l_out, l_grads = _run(op, _cast(master, dtype, op), "reference", kwargs, dout)
    c_out, c_grads = _run(op, _cast(master, dtype, op), "cpp", kwargs, dout)
    assert c_out.dtype == l_out.dtype and c_out.shape == l_out.shape
    _check(c_out, l_out, o_out, dtype, f"{op} forward")
    for i, (c, lo, o) in enumerate(zip(c_grads, l_grads, o_grads)):
        assert c is not None and c.dtype == lo.dtype, f"{op} grad {i}"
        _check(c, lo, o, dtype, f"{op} grad {i}")


# ---------------------------------------------------------------------------------------
# accuracy

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", HIDDEN)
@pytest.mark.parametrize("op", ["embedding_layernorm", "bias_residual_layernorm", "bias_gelu", "gelu_layernorm"])
def test_forward_backward_vs_reference(op, n, dtype):
    shape = (3, 13) if n < 768 else (37,)
    _compare(op, shape, n, dtype)


@pytest.mark.parametrize("op", ["bias_gelu", "gelu_layernorm"])
def test_tanh_gelu(op):
    _compare(op, (29,), 384, torch.float32, kwargs={"approximate": "tanh"})
    _compare(op, (29,), 100, torch.bfloat16, kwargs={"approximate": "tanh"})


def test_float16():
    for op in ("bias_residual_layernorm", "bias_gelu", "gelu_layernorm"):
        master = _make(op, (19,), 200)
        got, _ = _run(op, [a.half() if a.dim() > 1 else a for a in master], "cpp")
        ref, _ = _run(op, [a.half() if a.dim() > 1 else a for a in master], "reference")
        torch.testing.assert_close(got.float(), ref.float(), atol=4e-3, rtol=4e-3)


def test_bias_residual_layernorm_without_bias():
    g = torch.Generator().manual_seed(3)
    x, r = (torch.randn(21, 300, generator=g).requires_grad_() for _ in range(2))
    w, lb = torch.randn(300, generator=g).requires_grad_(), torch.randn(300, generator=g).requires_grad_()
    outs = {}
    for name in ("cpp", "reference"):
        for t in (x, r, w, lb):
            t.grad = None
        with bertfast.use_backend(name):
            y = ops.bias_residual_layernorm(x, None, r, w, lb)
            y.backward(torch.ones_like(y) + y.detach())
        outs[name] = [y] + [t.grad.clone() for t in (x, r, w, lb)]
    for a, b in zip(outs["cpp"], outs["reference"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_float64_served_by_reference_math():
    """float64 calls run the reference (float64 arithmetic): gradcheck passes under `cpp`."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    with bertfast.use_backend("cpp"):
        assert torch.autograd.gradcheck(lambda a, c: ops.bias_gelu(a, c), (x, b))


# ---------------------------------------------------------------------------------------
# layouts: non-contiguous inputs, ids dtypes, repeated ids

def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 2 * 384, generator=g)
    x = base[:, ::2]  # strided rows
    r = torch.randn(384, 64, generator=g).t()  # transposed
    b, w, lb = torch.randn(3, 2 * 384, generator=g)[:, ::2].unbind(0)
    assert not x.is_contiguous() and not r.is_contiguous() and not b.is_contiguous()
    for name, fn in (("bias_residual_layernorm", lambda: ops.bias_residual_layernorm(x, b, r, w, lb)),
                     ("bias_gelu", lambda: ops.bias_gelu(x, b)),
                     ("gelu_layernorm", lambda: ops.gelu_layernorm(x, b, w, lb))):
        with bertfast.use_backend("cpp"):
            got = fn()
        with bertfast.use_backend("reference"):
            ref = fn()
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=name)
    # The backend entry points themselves make their inputs contiguous.
    got = cpp.bias_gelu_fwd(x, b, "none")
    # two fp32 erf approximations (ours rational, eager's oneDNN), each ~1e-6 from fp64 at worst
    torch.testing.assert_close(got, ops.bias_gelu_ref(x, b), atol=3e-6, rtol=1e-6)
    out, mean, rstd = cpp.bias_residual_layernorm_fwd(x, b, r, w, lb, 1e-12, 0.0, 0)
    torch.testing.assert_close(out, ops.bias_residual_layernorm_ref(x, b, r, w, lb), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_embedding_ids_dtypes_and_repeats(ids_dtype):
    # vocab 3: almost every id repeats many times; the scatter must sum them all
    _compare("embedding_layernorm", (4, 50), 96, torch.float32, ids_dtype=ids_dtype, vocab=3)
    _compare("embedding_layernorm", (4, 50), 96, torch.bfloat16, ids_dtype=ids_dtype, vocab=3)


def test_embedding_mixed_id_dtypes_and_default_ids():
    g = torch.Generator().manual_seed(2)
    word, pe, te = torch.randn(30, 64, generator=g), torch.randn(16, 64, generator=g), torch.randn(2, 64, generator=g)
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    ids = torch.randint(0, 30, (2, 16), generator=g, dtype=torch.int32)
    tt = torch.randint(0, 2, (2, 16), generator=g)  # int64
    with bertfast.use_backend("cpp"):
        got = [ops.embedding_layernorm(ids, tt, None, word, pe, te, w, b),
               ops.embedding_layernorm(ids, None, None, word, pe, te, w, b)]
    ref = [ops.embedding_layernorm_ref(ids, tt, torch.arange(16).expand(2, 16), word, pe, te, w, b),
           ops.embedding_layernorm_ref(ids, torch.zeros_like(ids), torch.arange(16).expand(2, 16), word, pe, te, w, b)]
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


def test_embedding_out_of_range_ids_raise():
    word = torch.randn(10, 8)
    with pytest.raises((RuntimeError, IndexError)):
        cpp.embedding_layernorm_fwd(torch.tensor([3, 10]), torch.zeros(2, dtype=torch.long),
                                    torch.zeros(2, dtype=torch.long), word, torch.randn(4, 8), torch.randn(2, 8),
                                    torch.ones(8), torch.zeros(8), 1e-12, 0.0, 0)


# ---------------------------------------------------------------------------------------
# determinism and dropout

def _fwd_bwd(op, args, kwargs):
    for a in args:
        if a.is_floating_point():
            a.grad = None
    with bertfast.use_backend("cpp"):
        y = getattr(ops, op)(*args, **kwargs)
        y.backward(torch.cos(y.detach()))
    return [y.detach()] + [a.grad.clone() for a in args if a.is_floating_point()]


@pytest.mark.parametrize("op", ["embedding_layernorm", "bias_residual_layernorm", "bias_gelu", "gelu_layernorm"])
def test_same_result_with_1_and_2_threads(op):
    kwargs = {"dropout_p": 0.1} if op in ("embedding_layernorm", "bias_residual_layernorm") else {}
    args = [a.requires_grad_() if a.is_floating_point() else a for a in _make(op, (1000,), 384, vocab=7)]
    prev = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(11)  # the dropout seed comes from torch's generator
            results.append(_fwd_bwd(op, args, kwargs))
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(*results):
        assert torch.equal(a, b), f"{op}: results differ between 1 and 2 threads"


@pytest.mark.parametrize("n", [17, 768])
def test_dropout_matches_reference_stream(n):
    """Same seed -> the same Philox mask as the reference, bit for bit, forward and backward."""
    seed = 0x1234_5678_9ABC
    for op in ("embedding_layernorm", "bias_residual_layernorm"):
        args = _make(op, (33,), n, vocab=20)
        mod = importlib.import_module(f"bertfast.ops.{op}")
        if op == "embedding_layernorm":
            be = args + [1e-12, 0.25, seed]
        else:
            be = args + [1e-12, 0.25, seed]
        got = getattr(cpp, f"{op}_fwd")(*be)
        ref = mod._fwd_reference(*be)
        torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=1e-4)
        if op == "embedding_layernorm":  # dropout is the last step: zeros are exactly the dropped elements
            keep = keep_mask(seed, 0.25, torch.arange(33 * n).view(33, n))
            assert torch.equal(got[0] != 0, keep)
        dout = torch.randn(33, n)
        gg = getattr(cpp, f"{op}_bwd")(dout, *be[:len(args)], got[1], got[2], 1e-12, 0.25, seed)
        gr = mod._bwd_reference(dout, *be[:len(args)], got[1], got[2], 1e-12, 0.25, seed)
        for a, b in zip(gg, gr):
            if b is not None:
                torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)


def test_dropout_through_public_op_reproducible():
    x, r = torch.randn(2, 40, 64).unbind(0)
    b, w, lb = torch.randn(3, 64).unbind(0)
    with bertfast.use_backend("cpp"):
        torch.manual_seed(5)
        y1 = ops.bias_residual_layernorm(x, b, r, w, lb, dropout_p=0.5)
        torch.manual_seed(5)
        y2 = ops.bias_residual_layernorm(x, b, r, w, lb, dropout_p=0.5)
    with bertfast.use_backend("reference"):
        torch.manual_seed(5)
        y3 = ops.bias_residual_layernorm(x, b, r, w, lb, dropout_p=0.5)
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y1, y3, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# build machinery

def test_selected_by_default_on_cpu(monkeypatch):
    monkeypatch.delenv("BERTFAST_BACKEND", raising=False)
    for op in ("embedding_layernorm", "bias_residual_layernorm", "bias_gelu", "gelu_layernorm"):
        assert dispatch.select(op, Call("cpu", torch.float32, 768, "fwd+bwd")).backend == "cpp"
    assert cpp.status()["capability"] in ("AVX512", "AVX2", "DEFAULT")


def test_build_failure_falls_back_with_one_warning(monkeypatch, tmp_path, capfd):
    """A compiler error: the reference serves the op, with one warning quoting the error. The build
    says it started (and roughly how long it takes) before the compiler runs."""
    broken = tmp_path / "csrc" / "cpu"
    broken.mkdir(parents=True)
    (broken / "bias_gelu.cpp").write_text("#error deliberately broken for the test\n")
    (broken / "build_info.cpp").write_text("\n")
    monkeypatch.setenv("BERTFAST_CSRC_DIR", str(tmp_path / "csrc"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("BERTFAST_STRICT")
    monkeypatch.setattr(cpp, "_LOADED", None)
    monkeypatch.setattr(cpp, "_state", dict(cpp._state))
    dispatch.reset()
    x, b = torch.randn(4, 8), torch.randn(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with bertfast.use_backend("cpp"):
            y1 = ops.bias_gelu(x, b)
            y2 = ops.bias_gelu(x, b)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1, msgs
    assert "failed to build" in msgs[0] and "deliberately broken" in msgs[0], msgs[0]
    err = capfd.readouterr().err
    # the estimate matches the measured build (tens of seconds on 2 cores), not a stale "2 minutes"
    assert "building the C++ CPU kernels once" in err and "about a minute" in err, err
    torch.testing.assert_close(y1, ops.bias_gelu_ref(x, b))
    assert torch.equal(y1, y2)
    st = cpp.status()
    assert st["state"] == "failed" and "deliberately broken" in st["reason"]
    # another op: its own single warning, from the remembered failure (no second compile)
    calls = []
    monkeypatch.setattr(cpp, "_jit_build", lambda *a: calls.append(a))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with bertfast.use_backend("cpp"):
            ops.gelu_layernorm(x, b, b, b)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "deliberately broken" in msgs[0] and not calls, (msgs, calls)
    # strict mode turns the same fallback into an error
    dispatch.reset()
    monkeypatch.setenv("BERTFAST_STRICT", "1")
    with bertfast.use_backend("cpp"), pytest.raises(dispatch.BackendError, match="failed to build"):
        ops.bias_gelu(x, b)
    dispatch.reset()


# ---------------------------------------------------------------------------------------
# attention: padded (key bias) and packed varlen, against the reference backward contract

def _attn_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for _ in range(3)]


def _eager_attention(q, k, v, key_bias, scale, causal):
    """Padded attention as eager PyTorch computes it in the inputs' own dtype: (out, lse (B, H, S)).
    Its error against the float64 oracle is what the accuracy rule allows twice of, so the bound
    follows the dtype's real rounding on whatever CPU runs the test (ATen's kernels differ between
    AVX-512, AVX2 and the portable build) rather than one machine's measured result."""
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if key_bias is not None:
        s = s + key_bias[:, None, None, :].to(s.dtype)
    if causal:
        Sq, Sk = s.shape[-2:]
        s = s.masked_fill(torch.ones(Sq, Sk, dtype=torch.bool).triu(Sk - Sq + 1), float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v), s.logsumexp(-1)


def _eager_attention_varlen(q, k, v, cu, scale):
    """_eager_attention of each packed (total, H, D) sequence alone: (out (total, H, D), lse (H, total))."""
    pieces = [_eager_attention(q[None, a:b], k[None, a:b], v[None, a:b], None, scale, False)
              for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    return torch.cat([o[0] for o, _ in pieces]), torch.cat([lse[0] for _, lse in pieces], -1)


def _attn_check(args, dtype, atol):
    A = importlib.import_module("bertfast.ops.attention")

    q, k, v = args[:3]
    out, lse = cpp.attention_fwd(*args)
    ro, rl = A._fwd_reference(*args)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == rl.shape
    assert torch.equal(torch.isinf(lse), torch.isinf(rl)), "rows that see no key must have lse = +inf"
    torch.testing.assert_close(out.float(), ro.float(), atol=atol, rtol=atol)
    torch.testing.assert_close(torch.nan_to_num(lse, posinf=0.0), torch.nan_to_num(rl, posinf=0.0), atol=atol,
                               rtol=atol)
    dout = torch.randn_like(out)
    got = cpp.attention_bwd(dout, q, k, v, ro, rl, *args[3:])
    ref = A._bwd_reference(dout, q, k, v, ro, rl, *args[3:])
    for name, a, b in zip("qkv", got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b.float(), atol=4 * atol, rtol=4 * atol, msg=f"d{name}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("S,H,D", [(1, 1, 32), (3, 2, 64), (97, 3, 64), (130, 2, 32), (17, 2, 128)])
def test_attention_padded(S, H, D, p, causal):
    B = 3
    q, k, v = _attn_inputs((B, S, H, D), torch.float32)
    bias = torch.zeros(B, S)
    bias[1, S // 2 + 1:] = float("-inf")  # right padding
    bias[2, :] = float("-inf")  # a sequence that sees nothing: zeros, lse = +inf
    bias[0, 0] = -10000.0  # HF's finite "extended mask" value
    _attn_check((q, k, v, bias, None, None, S, S, p, D ** -0.5, causal, 4321), torch.float32, 2e-5)
    _attn_check((q, k, v, None, None, None, S, S, p, 0.3, causal, 4321), torch.float32, 2e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_attention_varlen(p, causal):
    lens = [5, 1, 17, 64, 130, 3]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = _attn_inputs((int(cu[-1]), 3, 64), torch.float32, seed=1)
    _attn_check((q, k, v, None, cu, cu, max(lens), max(lens), p, 0.125, causal, 99), torch.float32, 2e-5)


def test_attention_varlen_cross_lengths():
    cu_q = torch.tensor([0, 3, 3, 10], dtype=torch.int32)  # an empty query sequence
    cu_k = torch.tensor([0, 7, 9, 11], dtype=torch.int32)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(10, 2, 32, generator=g)
    k, v = torch.randn(2, 11, 2, 32, generator=g).unbind(0)
    for causal in (False, True):
        _attn_check((q, k, v, None, cu_q, cu_k, 7, 7, 0.0, 0.2, causal, 0), torch.float32, 2e-5)


def test_attention_bf16_and_public_op():
    lens = [7, 33, 128]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = _attn_inputs((int(cu[-1]), 4, 64), torch.bfloat16, seed=3)
    _attn_check((q, k, v, None, cu, cu, 128, 128, 0.0, 0.125, False, 0), torch.bfloat16, 2e-2)
    # the public op with autograd, padded with a (B, S) mask, against the reference backend
    g = torch.Generator().manual_seed(4)
    qp, kp, vp = (torch.randn(2, 40, 4, 32, generator=g).requires_grad_() for _ in range(3))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0
    res = {}
    for name in ("cpp", "reference"):
        for t in (qp, kp, vp):
            t.grad = None
        with bertfast.use_backend(name):
            o = ops.attention(qp, kp, vp, attention_mask=mask)
            o.backward(torch.cos(o.detach()))
        res[name] = [o.detach()] + [t.grad.clone() for t in (qp, kp, vp)]
    for a, b in zip(res["cpp"], res["reference"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [17, 32, 40, 64])
def test_attention_reads_fused_qkv_views_in_place(dtype, D):
    """Q, K and V as views into one (tokens, 3, heads, head_dim) projection (BertModel's fused QKV)
    are read at their token stride: the same bits as from contiguous copies, padded (with and
    without a key bias) and packed, and within tolerance of the float64 reference. 75 queries
    leave partial query blocks and GEMM row blocks; head_dim 17 and 40 partial vectors."""
    A = importlib.import_module("bertfast.ops.attention")
    B, S, H = 2, 75, 3
    g = torch.Generator().manual_seed(D)
    qkv = torch.randn(B, S, 3, H, D, generator=g).to(dtype)
    bias = torch.zeros(B, S)
    bias[1, 60:] = float("-inf")
    cu = torch.tensor([0, 31, 2 * S], dtype=torch.int32)
    fwd = cpp._OPS["attention_fwd"]  # the extension itself, whatever serves the public op
    cases = [(qkv.unbind(2), (bias, None, None, S, S)), (qkv.unbind(2), (None, None, None, S, S)),
             (qkv.view(B * S, 3, H, D).unbind(1), (None, cu, cu, 2 * S - 31, 2 * S - 31))]
    for (q, k, v), geo in cases:
        assert not q.is_contiguous() and q.stride(-3) == 3 * H * D
        rest = (*geo, 0.0, D ** -0.5, False, 0)
        out, lse = fwd(q, k, v, *rest)
        want_out, want_lse = fwd(q.contiguous(), k.contiguous(), v.contiguous(), *rest)
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
        ro, rl = A._fwd_reference(q.double(), k.double(), v.double(), *rest)
        if geo[1] is None:
            low_out, low_lse = _eager_attention(q, k, v, geo[0], D ** -0.5, False)
        else:
            low_out, low_lse = _eager_attention_varlen(q, k, v, cu, D ** -0.5)
        _check(out, low_out, ro, dtype, "out")
        _check(lse, low_lse, rl, dtype, "lse")


def test_attention_deterministic_across_threads():
    lens = [50, 128, 77, 3]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = _attn_inputs((int(cu[-1]), 6, 64), torch.float32, seed=5)
    args = (q, k, v, None, cu, cu, 128, 128, 0.1, 0.125, False, 7)
    prev = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, lse = cpp.attention_fwd(*args)
            runs.append([out, lse, *cpp.attention_bwd(torch.ones_like(out), q, k, v, out, lse, *args[3:])])
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmasked_padded_attention_served_by_aten_flash(monkeypatch, causal, dtype):
    """Unmasked padded batches: ATen's CPU flash kernel serves the bf16 forward and the fp32
    backward, this extension the others (whichever measured faster), so every pairing of the two
    kernels' forward and backward runs here: same outputs, lse and grads as the reference."""
    att = importlib.import_module("bertfast.ops.attention")
    monkeypatch.setenv("BERTFAST_STRICT", "1")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 9, 3, 32, generator=g).to(dtype) for _ in range(3))
    call = Call("cpu", dtype, 32, "fwd+bwd", "padded", 9, "none", False, "self" if causal else "none")
    sel = dispatch.select("attention", call)
    assert sel.backend == ("aten_flash+cpp" if dtype == torch.bfloat16 else "cpp+aten_flash"), sel
    # a key mask or dropout: the C++ kernels serve both passes
    assert dispatch.select("attention", call._replace(mask="key")).backend == "cpp"
    assert dispatch.select("attention", call._replace(dropout=True)).backend == "cpp"
    out, lse = sel.fwd(q, k, v, None, None, None, 9, 9, 0.0, 0.2, causal, 0)
    ref_out, ref_lse = att._fwd_reference(q.double(), k.double(), v.double(), None, None, None, 9, 9, 0.0, 0.2,
                                          causal, 0)
    # eager PyTorch in the same dtype, with autograd: the error the rule allows twice of
    low = [t.detach().requires_grad_() for t in (q, k, v)]
    low_out, low_lse = _eager_attention(*low, None, 0.2, causal)
    _check(out, low_out, ref_out, dtype, "out")
    _check(lse, low_lse, ref_lse, dtype, "lse")
    dout = torch.randn(out.shape, generator=g).to(dtype)
    low_grads = torch.autograd.grad(low_out, low, dout)
    got = sel.bwd(dout, q, k, v, out, lse, None, None, None, 9, 9, 0.0, 0.2, causal, 0)
    ref = att._bwd_reference(dout.double(), q.double(), k.double(), v.double(), ref_out, ref_lse, None, None, None,
                             9, 9, 0.0, 0.2, causal, 0)
    for name, a, lo, b in zip("qkv", got, low_grads, ref):
        _check(a, lo, b, dtype, f"d{name}")


def test_inplace_writes_over_x_only_without_autograd():
    """inplace=True (BertModel's inference path): the result lands in x's memory, equal to the
    out-of-place result; with autograd x must survive for the backward, so no overwrite."""
    g = torch.Generator().manual_seed(5)
    x0, r = torch.randn(2, 9, 384, generator=g), torch.randn(2, 9, 384, generator=g)
    b, w, lb = torch.randn(3, 384, generator=g).unbind(0)
    for name, fn in (("bias_gelu", lambda x, **k: ops.bias_gelu(x, b, **k)),
                     ("bias_residual_layernorm", lambda x, **k: ops.bias_residual_layernorm(x, b, r, w, lb, **k))):
        with bertfast.use_backend("cpp"):
            want = fn(x0.clone())
            x = x0.clone()
            got = fn(x, inplace=True)
            assert got.data_ptr() == x.data_ptr(), name
            torch.testing.assert_close(got, want, atol=0, rtol=0, msg=name)
            xg = x0.clone().requires_grad_()
            out = fn(xg, inplace=True)
            assert out.data_ptr() != xg.data_ptr(), name
            torch.testing.assert_close(xg.detach(), x0, atol=0, rtol=0)  # untouched
            (gx,) = torch.autograd.grad(out.square().sum(), xg)
        with bertfast.use_backend("reference"):
            xr = x0.clone().requires_grad_()
            (rx,) = torch.autograd.grad(fn(xr).square().sum(), xr)
        torch.testing.assert_close(gx, rx, atol=1e-4, rtol=1e-4, msg=name)
        with bertfast.use_backend("reference"):  # backends without an in-place path ignore it
            x = x0.clone()
            assert fn(x, inplace=True).data_ptr() != x.data_ptr()
