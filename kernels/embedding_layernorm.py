"""Triton kernels of embedding_layernorm: LN(word[ids] + type[tt] + pos[pos]) * weight + bias, then dropout.

Forward: ROWS tokens per program; three row gathers summed in fp32 (Hugging Face's order:
word + type, then + position), LayerNorm with fp32 statistics, dropout after the norm, one
cast on store; per-token mean/rstd (fp32) stored for the backward.

Backward: a persistent grid of G programs recomputes the gathered sum h, forms
dh = LN'(dy * dropout mask), and scatters dh into the three tables. Gradient tables are
accumulated in fp32 (a zeroed fp32 buffer, cast to the table dtype at the end; fp32 tables
are accumulated in place):
- default: dh goes to word and position rows with fp32 atomics (repeated ids just add; the
  contention is low: a position row is hit once per sequence). The token-type table has 1
  or 2 rows in BERT-family models, so every token would hit the same rows: for type tables
  of <= 2 rows each program keeps per-type fp32 sums in registers and writes them to a
  (G, T, N) partial buffer instead (two stages, no atomics); larger type tables use atomics.
- deterministic (torch.are_deterministic_algorithms_enabled()): the kernel stores dh (fp32,
  one row per token) and the tables are built with index_put_(accumulate=True), which
  PyTorch runs deterministically in that mode (sort by id + segmented sum on CUDA), so the
  result does not depend on the order of atomics.
weight/bias gradients are two-stage (G, N) partials in both modes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import FastKernel
from ._rng import dropout_keep
from ._launch_params import aot_spec, dropout_args, num_programs
from ._layernorm import all_block_ns, bwd_config, fwd_config, layernorm_rows

MAX_TYPE_ROWS_IN_REGISTERS = 2


@triton.jit
def _gather_sum(Ids, TT, Pos, Word, PosEmb, TypeEmb, rows, rmask, cols, mask, N, NW, NP, NT):
    """fp32 (word[ids] + type[tt]) + pos[pos] for a [ROWS, BLOCK_N] tile, plus the three id vectors.
    Ids are clamped into their tables (NW, NP, NT rows): the host checks them in eager mode, but
    under torch.compile or a CUDA graph nothing is read back, and a bad id must not read (or, in the
    backward, write) outside a table; bertfast.ops.embedding_layernorm asserts on the device there."""
    ids = tl.minimum(tl.maximum(tl.load(Ids + rows, mask=rmask, other=0).to(tl.int64), 0), NW - 1)
    tts = tl.minimum(tl.maximum(tl.load(TT + rows, mask=rmask, other=0).to(tl.int64), 0), NT - 1)
    ps = tl.minimum(tl.maximum(tl.load(Pos + rows, mask=rmask, other=0).to(tl.int64), 0), NP - 1)
    h = tl.load(Word + ids[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h += tl.load(TypeEmb + tts[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h += tl.load(PosEmb + ps[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return h, ids, tts, ps


@triton.jit(do_not_specialize=["seed", "threshold"])
def _emb_ln_fwd_kernel(Ids, TT, Pos, Word, PosEmb, TypeEmb, W, LB, Y, Mean, Rstd, M, N, NW, NP, NT, eps, seed,
                       threshold, scale, HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    h, ids, tts, ps = _gather_sum(Ids, TT, Pos, Word, PosEmb, TypeEmb, rows, rmask, cols, mask, N, NW, NP, NT)
    y, mean, rstd = layernorm_rows(h, mask, cols, cmask, W, LB, N, eps)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]  # output offsets = dropout offsets
    if HAS_DROPOUT:
        seed = seed.to(tl.int64)
        keep = dropout_keep(seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, offs, threshold)
        y = y * tl.where(keep, scale, 0.0)  # a multiply, like the reference (bit-identical)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=rmask)
    tl.store(Rstd + rows, rstd, mask=rmask)


@triton.jit(do_not_specialize=["seed", "threshold"])
def _emb_ln_bwd_kernel(DY, Ids, TT, Pos, Word, PosEmb, TypeEmb, W, Mean, Rstd, DWord, DPos, DType, DH,
                       DType_part, DW_part, DLB_part, M, N, NW, NP, NT, seed, threshold, scale,
                       HAS_DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, TYPE_ROWS: tl.constexpr,
                       BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if BLOCK_N < 8192:  # at 8192 columns re-read per row instead (registers; see brln)
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = seed.to(tl.int64)
        seed_lo = seed & 0xFFFFFFFF
        seed_hi = (seed >> 32) & 0xFFFFFFFF
    dw_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    dlb_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    t0_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    t1_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(M, ROWS), n_prog):
        if BLOCK_N >= 8192:
            w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        rows = tile * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        h, ids, tts, ps = _gather_sum(Ids, TT, Pos, Word, PosEmb, TypeEmb, rows, rmask, cols, mask, N, NW, NP,
                                      NT)
        mean = tl.load(Mean + rows, mask=rmask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)
        # no mask needed: dy (so g) is 0 on padded lanes and rstd is 0 on padded rows, so they add
        # nothing to the sums; padded lanes of dh/dx are garbage that is never stored
        xhat = (h - mean[:, None]) * rstd[:, None]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            dy = dy * tl.where(dropout_keep(seed_lo, seed_hi, offs, threshold), scale, 0.0)
        g = dy * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / N
        c2 = tl.sum(g, axis=1) / N
        dh = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        dw_acc += dy * xhat
        dlb_acc += dy
        if ATOMIC:
            tl.atomic_add(DWord + ids[:, None] * N + cols[None, :], dh, mask=mask)
            tl.atomic_add(DPos + ps[:, None] * N + cols[None, :], dh, mask=mask)
            if TYPE_ROWS == 0:
                tl.atomic_add(DType + tts[:, None] * N + cols[None, :], dh, mask=mask)
            elif BLOCK_N < 8192:
                t0_acc += tl.where((tts == 0)[:, None], dh, 0.0)
                if TYPE_ROWS == 2:
                    t1_acc += tl.where((tts == 1)[:, None], dh, 0.0)
            else:
                # 8192 columns: no registers left for per-type sums, so add into this program's
                # own rows of the partial buffer (read-modify-write that stays in L1/L2; no races:
                # no other program touches these rows). ROWS is 1 here.
                tl.static_assert(ROWS == 1)
                tp = DType_part + (pid * TYPE_ROWS + tl.sum(tts, axis=0)) * N + cols  # the one row's type
                tl.store(tp, tl.load(tp, mask=cmask, other=0.0) + tl.sum(dh, axis=0), mask=cmask)
        else:
            tl.store(DH + offs, dh, mask=mask)
    tl.store(DW_part + pid * N + cols, tl.sum(dw_acc, axis=0), mask=cmask)
    tl.store(DLB_part + pid * N + cols, tl.sum(dlb_acc, axis=0), mask=cmask)
    if ATOMIC and BLOCK_N < 8192:
        if TYPE_ROWS >= 1:
            tl.store(DType_part + (pid * TYPE_ROWS) * N + cols, tl.sum(t0_acc, axis=0), mask=cmask)
        if TYPE_ROWS == 2:
            tl.store(DType_part + (pid * TYPE_ROWS + 1) * N + cols, tl.sum(t1_acc, axis=0), mask=cmask)


# ---------------------------------------------------------------------------------------
# launchers (the backend contract of bertfast/ops/embedding_layernorm.py)

_fwd, _bwd = FastKernel(_emb_ln_fwd_kernel), FastKernel(_emb_ln_bwd_kernel)


def _check_ids(*named):
    for name, t in named:
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an int32 or int64 tensor, got {t.dtype}")


def _rows(word, pos_emb, type_emb):
    """The tables' row counts, which the kernels clamp ids into."""
    return word.shape[0], pos_emb.shape[0], type_emb.shape[0]


