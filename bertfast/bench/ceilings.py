"""Ceilings measured in the same run: device copy bandwidth and a large matmul's rate."""
from __future__ import annotations


import torch

from .common import dtype_name, reason
from .timing import TimingPlan, time_fn



def measure_ceilings(device: torch.device, dtypes, plan: TimingPlan, quick: bool) -> dict:
    """Copy bandwidth (GB/s, read + written bytes) and matmul rate (TFLOP/s per dtype), now."""
    out = {}
    n = (1 << 28 if device.type == "cuda" else (1 << 24 if quick else 1 << 25))  # fp32 elements
    bufs = [torch.randn(n, device=device), torch.empty(n, device=device)]
    t = time_fn(lambda: bufs[1].copy_(bufs[0]), device, plan)
    out["copy_bytes"] = 2 * n * 4
    out["copy_gbps"] = out["copy_bytes"] / (t.median_ms * 1e-3) / 1e9
    out["copy_iqr_ms"] = t.iqr_ms
    if device.type == "cpu":
        out["copy_note"] = "CPU: memcpy of a buffer larger than the LLC (tensor.copy_, all threads)"
    bufs.clear()
    out["matmul_tflops"] = {}
    m = 8192 if device.type == "cuda" else (1024 if quick else 2048)
    for dt in dtypes:
        if device.type == "cpu" and dt == torch.float16:
            continue
        a = torch.randn(m, m, device=device).to(dt)
        b = torch.randn(m, m, device=device).to(dt)
        try:
            t = time_fn(lambda: a @ b, device, plan)
            out["matmul_tflops"][dtype_name(dt)] = 2 * m**3 / (t.median_ms * 1e-3) / 1e12
        except RuntimeError as e:
            out["matmul_tflops"][dtype_name(dt)] = None
            out.setdefault("notes", []).append(f"matmul {dtype_name(dt)}: {reason(e)}")
    out["matmul_size"] = m
    if device.type == "cuda":
        out["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return out


