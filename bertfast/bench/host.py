"""The host suite: Python/dispatcher time per encoder layer and per fused-op call, on any machine.

On a GPU a BERT layer's kernels take microseconds at serving batch sizes, so the host's time
per call decides the speed. This suite makes that time visible without a GPU: BERT-base
depth (12 layers) at widths where weights sit in cache and kernels cost next to nothing (on a CPU
32 and 64, heads of 32; on CUDA BERT-base's 768, heads of 64; FFN 4x), one row of 8 tokens of
which 6 are valid (padding: bertfast's packed layout, transformers' masked SDPA), then:
- `encoder forward`: inference (torch.inference_mode, eval), bertfast against transformers;
- `MLM step`: BertForMaskedLM forward + backward in training mode (dropout on), same;
- `op call`: one fused-op forward from Python (bias_residual_layernorm, 8 rows): the encoder
  layers' lean path against the public checked op; on CUDA also the bare Triton launch from the
  cached compiled kernel (kernels/_launch.py) against the JIT's `kernel[grid](...)`, and the CUDA
  C++ kernel (csrc/cuda) through the lean path and as its bare torch.ops call.
Every case is timed with the host's clock, variants interleaved block by block (so the load of
other processes hits them alike); on CUDA nothing synchronises inside a block, so while the GPU
keeps up the time is the host's. Figures: host microseconds per layer (time / 12: embeddings
and head included) or per call; speedups are transformers' (or the slower path's) time over
bertfast's.
"""
from __future__ import annotations

from typing import List

import torch

from .common import SUBJECT, SuiteOptions, dtype_name
from .runner import Case
from .timing import TimingPlan

NAME = "host"
GRAPHED = False
BASELINE_PACKAGES = ("transformers",)
PLOT_METRIC = ("host_us", "host microseconds (per layer, or per op call)")

LAYERS = 12
BATCH, SEQ, VALID = 1, 8, 6
CUDA_WIDTH = 768
VOCAB = 512  # small, so the MLM decoder stays in cache too


def plan_cases(opts: SuiteOptions) -> List[Case]:
    dtype = opts.dtypes[0] if opts.device.type == "cuda" else torch.float32
    # on CUDA the kernels take microseconds at BERT-base's width too (8 tokens), and that width's
    # kernel variants are the ones the encoder suite compiled already: one width there
    widths = (CUDA_WIDTH,) if opts.device.type == "cuda" else (64,) if opts.quick else (32, 64)
    cases = []
    for w in widths:
        cases.append(_encoder_case(opts.device, dtype, w, train=False, quick=opts.quick))
        cases.append(_encoder_case(opts.device, dtype, w, train=True, quick=opts.quick))
    cases.append(_op_case(opts.device, dtype, widths[-1], opts.quick))
    return cases


def _plan(quick: bool) -> TimingPlan:
    # host time: the host clock on every device (TimingPlan.host), blocks of ~20 ms
    return TimingPlan(repeats=5 if quick else 15, block_s=0.02, max_s=1.0 if quick else 4.0, warmup=3, host=True)


