"""The prequential scoring of `hymirec simulate` (pure): an answer's rank of the event's item, hit@10 and
NDCG@10, per-chunk records, windows, thirds and paired gaps."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

K = 10


def rank_of(item_id: str, answer: list[str]) -> int:
    """0-based position of ``item_id`` in ``answer``; -1 when it is not there."""
    try:
        return answer.index(item_id)
    except ValueError:
        return -1


def score_event(rank: int, k: int = K) -> tuple[int, float]:
    """(hit@k, NDCG@k) of one event whose item sits at ``rank`` (-1: absent): one relevant item."""
    if 0 <= rank < k:
        return 1, 1.0 / math.log2(rank + 2)
    return 0, 0.0


def score_chunk(events: pd.DataFrame, answers: dict[str, tuple[str | None, list[str]]],
                histories: dict[str, list[str]], applied: int, bootstrap_items: set[str], k: int = K) -> list[dict]:
    """One record per event (``events``: position, user_id, item_id): scored against its user's
    answer (model version, item ids) and stored history, both read with ``applied`` events applied.
    ``new_item``: the item had no event in the bootstrap part (v0001, the frozen model, never saw it used)."""
    records = []
    for position, user, item in zip(events["position"].tolist(), events["user_id"].tolist(), events["item_id"].tolist()):
        version, items = answers[user]
        history = histories.get(user)
        rank = rank_of(item, items)
        hit, ndcg = score_event(rank, k)
        records.append({"position": int(position), "user_id": user, "item_id": item, "applied": applied,
                        "cold": history is None, "history_len": len(history or []),
                        "in_history": bool(history) and item in history, "new_item": item not in bootstrap_items,
                        "model_version": version,
                        "rank": rank, "hit": hit, "ndcg": ndcg})
    return records


def warm(records: list[dict]) -> list[dict]:
    return [r for r in records if not r["cold"]]


def metrics_of(records: list[dict]) -> dict:
    n = len(records)
    return {"events": n, f"recall@{K}": sum(r["hit"] for r in records) / n if n else None,
            f"ndcg@{K}": sum(r["ndcg"] for r in records) / n if n else None}


def windows(records: list[dict], size: int) -> list[dict]:
    """Consecutive windows of ``size`` warm scored events (the last one may be shorter)."""
    scored = warm(records)
    out = []
    for i, start in enumerate(range(0, len(scored), size)):
        part = scored[start : start + size]
        out.append({"window": i, "first_position": part[0]["position"], "last_position": part[-1]["position"],
                    **metrics_of(part), "versions": sorted({r["model_version"] or "popular" for r in part})})
    return out


def rolling(records: list[dict], size: int) -> pd.DataFrame:
    """position, recall, ndcg: the mean over the last ``size`` warm events at each warm event
    (from a quarter window on, so the curve does not start on a handful of events)."""
    frame = pd.DataFrame(warm(records), columns=["position", "hit", "ndcg"])
    roll = frame[["hit", "ndcg"]].rolling(size, min_periods=max(1, size // 4)).mean()
    return pd.DataFrame({"position": frame["position"], "recall": roll["hit"], "ndcg": roll["ndcg"]}).dropna()


def thirds(records: list[dict], first: int, last: int) -> list[dict]:
    """Metrics of the warm events in each third of the scored log positions [first, last)."""
    edges = np.linspace(first, last, 4)
    scored = warm(records)
    return [metrics_of([r for r in scored if edges[i] <= r["position"] < edges[i + 1] or (i == 2 and r["position"] == last)])
            for i in range(3)]


def paired_gap(a: list[dict], b: list[dict], key: str = "hit") -> tuple[float, float]:
    """(mean of b − a, its standard error) over the same warm events, paired by position."""
    pa = {r["position"]: r[key] for r in warm(a)}
    diff = np.array([r[key] - pa[r["position"]] for r in warm(b) if r["position"] in pa], dtype=np.float64)
    if not len(diff):
        return 0.0, 0.0
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
