"""The Triton attention kernels (kernels/attention.py) against the reference (ops/attention.py).

Without a GPU they run on CPU tensors through the Triton interpreter (conftest sets
TRITON_INTERPRET=1), so the shapes are tiny and odd: sequence lengths 1, 3, 17, 33, 97 cover
one, several and partial tiles and the causal diagonal (the interpreter tiles are 16 x 32).
Accuracy follows FlashAttention's oracle rule: the kernel's error against the float64
reference is at most twice the error of eager PyTorch attention in the same precision, plus a
small absolute floor. Dropout masks are compared exactly (the Philox stream is shared).
GPU-only tests (bf16, BERT-size shapes, dropout statistics, determinism) skip without CUDA.
"""
import importlib
import math

import pytest
import torch
from conftest import HAS_CUDA, TRITON_DEVICE, requires_cuda, requires_triton

pytestmark = requires_triton
DEV = TRITON_DEVICE
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    # a silent fallback to the reference would make every comparison pass: forbid it
    monkeypatch.setenv("BERTFAST_STRICT", "1")


def _mods():
    return importlib.import_module("bertfast.kernels.attention"), importlib.import_module("bertfast.ops.attention")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(shape, dtype, g, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEV)


def _key_bias(kind, B, Sk, g):
    """fp32 (B, Sk) additive key bias of a mask kind, or None."""
    if kind == "none":
        return None
    bias = torch.zeros(B, Sk, dtype=torch.float32)
    lens = [max(1, Sk - 2 * b - 1) for b in range(B)]
    for b, n in enumerate(lens):
        if kind == "right":
            bias[b, n:] = float("-inf")
        elif kind == "left":
            bias[b, : Sk - n] = float("-inf")
    if kind == "dead":  # right padding, and one batch row that sees no key at all
        for b, n in enumerate(lens):
            bias[b, n:] = float("-inf")
        bias[-1] = float("-inf")
    if kind == "float":  # HF-style additive float mask: arbitrary finite values and some -inf
        bias = torch.randn(B, Sk, generator=g) * 3.0
        bias[0, -1] = float("-inf")
    return bias.to(DEV)


def _full_bias(key_bias, B, Sq, Sk, causal):
    """(B, 1, Sq, Sk) additive float64 mask for the eager implementation."""
    bias = torch.zeros(B, 1, Sq, Sk, dtype=torch.float64, device=DEV)
    if key_bias is not None:
        bias = bias + key_bias.double()[:, None, None, :]
    if causal:
        i = torch.arange(Sq, device=DEV).view(Sq, 1)
        j = torch.arange(Sk, device=DEV).view(1, Sk)
        bias = bias.masked_fill(j > i + (Sk - Sq), float("-inf"))
    return bias


def _eager(q, k, v, bias, p, scale, seed, dout):
    """Plain PyTorch attention computed in the inputs' own precision (the oracle's yardstick):
    (out, dq, dk, dv). Rows that see no key give 0, like the kernel."""
    _, A = _mods()
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale + bias.to(q.dtype)
    dead = torch.isneginf(s).all(-1, keepdim=True)
    prob = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if p > 0:
        keep = A.keep_mask(seed, p, A._dropout_offsets(B, H, Sq, Sk, q.device))
        prob = prob * keep.to(q.dtype) / (1.0 - p)
    out = torch.einsum("bhij,bjhd->bihd", prob, v)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _assert_oracle(name, got, ref, eager, dtype, rows=None):
    got, ref, eager = got.double(), ref.double(), eager.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref).abs().max().item() if got.numel() else 0.0
    err_eager = (eager - ref).abs().max().item() if got.numel() else 0.0
    bound = 2 * err_eager + FLOOR[dtype]
    assert err <= bound, f"{name}: max error {err:.3g} > 2 x eager {err_eager:.3g} + {FLOOR[dtype]:g}"
    return err


def _assert_lse(got, ref):
    ref = ref.to(got.device)
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(got), inf) and (got[inf] > 0).all(), "lse must be +inf exactly on dead rows"
    if (~inf).any():
        torch.testing.assert_close(got[~inf].double(), ref[~inf].double(), atol=1e-5, rtol=1e-5)


