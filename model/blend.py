"""The serving blend: the model's score beside online signals of the stream, with weights learnt
from the stream itself (DESIGN §7a's baselines are the bar; issue 20).

A candidate item i of a user u gets features (``FEATURES``):

- ``model``: the max cosine of i over u's K interests (the model's own score);
- ``rules``: log(1 + Σ over u's last ``LAST`` items j, the most recent first (recency r = 1, 2, …),
  of follows[j → i] / r), where follows[j → i] adds 1/d each time i came d ≤ ``BACK`` steps after j in
  somebody's recent items (the sequential rules of ``model.baselines``);
- ``popular``: log(1 + how many users' recent items hold i);
- ``neighbours``: Σ over u's last ``NEAR`` items j of w(j, i), item-to-item weights (order-free: what
  the rules miss when a user's items come in no fixed order, as in ml-100k's rating sessions, or when
  the item that predicts i is more than ``BACK`` steps before it). Since session 24 w is EASE's
  (``model.ease``) over co-occurrence counted along the stream; until then the cosine of the two
  items' columns in the users × items matrix of recent items (now the item-knn baseline's).
- ``trend``: the user's share of i's category among their newest items × i's share of its category's
  heat (``model.trend``, take rates): what the stream is taking up now in the categories the user
  takes (session 27; on the synthetic log's validation seed it lifted the signals-only blend from
  0.169 to 0.194; the steady shares of session 28, 0.196 → 0.208, new items 0.148 → 0.271; the take
  rates of session 29, 0.208 → 0.215).

- ``fresh``: log(1 + the item's events so far) while it is fresh (below), 0 otherwise: how fast the
  stream is taking up an item too new for the model and the counts behind the other signals. Its
  weight is fitted after the others, under theirs (session 31: on ml-100k's first 60,000 events the
  signals-only blend 0.0472 → 0.0480, +0.0008 ± 0.0003, new items 0.008 → 0.034; on the synthetic
  validation seed 0.2172 → 0.2173, the weight mostly 0 there, where the trend already ranks new items).

The features are weighed by ``model.blend_weights``: w · features, w fitted on the stream's past
events, fresh slots and a blend per history length.

Pure numpy/Arrow: no settings, no store.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import sparse

from model.trend import MIX_ITEMS, by_category, user_scores

FEATURES = ("model", "rules", "popular", "neighbours", "trend", "fresh")
BACK = 3  # follows[j → i] counts i up to this many steps after j
# Follows are counted in 1/FOLLOW_UNITS steps, so 1/distance is a whole number of them: sums are exact
# whatever order the events are added in, and so are the ties between two items' follows.
FOLLOW_UNITS = math.lcm(*range(1, BACK + 1))
LAST = 5  # a user's rules score reads this many of their newest items
NEAR = 20  # a user's neighbours score reads this many of their newest items
NEAR_CANDIDATES = 50  # the items the neighbours score highest: candidates beside the pool, rules and popular
TREND_CANDIDATES = 50  # the items the user's trend scores highest: candidates too
TREND_SCALE = 300.0  # a trend score is a probability, ~0.01–0.05 at the top: ×300 puts it on the grid's scale
COUNT_BLOCK = 1 << 18  # users' recent items whose follows are counted at once (bounds the count's memory)
FRESH_EVENTS = 5000  # an item is fresh while its first event is among the stream's last this many
FRESH_CANDIDATES = 100  # the fresh items with the most events: candidates for every user


@dataclass
class Signals:
    """The stream's item-level state the blend reads: follows[j][i], per-item user counts and each
    item's nearest neighbours {j: {i: cos(j, i)}}."""

    follows: dict[str, dict[str, float]] = field(default_factory=dict)
    popular: dict[str, int] = field(default_factory=dict)
    neighbours: dict[str, dict[str, float]] = field(default_factory=dict)
    fresh: dict[str, int] = field(default_factory=dict)  # fresh item → its events so far
    trend: dict[str, tuple[str, float]] = field(default_factory=dict)  # item → (category, share): model.trend

    @classmethod
    def count(cls, sequences: Iterable[Sequence[str]] | pa.Array | pa.ChunkedArray, keep: int | None = None) -> Signals:
        """From users' recent items (each oldest first; lists, or an Arrow list column): follows and
        popularity, as defined above; with ``keep``, each item's ``keep`` heaviest followers only."""
        lists = list_array(sequences)
        return cls(Follows.count(lists).top(keep), popularity(lists))

    def rules(self, recent: Sequence[str]) -> dict[str, float]:
        """{item: Σ follows[j → item] / recency} over the user's last LAST items j."""
        acc: dict[str, float] = {}
        for recency, j in enumerate(reversed(recent[-LAST:]), start=1):
            for item, count in self.follows.get(j, {}).items():
                acc[item] = acc.get(item, 0.0) + count / recency
        return acc

    def near(self, recent: Sequence[str]) -> dict[str, float]:
        """{item: Σ cos(j, item)} over the user's last NEAR items j."""
        acc: dict[str, float] = {}
        for j in recent[-NEAR:]:
            for item, cosine in self.neighbours.get(j, {}).items():
                acc[item] = acc.get(item, 0.0) + cosine
        return acc

    @cached_property
    def trend_categories(self) -> dict[str, dict[str, float]]:
        return by_category(self.trend)

    def trending(self, recent: Sequence[str]) -> dict[str, float]:
        """{item: the user's trend score} (``model.trend``) over the user's last MIX_ITEMS items."""
        return user_scores(recent[-MIX_ITEMS:], self.trend, self.trend_categories)

    def top_popular(self, n: int) -> list[str]:
        return [i for i, _ in sorted(self.popular.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]

    def kept(self, follows: int, popular: int) -> Signals:
        """What the serving tables hold: each item's ``follows`` heaviest followers, the ``popular`` most
        popular items, the neighbours as counted (the weights are fitted on exactly what the readers will see)."""
        return Signals({j: dict(sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[:follows])
                        for j, row in self.follows.items()},
                       dict(sorted(self.popular.items(), key=lambda kv: (-kv[1], kv[0]))[:popular]), self.neighbours,
                       self.fresh, self.trend)

    def fresh_flags(self, names: Sequence[str]) -> np.ndarray:
        """Which of ``names`` are fresh (the flags of ``model.blend_weights``' ``top`` and ``Example``)."""
        return np.array([i in self.fresh for i in names], dtype=bool)

    def top_fresh(self) -> list[str]:
        """The FRESH_CANDIDATES fresh items with the most events, ties by id."""
        return [i for i, _ in sorted(self.fresh.items(), key=lambda kv: (-kv[1], kv[0]))[:FRESH_CANDIDATES]]


class RunningPairs:
    """A running count of item pairs along the stream, as a sparse items × items matrix whose rows and
    columns are items in order of first sight; what each event adds is the subclass's. Over 100k users'
    recent items it has millions of pairs: as Python dicts (~100 B a pair) they were the worker's
    largest allocation."""

    def __init__(self) -> None:
        self.names: list[str] = []  # the item of each row and column
        self.code: dict[str, int] = {}
        self.matrix = sparse.csr_matrix((0, 0), dtype=np.float64)
        self._added: tuple[list[int], list[int], list[float]] = ([], [], [])  # (row, column, weight) since the last merge
        self._blocks: list[tuple[np.ndarray, np.ndarray]] = []  # (rows, columns) of weight 1 since the last merge

    def encode(self, lists: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Number the items of ``lists`` (users' items) as the rows and columns of a count from nothing;
        returns each listed item's code and the index of the list it is in."""
        encoded = pc.list_flatten(lists).dictionary_encode()
        self.names = encoded.dictionary.to_pylist()
        self.code = {name: c for c, name in enumerate(self.names)}
        return encoded.indices.to_numpy(), pc.list_parent_indices(lists).to_numpy()

    def code_of(self, item: str) -> int:
        """The row and column of ``item``, a new one at its first sight."""
        code = self.code.get(item)
        if code is None:
            code = self.code[item] = len(self.names)
            self.names.append(item)
        return code

    def merge(self) -> None:
        """Fold the pairs added since the last merge into the matrix (one sparse sum, not one per event)."""
        n = len(self.names)
        held = self.matrix
        if held.shape[0] < n:  # items first seen since the last merge: empty rows and columns
            grown = np.r_[held.indptr, np.full(n - held.shape[0], held.indptr[-1])]
            held = sparse.csr_matrix((held.data, held.indices, grown), shape=(n, n))
        rows, cols, weights = self._added
        if rows:
            held = held + sparse.csr_matrix((np.array(weights, dtype=np.float64), (np.array(rows), np.array(cols))),
                                            shape=(n, n))
        if self._blocks:
            block_rows, block_cols = (np.concatenate(part) for part in zip(*self._blocks))
            held = held + sparse.csr_matrix((np.ones(len(block_rows)), (block_rows, block_cols)), shape=(n, n))
        self.matrix, self._added, self._blocks = held, ([], [], []), []


class Follows(RunningPairs):
    """The running count follows[j → i] along the stream (the module doc); counting it through
    ``np.unique`` was once the worker's memory peak, hence the blocks."""

    @classmethod
    def count(cls, sequences: Iterable[Sequence[str]] | pa.Array | pa.ChunkedArray) -> Follows:
        """Every user's follows in ``sequences`` (users' recent items, each oldest first), COUNT_BLOCK items
        at a time: one block's pairs are all the transient memory it takes."""
        out = cls()
        code, owner = out.encode(list_array(sequences))
        if not len(code):
            return out
        n = len(out.names)
        out.matrix = sparse.csr_matrix((n, n), dtype=np.float64)
        for first in range(0, len(code), COUNT_BLOCK):
            j, i, weight = [], [], []
            for distance in range(1, BACK + 1):
                last = min(first + COUNT_BLOCK, len(code) - distance)
                # positions p and p + distance in one user's items: a follow
                same = first + np.flatnonzero(owner[first + distance : last + distance] == owner[first:last])
                j.append(code[same]), i.append(code[same + distance])
                weight.append(np.full(len(same), FOLLOW_UNITS // distance, dtype=np.float64))
            out.matrix = out.matrix + sparse.csr_matrix(
                (np.concatenate(weight), (np.concatenate(j), np.concatenate(i))), shape=(n, n))
        return out

    def add(self, recent: Sequence[str], new: int) -> None:
        """Count the follows of a user's ``new`` newest events, ``recent`` being their newest items
        (oldest first, the new ones last): a running count grows by the events since the last one."""
        rows, cols, weights = self._added
        for pos in range(max(0, len(recent) - new), len(recent)):
            for distance in range(1, min(BACK, pos) + 1):
                rows.append(self.code_of(recent[pos - distance]))
                cols.append(self.code_of(recent[pos]))
                weights.append(FOLLOW_UNITS // distance)

    def top(self, keep: int | None = None) -> dict[str, dict[str, float]]:
        """{j: {i: follows[j → i]}}, the heaviest first, ties by id; with ``keep``, each j's ``keep`` first
        (cut before anything becomes Python)."""
        self.merge()
        held, n = self.matrix, len(self.names)
        by_name = np.empty(n, dtype=np.int32)
        by_name[np.argsort(np.array(self.names, dtype=object), kind="stable")] = np.arange(n, dtype=np.int32)
        per_row = np.diff(held.indptr)
        row = np.repeat(np.arange(n, dtype=np.int32), per_row)
        order = np.lexsort((by_name[held.indices], -held.data, row))  # rows stay where the CSR has them
        if keep is not None:
            order = order[np.arange(len(order)) - np.repeat(held.indptr[:-1], per_row) < keep]
        return rows_of(self.names, row[order], held.indices[order], held.data[order] / FOLLOW_UNITS, None)


class FirstSeen:
    """Which items are fresh: each item's first applied event, numbered along the stream."""

    def __init__(self) -> None:
        self.first: dict[str, int] = {}  # item → the stream's event count at its first event
        self.counts: dict[str, int] = {}  # fresh item → its events so far
        self.events = 0  # applied events so far

    def old(self, items: Iterable[str]) -> None:
        """Items already in the stream when counting began (a start): never fresh."""
        for item in items:
            self.first.setdefault(item, -FRESH_EVENTS)

    def add(self, items: Iterable[str]) -> None:
        """Newly applied events' items, in the order applied."""
        for item in items:
            self.events += 1
            self.first.setdefault(item, self.events)
            if self.events - self.first[item] < FRESH_EVENTS:
                self.counts[item] = self.counts.get(item, 0) + 1

    def fresh(self) -> dict[str, int]:
        """{fresh item: its events}; items no longer fresh are forgotten."""
        self.counts = {i: c for i, c in self.counts.items() if self.events - self.first[i] < FRESH_EVENTS}
        return dict(self.counts)


def list_array(sequences: Iterable[Sequence[str]] | pa.Array | pa.ChunkedArray) -> pa.Array:
    """Users' item lists as one Arrow list<string> array."""
    if isinstance(sequences, pa.ChunkedArray):
        return sequences.combine_chunks() if sequences.num_chunks else pa.array([], pa.list_(pa.string()))
    if isinstance(sequences, pa.Array):
        return sequences
    return pa.array([list(s) for s in sequences], pa.list_(pa.string()))


def rows_of(names: list[str], j: np.ndarray, i: np.ndarray, weight: np.ndarray, keep: int | None) -> dict[str, dict[str, float]]:
    """{names[j]: {names[i]: weight}} from pairs sorted by j, the heaviest first within each j; with
    ``keep``, each j's ``keep`` first only (cut before anything becomes Python)."""
    if keep is not None:
        first = np.r_[0, np.flatnonzero(j[1:] != j[:-1]) + 1] if len(j) else np.zeros(0, np.int64)
        rank = np.arange(len(j)) - np.repeat(first, np.diff(np.r_[first, len(j)]))
        j, i, weight = j[rank < keep], i[rank < keep], weight[rank < keep]
    out: dict[str, dict[str, float]] = {}
    for a, b, w in zip(j.tolist(), i.tolist(), weight.tolist()):
        out.setdefault(names[a], {})[names[b]] = w
    return out


def popularity(lists: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """{item: how many times it appears} over an Arrow list column (users' recent items)."""
    counted = pc.value_counts(pc.list_flatten(list_array(lists)))
    return dict(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist()))


def pool_of(scores: np.ndarray, ids: Sequence[str], seen: set[str], size: int) -> dict[str, float]:
    """The model's pool for ``candidates``: {item: score} of the ``size`` best-scored of ``ids`` (scores
    [N], one per id) that are not in ``seen``."""
    pool: dict[str, float] = {}
    for j in np.argsort(-scores, kind="stable")[: size + len(seen)]:
        if ids[j] not in seen and len(pool) < size:
            pool[ids[j]] = float(scores[j])
    return pool


def model_candidates(signals: Signals, recent: Sequence[str], scores: np.ndarray, ids: Sequence[str],
                     fresh_rows: Sequence[int], popular: Sequence[str], size: int) -> tuple[list[str], np.ndarray]:
    """``candidates`` with the model's scores [N] of ``ids``: its pool of the ``size`` best items the
    user has not had, and the exact scores of the fresh items (``fresh_rows``: their indices in ``ids``)."""
    seen = set(recent)
    return candidates(signals, recent, pool_of(scores, ids, seen, size), popular, seen,
                      {ids[j]: float(scores[j]) for j in fresh_rows})


def candidates(signals: Signals, recent: Sequence[str], pool: dict[str, float], popular: Sequence[str],
               seen: set[str], known: dict[str, float] | None = None) -> tuple[list[str], np.ndarray]:
    """A user's candidates and their features [len(FEATURES), C]: the model's ``pool`` ({item: cosine},
    its top items), the items the rules reach from ``recent`` (the user's items, oldest first),
    ``popular``, the NEAR_CANDIDATES items nearest to the user's and the fresh ones, none in ``seen``.
    ``known``: exact cosines of candidates outside the pool (the fresh ones); any other candidate outside
    the pool scores the pool's lowest cosine for the model: being outside the model's top, its own
    cosine is no higher."""
    rules = signals.rules(recent)
    near = signals.near(recent)
    nearest = sorted((i for i in near if i not in seen), key=lambda i: (-near[i], i))[:NEAR_CANDIDATES]
    trend = signals.trending(recent)
    trending = sorted((i for i in trend if i not in seen), key=lambda i: (-trend[i], i))[:TREND_CANDIDATES]
    ids = [i for i in dict.fromkeys([*pool, *rules, *popular, *nearest, *trending, *signals.top_fresh()])
           if i not in seen]
    floor = min(pool.values()) if pool else 0.0
    known = known or {}
    return ids, np.stack([
        np.array([pool.get(i, known.get(i, floor)) for i in ids], dtype=np.float32),
        np.log1p(np.array([rules.get(i, 0.0) for i in ids], dtype=np.float32)),
        np.log1p(np.array([signals.popular.get(i, 0) for i in ids], dtype=np.float32)),
        np.array([near.get(i, 0.0) for i in ids], dtype=np.float32),
        TREND_SCALE * np.array([trend.get(i, 0.0) for i in ids], dtype=np.float32),
        np.log1p(np.array([signals.fresh.get(i, 0) for i in ids], dtype=np.float32)),
    ]).reshape(len(FEATURES), len(ids))
