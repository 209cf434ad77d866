"""Quick CPU check of the C++ kernels: forward and forward+backward time of each norm-family op
against eager `_ref` and torch.compile(`_ref`), measured side by side in one process.

    python benchmarks/cpu_ops_quick.py [--ops bias_gelu,...] [--hidden 384,768,1024]
                                       [--dtypes float32,bfloat16] [--tokens 8192] [--no-compile]

Prints one line per (op, dtype, hidden): milliseconds and the ratios ref/cpp and compiled/cpp
(> 1 means the C++ kernel is faster). The full benchmark suite lives in bertfast/bench/.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.utils.benchmark as tb

import bertfast
from bertfast import ops


def _inputs(op, T, n, dtype, grad):
    g = torch.Generator().manual_seed(0)

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt).requires_grad_(grad)

    if op == "bias_gelu":
        return (r(T, n), r(n, dt=torch.float32)), {}
    if op == "gelu_layernorm":
        return (r(T, n), r(n, dt=torch.float32), r(n, dt=torch.float32), r(n, dt=torch.float32)), {}
    if op == "bias_residual_layernorm":
        return (r(T, n), r(n, dt=torch.float32), r(T, n), r(n, dt=torch.float32), r(n, dt=torch.float32)), {}
    if op == "embedding_layernorm":
        ids = torch.randint(0, 30522, (T // 128, 128), generator=g)
        tt = torch.randint(0, 2, (T // 128, 128), generator=g)
        pos = torch.arange(128).expand(T // 128, 128)
        return (ids, tt, pos, r(30522, n), r(512, n), r(2, n), r(n, dt=torch.float32), r(n, dt=torch.float32)), {}
    raise ValueError(op)


def _time_all(fns: dict, min_run_time: float, rounds: int = 7) -> dict:
    """Milliseconds per call of each candidate: the candidates are timed in turn, `rounds` times,
    and each keeps its fastest round. Interleaving and the minimum make the ratios robust to
    other processes sharing the cores; medians drift with their load."""
    timers, number = {}, {}
    for k, fn in fns.items():
        fn()
        timers[k] = tb.Timer(stmt="fn()", globals={"fn": fn})
        t = timers[k].timeit(1).mean
        number[k] = max(1, int(min_run_time / rounds / max(t, 1e-6)))
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k in fns:
            best[k] = min(best[k], timers[k].timeit(number[k]).mean * 1e3)
    return best


def attention_bench(a):
    """Packed varlen attention (C++) and padded attention with a key mask (C++) against torch SDPA
    on the padded batch with HF's boolean mask: BERT shapes, full and partly filled batches."""
    import torch.nn.functional as F

    rows = []
    for dt in a.dtypes.split(","):
        dtype = getattr(torch, dt)
        for (B, S, H, D, fill) in ((32, 128, 12, 64, 1.0), (32, 128, 12, 64, 0.5), (64, 64, 6, 32, 0.5),
                                   (16, 128, 12, 64, 0.25)):
            g = torch.Generator().manual_seed(0)
            lo = max(1, int(S * fill * 0.5))
            hi = max(lo + 1, min(S, int(S * fill * 1.5)) + 1)
            lens = torch.full((B,), S) if fill >= 1.0 else torch.randint(lo, hi, (B,), generator=g)
            mask = torch.arange(S).view(1, S) < lens.view(B, 1)
            q, k, v = (torch.randn(B, S, H, D, generator=g).to(dtype) for _ in range(3))
            idx = mask.reshape(-1).nonzero().squeeze(1)
            qp, kp, vp = (t.reshape(B * S, H, D)[idx].contiguous() for t in (q, k, v))
            cu = torch.zeros(B + 1, dtype=torch.int32)
            cu[1:] = lens.cumsum(0)
            ms = int(lens.max())
            sdpa_mask = mask.view(B, 1, 1, S)
            res = {"dtype": dt, "B": B, "S": S, "H": H, "D": D, "fill": round(float(mask.float().mean()), 2)}
            for mode in ("fwd",) + (() if a.no_backward else ("fwdbwd",)):
                grad = mode == "fwdbwd"
                for t in (q, k, v, qp, kp, vp):
                    t.requires_grad_(grad)

                def wrap(f, outs):
                    def go():
                        if grad:
                            for t in (q, k, v, qp, kp, vp):
                                t.grad = None
                            o = f()
                            o.backward(torch.ones_like(o))
                        else:
                            with torch.no_grad():
                                f()
                    return go

                def sdpa():
                    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                       attn_mask=sdpa_mask)
                    return o.transpose(1, 2)

                def cpp_varlen():
                    with bertfast.use_backend("cpp"):
                        return ops.attention(qp, kp, vp, cu_seqlens=cu, max_seqlen=ms)

                def cpp_padded():
                    with bertfast.use_backend("cpp"):
                        return ops.attention(q, k, v, attention_mask=mask)

                t = _time_all({"sdpa": wrap(sdpa, None), "cpp_varlen": wrap(cpp_varlen, None),
                               "cpp_padded": wrap(cpp_padded, None)}, a.min_run_time)
                for key, val in t.items():
                    res[f"{mode}_{key}_ms"] = val
                res[f"{mode}_varlen_vs_sdpa"] = round(t["sdpa"] / t["cpp_varlen"], 2)
                res[f"{mode}_padded_vs_sdpa"] = round(t["sdpa"] / t["cpp_padded"], 2)
            rows.append(res)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()),
                  flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default="embedding_layernorm,bias_residual_layernorm,bias_gelu,gelu_layernorm")
    ap.add_argument("--hidden", default="384,768,1024")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--attention", action="store_true", help="benchmark attention against SDPA instead")
    a = ap.parse_args()
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    if a.attention:
        rows = attention_bench(a)
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(rows, fh, indent=1)
        return
    for op in a.ops.split(","):
        fused = getattr(ops, op)
        ref = getattr(ops, op + "_ref")
        for dt in a.dtypes.split(","):
            dtype = getattr(torch, dt)
            for n in map(int, a.hidden.split(",")):
                # A fresh compile per shape and dtype: one shared wrapper would hit dynamo's
                # recompile limit and silently fall back to eager for the later shapes.
                torch._dynamo.reset()
                compiled = None if a.no_compile else torch.compile(ref, dynamic=False)
                res = {"op": op, "dtype": dt, "hidden": n, "tokens": a.tokens}
                for mode in ("fwd",) + (() if a.no_backward else ("fwdbwd",)):
                    grad = mode == "fwdbwd"
                    args, kw = _inputs(op, a.tokens, n, dtype, grad)
                    out0 = ref(*args, **kw)
                    dout = torch.randn_like(out0)

                    def run(f):
                        def go():
                            if grad:
                                for t in args:
                                    if isinstance(t, torch.Tensor):
                                        t.grad = None
                                f(*args, **kw).backward(dout)
                            else:
                                with torch.no_grad():
                                    f(*args, **kw)
                        return go

                    fused_run = run(fused)

                    def cpp_run():
                        with bertfast.use_backend("cpp"):
                            fused_run()

                    fns = {"cpp": cpp_run, "eager": run(ref)}
                    if compiled is not None:
                        fns["compile"] = run(compiled)
                    for k, v in _time_all(fns, a.min_run_time).items():
                        res[f"{mode}_{k}_ms"] = v
                    res[f"{mode}_vs_eager"] = round(res[f"{mode}_eager_ms"] / res[f"{mode}_cpp_ms"], 2)
                    if compiled is not None:
                        res[f"{mode}_vs_compile"] = round(res[f"{mode}_compile_ms"] / res[f"{mode}_cpp_ms"], 2)
                rows.append(res)
                print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()),
                      flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