def _padded_case(B, Sq, Sk, H, D, dtype, mask="none", causal=False, p=0.0, scale=None, Dv=None, seed=0):
    K, A = _mods()
    g = _gen(seed)
    Dv = Dv or D
    q, k = _rand((B, Sq, H, D), dtype, g), _rand((B, Sk, H, D), dtype, g)
    v, dout = _rand((B, Sk, H, Dv), dtype, g), _rand((B, Sq, H, Dv), dtype, g)
    kb = _key_bias(mask, B, Sk, g)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    drop_seed = 123456789123 + seed
    args = (kb, None, None, Sq, Sk, p, scale, causal, drop_seed)

    out, lse = K.attention_fwd(q, k, v, *args)
    dq, dk, dv = K.attention_bwd(dout, q, k, v, out, lse, *args)

    q64, k64, v64, do64 = (t.double() for t in (q, k, v, dout))
    ref_out, ref_lse = A._fwd_reference(q64, k64, v64, *args)
    ref_grads = A._bwd_reference(do64, q64, k64, v64, ref_out, ref_lse, *args)
    eager = _eager(q, k, v, _full_bias(kb, B, Sq, Sk, causal), p, scale, drop_seed, dout)

    errs = {"out": _assert_oracle("out", out, ref_out, eager[0], dtype)}
    _assert_lse(lse, ref_lse)
    for name, got, ref, e in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, eager[1:]):
        errs[name] = _assert_oracle(name, got, ref, e, dtype)
    dead = torch.isinf(ref_lse).permute(0, 2, 1)  # (B, Sq, H)
    if dead.any():  # rows that see no key: exact zeros and zero grads
        assert (out[dead] == 0).all() and (dq[dead] == 0).all()
    return errs


# ---------------------------------------------------------------------------------------------
# padded layout


@pytest.mark.parametrize("B,Sq,Sk,H,D,mask,causal", [
    (2, 17, 17, 2, 32, "right", False),
    (2, 33, 33, 1, 64, "left", True),
    (3, 3, 3, 2, 128, "dead", False),
    (1, 1, 1, 2, 64, "none", False),
    (2, 1, 5, 1, 32, "right", True),
    (2, 97, 97, 1, 32, "float", False),
    (2, 20, 13, 2, 64, "dead", True),  # Sq > Sk causal: the first Sq - Sk rows see no key
    (1, 130, 130, 1, 64, "right", True),
])
def test_padded_fp32(B, Sq, Sk, H, D, mask, causal):
    _padded_case(B, Sq, Sk, H, D, torch.float32, mask, causal)


@pytest.mark.parametrize("B,Sq,Sk,H,D,mask,causal", [
    (2, 17, 17, 2, 64, "right", False),
    (2, 19, 35, 1, 32, "left", True),
    (2, 3, 3, 1, 128, "dead", False),
    (1, 97, 97, 1, 128, "none", True),
])
def test_padded_fp16(B, Sq, Sk, H, D, mask, causal):
    _padded_case(B, Sq, Sk, H, D, torch.float16, mask, causal)


def test_odd_head_dims_and_negative_scale():
    # head_dim 24 (q/k) and 40 (v) are padded in-kernel to 32 and 64; a negative scale flips q
    _padded_case(2, 9, 11, 1, 24, torch.float32, "right", False, Dv=40)
    _padded_case(1, 7, 7, 1, 32, torch.float32, "none", True, scale=-0.3)


# ---------------------------------------------------------------------------------------------
# varlen layout