def embedding_layernorm_fwd(ids, tt, pos, word, pos_emb, type_emb, weight, bias, eps, p, seed):
    _check_ids(("input_ids", ids), ("token_type_ids", tt), ("position_ids", pos))
    m, n = ids.shape[0], word.shape[1]
    ids, tt, pos = ids.contiguous(), tt.contiguous(), pos.contiguous()
    word, pos_emb, type_emb = word.contiguous(), pos_emb.contiguous(), type_emb.contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()  # read at unit stride
    bn, rows, warps = fwd_config(n)
    y = torch.empty((m, n), dtype=word.dtype, device=word.device)
    mean = torch.empty(m, dtype=torch.float32, device=word.device)
    rstd = torch.empty(m, dtype=torch.float32, device=word.device)
    if m == 0:
        return y, mean, rstd
    threshold, scale = dropout_args(p)
    key = (n, p > 0.0, ids.dtype, tt.dtype, pos.dtype, word.dtype, weight.dtype, bias.dtype)
    _fwd((triton.cdiv(m, rows),), key,
         (ids, tt, pos, word, pos_emb, type_emb, weight, bias, y, mean, rstd, m, n, *_rows(word, pos_emb, type_emb),
          eps, seed, threshold, scale),
         HAS_DROPOUT=p > 0.0, BLOCK_N=bn, ROWS=rows, num_warps=warps)
    return y, mean, rstd


