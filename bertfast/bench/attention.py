"""The attention suite: padded and variable-length attention against the reference, its
compiled form, every SDPA backend that runs and, for varlen, PyTorch's bundled FlashAttention-2
varlen kernel (torch.nn.attention.varlen.varlen_attn, torch 2.10+).

`bertfast` is what a user gets (the auto backend: where the committed routing table says one of
PyTorch's kernels is faster for the case, that kernel, see bertfast/dispatch/table.py);
on CUDA `bertfast_triton` times bertfast's own kernel forced, so a run measures both and
`python -m bertfast.bench.routes` turns its CUDA-graph figures into the next routing table."""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional

import torch

from .common import SUBJECT, SuiteOptions, compiled, dtype_name, served_by
from .runner import Case
from .timing import Rotate, graphed, n_input_sets

NAME = "attention"
GRAPHED = True
PLOT_METRIC = ("tflops", "TFLOP/s (useful FLOPs)")


def plan_cases(opts: SuiteOptions) -> List[Case]:
    """Padded and varlen attention at each sequence length, a fixed token count per batch.
    CUDA: head_dim 64 and 128 (12x64, 8x128), varlen at fill 0.6 and 0.4. CPU: 12x64 and 16x64
    heads (12x64 only with --quick), fill 0.6; forward only with --quick."""
    device, quick = opts.device, opts.quick
    cuda = device.type == "cuda"
    dtypes = [d for d in opts.dtypes if not (device.type == "cpu" and d == torch.float16)]
    if cuda:
        heads = [(12, 64), (8, 128)] if not quick else [(12, 64)]
    else:
        heads = [(12, 64), (16, 64)] if not quick else [(12, 64)]
    fills = (0.6, 0.4) if cuda else (0.6,)
    tpb = 16384 if cuda else (1024 if quick else 4096)
    return attention_cases(device, dtypes[:1] if quick else dtypes, opts.sizes, heads, tpb, opts.compile_mode,
                           backward_modes=(False,) if quick and not cuda else (False, True), fills=fills)


SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None), "math": SDPBackend.MATH}[name]


def _sdpa_call(backend_name: Optional[str], mask_kind: Optional[str]):
    """SDPA on (B, S, H, D) tensors through (B, H, S, D) views (no copies: HF's layout)."""
    import torch.nn.functional as F

    be = _sdpa_backend(backend_name) if backend_name else None
    if backend_name and be is None:
        raise RuntimeError(f"SDPBackend has no {backend_name} backend in torch {torch.__version__}")

    def fn(q, k, v, mask):
        ctx = contextlib.nullcontext()
        if be is not None:
            from torch.nn.attention import sdpa_kernel

            ctx = sdpa_kernel([be])
        with ctx:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask)
        return out.transpose(1, 2)

    return fn


def _attn_flops(lens, heads, head_dim, backward: bool) -> float:
    """Useful FLOPs: 4 * L^2 * H * D per sequence forward (QK^T and PV); backward 2.5x forward
    (FlashAttention's accounting)."""
    f = sum(4.0 * L * L * heads * head_dim for L in lens)
    return f * (3.5 if backward else 1.0)


