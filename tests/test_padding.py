"""Padding-free encoder: unpad/pad helpers, and packed execution against the padded layout
(outputs and gradients) on random masks: right and left padding, one-token rows, empty rows."""
import pytest
import torch

import bertfast
from bertfast.padding import pad_input, unpad_input, unpad_mask


def _masks(B=5, S=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, S + 1, (B,), generator=g)
    right = (torch.arange(S) < lens[:, None]).long()
    left = right.flip(1)
    right[1] = 0
    right[1, 0] = 1  # a single-token row
    left[2] = 0  # an all-padding row
    return {"right": right, "left": left}


def test_unpad_pad_round_trip_and_grad():
    mask = _masks()["right"]
    x = torch.randn(5, 13, 6, requires_grad=True)
    packed, idx, cu, max_len = unpad_input(x, mask)
    assert packed.shape == (int(mask.sum()), 6) and cu.dtype == torch.int32
    assert cu[-1] == mask.sum() and max_len == int(mask.sum(1).max())
    back = pad_input(packed, idx, 5, 13)
    assert torch.equal(back, x * mask[..., None])
    back.sum().backward()
    assert torch.equal(x.grad, mask[..., None].float().expand_as(x))
    layout = unpad_mask(mask.bool())
    assert torch.equal(layout.cu_seqlens, cu)
    with pytest.raises(ValueError, match="attention_mask"):
        unpad_input(x, mask[:, :4])


def _model(**kw):
    cfg = bertfast.BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=61, max_position_embeddings=32, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0, **kw)
    torch.manual_seed(0)
    return bertfast.BertForTokenClassification(cfg)


@pytest.mark.parametrize("kind", ["right", "left"])
def test_packed_equals_padded_outputs_and_grads(kind):
    mask = _masks()[kind]
    ids = torch.randint(1, 97, mask.shape, generator=torch.Generator().manual_seed(1)) * mask
    labels = torch.randint(0, 2, mask.shape).masked_fill(mask == 0, -100)
    results = []
    for unpad in (True, False):
        model = _model()
        model.bert.unpad = unpad
        out = model(ids, mask, labels=labels, output_hidden_states=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, ga), (b, gb) = results
    valid = mask.bool()
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        assert x[~valid].abs().max() == 0 and y[~valid].abs().max() == 0
    torch.testing.assert_close(a.logits[valid], b.logits[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.loss, b.loss)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-5, rtol=1e-4, msg=n)


def test_packed_path_only_embeds_valid_tokens(monkeypatch):
    model = _model().bert
    mask = _masks()["right"]
    seen = []
    orig = bertfast.models._engine.embedding_layernorm_prechecked

    def spy(input_ids, *a, **k):
        seen.append(tuple(input_ids.shape))
        return orig(input_ids, *a, **k)

    monkeypatch.setattr("bertfast.models._engine.embedding_layernorm_prechecked", spy)
    model(torch.ones_like(mask), mask)
    assert seen == [(int(mask.sum()),)]


def test_pooler_reads_first_valid_token_under_left_padding():
    model = _model().bert
    model.pooler = bertfast.models.bert.BertPooler(model.config)
    ids = torch.randint(1, 97, (2, 6))
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    pos = torch.tensor([[0, 0, 0, 1, 2, 3], list(range(6))])
    a = model(ids, left, position_ids=pos)
    b = model(ids[:1, 2:], None, position_ids=pos[:1, 2:])
    torch.testing.assert_close(a.pooler_output[:1], b.pooler_output, atol=1e-5, rtol=1e-5)


def test_forward_reads_back_once(monkeypatch):
    """On a GPU every read of a value back to the host drains the kernel queue: a padded
    forward must read once (id ranges, valid-token count, longest row together), not per
    check or per layer."""
    model = _model().bert.eval()
    mask = _masks()["right"]
    ids = torch.randint(1, 97, mask.shape)
    with torch.no_grad():
        model(ids, mask)  # the backends' one-time probes read values back: not part of a forward
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **k):
            reads.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: reads.append("nonzero") or torch.nonzero_static(*a, **k))
    with torch.no_grad():
        out = model(ids, mask, torch.zeros_like(ids))
    monkeypatch.undo()
    assert reads == ["tolist"], reads
    ref = model(ids, mask, torch.zeros_like(ids))  # unpatched: the same numbers
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state)


def test_unpad_mask_with_given_counts():
    mask = _masks()["right"]
    full = unpad_mask(mask)
    given = unpad_mask(mask, int(mask.sum()), full.max_seqlen)
    assert torch.equal(given.indices, full.indices) and torch.equal(given.cu_seqlens, full.cu_seqlens)
    assert given.max_seqlen == full.max_seqlen
    B, S = mask.shape
    with pytest.raises(ValueError, match="total"):
        unpad_mask(mask, B * S + 1, full.max_seqlen)
    with pytest.raises(ValueError, match="max_seqlen"):
        unpad_mask(mask, int(mask.sum()), S + 1)


def test_attention_layout_must_match_token_count():
    mask = _masks()["right"]
    layout = unpad_mask(mask)
    n = layout.indices.numel()
    q = torch.randn(n, 2, 8)
    out = bertfast.ops.attention(q, q, q, cu_seqlens=layout)
    ref = bertfast.ops.attention(q, q, q, cu_seqlens=layout.cu_seqlens, max_seqlen=layout.max_seqlen)
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="q has"):
        bertfast.ops.attention(q[1:], q, q, cu_seqlens=layout)
    with pytest.raises(ValueError, match="max_seqlen"):
        bertfast.ops.attention(q, q, q, cu_seqlens=layout, max_seqlen=layout.max_seqlen + 1)
