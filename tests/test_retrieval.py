"""Exact multi-interest top-k: max-over-interests scoring, exclusion, chunking, shard merge, ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.retrieval import TopK, merge_topk, rank_of_targets, topk_items


def setup(B: int = 5, K: int = 3, N: int = 300, D: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, K, D, generator=g), torch.randn(N, D, generator=g)


def brute(interests, items):
    """-> scores [B, N], interest [B, N] by the definition."""
    cos = F.cosine_similarity(interests[:, :, None, :], items[None, None, :, :], dim=-1)  # [B, K, N]
    return cos.max(dim=1)


def test_scores_and_provenance_match_brute_force():
    interests, items = setup()
    top = topk_items(interests, items, k=10)
    scores, which = brute(interests, items)
    ref_s, ref_i = scores.topk(10, dim=1)
    assert torch.equal(top.items, ref_i)
    torch.testing.assert_close(top.scores, ref_s)
    assert torch.equal(top.interest, which.gather(1, ref_i))


def test_single_user_input():
    interests, items = setup(B=1)
    top = topk_items(interests[0], items, k=7)
    batched = topk_items(interests, items, k=7)
    assert top.items.shape == (7,)
    assert torch.equal(top.items, batched.items[0])


def test_exclusion_respected():
    interests, items = setup()
    full = topk_items(interests, items, k=20)
    exclude = [full.items[b, :5].tolist() for b in range(4)] + [torch.tensor([], dtype=torch.long)]
    top = topk_items(interests, items, k=15, exclude=exclude)
    for b in range(4):
        assert not set(exclude[b]) & set(top.items[b].tolist())
        assert torch.equal(top.items[b], full.items[b, 5:20])
    assert torch.equal(top.items[4], full.items[4, :15])


def test_chunking_matches_unchunked():
    interests, items = setup(N=300)
    exclude = [list(range(b, 300, 7)) for b in range(5)]
    whole = topk_items(interests, items, k=25, exclude=exclude, chunk=10_000)
    for chunk in (1, 13, 256):
        part = topk_items(interests, items, k=25, exclude=exclude, chunk=chunk)
        assert torch.equal(part.items, whole.items) and torch.equal(part.interest, whole.interest)
        torch.testing.assert_close(part.scores, whole.scores)


def test_fewer_eligible_items_than_k_pads():
    interests, items = setup(N=6)
    top = topk_items(interests, items, k=10, exclude=[[0, 1]] * 5)
    assert top.items.shape == (5, 10)
    assert (top.items[:, :4] >= 0).all() and (top.items[:, 4:] == -1).all()
    assert (top.interest[:, 4:] == -1).all() and torch.isneginf(top.scores[:, 4:]).all()


def test_merge_of_shards_equals_topk_over_union():
    interests, items = setup(N=500)
    whole = topk_items(interests, items, k=30)
    a = topk_items(interests, items[:200], k=30)
    b = topk_items(interests, items[200:], k=30)
    b = TopK(b.scores, torch.where(b.items >= 0, b.items + 200, b.items), b.interest)
    merged = merge_topk([a, b], k=30)
    assert torch.equal(merged.items, whole.items) and torch.equal(merged.interest, whole.interest)
    torch.testing.assert_close(merged.scores, whole.scores)


def test_rank_of_targets_hand_case():
    # one interest along x; items at angles with cosines 1, 0.8, 0.8 (tie), 0, -1
    interests = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]]])
    items = torch.tensor([[2.0, 0.0], [0.8, 0.6], [0.8, -0.6], [0.0, 1.0], [-1.0, 0.0]])
    ranks = rank_of_targets(interests, items, torch.tensor([1, 1, 0]))
    # user 0: item 0 above, item 2 ties (pessimistic) -> 2; user 2 (along y): 0 is tied with 4
    # at cosine 0; above it are items 3 (1), 1 (0.6)
    assert ranks.tolist() == [2, 2, 3]
    # excluding item 0 for user 0 and the target itself for user 1 (never excluded)
    ranks = rank_of_targets(interests, items, torch.tensor([1, 1, 0]), exclude=[[0], [1], [3, 4]])
    assert ranks.tolist() == [1, 2, 1]


def test_rank_of_targets_agrees_with_brute_force():
    interests, items = setup(N=400)
    targets = torch.tensor([3, 50, 399, 0, 200])
    exclude = [[1, 2], [], list(range(100)), [7], [200, 201]]
    ranks = rank_of_targets(interests, items, targets, exclude=exclude, chunk=37)
    scores, _ = brute(interests, items)
    for b in range(5):
        s = scores[b].clone()
        s[[e for e in exclude[b] if e != targets[b]]] = -torch.inf
        s[targets[b]] = -torch.inf
        assert ranks[b].item() == int((s > scores[b, targets[b]]).sum())
