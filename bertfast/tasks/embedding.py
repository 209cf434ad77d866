"""Sentence embeddings and what is built on them: embed (pooled hidden states), search (cosine
top-k over a corpus), cluster (k-means). Pooling, cosine top-k and k-means are pure functions.

embed feeds the packed encoder: the tokenizer's rows go in one after the other (ids, cu_seqlens,
max_seqlen built on the host), the encoder returns packed rows, and pooling reads each sequence's
rows through cu_seqlens, so no padded tensor is built, read back, unpacked or padded again. The
padded path (packed=False) is kept for models without a packed forward and as the reference."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..models.precision import base_model
from ..tokenizer import pack_rows
from .common import model_device, padded_batch, progress, resolve_max_length, token_types, warn_truncated

POOLINGS = ("mean", "cls", "max")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """(B, S, H) -> (B, H): the first token ('cls') or the mean over valid tokens ('mean'); 'max'
    takes the max over valid tokens."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    if pooling == "max":
        return hidden.masked_fill(mask == 0, float("-inf")).amax(1)
    raise ValueError(f"pooling must be 'mean', 'cls' or 'max', got {pooling!r}")


def pool_packed(hidden: torch.Tensor, cu_seqlens: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """(total, H) packed rows -> (n, H), sequence i being rows cu_seqlens[i]:cu_seqlens[i + 1]: its
    first row ('cls'), the mean ('mean') or the max ('max') of its rows; a zero-length sequence
    pools to zeros. The same vectors as pool() on the padded batch, without building it."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be 'mean', 'cls' or 'max', got {pooling!r}")
    if hidden.dim() != 2 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"hidden must be (total, hidden) and cu_seqlens (n + 1,), got {tuple(hidden.shape)} and "
                         f"{tuple(cu_seqlens.shape)}")
    total, n = hidden.shape[0], cu_seqlens.numel() - 1
    cu = cu_seqlens.to(device=hidden.device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    out = hidden.new_zeros(n, hidden.shape[1])
    if total == 0 or n == 0:
        return out
    if pooling == "cls":
        first = hidden.index_select(0, cu[:-1].clamp(max=total - 1))
        return torch.where((lengths > 0).unsqueeze(1), first, out)
    # the sequence each row belongs to (output_size: no read-back of the lengths)
    seq = torch.repeat_interleave(torch.arange(n, device=hidden.device), lengths, output_size=total)
    if pooling == "mean":
        return out.index_add_(0, seq, hidden) / lengths.clamp_min(1).unsqueeze(1).to(hidden.dtype)
    # max: include_self=False leaves a zero-length sequence's zeros untouched
    return out.scatter_reduce_(0, seq.unsqueeze(1).expand_as(hidden), hidden, "amax", include_self=False)


def cosine_topk(queries: torch.Tensor, corpus: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices), each (n_queries, k): the k corpus rows most cosine-similar to each query."""
    if queries.dim() == 1:
        queries = queries.unsqueeze(0)
    if corpus.dim() != 2 or queries.shape[-1] != corpus.shape[-1]:
        raise ValueError(f"queries (.., {queries.shape[-1]}) and corpus {tuple(corpus.shape)} must be 2-D "
                         "with the same embedding size")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    sim = similarity(queries, corpus)
    return sim.topk(min(k, corpus.shape[0]), dim=-1)


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix (len(a), len(b))."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 100, cosine: bool = True):
    """k-means (k-means++ initialisation, Lloyd iterations) with a seeded generator.
    Returns (labels (n,), centroids (k, d)). cosine=True clusters L2-normalised rows."""
    x = x.float()
    n = x.shape[0]
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, {n}] (the number of points), got {k!r}")
    if cosine:
        x = F.normalize(x, dim=-1)
    g = torch.Generator().manual_seed(seed)
    cent = [x[torch.randint(n, (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(cent)).min(1).values ** 2
        if float(d2.sum()) <= 0:
            cent.append(x[torch.randint(n, (1,), generator=g)].squeeze(0))
        else:
            cent.append(x[torch.multinomial(d2 / d2.sum(), 1, generator=g)].squeeze(0))
    c = torch.stack(cent)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(0)
    return labels, c


def _windows(ids: List[int], size: int, stride: int) -> List[List[int]]:
    """Windows of `size` tokens every `stride` tokens, the last one ending at the text's end."""
    if len(ids) <= size:
        return [ids]
    starts = list(range(0, len(ids) - size, stride)) + [len(ids) - size]
    return [ids[a:a + size] for a in starts]


@torch.no_grad()
def embed(model, tokenizer, texts, pooling: str = "mean", layer: int = -1, batch_size: int = 32,
          max_length: Optional[int] = None, normalize: bool = False, long_texts: str = "truncate",
          window_stride: Optional[int] = None, cuda_graphs: Optional[bool] = None, packed: bool = True,
          precision: Optional[str] = None, progress_bar: bool = False) -> torch.Tensor:
    """(N, hidden) float32 sentence embeddings. layer indexes hidden_states (0 = embeddings,
    -1 = last layer). Texts are sorted by length into batches; rows come back in input order.

    A text longer than max_length tokens (default: the model's limit) is cut to it, with one
    TruncationWarning saying how many were (long_texts='truncate'), or embedded whole
    (long_texts='windows') as the mean of the pooled embeddings of overlapping windows of
    max_length tokens, one every window_stride content tokens (default: half a window).

    cuda_graphs: serve the batches through CUDA graphs per total-token bucket (bertfast.graphs,
    captured on first use and kept with the model); the default on CUDA for the last layer.
    False runs the eager forward; True on a CPU runs the same bucketing eagerly.

    packed: feed the packed encoder and pool over cu_seqlens (the default, for every model with
    forward_packed); False builds right-padded batches with an attention mask instead.

    precision: the CPU GEMMs' precision for this call, "fp32", "bf16" or "int8" (see
    bertfast.models.precision; None: the model's own setting, fp32 by default).
    progress_bar: a bar on stderr for runs of a few batches or more (the commands' default)."""
    if precision is not None:
        from ..models.precision import inference_precision

        with inference_precision(model, precision):
            return embed(model, tokenizer, texts, pooling, layer, batch_size, max_length, normalize, long_texts,
                         window_stride, cuda_graphs, packed, progress_bar=progress_bar)
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("texts must hold at least one text")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if long_texts not in ("truncate", "windows"):
        raise ValueError(f"long_texts must be 'truncate' or 'windows', got {long_texts!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be 'mean', 'cls' or 'max', got {pooling!r}")
    encoder = base_model(model)  # a head's encoder under its family's name (.bert, .roberta, .distilbert)
    n_layers = encoder.config.num_hidden_layers
    if not -(n_layers + 1) <= layer <= n_layers:
        raise ValueError(f"layer must be in [{-(n_layers + 1)}, {n_layers}] for a {n_layers}-layer model, got {layer}")
    encoder.eval()
    dev = model_device(encoder)
    max_length = resolve_max_length(encoder, tokenizer, max_length)
    size = max_length - 2  # content tokens per row, between [CLS] and [SEP]
    if size < 1:
        raise ValueError(f"max_length must leave room for [CLS], [SEP] and one token, got {max_length}")
    stride = window_stride or max(1, size // 2)
    if not 1 <= stride <= size:
        raise ValueError(f"window_stride must be in [1, {size}] (the content tokens of a window), got {window_stride}")
    rows, owner = [], []
    n_long = 0
    for i, enc in enumerate(tokenizer.encodings(texts, add_special_tokens=False)):
        n_long += len(enc.ids) > size
        pieces = _windows(enc.ids, size, stride) if long_texts == "windows" else [enc.ids[:size]]
        rows += [[tokenizer.cls_token_id] + w + [tokenizer.sep_token_id] for w in pieces]
        owner += [i] * len(pieces)
    if long_texts == "truncate":
        warn_truncated("embed", n_long, len(texts), max_length,
                        "; long_texts='windows' (--long-texts windows) embeds them whole as the mean over "
                        "overlapping windows")
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    pooled = torch.empty(len(rows), encoder.config.hidden_size)
    want_all = layer != -1
    packed = packed and hasattr(encoder, "forward_packed")
    run = encoder
    if (dev.type == "cuda" if cuda_graphs is None else cuda_graphs) and not want_all \
            and hasattr(encoder, "forward_packed"):
        from ..graphs import cached_encoder

        run = cached_encoder(encoder, max_tokens=min(batch_size * max_length, 16384), max_seqs=batch_size,
                             max_seqlen=max_length)
    with progress(progress_bar, len(rows), batch_size, "embed") as bar:
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if packed:
                batch = pack_rows([rows[j] for j in idx]).to(dev)
                args = (batch.input_ids, batch.cu_seqlens, batch.max_seqlen,
                        token_types(encoder, batch.token_type_ids))
                if run is encoder:
                    res = encoder.forward_packed(*args, output_hidden_states=want_all, pool=False)
                    hidden = res.hidden_states[layer] if want_all else res.last_hidden_state
                else:
                    hidden = run.forward_packed(*args)
                pooled[idx] = pool_packed(hidden.float(), batch.cu_seqlens, pooling).cpu()
                bar(len(idx))
                continue
            ids, mask, tt = padded_batch([rows[j] for j in idx], tokenizer.pad_token_id, dev)
            tt = token_types(encoder, tt)
            res = encoder(ids, mask, tt, output_hidden_states=want_all) if run is encoder else run(ids, mask, tt)
            hidden = res.hidden_states[layer] if want_all else res.last_hidden_state
            pooled[idx] = pool(hidden.float(), mask, pooling).cpu()
            bar(len(idx))
    if len(rows) == len(texts):
        out = pooled
    else:  # windows: each text the mean of its windows
        who = torch.tensor(owner)
        out = torch.zeros(len(texts), pooled.shape[1]).index_add_(0, who, pooled)
        out /= torch.bincount(who, minlength=len(texts)).unsqueeze(1).to(out.dtype)
    return F.normalize(out, dim=-1) if normalize else out


def search(model, tokenizer, queries, corpus, k: int = 5, pooling: str = "mean", corpus_embeddings=None,
           cuda_graphs: Optional[bool] = None, long_texts: str = "truncate", packed: bool = True, **embed_kw):
    """Top-k cosine search of each query over the corpus texts: (scores, indices), (n_queries, k).
    embed_kw (batch_size, max_length, precision, ...) go to embed."""
    kw = dict(cuda_graphs=cuda_graphs, long_texts=long_texts, packed=packed, **embed_kw)
    q = embed(model, tokenizer, queries, pooling, **kw)
    c = corpus_embeddings if corpus_embeddings is not None else embed(model, tokenizer, corpus, pooling, **kw)
    return cosine_topk(q, c, k)


def cluster(model, tokenizer, texts, k: int, seed: int = 0, pooling: str = "mean",
            cuda_graphs: Optional[bool] = None, long_texts: str = "truncate", packed: bool = True, **embed_kw):
    """k-means cluster ids (N,) of the texts' embeddings, and the centroids. embed_kw (batch_size,
    max_length, precision, ...) go to embed."""
    return kmeans(embed(model, tokenizer, texts, pooling, cuda_graphs=cuda_graphs, long_texts=long_texts,
                        packed=packed, **embed_kw), k, seed=seed)
