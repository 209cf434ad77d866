"""Unpad / pad at the encoder boundary.

The encoder runs on packed tokens: the valid tokens of every sequence, one after the other,
shape (total_tokens, ...), with int32 `cu_seqlens` (batch + 1,) marking where each sequence
starts. `unpad_mask` computes the layout once per batch; `unpad_input` gathers rows and
`pad_input` scatters them back (zeros at padded positions). Both use index_select /
index_copy on precomputed indices (no boolean-mask indexing in the hot path) and are
differentiable.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class PackedLayout(NamedTuple):
    indices: torch.Tensor  # int64 (total,): flat positions b * seqlen + s of the valid tokens
    cu_seqlens: torch.Tensor  # int32 (batch + 1,)
    max_seqlen: int
    batch: int
    seqlen: int


def unpad_mask(attention_mask: torch.Tensor, total: Optional[int] = None,
               max_seqlen: Optional[int] = None) -> PackedLayout:
    """Packed layout of a (batch, seqlen) mask (nonzero = valid token).

    Reads the valid-token count and the longest row back to the host (one sync each); a
    caller that already has both (BertModel reads them together with its input checks in
    one transfer) passes them as `total` and `max_seqlen`, and then nothing is read back:
    on a GPU every host read drains the queue of launched kernels."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seqlen), got shape {tuple(attention_mask.shape)}")
    keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    batch, seqlen = keep.shape
    # given counts are trusted (checking them would need the host read they save), but they
    # must at least be possible for this mask's shape
    if total is not None and not 0 <= int(total) <= batch * seqlen:
        raise ValueError(f"total must be the number of valid tokens, in [0, {batch * seqlen}], got {total}")
    if max_seqlen is not None and not 0 <= int(max_seqlen) <= seqlen:
        raise ValueError(f"max_seqlen must be the longest row's length, in [0, {seqlen}], got {max_seqlen}")
    lens = keep.sum(dim=1, dtype=torch.int32)
    flat = keep.reshape(-1)
    if total is None:
        indices = torch.nonzero(flat, as_tuple=False).reshape(-1)
    else:  # the output size is known: no host read for it
        indices = torch.nonzero_static(flat, size=int(total)).reshape(-1)
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=keep.device)
    torch.cumsum(lens, dim=0, dtype=torch.int32, out=cu[1:])
    if max_seqlen is None:
        max_seqlen = int(lens.max().item()) if batch else 0
    return PackedLayout(indices, cu, int(max_seqlen), batch, seqlen)


def unpad_input(hidden: torch.Tensor, attention_mask: torch.Tensor):
    """(batch, seqlen, ...) -> (packed (total, ...), indices, cu_seqlens, max_seqlen)."""
    if hidden.shape[:2] != attention_mask.shape:
        raise ValueError(f"attention_mask must have shape {tuple(hidden.shape[:2])} (the first two dims of hidden), "
                         f"got {tuple(attention_mask.shape)}")
    layout = unpad_mask(attention_mask)
    packed = hidden.reshape(-1, *hidden.shape[2:]).index_select(0, layout.indices)
    return packed, layout.indices, layout.cu_seqlens, layout.max_seqlen


def pad_input(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """(total, ...) -> (batch, seqlen, ...) with zeros at the positions not in `indices`."""
    if packed.shape[0] != indices.shape[0]:
        raise ValueError(f"packed has {packed.shape[0]} rows but indices has {indices.shape[0]}; expected equal")
    out = packed.new_zeros((batch * seqlen, *packed.shape[1:]))
    return out.index_copy(0, indices, packed).view(batch, seqlen, *packed.shape[1:])
