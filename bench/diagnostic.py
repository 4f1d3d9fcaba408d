"""Two in-process reference arms of `hymirec simulate`.

The *diagnostic* arm: the online arm's live version scored in this process,
straight from the users' exact histories — no worker, no stored history codes, no ANN search, no
interest-refresh lag.

Its gap to the online arm is what the live system loses (serving path, stored codes, refresh); its
gap to offline leave-one-out is what the model itself lacks in this setting. It sees exactly what
the live arms see: the same version (loaded from the online arm's registry after each switch), the
same catalogue (new items embedded from their text on load, as the worker does) and the users'
applied items in log order.

The *signals-only* arm (``SignalsOnly``): the serving blend with the model left out.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from model.blend import Blend, Example, FirstSeen, Follows, Signals, candidates, fit, top
from model.ease import Cooccurrence
from model.retrieval import topk_items
from serving.blend import EXAMPLES_KEEP, FOLLOWS_KEEP, NEIGHBOURS_KEEP, POPULAR_CANDIDATES, POPULAR_KEEP
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


class SignalsOnly:
    """The serving blend without the model (``model.blend``, the model's weight held at 0): the same
    signals (follows and co-occurrence counted along the stream, popularity over each user's newest
    ``recent_len`` items, fresh items numbered along the stream), the same candidates (rules', popular,
    nearest and fresh ones), the same fresh slots and the same prequential fit as the worker's
    ``serving.blend.BlendKeeper``. Its gap to the live arms is the model's own share of the blend."""

    name = "signals-only"

    def __init__(self, histories: dict[str, list[str]], recent_len: int, applied: Sequence[str] = ()):
        """``applied``: the items of the events in ``histories``, in the stream's order (which were fresh)."""
        self.recent_len = recent_len
        self.running = Follows.count(histories.values())  # the worker counts along the bootstrap replay
        self.pairs = Cooccurrence(window=recent_len - 1)
        self.pairs.add(list(histories.values()), [len(h) for h in histories.values()])  # and the co-occurrence
        self.first_seen = FirstSeen()
        self.first_seen.add(applied)
        self.signals = self._stored(histories)
        self.blend = Blend(np.array([0.0, 0.0, 0.05, 1.0], dtype=np.float32))  # the neighbours, ties by popularity, until a fit
        self.examples: deque[Example] = deque(maxlen=EXAMPLES_KEEP)

    def _stored(self, histories: dict[str, list[str]]) -> Signals:
        recent = [h[-self.recent_len:] for h in histories.values()]
        popular = Counter(i for r in recent for i in r)
        return Signals(self.running.top(FOLLOWS_KEEP), dict(popular), self.pairs.weights(NEIGHBOURS_KEEP),
                       self.first_seen.fresh()).kept(FOLLOWS_KEEP, POPULAR_KEEP)

    def _candidates(self, history: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
        names, features = candidates(self.signals, history, {}, self.signals.top_popular(POPULAR_CANDIDATES), set(history))
        return names, features, self.signals.fresh_flags(names)

    def top(self, histories: dict[str, list[str]], k: int) -> dict[str, list[str]]:
        out = {}
        for user, history in histories.items():
            names, features, fresh = self._candidates(history)
            out[user] = [item for item, _ in top(self.blend, names, features, k, fresh)]
        return out

    def learn(self, histories: dict[str, list[str]], new: Counter) -> None:
        """After a chunk is applied to ``histories`` (``new``: its events per user): each event an example
        (against the signals before the chunk and the user's history before it), a refit, then the
        count — the worker's order."""
        for user, count in new.items():
            history = histories[user]
            for end in range(max(1, len(history) - count), len(history)):
                names, features, fresh = self._candidates(history[:end])
                if history[end] in names:
                    self.examples.append(Example(features, names.index(history[end]), fresh))
        self.blend = fit(list(self.examples), self.blend, use_model=False)
        self.pairs.add([histories[user] for user in new], list(new.values()))
        for user, count in new.items():
            self.running.add(histories[user], count)
            self.first_seen.add(histories[user][-count:])
        self.signals = self._stored(histories)
