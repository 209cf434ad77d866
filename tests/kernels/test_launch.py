"""Cached compiled launches (kernels/_launch.py): which calls reuse a compiled kernel, which go
through the JIT, and what the compiled launcher receives.

On CPU the logic is tested against a stand-in for a JITFunction (the interpreter has no compiled
kernels); on a GPU the real kernels' fast path is compared with their JIT path.
"""
import pytest
import torch
from conftest import TRITON_DEVICE, requires_cuda, requires_triton

from bertfast.kernels import _launch


class _Param:
    def __init__(self, name, constexpr=False, default=None, nospec=False):
        self.name, self.is_constexpr, self.default, self.do_not_specialize = name, constexpr, default, nospec


class _Compiled:
    """What the JIT returns: a launcher (`run`), the loaded function and packed metadata."""

    def __init__(self, log, fail=False):
        self.function, self.packed_metadata = "fn-handle", "packed"
        self.log, self.fail = log, fail

    def run(self, *a):
        if self.fail:
            raise TypeError("launcher takes other arguments")
        self.log.append(("fast", a))


class _FakeJIT:
    """A kernel (X, Y, M, N, seed, scale, FLAG: constexpr, BLOCK: constexpr = 64) with seed not
    specialised, like the real ones: records every JIT launch and compile."""

    def __init__(self, fail=False):
        self.params = [_Param("X"), _Param("Y"), _Param("M"), _Param("N"), _Param("seed", nospec=True),
                       _Param("scale"), _Param("FLAG", True), _Param("BLOCK", True, default=64)]
        self.device_caches = {}
        self.arg_names = [p.name for p in self.params]
        self.log, self.fail = [], fail
        self.__name__ = "fake"

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.log.append(("jit", grid, args, meta))
            return _Compiled(self.log, self.fail)
        return launch


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(_launch, "ENABLED", True)
    monkeypatch.setattr(_launch, "_device_stream", lambda: (0, 777))
    monkeypatch.setattr(_launch, "_hooks_set", lambda: False)
    return _FakeJIT()


def _args(m=64, n=32, seed=5, x=None):
    x = torch.zeros(64) if x is None else x
    return (x, torch.zeros(64), m, n, seed, 0.5)


def test_second_call_reuses_the_compiled_kernel_with_constexprs_appended(fake):
    k = _launch.FastKernel(fake)
    k((4,), "key", _args(), FLAG=True, num_warps=4)
    second = _args(seed=9)
    k((4, 2), "key", second, FLAG=True, num_warps=4)
    assert [e[0] for e in fake.log] == ["jit", "fast"]
    _, a = fake.log[1]
    # grid padded to 3-D, the stream, handle, metadata, no launch metadata or hooks, then every
    # argument in signature order: the non-constexpr ones, FLAG from meta, BLOCK's default
    assert a[:9] == (4, 2, 1, 777, "fn-handle", "packed", None, None, None)
    assert a[9] is second[0] and a[10] is second[1]
    assert a[11:] == (64, 32, 9, 0.5, True, 64)
    assert k.jit_launches == 1


def test_integer_classes_the_jit_specialises_on_get_their_own_entries(fake):
    k = _launch.FastKernel(fake)
    for m in (64, 48, 17, 1, 18, 2**31, 2**31 + 16):
        k((1,), "key", _args(m=m), FLAG=False)
    # 64 and 48 (multiples of 16) share a variant, 17 and 18 another, 1 has its own, and the
    # values beyond int32 (both multiples of 16) one more
    assert [e[0] for e in fake.log] == ["jit", "fast", "jit", "jit", "fast", "jit", "fast"]


def test_unspecialised_integers_only_split_on_their_width(fake):
    k = _launch.FastKernel(fake)
    for seed in (16, 1, 17, 2**40, 2**40 + 3):
        k((1,), "key", _args(seed=seed), FLAG=False)
    assert [e[0] for e in fake.log] == ["jit", "fast", "fast", "jit", "fast"]


def test_caller_key_and_unaligned_pointers(fake):
    k = _launch.FastKernel(fake)
    k((1,), "a", _args(), FLAG=False)
    k((1,), "b", _args(), FLAG=True)  # another key: compiled separately
    k((1,), "b", _args(), FLAG=True)
    base = torch.zeros(65)
    k((1,), "b", _args(x=base[1:]), FLAG=True)  # 4-byte offset: the JIT path, every time
    k((1,), "b", _args(x=base[1:]), FLAG=True)
    assert [e[0] for e in fake.log] == ["jit", "jit", "fast", "jit", "jit"]


def test_a_launcher_that_fails_sends_every_later_call_to_the_jit(monkeypatch):
    monkeypatch.setattr(_launch, "ENABLED", True)
    monkeypatch.setattr(_launch, "_device_stream", lambda: (0, 1))
    monkeypatch.setattr(_launch, "_hooks_set", lambda: False)
    fake = _FakeJIT(fail=True)
    k = _launch.FastKernel(fake)
    for _ in range(3):
        k((1,), "key", _args(), FLAG=False)
    assert [e[0] for e in fake.log] == ["jit", "jit", "jit"]  # the failed fast launch was redone by the JIT


