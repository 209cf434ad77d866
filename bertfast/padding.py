"""Unpad / pad at the encoder boundary.

The encoder runs on packed tokens: the valid tokens of every sequence, one after the other,
shape (total_tokens, ...), with int32 `cu_seqlens` (batch + 1,) marking where each sequence
starts. `unpad_mask` computes the layout once per batch; `unpad_input` gathers rows and
`pad_input` scatters them back (zeros at padded positions). Both use index_select /
index_copy on precomputed indices (no boolean-mask indexing in the hot path) and are
differentiable.

A PackedLayout is trusted by `ops.attention` without reading its offsets back (no host sync
per layer), so no public path may build a wrong one: `unpad_mask` derives it from the mask
(given counts are checked against the mask), a layout built by hand is checked when it is
built, and a layout whose tensors were modified in place afterwards is refused.
"""
from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple, Optional

import numpy as np
import torch


_NO_HOST_READS = threading.local()


@contextlib.contextmanager
def no_host_reads():
    """Run as under CUDA-graph capture: can_sync() is False inside, so a model takes exactly the
    path a capture records (the public ops, no read-backs). bertfast.graphs warms its graphs up
    this way, so every kernel a capture launches is compiled (and specialised) before it."""
    before = getattr(_NO_HOST_READS, "on", False)
    _NO_HOST_READS.on = True
    try:
        yield
    finally:
        _NO_HOST_READS.on = before


def can_sync() -> bool:
    """Whether values may be read back to the host: not while torch.compile traces (it would
    break the graph), nor while a CUDA graph is being captured (or warmed up for one:
    no_host_reads)."""
    if torch.compiler.is_compiling():
        return False
    if getattr(_NO_HOST_READS, "on", False):
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def offsets_error(name: str, cu, total: int, max_len: Optional[int]) -> Optional[str]:
    """Why host offsets `cu` (a sequence of ints: cu[0] = 0, non-decreasing, cu[-1] = total,
    every length <= max_len) do not describe `total` packed tokens; None when they do."""
    cu = np.asarray(cu, dtype=np.int64)
    if cu.ndim != 1 or cu.size < 2:
        return f"{name} must hold batch + 1 >= 2 offsets, got {cu.size}"
    if cu[0] != 0:
        return f"{name} must start at 0, got {int(cu[0])}"
    lens = np.diff(cu)
    if lens.size and lens.min() < 0:
        i = int(np.argmin(lens))
        return f"{name} must be non-decreasing, got {int(cu[i])} then {int(cu[i + 1])} at positions {i}, {i + 1}"
    if cu[-1] != total:
        return f"{name} must end at the number of packed tokens ({total}), got {int(cu[-1])}"
    if max_len is not None and lens.size and lens.max() > max_len:
        i = int(np.argmax(lens))
        return (f"max_seqlen ({max_len}) must cover the longest sequence of {name}: sequence {i} has "
                f"{int(lens[i])} tokens")
    return None


def offsets_summary(cu: torch.Tensor) -> torch.Tensor:
    """(first, last, shortest length, longest length) of device offsets as one int64 tensor: what
    offsets_error needs, read back in one transfer."""
    if cu.numel() < 2:  # an empty batch: no lengths
        return torch.stack([cu[0], cu[0], cu[0] * 0, cu[0] * 0]).long()
    lens = cu[1:] - cu[:-1]
    return torch.stack([cu[0], cu[-1], lens.min(), lens.max()]).long()


def summary_error(name: str, summary, total: int, max_len: Optional[int]) -> Optional[str]:
    """offsets_error on the (first, last, shortest, longest) of offsets_summary."""
    first, last, shortest, longest = (int(v) for v in summary)
    if first != 0:
        return f"{name} must start at 0, got {first}"
    if shortest < 0:
        return f"{name} must be non-decreasing, got a sequence of length {shortest}"
    if last != total:
        return f"{name} must end at the number of packed tokens ({total}), got {last}"
    if max_len is not None and longest > max_len:
        return f"max_seqlen ({max_len}) must cover the longest sequence of {name}, which has {longest} tokens"
    return None


def clamp_offsets(cu: torch.Tensor, total: int, max_len: Optional[int] = None) -> torch.Tensor:
    """Offsets made safe on the device without reading them (torch.compile, CUDA-graph capture):
    starting at 0, non-decreasing, inside [0, total] and, given max_len, no sequence longer, so no
    kernel reads or writes outside the packed tokens or its blocks. Offsets that were wrong give
    unspecified values, never memory errors; right ones are returned unchanged."""
    safe = torch.cummax(cu.clamp(0, total), 0).values
    lens = safe[1:] - torch.cat([safe.new_zeros(1), safe[1:-1]])
    if max_len is not None:
        lens = lens.clamp(max=max_len)
    return torch.cat([safe.new_zeros(1), torch.cumsum(lens, 0)]).to(torch.int32)


