"""Decoding (greedy and beam search against brute force), the RNN encoder-decoder with additive
attention and the Transformer encoder-decoder on bertfast's ops: both learn to reverse real
words, the incremental cache gives the tokens a full reread gives, and the fused ops serve."""
import itertools
import json

import pytest
import torch

from bertfast.classic import datasets, decoding, gpt, seq2seq, transformer
from bertfast.classic.text import pad_batch
from bertfast.testing import system_sentences
from conftest import TRITON_DEVICE, requires_cuda, requires_triton

pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs():
    texts, _ = datasets.docstring_topics()
    src, tgt = datasets.reversal_pairs(texts[:1500], 2, 6)
    return datasets.split(tgt, src, 0.2)  # hashed on the target; returned as (targets, sources)


def _toy_step(table):
    """A fixed next-token distribution depending on the previous token only."""
    def step(prefix, state):
        return table[prefix[:, -1]], state
    return step


def test_beam_search_finds_the_best_sequence_by_brute_force():
    torch.manual_seed(0)
    V, eos, bos, T = 5, 3, 2, 4
    table = torch.randn(V, V).log_softmax(-1)
    step = _toy_step(table)

    def score(seq):  # total log-probability of bos + seq (+ eos if the sequence ended)
        prev, s = bos, 0.0
        for t in seq:
            s += float(table[prev, t])
            prev = t
        return s

    # every sequence of <= T tokens that is either ended by eos or T long
    best, best_s = None, float("-inf")
    for n in range(1, T + 1):
        for seq in itertools.product(range(V), repeat=n):
            if eos in seq[:-1] or (seq[-1] != eos and n < T):
                continue
            s = score(seq)
            if s > best_s:
                best, best_s = seq, s
    got = decoding.beam_search(step, None, decoding.reorder_tensors, 1, bos, eos, T, beam=V ** T,
                               length_penalty=0.0)[0]
    expect = [t for t in best if t != eos]
    assert got == expect
    greedy = decoding.greedy(step, None, 1, bos, eos, T)[0]
    one_beam = decoding.beam_search(step, None, decoding.reorder_tensors, 1, bos, eos, T, beam=1, length_penalty=0.0)
    assert one_beam[0] == greedy


def test_rnn_seq2seq_learns_to_reverse_real_words():
    (tr_t, tr_s), (te_t, te_s) = _pairs()
    model, sv, tv, hist = seq2seq.train(tr_s, tr_t, emb=32, hidden=64, attn=32, steps=200, batch_size=64,
                                        lr=5e-3, seed=0)
    assert hist["losses"][-1] < 0.3 * hist["losses"][0]
    greedy = seq2seq.translate(model, sv, tv, te_s)
    beam = seq2seq.translate(model, sv, tv, te_s, beam=3)
    copy_acc = decoding.token_accuracy([s.split() for s in te_s], [t.split() for t in te_t])
    for pred in (greedy, beam):
        acc = decoding.token_accuracy([p.split() for p in pred], [t.split() for t in te_t])
        assert acc > copy_acc + 0.3, (acc, copy_acc)


def test_rnn_seq2seq_lstm_cell_trains():
    (tr_t, tr_s), _ = _pairs()
    model, sv, tv, hist = seq2seq.train(tr_s[:400], tr_t[:400], emb=16, hidden=32, attn=16, cell="lstm", steps=60,
                                        batch_size=32, lr=1e-2, seed=0)
    assert sum(hist["losses"][-10:]) < 0.8 * sum(hist["losses"][:10])
    assert len(seq2seq.translate(model, sv, tv, tr_s[:3], beam=2)) == 3


def _served_ops(monkeypatch):
    """Records (op, what served, the call) of every fused-op dispatch."""
    from bertfast import dispatch

    seen = []
    real = dispatch.select

    def select(op, call):
        impl = real(op, call)
        seen.append((op, impl.backend, call))
        return impl

    monkeypatch.setattr(dispatch, "select", select)
    return seen


def test_transformer_runs_on_the_fused_ops(monkeypatch):
    from bertfast import dispatch

    torch.manual_seed(0)
    model = transformer.TransformerSeq2Seq(30, 31, hidden=32, layers=1, heads=2, ffn=64, dropout=0.1)
    src, src_len = pad_batch([[5, 6, 7], [8, 9]])
    tgt, _ = pad_batch([[2, 10, 11, 3], [2, 12, 3]])
    seen = _served_ops(monkeypatch)
    model.loss(src, src_len, tgt).backward()
    ops_seen = {op for op, _, _ in seen}
    assert {"embedding_layernorm", "attention", "bias_gelu", "bias_residual_layernorm"} <= ops_seen
    for op, served, call in seen:  # whatever serves each op here (the C++ kernels on a CPU with a compiler)
        assert served == dispatch.explain(op, "cpu", call)[0], (op, served)
    model.eval()
    with torch.no_grad():
        fused = model.decode(tgt[:, :-1], model.encode(src, src_len), tgt[:, :-1] != 0)
        with dispatch.use_backend("reference"):
            ref = model.decode(tgt[:, :-1], model.encode(src, src_len), tgt[:, :-1] != 0)
    valid = (tgt[:, :-1] != 0)
    torch.testing.assert_close(fused[valid], ref[valid], rtol=1e-4, atol=1e-4)


