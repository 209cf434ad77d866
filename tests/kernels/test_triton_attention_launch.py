"""Launch configurations of the Triton attention kernels (kernels/attention.py): the configuration
tables and their ahead-of-time specs, autotuning, shrinking tiles when shared memory runs out, a
forced configuration, the TMA-descriptor forward, and an sm_90a compile without a GPU. The kernels'
numerics, against the reference, are in tests/ops/test_attention.py.
"""
import importlib

import pytest
import torch
from conftest import HAS_CUDA, TRITON_DEVICE, requires_cuda, requires_triton

pytestmark = requires_triton
DEV = TRITON_DEVICE


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


def _fp16_forward_is_right(K, A, S, seed, scale):
    """One fp16 forward of a (1, S, 1, 32) self-attention through the kernel launcher, against the
    reference; returns a rerun of the same call (for the tests that count launches)."""
    q, k, v = (_rand((1, S, 1, 32), torch.float16, _gen(seed)) for _ in range(3))
    args = (None, None, None, S, S, 0.0, scale, False, 0)
    out, _ = K.attention_fwd(q, k, v, *args)
    ref, _ = A._fwd_reference(q, k, v, *args)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    return lambda: K.attention_fwd(q, k, v, *args)


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
    rerun = _fp16_forward_is_right(K, A, 20, 4, 0.3)
    cands = K.candidates("fwd", 32, torch.float16)
    assert len(calls) == len(cands) > 1 and len(K._tuned) == 1
    assert list(K._tuned.values())[0] == cands[-1]
    rerun()
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
    rerun = _fp16_forward_is_right(K, A, 130, 8, 0.2)
    assert tried[0] == first and tried[1] != first and len(K._shrunk) == 1
    rerun()
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
    _fp16_forward_is_right(K, A, 20, 12, 0.3)
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


def test_no_cuda_means_interpreter():
    if not HAS_CUDA:
        import os

        assert os.environ.get("TRITON_INTERPRET") == "1"
