"""Launch parameters of the Triton LayerNorm/GELU-family kernels (kernels/_layernorm.py,
kernels/bias_gelu.py, kernels/_launch_params.py): every configuration a launcher can pick is
valid and listed for ahead-of-time compilation, and `bertfast verify` checks the Triton kernels
against the references. The kernels' numerics are tested per op in tests/ops/test_<op>.py.
"""
import importlib

import pytest
from conftest import requires_triton

pytestmark = requires_triton


def _kmod(op):
    return importlib.import_module(f"bertfast.kernels.{op}")


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