def _varlen_case(lens_q, lens_k, H, D, dtype, causal=False, p=0.0, seed=1):
    K, A = _mods()
    g = _gen(seed)
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=DEV)
    max_q, max_k = max(lens_q), max(lens_k)
    q, k = _rand((sum(lens_q), H, D), dtype, g), _rand((sum(lens_k), H, D), dtype, g)
    v, dout = _rand((sum(lens_k), H, D), dtype, g), _rand((sum(lens_q), H, D), dtype, g)
    scale = 1.0 / math.sqrt(D)
    drop_seed = 987654321 + seed
    args = (None, cu_q, cu_k, max_q, max_k, p, scale, causal, drop_seed)

    out, lse = K.attention_fwd(q, k, v, *args)
    dq, dk, dv = K.attention_bwd(dout, q, k, v, out, lse, *args)
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, dout))
    ref_out, ref_lse = A._fwd_reference(q64, k64, v64, *args)
    ref_grads = A._bwd_reference(do64, q64, k64, v64, ref_out, ref_lse, *args)

    # eager yardstick on the padded equivalent, then packed again
    bias, rows_q, rows_k = A._varlen_bias(cu_q, cu_k, max_q, max_k, causal, q.device)
    pad = lambda t, cu, m: A._pad(t, cu, m)[0]  # noqa: E731
    eo, edq, edk, edv = _eager(pad(q, cu_q, max_q), pad(k, cu_k, max_k), pad(v, cu_k, max_k),
                               bias.double().expand(-1, 1, max_q, -1), p, scale, drop_seed, pad(dout, cu_q, max_q))
    unpad = lambda t, rows: t.reshape(-1, *t.shape[2:])[rows]  # noqa: E731
    eager = (unpad(eo, rows_q), unpad(edq, rows_q), unpad(edk, rows_k), unpad(edv, rows_k))

    _assert_oracle("out", out, ref_out, eager[0], dtype)
    _assert_lse(lse, ref_lse)
    for name, got, ref, e in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, eager[1:]):
        _assert_oracle(name, got, ref, e, dtype)
    dead = torch.isinf(ref_lse).t()  # (total_q, H)
    if dead.any():
        assert (out[dead] == 0).all() and (dq[dead] == 0).all()


@pytest.mark.parametrize("lens_q,lens_k,D,causal", [
    ([5, 1, 17, 3], [5, 1, 17, 3], 32, False),
    ([5, 1, 17, 3], [5, 1, 17, 3], 64, True),
    ([3, 20, 1], [7, 2, 0], 32, False),     # cross-attention lengths, a sequence with no key
    ([9, 2, 33], [4, 6, 18], 128, True),    # causal cross-attention, Lq > Lk and Lq < Lk
])
def test_varlen_fp32(lens_q, lens_k, D, causal):
    _varlen_case(lens_q, lens_k, 2, D, torch.float32, causal)


def test_varlen_fp16():
    _varlen_case([17, 4, 30], [17, 4, 30], 2, 64, torch.float16, causal=False)
    _varlen_case([6, 21], [11, 21], 1, 32, torch.float16, causal=True)


# ---------------------------------------------------------------------------------------------
# dropout: the mask is the reference's bit for bit, so fp32 results match it to rounding


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_matches_reference(causal):
    errs = _padded_case(2, 17, 19, 2, 32, torch.float32, "right", causal, p=0.3, seed=5)
    assert max(errs.values()) < 1e-5, errs
    _varlen_case([7, 17], [7, 17], 2, 32, torch.float32, causal, p=0.25, seed=6)


def test_dropout_changes_output_and_is_reproducible():
    K, _ = _mods()
    g = _gen(3)
    q, k, v = (_rand((1, 17, 2, 32), torch.float32, g) for _ in range(3))
    base = K.attention_fwd(q, k, v, None, None, None, 17, 17, 0.0, 0.2, False, 0)[0]
    a = K.attention_fwd(q, k, v, None, None, None, 17, 17, 0.4, 0.2, False, 77)[0]
    b = K.attention_fwd(q, k, v, None, None, None, 17, 17, 0.4, 0.2, False, 77)[0]
    c = K.attention_fwd(q, k, v, None, None, None, 17, 17, 0.4, 0.2, False, 78)[0]
    assert torch.equal(a, b) and not torch.allclose(a, base) and not torch.allclose(a, c)


# ---------------------------------------------------------------------------------------------
# through the public op: backend selection, probe, autograd


