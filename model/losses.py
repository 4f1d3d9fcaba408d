"""Training losses: DMIL's matching-based contrastive loss and the single-interest sampled softmax.

Both score a user vector against its positive and a set of sampled negatives shared across the
batch with InfoNCE on cosine logits (scale · cos), masking false negatives (a negative with cosine
> ``fn_threshold`` to the positive, or the same item id). They share ``_info_nce`` so HyMiRec and
the single-interest baselines (SASRec) train on exactly the same terms.

DMIL (multi-interest, after RED-Rec's code): the last W items of a sequence are targets; cosine
k-means clusters them into K groups; Hungarian matching pairs groups with the K interests; each
target is scored against its matched interest. Given K interests per position,
``sampled_softmax_loss`` scores every item by its max cosine over them (the retrieval score), so
the interests also learn to rank together.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


class LogitScale(nn.Module):
    """Learnable logit scale (CLIP-style): stored as a log, initialised to 1/0.07, clamped at 100.

    forward() -> scalar tensor, the scale.
    """

    def __init__(self, init: float = 1 / 0.07, max_scale: float = 100.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)))
        self.max_scale = max_scale

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)


class Negatives(NamedTuple):
    """The negatives one training step shares: vectors [n, D], their item ids [n], and log_weight,
    added to the negatives' logits: a float for all of them (log(N / n) when n of N items were drawn
    uniformly, 0 for every item) or [n], one per negative (-log of its chance to be drawn)."""

    vectors: torch.Tensor
    ids: torch.Tensor
    log_weight: float | torch.Tensor


def negative_distribution(counts: torch.Tensor, popular_share: float,
                          device: torch.device | None = None) -> torch.Tensor | None:
    """counts [N+1] training interactions per item (index 0 = padding) → the probabilities [N] that
    ``draw_negatives`` draws items 1..N with: ``popular_share`` of the mass in proportion to the
    counts, the rest uniform, so every item can be drawn, on ``device`` (the item table's: drawing
    happens every step). None (uniform draws) at share 0 or without any count."""
    counts = torch.as_tensor(counts, dtype=torch.float64)[1:].clamp(min=0)
    if popular_share <= 0 or counts.sum() <= 0:
        return None
    uniform = torch.full_like(counts, 1.0 / len(counts))
    return ((1 - popular_share) * uniform + popular_share * counts / counts.sum()).float().to(device)


def draw_negatives(table: torch.Tensor, count: int, probs: torch.Tensor | None = None) -> Negatives:
    """table [N+1, D] item vectors (row 0 = padding) → every item (``count`` 0 or ≥ N: the full
    softmax), or the items of ``count`` draws. A full softmax over a large catalogue costs
    [positions × N] logits a step (100k items × a batch's 12,800 positions = 5 GB), so large
    catalogues sample; each drawn negative's logit gets -log of its chance to be in the draw, so
    the sum over the draw estimates the sum over every item (the logQ correction).

    Without ``probs``: ``count`` distinct items, uniformly (chance count / N each). With ``probs``
    [N] (``negative_distribution``): ``count`` draws with replacement from them, repeats dropped;
    item i is in the draw with chance 1 - (1 - p_i)^count. Uniform draws seldom hold the popular
    items a next item competes with, the negatives that teach most (ml-100k: 512 uniform of 1,682
    items cost a quarter of Recall@10, docs/offline_results.md)."""
    N = table.size(0) - 1
    if count <= 0 or count >= N:
        return Negatives(table[1:], torch.arange(1, N + 1, device=table.device), 0.0)
    if probs is None:
        ids = torch.randperm(N, device=table.device)[:count] + 1
        return Negatives(table[ids], ids, math.log(N / count))
    ids = torch.multinomial(probs, count, replacement=True).unique() + 1
    drawn = -torch.expm1(count * torch.log1p(-probs[ids - 1].double().clamp(max=1 - 1e-12)))
    return Negatives(table[ids], ids, -drawn.log().to(table.dtype))


# --- the InfoNCE core shared by both losses --------------------------------------------------------
def _false_negatives(
    pos: torch.Tensor,
    neg: torch.Tensor,
    fn_threshold: float,
    pos_ids: torch.Tensor | None,
    neg_ids: torch.Tensor | None,
) -> torch.Tensor:
    """Unit pos [M, D], unit neg [N, D] -> bool [M, N], True where the negative must be ignored.
    Rows with one positive id hold one positive vector (the item's)."""
    if pos_ids is None or neg_ids is None:
        return (pos @ neg.T) > fn_threshold
    # Many rows share a positive (every position of a batch predicts one of few items): compare
    # each distinct item with the negatives once.
    ids, first, inverse = _distinct(pos_ids)
    mask = ((pos[first] @ neg.T) > fn_threshold) | (ids[:, None] == neg_ids[None, :])
    return mask[inverse]


def _distinct(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [M] → (distinct ids [U], the first row holding each [U], each row's index into them [M])."""
    distinct, inverse = torch.unique(ids, return_inverse=True)
    rows = torch.arange(len(ids), device=ids.device)
    first = torch.full_like(distinct, len(ids)).scatter_reduce_(0, inverse, rows, "amin")
    return distinct, first, inverse


def _info_nce(
    user: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    scale: torch.Tensor,
    valid: torch.Tensor,
    fn_threshold: float,
    pos_ids: torch.Tensor | None,
    neg_ids: torch.Tensor | None,
    neg_log_weight: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Mean InfoNCE over valid rows.

    user [M, D] or [M, K, D] (K interests: an item's score is the max cosine over them, the
    retrieval score), pos [M, D], neg [N, D] (any norm; L2-normalised here), scale scalar,
    valid [M] bool -> scalar loss. Row loss = logsumexp(s·cos(u, p), s·cos(u, n_j) + w for unmasked j)
    - s·cos(u, p), w = ``neg_log_weight`` (a float, or [N]: one per negative). A batch with no valid
    row gives 0 (still attached to the graph).
    """
    user, pos, neg = F.normalize(user, dim=-1), F.normalize(pos, dim=-1), F.normalize(neg, dim=-1)
    with torch.no_grad():
        fn = _false_negatives(pos, neg, fn_threshold, pos_ids, neg_ids)
    if user.dim() == 3:
        pos_cos = torch.einsum("mkd,md->mk", user, pos).amax(-1)  # [M]
        neg_cos = torch.einsum("mkd,nd->mkn", user, neg).amax(1)  # [M, N]
    else:
        pos_cos, neg_cos = (user * pos).sum(-1), user @ neg.T
    pos_logit = scale * pos_cos
    neg_logit = (scale * neg_cos + neg_log_weight).masked_fill(fn, -math.inf)
    row = torch.logaddexp(pos_logit, torch.logsumexp(neg_logit, dim=1)) - pos_logit
    valid = valid.to(row.device, torch.bool)
    # where(), not row * valid: a padded row may hold garbage (inf/NaN) that must not leak
    return torch.where(valid, row, 0.0).sum() / valid.sum().clamp(min=1)


def sampled_softmax_loss(
    user: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    scale: torch.Tensor | float,
    mask: torch.Tensor | None = None,
    positive_ids: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
    fn_threshold: float = 0.99,
    negative_log_weight: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """InfoNCE with shared sampled negatives.

    positives [B, D] or [B, T, D]; user of the same shape (one vector per position), or with a K
    axis before D (K interests, [..., K, D]): then every item, the positive and each negative, is
    scored by its max cosine over the K interests — the retrieval score itself, so the interests
    learn to rank together (DMIL scores each target against its matched interest only, which leaves
    the interests' cosines uncalibrated against each other). negatives [N, D]; scale scalar;
    mask [B] / [B, T] bool (True = count this position; default all); positive_ids [B] / [B, T],
    negative_ids [N] for id-based false-negative masking; negative_log_weight added to every
    negative's logit (``Negatives.log_weight``) -> scalar loss (mean over counted positions).
    """
    lead, d = positives.shape[:-1], positives.shape[-1]
    interests = user.dim() == positives.dim() + 1
    if (user.shape[:-2] if interests else user.shape[:-1]) != lead or user.shape[-1] != d:
        raise ValueError(f"user {tuple(user.shape)} does not fit positives {tuple(positives.shape)}")
    valid = torch.ones(lead, dtype=torch.bool, device=user.device) if mask is None else mask
    scale = torch.as_tensor(scale, device=user.device)
    return _info_nce(
        user.reshape(-1, user.shape[-2], d) if interests else user.reshape(-1, d),
        positives.reshape(-1, d),
        negatives,
        scale,
        valid.reshape(-1),
        fn_threshold,
        None if positive_ids is None else positive_ids.reshape(-1),
        negative_ids,
        negative_log_weight,
    )


# --- DMIL ------------------------------------------------------------------------------------------
@torch.no_grad()
def cosine_kmeans(x: torch.Tensor, mask: torch.Tensor, k: int, iters: int = 10) -> torch.Tensor:
    """Batched spherical k-means. x [B, W, D], mask [B, W] bool (True = real target) -> assign [B, W].

    assign[b, w] in 0..k-1 for real targets, -1 for masked ones. Init is farthest-point per user
    (first real target, then repeatedly the real target least similar to the chosen centres), so
    it is deterministic. With fewer than k real targets some groups stay empty (never assigned);
    an empty group keeps its previous centre.
    """
    B, W, D = x.shape
    xn = F.normalize(x.float(), dim=-1)
    mask = mask.to(torch.bool)
    big = torch.finfo(xn.dtype).max
    rows = torch.arange(B, device=x.device)
    first = mask.float().argmax(dim=1)  # first real target (0 when the user has none)
    centres = [xn[rows, first]]
    best_sim = torch.full((B, W), -big, device=x.device)
    for _ in range(1, k):
        best_sim = torch.maximum(best_sim, (xn @ centres[-1][:, :, None])[..., 0])
        far = best_sim.masked_fill(~mask, big).argmin(dim=1)
        centres.append(xn[rows, far])
    c = torch.stack(centres, dim=1)  # [B, k, D]
    for _ in range(iters):
        assign = torch.einsum("bwd,bkd->bwk", xn, c).argmax(dim=-1)
        onehot = F.one_hot(assign, k).to(xn.dtype) * mask[..., None]  # [B, W, k]
        sums = torch.einsum("bwk,bwd->bkd", onehot, xn)
        counts = onehot.sum(dim=1)  # [B, k]
        c = torch.where((counts > 0)[..., None], F.normalize(sums, dim=-1), c)
    assign = torch.einsum("bwd,bkd->bwk", xn, c).argmax(dim=-1)
    return assign.masked_fill(~mask, -1)


@torch.no_grad()
def hungarian_match(
    interests: torch.Tensor, group_centroids: torch.Tensor, group_valid: torch.Tensor
) -> torch.Tensor:
    """Pair groups with interests to maximise total cosine (scipy, on CPU, detached).

    interests [B, K, D], group_centroids [B, K, D], group_valid [B, K] bool
    -> perm LongTensor [B, K]: perm[b, g] = the interest matched to group g; each row is a
    permutation of 0..K-1. Invalid (empty) groups cost nothing, so they take the leftover interests.
    """
    sim = torch.einsum(
        "bgd,bkd->bgk", F.normalize(group_centroids.float(), dim=-1), F.normalize(interests.float(), dim=-1)
    )
    cost = (-sim * group_valid[..., None]).cpu().numpy()
    perm = np.empty(cost.shape[:2], dtype=np.int64)
    for b in range(cost.shape[0]):
        rows, cols = linear_sum_assignment(cost[b])
        perm[b, rows] = cols
    return torch.from_numpy(perm).to(interests.device)


def disentangle_penalty(interests: torch.Tensor) -> torch.Tensor:
    """interests [B, K, D] -> mean over users of the mean squared off-diagonal cosine (0 when K = 1)."""
    K = interests.shape[1]
    if K < 2:
        return interests.sum() * 0
    z = F.normalize(interests, dim=-1)
    cos = z @ z.transpose(1, 2)
    off = ~torch.eye(K, dtype=torch.bool, device=z.device)
    return cos[:, off].pow(2).mean()


def dmil_loss(
    interests: torch.Tensor,
    targets: torch.Tensor,
    target_mask: torch.Tensor,
    negatives: torch.Tensor,
    scale: torch.Tensor | float,
    *,
    target_ids: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
    disentangle_weight: float = 0.0,
    fn_threshold: float = 0.99,
    kmeans_iters: int = 10,
    negative_log_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Matching-based multi-interest contrastive loss.

    interests [B, K, D], targets [B, W, D] (the last W items), target_mask [B, W] bool,
    negatives [N, D] shared by the batch, scale scalar; target_ids [B, W] / negative_ids [N] for
    id-based false-negative masking; negative_log_weight as in ``sampled_softmax_loss`` -> (loss, stats).
    stats: infonce, disentangle, groups (mean non-empty groups per user), matched_cos (mean cosine
    of each target to its matched interest).
    """
    B, K, D = interests.shape
    target_mask = target_mask.to(torch.bool)
    assign = cosine_kmeans(targets.detach(), target_mask, K, kmeans_iters)  # [B, W]
    with torch.no_grad():
        tn = F.normalize(targets.detach().float(), dim=-1)
        onehot = F.one_hot(assign.clamp(min=0), K).to(tn.dtype) * target_mask[..., None]
        centroids = torch.einsum("bwk,bwd->bkd", onehot, tn)
        group_valid = onehot.sum(dim=1) > 0  # [B, K]
        perm = hungarian_match(interests.detach(), centroids, group_valid)
        which = perm.gather(1, assign.clamp(min=0))  # [B, W]: interest of each target
    matched = interests.gather(1, which[..., None].expand(-1, -1, D))  # [B, W, D]
    # Each target against its matched interest is the single-interest loss over [B, W] pairs.
    infonce = sampled_softmax_loss(matched, targets, negatives, scale, mask=target_mask,
                                   positive_ids=target_ids, negative_ids=negative_ids, fn_threshold=fn_threshold,
                                   negative_log_weight=negative_log_weight)
    dis = disentangle_penalty(interests)
    loss = infonce + disentangle_weight * dis if disentangle_weight > 0 else infonce
    with torch.no_grad():
        cos = F.cosine_similarity(matched.float(), targets.float(), dim=-1)
        matched_cos = (cos * target_mask).sum() / target_mask.sum().clamp(min=1)
    stats = {
        "infonce": infonce.item(),
        "disentangle": dis.item(),
        "groups": group_valid.float().sum(1).mean().item(),
        "matched_cos": matched_cos.item(),
    }
    return loss, stats
