"""embedding_layernorm: LN(word[ids] + type[token_type_ids] + pos[position_ids]), then dropout.

BERT's embedding layer in one pass: three row gathers, the sum (in Hugging Face's order:
word + token type, then + position), LayerNorm with fp32 statistics, dropout. ids may have
any shape (padded (batch, seq) or packed (total_tokens,)); the output is ids.shape + (hidden,).
Backward scatters into the three tables; repeated ids accumulate.

Dropout: output element (row r, column c) has offset r * hidden + c in the shared Philox
stream (ops/_rng.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch
from ._common import rows_call, rows_typical
from ._common import (
    FusedOp,
    can_sync,
    check_dropout,
    check_eps,
    check_float,
    check_same_device,
    check_vector,
    compare_close,
    layernorm_bwd_fp32,
    layernorm_fp32,
    seed_int,
    stats_fake,
)
from ._common import (
    stat_dtype as _stat,
)
from ._rng import dropout_scale_mask

OP = "embedding_layernorm"
_IDS = (torch.int32, torch.int64)


def _embedding_layernorm_stats(input_ids, token_type_ids, position_ids, word_emb, pos_emb, type_emb, weight,
                               bias, eps, dropout_p=0.0, seed=0):
    acc = torch.float64 if word_emb.dtype == torch.float64 else torch.float32
    h = word_emb[input_ids].to(acc) + type_emb[token_type_ids].to(acc)
    h = h + pos_emb[position_ids].to(acc)
    y, mean, rstd = layernorm_fp32(h, weight, bias, eps)
    if dropout_p > 0.0:
        y = y * dropout_scale_mask(seed, dropout_p, y.shape, y.device).to(acc)
    return y.to(word_emb.dtype), mean.to(_stat(acc)), rstd.to(_stat(acc))


def embedding_layernorm_ref(input_ids, token_type_ids, position_ids, word_emb, pos_emb, type_emb, weight, bias,
                            eps=1e-12, dropout_p=0.0, seed=0):
    """Plain PyTorch: the fallback and the test oracle."""
    return _embedding_layernorm_stats(input_ids, token_type_ids, position_ids, word_emb, pos_emb, type_emb,
                                      weight, bias, eps, dropout_p, seed)[0]


# ---- backends (1-D ids of one length N, contiguous tables):
# fwd(ids, tt_ids, pos_ids, word, pos, type, weight, bias, eps, p, seed) -> (out (N, hidden), mean, rstd)
# bwd(dout, ids, tt_ids, pos_ids, word, pos, type, weight, bias, mean, rstd, eps, p, seed)
#     -> (dword, dpos, dtype, dweight, dbias)

def host_id_check(ids, tt, pos, word, pos_emb, type_emb) -> None:
    """IndexError for an id outside its table, for host tensors, where a backend runs: also under
    torch.compile, where the public function cannot read the ids (python indexing would wrap -1)."""
    if ids.device.type != "cpu":
        return
    for name, t, table, table_name in (("input_ids", ids, word, "word_emb"), ("token_type_ids", tt, type_emb,
                                       "type_emb"), ("position_ids", pos, pos_emb, "pos_emb")):
        if t.numel():
            lo, hi = torch.aminmax(t)
            err = id_range_error(name, int(lo), int(hi), table.shape[0], table_name)
            if err is not None:
                raise err


def _fwd_reference(ids, tt, pos, word, pos_emb, type_emb, weight, bias, eps, p, seed):
    return _embedding_layernorm_stats(ids, tt, pos, word, pos_emb, type_emb, weight, bias, eps, p, seed)


def _bwd_reference(dout, ids, tt, pos, word, pos_emb, type_emb, weight, bias, mean, rstd, eps, p, seed):
    acc = torch.float64 if word.dtype == torch.float64 else torch.float32
    h = word[ids].to(acc) + type_emb[tt].to(acc) + pos_emb[pos].to(acc)
    dy = dout.to(acc)
    if p > 0.0:
        dy = dy * dropout_scale_mask(seed, p, dy.shape, dy.device).to(acc)
    dh, dw, db = layernorm_bwd_fp32(dy, h, weight, mean, rstd)
    grads = [torch.zeros(t.shape, dtype=acc, device=t.device).index_add_(0, i.long(), dh).to(t.dtype)
             for t, i in ((word, ids), (pos_emb, pos), (type_emb, tt))]
    return (*grads, dw.to(weight.dtype), db.to(bias.dtype))


def _probe(device):
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([1, 5, 5, 0, 9], device=device)
    tt = torch.tensor([0, 1, 1, 0, 1], device=device)
    pos = torch.tensor([0, 1, 2, 3, 4], device=device)
    word = torch.randn(11, 17, generator=g).to(device)
    pe = torch.randn(8, 17, generator=g).to(device)
    te = torch.randn(2, 17, generator=g).to(device)
    w, b = torch.randn(2, 17, generator=g).to(device).unbind(0)
    return (ids, tt, pos, word, pe, te, w, b, 1e-12, 0.0, 0), {}


dispatch.register_op(OP, reference=(_fwd_reference, _bwd_reference), make_probe=_probe,
                     compare=compare_close(1e-4, 1e-4), typical=rows_typical())
# its other implementations (C++ CPU, Triton, CUDA C++) and what they serve: bertfast/dispatch/table.py


# ---- registered op

_CALL = rows_call(3, 4)  # word_emb: argument 3 of a forward, 4 of a backward

def _fwd(ids, tt, pos, word, pos_emb, type_emb, weight, bias, eps, p, seed):
    sel = _op.kernel("fwd", (ids, tt, pos, word))
    if sel.backend != "cpp":  # the C++ kernels check their ids themselves
        host_id_check(ids, tt, pos, word, pos_emb, type_emb)
    return sel.fwd(ids, tt, pos, word, pos_emb, type_emb, weight, bias, eps, p, seed_int(seed))


def _bwd(dout, ids, tt, pos, word, pos_emb, type_emb, weight, bias, mean, rstd, eps, p, seed):
    return _op.kernel("bwd", (dout, ids, tt, pos, word)).bwd(dout, ids, tt, pos, word, pos_emb, type_emb, weight,
                                                              bias, mean, rstd, eps, p, seed_int(seed))


def _setup(ctx, inputs, output):
    ids, tt, pos, word, pos_emb, type_emb, weight, bias, eps, p, seed = inputs
    ctx.save_for_backward(ids, tt, pos, word, pos_emb, type_emb, weight, bias, output[1], output[2], seed)
    ctx.eps, ctx.p = eps, p


def _backward(ctx, grads, bwd):
    ids, tt, pos, word, pos_emb, type_emb, weight, bias, mean, rstd, seed = ctx.saved_tensors
    dword, dpos, dtype, dw, db = bwd(grads[0].contiguous(), ids, tt, pos, word, pos_emb, type_emb, weight, bias,
                                     mean, rstd, ctx.eps, ctx.p, seed)
    return None, None, None, dword, dpos, dtype, dw, db, None, None, None


_op = FusedOp(
    OP,
    fwd_schema="(Tensor ids, Tensor tt, Tensor pos, Tensor word, Tensor pos_emb, Tensor type_emb, Tensor weight, "
               "Tensor bias, float eps, float p, Tensor? seed) -> (Tensor, Tensor, Tensor)",
    bwd_schema="(Tensor dout, Tensor ids, Tensor tt, Tensor pos, Tensor word, Tensor pos_emb, Tensor type_emb, "
               "Tensor weight, Tensor bias, Tensor mean, Tensor rstd, float eps, float p, Tensor? seed) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    fwd_fake=lambda ids, tt, pos, word, *rest: (word.new_empty((ids.shape[0], word.shape[1])),
                                               *stats_fake(word, ids.shape[:1])),
    bwd_fake=lambda dout, ids, tt, pos, word, pe, te, w, b, *rest: (
        torch.empty_like(word), torch.empty_like(pe), torch.empty_like(te), torch.empty_like(w), torch.empty_like(b)),
    call_of=_CALL, fwd_impl=_fwd, bwd_impl=_bwd, setup_context=_setup, backward=_backward, n_nondiff_outputs=2,
    has_seed=True,
)


def _check_ids(name: str, ids, table: torch.Tensor, table_name: str, shape) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32/int64 ids, got {type(ids).__name__}")
    if ids.dtype not in _IDS:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {ids.dtype}")
    if tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of input_ids {tuple(shape)}, got {tuple(ids.shape)}")
    if ids.device != table.device:
        raise ValueError(f"{name} is on {ids.device} but {table_name} is on {table.device}; expected the same device")


def _check_ranges(checks) -> None:
    """Every id inside its table (a kernel must never read out of bounds): one host sync for
    all the id tensors together, details only when something is wrong."""
    checks = [c for c in checks if c[1].numel()]
    if not checks:
        return
    if not can_sync():
        # torch.compile / CUDA-graph capture: nothing can be read back. Host tensors are checked
        # where the op runs (the C++ kernels and the reference raise IndexError); device ids are
        # asserted in the graph, and the Triton kernels clamp them so no read leaves a table.
        for name, ids, table, table_name in checks:
            if ids.device.type != "cpu":
                torch._assert_async(((ids >= 0) & (ids < table.shape[0])).all(),
                                    f"{name} must be in [0, {table.shape[0]}) ({table_name} rows)")
        return
    bad = torch.stack([((ids < 0) | (ids >= table.shape[0])).any() for _, ids, table, _ in checks])
    if not bool(bad.any()):
        return
    for (name, ids, table, table_name), b in zip(checks, bad.tolist()):
        if b:
            raise id_range_error(name, int(ids.min()), int(ids.max()), table.shape[0], table_name)


def id_range_error(name: str, lo: int, hi: int, rows: int, table_name: str) -> Optional[IndexError]:
    """The error for ids spanning [lo, hi] against a table of `rows` rows, or None when they fit."""
    if 0 <= lo and hi < rows:
        return None
    return IndexError(f"{name} must be in [0, {rows}) ({table_name} has {rows} rows), got {lo if lo < 0 else hi}")


def embedding_layernorm(input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor],
                        position_ids: Optional[torch.Tensor], word_emb: torch.Tensor, pos_emb: torch.Tensor,
                        type_emb: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-12,
                        dropout_p: float = 0.0) -> torch.Tensor:
    """BERT embeddings: LN(word_emb[input_ids] + type_emb[token_type_ids] + pos_emb[position_ids]), dropout.

    input_ids: int tensor of any shape (..., seq); token_type_ids defaults to zeros and
    position_ids to arange(seq) along the last dimension. Returns input_ids.shape + (hidden,)
    in the tables' dtype. Every id is checked against its table (one host read for all three).
    """
    return embedding_layernorm_prechecked(input_ids, token_type_ids, position_ids, word_emb, pos_emb, type_emb, weight,
                                          bias, eps, dropout_p)


def embedding_layernorm_prechecked(input_ids, token_type_ids, position_ids, word_emb, pos_emb, type_emb, weight, bias,
                                   eps=1e-12, dropout_p=0.0, ranges_checked: bool = False):
    """embedding_layernorm; ranges_checked=True skips reading the ids back to check their range,
    for BertModel, which checked them already in the one host read of its forward (shapes,
    dtypes and devices are still checked here)."""
    check_float("word_emb", word_emb, ndim=2)
    hidden = word_emb.shape[1]
    for name, t in (("word_emb", word_emb), ("pos_emb", pos_emb), ("type_emb", type_emb)):
        check_float(name, t, ndim=2)
        if t.shape[0] == 0:
            raise ValueError(f"{name} must have at least one row, got shape {tuple(t.shape)}")
        if t.shape[1] != hidden or t.dtype != word_emb.dtype:
            raise ValueError(f"{name} must be (rows, {hidden}) in {word_emb.dtype} like word_emb, "
                             f"got {tuple(t.shape)} {t.dtype}")
    check_vector("weight", weight, hidden)
    check_vector("bias", bias, hidden)
    check_same_device("word_emb", word_emb, pos_emb=pos_emb, type_emb=type_emb, weight=weight, bias=bias)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in _IDS:
        got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids must be an int32 or int64 tensor, got {got}")
    if input_ids.dim() == 0:
        raise ValueError("input_ids must have at least 1 dimension, got a scalar")
    shape = tuple(input_ids.shape)
    checks = [("input_ids", input_ids, word_emb, "word_emb")]
    if position_ids is None:
        if shape[-1] > pos_emb.shape[0]:
            raise ValueError(f"input_ids has sequence length {shape[-1]} but the position table (pos_emb) has "
                             f"{pos_emb.shape[0]} rows (max_position_embeddings)")
        position_ids = torch.arange(shape[-1], device=input_ids.device, dtype=input_ids.dtype).expand(shape)
    else:
        checks.append(("position_ids", position_ids, pos_emb, "pos_emb"))
    if token_type_ids is None:
        token_type_ids = torch.zeros(shape, device=input_ids.device, dtype=input_ids.dtype)
    else:
        checks.append(("token_type_ids", token_type_ids, type_emb, "type_emb"))
    for name, ids, table, table_name in checks:
        _check_ids(name, ids, table, table_name, shape)
    if not ranges_checked:
        _check_ranges(checks)
    eps, p = check_eps(eps), check_dropout(dropout_p)
    if input_ids.numel() == 0:
        return word_emb.new_empty(shape + (hidden,))
    out = _op(p, input_ids.reshape(-1).contiguous(), token_type_ids.reshape(-1).contiguous(),
              position_ids.reshape(-1).contiguous(), word_emb.contiguous(), pos_emb.contiguous(),
              type_emb.contiguous(), weight.contiguous(), bias.contiguous(), eps, p, None)[0]
    return out.view(shape + (hidden,))
