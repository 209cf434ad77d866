"""GPT on bertfast's ops: learns real text (held-out perplexity below the unigram model's), the
KV cache gives the tokens a full reread gives (greedy and sampled), top-k / top-p filtering,
and the command line."""
import json

import pytest
import torch

from bertfast.classic import datasets, elmo, gpt

pytestmark = pytest.mark.usefixtures("one_thread")


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(gpt.filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    # the nucleus: the fewest best tokens whose probability reaches top_p
    assert torch.isfinite(gpt.filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(gpt.filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(gpt.filter_logits(logits, top_p=0.1)).tolist() == [[True, False, False, False]]
    torch.testing.assert_close(gpt.filter_logits(logits, temperature=2.0), logits / 2)
    with pytest.raises(ValueError, match="temperature"):
        gpt.filter_logits(logits, temperature=0)


def test_gpt_learns_and_cache_matches_full_reread():
    texts, labels = datasets.docstring_topics()
    (tr, _), (te, _) = datasets.split(texts, labels, 0.2)
    model, vocab, hist = gpt.train(tr, vocab_size=1500, hidden=32, layers=2, heads=2, ffn=64, steps=150,
                                   batch_size=32, lr=3e-3, warmup=15, max_len=32, seed=0)
    ppl = gpt.perplexity(model, vocab, te[:300], 32)
    assert ppl < 0.7 * elmo.unigram_perplexity(vocab, te[:300], 32), ppl
    prompt = torch.tensor([vocab.encode("return the", bos=True)] * 3)
    for kw in (dict(greedy=True), dict(temperature=0.9, top_k=30, top_p=0.95)):
        a = model.generate(prompt, 12, generator=torch.Generator().manual_seed(1), use_cache=True, **kw)
        b = model.generate(prompt, 12, generator=torch.Generator().manual_seed(1), use_cache=False, **kw)
        assert torch.equal(a, b), kw
        assert torch.equal(a[:, :prompt.shape[1]], prompt)


def test_gpt_row_does_not_depend_on_padding():
    torch.manual_seed(0)
    model = gpt.GPT(20, hidden=16, layers=1, heads=2, ffn=32, dropout=0.0).eval()
    ids = torch.tensor([[2, 5, 6, 7], [2, 8, 0, 0]])
    with torch.no_grad():
        both = model(ids, key_mask=ids != 0)
        alone = model(ids[1:, :2])
    torch.testing.assert_close(both[1, :2], alone[0], rtol=1e-5, atol=1e-5)


def test_gpt_command_line(tmp_path, capsys):
    from bertfast.cli import main

    texts, _ = datasets.docstring_topics()
    (tmp_path / "train.txt").write_text("\n".join(texts[:400]))
    out = tmp_path / "gpt"
    assert main(["classic", "gpt", "train", "--train", str(tmp_path / "train.txt"), "--test",
                 str(tmp_path / "train.txt"), "--out", str(out), "--level", "char", "--steps", "5", "--hidden", "16",
                 "--layers", "1", "--heads", "2", "--ffn", "32", "--max-len", "48", "--log-every", "0"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["test_perplexity"] > 1 and res["unigram_perplexity"] > 1
    args = ["classic", "gpt", "sample", "--model", str(out), "--prompt", "Return", "--samples", "2",
            "--max-new-tokens", "10", "--seed", "3"]
    assert main(args) == 0
    cached = capsys.readouterr().out
    assert main(args + ["--no-cache"]) == 0
    assert capsys.readouterr().out == cached and len(cached.strip().splitlines()) == 2