class _LayoutFields(NamedTuple):
    indices: torch.Tensor  # int64 (total,): flat positions b * seqlen + s of the valid tokens
    cu_seqlens: torch.Tensor  # int32 (batch + 1,)
    max_seqlen: int
    batch: int
    seqlen: int


def _version(t: torch.Tensor):
    return None if t.is_inference() else t._version  # inference tensors keep no version counter


class PackedLayout(_LayoutFields):
    """The packed layout of a batch (see unpad_mask). Built by hand, e.g.
    PackedLayout(indices, cu_seqlens, max_seqlen, batch, seqlen), it is checked at once (one host
    read for device tensors); `ops.attention` then trusts it for as long as its tensors are not
    modified in place."""

    def __new__(cls, indices, cu_seqlens, max_seqlen, batch, seqlen):
        batch, seqlen = _count("batch", batch), _count("seqlen", seqlen)
        max_seqlen = _count("max_seqlen", max_seqlen)
        if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64 or indices.dim() != 1:
            raise TypeError(f"indices must be a 1-D int64 tensor, got {getattr(indices, 'dtype', type(indices))}")
        if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32
                or tuple(cu_seqlens.shape) != (batch + 1,)):
            got = f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens))} {tuple(getattr(cu_seqlens, 'shape', ()))}"
            raise TypeError(f"cu_seqlens must be an int32 tensor of shape (batch + 1,) = ({batch + 1},), got {got}")
        if cu_seqlens.device != indices.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but indices is on {indices.device}")
        total = indices.numel()
        if total > batch * seqlen:
            raise ValueError(f"indices holds {total} tokens, more than batch * seqlen = {batch * seqlen}")
        if cu_seqlens.device.type == "cpu" or can_sync():
            summary = offsets_summary(cu_seqlens)
            if total:
                lo, hi = torch.aminmax(indices)
                summary = torch.cat([summary, torch.stack([lo, hi])])
            host = summary.tolist()  # one read for the offsets and the index range
            err = summary_error("cu_seqlens", host[:4], total, max_seqlen)
            if err is None and total and not (0 <= host[4] and host[5] < batch * seqlen):
                err = f"indices must be in [0, batch * seqlen = {batch * seqlen}), got {host[4]} .. {host[5]}"
            if err is not None:
                raise ValueError(err)
        else:  # CUDA-graph capture / torch.compile: made safe on the device, not read
            cu_seqlens = clamp_offsets(cu_seqlens, total)
            indices = indices.clamp(0, max(batch * seqlen - 1, 0))
        return cls._trusted(indices, cu_seqlens, max_seqlen, batch, seqlen)

    @classmethod
    def _trusted(cls, indices, cu_seqlens, max_seqlen, batch, seqlen) -> "PackedLayout":
        """A layout right by construction (unpad_mask's), not checked."""
        self = tuple.__new__(cls, (indices, cu_seqlens, int(max_seqlen), int(batch), int(seqlen)))
        self._versions = (_version(indices), _version(cu_seqlens))
        return self

    def is_intact(self) -> bool:
        """Whether this layout was built (and checked) by bertfast and its tensors were not
        modified in place since. A tuple rebuilt by _replace/_make is not."""
        versions = self.__dict__.get("_versions")
        return versions is not None and versions == (_version(self.indices), _version(self.cu_seqlens))


def _count(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be a non-negative int, got {type(v).__name__} {v!r}")
    if v < 0:
        raise ValueError(f"{name} must be a non-negative int, got {v}")
    return int(v)


def _check_mask(attention_mask) -> torch.Tensor:
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seqlen), got shape {tuple(attention_mask.shape)}")
    if attention_mask.is_complex():
        raise TypeError(f"attention_mask must be bool, integer or float, got {attention_mask.dtype}")
    return attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0


