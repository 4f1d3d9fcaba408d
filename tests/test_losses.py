"""DMIL matching loss, the shared InfoNCE core, k-means grouping and Hungarian matching."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.losses import (
    LogitScale,
    cosine_kmeans,
    disentangle_penalty,
    dmil_loss,
    draw_negatives,
    negative_distribution,
    hungarian_match,
    sampled_softmax_loss,
)


def three_clusters(batch: int = 4, per: int = 4, dim: int = 8, seed: int = 0):
    """targets [B, 3·per, D] in 3 tight clusters along the first three axes, negatives [N, D]."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.eye(dim)[:3]
    labels = torch.arange(3).repeat_interleave(per)
    targets = axes[labels][None].repeat(batch, 1, 1) + 0.05 * torch.randn(batch, 3 * per, dim, generator=g)
    negatives = torch.randn(64, dim, generator=g)
    return targets, labels, negatives


def test_logit_scale_init_and_clamp():
    s = LogitScale()
    assert s().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        s.log_scale.fill_(math.log(500.0))
    assert s().item() == pytest.approx(100.0)


def test_hungarian_match_is_optimal_permutation():
    e = torch.eye(3)
    interests = e[[2, 0, 1]][None]  # interest 0 ~ axis 2, interest 1 ~ axis 0, interest 2 ~ axis 1
    groups = e[None]  # group g ~ axis g
    perm = hungarian_match(interests, groups, torch.ones(1, 3, dtype=torch.bool))
    assert perm.tolist() == [[1, 2, 0]]
    # a case where greedy (group 0 first takes its best) is not optimal
    interests = torch.tensor([[[1.0, 0.0], [0.8, 0.6]]])
    groups = torch.tensor([[[0.9, 0.436], [1.0, 0.0]]])
    perm = hungarian_match(interests, groups, torch.ones(1, 2, dtype=torch.bool))
    assert perm.tolist() == [[1, 0]]


def test_hungarian_match_each_row_a_permutation():
    g = torch.Generator().manual_seed(1)
    interests, groups = torch.randn(6, 4, 5, generator=g), torch.randn(6, 4, 5, generator=g)
    valid = torch.rand(6, 4, generator=g) > 0.3
    perm = hungarian_match(interests, groups, valid)
    assert torch.equal(perm.sort(dim=1).values, torch.arange(4).expand(6, 4))


def test_cosine_kmeans_separates_groups_and_masks():
    targets, labels, _ = three_clusters(batch=2)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, -2:] = False
    assign = cosine_kmeans(targets, mask, k=3)
    for b in range(2):
        real = mask[b]
        a, lab = assign[b][real], labels[real]
        # same cluster <=> same group
        assert torch.equal(a[:, None] == a[None, :], lab[:, None] == lab[None, :])
    assert (assign[1, -2:] == -1).all()


def test_cosine_kmeans_fewer_targets_than_k():
    x = torch.randn(1, 2, 4)
    assign = cosine_kmeans(x, torch.ones(1, 2, dtype=torch.bool), k=5)
    assert assign.shape == (1, 2) and ((assign >= 0) & (assign < 5)).all()


def test_dmil_loss_trains_interests_onto_clusters():
    torch.manual_seed(0)
    targets, _, negatives = three_clusters(batch=4)
    mask = torch.ones(4, 12, dtype=torch.bool)
    interests = torch.nn.Parameter(torch.randn(4, 3, 8))
    opt = torch.optim.Adam([interests], lr=0.05)
    first = None
    for _ in range(100):
        loss, stats = dmil_loss(interests, targets, mask, negatives, 1 / 0.07)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    assert stats["groups"] == 3
    # each user's interests cover the three axes, one each
    cos = F.normalize(interests.detach(), dim=-1)[..., :3]  # [B, K, 3]
    assert (cos.max(dim=-1).values > 0.8).all()
    assert torch.equal(cos.argmax(dim=-1).sort(dim=1).values, torch.arange(3).expand(4, 3))


