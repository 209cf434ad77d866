"""`bertfast compare`'s scoring: precision@k of a similarity ranking, its chance level, the
table, and bad input refused before any training."""
import pytest
import torch

from bertfast.classic import compare


def test_precision_at_k_and_chance():
    labels = ["a", "a", "a", "b", "b", "b"]
    vecs = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    assert compare.precision_at_k(vecs, labels, k=2) == 1.0
    assert compare.precision_at_k(vecs, labels, k=5) == pytest.approx(2 / 5)  # 2 of the 5 others share the label
    pairs = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.05, 1.0]])
    assert compare.precision_at_k(pairs, ["a", "b", "a", "b"], k=1) == 0.0  # each nearest carries the other label
    assert compare.chance_precision(labels) == pytest.approx(2 / 5)
    g = torch.Generator().manual_seed(0)
    many = ["a"] * 300 + ["b"] * 100 + ["c"] * 100
    random = compare.precision_at_k(torch.randn(500, 16, generator=g), many, k=10)
    assert abs(random - compare.chance_precision(many)) < 0.05


def test_markdown_table_and_bad_input(capsys):
    res = {"classification": [{"system": "majority class", "params": 0, "steps": 0, "train_seconds": 0.0,
                               "accuracy": 0.3}],
           "similarity": [{"system": "random ranking", "steps": 0, "train_seconds": 0.0, "precision_at_10": 0.2}]}
    md = compare.markdown(res)
    assert "| majority class | 0 | 0 | 0.0 | 0.300 |" in md and "| random ranking | 0 | 0.0 | 0.200 |" in md
    from bertfast.cli import main

    assert main(["compare", "--bert", "/nonexistent", "--quick"]) == 1
    assert "--bert must be a checkpoint folder" in capsys.readouterr().err