def _config(width: int):
    from ..models import BertConfig

    head_dim = 64 if width >= 256 else 32  # BERT's heads at BERT's widths
    return BertConfig(vocab_size=VOCAB, hidden_size=width, num_hidden_layers=LAYERS,
                      num_attention_heads=max(1, width // head_dim), intermediate_size=4 * width,
                      max_position_embeddings=64)


def _batch(device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.zeros(BATCH, SEQ, dtype=torch.long)
    mask[:, :VALID] = 1
    labels = torch.full((BATCH, SEQ), -100)
    labels[:, 1:VALID:2] = ids[:, 1:VALID:2]
    return {k: v.to(device) for k, v in (("input_ids", ids * mask), ("attention_mask", mask),
                                         ("token_type_ids", torch.zeros_like(ids)), ("labels", labels))}


_TWINS: dict = {}


def _twins(device, dtype, width):
    """(bertfast, transformers) BertForMaskedLM with the same random weights, or a reason."""
    key = (device, dtype, width)
    if key not in _TWINS:
        from .. import models
        from .encoder import hf_config

        cfg = _config(width)
        try:
            import transformers

            torch.manual_seed(0)
            hf = transformers.BertForMaskedLM(hf_config(cfg)).to(device=device, dtype=dtype)
            bf = models.from_hf(hf)
        except Exception as e:  # noqa: BLE001 - no transformers: bertfast alone
            torch.manual_seed(0)
            hf, bf = f"transformers unavailable ({type(e).__name__}: {e})"[:200], \
                models.BertForMaskedLM(cfg).to(device=device, dtype=dtype)
        _TWINS.clear()
        _TWINS[key] = (bf, hf)
    return _TWINS[key]


def _encoder_case(device, dtype, width, train: bool, quick: bool) -> Case:
    def variant(which):
        def factory(meta):
            bf, hf = _twins(device, dtype, width)
            model = bf if which == SUBJECT else hf
            if isinstance(model, str):
                raise RuntimeError(model)
            b = _batch(device)
            if train:
                model.train()

                def fn():
                    model(**b).loss.backward()
                return fn
            model.eval()
            enc = model.bert
            inputs = {k: v for k, v in b.items() if k != "labels"}

            def fn():
                with torch.inference_mode():
                    enc(**inputs)
            return fn
        return factory

    kind = "MLM step (fwd+bwd)" if train else "encoder forward"
    case = Case(NAME, f"{kind} w{width} L{LAYERS} {BATCH}x{SEQ} ({VALID} valid) {dtype_name(dtype)}",
                {"kind": "train" if train else "forward", "width": width, "layers": LAYERS, "batch": BATCH,
                 "seq": SEQ, "valid": VALID},
                {SUBJECT: variant(SUBJECT), "transformers": variant("transformers")}, dtype=dtype_name(dtype),
                plan=_plan(quick))
    case.extra["_per"] = LAYERS
    return case


def _op_case(device, dtype, width, quick: bool) -> Case:
    from .. import dispatch
    from ..ops.bias_residual_layernorm import bias_residual_layernorm, bias_residual_layernorm_unchecked

    def tensors():
        g = torch.Generator().manual_seed(0)
        x, r = (torch.randn(8, width, generator=g).to(device, dtype) for _ in range(2))
        b, w, lb = (torch.randn(width, generator=g).to(device, dtype) for _ in range(3))
        return x, b, r, w, lb

    def lean(meta):
        x, b, r, w, lb = tensors()
        sel = dispatch.select("bias_residual_layernorm", dispatch.Call(device.type, dtype, width))
        meta["backend"] = sel.backend

        def fn():
            bias_residual_layernorm_unchecked(sel, False, x, b, r, w, lb, 1e-12, 0.0)
        return fn

    def public(meta):
        x, b, r, w, lb = tensors()

        def fn():
            with torch.no_grad():
                bias_residual_layernorm(x, b, r, w, lb, 1e-12)
        return fn

    def raw_launch(fast: bool):
        def factory(meta):
            import triton

            from ..kernels import _layernorm
            from ..kernels import bias_residual_layernorm as k
            x, b, r, w, lb = tensors()
            m, n = x.shape
            y, mean, rstd = torch.empty_like(x), torch.empty(m, device=device), torch.empty(m, device=device)
            bn, rows, warps = _layernorm.fwd_config(n)
            grid = (triton.cdiv(m, rows),)
            args = (x, b, r, w, lb, y, mean, rstd, m, n, 1e-12, 0, 0, 1.0)
            meta_kw = dict(HAS_BIAS=True, HAS_DROPOUT=False, BLOCK_N=bn, ROWS=rows, num_warps=warps)
            if fast:
                launcher = k._brln_fwd

                def fn():
                    launcher(grid, (n, False, x.dtype, r.dtype, w.dtype, lb.dtype, b.dtype), args, **meta_kw)
            else:
                kernel = k._brln_fwd_kernel

                def fn():
                    kernel[grid](*args, **meta_kw)
            return fn
        return factory

    def cuda_cpp(lean_path: bool):
        # the CUDA C++ extension (csrc/cuda): through the layers' lean path with the backend forced,
        # or its torch.ops callable alone (the whole Python cost of a launch from C++)
        def factory(meta):
            from ..dispatch import cuda as cuda_ext

            x, b, r, w, lb = tensors()
            with dispatch.use_backend("cuda"):
                sel = dispatch.select("bias_residual_layernorm", dispatch.Call(device.type, dtype, width))
            if sel.backend != "cuda":
                raise RuntimeError(f"the CUDA C++ kernels cannot serve here: {cuda_ext.status().get('reason')}")
            if lean_path:
                def fn():
                    bias_residual_layernorm_unchecked(sel, False, x, b, r, w, lb, 1e-12, 0.0)
            else:
                op = cuda_ext._OPS["bias_residual_layernorm_fwd"]

                def fn():
                    op(x, b, r, w, lb, 1e-12, 0.0, 0)
            return fn
        return factory

    variants = {SUBJECT: lean, "public_op": public}
    if device.type == "cuda":
        variants["triton_cached_launch"] = raw_launch(True)
        variants["triton_jit_launch"] = raw_launch(False)
        variants["cuda_cpp_lean"] = cuda_cpp(True)
        variants["cuda_cpp_op"] = cuda_cpp(False)
    case = Case(NAME, f"op call bias_residual_layernorm fwd 8x{width} {dtype_name(dtype)}",
                {"kind": "op", "op": "bias_residual_layernorm", "rows": 8, "width": width}, variants,
                dtype=dtype_name(dtype), plan=_plan(quick))
    case.extra["_per"] = 1
    return case


def finish(case: Case, res: dict, ceilings):
    """Host microseconds per layer (encoder cases) or per call (op case) for every variant."""
    per = case.extra.get("_per", 1)
    res["host_unit"] = "us per layer" if per > 1 else "us per call"
    for v in res["variants"].values():
        if v.get("status") == "ok":
            v["host_us"] = v["median_ms"] * 1e3 / per


def cleanup():
    _TWINS.clear()