def attention_cases(device, dtypes, seqs, head_cfgs, tokens_per_batch, compile_mode, backward_modes=(False, True),
                    varlen=True, fills=(0.6,)) -> List[Case]:
    cases = []
    for dt in dtypes:
        for heads, hd in head_cfgs:
            for S in seqs:
                B = max(1, tokens_per_batch // S)
                for bwd in backward_modes:
                    cases.append(_attn_case(device, dt, B, S, heads, hd, bwd, compile_mode, None))
                    for fill in fills if varlen else ():
                        cases.append(_attn_case(device, dt, B, S, heads, hd, bwd, compile_mode, "varlen", fill))
    return cases


def varlen_lengths(B: int, S: int, seed: int = 0, fill: float = 0.6) -> List[int]:
    """A realistic length mix of mean fill `fill` (real tokens / padded tokens): lengths uniform
    in [(2 fill - 1) S, S] for fill >= 0.5 (0.6: [0.2 S, S], the skewed-to-short shape of real
    sentence batches without their extremes), in [1, 2 fill S] below; one row of length S (the
    batch is padded to its longest)."""
    if not 0.0 < fill <= 1.0:
        raise ValueError(f"fill must be in (0, 1], got {fill}")
    g = torch.Generator().manual_seed(seed)
    lo, hi = (max(1, int((2 * fill - 1) * S)), S) if fill >= 0.5 else (1, max(1, int(2 * fill * S)))
    lens = torch.randint(lo, hi + 1, (B,), generator=g)
    lens[0] = S
    return [int(x) for x in lens]


def _attn_case(device, dt, B, S, H, D, bwd, compile_mode, layout, fill_target=0.6) -> Case:
    from .. import dispatch
    from .. import padding as _padding
    from ..ops import attention, attention_ref

    lens = varlen_lengths(B, S, fill=fill_target) if layout == "varlen" else [S] * B
    fill = sum(lens) / (B * S)
    set_bytes = 4 * B * S * H * D * torch.empty((), dtype=dt).element_size()

    def inputs(gen):
        q, k, v = (torch.randn(B, S, H, D, generator=gen, device=device).to(dt).requires_grad_(bwd)
                   for _ in range(3))
        dout = torch.randn(B, S, H, D, generator=gen, device=device).to(dt) if bwd else None
        return q, k, v, dout

    mask_bool = torch.arange(S).view(1, S) < torch.tensor(lens).view(B, 1)  # (B, S), True = real token

    def padded(fn_kind):
        def factory(meta):
            gen = torch.Generator(device=device).manual_seed(0)
            sets = []
            mask = None
            if layout == "varlen":
                mask = mask_bool.to(device)
            for _ in range(n_input_sets(set_bytes, device)):
                q, k, v, dout = inputs(gen)
                sets.append((q, k, v, dout))
            if fn_kind in ("bertfast", "bertfast_triton"):
                meta["backend"] = served_by("attention", device) if fn_kind == "bertfast" else "triton (forced)"
                forced = fn_kind == "bertfast_triton"

                def f(q, k, v):
                    if forced:
                        with dispatch.use_backend("triton"):
                            return attention(q, k, v, attention_mask=mask)
                    return attention(q, k, v, attention_mask=mask)
            elif fn_kind in ("eager_ref", "compile_ref"):
                kb = None if mask is None else torch.zeros(B, S, device=device).masked_fill(~mask, float("-inf"))

                def f(q, k, v):
                    return attention_ref(q, k, v, kb)
                if fn_kind == "compile_ref":
                    f = compiled(f)
            else:  # sdpa_<backend> or sdpa (default dispatch)
                be = fn_kind.split("_", 1)[1] if "_" in fn_kind else None
                smask = None if mask is None else mask.view(B, 1, 1, S)
                sd = _sdpa_call(be, "bool" if mask is not None else None)

                def f(q, k, v):
                    return sd(q, k, v, smask)
                q, k, v, _ = sets[0]
                with torch.no_grad():
                    f(q.detach(), k.detach(), v.detach())  # raises here when the backend refuses the inputs

            def call(q, k, v, dout):
                out = f(q, k, v)
                if dout is not None:
                    return torch.autograd.grad(out, (q, k, v), dout)
                return out

            meta["input_sets"] = len(sets)
            return Rotate(call, sets)

        return factory

    def packed_factory(kind):
        return lambda meta: packed(meta, kind)

    def packed(meta, kind="bertfast"):
        gen = torch.Generator(device=device).manual_seed(0)
        total = sum(lens)
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lens), 0)
        cu = cu.to(device)
        sets = []
        for _ in range(n_input_sets(int(set_bytes * fill), device)):
            q, k, v = (torch.randn(total, H, D, generator=gen, device=device).to(dt).requires_grad_(bwd)
                       for _ in range(3))
            dout = torch.randn(total, H, D, generator=gen, device=device).to(dt) if bwd else None
            sets.append((q, k, v, dout))
        meta["backend"] = {"bertfast": served_by("attention", device), "bertfast_triton": "triton (forced)",
                           "varlen_attn": "torch.nn.attention.varlen.varlen_attn"}[kind]
        meta["input_sets"] = len(sets)
        # the encoder's way: the layout of unpad_mask (computed once per batch), whose offsets the
        # op does not read back to check; that also makes the call capturable in a CUDA graph
        layout = _padding.PackedLayout(torch.arange(total, device=device), cu, S, B, S)

        if kind == "varlen_attn":
            from ..dispatch import torch_attention

            scale = D ** -0.5

            def f(q, k, v):
                return torch_attention.varlen(q, k, v, cu, cu, S, S, scale, False)
        elif kind == "bertfast_triton":
            def f(q, k, v):
                with dispatch.use_backend("triton"):
                    return attention(q, k, v, cu_seqlens=layout)
        else:
            def f(q, k, v):
                return attention(q, k, v, cu_seqlens=layout)

        def call(q, k, v, dout):
            out = f(q, k, v)
            if dout is not None:
                return torch.autograd.grad(out, (q, k, v), dout)
            return out

        q, k, v, _ = sets[0]
        with torch.no_grad():
            f(q.detach(), k.detach(), v.detach())  # raises here when the kernel refuses the inputs
        return Rotate(call, sets)

    variants: Dict[str, object] = {SUBJECT: packed_factory("bertfast") if layout == "varlen" else padded("bertfast")}
    if device.type == "cuda":  # bertfast's own kernel, whatever the routing table says
        variants["bertfast_triton"] = packed_factory("bertfast_triton") if layout == "varlen" \
            else padded("bertfast_triton")
    if layout == "varlen":
        variants["bertfast_padded"] = padded("bertfast")
        variants["varlen_attn"] = (packed_factory("varlen_attn") if device.type == "cuda"
                                   else "varlen_attn runs on CUDA only")
    variants["eager_ref"] = padded("eager_ref")
    is_target = S == 512 and dt in (torch.bfloat16, torch.float32) and layout is None
    if compile_mode == "all" or (compile_mode == "some" and is_target):
        variants["compile_ref"] = padded("compile_ref")
    else:
        variants["compile_ref"] = f"not run: --compile {compile_mode}"
    variants["sdpa"] = padded("sdpa")  # PyTorch's own choice of backend
    for be in SDPA_BACKENDS:
        if device.type == "cpu" and be in ("efficient", "cudnn"):
            variants[f"sdpa_{be}"] = "CUDA-only SDPA backend"
        else:
            variants[f"sdpa_{be}"] = padded(f"sdpa_{be}")
    if device.type == "cuda":  # kernels without host overhead between them (see graphed)
        for vname in (SUBJECT, "bertfast_triton", "sdpa", "varlen_attn"):
            if callable(variants.get(vname)):
                variants[vname + "_graph"] = graphed(variants[vname])
    kind = "varlen" if layout == "varlen" else "padded"
    name = f"{kind} {'fwd+bwd' if bwd else 'fwd'} b{B}xs{S} h{H}x{D} {dtype_name(dt)}"
    if layout == "varlen" and fill_target != 0.6:
        name += f" fill{fill_target:g}"
    return Case(NAME, name, {"layout": kind, "pass": "fwd+bwd" if bwd else "fwd", "batch": B, "seq": S,
                                    "heads": H, "head_dim": D, "fill": round(fill, 3)},
                variants, flops=_attn_flops(lens, H, D, bwd), dtype=dtype_name(dt), tokens=sum(lens),
                graphed=True)


