"""Ranking and diversity metrics for leave-one-out evaluation (one target per user; DESIGN §3).

Ranks are 0-based positions of each user's target in the full ranking (model.retrieval.rank_of_targets).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F


def _ranks(ranks: torch.Tensor | np.ndarray | Iterable[int]) -> np.ndarray:
    r = ranks.detach().cpu().numpy() if isinstance(ranks, torch.Tensor) else np.asarray(ranks)
    return r.reshape(-1).astype(np.int64)


def recall_at_k(ranks: torch.Tensor | np.ndarray, k: int) -> float:
    """Share of users whose target ranks in the top k (rank < k). One target each, so = hit rate."""
    r = _ranks(ranks)
    return float((r < k).mean()) if r.size else 0.0


def ndcg_at_k(ranks: torch.Tensor | np.ndarray, k: int) -> float:
    """Mean over users of 1 / log2(rank + 2) if rank < k else 0 (one relevant item: IDCG = 1)."""
    r = _ranks(ranks)
    if not r.size:
        return 0.0
    return float(np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0).mean())


def summarise(ranks: torch.Tensor | np.ndarray, ks: Iterable[int] = (10, 50, 200)) -> dict[str, float]:
    """-> {"recall@10": ..., "ndcg@10": ..., ...} for every k in ks."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(ranks, k)
        out[f"ndcg@{k}"] = ndcg_at_k(ranks, k)
    return out


@torch.no_grad()
def intra_list_distance(item_vectors_topk: torch.Tensor) -> float:
    """Mean over users of (1 − mean pairwise cosine within the list), pairs i ≠ j.

    item_vectors_topk [B, k, D] with k ≥ 2 -> float. Identical items give 0; orthogonal ones 1.
    """
    B, k, _ = item_vectors_topk.shape
    if k < 2:
        raise ValueError("intra-list distance needs lists of at least 2 items")
    z = F.normalize(item_vectors_topk.float(), dim=-1)
    cos = z @ z.transpose(1, 2)  # [B, k, k]
    off_sum = cos.sum(dim=(1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(dim=1)
    return float((1.0 - off_sum / (k * (k - 1))).mean())


@torch.no_grad()
def category_coverage(topk_items: torch.Tensor, item_category: torch.Tensor) -> float:
    """Mean over users of (distinct categories in the list) / min(k, number of categories).

    topk_items [B, k] (item indices, -1 = empty slot), item_category [N] (-1 = no category)
    -> float in [0, 1]. The number of categories is the count of distinct values ≥ 0 in
    item_category; uncategorised items and empty slots add no category. 0 when there are none.
    """
    item_category = item_category.to(topk_items.device, torch.long)
    n_cat = int(torch.unique(item_category[item_category >= 0]).numel())
    if n_cat == 0 or topk_items.numel() == 0:
        return 0.0
    k = topk_items.shape[1]
    cats = torch.where(topk_items >= 0, item_category[topk_items.clamp(min=0)], -1)
    cats = cats.sort(dim=1).values
    new = torch.ones_like(cats, dtype=torch.bool)
    new[:, 1:] = cats[:, 1:] != cats[:, :-1]
    distinct = (new & (cats >= 0)).sum(dim=1).float()
    return float((distinct / min(k, n_cat)).mean())
