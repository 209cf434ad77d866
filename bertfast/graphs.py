"""CUDA-graph execution of the packed encoder (by total-token bucket) and of a packed training step.

On a GPU a BERT layer's kernels take microseconds at serving sizes, so the host's launches decide
the speed. The padding-free encoder has one shape that matters, the number of tokens, which makes
graphs practical for ragged batches:

    enc = GraphedEncoder(model, max_tokens=4096, max_seqs=64)    # captures one graph per bucket
    out = enc(input_ids, attention_mask)     # .last_hidden_state (B, S, H), .pooler_output (B, H)
    rows = enc.forward_packed(ids, cu_seqlens, max_seqlen)       # already packed: (total, H) rows
    enc.memory_bytes; enc.release()

A batch is packed (its valid tokens one after the other), padded up to the smallest bucket of
the token ladder that holds it, copied into static buffers and replayed; its rows are copied out
of the graph's output, padded back to (B, S) with zeros. A batch that comes packed (a
Tokenizer.pack batch: ids, cu_seqlens, max_seqlen) goes into the buffers as it is and its rows
come back packed: no unpadding and no padding on either side. The static layout has `max_seqs`
sequence slots (a batch of fewer rows leaves zero-length slots) and, after them, the bucket's
dummy tokens as sequences of `pad_chunk` tokens (so they cost the attention kernel little and every
token belongs to a sequence), and the attention kernels get max_seqlen = min(bucket, max
positions): their grids follow the bucket, never the batch's longest row. Batches with more rows
or tokens than the graphs hold run the eager forward, with no error.

Without capture (CPU, or capture=False) the same packing, slots and copy-out run eagerly, so
every machine tests them. Rows do not see each other (attention is per sequence, the rest is
row-wise), so a row's result does not depend on the bucket's dummy tokens.

`GraphedTrainStep` captures forward + backward + gradient clipping + a capturable fused AdamW step
of a packed pre-training batch (bertfast.data.pack_pretraining: every shape fixed) in one graph.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .models._engine import check_inputs, check_packed, first_tokens, packed_positions, read_back
from .models.outputs import BertModelOutput
from .ops._common import no_host_reads
from .padding import layout_of, pad_input


def token_buckets(max_tokens: int, smallest: int = 64) -> List[int]:
    """The geometric token ladder: smallest, 2 * smallest, ... and max_tokens last."""
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    out, b = [], min(smallest, max_tokens)
    while b < max_tokens:
        out.append(b)
        b *= 2
    return out + [max_tokens]


def encoder_of(model):
    """The encoder of a head (its `base_model_prefix` attribute: .bert, .roberta, .distilbert, ...),
    or the model itself when it is an encoder."""
    return getattr(model, getattr(model, "base_model_prefix", "bert"), model)


def _capturing_default(device: torch.device) -> bool:
    return device.type == "cuda"


class GraphedEncoder:
    """A bertfast encoder served by CUDA graphs per total-token bucket (see the module docstring).

    model: an encoder of any family (BertModel, RobertaModel, DistilBertModel, whose lack of token
    types means token_type_ids must be None, ...) or a head (its encoder is taken).
    max_tokens: the largest bucket; max_seqs: the sequence slots (rows per batch); buckets: the
    token ladder (default: 64, 128, ... max_tokens); capture: record CUDA graphs (default: on CUDA
    devices); pad_chunk: the length of the dummy sequences that fill a bucket; pooler=False leaves pooler_output None (embeddings do not
    need it: two launches fewer per call); lazy=True captures a bucket on its first batch
    instead of every bucket at construction (smallest first). All graphs share one memory pool;
    `memory_bytes` is what they and the static buffers hold, `report()` says which buckets ran.
    The graphs use the parameters as they were at capture (the fused QKV weight is a copy made
    then): after changing the model, release() and build a new GraphedEncoder.
    max_seqlen: the longest row the graphs serve (default: the model's longest sequence,
    config.longest_sequence; longer rows run eagerly). The attention kernels' tiles are chosen
    for it, so a server that truncates to a shorter length should say so."""

    def __init__(self, model, max_tokens: int = 4096, max_seqs: int = 64, buckets: Optional[Sequence[int]] = None,
                 capture: Optional[bool] = None, pad_chunk: int = 64, pooler: bool = True, lazy: bool = False,
                 max_seqlen: Optional[int] = None):
        model = encoder_of(model)
        if not hasattr(model, "forward_packed"):
            raise TypeError(f"model must be a bertfast encoder (BertModel, RobertaModel, DistilBertModel, ...) or a "
                            f"head holding one, got {type(model).__name__}")
        if not isinstance(max_seqs, int) or max_seqs < 1:
            raise ValueError(f"max_seqs must be a positive int, got {max_seqs!r}")
        ladder = sorted(set(buckets)) if buckets is not None else token_buckets(max_tokens)
        if not ladder or any(not isinstance(b, int) or b < 1 for b in ladder):
            raise ValueError(f"buckets must be positive ints, got {buckets!r}")
        if not isinstance(pad_chunk, int) or pad_chunk < 1:
            raise ValueError(f"pad_chunk must be a positive int, got {pad_chunk!r}")
        # the model, held strongly unless cached_encoder keeps this object beside it (weakly)
        self._model_ref, self._model_keep = weakref.ref(model.eval()), model
        self.pooler = bool(pooler)
        # DistilBERT has no token type embeddings and refuses token_type_ids: the graphs then pass
        # none (the buffer's type row stays zeros, unread)
        self.takes_token_types = getattr(getattr(model, "embeddings", None), "token_type_embeddings", None) is not None
        cfg = model.config
        self.config = cfg
        self.buckets = ladder
        self.max_tokens = ladder[-1]
        self.max_seqs = max_seqs
        # the longest row the model's own positions allow (RoBERTa's start past padding_idx)
        self.max_seqlen = cfg.longest_sequence if max_seqlen is None else max_seqlen
        if isinstance(self.max_seqlen, bool) or not isinstance(self.max_seqlen, int) \
                or not 1 <= self.max_seqlen <= cfg.longest_sequence:
            offset = " less the padding_idx offset" if cfg.longest_sequence < cfg.max_position_embeddings else ""
            raise ValueError(f"max_seqlen must be an int in [1, {cfg.longest_sequence}] (the model's longest sequence: "
                             f"max_position_embeddings {cfg.max_position_embeddings}{offset}), got {max_seqlen!r}")
        self.chunk = min(pad_chunk, self.max_seqlen)
        self.device = model.device
        # the position of a sequence's first token, for packed batches that bring none: the model's
        # own default (0 for BERT, padding_idx + 1 for RoBERTa, whose positions count past the pad id)
        probe = torch.full((1, 1), 1 if (cfg.pad_token_id or 0) == 0 else 0, device=self.device)
        self._first_position = int(model.default_position_ids(probe)[0, 0])
        self.capture = _capturing_default(self.device) if capture is None else bool(capture)
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"capture=True needs the model on a CUDA device, it is on {self.device}")
        dev, T = self.device, self.max_tokens
        self._n_dummy = {b: -(-b // self.chunk) for b in ladder}
        slots = max_seqs + max(self._n_dummy.values())
        # static inputs, shared by every bucket's graph (each reads a prefix)
        # ids, token types and positions as the rows of one buffer: a batch fills it with one copy
        self._in = torch.zeros(3, T, dtype=torch.long, device=dev)
        self._ids, self._tt, self._pos = self._in.unbind(0)
        self._cu = torch.zeros(slots + 1, dtype=torch.int32, device=dev)
        # what the tokens after a batch's hold: pad ids, type 0, positions restarting every chunk
        self._dummy = torch.stack([torch.full((T,), cfg.pad_token_id or 0, device=dev), torch.zeros(T, device=dev),
                                   torch.arange(T, device=dev) % self.chunk]).long()
        self._dummy_steps = torch.arange(1, max(self._n_dummy.values()) + 1, device=dev, dtype=torch.int32) \
            * self.chunk
        self._graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        self._outs: Dict[int, tuple] = {}
        self.replays = {b: 0 for b in ladder}
        self.fallbacks = 0
        self.memory_bytes = self._in.numel() * 16 + self._cu.numel() * 4
        self._pool = None
        if self.capture and not lazy:
            with torch.inference_mode():
                for b in ladder:  # smallest first
                    self._capture(b)

    @property
    def model(self):
        return self._model_ref()

    # -- layout

    def bucket_for(self, total: int) -> Optional[int]:
        """The smallest bucket holding `total` tokens, or None when none does."""
        for b in self.buckets:
            if total <= b:
                return b
        return None

    def _max_seqlen(self, bucket: int) -> int:
        # a bound on every sequence of the bucket (real rows <= self.max_seqlen, dummies <= chunk):
        # the attention grid follows it, not the batch's longest row
        return min(bucket, self.max_seqlen)

    def _fill(self, bucket: int, total: int, rows, cu):
        """Writes a packed batch (rows: (3, total) ids, token types, positions; cu: B + 1 offsets)
        into the static buffers of `bucket`: the batch's tokens, then dummy tokens up to the bucket;
        slots B.. max_seqs empty, then the dummy sequences (the last ends at `bucket`)."""
        B = cu.numel() - 1
        self._in[:, :total].copy_(rows)
        self._in[:, total:bucket].copy_(self._dummy[:, :bucket - total])
        S, nd = self.max_seqs, self._n_dummy[bucket]
        self._cu[:B + 1].copy_(cu)
        self._cu[B + 1:S + 1].fill_(total)
        torch.clamp(self._dummy_steps[:nd] + total, max=bucket, out=self._cu[S + 1:S + 1 + nd])

    def _forward(self, bucket: int):
        """(packed rows (bucket, hidden), first row of each of the max_seqs slots)."""
        n = self.max_seqs + self._n_dummy[bucket]
        out = self.model.forward_packed(self._ids[:bucket], self._cu[:n + 1], self._max_seqlen(bucket),
                                        self._tt[:bucket] if self.takes_token_types else None, self._pos[:bucket],
                                        pool=False)
        hidden = out.last_hidden_state
        return hidden, first_tokens(hidden, self._cu[:self.max_seqs + 1])

    # -- capture

    def _capture(self, bucket: int):
        """Warm-up runs (kernel compilation, cuBLAS set-up: nothing of it is captured) and the
        capture of one bucket, on an all-dummy batch, into the shared pool; adds what it holds
        to memory_bytes."""
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(dev)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        self._fill(bucket, 0, torch.empty(3, 0, dtype=torch.long, device=dev), torch.zeros(1, dtype=torch.int32,
                                                                                             device=dev))
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), no_host_reads():  # the capture's very code path
            for _ in range(2):
                self._forward(bucket)
        torch.cuda.current_stream(dev).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool):
            self._outs[bucket] = self._forward(bucket)
        self._graphs[bucket] = g
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()  # the warm-ups' cached blocks; the graphs' private pool stays
        self.memory_bytes += max(0, torch.cuda.memory_reserved(dev) - before)

    def release(self) -> None:
        """Frees the graphs, their memory pool and the static buffers; later calls run eagerly."""
        self._graphs.clear()
        self._outs.clear()
        self._pool = None
        self._in = self._ids = self._tt = self._pos = self._cu = self._dummy = self._dummy_steps = None
        self.buckets = []
        self.memory_bytes = 0
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- serving

    @torch.inference_mode()
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None) -> BertModelOutput:
        """BertModel's forward (last_hidden_state with zeros at padded positions, pooler_output),
        from the smallest graph that holds the batch, else eagerly."""
        cfg = self.config
        self._check_token_types(token_type_ids)
        check_inputs(cfg, input_ids, attention_mask, token_type_ids, position_ids)
        B, S = input_ids.shape
        if B > self.max_seqs or B * S == 0 or not self.buckets:
            return self._eager(input_ids, attention_mask, token_type_ids, position_ids)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        # the model's own default positions (BERT: the column; RoBERTa: counted past padding_idx),
        # range-checked with the ids
        pos_full = position_ids.expand(B, S) if position_ids is not None else \
            self.model.default_position_ids(input_ids)
        total, longest = read_back(cfg, input_ids, mask, token_type_ids, pos_full)  # one host read
        bucket = self.bucket_for(total)
        if bucket is None or total == 0 or longest > self.max_seqlen:
            return self._eager(input_ids, attention_mask, token_type_ids, position_ids)
        layout = layout_of(mask != 0, total, longest)  # the counts were read from this mask
        idx = layout.indices
        tt = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        rows = torch.stack([input_ids.long(), tt.long(), pos_full.long()]).view(3, -1).index_select(1, idx)
        if self.capture and bucket not in self._graphs:  # lazy: captured on first use (it fills the buffers)
            self._capture(bucket)
        self._fill(bucket, total, rows, layout.cu_seqlens)
        if self.capture:
            self._graphs[bucket].replay()
            hidden, first = self._outs[bucket]
        else:
            hidden, first = self._forward(bucket)
        self.replays[bucket] += 1
        # copies: nothing returned aliases the static outputs, which the next call overwrites.
        # The pooler runs here, on the batch's B rows: its GEMM then has the eager forward's shape
        # (and its result), where B of max_seqs slots would not
        last = pad_input(hidden[:total], idx, B, S)
        pooled = None
        if self.model.pooler is not None and self.pooler:
            pooled = self.model.pooler(first[:B])
        return BertModelOutput(last_hidden_state=last, pooler_output=pooled)

    @torch.inference_mode()
    def forward_packed(self, input_ids, cu_seqlens, max_seqlen: int, token_type_ids=None,
                       position_ids=None) -> torch.Tensor:
        """The last layer's packed rows (total, hidden) of sequences already packed (the arguments
        of BertModel.forward_packed, e.g. from Tokenizer.pack), from the smallest graph that holds
        them, else eagerly. Positions default to the model's own, restarting at every sequence."""
        self._check_token_types(token_type_ids)
        ids, cu = check_packed(self.config, input_ids, cu_seqlens, max_seqlen, token_type_ids, position_ids)
        total, n = ids.numel(), cu.numel() - 1
        bucket = self.bucket_for(total) if self.buckets else None
        if (bucket is None or n > self.max_seqs or max_seqlen > self.max_seqlen
                or (position_ids is None and self._first_position + max_seqlen > self.config.max_position_embeddings)):
            self.fallbacks += 1
            return self.model.forward_packed(ids, cu, max_seqlen, token_type_ids, position_ids,
                                             pool=False).last_hidden_state
        if position_ids is None:
            position_ids = packed_positions(cu, total) + self._first_position
        tt = token_type_ids.reshape(-1) if token_type_ids is not None else torch.zeros_like(ids)
        rows = torch.stack([ids.long(), tt.long(), position_ids.reshape(-1).long()])
        if self.capture and bucket not in self._graphs:  # lazy: captured on first use (it fills the buffers)
            self._capture(bucket)
        self._fill(bucket, total, rows, cu)
        if self.capture:
            self._graphs[bucket].replay()
            hidden = self._outs[bucket][0]
        else:
            hidden = self._forward(bucket)[0]
        self.replays[bucket] += 1
        return hidden[:total].clone()  # the next call overwrites the static output

    def _check_token_types(self, token_type_ids) -> None:
        if token_type_ids is not None and not self.takes_token_types:
            raise ValueError(f"token_type_ids must be None: {type(self.model).__name__} has no token type embeddings")

    def _eager(self, input_ids, attention_mask, token_type_ids, position_ids) -> BertModelOutput:
        self.fallbacks += 1
        out = self.model(input_ids, attention_mask, token_type_ids, position_ids)
        return BertModelOutput(last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output)

    def report(self) -> dict:
        """Buckets, slots, replays per bucket, eager fallbacks and the memory held."""
        return {"buckets": list(self.buckets), "max_seqs": self.max_seqs, "captured": bool(self._graphs),
                "replays": dict(self.replays), "fallbacks": self.fallbacks, "memory_bytes": int(self.memory_bytes)}