def unpad_mask(attention_mask: torch.Tensor, total: Optional[int] = None,
               max_seqlen: Optional[int] = None) -> PackedLayout:
    """Packed layout of a (batch, seqlen) mask (nonzero = valid token).

    Reads the valid-token count and the longest row back to the host in one transfer. Given
    `total` / `max_seqlen` are checked against them (a wrong count would make the kernels read
    outside the packed tokens); under torch.compile or CUDA-graph capture, where nothing can be
    read back, both are required and the layout is clamped on the device to stay inside them.
    BertModel reads both together with its input checks and builds its layout from them."""
    keep = _check_mask(attention_mask)
    batch, seqlen = keep.shape
    if total is not None:
        total = _count("total", total)
        if total > batch * seqlen:
            raise ValueError(f"total must be the number of valid tokens, in [0, {batch * seqlen}], got {total}")
    if max_seqlen is not None:
        max_seqlen = _count("max_seqlen", max_seqlen)
        if max_seqlen > seqlen:
            raise ValueError(f"max_seqlen must be the longest row's length, in [0, {seqlen}], got {max_seqlen}")
    lens = keep.sum(dim=1, dtype=torch.int32)
    if not can_sync():
        if total is None or max_seqlen is None:
            raise ValueError("unpad_mask needs total and max_seqlen under torch.compile or CUDA-graph capture "
                             "(nothing can be read back there)")
        return _layout_clamped(keep, lens, total, max_seqlen)
    if batch == 0:
        actual_total, actual_max = 0, 0
    else:
        actual_total, actual_max = torch.stack([lens.sum(), lens.max()]).tolist()
    if total is not None and total != actual_total:
        raise ValueError(f"total ({total}) must be the number of valid tokens of attention_mask ({actual_total})")
    if max_seqlen is not None and max_seqlen != actual_max:
        raise ValueError(f"max_seqlen ({max_seqlen}) must be the longest row of attention_mask ({actual_max})")
    return layout_of(keep, actual_total, actual_max, lens)


def layout_of(keep: torch.Tensor, total: int, max_seqlen: int, lens: Optional[torch.Tensor] = None) -> PackedLayout:
    """The layout of a bool (batch, seqlen) mask whose valid-token count and longest row are
    `total` and `max_seqlen`, without reading anything back: the caller computed both from this
    very mask (BertModel, in the one read of its forward; unpad_mask)."""
    batch = keep.shape[0]
    if lens is None:
        lens = keep.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero_static(keep.reshape(-1), size=total).reshape(-1)
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=keep.device)
    torch.cumsum(lens, dim=0, dtype=torch.int32, out=cu[1:])
    return PackedLayout._trusted(indices, cu, max_seqlen, batch, keep.shape[1])


def packed_layout(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> PackedLayout:
    """The layout of `total` tokens already packed one after the other (one row of `total`, so the
    indices are 0 .. total - 1) into the sequences of int32 `cu_seqlens`, not checked: the caller
    checked the offsets, or clamped them into the tokens (BertModel.forward_packed)."""
    indices = torch.arange(total, device=cu_seqlens.device)
    return PackedLayout._trusted(indices, cu_seqlens, max_seqlen, cu_seqlens.shape[0] - 1, total)


def _layout_clamped(keep, lens, total, max_seqlen) -> PackedLayout:
    """layout_of for counts that could not be checked: indices padded with a valid position and
    lengths clamped to max_seqlen and to total, so the layout stays inside the packed tokens."""
    batch, seqlen = keep.shape
    indices = torch.nonzero_static(keep.reshape(-1), size=total, fill_value=0).reshape(-1)
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=keep.device)
    torch.cumsum(lens.clamp(max=max_seqlen), dim=0, dtype=torch.int32, out=cu[1:])
    return PackedLayout._trusted(indices, cu.clamp(max=total), max_seqlen, batch, seqlen)


def unpad_input(hidden: torch.Tensor, attention_mask: torch.Tensor):
    """(batch, seqlen, ...) -> (packed (total, ...), indices, cu_seqlens, max_seqlen)."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        raise ValueError(f"hidden must be a (batch, seqlen, ...) tensor, got {getattr(hidden, 'shape', hidden)!r}")
    _check_mask(attention_mask)
    if hidden.shape[:2] != attention_mask.shape:
        raise ValueError(f"attention_mask must have shape {tuple(hidden.shape[:2])} (the first two dims of hidden), "
                         f"got {tuple(attention_mask.shape)}")
    layout = unpad_mask(attention_mask)
    packed = hidden.reshape(-1, *hidden.shape[2:]).index_select(0, layout.indices)
    return packed, layout.indices, layout.cu_seqlens, layout.max_seqlen


def pad_input(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """(total, ...) -> (batch, seqlen, ...) with zeros at the positions not in `indices`
    (each in [0, batch * seqlen): index_copy checks them)."""
    batch, seqlen = _count("batch", batch), _count("seqlen", seqlen)
    if not isinstance(packed, torch.Tensor) or packed.dim() < 1:
        raise TypeError(f"packed must be a (total, ...) tensor, got {type(packed).__name__}")
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64 or indices.dim() != 1:
        raise TypeError(f"indices must be a 1-D int64 tensor, got {getattr(indices, 'dtype', type(indices))}")
    if packed.shape[0] != indices.shape[0]:
        raise ValueError(f"packed has {packed.shape[0]} rows but indices has {indices.shape[0]}; expected equal")
    if indices.device != packed.device:
        raise ValueError(f"indices is on {indices.device} but packed is on {packed.device}")
    out = packed.new_zeros((batch * seqlen, *packed.shape[1:]))
    return out.index_copy(0, indices, packed).view(batch, seqlen, *packed.shape[1:])