def test_interpreter_disabled_hooks_and_leading_constexprs_use_the_jit(fake, monkeypatch):
    interpreted = _FakeJIT()
    del interpreted.device_caches  # an InterpretedFunction has no per-device compiled kernels
    odd = _FakeJIT()
    odd.params.insert(0, _Param("EARLY", True))  # a constexpr before runtime arguments
    for fn in (interpreted, odd):
        k = _launch.FastKernel(fn)
        k((1,), "key", _args(), FLAG=False)
        k((1,), "key", _args(), FLAG=False)
        assert [e[0] for e in fn.log] == ["jit", "jit"]
    monkeypatch.setattr(_launch, "ENABLED", False)
    k = _launch.FastKernel(_FakeJIT())
    k((1,), "key", _args(), FLAG=False)
    k((1,), "key", _args(), FLAG=False)
    assert k.jit_launches == 2
    monkeypatch.setattr(_launch, "ENABLED", True)
    monkeypatch.setattr(_launch, "_hooks_set", lambda: True)  # a profiler's launch hook
    k = _launch.FastKernel(fake)
    k((1,), "key", _args(), FLAG=False)
    k((1,), "key", _args(), FLAG=False)
    assert k.jit_launches == 2


@requires_triton
def test_real_kernels_launch_through_the_jit_under_the_interpreter():
    if TRITON_DEVICE != "cpu":
        pytest.skip("interpreter only")
    from bertfast.kernels import bias_residual_layernorm as k

    x, r = torch.randn(2, 5, 64).unbind(0)
    w, b = torch.randn(2, 64).unbind(0)
    before = k._brln_fwd.jit_launches
    for _ in range(2):
        k.bias_residual_layernorm_fwd(x, None, r, w, b, 1e-12, 0.0, 0)
    assert k._brln_fwd.jit_launches == before + 2
    assert not k._brln_fwd._cache


@requires_cuda
@requires_triton
def test_gpu_fast_launch_matches_the_jit_and_skips_it(monkeypatch):
    """On a GPU: the cached compiled launches give the JIT's results bit for bit, for the
    LayerNorm, GELU and attention kernels, forward and backward, and after the first call of a
    variant no launch goes through the JIT."""
    from bertfast import dispatch, ops
    from bertfast.kernels import _launch as launch_mod
    from bertfast.kernels import attention as ka
    from bertfast.kernels import bias_gelu as kg
    from bertfast.kernels import bias_residual_layernorm as kb

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(37, 768, device="cuda", dtype=torch.bfloat16, generator=g)
    r, b, w, lb = (torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=g) for s in ((37, 768), 768, 768,
                                                                                           768))
    q, kk, v = (torch.randn(2, 45, 12, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (x, b, r, w, lb, q, kk, v)]
        xs, bs, rs, ws, lbs, qs, ks, vs = leaves
        with dispatch.use_backend("triton"):
            torch.manual_seed(1)
            y = ops.bias_residual_layernorm(ops.bias_gelu(xs, bs), bs, rs, ws, lbs, dropout_p=0.1)
            o = ops.attention(qs, ks, vs, dropout_p=0.1)
            (y.float().square().sum() + o.float().square().sum()).backward()
        torch.cuda.synchronize()
        return [y, o] + [t.grad for t in leaves]

    monkeypatch.setattr(launch_mod, "ENABLED", False)
    kernels = [kb._brln_fwd, kb._brln_bwd, kg._fwd, kg._bwd]
    for k in kernels:  # rebuilt under ENABLED=False: the JIT path only
        monkeypatch.setattr(k, "_fast", False)
    ref = run()
    for k in kernels:
        monkeypatch.setattr(k, "_fast", True)
    monkeypatch.setattr(launch_mod, "ENABLED", True)
    ka._fast.clear()
    run()  # the first call of each variant compiles/loads through the JIT
    jit_before = [k.jit_launches for k in kernels + list(ka._fast.values())]
    got = run()
    assert [k.jit_launches for k in kernels + list(ka._fast.values())] == jit_before
    for a, e in zip(got, ref):
        assert torch.equal(a, e)


def test_persistent_grid_size_is_cached_per_kernel_variant(monkeypatch):
    """num_programs with a key: the register-count probe (and the placeholder arguments it needs)
    runs once per (kernel, variant, device); later launches only clamp to their tile count."""
    from bertfast.kernels import _launch_params as lp

    probes, built = [], []
    monkeypatch.setattr(lp, "_sm_count", lambda index: 10)
    monkeypatch.setattr(lp, "_programs_per_sm", lambda k, a, c, w, d: probes.append(a) or 3)
    monkeypatch.setattr(lp, "_capacity", {})
    dev = torch.device("cuda", 0)

    def make_args():
        built.append(1)
        return ("placeholder",)

    kernel = object()
    assert lp.num_programs(dev, 100, 4, kernel, make_args, {}, key=("bf16", 768)) == 30
    assert lp.num_programs(dev, 7, 4, kernel, make_args, {}, key=("bf16", 768)) == 7
    assert built == [1] and probes == [("placeholder",)]
    assert lp.num_programs(dev, 100, 4, kernel, make_args, {}, key=("fp32", 768)) == 30
    assert lp.num_programs(dev, 100, 4, object(), make_args, {}, key=("bf16", 768)) == 30  # another kernel
    assert len(built) == 3


@requires_triton
def test_launch_hooks_send_launches_to_the_jit():
    """triton's knobs hold HookChains that are never None: the fast path steps aside only when a
    chain holds calls (a profiler), so an idle chain does not disable it."""
    from triton import knobs

    assert not _launch._hooks_set()

    def hook(metadata):
        pass

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert _launch._hooks_set()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert not _launch._hooks_set()
