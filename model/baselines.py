"""The simple streaming baselines of DESIGN §7a, the bar the live recommender has to clear.

One small interface, ``StreamingBaseline``: ``apply`` (user_id, item_id) events in log order, then ask
``top(user_id, k)``: the user's k best items, leaving out every item the user has an applied event of
(the prequential protocol of ``hymirec simulate``: score against the state, then apply). ``history``
is the user's applied items, oldest first (None: no event yet, a cold user).

- ``MostPopular`` ("pop"): counts of every event applied so far.
- ``RecentPopular`` ("recent-pop"): counts over the last ``window`` applied events (2,000).
- ``SequentialRules`` ("rules"): after each applied event, for each of the user's previous 3 items j
  (1, 2, 3 back) add 1/distance to count[j → new item]; a user's score of an item is the sum of
  count[j → item] over the user's last 5 items j, weighted 1/recency (the most recent: 1).
- ``ItemNeighbours`` ("item-knn"): item-to-item co-occurrence without order — cos(j, i) of the two
  items' columns in the binary users × items matrix of every user's newest 50 items (each item's 100
  nearest kept); a user's score of an item is Σ cos(j, item) over the user's last 20 items j. The
  serving blend's former ``neighbours`` signal alone (``neighbours`` below), recounted after every apply.
- ``Ease`` ("ease"): item-to-item weights by EASE (``model.ease``) over co-occurrence counted along the
  stream (each event paired with the user's previous 49 items); a user's score of an item is
  Σ B[j, item] over the user's last 20 items j. The serving blend's ``neighbours`` signal alone (issue
  20, session 24: far stronger than item-knn on both logs' validation slices, so the bar rises again).
- ``CategoryTrend`` ("cat-trend"): ``model.trend`` alone — the user's share of each category among
  their last 50 items × the item's share of its category's events, halved every 2,000 events (issue
  20, session 27: on the synthetic log's validation seed it beats every arm, the live ones included).

Ties: by all-time popularity (that is the rules' tie-break, as §7a says; the popularity rankings
have none left), then by the order in which items first appeared in the stream. Pure python and
numpy: no torch, no settings.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import sparse

from model.blend import NEAR, list_array, popularity, rows_of
from model.ease import Cooccurrence
from model.trend import MIX_ITEMS, Trend, by_category, user_scores

NEAR_ITEMS = 4096  # neighbours are counted among this many most popular items (bounds items² work)
NEAR_BLOCK = 256  # rows of the items × items cosines held dense at once


class StreamingBaseline:
    """Items by a score that events update; ``ranked`` (best first, every known item) is what a
    subclass defines, ``learn`` what it adds to the all-time counts every baseline keeps."""

    name: str

    def __init__(self) -> None:
        self.ids: list[str] = []  # item index → id, in order of first appearance
        self.index: dict[str, int] = {}
        self.counts: list[int] = []  # all-time events per item index
        self.histories: dict[str, list[int]] = {}
        self._popular: np.ndarray | None = None  # cached ranking by all-time counts, reset by ``apply``

    def apply(self, events: Iterable[tuple[str, str]]) -> None:
        """Learn from (user_id, item_id) events, in the order given."""
        for user, item in events:
            i = self.index.get(item)
            if i is None:
                i = self.index[item] = len(self.ids)
                self.ids.append(item)
                self.counts.append(0)
            history = self.histories.setdefault(user, [])
            self.learn(history, i)
            self.counts[i] += 1
            history.append(i)
        self._popular = None
        self.changed()

    def history(self, user: str) -> list[str] | None:
        got = self.histories.get(user)
        return None if got is None else [self.ids[i] for i in got]

    def top(self, user: str, k: int) -> list[str]:
        """The user's k best items, none the user has an event of (fewer when the stream knows fewer)."""
        history = self.histories.get(user, [])
        seen = set(history)
        out = []
        for i in self.ranked(history):
            if i not in seen:
                out.append(self.ids[i])
                if len(out) == k:
                    break
        return out

    def popular(self) -> np.ndarray:
        """Item indices by all-time count, ties by first appearance."""
        if self._popular is None:
            self._popular = np.argsort(-np.asarray(self.counts, dtype=np.int64), kind="stable")
        return self._popular

    # --- what a baseline defines
    def learn(self, history: list[int], item: int) -> None:
        """One event of ``item`` by a user whose earlier items are ``history`` (before the counts move)."""

    def changed(self) -> None:
        """Called once after every ``apply``: drop what was cached of the old state."""

    def ranked(self, history: list[int]) -> Iterable[int]:
        raise NotImplementedError


