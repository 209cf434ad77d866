"""Fuzz worker for tests/ops/test_fuzz_ops.py: random (and often invalid) calls of the public ops on
every backend that runs here, in its own process so that a crash is a failed test, not a dead run.

For each generated call, every backend (the C++ CPU kernels, the reference, the Triton kernels
through the interpreter) must either
- accept it, and then match the reference (the float64 oracle for the C++ and Triton results), or
- reject it with the same ValueError / TypeError / IndexError, whose message names an argument.
Prints "FUZZ OK <examples>" at the end; any other exit is a failure.
"""
from __future__ import annotations

import os
import sys
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")
# this checkout's bertfast, not an installed one
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("BERTFAST_CPU_WORKSPACE_MB", "0")

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import bertfast  # noqa: E402
from bertfast import ops  # noqa: E402
from bertfast.padding import pad_input, unpad_input, unpad_mask  # noqa: E402

ERRORS = (ValueError, TypeError, IndexError)
EXAMPLES = int(os.environ.get("BERTFAST_FUZZ_EXAMPLES", "25"))


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


BACKENDS = ["reference", "cpp"] + (["triton"] if _has_triton() and not torch.cuda.is_available() else [])
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
counted = {"examples": 0}


def on_backends(fn, dtype=torch.float32):
    """fn() under each backend: {backend: ("ok", output) | ("err", exception)}. The Triton
    interpreter cannot run bfloat16: those calls skip it."""
    out = {}
    for be in BACKENDS:
        if be == "triton" and dtype == torch.bfloat16:
            continue
        with bertfast.use_backend(be), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out[be] = ("ok", fn())
            except ERRORS as e:
                out[be] = ("err", e)
    counted["examples"] += 1
    return out


def agree(results, arg_names, atol, rtol=1e-3, oracle=None):
    """All backends accepted (and match the reference / oracle) or all rejected alike."""
    kinds = {k for k, _ in results.values()}
    assert len(kinds) == 1, {be: (k, repr(v)[:200]) for be, (k, v) in results.items()}
    if kinds == {"err"}:
        classes = {type(e) for _, e in results.values()}
        assert len(classes) == 1, {be: repr(e) for be, (_, e) in results.items()}
        for be, (_, e) in results.items():
            assert any(n in str(e) for n in arg_names), f"{be}: {type(e).__name__}({e}) names none of {arg_names}"
        return None
    ref = results["reference"][1] if oracle is None else oracle
    for be, (_, got) in results.items():
        g, r = (got if isinstance(got, tuple) else (got,)), (ref if isinstance(ref, tuple) else (ref,))
        for a, b in zip(g, r):
            torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, equal_nan=True,
                                       msg=lambda m, be=be: f"{be}: {m}")
    return ref


def tol(dtype):
    return {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]


def strided(t, how):
    """t as a non-contiguous view with the same values ('t': transposed storage, 's': every other row)."""
    if how == "t" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "s":
        big = torch.empty((2 * max(t.shape[0], 1),) + tuple(t.shape[1:]), dtype=t.dtype)
        big[::2][: t.shape[0]] = t
        return big[::2][: t.shape[0]]
    return t


DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
VALUES = st.sampled_from(["normal", "big", "extreme"])


def values(shape, dtype, kind, g):
    x = torch.randn(shape, generator=g)
    if kind == "big":
        x = x * 30
    elif kind == "extreme" and x.numel():
        flat = x.view(-1)
        specials = torch.tensor([float("-inf"), float("inf"), -1e30, 1e30, -60.0, 60.0, float("nan"), 0.0])
        flat[: min(flat.numel(), 8)] = specials[: min(flat.numel(), 8)]
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------
# attention, packed varlen: offsets valid, or broken in every way a caller can break them


