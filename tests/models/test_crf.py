"""The linear-chain CRF head: NLL and Viterbi against brute-force enumeration of every path,
gradients (gradcheck), holes and padding never change a row's result, BIO constraints, and
BertForTokenClassification(use_crf) with its config saved and loaded and tasks.tag decoding."""
import itertools

import pytest
import torch

from bertfast.models.crf import CRF, bio_constraints, compact


def _random_crf(T, seed=0, constraints=None):
    g = torch.Generator().manual_seed(seed)
    crf = CRF(T, constraints).double()
    with torch.no_grad():
        for p in crf.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return crf


@torch.no_grad()
def _brute(crf, em, allowed=None):
    """(log Z, best path, best score) over every tag sequence of one (S, T) emission matrix."""
    S, T = em.shape
    scores = {}
    for path in itertools.product(range(T), repeat=S):
        t = torch.tensor(path)
        if allowed is not None:
            a, s, e = allowed
            if not (s[t[0]] and e[t[-1]] and all(a[t[i - 1], t[i]] for i in range(1, S))):
                continue
        scores[path] = float(crf.path_score(em, t))
    log_z = torch.logsumexp(torch.tensor(list(scores.values()), dtype=torch.float64), 0)
    best = max(scores, key=scores.get)
    return float(log_z), list(best), scores[best]


@pytest.mark.parametrize("S,T", [(1, 3), (2, 2), (4, 3), (5, 2)])
def test_nll_and_viterbi_match_brute_force(S, T):
    crf = _random_crf(T, seed=S * 10 + T)
    em = torch.randn(1, S, T, dtype=torch.float64, generator=torch.Generator().manual_seed(S))
    tags = torch.randint(T, (1, S), generator=torch.Generator().manual_seed(T))
    mask = torch.ones(1, S, dtype=torch.bool)
    log_z, best, best_score = _brute(crf, em[0])
    expect = log_z - float(crf.path_score(em[0], tags[0]).detach())
    assert float(crf.nll(em, tags, mask, reduction="none")[0].detach()) == pytest.approx(expect, abs=1e-5)
    assert crf.decode(em, mask)[0].tolist() == best


def test_batch_with_holes_and_padding_matches_each_row_alone():
    """Rows of different lengths, valid positions scattered (first sub-tokens only), padding:
    each row's NLL and path equal those of its valid positions run alone, in float32."""
    T = 4
    crf64 = _random_crf(T, seed=3)
    crf = _random_crf(T, seed=3).float()
    g = torch.Generator().manual_seed(0)
    em = torch.randn(3, 7, T, generator=g)
    tags = torch.randint(T, (3, 7), generator=g)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1, 0], [0, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    nll = crf.nll(em, tags, mask, reduction="none").detach()
    path = crf.decode(em, mask)
    for b in range(3):
        idx = mask[b].nonzero().squeeze(1)
        alone_em, alone_tags = em[b, idx][None], tags[b, idx][None]
        ones = torch.ones(1, len(idx), dtype=torch.bool)
        torch.testing.assert_close(nll[b], crf.nll(alone_em, alone_tags, ones, reduction="none")[0])
        assert path[b, idx].tolist() == crf.decode(alone_em, ones)[0].tolist()
        assert (path[b][~mask[b]] == -100).all()
        if len(idx):
            log_z, best, _ = _brute(crf64, alone_em[0].double())
            gold = float(crf64.path_score(alone_em[0].double(), alone_tags[0]).detach())
            assert float(nll[b]) == pytest.approx(log_z - gold, abs=1e-4)  # float32 math
            assert path[b, idx].tolist() == best
    # a row with no valid position contributes nothing
    empty = torch.zeros(1, 7, dtype=torch.bool)
    assert float(crf.nll(em[:1], tags[:1], empty)) == 0.0 and (crf.decode(em[:1], empty) == -100).all()
    # reductions
    torch.testing.assert_close(crf.nll(em, tags, mask, reduction="sum"), nll.sum())
    torch.testing.assert_close(crf.nll(em, tags, mask), nll.mean())


def test_gradcheck():
    """Gradients of the NLL for the emissions and for every transition parameter, in float64."""
    from torch.func import functional_call

    crf = _random_crf(3, seed=1)
    em = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    tags = torch.tensor([[0, 2, 1, 1], [1, 0, 0, 2]])
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0]], dtype=torch.bool)
    names = ("start_transitions", "end_transitions", "transitions")
    params = tuple(getattr(crf, n).detach().clone().requires_grad_(True) for n in names)

    def nll(e, *p):
        return functional_call(crf, dict(zip(names, p)), (e, tags, mask), {"reduction": "sum"})

    assert torch.autograd.gradcheck(nll, (em, *params))