def test_public_op_uses_triton_with_autograd():
    import bertfast
    from bertfast import dispatch
    from bertfast.ops.attention import attention, attention_ref

    g = _gen(11)
    B, S, H, D = 2, 13, 2, 32
    q, k, v = (_rand((B, S, H, D), torch.float32, g).requires_grad_() for _ in range(3))
    mask = torch.ones(B, S, dtype=torch.int64, device=DEV)
    mask[0, 9:] = 0
    mask[1, :4] = 0  # left padding
    with bertfast.use_backend("triton"):
        out = attention(q, k, v, attention_mask=mask)
        assert dispatch.explain("attention", q.device.type)[0] == "triton"
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    kb = torch.zeros(B, S, device=DEV).masked_fill(mask == 0, float("-inf"))
    ref = attention_ref(q, k, v, kb)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-5)

    # varlen with a (q, k) pair of cu_seqlens, causal
    cu = torch.tensor([0, 5, 13], dtype=torch.int32, device=DEV)
    qv, kv, vv = (t.detach()[0].clone().requires_grad_() for t in (q, k, v))  # (13, H, D) packed
    with bertfast.use_backend("triton"):
        o = attention(qv, kv, vv, cu_seqlens=(cu, cu), max_seqlen=(8, 8), causal=True)
        grads = torch.autograd.grad((o * o).sum(), (qv, kv, vv))
    r = attention_ref(qv, kv, vv, None, cu, cu, 8, 8, causal=True)
    ref_grads = torch.autograd.grad((r * r).sum(), (qv, kv, vv))
    torch.testing.assert_close(o, r, atol=2e-5, rtol=1e-5)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-5)


def test_triton_reads_fused_qkv_views_without_copy():
    """q/k/v as views of one fused projection (token stride 3*H*D), as the encoder passes them:
    the kernel reads the strides, and results equal those of contiguous copies."""
    import bertfast
    from bertfast.ops.attention import attention
    from bertfast.padding import unpad_mask

    g = _gen(12)
    B, S, H, D = 2, 11, 2, 32
    qkv = _rand((B, S, 3, H, D), torch.float32, g).requires_grad_()
    mask = torch.ones(B, S, dtype=torch.int64, device=DEV)
    mask[1, 6:] = 0
    layout = unpad_mask(mask)
    packed = qkv.reshape(B * S, 3, H, D).index_select(0, layout.indices)
    K, _ = _mods()
    calls = []  # the backend registry takes the spy at its first load (reset before each test)
    orig = K.attention_fwd

    def spy(q, k, v, *a):
        calls.append(q.is_contiguous())
        return orig(q, k, v, *a)

    for views, kw in (((qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]), dict(attention_mask=mask)),
                      ((packed[:, 0], packed[:, 1], packed[:, 2]), dict(cu_seqlens=layout))):
        with bertfast.use_backend("triton"), pytest.MonkeyPatch.context() as mp:
            mp.setattr(K, "attention_fwd", spy)
            out = attention(*views, **kw)
            reached_as_view = calls[-1] is False
            grads = torch.autograd.grad(out.square().sum(), qkv)
        copies = [t.detach().contiguous().requires_grad_() for t in views]
        with bertfast.use_backend("triton"):
            ref = attention(*copies, **kw)
            ref.square().sum().backward()
        assert reached_as_view, calls  # the view reached the kernel as a view, not a copy
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
        d = grads[0] if "attention_mask" in kw else grads[0].reshape(B * S, 3, H, D)[layout.indices]
        for i, c in enumerate(copies):
            torch.testing.assert_close(d.select(-3, i), c.grad, atol=1e-6, rtol=1e-6)


def test_unsupported_inputs_raise_under_strict():
    """What the Triton kernels do not serve is declared (bertfast/dispatch/table.py), refused by
    dispatch before any kernel runs: a head_dim over MAX_HEAD_DIM is an error when triton is forced
    under BERTFAST_STRICT=1, naming the reason; float64 goes to the reference by design (the
    oracle's precision), with the refusal listed by explain."""
    from bertfast import dispatch, ops
    from bertfast.dispatch import Call

    K, _ = _mods()
    q = torch.zeros(1, 2, 1, 264, dtype=torch.float32, device=DEV)
    assert K.MAX_HEAD_DIM == 256
    with dispatch.use_backend("triton"):
        with pytest.raises(dispatch.BackendError, match="triton: head_dim 264 > 256"):
            ops.attention(q, q, q)
        q64 = torch.zeros(1, 2, 1, 8, dtype=torch.float64, device=DEV)
        torch.testing.assert_close(ops.attention(q64, q64, q64), ops.attention_ref(q64, q64, q64))
        name, why = dispatch.explain("attention", DEV, Call(DEV, torch.float64, 8, "fwd", "padded", 2))
    assert name == "reference" and "triton: dtype fp64" in why, why