@st.composite
def varlen_case(draw):
    lens = draw(st.lists(st.integers(0, 6), min_size=1, max_size=4))
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    total = cu[-1]
    max_len = max(lens)
    broken = draw(st.sampled_from(["none", "none", "none", "swap", "overshoot", "start", "end", "short_max",
                                   "long_max", "int64", "float_max", "neg_max", "one_entry"]))
    if broken == "swap" and len(cu) > 2:
        cu[1], cu[2] = cu[2] + 3, cu[1]
    elif broken == "overshoot":
        cu[-2] = total + 2
    elif broken == "start":
        cu[0] = 1
    elif broken == "end":
        cu[-1] = total + 1
    elif broken == "short_max" and max_len > 0:
        max_len -= 1
    elif broken == "long_max":
        max_len += draw(st.integers(1, 40))
    elif broken == "neg_max":
        max_len = -1
    elif broken == "one_entry":
        cu = cu[:1]
    H = draw(st.integers(1, 2))
    D = draw(st.sampled_from([1, 8, 16]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    causal = draw(st.booleans())
    layout = draw(st.sampled_from(["", "s"]))
    seed = draw(st.integers(0, 2**16))
    return cu, total, max_len, broken, H, D, dtype, causal, layout, seed


@SETTINGS
@given(varlen_case())
def fuzz_attention_varlen(case):
    cu, total, max_len, broken, H, D, dtype, causal, layout, seed = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (strided(values((total, H, D), dtype, "normal", g), layout) for _ in range(3))
    cu_t = torch.tensor(cu, dtype=torch.int64 if broken == "int64" else torch.int32)
    m = float(max_len) if broken == "float_max" else max_len
    res = on_backends(lambda: ops.attention(q, k, v, cu_seqlens=cu_t, max_seqlen=m, causal=causal), dtype)
    oracle = None
    if res["reference"][0] == "ok" and total:
        oracle = ops.attention_ref(q.double(), k.double(), v.double(), cu_q=cu_t, cu_k=cu_t, max_q=max_len,
                                   max_k=max_len, causal=causal).to(dtype)
    agree(res, ("cu_seqlens", "max_seqlen"), tol(dtype), oracle=oracle)
    lens = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
    valid = (broken not in ("int64", "float_max") and len(cu) >= 2 and cu[0] == 0 and cu[-1] == total
             and min(lens) >= 0 and 0 <= max(lens) <= max_len)
    assert (res["reference"][0] == "ok") == valid, f"{broken}: {cu} max {max_len} -> {res['reference']}"


# ---------------------------------------------------------------------------------------------
# attention, padded layout with the mask kinds


@st.composite
def padded_case(draw):
    B, Sq, Sk = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(0, 5))
    H, D = draw(st.integers(1, 2)), draw(st.sampled_from([1, 8, 16]))
    mask = draw(st.sampled_from(["none", "bool", "long", "float4", "wrong_shape", "list", "int_4d"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    layout = draw(st.sampled_from(["", "t"]))
    return B, Sq, Sk, H, D, mask, dtype, draw(st.booleans()), layout, draw(st.integers(0, 999))


@SETTINGS
@given(padded_case())
def fuzz_attention_padded(case):
    B, Sq, Sk, H, D, mask_kind, dtype, causal, layout, seed = case
    g = torch.Generator().manual_seed(seed)
    q = strided(values((B, Sq, H, D), dtype, "normal", g), layout)
    k, v = (strided(values((B, Sk, H, D), dtype, "normal", g), layout) for _ in range(2))
    keep = torch.rand(B, Sk, generator=g) > 0.3
    mask = {"none": None, "bool": keep, "long": keep.long(), "wrong_shape": keep[:, :-1] if Sk else keep[:0],
            "float4": torch.zeros(B, 1, 1, Sk).masked_fill(~keep[:, None, None, :], float("-inf")),
            "list": keep.tolist(), "int_4d": keep[:, None, None, :].long()}[mask_kind]
    res = on_backends(lambda: ops.attention(q, k, v, mask, causal=causal), dtype)
    oracle = None
    if res["reference"][0] == "ok" and Sk and mask_kind in ("none", "bool", "long"):
        bias = None if mask is None else torch.zeros(B, Sk, dtype=torch.float64).masked_fill(~keep, float("-inf"))
        oracle = ops.attention_ref(q.double(), k.double(), v.double(), bias, causal=causal).to(dtype)
    agree(res, ("attention_mask", "q", "k", "v"), tol(dtype), oracle=oracle)


# ---------------------------------------------------------------------------------------------
# the elementwise and LayerNorm ops


@st.composite
def rows_case(draw):
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=3))) + (draw(st.sampled_from([1, 7, 33])),)
    return (shape, draw(DTYPES), draw(VALUES), draw(st.sampled_from(["", "t", "s"])),
            draw(st.sampled_from(["ok", "ok", "ok", "short", "2d", "int", "dtype"])), draw(st.booleans()),
            draw(st.integers(0, 999)))


def vec(n, dtype, broken, g):
    if broken == "short":
        return torch.randn(max(n - 1, 0), generator=g).to(dtype)
    if broken == "2d":
        return torch.randn(1, n, generator=g).to(dtype)
    if broken == "int":
        return torch.ones(n, dtype=torch.int64)
    if broken == "dtype":
        return torch.randn(n, generator=g).double()
    return torch.randn(n, generator=g).to(dtype)


@SETTINGS
@given(rows_case(), st.sampled_from(["none", "tanh", "exact"]))
def fuzz_bias_gelu(case, approximate):
    shape, dtype, kind, layout, broken, inplace, seed = case
    g = torch.Generator().manual_seed(seed)
    x0 = values(shape, dtype, kind, g)
    bias = vec(shape[-1], dtype, broken, g)

    def call():
        return ops.bias_gelu(strided(x0.clone(), layout), bias, approximate, inplace=inplace)

    res = on_backends(call, dtype)
    oracle = None
    if res["reference"][0] == "ok":
        oracle = ops.bias_gelu_ref(x0.double(), bias.double(), approximate).to(dtype)
    agree(res, ("x", "bias", "approximate"), tol(dtype), oracle=oracle)


@SETTINGS
@given(rows_case(), st.sampled_from([1e-12, 1e-5, 0.0, -1.0, float("nan")]), st.sampled_from([0.0, 0.1, 1.0, -0.5]),
       st.sampled_from(["fresh", "fresh", "same", "overlap", "wrong_shape", "float64"]))
def fuzz_bias_residual_layernorm(case, eps, p, residual_kind):
    shape, dtype, kind, layout, broken, inplace, seed = case
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    base = values((2,) + shape, dtype, kind if kind != "extreme" else "normal", g)
    x0 = base[0]
    bias, w, lb = vec(n, dtype, broken, g), vec(n, dtype, "ok", g), vec(n, dtype, "ok", g)

    def call():
        torch.manual_seed(seed)  # the same dropout stream on every backend
        store = base.clone()
        x = strided(store[0], layout) if layout else store[0]
        r = {"fresh": store[1], "same": x, "overlap": store.view(-1)[n: n + x0.numel()].view(shape),
             "wrong_shape": store[1][..., :-1], "float64": store[1].double()}[residual_kind]
        want = torch.promote_types(x.dtype, r.dtype)
        out = ops.bias_residual_layernorm(x, bias, r, w, lb, eps, p, inplace=inplace)
        return out, want

    res = on_backends(call, dtype)
    res = {be: (k, v[0] if k == "ok" else v) for be, (k, v) in res.items()}
    agree(res, ("x", "bias", "residual", "weight", "ln_bias", "eps", "dropout_p"), max(tol(dtype), 1e-3) * 5)


@SETTINGS
@given(rows_case(), st.sampled_from([1e-12, 1e-5, 0.0]), st.sampled_from(["none", "tanh"]))
def fuzz_gelu_layernorm(case, eps, approximate):
    shape, dtype, kind, layout, broken, _inplace, seed = case
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x0 = values(shape, dtype, "big" if kind == "extreme" else kind, g)
    bias, w, lb = vec(n, dtype, broken, g), vec(n, dtype, "ok", g), vec(n, dtype, "ok", g)
    res = on_backends(lambda: ops.gelu_layernorm(strided(x0.clone(), layout), bias, w, lb, eps, approximate), dtype)
    agree(res, ("x", "bias", "weight", "ln_bias", "eps"), max(tol(dtype), 1e-3) * 5)


@st.composite
def embedding_case(draw):
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=2)))
    V, P, T = draw(st.integers(1, 9)), draw(st.integers(1, 6)), draw(st.integers(1, 3))
    n = draw(st.sampled_from([1, 8, 17]))
    ids_kind = draw(st.sampled_from(["ok", "ok", "neg", "big", "int16", "float", "shape"]))
    tt_kind = draw(st.sampled_from(["none", "ok", "big"]))
    pos_kind = draw(st.sampled_from(["none", "ok", "neg"]))
    return shape, V, P, T, n, ids_kind, tt_kind, pos_kind, draw(st.sampled_from([torch.float32, torch.float16])), \
        draw(st.integers(0, 999))


