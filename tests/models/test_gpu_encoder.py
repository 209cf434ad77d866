"""The whole encoder on a CUDA device: the Triton kernels serving BertModel end to end.

The per-kernel tests check each op; these check that the model wired on top of them gives
transformers' numbers on a GPU (fp32 and bf16, padded batches, forward and every gradient),
and that the packed and padded layouts agree there. They skip without a CUDA device.
"""
import pytest
import torch

import bertfast
from conftest import requires_cuda

transformers = pytest.importorskip("transformers")

pytestmark = requires_cuda

# BERT-shaped but small: head_dim 64 as in base/large, an FFN that is not a power of two
CFG = dict(vocab_size=1000, hidden_size=256, num_hidden_layers=3, num_attention_heads=4, intermediate_size=1000,
           max_position_embeddings=160, type_vocab_size=2, hidden_dropout_prob=0.0,
           attention_probs_dropout_prob=0.0)


def _twins(name="BertForPreTraining", dtype=torch.float32):
    cfg = transformers.BertConfig(**CFG, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = getattr(transformers, name)(cfg).eval()
    ours = bertfast.from_hf(hf).eval()
    return hf.to("cuda", dtype), ours.to("cuda", dtype)


def _batch(B=6, S=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([150, 1, 77, 128, 33, 64])[:B]
    ids = torch.randint(1, CFG["vocab_size"], (B, S), generator=g)
    tt = torch.randint(0, 2, (B, S), generator=g)
    mask = (torch.arange(S)[None, :] < lens[:, None]).long()
    ids[mask == 0] = 0
    return ids.cuda(), tt.cuda(), mask.cuda()


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_encoder_matches_transformers(dtype):
    hf32, _ = _twins("BertModel", torch.float32)
    hf, ours = _twins("BertModel", dtype)
    ids, tt, mask = _batch()
    valid = mask.bool()
    with torch.no_grad():
        ref = hf32(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state[valid]
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state[valid]
        got = ours(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    mine = got.last_hidden_state[valid]
    assert torch.isfinite(got.last_hidden_state).all()
    assert (got.last_hidden_state[~valid] == 0).all()  # padded positions come back as zeros
    err, their_err = _rel(mine.float(), ref), _rel(theirs.float(), ref)
    if dtype == torch.float32:
        assert err < 1e-4, err  # 3xTF32 attention, fp32 everything else
    else:  # our bf16 error is of transformers' own bf16 error size
        assert err < 2 * their_err + 1e-3, (err, their_err)


def test_gpu_encoder_gradients_match_transformers():
    hf, ours = _twins("BertForPreTraining")
    ids, tt, mask = _batch()
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, CFG["vocab_size"], ids.shape, generator=g).cuda().masked_fill(mask == 0, -100)
    nsp = torch.randint(0, 2, (ids.shape[0],), generator=g).cuda()
    hf.train(), ours.train()  # dropout is 0: the training code paths, deterministic
    a = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels, next_sentence_label=nsp)
    b = ours(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels, next_sentence_label=nsp)
    assert abs(a.loss.item() - b.loss.item()) < 1e-4 * abs(a.loss.item())
    a.loss.backward()
    b.loss.backward()
    hp = dict(hf.named_parameters())
    n = 0
    for name, p in ours.named_parameters():
        q = hp[name]
        # the key bias's true gradient is zero (softmax ignores a constant added to a query's scores):
        # both sides hold rounding noise there
        if q.grad is None or name.endswith("key.bias"):
            continue
        assert p.grad is not None, name
        assert _rel(p.grad, q.grad) < 1e-3, (name, _rel(p.grad, q.grad))
        n += 1
    assert n > 20


def test_gpu_packed_equals_padded_layout():
    _, ours = _twins("BertModel", torch.bfloat16)
    ids, tt, mask = _batch(seed=3)
    valid = mask.bool()
    with torch.no_grad():
        packed = ours(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state[valid]
        ours.unpad = False
        padded = ours(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state[valid]
        ours.unpad = True
    assert _rel(packed.float(), padded.float()) < 1e-2


def test_gpu_encoder_serves_triton():
    # on CUDA the auto order must land on the Triton kernels, not the reference fallback
    for op in ("embedding_layernorm", "bias_gelu", "bias_residual_layernorm", "attention"):
        assert bertfast.dispatch.explain(op, "cuda")[0] == "triton", (op, bertfast.dispatch.explain(op, "cuda"))