def test_false_negative_masking_changes_loss():
    user = torch.tensor([[1.0, 0.2]])
    pos = torch.tensor([[1.0, 0.0]])
    negs = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # the first is the positive's direction
    masked = sampled_softmax_loss(user, pos, negs, 10.0)
    unmasked = sampled_softmax_loss(user, pos, negs, 10.0, fn_threshold=1.5)
    only_second = sampled_softmax_loss(user, pos, negs[1:], 10.0, fn_threshold=1.5)
    torch.testing.assert_close(masked, only_second)
    assert unmasked > masked + 0.1
    # id-based masking with a threshold that would not fire
    by_id = sampled_softmax_loss(
        user, pos, negs, 10.0, fn_threshold=1.5, positive_ids=torch.tensor([7]), negative_ids=torch.tensor([7, 3])
    )
    torch.testing.assert_close(by_id, only_second)


def test_false_negative_masks_of_repeated_positives_are_per_row():
    """Rows that share a positive id share its mask; each row is masked as if alone."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(6, 4, generator=g)
    table[5] = table[2] * 2.0  # item 5 points where item 2 does
    ids = torch.tensor([2, 4, 2, 0, 4, 2])
    user = torch.randn(6, 4, generator=g)
    neg_ids = torch.arange(6)
    together = sampled_softmax_loss(user, table[ids], table, 3.0, positive_ids=ids, negative_ids=neg_ids)
    alone = [sampled_softmax_loss(user[i : i + 1], table[ids[i : i + 1]], table, 3.0, positive_ids=ids[i : i + 1],
                                  negative_ids=neg_ids) for i in range(6)]
    torch.testing.assert_close(together, torch.stack(alone).mean())
    keep_2 = [j for j in range(6) if j not in (2, 5)]  # row 0: item 2 and its copy are masked
    first = sampled_softmax_loss(user[:1], table[2:3], table[keep_2], 3.0)
    torch.testing.assert_close(alone[0], first)


def test_a_row_with_every_negative_masked_has_zero_loss_and_finite_gradients():
    user = torch.randn(2, 3, requires_grad=True)
    pos = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    negs = pos[:1].clone()  # row 0's only negative is its own positive
    loss = sampled_softmax_loss(user, pos, negs, 10.0, positive_ids=torch.tensor([1, 2]), negative_ids=torch.tensor([1]))
    loss.backward()
    row1 = sampled_softmax_loss(user[1:], pos[1:], negs, 10.0)
    assert loss.item() == pytest.approx(row1.item() / 2, rel=1e-5)
    assert torch.isfinite(user.grad).all() and user.grad[0].abs().sum() == 0


def test_dmil_false_negative_masking():
    targets, _, negatives = three_clusters(batch=2)
    mask = torch.ones(2, 12, dtype=torch.bool)
    interests = torch.randn(2, 3, 8)
    with_dup = torch.cat([negatives, targets[0, :1] * 3.0])
    base, _ = dmil_loss(interests, targets, mask, negatives, 10.0)
    masked, _ = dmil_loss(interests, targets, mask, with_dup, 10.0)
    unmasked, _ = dmil_loss(interests, targets, mask, with_dup, 10.0, fn_threshold=1.5)
    # the duplicate is masked for the target it copies; other targets see a real extra negative
    assert unmasked > masked > base


def test_disentangle_penalty():
    ortho = torch.eye(4)[None]
    same = torch.ones(1, 4, 4)
    assert disentangle_penalty(ortho).item() == pytest.approx(0.0, abs=1e-7)
    assert disentangle_penalty(same).item() == pytest.approx(1.0, abs=1e-6)
    targets, _, negatives = three_clusters(batch=1)
    mask = torch.ones(1, 12, dtype=torch.bool)
    interests = torch.ones(1, 3, 8)
    plain, stats = dmil_loss(interests, targets, mask, negatives, 10.0)
    weighted, _ = dmil_loss(interests, targets, mask, negatives, 10.0, disentangle_weight=0.5)
    assert stats["disentangle"] == pytest.approx(1.0, abs=1e-6)
    assert weighted.item() == pytest.approx(plain.item() + 0.5, abs=1e-5)


def test_sampled_softmax_hand_computed():
    user = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # unit: [0.6, 0.8], [0, 1]
    pos = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    negs = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    s = 2.0
    # row 0: pos cos 0.6, neg cos 0.8, -0.6 ; row 1: pos cos 1 -> neg [0,1] is a false negative
    row0 = math.log(math.exp(s * 0.6) + math.exp(s * 0.8) + math.exp(-s * 0.6)) - s * 0.6
    row1 = math.log(math.exp(s * 1.0) + math.exp(0.0)) - s * 1.0
    loss = sampled_softmax_loss(user, pos, negs, torch.tensor(s))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-5)
    # per-position form with a mask: only row 0 counts
    loss_t = sampled_softmax_loss(user[None], pos[None], negs, s, mask=torch.tensor([[True, False]]))
    assert loss_t.item() == pytest.approx(row0, rel=1e-5)


def test_interests_loss_scores_every_item_by_its_best_interest():
    interests = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # two unit interests
    pos = torch.tensor([[0.6, 0.8]])  # cos 0.6 / 0.8: its score is 0.8
    negs = torch.tensor([[1.0, 0.0], [-0.6, -0.8]])  # scores 1.0 and max(-0.6, -0.8) = -0.6
    s = 3.0
    expected = math.log(math.exp(s * 0.8) + math.exp(s * 1.0) + math.exp(-s * 0.6)) - s * 0.8
    assert sampled_softmax_loss(interests, pos, negs, s).item() == pytest.approx(expected, rel=1e-5)
    # With one interest it is the single-interest loss.
    one = interests[:, :1]
    assert sampled_softmax_loss(one, pos, negs, s).item() == pytest.approx(
        sampled_softmax_loss(one[:, 0], pos, negs, s).item(), rel=1e-6)
    with pytest.raises(ValueError, match="does not fit"):  # 2 users' interests for 1 positive
        sampled_softmax_loss(interests.expand(2, -1, -1), pos, negs, s)


def test_interests_loss_moves_only_the_interests_that_score():
    interests = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]], requires_grad=True)
    pos = torch.tensor([[0.9, 0.1, 0.0]])  # interest 0 scores it
    negs = torch.tensor([[0.1, 0.9, 0.0]])  # interest 1 scores it; interest 2 scores nothing
    sampled_softmax_loss(interests, pos, negs, 5.0).backward()
    grad = interests.grad[0].norm(dim=-1)
    assert grad[0] > 0 and grad[1] > 0 and grad[2] == 0


def test_losses_backprop_to_scale():
    scale = LogitScale()
    targets, _, negatives = three_clusters(batch=2)
    interests = torch.randn(2, 3, 8, requires_grad=True)
    loss, _ = dmil_loss(interests, targets, torch.ones(2, 12, dtype=torch.bool), negatives, scale())
    loss.backward()
    assert scale.log_scale.grad is not None and interests.grad.abs().sum() > 0


@pytest.mark.parametrize("count", [0, 40, 99])
def test_draw_negatives_takes_every_item_unless_fewer_are_asked(count):
    table = torch.randn(41, 4)  # 40 items + padding row
    neg = draw_negatives(table, count)
    assert neg.ids.tolist() == list(range(1, 41)) and neg.log_weight == 0.0
    assert torch.equal(neg.vectors, table[1:])


def test_draw_negatives_draws_distinct_items_uniformly_and_weighs_them():
    table = torch.randn(41, 4)
    torch.manual_seed(0)
    counts = torch.zeros(41)
    for _ in range(400):
        neg = draw_negatives(table, 10)
        assert len(neg.ids) == len(neg.ids.unique()) == 10 and int(neg.ids.min()) >= 1
        assert torch.equal(neg.vectors, table[neg.ids])
        counts[neg.ids] += 1
    assert neg.log_weight == pytest.approx(math.log(4.0))
    assert counts[0] == 0 and counts[1:].min() > 50 and counts[1:].max() < 150  # 100 expected each


def test_weighted_draws_estimate_the_full_softmax():
    """The log-weighted loss over a quarter of the items matches the full softmax's on average;
    without the weight it is far lower (the other three quarters' mass is missing)."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(2001, 16, generator=g)
    users = torch.randn(32, 16, generator=g)
    pos_ids = torch.randint(1, 2001, (32,), generator=g)
    full = draw_negatives(table, 0)

    def loss(neg, weight):
        return sampled_softmax_loss(users, table[pos_ids], neg.vectors, 5.0, positive_ids=pos_ids,
                                    negative_ids=neg.ids, negative_log_weight=weight).item()

    exact = loss(full, 0.0)
    torch.manual_seed(1)
    draws = [draw_negatives(table, 500) for _ in range(50)]
    weighted = sum(loss(n, n.log_weight) for n in draws) / len(draws)
    unweighted = sum(loss(n, 0.0) for n in draws) / len(draws)
    assert weighted == pytest.approx(exact, abs=0.05)
    assert exact - unweighted > 0.5


def test_negative_distribution_mixes_popularity_with_a_uniform_floor():
    counts = torch.tensor([0.0, 6.0, 2.0, 0.0, 0.0])  # padding, then 4 items
    assert negative_distribution(counts, 0.0) is None and negative_distribution(torch.zeros(5), 0.5) is None
    assert negative_distribution(counts, 1.0).tolist() == pytest.approx([0.75, 0.25, 0.0, 0.0])
    probs = negative_distribution(counts, 0.5)
    assert probs.tolist() == pytest.approx([0.5 * 0.75 + 0.125, 0.5 * 0.25 + 0.125, 0.125, 0.125])


def test_popular_draws_follow_the_distribution_and_weigh_by_the_chance_to_be_drawn():
    table = torch.randn(41, 4)
    counts = torch.cat([torch.zeros(1), torch.arange(40, 0, -1).float()])  # item 1 the most popular
    probs = negative_distribution(counts, 0.5)
    torch.manual_seed(0)
    seen = torch.zeros(41)
    for _ in range(400):
        neg = draw_negatives(table, 10, probs)
        assert len(neg.ids) == len(neg.ids.unique()) <= 10 and int(neg.ids.min()) >= 1
        assert torch.equal(neg.vectors, table[neg.ids])
        seen[neg.ids] += 1
        chance = 1 - (1 - probs[neg.ids - 1].double()) ** 10
        assert torch.allclose(neg.log_weight.double(), -chance.log(), rtol=1e-5)
    chance = 1 - (1 - probs.double()) ** 10
    assert torch.allclose(seen[1:].double() / 400, chance, atol=0.08)
    assert seen[1:6].mean() > 1.5 * seen[-5:].mean()


def test_popular_draws_estimate_the_full_softmax():
    """Weighted by each item's chance to be drawn, the loss over draws from a skewed distribution
    matches the full softmax's on average."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(2001, 16, generator=g)
    users = torch.randn(32, 16, generator=g)
    pos_ids = torch.randint(1, 2001, (32,), generator=g)
    probs = negative_distribution(torch.cat([torch.zeros(1), torch.rand(2000, generator=g) ** 4 * 100]), 0.5)

    def loss(neg):
        return sampled_softmax_loss(users, table[pos_ids], neg.vectors, 5.0, positive_ids=pos_ids,
                                    negative_ids=neg.ids, negative_log_weight=neg.log_weight).item()

    exact = loss(draw_negatives(table, 0))
    torch.manual_seed(1)
    draws = [draw_negatives(table, 500, probs) for _ in range(50)]
    assert sum(loss(n) for n in draws) / len(draws) == pytest.approx(exact, abs=0.05)