def _fp32_grad(table):
    """A zeroed fp32 accumulation buffer for `table`'s gradient (the gradient itself when fp32)."""
    return torch.zeros(table.shape, dtype=torch.float32, device=table.device)


def embedding_layernorm_bwd(dout, ids, tt, pos, word, pos_emb, type_emb, weight, bias, mean, rstd, eps, p, seed):
    _check_ids(("input_ids", ids), ("token_type_ids", tt), ("position_ids", pos))
    m, n = ids.shape[0], word.shape[1]
    dout, ids, tt, pos = dout.contiguous(), ids.contiguous(), tt.contiguous(), pos.contiguous()
    word, pos_emb, type_emb = word.contiguous(), pos_emb.contiguous(), type_emb.contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()  # read at unit stride
    bn, rows, warps = bwd_config(n)
    deterministic = torch.are_deterministic_algorithms_enabled()
    n_types = type_emb.shape[0]
    type_rows = n_types if (n_types <= MAX_TYPE_ROWS_IN_REGISTERS and not deterministic) else 0
    dword, dpos, dtype = _fp32_grad(word), _fp32_grad(pos_emb), _fp32_grad(type_emb)
    threshold, scale = dropout_args(p)
    const = dict(HAS_DROPOUT=p > 0.0, ATOMIC=not deterministic, TYPE_ROWS=type_rows, BLOCK_N=bn, ROWS=rows)

    def args(parts, type_parts, dh):
        return (dout, ids, tt, pos, word, pos_emb, type_emb, weight, mean, rstd, dword, dpos, dtype, dh, type_parts,
                parts[0], parts[1], m, n, *_rows(word, pos_emb, type_emb), seed, threshold, scale)

    key = (n, p > 0.0, deterministic, type_rows, dout.dtype, ids.dtype, tt.dtype, pos.dtype, word.dtype, weight.dtype)

    def probe_args():
        probe = torch.empty((2, 1, n), dtype=torch.float32, device=word.device)
        return args(probe, probe, probe)

    g = num_programs(word.device, triton.cdiv(m, rows), warps, _emb_ln_bwd_kernel, probe_args, const, key=key)
    parts = torch.empty((2, g, n), dtype=torch.float32, device=word.device)
    # zeroed: at 8192 columns the kernel accumulates into it in place
    type_parts = torch.zeros((g, max(type_rows, 1), n), dtype=torch.float32, device=word.device)
    dh = torch.empty((m, n), dtype=torch.float32, device=word.device) if deterministic else parts
    _bwd((g,), key, args(parts, type_parts, dh), num_warps=warps, **const)
    if deterministic:
        for buf, i in ((dword, ids), (dpos, pos), (dtype, tt)):
            buf.index_put_((i.long(),), dh, accumulate=True)
    elif type_rows:
        dtype += type_parts.sum(0)
    sums = parts.sum(1)
    return (dword.to(word.dtype), dpos.to(pos_emb.dtype), dtype.to(type_emb.dtype), sums[0].to(weight.dtype),
            sums[1].to(bias.dtype))