class MostPopular(StreamingBaseline):
    name = "pop"

    def ranked(self, history: list[int]) -> Iterable[int]:
        return self.popular()


class RecentPopular(StreamingBaseline):
    name = "recent-pop"

    def __init__(self, window: int = 2000) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        self.recent: deque[int] = deque()
        self.recent_counts: dict[int, int] = {}
        self._order: list[int] | None = None

    def learn(self, history: list[int], item: int) -> None:
        self.recent.append(item)
        self.recent_counts[item] = self.recent_counts.get(item, 0) + 1
        if len(self.recent) > self.window:
            old = self.recent.popleft()
            self.recent_counts[old] -= 1
            if not self.recent_counts[old]:
                del self.recent_counts[old]

    def changed(self) -> None:
        self._order = None

    def ranked(self, history: list[int]) -> Iterable[int]:
        if self._order is None:
            counts = self.counts
            self._order = sorted(self.recent_counts, key=lambda i: (-self.recent_counts[i], -counts[i], i))
        return _then_popular(self._order, self.popular())


class SequentialRules(StreamingBaseline):
    name = "rules"

    def __init__(self, back: int = 3, last: int = 5) -> None:
        super().__init__()
        self.back, self.last = back, last
        self.follows: dict[int, dict[int, float]] = {}  # count[j → item]

    def learn(self, history: list[int], item: int) -> None:
        for distance, j in enumerate(reversed(history[-self.back:]), start=1):
            row = self.follows.setdefault(j, {})
            row[item] = row.get(item, 0.0) + 1.0 / distance

    def scores(self, history: list[int]) -> dict[int, float]:
        """{item: Σ over the last ``last`` items j of count[j → item] / recency}, items with a rule only."""
        acc: dict[int, float] = {}
        for recency, j in enumerate(reversed(history[-self.last:]), start=1):
            for item, count in self.follows.get(j, {}).items():
                acc[item] = acc.get(item, 0.0) + count / recency
        return acc

    def ranked(self, history: list[int]) -> Iterable[int]:
        scores = self.scores(history)
        # Rounded: equal sums reached in another order must tie, so that popularity decides them.
        ruled = sorted(scores, key=lambda i: (-round(scores[i], 9), -self.counts[i], i))
        return _then_popular(ruled, self.popular())


class NearItems(StreamingBaseline):
    """Items near the user's last NEAR items: Σ w(j, item) over them, by the item-to-item weights
    ``nearest`` defines ({j: {i: w}}), recounted lazily after an apply."""

    def __init__(self) -> None:
        super().__init__()
        self.near: dict[str, dict[str, float]] | None = None

    def changed(self) -> None:
        self.near = None

    def nearest(self) -> dict[str, dict[str, float]]:
        raise NotImplementedError

    def scores(self, history: list[int]) -> dict[int, float]:
        """{item: Σ w(j, item) over the last NEAR items j}, items near one of them only."""
        if self.near is None:
            self.near = self.nearest()
        acc: dict[int, float] = {}
        for j in history[-NEAR:]:
            for item, weight in self.near.get(self.ids[j], {}).items():
                acc[self.index[item]] = acc.get(self.index[item], 0.0) + weight
        return acc

    def ranked(self, history: list[int]) -> Iterable[int]:
        scores = self.scores(history)
        near = sorted(scores, key=lambda i: (-round(scores[i], 9), -self.counts[i], i))
        return _then_popular(near, self.popular())


class ItemNeighbours(NearItems):
    name = "item-knn"

    def __init__(self, recent: int = 50, keep: int = 100) -> None:
        super().__init__()
        self.recent, self.keep = recent, keep

    def nearest(self) -> dict[str, dict[str, float]]:
        return neighbours([[self.ids[i] for i in h[-self.recent:]] for h in self.histories.values()], self.keep)