def test_transformer_learns_and_cache_matches_full_reread():
    (tr_t, tr_s), (te_t, te_s) = _pairs()
    model, sv, tv, hist = transformer.train(tr_s, tr_t, hidden=32, layers=2, heads=2, ffn=64, steps=250,
                                            batch_size=64, lr=3e-3, warmup=30, seed=0)
    assert hist["losses"][-1] < 0.5 * hist["losses"][0]
    pred = seq2seq.translate(model, sv, tv, te_s)
    acc = decoding.token_accuracy([p.split() for p in pred], [t.split() for t in te_t])
    copy_acc = decoding.token_accuracy([s.split() for s in te_s], [t.split() for t in te_t])
    assert acc > copy_acc + 0.2, (acc, copy_acc)
    src, src_len = pad_batch([sv.encode(s) for s in te_s[:48]])
    assert model.greedy(src, src_len, 12, use_cache=True) == model.greedy(src, src_len, 12, use_cache=False)
    assert model.beam(src, src_len, 3, 12, use_cache=True) == model.beam(src, src_len, 3, 12, use_cache=False)


def test_seq2seq_command_line(tmp_path, capsys):
    from bertfast.cli import main

    sents = system_sentences(200, include_docs=False)
    (tmp_path / "text.txt").write_text("\n".join(sents))
    assert main(["classic", "data", "reversal", "--out", str(tmp_path), "--from", str(tmp_path / "text.txt")]) == 0
    capsys.readouterr()
    first = (tmp_path / "train.tsv").read_text().splitlines()[0].split("\t")
    assert first[1] == " ".join(reversed(first[0].split()))
    for system, extra in (("seq2seq", ["--hidden", "16", "--emb", "8"]),
                          ("transformer", ["--hidden", "16", "--layers", "1", "--heads", "2", "--ffn", "32"])):
        out = tmp_path / system
        assert main(["classic", system, "train", "--train", str(tmp_path / "train.tsv"), "--test",
                     str(tmp_path / "test.tsv"), "--out", str(out), "--steps", "5", "--log-every", "0", *extra]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert {"test_exact_match", "test_token_accuracy", "copy_baseline_token_accuracy"} <= set(res)
        assert main(["classic", system, "translate", "--model", str(out), "--beam", "2", "l i c e n s e"]) == 0
        assert json.loads(capsys.readouterr().out)["source"] == "l i c e n s e"


@requires_cuda
def test_classic_decoders_on_gpu(monkeypatch):
    """On a GPU the encoder-decoder and GPT run on the CUDA kernels (whatever `explain` names for
    each op), train a step, and decode the same tokens with and without the KV cache."""
    from bertfast import dispatch

    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = transformer.TransformerSeq2Seq(40, 41, hidden=128, layers=2, heads=2, ffn=256).to(dev)
    src, src_len = pad_batch([[5, 6, 7, 8], [9, 10]])
    src, src_len = src.to(dev), src_len.to(dev)
    tgt = pad_batch([[2, 11, 12, 3], [2, 13, 3]])[0].to(dev)
    seen = _served_ops(monkeypatch)
    model.loss(src, src_len, tgt).backward()
    assert {"attention", "bias_gelu", "bias_residual_layernorm", "embedding_layernorm"} <= {op for op, _, _ in seen}
    for op, served, call in seen:
        assert served == dispatch.explain(op, "cuda", call)[0] and served != "reference", (op, served)
    assert model.greedy(src, src_len, 8, use_cache=True) == model.greedy(src, src_len, 8, use_cache=False)
    lm = gpt.GPT(40, hidden=128, layers=2, heads=2, ffn=256).to(dev)
    prompt = torch.tensor([[2, 5, 6]] * 2, device=dev)
    a = lm.generate(prompt, 8, greedy=True, use_cache=True, eos=None)
    assert torch.equal(a, lm.generate(prompt, 8, greedy=True, use_cache=False, eos=None))


@requires_triton
def test_decoder_cache_on_the_triton_kernels():
    """The Triton kernels (interpreted on a CPU) serve the decoder's causal self-attention over a
    growing cache (1 query against t keys, bottom-right aligned) and its cross-attention: the
    incremental logits equal a full reread's and the reference backend's."""
    from bertfast import dispatch

    torch.manual_seed(0)
    dev = torch.device(TRITON_DEVICE)
    model = transformer.TransformerSeq2Seq(20, 21, hidden=32, layers=1, heads=2, ffn=64).to(dev).eval()
    src, src_len = (t.to(dev) for t in pad_batch([[5, 6, 7], [8, 9]]))
    tgt = torch.tensor([[2, 11, 12, 13], [2, 14, 15, 16]], device=dev)
    with torch.no_grad():
        with dispatch.use_backend("reference"):
            ref = model.decode(tgt, model.encode(src, src_len))
        with dispatch.use_backend("triton"):
            assert dispatch.explain("attention", dev.type)[0] == "triton"
            enc = model.encode(src, src_len)
            full = model.decode(tgt, enc)
            cache = [{} for _ in model.decoder]
            steps = torch.cat([model.decode(tgt[:, t:t + 1], enc, cache=cache, start=t) for t in range(4)], 1)
    torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)
