"""GPT (Radford et al. 2018): a causal Transformer language model on bertfast's fused ops.

The Transformer's decoder without cross-attention: token + position embeddings, layers of
causal self-attention and feed-forward (post-LN, as GPT-1), and an output layer tied to the
token embeddings that predicts each next token. Where BERT's masked LM sees both sides of a
word, GPT sees only the left side, which is what lets it generate text.

Generation samples one token at a time with temperature, top-k and top-p (nucleus)
filtering, from a seeded generator. With the KV cache (the default) each new token runs
through the layers alone against the cached keys/values of the tokens before it; without
it the whole sequence is reread every step. Both give the same tokens (a test checks).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Embeddings, TransformerLayer, init_weights
from .text import Vocab, pad_batch


class GPT(nn.Module):
    def __init__(self, vocab_size: int, hidden: int = 256, layers: int = 4, heads: int = 4, ffn: int = 1024,
                 dropout: float = 0.1, max_positions: int = 256):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, hidden=hidden, layers=layers, heads=heads, ffn=ffn, dropout=dropout,
                           max_positions=max_positions)
        self.embeddings = Embeddings(vocab_size, hidden, max_positions, dropout)
        self.layers = nn.ModuleList(TransformerLayer(hidden, heads, ffn, dropout) for _ in range(layers))
        self.output_bias = nn.Parameter(torch.zeros(vocab_size))  # the output weight is the token embeddings'
        self.max_positions = max_positions
        init_weights(self)

    def forward(self, ids: torch.Tensor, key_mask: Optional[torch.Tensor] = None, cache: Optional[list] = None,
                start: int = 0) -> torch.Tensor:
        """Next-token logits (B, T, vocab); with a cache (one dict per layer), ids hold only the
        tokens after the cached ones, at positions start.."""
        x = self.embeddings(ids, start)
        for i, layer in enumerate(self.layers):
            x = layer(x, key_mask, True, cache=None if cache is None else cache[i])
        return F.linear(x, self.embeddings.word.weight, self.output_bias)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token cross entropy over rows <bos> w1 .. wn <eos>, right-padded with <pad>."""
        logits = self(ids[:, :-1], key_mask=ids[:, :-1] != Vocab.pad)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                               ignore_index=Vocab.pad)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generator: Optional[torch.Generator] = None, use_cache: bool = True,
                 greedy: bool = False, eos: Optional[int] = Vocab.eos) -> torch.Tensor:
        """prompt (B, T) of equal-length rows -> (B, T + n) with n <= max_new_tokens sampled
        tokens (stops early once every row has produced eos; a row's tokens after its eos are eos)."""
        if prompt.dim() != 2 or prompt.shape[1] < 1:
            raise ValueError(f"prompt must be (batch, tokens) with at least one token, got {tuple(prompt.shape)}")
        if prompt.shape[1] + max_new_tokens > self.max_positions:
            raise ValueError(f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_positions ({self.max_positions})")
        self.eval()
        out = prompt
        cache = [{} for _ in self.layers] if use_cache else None
        logits = self(prompt, cache=cache)[:, -1]
        done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
        for _ in range(max_new_tokens):
            nxt = logits.float().argmax(-1) if greedy else sample(logits, temperature, top_k, top_p, generator)
            if eos is not None:
                nxt = nxt.masked_fill(done, eos)
                done |= nxt == eos
            out = torch.cat([out, nxt[:, None]], 1)
            if eos is not None and bool(done.all()):
                break
            if use_cache:
                logits = self(nxt[:, None], cache=cache, start=out.shape[1] - 1)[:, -1]
            else:
                logits = self(out)[:, -1]
        return out


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits / temperature with everything outside the top_k (0: no limit) and outside the
    smallest set whose probability reaches top_p set to -inf (the best token always stays)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_k must be >= 0 and top_p in (0, 1], got {top_k!r}, {top_p!r}")
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # tokens after the nucleus is complete
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def lm_rows(vocab: Vocab, texts: Sequence[str], max_len: int):
    return pad_batch([vocab.encode(t, bos=True, eos=True, max_len=max_len) for t in texts])[0]


def train(texts: Sequence[str], level: str = "word", vocab_size: int = 10_000, hidden: int = 256, layers: int = 4,
          heads: int = 4, ffn: int = 1024, dropout: float = 0.1, max_positions: int = 256, steps: int = 2000,
          batch_size: int = 32, lr: float = 1e-3, warmup: int = 100, max_len: int = 128, seed: int = 0,
          time_limit: Optional[float] = None, log_every: int = 0):
    """(model, vocab, history): a GPT trained on sentences (one training row each)."""
    from .training import fit, shuffled_batches

    torch.manual_seed(seed)
    vocab = Vocab.build(texts, max_size=vocab_size, level=level)
    max_len = min(max_len, max_positions)
    model = GPT(len(vocab), hidden, layers, heads, ffn, dropout, max_positions)
    texts = list(texts)

    def step_loss(idx):
        return model.loss(lm_rows(vocab, [texts[i] for i in idx.tolist()], max_len))

    hist = fit(model, step_loss, shuffled_batches(len(texts), batch_size, seed), steps, lr=lr, warmup=warmup,
               time_limit=time_limit, log_every=log_every, desc="gpt")
    return model, vocab, hist


def perplexity(model: GPT, vocab: Vocab, texts: Sequence[str], max_len: int = 128, batch_size: int = 32) -> float:
    """exp of the mean next-token cross entropy over the texts' tokens (and each one's <eos>)."""
    from .training import perplexity as batched_perplexity

    def loss_and_tokens(batch):
        ids = lm_rows(vocab, batch, min(max_len, model.max_positions))
        return model.loss(ids), int((ids[:, 1:] != Vocab.pad).sum())

    model.eval()
    return batched_perplexity(loss_and_tokens, texts, batch_size)


def complete(model: GPT, vocab: Vocab, prompt: str, max_new_tokens: int = 40, samples: int = 1, **kw) -> List[str]:
    """Text continuations of a prompt (sampled; kw: temperature, top_k, top_p, generator, use_cache)."""
    ids = torch.tensor([vocab.encode(prompt, bos=True)] * samples)
    out = model.generate(ids, max_new_tokens, **kw)
    return [vocab.decode(r[ids.shape[1]:]) for r in out.tolist()]
