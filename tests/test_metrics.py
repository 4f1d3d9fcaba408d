"""Leave-one-out ranking metrics and list diversity, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.metrics import category_coverage, intra_list_distance, ndcg_at_k, recall_at_k, summarise


def test_recall_and_ndcg_hand_case():
    ranks = torch.tensor([0, 3, 9, 10, 60])
    assert recall_at_k(ranks, 10) == pytest.approx(3 / 5)
    assert recall_at_k(ranks, 1) == pytest.approx(1 / 5)
    expected = (1 / math.log2(2) + 1 / math.log2(5) + 1 / math.log2(11)) / 5
    assert ndcg_at_k(ranks, 10) == pytest.approx(expected)
    assert ndcg_at_k(np.array([0, 0]), 1) == pytest.approx(1.0)
    out = summarise(ranks, ks=(10, 50, 200))
    assert set(out) == {f"{m}@{k}" for m in ("recall", "ndcg") for k in (10, 50, 200)}
    assert out["recall@50"] == pytest.approx(4 / 5) and out["recall@200"] == pytest.approx(1.0)
    assert out["ndcg@10"] == pytest.approx(expected)


def test_intra_list_distance():
    identical = torch.ones(2, 4, 3)
    orthogonal = torch.eye(4)[None].repeat(2, 1, 1)
    assert intra_list_distance(identical) == pytest.approx(0.0, abs=1e-6)
    assert intra_list_distance(orthogonal) == pytest.approx(1.0, abs=1e-6)
    mixed = torch.stack([torch.ones(4, 4), torch.eye(4)])
    assert intra_list_distance(mixed) == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError):
        intra_list_distance(torch.ones(2, 1, 3))


def test_category_coverage_hand_case():
    item_category = torch.tensor([0, 0, 1, 2, -1, 3])  # 4 categories, item 4 has none
    lists = torch.tensor(
        [
            [0, 1, 2],  # categories {0, 1} -> 2 / min(3, 4)
            [2, 3, 5],  # {1, 2, 3} -> 3 / 3
            [4, 0, -1],  # {0} (uncategorised item and empty slot add nothing) -> 1 / 3
        ]
    )
    assert category_coverage(lists, item_category) == pytest.approx((2 / 3 + 1 + 1 / 3) / 3)
    # k larger than the number of categories: denominator is the category count
    assert category_coverage(torch.tensor([[0, 2, 3, 5, 1]]), item_category) == pytest.approx(1.0)
    assert category_coverage(lists, torch.full((6,), -1)) == 0.0