@SETTINGS
@given(embedding_case())
def fuzz_embedding_layernorm(case):
    shape, V, P, T, n, ids_kind, tt_kind, pos_kind, dtype, seed = case
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, shape, generator=g)
    if ids.numel():
        if ids_kind == "neg":
            ids.view(-1)[0] = -1
        elif ids_kind == "big":
            ids.view(-1)[-1] = V
    if ids_kind == "int16":
        ids = ids.to(torch.int16)
    elif ids_kind == "float":
        ids = ids.float()
    tt = None if tt_kind == "none" else torch.randint(0, T, shape, generator=g)
    if tt_kind == "big" and tt.numel():
        tt.view(-1)[0] = T + 5
    pos = None if pos_kind == "none" else torch.randint(0, P, shape, generator=g)
    if pos_kind == "neg" and pos.numel():
        pos.view(-1)[0] = -3
    if ids_kind == "shape" and tt is not None:
        tt = tt.reshape(-1)[:-1] if tt.numel() else torch.zeros(1, dtype=torch.long)
    word, pe, te = (torch.randn(r, n, generator=g).to(dtype) for r in (V, P, T))
    w, b = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    res = on_backends(lambda: ops.embedding_layernorm(ids, tt, pos, word, pe, te, w, b), dtype)
    agree(res, ("input_ids", "token_type_ids", "position_ids", "pos_emb", "word_emb", "type_emb"),
          max(tol(dtype), 1e-3) * 5)


