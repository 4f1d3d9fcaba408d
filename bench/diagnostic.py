"""The *diagnostic* arm of `hymirec simulate`: the online arm's live version scored in this process,
straight from the users' exact histories — no worker, no stored history codes, no ANN search, no
interest-refresh lag.

Its gap to the online arm is what the live system loses (serving path, stored codes, refresh); its
gap to offline leave-one-out is what the model itself lacks in this setting. It sees exactly what
the live arms see: the same version (loaded from the online arm's registry after each switch), the
same catalogue (new items embedded from their text on load, as the worker does) and the users'
applied items in log order.
"""

from __future__ import annotations

import pandas as pd
import torch

from model.retrieval import topk_items
from serving.model import ServingModel

BATCH = 256  # users per interests call


class Diagnostic:
    """``top(histories, k)``: each user's k best items under one loaded version, seen items left out."""

    name = "diagnostic"

    def __init__(self, model: ServingModel, catalogue: pd.DataFrame):
        self.model = model
        encoded = model.encode_items(catalogue)
        self.item_ids = encoded.item_ids
        self.index = {item: row for row, item in enumerate(self.item_ids)}
        self.vectors = torch.nn.functional.normalize(torch.as_tensor(encoded.vectors, dtype=torch.float32), dim=-1)

    @property
    def version(self) -> str | None:
        return self.model.version

    def top(self, histories: dict[str, list[str]], k: int) -> dict[str, list[str]]:
        """{user: the k best items by max cosine over the user's interests, none of the user's items}."""
        users = list(histories)
        out: dict[str, list[str]] = {}
        for start in range(0, len(users), BATCH):
            group = users[start : start + BATCH]
            interests = torch.as_tensor(self.model.interests([histories[u] for u in group]), dtype=torch.float32)
            exclude = [torch.as_tensor(sorted({self.index[i] for i in histories[u] if i in self.index}), dtype=torch.long)
                       for u in group]
            top = topk_items(interests, self.vectors, k, exclude)
            for user, rows in zip(group, top.items.tolist()):
                out[user] = [self.item_ids[r] for r in rows if r >= 0]
        return out


def exact_histories(log: pd.DataFrame, stop: int) -> dict[str, list[str]]:
    """{user: items of the log's first ``stop`` events, in order}."""
    out: dict[str, list[str]] = {}
    for user, item in zip(log["user_id"].iloc[:stop].tolist(), log["item_id"].iloc[:stop].tolist()):
        out.setdefault(user, []).append(item)
    return out


def extend(histories: dict[str, list[str]], events: pd.DataFrame) -> None:
    """Apply ``events`` (user_id, item_id, in log order) to ``histories`` in place."""
    for user, item in zip(events["user_id"].tolist(), events["item_id"].tolist()):
        histories.setdefault(user, []).append(item)
