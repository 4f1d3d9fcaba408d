"""Interaction logs → per-user sequences and the leave-one-out split (DESIGN §3).

Items are numbered 1..N in catalogue order; index 0 is padding everywhere. A user's sequence is
their interactions sorted by timestamp with a *stable* sort, so ties keep the log's file order (about
half of ml-100k's consecutive interactions share a timestamp, so this rule decides the test item).

Leave-one-out: users with fewer than 3 interactions are dropped; the last item is the test target,
the second-to-last the validation target. Ranking is over the full catalogue and excludes every item
of the user's whole prior history (not just the model's input window), except the target itself
when it is a repeat, so that a repeat purchase stays rankable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hymirec.errors import HymirecError
from model.catalogue import Catalogue, require_columns
from store.logs import read_interactions, read_items

INTERACTION_COLUMNS = ("user_id", "item_id", "ts")


@dataclass
class Sequences:
    """Every user's time-ordered item-index sequence (all interactions, nothing held out)."""

    user_ids: list[str]
    items: list[np.ndarray]  # int64 item indices, oldest first

    def __len__(self) -> int:
        return len(self.user_ids)


@dataclass
class EvalCase:
    """One ranking query: the model reads ``history`` and must rank ``target`` among all items
    except ``exclude`` (every prior item of the user, minus the target)."""

    history: list[np.ndarray]
    target: np.ndarray  # [U]
    exclude: list[np.ndarray]


@dataclass
class Split:
    """Leave-one-out split. ``train`` holds each user's sequence without its last two items."""

    catalogue: Catalogue
    train: Sequences
    valid: EvalCase
    test: EvalCase
    dropped_users: int


def build_sequences(interactions: pd.DataFrame, catalogue: Catalogue) -> Sequences:
    """Group the log by user; stable sort by ts keeps ties in file order."""
    require_columns(interactions, INTERACTION_COLUMNS, "interactions")
    frame = interactions.reset_index(drop=True)
    frame = frame.assign(_item=frame["item_id"].astype(str).map(catalogue.index), _pos=np.arange(len(frame)))
    frame = frame.sort_values(["ts", "_pos"], kind="stable")
    user_ids, items = [], []
    for user_id, rows in frame.groupby(frame["user_id"].astype(str), sort=False):
        user_ids.append(user_id)
        items.append(rows["_item"].to_numpy(dtype=np.int64))
    return Sequences(user_ids=user_ids, items=items)


def load_catalogue(interactions: pd.DataFrame, items: pd.DataFrame) -> Catalogue:
    require_columns(interactions, INTERACTION_COLUMNS, "interactions")
    return Catalogue.from_frame(items, extra_ids=list(dict.fromkeys(interactions["item_id"].astype(str))))


def _exclusion(prior: np.ndarray, target: int) -> np.ndarray:
    seen = np.unique(prior)
    return seen[seen != target]


def leave_one_out(interactions: pd.DataFrame, items: pd.DataFrame) -> Split:
    catalogue = load_catalogue(interactions, items)
    seqs = build_sequences(interactions, catalogue)
    keep = [i for i, s in enumerate(seqs.items) if len(s) >= 3]
    users = [seqs.user_ids[i] for i in keep]
    full = [seqs.items[i] for i in keep]
    if not full:
        raise HymirecError("no user has 3 or more interactions; nothing to evaluate")
    valid = EvalCase(
        history=[s[:-2] for s in full],
        target=np.array([s[-2] for s in full], dtype=np.int64),
        exclude=[_exclusion(s[:-2], s[-2]) for s in full],
    )
    test = EvalCase(
        history=[s[:-1] for s in full],
        target=np.array([s[-1] for s in full], dtype=np.int64),
        exclude=[_exclusion(s[:-1], s[-1]) for s in full],
    )
    train = Sequences(user_ids=users, items=[s[:-2] for s in full])
    return Split(catalogue=catalogue, train=train, valid=valid, test=test, dropped_users=len(seqs) - len(keep))


def item_popularity(sequences: list[np.ndarray], num_items: int) -> np.ndarray:
    """Interaction counts per item index → [N + 1] float64 (index 0 stays 0)."""
    counts = np.zeros(num_items + 1, dtype=np.float64)
    for seq in sequences:
        np.add.at(counts, seq, 1.0)
    counts[0] = 0.0
    return counts


def read_log(interactions: Path, items: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The interaction log and the item catalogue (JSONL, CSV or Parquet)."""
    return read_interactions(interactions), read_items(items)
