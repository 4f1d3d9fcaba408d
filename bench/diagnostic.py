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
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from model.blend import FirstSeen, Follows, Signals, candidates, model_candidates
from model.blend_weights import PRIOR, Blend, Blends, Example, fit_blends, top
from model.ease import Cooccurrence
from model.trend import Trend
from model.retrieval import topk_items
from serving.blend import EXAMPLES_KEEP, FOLLOWS_KEEP, NEIGHBOURS_KEEP, POOL, POPULAR_CANDIDATES, POPULAR_KEEP
from serving.model import ServingModel

BATCH = 256  # users per interests call
# simulate --in-process: v0001 kept frozen beside the versions fine-tuned in the process (bench.in_process)
FROZEN_DIAGNOSTIC, FROZEN_BLEND = "frozen-diagnostic", "frozen-blend"


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

    def cosines(self, histories: list[list[str]]) -> np.ndarray:
        """[B, N]: each history's score of every item of ``item_ids`` (the max cosine over its interests)."""
        out = np.zeros((len(histories), len(self.item_ids)), dtype=np.float32)
        for start in range(0, len(histories), BATCH):
            interests = torch.as_tensor(self.model.interests(histories[start : start + BATCH]), dtype=torch.float32)
            out[start : start + BATCH] = torch.einsum("bkd,nd->bnk", interests, self.vectors).amax(dim=-1).numpy()
        return out

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


def events_of(log: pd.DataFrame) -> list[tuple[str, str]]:
    """The (user, item) of each event of ``log``, in order."""
    return list(zip(log["user_id"].tolist(), log["item_id"].tolist()))


def exact_histories(log: pd.DataFrame, stop: int) -> dict[str, list[str]]:
    """{user: items of the log's first ``stop`` events, in order}."""
    out: dict[str, list[str]] = {}
    for user, item in events_of(log.iloc[:stop]):
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
    ``serving.blend.BlendKeeper``. Its gap to the live arms is the model's own share of the blend.

    With a ``model`` (a ``Diagnostic``) it is ``ExactBlend``: the worker's blend, model included, on
    the users' exact histories."""

    name = "signals-only"
    prior = Blends(*[Blend(np.array((0.0, *PRIOR[1:]), dtype=np.float32))] * 2)  # the worker's prior, the model left out

    def __init__(self, histories: dict[str, list[str]], recent_len: int, applied: Sequence[tuple[str, str]] = (),
                 model: Diagnostic | None = None, *, categories: Mapping[str, str | None]):
        """``applied``: the events (user, item) in ``histories``, in the stream's order (which were fresh,
        and the trend's decay and offers); ``categories``: the items' (the trend's)."""
        self.recent_len = recent_len
        self.model = model
        self.running = Follows.count(histories.values())  # the worker counts along the bootstrap replay
        self.pairs = Cooccurrence(window=recent_len - 1)
        self.pairs.add(list(histories.values()), [len(h) for h in histories.values()])  # and the co-occurrence
        self.first_seen = FirstSeen()
        self.first_seen.add(item for _, item in applied)
        self.trend = Trend(categories, per_offer=True)  # the keeper's
        self.trend.replay(applied)
        self.signals = self._stored(histories)
        self.blend = self.prior
        self.examples: deque[Example] = deque(maxlen=EXAMPLES_KEEP)

    def _stored(self, histories: dict[str, list[str]]) -> Signals:
        recent = [h[-self.recent_len:] for h in histories.values()]
        popular = Counter(i for r in recent for i in r)
        return Signals(self.running.top(FOLLOWS_KEEP), dict(popular), self.pairs.weights(NEIGHBOURS_KEEP),
                       self.first_seen.fresh(), self.trend.shares()).kept(FOLLOWS_KEEP, POPULAR_KEEP)

    def candidates_of(self, histories: list[list[str]]) -> list[tuple[list[str], np.ndarray, np.ndarray]]:
        """(names, features, fresh flags) of each history's candidates."""
        popular = self.signals.top_popular(POPULAR_CANDIDATES)
        if self.model is None:
            found = [candidates(self.signals, history, {}, popular, set(history)) for history in histories]
        else:
            ids = self.model.item_ids
            fresh_rows = [j for j, i in enumerate(ids) if i in self.signals.fresh]
            found = [model_candidates(self.signals, history, scores, ids, fresh_rows, popular, POOL)
                     for history, scores in zip(histories, self.model.cosines(histories))]
        return [(names, features, self.signals.fresh_flags(names)) for names, features in found]

    def top(self, histories: dict[str, list[str]], k: int) -> dict[str, list[str]]:
        found = self.candidates_of(list(histories.values()))
        return {user: [item for item, _ in top(self.blend.of(self.length(history)), names, features, k, fresh)]
                for (user, history), (names, features, fresh) in zip(histories.items(), found)}

    def length(self, history: list[str]) -> int:
        """The user's items as the worker's readers count them: their recent items."""
        return min(len(history), self.recent_len)

    def learn(self, histories: dict[str, list[str]], new: Counter) -> None:
        """After a chunk is applied to ``histories`` (``new``: its events per user): each event an example
        (against the signals before the chunk and the user's history before it), a refit, then the
        count — the worker's order."""
        events = [(histories[user][:end], histories[user][end]) for user, count in new.items()
                  for end in range(max(1, len(histories[user]) - count), len(histories[user]))]
        for (before, target), (names, features, fresh) in zip(events, self.candidates_of([before for before, _ in events])):
            if target in names:
                self.examples.append(Example(features, names.index(target), fresh, self.length(before)))
        self.blend = fit_blends(list(self.examples), self.blend, use_model=self.model is not None)
        self.pairs.add([histories[user] for user in new], list(new.values()))
        for user, count in new.items():
            self.running.add(histories[user], count)
            self.first_seen.add(histories[user][-count:])
        self.trend.add([histories[user] for user in new], list(new.values()))
        self.signals = self._stored(histories)


class ExactBlend(SignalsOnly):
    """The worker's blend, model included (``SignalsOnly`` with a ``model``), on exact histories: no
    worker, stored codes, ANN or refresh lag. What the live arm would serve if its system lost nothing."""

    name = "exact-blend"
    prior = Blends()  # the worker's

    def __init__(self, histories: dict[str, list[str]], recent_len: int, applied: Sequence[tuple[str, str]], model: Diagnostic,
                 name: str = name, *, categories: Mapping[str, str | None]):
        super().__init__(histories, recent_len, applied, model, categories=categories)
        self.name = name
