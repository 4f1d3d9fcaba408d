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

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hymirec.errors import HymirecError
from store.logs import read_interactions, read_items

INTERACTION_COLUMNS = ("user_id", "item_id", "ts")
ITEM_COLUMNS = ("item_id", "text")


@dataclass
class Catalogue:
    """Item id ↔ index maps (index 0 is padding), texts and category indices.

    ``category[i]`` is the category index of item i (0 = none), aligned with item indices.
    """

    item_ids: list[str]  # item_ids[i - 1] is the id of index i
    texts: list[str]
    category: np.ndarray  # [N + 1] int64
    category_names: list[str]  # category_names[c - 1] for c >= 1
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {item_id: i + 1 for i, item_id in enumerate(self.item_ids)}

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @classmethod
    def from_frame(cls, items: pd.DataFrame, extra_ids: list[str] = ()) -> Catalogue:
        """Catalogue rows in file order (a later row for the same id wins); ids only seen in the
        interaction log (``extra_ids``) are appended with empty text, so they fall back to ID
        embeddings."""
        _require_columns(items, ITEM_COLUMNS, "items")
        items = with_log_only_ids(items.drop_duplicates("item_id", keep="last"), extra_ids)
        ids = [str(i) for i in items["item_id"]]
        texts = ["" if pd.isna(t) else str(t) for t in items["text"]]
        cats = list(items["category"]) if "category" in items else [None] * len(ids)
        names = sorted({str(c) for c in cats if c is not None and not pd.isna(c)})
        cat_index = {name: c + 1 for c, name in enumerate(names)}
        category = np.zeros(len(ids) + 1, dtype=np.int64)
        for i, c in enumerate(cats):
            if c is not None and not pd.isna(c):
                category[i + 1] = cat_index[str(c)]
        return cls(item_ids=ids, texts=texts, category=category, category_names=names)

    def append(self, item_ids: list[str]) -> None:
        """New items at the end, without text or category yet; earlier items keep their index."""
        start = len(self.item_ids)
        self.item_ids.extend(item_ids)
        self.texts.extend([""] * len(item_ids))
        self.category = np.concatenate([self.category, np.zeros(len(item_ids), np.int64)])
        self.index.update({item_id: start + k + 1 for k, item_id in enumerate(item_ids)})


def with_log_only_ids(items: pd.DataFrame, item_ids) -> pd.DataFrame:
    """``items`` plus a row without text or category for every id of ``item_ids`` (ids seen in the
    interaction log) that it lacks: such an item falls back to its ID embedding."""
    known = set(items["item_id"].astype(str))
    extra = [i for i in dict.fromkeys(item_ids) if str(i) not in known]
    if not extra:
        return items
    rows = pd.DataFrame({"item_id": extra, "text": [""] * len(extra), "category": [None] * len(extra)})
    return pd.concat([items, rows], ignore_index=True)


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


def _require_columns(frame: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise HymirecError(f"{what} file is missing column(s) {', '.join(missing)} (has: {', '.join(map(str, frame.columns))})")


def build_sequences(interactions: pd.DataFrame, catalogue: Catalogue) -> Sequences:
    """Group the log by user; stable sort by ts keeps ties in file order."""
    _require_columns(interactions, INTERACTION_COLUMNS, "interactions")
    frame = interactions.reset_index(drop=True)
    frame = frame.assign(_item=frame["item_id"].astype(str).map(catalogue.index), _pos=np.arange(len(frame)))
    frame = frame.sort_values(["ts", "_pos"], kind="stable")
    user_ids, items = [], []
    for user_id, rows in frame.groupby(frame["user_id"].astype(str), sort=False):
        user_ids.append(user_id)
        items.append(rows["_item"].to_numpy(dtype=np.int64))
    return Sequences(user_ids=user_ids, items=items)


def load_catalogue(interactions: pd.DataFrame, items: pd.DataFrame) -> Catalogue:
    _require_columns(interactions, INTERACTION_COLUMNS, "interactions")
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


def pad_left(sequences: list[np.ndarray], max_len: int) -> np.ndarray:
    """Last ``max_len`` items of each sequence, left-padded with 0 → [B, max_len] int64."""
    out = np.zeros((len(sequences), max_len), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = seq[-max_len:]
        if len(tail):
            out[row, max_len - len(tail):] = tail
    return out


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