# ---------------------------------------------------------------------------------------------
# launch configurations and ahead-of-time compilation


def test_configs_enumerable_and_aot_specs_complete():
    K, _ = _mods()
    specs = K.aot_specs()
    names = {s["kernel"] for s in specs}
    assert names == {"_attn_fwd", "_attn_bwd_pre", "_attn_bwd_dkdv", "_attn_bwd_dq"}
    n_cfgs = sum(len(c) for table in (K.CONFIGS, K.DROPOUT_CONFIGS, K.DESC_CONFIGS) for fam in table.values()
                 for kern in fam.values() for c in kern.values())
    assert len(specs) == n_cfgs
    for s in specs:
        assert set(s["signature"]) == set(s["fn"].arg_names)
        assert all(s["signature"][c] == "constexpr" for c in s["constexprs"])
        assert s["archs"] and s["num_warps"] in (4, 8)
    for family in K.CONFIGS:
        for kernel in ("fwd", "dkdv", "dq", "pre"):
            for d in (32, 64, 128, 200):
                for drop in (False, True):
                    for sq in (1, 100, 512, 4096):
                        cfg = K.pick_config(kernel, d, torch.bfloat16, sq, sq, dropout=drop, family=family,
                                            interpret=False)
                        assert cfg in K.candidates(kernel, d, torch.bfloat16, dropout=drop, family=family)
    full = K.aot_specs(full=True)
    assert len(full) > len(specs)


def test_autotune_path(monkeypatch):
    """BERTFAST_AUTOTUNE=1: every candidate runs once (timed; here a fake timer prefers the last
    one), the winner is cached per key and results stay right."""
    import triton.testing

    K, A = _mods()
    calls = []

    def fake_bench(fn, warmup=0, rep=0):
        fn()
        calls.append(1)
        return 1.0 / len(calls)  # later candidates look faster

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(K, "_autotune_on", lambda: True)
    monkeypatch.setattr(K, "_interpret", lambda: False)  # use the GPU lists, still on the interpreter
    monkeypatch.setattr(K, "_tuned", {})
    g = _gen(4)
    q, k, v = (_rand((1, 20, 1, 32), torch.float16, g) for _ in range(3))
    out, lse = K.attention_fwd(q, k, v, None, None, None, 20, 20, 0.0, 0.3, False, 0)
    ref, _ = A._fwd_reference(q, k, v, None, None, None, 20, 20, 0.0, 0.3, False, 0)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    cands = K.candidates("fwd", 32, torch.float16)
    assert len(calls) == len(cands) > 1 and len(K._tuned) == 1
    assert list(K._tuned.values())[0] == cands[-1]
    K.attention_fwd(q, k, v, None, None, None, 20, 20, 0.0, 0.3, False, 0)
    assert len(calls) == len(cands)  # cached


def test_out_of_shared_memory_shrinks_tiles(monkeypatch):
    """A GPU with less shared memory than the family's default tile needs: the launcher retries
    with the next (smaller) candidate and remembers it."""
    from triton.runtime.errors import OutOfResources

    K, A = _mods()
    real = K._launch_one
    first = K.candidates("fwd", 32, torch.float16)[0]
    tried = []

    def launch(fn, cfg, grid_of, args_of, constexprs):
        tried.append(cfg)
        if cfg == first:
            raise OutOfResources(232448, 101376, "shared memory")
        return real(fn, cfg, grid_of, args_of, constexprs)

    monkeypatch.setattr(K, "_launch_one", launch)
    monkeypatch.setattr(K, "_interpret", lambda: False)
    monkeypatch.setattr(K, "_shrunk", {})
    g = _gen(8)
    q, k, v = (_rand((1, 130, 1, 32), torch.float16, g) for _ in range(3))
    out, _ = K.attention_fwd(q, k, v, None, None, None, 130, 130, 0.0, 0.2, False, 0)
    ref, _ = A._fwd_reference(q, k, v, None, None, None, 130, 130, 0.0, 0.2, False, 0)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    assert tried[0] == first and tried[1] != first and len(K._shrunk) == 1
    K.attention_fwd(q, k, v, None, None, None, 130, 130, 0.0, 0.2, False, 0)
    assert tried[2] == tried[1]  # remembered


