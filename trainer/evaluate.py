"""Full-ranking evaluation of a ``RankingModel`` on leave-one-out cases (DESIGN §3).

Every model is ranked by the same code: max cosine of its interests [B, K, D] over its item vectors
[N+1, D] (model.retrieval), excluding each user's earlier items.
"""

from __future__ import annotations

import numpy as np
import torch

from model.retrieval import rank_of_targets, topk_items
from trainer.data import EvalCase, Sequences
from trainer.fit import FitReport
from trainer.metrics import category_coverage, intra_list_distance, summarise


class RankingModel:
    """What the offline harness fits, evaluates and publishes: ``fit`` on sequences, then
    ``interests`` of histories and ``item_vectors``, ranked by max cosine over the interests."""

    name: str
    report: FitReport

    def fit(self, train: Sequences, valid: EvalCase | None, progress: bool) -> FitReport:
        raise NotImplementedError

    def interests(self, histories: list[np.ndarray]) -> torch.Tensor:
        """Per-user histories (item indices, oldest first) → [B, K, D]."""
        raise NotImplementedError

    def item_vectors(self) -> torch.Tensor:
        """[N+1, D] (row 0 = padding)."""
        raise NotImplementedError


def reference_vectors(train: Sequences, num_items: int, dim: int = 32) -> torch.Tensor:
    """Model-independent item vectors for intra-list distance: a truncated SVD of the training
    item-user matrix, so every model's top-10 is measured in the same space. → [N+1, dim]."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.linalg import svds

    rows = np.concatenate([s for s in train.items])
    cols = np.concatenate([np.full(len(s), u) for u, s in enumerate(train.items)])
    m = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(num_items + 1, max(1, len(train.items))))
    k = max(1, min(dim, min(m.shape) - 1))
    u, s, _ = svds(m.astype(np.float64), k=k, random_state=0)
    return torch.as_tensor(u * s, dtype=torch.float32)


def evaluate(model: RankingModel, case: EvalCase, ks=(10, 50, 200), reference: torch.Tensor | None = None,
             category: np.ndarray | None = None, batch: int = 256) -> dict[str, float]:
    """Full-ranking metrics of ``case``; with ``reference``/``category`` also top-10 diversity."""
    vectors = model.item_vectors()[1:]  # rows = item index - 1
    ranks, tops = [], []
    for start in range(0, len(case.target), batch):
        stop = start + batch
        interests = model.interests(case.history[start:stop])
        exclude = [torch.as_tensor(e - 1) for e in case.exclude[start:stop]]
        targets = torch.as_tensor(case.target[start:stop] - 1)
        ranks.append(rank_of_targets(interests, vectors, targets, exclude))
        if reference is not None:
            tops.append(topk_items(interests, vectors, 10, exclude).items + 1)
    out = summarise(torch.cat(ranks), ks)
    if reference is not None:
        top = torch.cat(tops)
        out["ild@10"] = intra_list_distance(reference[top.clamp(min=0)])
        if category is not None and (category > 0).any():
            out["coverage@10"] = category_coverage(top, torch.as_tensor(category - 1))
    return out
