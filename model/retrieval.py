"""Exact multi-interest retrieval: an item's score for a user is the max cosine over its K interests.

Items are scored in chunks, so memory stays bounded at 100k+ items; results do not depend on the
chunk size. A single-interest model passes interests [B, 1, D].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

# Most score entries (users × interests × items) held at once; bounds a chunk whatever B and K are.
_MAX_BLOCK = 1 << 25

Exclude = Sequence[torch.Tensor | Sequence[int]] | None


class TopK(NamedTuple):
    """scores [B, k] float, items [B, k] long, interest [B, k] long (which interest gave the score).

    Fewer than k eligible items: the trailing slots hold score -inf, item -1, interest -1.
    """

    scores: torch.Tensor
    items: torch.Tensor
    interest: torch.Tensor


def _exclusion_pairs(exclude: Exclude, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-user item lists -> (rows, cols) LongTensors of every (user, excluded item) pair."""
    if exclude is None:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    if len(exclude) != batch:
        raise ValueError(f"exclude has {len(exclude)} lists for {batch} users")
    cols = [torch.as_tensor(e, dtype=torch.long).reshape(-1).to(device) for e in exclude]
    rows = [torch.full_like(c, b) for b, c in enumerate(cols)]
    return torch.cat(rows), torch.cat(cols)


def _chunk_scores(users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit users [B, K, D], unit items [n, D] -> (score [B, n] = max over K, interest [B, n])."""
    return torch.einsum("bkd,nd->bnk", users, items).max(dim=-1)


def _prepare(interests: torch.Tensor, item_vectors: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    users = F.normalize(interests.float(), dim=-1)
    items = F.normalize(item_vectors.float().to(users.device), dim=-1)
    B, K, _ = users.shape
    step = max(1, min(chunk, _MAX_BLOCK // max(1, B * K)))
    return users, items, step


def _mask_pairs(scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, start: int) -> None:
    """Set scores[rows, cols - start] = -inf for the pairs whose col falls in this chunk (in place)."""
    inside = (cols >= start) & (cols < start + scores.shape[1])
    scores[rows[inside], cols[inside] - start] = -torch.inf


def _finish(scores: torch.Tensor, items: torch.Tensor, interest: torch.Tensor, k: int) -> TopK:
    """Pad to k columns and mark -inf slots as item -1 / interest -1."""
    pad = k - scores.shape[1]
    if pad > 0:
        scores = F.pad(scores, (0, pad), value=-torch.inf)
        items = F.pad(items, (0, pad), value=-1)
        interest = F.pad(interest, (0, pad), value=-1)
    empty = torch.isneginf(scores)
    return TopK(scores, items.masked_fill(empty, -1), interest.masked_fill(empty, -1))


@torch.no_grad()
def topk_items(
    interests: torch.Tensor,
    item_vectors: torch.Tensor,
    k: int,
    exclude: Exclude = None,
    chunk: int = 65536,
) -> TopK:
    """Top-k items per user by max cosine over interests.

    interests [B, K, D] (or [K, D] for one user: then the outputs are [k]), item_vectors [N, D],
    exclude: per-user item indices never returned (e.g. seen items) -> TopK of [B, k].
    Item indices are rows of item_vectors; a shard's caller adds its offset before merge_topk.
    """
    single = interests.ndim == 2
    if single:
        interests = interests[None]
        exclude = None if exclude is None else [exclude]
    users, items, step = _prepare(interests, item_vectors, chunk)
    B = users.shape[0]
    rows, cols = _exclusion_pairs(exclude, B, users.device)
    best_s = torch.zeros(B, 0, device=users.device)
    best_i = torch.zeros(B, 0, dtype=torch.long, device=users.device)
    best_w = torch.zeros(B, 0, dtype=torch.long, device=users.device)
    for start in range(0, items.shape[0], step):
        s, w = _chunk_scores(users, items[start : start + step])
        _mask_pairs(s, rows, cols, start)
        top_s, top_j = s.topk(min(k, s.shape[1]), dim=1)
        cand_s = torch.cat([best_s, top_s], dim=1)
        cand_i = torch.cat([best_i, top_j + start], dim=1)
        cand_w = torch.cat([best_w, w.gather(1, top_j)], dim=1)
        best_s, pick = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
        best_i, best_w = cand_i.gather(1, pick), cand_w.gather(1, pick)
    out = _finish(best_s, best_i, best_w, k)
    return TopK(*(t[0] for t in out)) if single else out


def merge_topk(parts: Sequence[TopK], k: int) -> TopK:
    """Merge per-shard TopK results (items already in one global index space) -> TopK [B, k]."""
    scores = torch.cat([p.scores for p in parts], dim=-1)
    items = torch.cat([p.items for p in parts], dim=-1)
    interest = torch.cat([p.interest for p in parts], dim=-1)
    single = scores.ndim == 1
    if single:
        scores, items, interest = scores[None], items[None], interest[None]
    top_s, pick = scores.topk(min(k, scores.shape[1]), dim=1)
    out = _finish(top_s, items.gather(1, pick), interest.gather(1, pick), k)
    return TopK(*(t[0] for t in out)) if single else out


@torch.no_grad()
def rank_of_targets(
    interests: torch.Tensor,
    item_vectors: torch.Tensor,
    targets: torch.Tensor,
    exclude: Exclude = None,
    chunk: int = 65536,
    tie_tol: float = 1e-6,
) -> torch.Tensor:
    """0-based rank of each target among all non-excluded items (full ranking).

    interests [B, K, D], item_vectors [N, D], targets [B] -> ranks LongTensor [B].
    rank = #{items j ≠ target, not excluded: score_j ≥ score_target − tie_tol}: ties count against
    the target (pessimistic), so a constant-score model ranks every target last. The target itself
    is never excluded, even if it appears in its user's exclude list.
    """
    if interests.ndim != 3:
        raise ValueError(f"interests must be [B, K, D], got {tuple(interests.shape)}")
    users, items, step = _prepare(interests, item_vectors, chunk)
    B = users.shape[0]
    targets = targets.to(users.device, torch.long).reshape(B)
    target_score = torch.einsum("bkd,bd->bk", users, items[targets]).max(dim=-1).values - tie_tol
    rows, cols = _exclusion_pairs(exclude, B, users.device)
    # the target never counts against itself: mask its own column like an excluded item
    rows = torch.cat([rows, torch.arange(B, device=users.device)])
    cols = torch.cat([cols, targets])
    ranks = torch.zeros(B, dtype=torch.long, device=users.device)
    for start in range(0, items.shape[0], step):
        s, _ = _chunk_scores(users, items[start : start + step])
        _mask_pairs(s, rows, cols, start)
        ranks += (s >= target_score[:, None]).sum(dim=1)
    return ranks


def popularity_vectors(counts: np.ndarray, top: float) -> torch.Tensor:
    """A popularity ranking as item vectors, so the same max-cosine scoring serves it: counts [n] →
    unit vectors [n, 2] at angle (1 − count / top)·π/2. Every user is (1, 0), so an item's cosine falls
    as its count does."""
    theta = (1.0 - torch.as_tensor(counts, dtype=torch.float64) / top) * (math.pi / 2)
    return torch.stack([theta.cos(), theta.sin()], dim=1).float()
