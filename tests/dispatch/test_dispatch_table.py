"""The dispatch table (bertfast/dispatch/table.py): what each implementation declares, how select
explains a refusal, and that the declarations agree with the kernels they describe."""
import os
import re

import pytest
import torch

import bertfast
from bertfast import dispatch, ops
from bertfast.dispatch import Call, core, table
from conftest import requires_triton

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_op_has_its_rows_and_a_reference():
    for op in ops.OPS:
        rows = core.spec(op).rows
        assert list(rows)[-1] == "reference", (op, list(rows))
        assert {"cpp", "triton"} <= set(rows), (op, list(rows))
        for impl in rows.values():
            assert impl.backend in core.BACKENDS + (None,), (op, impl.name, impl.backend)
            assert impl.name == "reference" or impl.load is not None, (op, impl.name)
    assert {"aten_flash", "sdpa", "varlen_attn"} <= set(core.spec("attention").rows)


@requires_triton
def test_declared_limits_are_the_kernels_limits():
    """The table writes the kernels' limits out (declaring them imports no triton): they must agree."""
    from bertfast.kernels import _layernorm
    from bertfast.kernels import attention as ka

    assert table.TRITON_MAX_HEAD_DIM == ka.MAX_HEAD_DIM
    assert table.TRITON_MAX_HIDDEN == _layernorm.MAX_N
    with open(os.path.join(ROOT, "csrc", "cuda", "common.cuh")) as fh:
        assert int(re.search(r"kMaxHidden\s*=\s*(\d+)", fh.read()).group(1)) == table.CUDA_MAX_HIDDEN


@pytest.mark.parametrize("call, reason", [
    (Call("cpu", torch.float32, 64, "fwd", "padded", 8), "dtype fp32 (serves bf16)"),
    (Call("cpu", torch.bfloat16, 64, "fwd", "padded", 8, "key"), "key mask"),
    (Call("cpu", torch.bfloat16, 64, "fwd", "varlen", 8), "varlen layout"),
    (Call("cpu", torch.bfloat16, 64, "fwd", "padded", 8, dropout=True), "dropout"),
    (Call("cpu", torch.bfloat16, 64, "fwd", "padded", 8, causal="cross"), "causal=cross"),
    (Call("cuda", torch.bfloat16, 64, "fwd", "padded", 8), "does not serve cuda tensors"),
])
def test_aten_flash_declares_what_it_refuses(call, reason):
    aten = core.spec("attention").rows["aten_flash"]
    cap, sem = core.not_supported_reasons(aten, call, "fwd")
    assert any(reason in r for r in cap + sem), (cap, sem)
    ok = Call("cpu", torch.bfloat16, 64, "fwd", "padded", 8, causal="self")
    assert core.not_supported_reasons(aten, ok, "fwd") == ([], [])
    assert core.not_supported_reasons(aten, ok._replace(dtype=torch.float32), "bwd") == ([], [])


def test_strict_error_lists_every_refused_implementation(monkeypatch):
    """A forced backend that cannot serve: the error names each of its rows with its reason."""
    monkeypatch.setenv("BERTFAST_STRICT", "1")
    call = Call("cuda", torch.bfloat16, 64, "fwd+bwd", "padded", 128)
    with bertfast.use_backend("cpp"):
        with pytest.raises(dispatch.BackendError) as e:
            dispatch.select("attention", call)
    msg = str(e.value)
    assert "aten_flash: does not serve cuda tensors" in msg and "cpp: does not serve cuda tensors" in msg, msg
    assert "BERTFAST_STRICT=1" in msg


def test_without_strict_the_reference_serves_with_one_warning(monkeypatch):
    monkeypatch.delenv("BERTFAST_STRICT", raising=False)
    call = Call("cuda", torch.float16, 768, "fwd")
    with bertfast.use_backend("cpp"):
        with pytest.warns(RuntimeWarning, match="bias_gelu cannot use backend 'cpp'.*cpp: does not serve cuda"):
            assert dispatch.select("bias_gelu", call).backend == "reference"


def test_float64_goes_to_the_reference_by_design(monkeypatch):
    """float64 is the oracle's precision: the reference serves it, silently, even when forced in
    strict mode (gradcheck under a kernel backend)."""
    monkeypatch.setenv("BERTFAST_STRICT", "1")
    with bertfast.use_backend("cpp"):
        assert dispatch.select("bias_gelu", Call("cpu", torch.float64, 8)).backend == "reference"


def test_explain_names_every_row_with_its_reason():
    call = Call("cpu", torch.float32, 64, "fwd", "padded", 128, "key")
    name, why = dispatch.explain("attention", "cpu", call)
    for row in core.spec("attention").rows:
        assert row == name or f"{row}:" in why, (row, why)
    assert "sdpa: key mask" in why and "varlen_attn: padded layout" in why, why


def test_training_pairs_the_passes_by_contract():
    """A fwd+bwd call takes its backward from an implementation with the forward's saved-tensor
    contract; a kernel with its own autograd serves both passes or none."""
    bf16 = Call("cpu", torch.bfloat16, 32, "fwd+bwd", "padded", 9)
    assert dispatch.select("attention", bf16).backend == "aten_flash+cpp"
    assert dispatch.select("attention", bf16._replace(dtype=torch.float32)).backend == "cpp+aten_flash"
    assert dispatch.select("attention", bf16._replace(direction="fwd")).backend == "aten_flash"
    sdpa = core.spec("attention").rows["sdpa"]
    assert "has its own autograd" in " ".join(core.not_supported_reasons(sdpa, bf16, "bwd")[1])
    assert "has its own autograd" in " ".join(core.not_supported_reasons(sdpa, bf16._replace(traced=True), "fwd")[1])


def test_a_selection_is_memoised_per_call():
    call = Call("cpu", torch.float32, 8)
    assert dispatch.select("bias_gelu", call) is dispatch.select("bias_gelu", call)
    assert dispatch.select("bias_gelu", call) is not dispatch.select("bias_gelu", call._replace(width=9))