_CACHED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _param_signature(model) -> tuple:
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters())


def cached_encoder(model, max_tokens: int, max_seqs: int, max_seqlen: Optional[int] = None) -> GraphedEncoder:
    """A lazily captured GraphedEncoder (no pooler) kept beside `model` for as long as it lives,
    for callers such as tasks.embed that serve many batches over several calls. Rebuilt when
    the parameters changed since (moved, cast or updated in place) or the sizes grew."""
    model = encoder_of(model)
    sig = _param_signature(model)
    hit = _CACHED.get(model)
    if hit is not None:
        enc, old = hit
        if old == sig and enc.max_tokens >= max_tokens and enc.max_seqs >= max_seqs and enc.max_seqlen == (
                max_seqlen or model.config.longest_sequence):
            return enc
        enc.release()
    enc = GraphedEncoder(model, max_tokens=max_tokens, max_seqs=max_seqs, pooler=False, lazy=True,
                         max_seqlen=max_seqlen)
    enc._model_keep = None  # the cache must not keep the model alive
    _CACHED[model] = (enc, sig)
    return enc


# ---------------------------------------------------------------------------------------------
# training


def _dropout_of(model) -> float:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return 0.0
    return max(float(getattr(cfg, "hidden_dropout_prob", 0.0) or 0.0),
               float(getattr(cfg, "attention_probs_dropout_prob", 0.0) or 0.0))


