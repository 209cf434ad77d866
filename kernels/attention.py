"""Fused attention in Triton (FlashAttention-2 algorithm): forward and backward, padded and varlen.

Backend of bertfast.ops.attention (its module docstring is the contract):
  attention_fwd(q, k, v, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed) -> (out, lse)
  attention_bwd(dout, q, k, v, out, lse, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed)
      -> (dq, dk, dv)

Forward: one program per (query block, batch, head); K/V blocks stream through an online softmax
kept in fp32 in base 2 (scores are pre-multiplied by scale*log2(e) so the exponential is one
exp2), no S x S matrix is ever stored, and the natural-log LSE is saved for the backward.
Backward (FlashAttention-2): a preprocess computes delta = rowsum(dO * O); one kernel owns a key
block and sweeps the query blocks for dK/dV; a second owns a query block and sweeps the keys for
dQ. Nothing is accumulated with atomics, so the backward is deterministic: repeated calls are
bitwise identical whether or not torch.use_deterministic_algorithms is on.

The same kernel bodies serve both layouts: VARLEN (constexpr) reads each sequence's start and
length from cu_seqlens, the padded layout uses the batch stride and the full lengths. The loops
over blocks run in two stages: blocks that need no mask (all keys in range, fully below the
causal diagonal) and the blocks that do, so the common BERT case runs without per-element masks.

Supported inputs
- dtypes: fp16 and bf16 (tensor-core dots, fp32 accumulation, softmax statistics in fp32).
  fp32 is served by the kernels too, through TF32 tensor cores: by default as 3xTF32 (each dot
  split into three TF32 products, accurate to ~1e-6 like fp32), as plain TF32 when the user opts
  in the way PyTorch matmuls do (torch.backends.cuda.matmul.allow_tf32 or
  torch.set_float32_matmul_precision("high")). fp32 uses small tiles: it is the accurate path,
  bf16/fp16 the fast one.
  No fp64: dispatch sends it to the reference (bertfast/dispatch/table.py declares what these
  kernels serve; nothing here falls back).
- head_dim: 32, 64 and 128 are native (the tuned configurations). Any other head_dim up to 256
  is served by padding it inside the kernel to the next power of two (>= 16): the loads of the
  extra columns are masked to zero, so no copy of q/k/v is made. head_dim <= MAX_HEAD_DIM = 256
  (declared in bertfast/dispatch/table.py). v may have its own head_dim.
- key_bias (padded layout): any fp32 additive per-key bias (0 / -inf / any float); rows that see
  no key at all (fully masked, or causal with Lq > Lk) give zeros, lse = +inf and zero grads.
- dropout: kernels/_rng.py's Philox stream at offset ((b*H + h)*max_q + i)*max_k + j, so the
  kept mask equals the reference's bit for bit; the backward regenerates it.

Launch configurations are explicit lists per kernel and padded head_dim: CONFIGS (16-bit),
DROPOUT_CONFIGS (16-bit with dropout: the Philox state needs registers, so 8 warps or smaller
tiles) and CONFIGS_FP32. A heuristic picks the first entry whose tiles fit the sequence lengths
(`pick_config`); with BERTFAST_AUTOTUNE=1 the launchers instead time every entry of the list
once per (kernel, head_dim, dtype, power-of-two buckets of max_seqlen q/k, constexpr flags) on
the GPU and keep the fastest (do not combine that with CUDA-graph capture: tuning runs
kernels). `aot_specs()` enumerates every (kernel, configuration) for ahead-of-time compilation
(`bertfast verify --aot sm_90a --aot sm_80`); each entry carries "archs", the architecture its
family's lists are launched on. Every 16-bit entry (CONFIGS, DROPOUT_CONFIGS, head_dim 32 to
256) compiles for its architecture without register spills (ptxas via cuobjdump; 139 entries).

Why one file of ~950 lines: one op, one file (the project's rule). The forward, the three backward
kernels and their launchers share the block-loop bodies, the config lists and the layout
conventions above; split apart, each piece would need the others open to be read.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
import triton.runtime.errors

from ._launch import FastKernel
from ._launch_params import dropout_args
from ._rng import dropout_keep, split_seed

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------
# shared device helpers


@triton.jit
def _seq_bounds(CU_Q, CU_K, b, max_q, max_k, VARLEN: tl.constexpr):
    """(first row of the sequence in the packed tensor, its query length, same for keys)."""
    if VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        len_q = (tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)).to(tl.int32)
        k_start = tl.load(CU_K + b).to(tl.int64)
        len_k = (tl.load(CU_K + b + 1) - tl.load(CU_K + b)).to(tl.int32)
    else:
        q_start = 0
        len_q = max_q
        k_start = 0
        len_k = max_k
    return q_start, len_q, k_start, len_k


@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """A (rows, BLOCK_D) tile; rows >= n_rows (only when MASK_ROWS) and columns >= D read as 0."""
    if MASK_ROWS:
        if BLOCK_D == D:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < D), other=0.0)
    else:
        if BLOCK_D == D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    return x


@triton.jit
def _store_tile(ptrs, x, rows, n_rows, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr):
    if BLOCK_D == D:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < D))


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptrs, stride_ks, stride_vs,
               offs_m, offs_n, offs_d, offs_dv, lo, hi, len_q, len_k,
               qk_scale, drop_base, max_k, seed_lo, seed_hi, drop_threshold,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
               DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, DESC: tl.constexpr):
    # DESC: k_ptrs/v_ptrs are tensor descriptors of this sequence's keys/values (TMA loads on Hopper;
    # rows past len_k and columns past HEAD_DIM read 0 without masks)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if DESC:
            k = k_ptrs.load([start_n, 0])
        else:
            k = _load_tile(k_ptrs + start_n * stride_ks, cols, len_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if HAS_BIAS or MASKED:
            s = qk * qk_scale
            if HAS_BIAS:
                if MASKED:
                    kb = tl.load(bias_ptrs + cols, mask=cols < len_k, other=0.0)
                else:
                    kb = tl.load(bias_ptrs + cols)
                s += kb[None, :] * 1.4426950408889634
            if MASKED:
                valid = cols[None, :] < len_k
                if CAUSAL:
                    valid = valid & (cols[None, :] <= offs_m[:, None] + (len_k - len_q))
                s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row that has seen only masked keys keeps m = -inf: subtract 0 instead (p = 0, not NaN)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
        else:
            # the common case: no bias, no mask. scale > 0 (the launcher guarantees it), so
            # max(qk) * scale is the row max of the scaled scores and the scaling fuses into
            # the subtraction (one FMA per score)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk * qk_scale - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        # the softmax denominator counts every probability, dropped or not (dropout acts after it)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DESC:
            v = v_ptrs.load([start_n, 0])
        else:
            v = _load_tile(v_ptrs + start_n * stride_vs, cols, len_k, offs_dv, HEAD_DIM_V, BLOCK_DV, MASKED)
        if DROPOUT:
            offs = drop_base + offs_m[:, None].to(tl.int64) * max_k + cols[None, :]
            p = tl.where(dropout_keep(seed_lo, seed_hi, offs, drop_threshold), p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["max_q", "max_k", "seed_lo", "seed_hi"])
def _attn_fwd(Q, K, V, Out, Lse, KeyBias, CU_Q, CU_K,
              stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
              stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
              stride_lb, stride_lh, stride_biasb,
              H, max_q, max_k, n_mblocks, qk_scale, seed_lo, seed_hi, drop_threshold, drop_scale,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr, HAS_BIAS: tl.constexpr,
              CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, DESC: tl.constexpr = False):
    # 1-D grid, query blocks fastest: neighbouring programs share one head's K/V in L2, and the
    # grid is not limited by the 65535 cap of the second grid dimension
    pid = tl.program_id(0)
    pid_m = pid % n_mblocks
    pid_bh = pid // n_mblocks
    b = pid_bh // H
    h = pid_bh % H
    q_start, len_q, k_start, len_k = _seq_bounds(CU_Q, CU_K, b, max_q, max_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + (b64 * stride_qb + q_start * stride_qs + h64 * stride_qh) + offs_m[:, None] * stride_qs \
        + offs_d[None, :]
    k_ptrs = K + (b64 * stride_kb + k_start * stride_ks + h64 * stride_kh) + offs_n[:, None] * stride_ks \
        + offs_d[None, :]
    v_ptrs = V + (b64 * stride_vb + k_start * stride_vs + h64 * stride_vh) + offs_n[:, None] * stride_vs \
        + offs_dv[None, :]
    bias_ptrs = KeyBias + b64 * stride_biasb
    if DESC:
        # Hopper's TMA: one descriptor per sequence and head, bounded by its length, so the loads
        # need no masks and read 0 past the sequence (as the masked pointer loads do); the launcher
        # checks the 16-byte alignment TMA needs and uses the pointer path otherwise
        q_desc = tl.make_tensor_descriptor(Q + (b64 * stride_qb + q_start * stride_qs + h64 * stride_qh),
                                           shape=[len_q, HEAD_DIM], strides=[stride_qs, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        k_ptrs = tl.make_tensor_descriptor(K + (b64 * stride_kb + k_start * stride_ks + h64 * stride_kh),
                                           shape=[len_k, HEAD_DIM], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_ptrs = tl.make_tensor_descriptor(V + (b64 * stride_vb + k_start * stride_vs + h64 * stride_vh),
                                           shape=[len_k, HEAD_DIM_V], strides=[stride_vs, 1],
                                           block_shape=[BLOCK_N, BLOCK_DV])
        q = q_desc.load([m0, 0])
    else:
        q = _load_tile(q_ptrs, offs_m, len_q, offs_d, HEAD_DIM, BLOCK_D, True)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    drop_base = pid_bh.to(tl.int64) * max_q * max_k

    # keys [0, full_end) need no mask for any row of this block; [full_end, hi) do
    if CAUSAL:
        hi = tl.minimum(len_k, m0 + BLOCK_M + (len_k - len_q))  # last row's last visible key + 1
        full_end = tl.minimum(len_k, m0 + 1 + (len_k - len_q))  # first row's last visible key + 1
    else:
        hi = len_k
        full_end = len_k
    hi = tl.maximum(hi, 0)
    full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptrs, stride_ks, stride_vs,
                               offs_m, offs_n, offs_d, offs_dv, 0, full_end, len_q, len_k,
                               qk_scale, drop_base, max_k, seed_lo, seed_hi, drop_threshold,
                               HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N,
                               False, HAS_BIAS, CAUSAL, DROPOUT, DOT_PREC, DESC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, bias_ptrs, stride_ks, stride_vs,
                               offs_m, offs_n, offs_d, offs_dv, full_end, hi, len_q, len_k,
                               qk_scale, drop_base, max_k, seed_lo, seed_hi, drop_threshold,
                               HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N,
                               True, HAS_BIAS, CAUSAL, DROPOUT, DOT_PREC, DESC)

    # rows that saw no key: l = 0, acc = 0 -> output 0 and lse = +inf (the contract)
    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    out = acc * (drop_scale / l_safe)[:, None]
    lse = tl.where(dead, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = Out + (b64 * stride_ob + q_start * stride_os + h64 * stride_oh) + offs_m[:, None] * stride_os \
        + offs_dv[None, :]
    _store_tile(o_ptrs, out.to(Out.dtype.element_ty), offs_m, len_q, offs_dv, HEAD_DIM_V, BLOCK_DV)
    tl.store(Lse + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, lse, mask=offs_m < len_q)


# ---------------------------------------------------------------------------------------------
# backward


@triton.jit(do_not_specialize=["max_q"])
def _attn_bwd_pre(Out, DO, Delta, CU_Q,
                  stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh, stride_lb, stride_lh,
                  H, max_q, n_mblocks,
                  HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, in the lse layout."""
    pid = tl.program_id(0)
    pid_m = pid % n_mblocks
    pid_bh = pid // n_mblocks
    b = pid_bh // H
    h = pid_bh % H
    q_start, len_q, _k_start, _len_k = _seq_bounds(CU_Q, CU_Q, b, max_q, max_q, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o = _load_tile(Out + (b64 * stride_ob + q_start * stride_os + h64 * stride_oh) + offs_m[:, None] * stride_os
                   + offs_dv[None, :], offs_m, len_q, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    do = _load_tile(DO + (b64 * stride_db + q_start * stride_ds + h64 * stride_dh) + offs_m[:, None] * stride_ds
                    + offs_dv[None, :], offs_m, len_q, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, delta, mask=offs_m < len_q)


@triton.jit
def _dkdv_inner(dk, dv, k, v, kb, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qs, stride_ds,
                offs_m, offs_n, offs_d, offs_dv, lo, hi, len_q, len_k,
                qk_scale, drop_base, max_k, seed_lo, seed_hi, drop_threshold, drop_scale,
                HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
                DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    # transposed formulation (keys x queries): dK and dV accumulate without transposing P or dS
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        q = _load_tile(q_ptrs + start_m * stride_qs, rows, len_q, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        do = _load_tile(do_ptrs + start_m * stride_ds, rows, len_q, offs_dv, HEAD_DIM_V, BLOCK_DV, MASKED)
        if MASKED:
            # rows past the sequence: lse = +inf makes their probabilities exactly 0
            lse2 = tl.load(lse_ptrs + rows, mask=rows < len_q, other=float("inf")) * 1.4426950408889634
            delta = tl.load(delta_ptrs + rows, mask=rows < len_q, other=0.0)
        else:
            lse2 = tl.load(lse_ptrs + rows) * 1.4426950408889634
            delta = tl.load(delta_ptrs + rows)
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        if HAS_BIAS:
            sT += kb[:, None]
        if MASKED:
            if CAUSAL:
                sT = tl.where(offs_n[:, None] <= rows[None, :] + (len_k - len_q), sT, float("-inf"))
        pT = tl.math.exp2(sT - lse2[None, :])
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        if DROPOUT:
            offs = drop_base + rows[None, :].to(tl.int64) * max_k + offs_n[:, None]
            keep = dropout_keep(seed_lo, seed_hi, offs, drop_threshold)
            dv += tl.dot(tl.where(keep, pT * drop_scale, 0.0).to(do.dtype), do, input_precision=DOT_PREC)
            dpT = tl.where(keep, dpT * drop_scale, 0.0)
        else:
            dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=["max_q", "max_k", "seed_lo", "seed_hi"])
def _attn_bwd_dkdv(Q, K, V, DO, Lse, Delta, KeyBias, DK, DV, CU_Q, CU_K,
                   stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
                   stride_lb, stride_lh, stride_biasb,
                   H, max_q, max_k, n_nblocks, qk_scale, sm_scale, seed_lo, seed_hi, drop_threshold, drop_scale,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr,
                   HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """One program per (key block, batch, head): dK and dV of the block. dk/dv share k/v's strides."""
    pid = tl.program_id(0)
    pid_n = pid % n_nblocks
    pid_bh = pid // n_nblocks
    b = pid_bh // H
    h = pid_bh % H
    q_start, len_q, k_start, len_k = _seq_bounds(CU_Q, CU_K, b, max_q, max_k, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= len_k:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_off = b64 * stride_kb + k_start * stride_ks + h64 * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
    v_off = b64 * stride_vb + k_start * stride_vs + h64 * stride_vh + offs_n[:, None] * stride_vs + offs_dv[None, :]
    k = _load_tile(K + k_off, offs_n, len_k, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(V + v_off, offs_n, len_k, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    if HAS_BIAS:
        # keys past the end read 0: their dK/dV rows are never stored and rows of dK/dV are independent
        kb = tl.load(KeyBias + b64 * stride_biasb + offs_n, mask=offs_n < len_k, other=0.0) * 1.4426950408889634
    else:
        kb = 0.0
    q_ptrs = Q + (b64 * stride_qb + q_start * stride_qs + h64 * stride_qh) + offs_m[:, None] * stride_qs \
        + offs_d[None, :]
    do_ptrs = DO + (b64 * stride_db + q_start * stride_ds + h64 * stride_dh) + offs_m[:, None] * stride_ds \
        + offs_dv[None, :]
    lse_ptrs = Lse + b64 * stride_lb + h64 * stride_lh + q_start
    delta_ptrs = Delta + b64 * stride_lb + h64 * stride_lh + q_start
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    drop_base = pid_bh.to(tl.int64) * max_q * max_k

    # query rows [lo, mid) cross the causal diagonal of this key block (masked), [mid, end_full)
    # see every key of it, [end_full, len_q) is the partial last row block (masked rows)
    if CAUSAL:
        # row i sees key j iff i >= j - (len_k - len_q)
        lo = tl.maximum(n0 - (len_k - len_q), 0) // BLOCK_M * BLOCK_M
        mid = tl.maximum(n0 + BLOCK_N - 1 - (len_k - len_q), 0)
        mid = tl.maximum(tl.minimum((mid + BLOCK_M - 1) // BLOCK_M * BLOCK_M, len_q), lo)
    else:
        lo = 0
        mid = 0
    end_full = tl.maximum(len_q // BLOCK_M * BLOCK_M, mid)
    if CAUSAL:
        dk, dv = _dkdv_inner(dk, dv, k, v, kb, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qs, stride_ds,
                             offs_m, offs_n, offs_d, offs_dv, lo, mid, len_q, len_k,
                             qk_scale, drop_base, max_k, seed_lo, seed_hi, drop_threshold, drop_scale,
                             HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M,
                             True, HAS_BIAS, CAUSAL, DROPOUT, DOT_PREC)
    dk, dv = _dkdv_inner(dk, dv, k, v, kb, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qs, stride_ds,
                         offs_m, offs_n, offs_d, offs_dv, mid, end_full, len_q, len_k,
                         qk_scale, drop_base, max_k, seed_lo, seed_hi, drop_threshold, drop_scale,
                         HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M,
                         False, HAS_BIAS, CAUSAL, DROPOUT, DOT_PREC)
    dk, dv = _dkdv_inner(dk, dv, k, v, kb, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qs, stride_ds,
                         offs_m, offs_n, offs_d, offs_dv, end_full, len_q, len_q, len_k,
                         qk_scale, drop_base, max_k, seed_lo, seed_hi, drop_threshold, drop_scale,
                         HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M,
                         True, HAS_BIAS, CAUSAL, DROPOUT, DOT_PREC)
    _store_tile(DK + k_off, (dk * sm_scale).to(DK.dtype.element_ty), offs_n, len_k, offs_d, HEAD_DIM, BLOCK_D)
    _store_tile(DV + v_off, dv.to(DV.dtype.element_ty), offs_n, len_k, offs_dv, HEAD_DIM_V, BLOCK_DV)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, bias_ptrs, stride_ks, stride_vs,
              offs_m, offs_n, offs_d, offs_dv, lo, hi, len_q, len_k,
              qk_scale, drop_base, max_k, seed_lo, seed_hi, drop_threshold, drop_scale,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
              DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = _load_tile(k_ptrs + start_n * stride_ks, cols, len_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_tile(v_ptrs + start_n * stride_vs, cols, len_k, offs_dv, HEAD_DIM_V, BLOCK_DV, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if HAS_BIAS:
            if MASKED:
                kb = tl.load(bias_ptrs + cols, mask=cols < len_k, other=0.0)
            else:
                kb = tl.load(bias_ptrs + cols)
            s += kb[None, :] * 1.4426950408889634
        if MASKED:
            # keys past the end must get p = 0 here: dQ sums over keys, and exp(0 - lse) of a
            # zero-padded key can overflow when the row's real scores are hugely negative
            valid = cols[None, :] < len_k
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + (len_k - len_q))
            s = tl.where(valid, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if DROPOUT:
            offs = drop_base + offs_m[:, None].to(tl.int64) * max_k + cols[None, :]
            dp = tl.where(dropout_keep(seed_lo, seed_hi, offs, drop_threshold), dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit(do_not_specialize=["max_q", "max_k", "seed_lo", "seed_hi"])
def _attn_bwd_dq(Q, K, V, DO, Lse, Delta, KeyBias, DQ, CU_Q, CU_K,
                 stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                 stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
                 stride_lb, stride_lh, stride_biasb,
                 H, max_q, max_k, n_mblocks, qk_scale, sm_scale, seed_lo, seed_hi, drop_threshold, drop_scale,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr,
                 HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """One program per (query block, batch, head): dQ of the block. dq shares q's strides."""
    pid = tl.program_id(0)
    pid_m = pid % n_mblocks
    pid_bh = pid // n_mblocks
    b = pid_bh // H
    h = pid_bh % H
    q_start, len_q, k_start, len_k = _seq_bounds(CU_Q, CU_K, b, max_q, max_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_off = b64 * stride_qb + q_start * stride_qs + h64 * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = _load_tile(Q + q_off, offs_m, len_q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + (b64 * stride_db + q_start * stride_ds + h64 * stride_dh) + offs_m[:, None] * stride_ds
                    + offs_dv[None, :], offs_m, len_q, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    l_off = b64 * stride_lb + h64 * stride_lh + q_start + offs_m
    lse2 = tl.load(Lse + l_off, mask=offs_m < len_q, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + l_off, mask=offs_m < len_q, other=0.0)
    k_ptrs = K + (b64 * stride_kb + k_start * stride_ks + h64 * stride_kh) + offs_n[:, None] * stride_ks \
        + offs_d[None, :]
    v_ptrs = V + (b64 * stride_vb + k_start * stride_vs + h64 * stride_vh) + offs_n[:, None] * stride_vs \
        + offs_dv[None, :]
    bias_ptrs = KeyBias + b64 * stride_biasb
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    drop_base = pid_bh.to(tl.int64) * max_q * max_k
    if CAUSAL:
        hi = tl.minimum(len_k, m0 + BLOCK_M + (len_k - len_q))
        full_end = tl.minimum(len_k, m0 + 1 + (len_k - len_q))
    else:
        hi = len_k
        full_end = len_k
    hi = tl.maximum(hi, 0)
    full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
    dq = _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, bias_ptrs, stride_ks, stride_vs,
                   offs_m, offs_n, offs_d, offs_dv, 0, full_end, len_q, len_k,
                   qk_scale, drop_base, max_k, seed_lo, seed_hi, drop_threshold, drop_scale,
                   HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N,
                   False, HAS_BIAS, CAUSAL, DROPOUT, DOT_PREC)
    dq = _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, bias_ptrs, stride_ks, stride_vs,
                   offs_m, offs_n, offs_d, offs_dv, full_end, hi, len_q, len_k,
                   qk_scale, drop_base, max_k, seed_lo, seed_hi, drop_threshold, drop_scale,
                   HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N,
                   True, HAS_BIAS, CAUSAL, DROPOUT, DOT_PREC)
    _store_tile(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), offs_m, len_q, offs_d, HEAD_DIM, BLOCK_D)


# ---------------------------------------------------------------------------------------------
# launch configurations


@dataclass(frozen=True)
class Config:
    """BLOCK_M: query rows per tile, BLOCK_N: key rows per tile (for dK/dV BLOCK_N is the block a
    program owns and BLOCK_M the query step; for dQ and the forward it is the other way round)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    desc: bool = False  # forward only: K/V/Q loads through tensor descriptors (TMA on Hopper)


C = Config
# Per GPU family, kernel and padded head_dim, fp16/bf16; the first entry is the default, the
# others are autotuning candidates. Sizes follow FlashAttention-2 / Triton tutorial 06: big query
# tiles for the forward and dQ (128 rows = two wgmma tiles on Hopper), big key tiles for dK/dV.
# Every entry was compiled for its architecture (bertfast verify --aot) and kept only if it does
# not spill: "sm90" (Hopper, Blackwell datacenter: wgmma/tcgen05 keep accumulators cheaper) and
# "sm80" (Ampere, Ada and others: mma.sync layouts need more registers, so smaller tiles).
CONFIGS = {
    "sm90": {
        "fwd": {32: [C(128, 64, 4, 3), C(128, 128, 8, 3), C(64, 64, 4, 3), C(32, 32, 4, 2)],
                64: [C(128, 64, 4, 3), C(128, 128, 8, 3), C(64, 64, 4, 3), C(32, 32, 4, 2)],
                128: [C(128, 64, 8, 3), C(128, 128, 8, 2), C(64, 64, 4, 3), C(32, 32, 4, 2)],
                256: [C(64, 64, 8, 2), C(64, 32, 4, 2), C(32, 32, 4, 2)]},
        "dkdv": {32: [C(64, 128, 8, 3), C(32, 128, 4, 3), C(64, 64, 4, 3), C(32, 32, 4, 2)],
                 64: [C(64, 128, 8, 3), C(32, 128, 8, 3), C(64, 64, 4, 3), C(32, 32, 4, 2)],
                 128: [C(32, 128, 8, 3), C(32, 64, 4, 3), C(32, 32, 4, 2)],
                 256: [C(32, 32, 8, 2)]},
        "dq": {32: [C(128, 32, 4, 3), C(128, 64, 8, 3), C(64, 64, 4, 3), C(32, 32, 4, 2)],
               64: [C(128, 32, 4, 3), C(128, 64, 8, 3), C(64, 64, 4, 3), C(32, 32, 4, 2)],
               128: [C(128, 32, 8, 3), C(128, 64, 8, 2), C(64, 64, 4, 3), C(32, 32, 4, 2)],
               256: [C(64, 32, 8, 2), C(32, 32, 4, 2)]},
    },
    "sm80": {
        "fwd": {32: [C(128, 128, 8, 3), C(64, 64, 4, 3), C(32, 32, 4, 2)],
                64: [C(128, 128, 8, 3), C(64, 64, 4, 3), C(32, 32, 4, 2)],
                128: [C(128, 32, 8, 3), C(64, 64, 4, 3), C(32, 32, 4, 2)],
                256: [C(64, 64, 8, 2), C(32, 32, 4, 2)]},
        "dkdv": {32: [C(64, 128, 8, 3), C(32, 128, 4, 3), C(64, 64, 4, 3), C(32, 32, 4, 2)],
                 64: [C(32, 128, 8, 3), C(64, 64, 8, 3), C(32, 32, 4, 2)],
                 128: [C(32, 64, 8, 3), C(32, 32, 8, 2)],
                 256: [C(32, 32, 8, 2)]},
        "dq": {32: [C(128, 32, 4, 3), C(128, 64, 8, 3), C(64, 64, 4, 3), C(32, 32, 4, 2)],
               64: [C(128, 64, 8, 3), C(64, 64, 4, 3), C(32, 32, 4, 2)],
               128: [C(128, 32, 8, 3), C(32, 32, 4, 2)],
               256: [C(64, 32, 8, 2), C(32, 32, 4, 2)]},
    },
}
# rowsum(dO * O): a streaming kernel; about 64 elements of each tile per thread
for _fam in CONFIGS.values():
    _fam["pre"] = {32: [C(128, 0, 4, 1)], 64: [C(128, 0, 4, 1)], 128: [C(64, 0, 4, 1)], 256: [C(32, 0, 4, 1)]}
# With dropout every score also carries a Philox-4x32-7 evaluation (4 live words per element),
# so the dropout variants use 8 warps (half the tile elements per thread) or smaller tiles.
DROPOUT_CONFIGS = {
    "sm90": {
        "fwd": {32: [C(128, 64, 8, 3), C(64, 64, 4, 3), C(32, 32, 4, 2)],
                64: [C(128, 64, 8, 3), C(64, 64, 4, 3), C(32, 32, 4, 2)],
                128: [C(64, 64, 8, 3), C(128, 32, 8, 3), C(32, 32, 4, 2)],
                256: [C(32, 32, 4, 2)]},
        "dkdv": {32: [C(32, 128, 8, 3), C(64, 64, 8, 3), C(32, 32, 4, 2)],
                 64: [C(32, 128, 8, 3), C(64, 64, 8, 3), C(32, 64, 4, 3), C(32, 32, 4, 2)],
                 128: [C(32, 64, 8, 3), C(32, 32, 4, 2)],
                 256: [C(32, 32, 8, 2)]},
        "dq": {32: [C(128, 32, 8, 3), C(64, 32, 4, 3), C(64, 64, 8, 3), C(32, 32, 4, 3)],
               64: [C(128, 32, 8, 3), C(64, 32, 4, 3), C(64, 64, 8, 3), C(32, 32, 4, 2)],
               128: [C(128, 32, 8, 3), C(32, 32, 4, 2)],
               256: [C(32, 32, 4, 2)]},
    },
    "sm80": {
        "fwd": {32: [C(128, 64, 8, 3), C(32, 32, 4, 2)],
                64: [C(128, 64, 8, 3), C(32, 32, 4, 2)],
                128: [C(64, 64, 8, 3), C(128, 32, 8, 3), C(32, 32, 4, 2)],
                256: [C(32, 32, 4, 2)]},
        "dkdv": {32: [C(32, 128, 8, 3), C(32, 32, 4, 2)],
                 64: [C(32, 128, 8, 3), C(32, 64, 4, 3), C(32, 32, 4, 2)],
                 128: [C(32, 64, 8, 3), C(32, 32, 4, 2)],
                 256: [C(32, 32, 8, 2)]},
        "dq": {32: [C(128, 32, 8, 3), C(64, 32, 4, 3), C(64, 64, 8, 3), C(32, 32, 4, 2)],
               64: [C(128, 32, 8, 3), C(64, 32, 4, 3), C(64, 64, 8, 3), C(32, 32, 4, 2)],
               128: [C(64, 32, 8, 3), C(32, 32, 4, 2)],
               256: [C(32, 32, 4, 2)]},
    },
}
ARCHS = {"sm90": "sm_90a", "sm80": "sm_80"}  # family -> the architecture its lists are verified for
# Hopper variants of the forward whose loads go through tensor descriptors (TMA), 16-bit only.
# Not the default: the launcher serves them when BERTFAST_ATTN_DESC=1 (or the autotuner, with
# BERTFAST_AUTOTUNE=1, measures them faster) and the tensors meet TMA's 16-byte alignment.
# benchmarks/attention_variants.py times each against the pointer-load configs on a GPU.
DESC_CONFIGS = {
    "sm90": {"fwd": {32: [C(128, 64, 4, 3, True), C(128, 128, 8, 3, True), C(64, 64, 4, 3, True)],
                     64: [C(128, 64, 4, 3, True), C(128, 128, 8, 3, True), C(64, 64, 4, 3, True),
                          C(128, 64, 4, 4, True)],
                     128: [C(128, 64, 8, 3, True), C(128, 128, 8, 2, True), C(64, 64, 4, 3, True)],
                     256: [C(64, 64, 8, 2, True)]}},
}
# fp32 runs its dots as 3xTF32 (three tensor-core products that recover fp32 accuracy), whose
# operand splitting needs about twice the registers of a 16-bit dot: 32 x 32 tiles or smaller.
# fp32 is the accurate path, not the fast one: it compiles without spills at head_dim 64 and 128
# (forward 32, too); the head_dim-32 backward spills 24-32 B and head_dim 256 spills more.
CONFIGS_FP32 = {
    "fwd": {32: [C(32, 32, 4, 2)], 64: [C(32, 32, 4, 2)], 128: [C(32, 32, 8, 2)], 256: [C(16, 16, 4, 1)]},
    "dkdv": {32: [C(32, 32, 4, 2)], 64: [C(32, 32, 4, 2)], 128: [C(16, 16, 4, 1)], 256: [C(16, 16, 4, 1)]},
    "dq": {32: [C(32, 32, 4, 2)], 64: [C(32, 32, 4, 2)], 128: [C(16, 16, 4, 1)], 256: [C(16, 16, 4, 1)]},
    "pre": {32: [C(64, 0, 4, 1)], 64: [C(64, 0, 4, 1)], 128: [C(32, 0, 4, 1)], 256: [C(16, 0, 4, 1)]},
}
# Under TRITON_INTERPRET=1 (CPU tests) small unequal tiles, so short test sequences still cover
# several blocks, the partial last block and the causal diagonal with BLOCK_M != BLOCK_N.
INTERPRET_CONFIGS = {"fwd": Config(16, 32, 4, 1), "dkdv": Config(16, 32, 4, 1), "dq": Config(32, 16, 4, 1),
                     "pre": Config(32, 0, 4, 1)}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


@functools.lru_cache(maxsize=None)
def _family(device_index: int) -> str:
    major, _minor = torch.cuda.get_device_capability(device_index)
    return "sm90" if major in (9, 10) else "sm80"


def device_family(device) -> str:
    """The config family of a device: "sm90" (Hopper, Blackwell datacenter) or "sm80"."""
    if device.type != "cuda":
        return "sm90"
    return _family(device.index if device.index is not None else torch.cuda.current_device())


def candidates(kernel: str, head_dim: int, dtype: torch.dtype, dropout: bool = False, family: str = "sm90",
               desc: bool = False) -> list:
    """Every configuration of `kernel` for this head_dim (padded), dtype, dropout flag and GPU family;
    desc=True: the tensor-descriptor forward variants (an empty list where there are none)."""
    if desc:
        if dtype == torch.float32:
            return []
        return DESC_CONFIGS.get(family, {}).get(kernel, {}).get(_block_d(head_dim), [])
    if dtype == torch.float32:
        return CONFIGS_FP32[kernel][_block_d(head_dim)]
    table = DROPOUT_CONFIGS if dropout and kernel != "pre" else CONFIGS
    return table[family][kernel][_block_d(head_dim)]


def pick_config(kernel: str, head_dim: int, dtype: torch.dtype, max_q: int, max_k: int, dropout: bool = False,
                family: str = "sm90", interpret=None, desc: bool = False) -> Config:
    """The heuristic: the first (tuned default) candidate whose tiles are not larger than the
    sequences they cover, so short sequences do not compute on mostly-empty tiles."""
    if _interpret() if interpret is None else interpret:
        cfg = INTERPRET_CONFIGS[kernel]
        return Config(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, desc) if desc else cfg
    cands = candidates(kernel, head_dim, dtype, dropout, family, desc) or candidates(kernel, head_dim, dtype,
                                                                                       dropout, family)
    lim_m = max(16, triton.next_power_of_2(max(max_q, 1)))
    lim_n = max(16, triton.next_power_of_2(max(max_k, 1)))
    for c in cands:
        if c.block_m <= lim_m and c.block_n <= lim_n:
            return c
    return cands[-1]


_tuned: dict = {}


def _autotune_on() -> bool:
    return os.environ.get("BERTFAST_AUTOTUNE", "0") == "1" and not _interpret()


def _seq_bucket(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


_fast: dict = {}  # kernel -> its FastKernel (cached compiled launches, kernels/_launch.py)


def _launch_one(fn, cfg: Config, grid_of, args_of, constexprs):
    fast = _fast.get(fn)
    if fast is None:
        fast = _fast[fn] = FastKernel(fn)
    meta = dict(constexprs)
    meta["BLOCK_M"] = cfg.block_m
    if "BLOCK_N" in fast.fn.arg_names:
        meta["BLOCK_N"] = cfg.block_n
    if cfg.desc:
        _ensure_allocator()
        meta["DESC"] = True
    # the key: the tile configuration (tensor descriptors or not included), the flags and the dtype
    # of q/k/v/out (each kernel's first argument) decide every constexpr and pointer type (bias,
    # lse and delta are fp32, cu_seqlens int32 or an fp32 placeholder by VARLEN)
    args = args_of(cfg)
    fast(grid_of(cfg), (cfg, args[0].dtype, *constexprs.values()), args, **meta, num_warps=cfg.num_warps,
         num_stages=cfg.num_stages)


_allocator_set = False


def _ensure_allocator():
    """Device-side tensor descriptors live in a small global scratch that Triton asks the host to
    allocate per launch: route that through torch's caching allocator (CUDA-graph safe)."""
    global _allocator_set
    if not _allocator_set:
        def alloc(size: int, alignment: int, stream):
            return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")

        triton.set_allocator(alloc)
        _allocator_set = True


_forced: dict = {}  # kernel -> Config: benchmarks/attention_variants.py times one configuration at a time


def desc_aligned(*tensors) -> bool:
    """TMA's rules for a descriptor over these tensors' rows: 16-byte aligned base and strides."""
    for t in tensors:
        es = t.element_size()
        if t.data_ptr() % 16 or any((st * es) % 16 for st in t.stride()[:-1]) or t.stride(-1) != 1:
            return False
    return True


def _desc_wanted() -> bool:
    return os.environ.get("BERTFAST_ATTN_DESC", "0") == "1"


def _launch(kernel: str, fn, grid_of, args_of, constexprs: dict, head_dim: int, dtype, max_q: int, max_k: int,
            family: str, desc_ok=None):
    """Launch `fn` with the heuristic's configuration or, with BERTFAST_AUTOTUNE=1, the fastest
    candidate for (kernel, head_dim, dtype, sequence-length buckets, constexpr flags), timed once
    on the real arguments and cached (every kernel here overwrites its outputs, so that is safe).
    grid_of(cfg) / args_of(cfg): the grid and the arguments depend on the tile sizes.
    desc_ok: None, or a callable saying whether the tensor-descriptor variants may serve these
    tensors; asked only when they are wanted (BERTFAST_ATTN_DESC=1) or being tuned."""
    cfg = _forced.get(kernel)
    dropout = bool(constexprs.get("DROPOUT", False))
    if cfg is not None:
        _launch_one(fn, cfg, grid_of, args_of, constexprs)
        return
    if _autotune_on():
        key = (kernel, family, _block_d(head_dim), dtype, _seq_bucket(max_q), _seq_bucket(max_k),
               tuple(sorted(constexprs.items())))
        cfg = _tuned.get(key)
        if cfg is None:
            from triton.testing import do_bench

            best = None
            for c in candidates(kernel, head_dim, dtype, dropout, family) + (
                    candidates(kernel, head_dim, dtype, dropout, family, desc=True) if desc_ok and desc_ok() else []):
                try:
                    t = do_bench(lambda c=c: _launch_one(fn, c, grid_of, args_of, constexprs), warmup=5, rep=20)
                except Exception:  # noqa: BLE001 - a candidate that does not fit (shared memory) is skipped
                    continue
                if best is None or t < best[0]:
                    best = (t, c)
            cfg = _tuned[key] = best[1] if best else pick_config(kernel, head_dim, dtype, max_q, max_k, dropout, family)
    if cfg is None:
        desc = desc_ok is not None and _desc_wanted() and desc_ok()
        cfg = pick_config(kernel, head_dim, dtype, max_q, max_k, dropout, family, desc=desc)
        # a GPU of the family with less shared memory per block (sm_86/89/120: ~99 KB) cannot
        # run the biggest tiles: the first launch finds out, later launches reuse the answer
        if _shrunk:
            cfg = _shrunk.get((kernel, family, cfg, dtype, tuple(sorted(constexprs.items()))), cfg)
    try:
        _launch_one(fn, cfg, grid_of, args_of, constexprs)
    except triton.runtime.errors.OutOfResources:
        cands = candidates(kernel, head_dim, dtype, dropout, family, desc=cfg.desc)
        key = (kernel, family, cfg, dtype, tuple(sorted(constexprs.items())))
        for smaller in cands[cands.index(cfg) + 1 if cfg in cands else len(cands):]:
            try:
                _launch_one(fn, smaller, grid_of, args_of, constexprs)
            except triton.runtime.errors.OutOfResources:
                continue
            _shrunk[key] = smaller
            return
        raise


_shrunk: dict = {}


# ---------------------------------------------------------------------------------------------
# launchers (the backend functions)


def _dot_precision(dtype) -> str:
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit operands
    # fp32: fp32-accurate 3xTF32 on tensor cores, or plain TF32 where the user allows it for matmuls
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "tf32x3"


def _unit_last_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t, varlen):
    """(batch, token, head) strides; packed tensors have no batch stride (cu_seqlens locate rows)."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _seeds(p, seed):
    if p <= 0.0:
        return 0, 0, 0, 1.0
    lo, hi = split_seed(int(seed))
    # passed as int32 (the kernel reinterprets them as uint32) so every seed runs the same binary
    lo = lo - (1 << 32) if lo >= (1 << 31) else lo
    hi = hi - (1 << 32) if hi >= (1 << 31) else hi
    threshold, _ = dropout_args(p)
    return lo, hi, threshold, 1.0 / (1.0 - p)


def _common(q, k, v, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed, lse_like):
    """Arguments shared by the forward, dK/dV and dQ kernels."""
    varlen = cu_q is not None
    if varlen:
        B, H = cu_q.numel() - 1, q.shape[1]
        stride_lb, stride_lh = 0, q.shape[0]
    else:
        B, Sq, H = q.shape[0], q.shape[1], q.shape[2]
        stride_lb, stride_lh = H * Sq, Sq
    has_bias = key_bias is not None
    bias = key_bias if has_bias else lse_like  # any valid pointer when unused
    seed_lo, seed_hi, threshold, drop_scale = _seeds(p, seed)
    D, Dv = q.shape[-1], v.shape[-1]
    constexprs = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=_block_d(D), BLOCK_DV=_block_d(Dv), VARLEN=varlen,
                      HAS_BIAS=has_bias, CAUSAL=bool(causal), DROPOUT=p > 0.0, DOT_PREC=_dot_precision(q.dtype))
    return dict(B=B, H=H, varlen=varlen, bias=bias, stride_lb=stride_lb, stride_lh=stride_lh,
                stride_bias=bias.stride(0) if has_bias else 0, cu_q=cu_q if varlen else lse_like,
                cu_k=cu_k if varlen else lse_like, seeds=(seed_lo, seed_hi, threshold, drop_scale),
                constexprs=constexprs, head_dim=max(D, Dv))


def attention_fwd(q, k, v, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed):
    """Forward: (out in q's dtype, lse fp32); see bertfast.ops.attention for the contract."""
    # the kernel reads any token/head/batch strides: views of a fused QKV projection need no copy
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    key_bias = key_bias.float().contiguous() if key_bias is not None else None
    varlen = cu_q is not None
    H = q.shape[-2]
    out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
    lse = torch.empty((H, q.shape[0]) if varlen else (q.shape[0], H, q.shape[1]), dtype=torch.float32,
                      device=q.device)
    if out.numel() == 0:
        return out, lse
    if k.numel() == 0 or max_k == 0:  # no key anywhere: every row is a dead row
        return out.zero_(), lse.fill_(float("inf"))
    if scale < 0:  # the kernel's row-max shortcut needs scale >= 0; (-q).k * |scale| is the same score
        q, scale = -q, -scale
    c = _common(q, k, v, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed, lse)
    B = c["B"]
    head = (q, k, v, out, lse, c["bias"], c["cu_q"], c["cu_k"],
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
            c["stride_lb"], c["stride_lh"], c["stride_bias"], H, max_q, max_k)
    tail = (scale * LOG2E,) + c["seeds"]
    fam = device_family(q.device)
    # the tensor-descriptor variants: Hopper (or the interpreter), 16-bit, TMA-aligned tensors; the
    # alignment is read only when they are asked for, not on every launch
    desc_ok = (lambda: desc_aligned(q, k, v)) if (
        q.dtype != torch.float32 and fam == "sm90" and (q.is_cuda or _interpret())) else None
    _launch("fwd", _attn_fwd, lambda cfg: (triton.cdiv(max_q, cfg.block_m) * B * H,),
            lambda cfg: head + (triton.cdiv(max_q, cfg.block_m),) + tail,
            c["constexprs"], c["head_dim"], q.dtype, max_q, max_k, fam, desc_ok)
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed):
    """Backward: (dq, dk, dv) in the dtypes of q, k, v; deterministic (no atomics)."""
    q, k, v, out, dout = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), dout.contiguous()
    lse = lse.contiguous()
    key_bias = key_bias.float().contiguous() if key_bias is not None else None
    varlen = cu_q is not None
    H = q.shape[-2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0 or max_k == 0 or max_q == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    neg = scale < 0
    if neg:  # as in the forward: run on -q with |scale|; then dq = -(dq of -q), dk is unchanged
        q, scale = -q, -scale
    c = _common(q, k, v, key_bias, cu_q, cu_k, max_q, max_k, p, scale, causal, seed, lse)
    B = c["B"]
    cx = c["constexprs"]
    fam = device_family(q.device)
    delta = torch.empty_like(lse)
    _launch("pre", _attn_bwd_pre, lambda cfg: (triton.cdiv(max_q, cfg.block_m) * B * H,),
            lambda cfg: (out, dout, delta, c["cu_q"], *_strides(out, varlen), *_strides(dout, varlen),
                         c["stride_lb"], c["stride_lh"], H, max_q, triton.cdiv(max_q, cfg.block_m)),
            dict(HEAD_DIM_V=cx["HEAD_DIM_V"], BLOCK_DV=cx["BLOCK_DV"], VARLEN=varlen),
            c["head_dim"], q.dtype, max_q, max_k, fam)
    head = (q, k, v, dout, lse, delta, c["bias"])
    strides = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(dout, varlen),
               c["stride_lb"], c["stride_lh"], c["stride_bias"], H, max_q, max_k)
    tail = (scale * LOG2E, scale) + c["seeds"]
    _launch("dkdv", _attn_bwd_dkdv, lambda cfg: (triton.cdiv(max_k, cfg.block_n) * B * H,),
            lambda cfg: head + (dk, dv, c["cu_q"], c["cu_k"]) + strides + (triton.cdiv(max_k, cfg.block_n),) + tail,
            cx, c["head_dim"], q.dtype, max_q, max_k, fam)
    _launch("dq", _attn_bwd_dq, lambda cfg: (triton.cdiv(max_q, cfg.block_m) * B * H,),
            lambda cfg: head + (dq, c["cu_q"], c["cu_k"]) + strides + (triton.cdiv(max_q, cfg.block_m),) + tail,
            cx, c["head_dim"], q.dtype, max_q, max_k, fam)
    if neg:
        dq = dq.neg_()
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# ahead-of-time compilation (bertfast verify --aot)

_DIV16 = [["tt.divisibility", 16]]
_KERNELS = {"fwd": lambda: _attn_fwd, "pre": lambda: _attn_bwd_pre, "dkdv": lambda: _attn_bwd_dkdv,
            "dq": lambda: _attn_bwd_dq}


def _aot_signature(kernel: str, dt: str) -> tuple:
    """(signature without constexprs, arguments the JIT sees as 16-divisible) of one kernel."""
    i32, f32, ptr = "i32", "fp32", f"*{dt}"
    strides = lambda *names: {f"stride_{n}{a}": i32 for n in names for a in "bsh"}  # noqa: E731
    if kernel == "pre":
        sig = {"Out": ptr, "DO": ptr, "Delta": "*fp32", "CU_Q": "*i32", **strides("o", "d"),
               "stride_lb": i32, "stride_lh": i32, "H": i32, "max_q": i32, "n_mblocks": i32}
    else:
        if kernel == "fwd":
            sig = {"Q": ptr, "K": ptr, "V": ptr, "Out": ptr, "Lse": "*fp32", "KeyBias": "*fp32"}
        elif kernel == "dkdv":
            sig = {"Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "Lse": "*fp32", "Delta": "*fp32", "KeyBias": "*fp32",
                   "DK": ptr, "DV": ptr}
        else:
            sig = {"Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "Lse": "*fp32", "Delta": "*fp32", "KeyBias": "*fp32",
                   "DQ": ptr}
        sig.update({"CU_Q": "*i32", "CU_K": "*i32"})
        sig.update(strides("q", "k", "v", "o" if kernel == "fwd" else "d"))
        sig.update({"stride_lb": i32, "stride_lh": i32, "stride_biasb": i32, "H": i32, "max_q": i32, "max_k": i32,
                    ("n_nblocks" if kernel == "dkdv" else "n_mblocks"): i32, "qk_scale": f32})
        if kernel != "fwd":
            sig["sm_scale"] = f32
        sig.update({"seed_lo": i32, "seed_hi": i32, "drop_threshold": i32, "drop_scale": f32})
    # pointers come from the caching allocator; token/head strides are multiples of head_dim
    div16 = [n for n, t in sig.items()
             if t.startswith("*") or (n.startswith("stride_") and n not in ("stride_lb", "stride_lh", "stride_biasb"))]
    return sig, div16


def aot_spec(kernel: str, cfg: Config, dt: str, head_dim: int, varlen=False, has_bias=True, causal=False,
             dropout=True, head_dim_v=None, family=None) -> dict:
    """One entry of aot_specs(): enough for triton.compile(ASTSource(fn, signature, constexprs, attrs),
    target=GPUTarget('cuda', cc, 32), options={'num_warps', 'num_stages'})."""
    fn = _KERNELS[kernel]()
    dv = head_dim if head_dim_v is None else head_dim_v
    sig, div16 = _aot_signature(kernel, dt)
    if kernel == "pre":
        cx = {"HEAD_DIM_V": dv, "BLOCK_DV": _block_d(dv), "BLOCK_M": cfg.block_m, "VARLEN": varlen}
    else:
        cx = {"HEAD_DIM": head_dim, "HEAD_DIM_V": dv, "BLOCK_D": _block_d(head_dim), "BLOCK_DV": _block_d(dv),
              "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "VARLEN": varlen, "HAS_BIAS": has_bias,
              "CAUSAL": causal, "DROPOUT": dropout, "DOT_PREC": "tf32x3" if dt == "fp32" else "tf32"}
        if kernel == "fwd":
            cx["DESC"] = cfg.desc
    assert set(sig) | set(cx) == set(fn.arg_names), (kernel, set(fn.arg_names) ^ (set(sig) | set(cx)))
    full_sig = {n: (sig[n] if n in sig else "constexpr") for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): _DIV16 for n in div16}
    flags = "" if kernel == "pre" else (f" varlen={int(varlen)} bias={int(has_bias)} causal={int(causal)} "
                                        f"dropout={int(dropout)}")
    config = (f"{dt} d={head_dim}{'' if dv == head_dim else f'/{dv}'} BLOCK_M={cfg.block_m}"
              f"{'' if kernel == 'pre' else f' BLOCK_N={cfg.block_n}'} warps={cfg.num_warps} "
              f"stages={cfg.num_stages}{' tma' if cfg.desc else ''}{flags}")
    spec = {"kernel": fn.__name__, "fn": fn, "signature": full_sig, "constexprs": cx, "attrs": attrs,
            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "config": config}
    if family is not None:  # the lists of a GPU family are launched (and verified) on its architecture only
        spec["config"] = f"[{family}] " + config
        spec["archs"] = [ARCHS[family]]
    return spec


def aot_specs(full: bool = False) -> list:
    """Every (kernel, configuration) the launchers can choose: the CONFIGS lists of each GPU family
    and padded head_dim in bf16 with key bias, and the DROPOUT_CONFIGS lists with dropout on as
    well. Each entry's "archs" names the architecture its family's lists are for (a launch on an
    sm_80 GPU never uses the sm_90 lists): compiling it for another architecture proves little.
    full=True adds fp16, the fp32 lists, the varlen/causal/no-dropout variants and a head_dim that
    is padded in-kernel (80 -> 128)."""
    specs = []
    for family in CONFIGS:
        for kernel in ("fwd", "dkdv", "dq", "pre"):
            for dropout, table in ((False, CONFIGS), (True, DROPOUT_CONFIGS)):
                for d, cfgs in table[family].get(kernel, {}).items():
                    if dropout and kernel == "pre":
                        continue
                    for cfg in cfgs:
                        for dt in (("bf16", "fp16") if full else ("bf16",)):
                            specs.append(aot_spec(kernel, cfg, dt, d, dropout=dropout, family=family))
            for d, cfgs in DESC_CONFIGS.get(family, {}).get(kernel, {}).items():
                for cfg in cfgs:  # TMA variants: no dropout (the serving case they are for)
                    specs.append(aot_spec(kernel, cfg, "bf16", d, dropout=False, family=family))
                    if full:
                        specs.append(aot_spec(kernel, cfg, "bf16", d, varlen=True, has_bias=False, dropout=False,
                                              family=family))
            if full:
                cfg = CONFIGS[family][kernel][64][0]
                specs.append(aot_spec(kernel, cfg, "bf16", 64, varlen=True, has_bias=False, causal=True, dropout=False,
                                      family=family))
                specs.append(aot_spec(kernel, cfg, "fp16", 64, varlen=False, has_bias=True, causal=True,
                                      dropout=False, family=family))
                specs.append(aot_spec(kernel, CONFIGS[family][kernel][128][0], "bf16", 80, head_dim_v=80,
                                      dropout=False, family=family))
    if full:
        for kernel in ("fwd", "dkdv", "dq", "pre"):
            for d, cfgs in CONFIGS_FP32[kernel].items():
                for cfg in cfgs:
                    specs.append(aot_spec(kernel, cfg, "fp32", d, dropout=False))
    return specs