# ---------------------------------------------------------------------------------------------
# padding helpers


@SETTINGS
@given(st.integers(0, 4), st.integers(1, 6), st.sampled_from(["none", "total+1", "total-1", "max+1", "max-1", "neg"]),
       st.integers(0, 999))
def fuzz_unpad(B, S, wrong, seed):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, S, generator=g) > 0.4).long()
    total, longest = int(mask.sum()), int(mask.sum(1).max()) if B else 0
    given_total = {"total+1": total + 1, "total-1": total - 1, "neg": -1}.get(wrong, total)
    given_max = {"max+1": longest + 1, "max-1": longest - 1}.get(wrong, longest)
    counted["examples"] += 1
    try:
        layout = unpad_mask(mask, given_total, given_max)
    except ERRORS as e:
        assert wrong != "none" and ("total" in str(e) or "max_seqlen" in str(e)), repr(e)
        return
    assert (given_total, given_max) == (total, longest), f"wrong counts {wrong} accepted"
    x = torch.randn(B, S, 3, generator=g)
    packed, idx, cu, m = unpad_input(x, mask)
    assert torch.equal(pad_input(packed, idx, B, S), x * mask[..., None])
    assert torch.equal(layout.cu_seqlens, cu) and layout.max_seqlen == m
    if total:
        q = torch.randn(total, 1, 8, generator=g)
        ops.attention(q, q, q, cu_seqlens=layout)


FUZZERS = [fuzz_attention_varlen, fuzz_attention_padded, fuzz_bias_gelu, fuzz_bias_residual_layernorm,
           fuzz_gelu_layernorm, fuzz_embedding_layernorm, fuzz_unpad]

if __name__ == "__main__":
    torch.set_num_threads(1)
    names = sys.argv[1:] or [f.__name__ for f in FUZZERS]
    for f in FUZZERS:
        if f.__name__ in names:
            f()
            print(f"{f.__name__}: ok", flush=True)
    print(f"FUZZ OK {counted['examples']}", flush=True)