class GraphedTrainStep:
    """One training step on batches of fixed shapes (packed pre-training batches), captured in a
    CUDA graph: forward, backward, gradient clipping (foreach, no host read) and the optimizer
    step (a fused AdamW with capturable=True and a tensor lr, which a scheduler updates in place).

        step = GraphedTrainStep(model, optimizer, loss_fn, max_grad_norm=1.0)
        out = step(batch)   # {"loss", "grad_norm", **aux}: device tensors, overwritten by the next call

    loss_fn(model, batch) -> (loss, dict of aux tensors), with no host reads. The first
    `warmup_steps` calls run eagerly on a side stream (real steps on their batches: kernels get
    compiled, the optimizer state is created), the next one captures and replays; every later
    call copies its batch into the static one and replays. capture=False runs the same steps
    eagerly (the CPU path). autocast: a context factory for the forward (e.g. bf16 autocast; its
    weight cache must be off under capture).

    Dropout masks are seeded from the host when a kernel is launched, so a captured graph would
    replay one mask forever: capture refuses a model in training mode with dropout > 0."""

    def __init__(self, model, optimizer, loss_fn: Callable, max_grad_norm: Optional[float] = 1.0,
                 capture: Optional[bool] = None, warmup_steps: int = 3, autocast: Optional[Callable] = None):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.max_grad_norm = max_grad_norm
        self.device = self.params[0].device
        self.capture = _capturing_default(self.device) if capture is None else bool(capture)
        self.warmup_steps = max(1, int(warmup_steps))
        self.autocast = autocast or contextlib.nullcontext
        if self.capture:
            if self.device.type != "cuda":
                raise ValueError(f"capture=True needs the parameters on a CUDA device, they are on {self.device}")
            if not optimizer.defaults.get("capturable", False):
                raise ValueError("the optimizer must be built with capturable=True (e.g. torch.optim.AdamW(..., "
                                 "fused=True, capturable=True)) to be captured in a CUDA graph")
            if any(not isinstance(g["lr"], torch.Tensor) for g in optimizer.param_groups):
                raise ValueError("the optimizer's lr must be a tensor (lr=torch.tensor(lr, device=...)): a float lr "
                                 "is baked into the graph and a scheduler could not change it")
            if model.training and _dropout_of(model) > 0:
                raise ValueError(f"dropout ({_dropout_of(model)}) cannot be captured: its seeds are drawn on the host "
                                 "per launch, so every replay would reuse one mask; set the dropout to 0 or run "
                                 "the step eagerly")
        self.static: Optional[Dict[str, torch.Tensor]] = None
        self.out: Optional[Dict[str, torch.Tensor]] = None
        self.graph = None
        self.calls = 0

    def _load(self, batch: Dict[str, torch.Tensor]):
        if self.static is None:
            self.static = {k: v.to(self.device).clone() for k, v in batch.items()}
            return
        if batch.keys() != self.static.keys():
            raise ValueError(f"batch must have the keys of the first batch {sorted(self.static)}, got {sorted(batch)}")
        for k, v in batch.items():
            s = self.static[k]
            if v.shape != s.shape or v.dtype != s.dtype:
                raise ValueError(f"batch[{k!r}] must keep the first batch's shape {tuple(s.shape)} and dtype "
                                 f"{s.dtype} (a captured step has static shapes), got {tuple(v.shape)} {v.dtype}")
            s.copy_(v, non_blocking=True)

    def _step(self) -> Dict[str, torch.Tensor]:
        with self.autocast():
            loss, aux = self.loss_fn(self.model, self.static)
        loss.backward()
        norm = None
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        self.optimizer.step()
        out = {"loss": loss.detach(), **{k: v.detach() for k, v in aux.items()}}
        if norm is not None:
            out["grad_norm"] = norm
        return out

    def __call__(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        self._load(batch)
        self.calls += 1
        if not self.capture:
            self.optimizer.zero_grad(set_to_none=True)
            self.out = self._step()
            return self.out
        if self.graph is None and self.calls <= self.warmup_steps:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), no_host_reads():  # the capture's very code path
                self.optimizer.zero_grad(set_to_none=True)
                self.out = self._step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            return self.out
        if self.graph is None:
            # gradients set to None: the captured backward allocates them in the graph's pool and
            # every replay overwrites them (no accumulation across steps)
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize(self.device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._step()
        self.graph.replay()
        return self.out

    def release(self) -> None:
        """Frees the graph (and the gradients it owns); the next call runs warm-up again."""
        self.graph = None
        self.calls = 0
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