_AOT_SCRIPT = """
import json, sys
from bertfast.kernels import attention as K
from bertfast.verify import compile_spec
out = []
for kernel in sys.argv[1].split(","):
    table = K.DESC_CONFIGS if kernel == "fwd_tma" else K.CONFIGS
    kernel = kernel.replace("_tma", "")
    spec = K.aot_spec(kernel, table["sm90"][kernel][64][0], "bf16", 64, dropout=False, family="sm90")
    out.append(compile_spec(spec, 90))
print(json.dumps(out))
"""


def test_aot_compile_sm90_no_spills():
    """The default head_dim-64 bf16 configurations, and the forward's TMA variant, compile for
    sm_90a without a GPU and do not spill (bertfast verify --aot compiles every configuration).
    In a subprocess: the tests run with TRITON_INTERPRET=1, under which @triton.jit functions
    cannot be compiled."""
    import json
    import os
    import subprocess
    import sys

    try:
        import triton.backends.nvidia  # noqa: F401
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no NVIDIA backend in this triton: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, "fwd,dq,fwd_tma"], env=env, capture_output=True, text=True,
                       timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    for usage in json.loads(r.stdout.strip().splitlines()[-1]):
        assert usage.get("STACK", 0) + usage.get("LOCAL", 0) == 0, usage
        assert 0 < usage["REG"] <= 255, usage


def _spy_launches(monkeypatch, K):
    seen = []
    real = K._launch_one

    def launch(fn, cfg, *a):
        seen.append((fn.__name__, cfg))
        return real(fn, cfg, *a)

    monkeypatch.setattr(K, "_launch_one", launch)
    return seen


@pytest.mark.parametrize("layout", ["fused_qkv", "varlen", "bias", "causal"])
def test_tma_descriptor_forward_equals_pointer_loads(monkeypatch, layout):
    """BERTFAST_ATTN_DESC=1: the forward loads Q/K/V through tensor descriptors bounded by each
    sequence (TMA on Hopper); same bits as the masked pointer loads, at a padded head_dim (40)."""
    from bertfast import dispatch, ops

    K, A = _mods()
    g = _gen(11)
    D, H = 40, 2
    kw = {}
    if layout == "varlen":
        qkv = _rand((45, 3, H, D), torch.float16, g)
        kw = {"cu_seqlens": torch.tensor([0, 17, 17, 45], dtype=torch.int32, device=DEV), "max_seqlen": 28}
    else:
        qkv = _rand((2, 33, 3, H, D), torch.float16, g)
        if layout == "bias":
            mask = torch.ones(2, 33, dtype=torch.bool, device=DEV)
            mask[1, 9:] = False
            kw = {"attention_mask": mask}
        elif layout == "causal":
            kw = {"causal": True}
    q, k, v = qkv.unbind(-3)
    assert K.desc_aligned(q, k, v)
    seen = _spy_launches(monkeypatch, K)
    with dispatch.use_backend("triton"):
        monkeypatch.setenv("BERTFAST_ATTN_DESC", "0")
        plain = ops.attention(q, k, v, **kw)
        monkeypatch.setenv("BERTFAST_ATTN_DESC", "1")
        desc = ops.attention(q, k, v, **kw)
    fwd = [cfg for name, cfg in seen if name == "_attn_fwd"]
    assert [c.desc for c in fwd[-2:]] == [False, True]
    assert torch.equal(plain, desc)


def test_tma_needs_aligned_rows():
    K, _ = _mods()
    x = torch.zeros(10, 3, 16, dtype=torch.float16)
    assert K.desc_aligned(x[:, 0], x[:, 1])  # 96-byte token stride, 32-byte head offset
    odd = torch.zeros(10, 3, 12, dtype=torch.float16)  # a 24-byte row offset: not 16-byte aligned
    assert not K.desc_aligned(odd[:, 1])
    assert K.candidates("fwd", 64, torch.float32, desc=True) == []