def test_bio_constraints_are_never_violated():
    id2label = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
    allowed, start, end = bio_constraints(id2label)
    assert not start[2] and not start[4] and start[0] and start[1]
    assert allowed[1, 2] and allowed[2, 2] and not allowed[0, 2] and not allowed[3, 2] and not allowed[2, 4]
    crf = _random_crf(5, seed=7, constraints=(allowed, start, end))
    with torch.no_grad():  # push hard towards invalid moves: O -> I-PER, start at I-LOC
        crf.transitions[0, 2] += 10.0
        crf.start_transitions[4] += 10.0
    g = torch.Generator().manual_seed(1)
    em = torch.randn(64, 6, 5, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(64, 6, generator=g) > 0.2
    paths = crf.decode(em, mask)
    unconstrained = crf.decode(em, mask, constrained=False)
    bad = 0
    for b in range(64):
        seq = paths[b][mask[b]].tolist()
        if seq:
            assert start[seq[0]]
        assert all(allowed[a, c] for a, c in zip(seq, seq[1:])), seq
        u = unconstrained[b][mask[b]].tolist()
        bad += bool(u) and (not start[u[0]] or not all(allowed[a, c] for a, c in zip(u, u[1:])))
    assert bad > 0  # the constraints did change something
    # constrained Viterbi is the brute-force best among allowed paths
    for b in range(4):
        idx = mask[b].nonzero().squeeze(1)
        if len(idx):
            assert paths[b, idx].tolist() == _brute(crf, em[b, idx], (allowed, start, end))[1]


def test_compact_keeps_order():
    order, lengths, steps = compact(torch.tensor([[0, 1, 0, 1], [1, 1, 1, 0]]))
    assert order.tolist() == [[1, 3, 0], [0, 1, 2]] and lengths.tolist() == [2, 3]
    assert steps.tolist() == [[True, True, False], [True, True, True]]


def test_bad_input():
    crf = CRF(3)
    em, mask = torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="tags at masked positions must be in"):
        crf.nll(em, torch.tensor([[0, 3]]), mask)
    with pytest.raises(ValueError, match="emissions must be"):
        crf.nll(torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long), mask)


def test_token_classification_with_crf_saves_loads_and_tags(tmp_path):
    from bertfast import BertConfig, BertForTokenClassification
    from bertfast.tasks import piece_tags

    id2label = {0: "O", 1: "B-X", 2: "I-X"}
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, id2label=id2label, use_crf=True, crf_constraints="bio")
    torch.manual_seed(0)
    m = BertForTokenClassification(cfg)
    ids = torch.tensor([[2, 5, 6, 7, 3, 0], [2, 8, 9, 3, 0, 0]])
    att = (ids != 0).long()
    labels = torch.tensor([[-100, 1, 2, -100, -100, -100], [-100, 0, 1, -100, -100, -100]])
    out = m(ids, att, labels=labels)
    emissions = out.logits.detach()
    expect = m.crf.nll(emissions, labels.clamp_min(0), labels != -100)
    torch.testing.assert_close(out.loss.detach(), expect)
    out.loss.backward()
    assert m.crf.transitions.grad is not None and m.classifier.weight.grad is not None
    with torch.no_grad():
        m.crf.transitions.fill_(0)
        m.crf.transitions[0, 2] = 50.0  # would make O -> I-X win without the constraints
    m.save_pretrained(str(tmp_path))
    back = BertForTokenClassification.from_pretrained(str(tmp_path))
    assert back.config.use_crf and back.config.crf_constraints == "bio" and back.crf is not None
    torch.testing.assert_close(back.crf.transitions, m.crf.transitions)
    word_ids = [None, 0, 1, 1, 2, None]
    logits = torch.zeros(6, 3)
    logits[:, 0] = 1.0  # every word prefers O, transitions push O -> I-X
    tags = piece_tags(back, logits, word_ids)
    assert tags[0] == -100 and tags[3] == -100 and tags[1] == 0 and tags[4] != 2
    plain = BertForTokenClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=32, num_labels=3))
    assert plain.crf is None and piece_tags(plain, logits, word_ids) == [0] * 6
    with pytest.raises(ValueError, match="crf_constraints"):
        BertForTokenClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=32, use_crf=True,
                                              crf_constraints="bioes", id2label=id2label))


def test_crf_loss_and_tags_do_not_depend_on_batch_padding():
    """The encoder packs padded batches (varlen attention); each row's CRF loss and Viterbi path
    are those of the row alone."""
    from bertfast import BertConfig, BertForTokenClassification

    cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, id2label={0: "O", 1: "B-X", 2: "I-X"}, use_crf=True,
                     crf_constraints="bio", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    m = BertForTokenClassification(cfg).eval()
    with torch.no_grad():
        m.crf.transitions.normal_()
    rows = [([2, 5, 6, 7, 8, 3], [-100, 1, 2, -100, 0, -100]), ([2, 9, 10, 3], [-100, 0, 1, -100])]
    ids = torch.tensor([rows[0][0], rows[1][0] + [0, 0]])
    labels = torch.tensor([rows[0][1], rows[1][1] + [-100, -100]])
    att = (ids != 0).long()
    with torch.no_grad():
        both = m(ids, att, labels=labels)
        alone = [m(torch.tensor([r]), labels=torch.tensor([lab])) for r, lab in rows]
        torch.testing.assert_close(both.loss, (alone[0].loss + alone[1].loss) / 2, rtol=1e-5, atol=1e-5)
        paths = m.decode(both.logits, labels != -100)
        for i, (r, lab) in enumerate(rows):
            mask = torch.tensor([lab]) != -100
            assert paths[i, : len(r)].tolist() == m.decode(alone[i].logits, mask)[0].tolist()
