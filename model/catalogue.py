"""The items a model version knows: id ↔ index (index 0 is padding everywhere), texts, categories.

Shipped with every version (its ``items.json``, model.artifact), so whoever loads the version maps
ids to the rows of its item table the way training did.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from hymirec.errors import HymirecError

ITEM_COLUMNS = ("item_id", "text")


def require_columns(frame: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise HymirecError(f"{what} file is missing column(s) {', '.join(missing)} (has: {', '.join(map(str, frame.columns))})")


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
        require_columns(items, ITEM_COLUMNS, "items")
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


def pad_left(sequences: list[np.ndarray], max_len: int) -> np.ndarray:
    """Last ``max_len`` items of each sequence, left-padded with 0 → [B, max_len] int64."""
    out = np.zeros((len(sequences), max_len), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = seq[-max_len:]
        if len(tail):
            out[row, max_len - len(tail):] = tail
    return out