def test_forced_config_is_launched(monkeypatch):
    """K._forced (benchmarks/attention_variants.py times one configuration at a time)."""
    K, A = _mods()
    seen = _spy_launches(monkeypatch, K)
    cfg = K.Config(32, 16, 4, 1)
    monkeypatch.setattr(K, "_forced", {"fwd": cfg})
    g = _gen(12)
    q, k, v = (_rand((1, 20, 1, 32), torch.float16, g) for _ in range(3))
    out, _ = K.attention_fwd(q, k, v, None, None, None, 20, 20, 0.0, 0.3, False, 0)
    ref, _ = A._fwd_reference(q, k, v, None, None, None, 20, 20, 0.0, 0.3, False, 0)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    assert seen == [("_attn_fwd", cfg)]


def test_attention_variants_plan():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "benchmarks/attention_variants.py", "--dry-run"], cwd=root,
                       capture_output=True, text=True, timeout=120)
    lines = r.stdout.split("\n")
    assert r.returncode == 0 and lines[0] == "bucket padded 64 128" and len([x for x in lines if x]) == 12


# ---------------------------------------------------------------------------------------------
# GPU only


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_tma_forward_equals_pointer_loads(monkeypatch, D):
    from bertfast import dispatch, ops

    K, _ = _mods()
    g = _gen(13)
    qkv = _rand((8, 256, 3, 8, D), torch.bfloat16, g)
    q, k, v = qkv.unbind(-3)
    with dispatch.use_backend("triton"):
        monkeypatch.setenv("BERTFAST_ATTN_DESC", "0")
        plain = ops.attention(q, k, v)
        monkeypatch.setenv("BERTFAST_ATTN_DESC", "1")
        desc = ops.attention(q, k, v)
    if K.device_family(q.device) == "sm90":
        torch.testing.assert_close(desc, plain, atol=0, rtol=0)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 32), (torch.bfloat16, 64), (torch.bfloat16, 128),
                                     (torch.float16, 64)])
def test_gpu_low_precision(dtype, D):
    _padded_case(4, 197, 197, 4, D, dtype, "right", False)
    _padded_case(2, 128, 256, 3, D, dtype, "left", True)
    _varlen_case([128, 1, 77, 300], [128, 1, 77, 300], 4, D, dtype, causal=False)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("S", [128, 512])
def test_gpu_bert_shapes(S):
    _padded_case(16384 // S // 4, S, S, 12, 64, torch.bfloat16, "right", False)
    _padded_case(8, S, S, 16, 64, torch.float16, "none", False, p=0.1)


@requires_cuda
@pytest.mark.gpu
def test_gpu_dropout_statistics():
    K, _ = _mods()
    B, S, H, p = 8, 512, 12, 0.2
    q = torch.zeros(B, S, H, 64, device="cuda", dtype=torch.float16)  # uniform attention
    v = torch.ones(B, S, H, 64, device="cuda", dtype=torch.float16)
    out, _ = K.attention_fwd(q, q, v, None, None, None, S, S, p, 0.125, False, 2024)
    # out = mean over keys of keep / (1 - p): mean 1, std sqrt(p / ((1 - p) S)) per row
    per_row = out[..., 0].float()
    assert abs(per_row.mean().item() - 1.0) < 2e-3
    assert abs(per_row.std().item() - math.sqrt(p / ((1 - p) * S))) < 3e-3


@requires_cuda
@pytest.mark.gpu
def test_gpu_backward_deterministic():
    K, _ = _mods()
    g = _gen(9)
    B, S, H, D = 4, 384, 12, 64
    q, k, v, do = (_rand((B, S, H, D), torch.bfloat16, g) for _ in range(4))
    out, lse = K.attention_fwd(q, k, v, None, None, None, S, S, 0.1, 0.125, False, 5)
    a = K.attention_bwd(do, q, k, v, out, lse, None, None, None, S, S, 0.1, 0.125, False, 5)
    torch.use_deterministic_algorithms(True)
    try:
        b = K.attention_bwd(do, q, k, v, out, lse, None, None, None, S, S, 0.1, 0.125, False, 5)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_no_cuda_means_interpreter():
    if not HAS_CUDA:
        import os

        assert os.environ.get("TRITON_INTERPRET") == "1"