class Ease(NearItems):
    name = "ease"

    def __init__(self, recent: int = 50, keep: int = 100) -> None:
        super().__init__()
        self.keep = keep
        self.pairs = Cooccurrence(window=recent - 1)

    def learn(self, history: list[int], item: int) -> None:
        self.pairs.add([[self.ids[i] for i in [*history[-self.pairs.window:], item]]], [1])

    def nearest(self) -> dict[str, dict[str, float]]:
        return self.pairs.weights(self.keep)


def neighbours(sequences: Iterable[Sequence[str]] | pa.Array | pa.ChunkedArray, keep: int) -> dict[str, dict[str, float]]:
    """{j: its ``keep`` nearest items i: cos(j, i) > 0}, the cosine of j's and i's columns in the binary
    users × items matrix of users' recent items (``sequences``), among the NEAR_ITEMS most popular items;
    ties by id. A sparse product, then each row's nearest from a dense block."""
    lists = list_array(sequences)
    counts = popularity(lists)
    names = sorted(sorted(counts, key=lambda i: (-counts[i], i))[:NEAR_ITEMS])  # by id: a stable sort ties by id
    if len(names) < 2:
        return {}
    code = pc.fill_null(pc.index_in(pc.list_flatten(lists), pa.array(names)), -1).to_numpy()
    owner = pc.list_parent_indices(lists).to_numpy()
    kept = code >= 0
    held = sparse.csr_matrix((np.ones(int(kept.sum()), np.float32), (owner[kept], code[kept])),
                             shape=(len(lists), len(names)))
    held.sum_duplicates()
    held.data[:] = 1.0  # a user holds an item or not, however often it recurs in their recent items
    shared = (held.T @ held).tocsr()  # [items, items]: users holding both
    norm = np.sqrt(shared.diagonal())
    keep = min(keep, len(names) - 1)
    j, i, cosine = [], [], []
    for first in range(0, len(names), NEAR_BLOCK):
        rows = np.arange(first, min(first + NEAR_BLOCK, len(names)))
        block = shared[rows].toarray() / np.maximum(norm[rows, None] * norm[None, :], 1e-12)  # [R, items]
        block[np.arange(len(rows)), rows] = 0.0  # never its own neighbour
        nearest = np.argsort(-block, axis=1, kind="stable")[:, :keep]
        values = np.take_along_axis(block, nearest, axis=1)
        j.append(np.repeat(rows, keep)), i.append(nearest.ravel()), cosine.append(values.ravel())
    j, i, cosine = np.concatenate(j), np.concatenate(i), np.concatenate(cosine)
    some = cosine > 0
    return rows_of(names, j[some], i[some], cosine[some].astype(np.float64), None)


class CategoryTrend(StreamingBaseline):
    """``model.trend`` alone: the user's share of each category among their newest ``recent`` items ×
    each item's share of its category's decayed events (items without a category score nothing)."""

    name = "cat-trend"

    def __init__(self, categories: Mapping[str, str | None], recent: int = MIX_ITEMS) -> None:
        super().__init__()
        self.recent = recent
        self.trend = Trend(categories)
        self.shares: dict[str, tuple[str, float]] | None = None  # the trend's, as of the last apply
        self.categories: dict[str, dict[str, float]] = {}  # by_category(shares)

    def learn(self, history: list[int], item: int) -> None:
        self.trend.add([[self.ids[item]]], [1])

    def changed(self) -> None:
        self.shares = None

    def ranked(self, history: list[int]) -> Iterable[int]:
        if self.shares is None:
            self.shares = self.trend.shares()
            self.categories = by_category(self.shares)
        scored = user_scores([self.ids[i] for i in history[-self.recent:]], self.shares, self.categories)
        trending = sorted(scored, key=lambda i: (-scored[i], i))
        return _then_popular([self.index[i] for i in trending], self.popular())


def _then_popular(first: list[int], popular: np.ndarray) -> Iterator[int]:
    """``first``, then the popular items not in it (the zero scores, tied, by popularity)."""
    yield from first
    taken = set(first)
    yield from (int(i) for i in popular if int(i) not in taken)


def streaming_baselines(categories: Mapping[str, str | None], window: int = 2000) -> list[StreamingBaseline]:
    """The baselines, fresh: §7a's pop, recent-pop (``window`` events) and rules, item-knn, ease and
    cat-trend (over the items' ``categories``)."""
    return [MostPopular(), RecentPopular(window), SequentialRules(), ItemNeighbours(), Ease(), CategoryTrend(categories)]