# ---------------------------------------------------------------------------------------
# ahead-of-time compile list

def aot_specs(full: bool = False) -> list:
    """Every (BLOCK_N, ROWS, num_warps) the launchers can choose: bf16 tables, int64 ids,
    dropout on, atomic scatter with a 2-row type table (BERT). full=True adds fp16/fp32,
    int32 ids, no dropout and the deterministic / atomic-type-table backward variants."""
    dtypes = ("bf16", "fp16", "fp32") if full else ("bf16",)
    id_types = ("i64", "i32") if full else ("i64",)
    drops = (True, False) if full else (True,)
    bwd_modes = ((True, 2), (True, 0), (False, 0)) if full else ((True, 2),)
    specs = []
    for bn in all_block_ns():
        for dt in dtypes:
            for it in id_types:
                for drop in drops:
                    tag = f"{dt} ids={it} dropout={int(drop)}"
                    _, rows, warps = fwd_config(bn)
                    specs.append(aot_spec(
                        _emb_ln_fwd_kernel,
                        {"Ids": f"*{it}", "TT": f"*{it}", "Pos": f"*{it}", "Word": f"*{dt}", "PosEmb": f"*{dt}",
                         "TypeEmb": f"*{dt}", "W": f"*{dt}", "LB": f"*{dt}", "Y": f"*{dt}", "Mean": "*fp32",
                         "Rstd": "*fp32", "M": "i32", "N": "i32", "NW": "i32", "NP": "i32", "NT": "i32",
                         "eps": "fp32", "seed": "i64", "threshold": "i32",
                         "scale": "fp32"},
                        {"HAS_DROPOUT": drop, "BLOCK_N": bn, "ROWS": rows}, warps,
                        f"BLOCK_N={bn} ROWS={rows} warps={warps} {tag}",
                        div16=("Ids", "TT", "Pos", "Word", "PosEmb", "TypeEmb", "W", "LB", "Y", "Mean", "Rstd", "N")))
                    _, rows, warps = bwd_config(bn)
                    for atomic, type_rows in bwd_modes:
                        mode = f"atomic type_rows={type_rows}" if atomic else "deterministic"
                        specs.append(aot_spec(
                            _emb_ln_bwd_kernel,
                            {"DY": f"*{dt}", "Ids": f"*{it}", "TT": f"*{it}", "Pos": f"*{it}", "Word": f"*{dt}",
                             "PosEmb": f"*{dt}", "TypeEmb": f"*{dt}", "W": f"*{dt}", "Mean": "*fp32",
                             "Rstd": "*fp32", "DWord": "*fp32", "DPos": "*fp32", "DType": "*fp32", "DH": "*fp32",
                             "DType_part": "*fp32", "DW_part": "*fp32", "DLB_part": "*fp32", "M": "i32",
                             "N": "i32", "NW": "i32", "NP": "i32", "NT": "i32", "seed": "i64", "threshold": "i32",
                             "scale": "fp32"},
                            {"HAS_DROPOUT": drop, "ATOMIC": atomic, "TYPE_ROWS": type_rows, "BLOCK_N": bn,
                             "ROWS": rows}, warps, f"BLOCK_N={bn} ROWS={rows} warps={warps} {tag} {mode}",
                            div16=("DY", "Ids", "TT", "Pos", "Word", "PosEmb", "TypeEmb", "W", "Mean", "Rstd",
                                   "DWord", "DPos", "DType", "DH", "DType_part", "DW_part", "DLB_part", "N")))
    return specs
