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

**Fresh slots.** An item is *fresh* while its first applied event is among the stream's last
``FRESH_EVENTS``. The model has barely trained on it (or not at all) and the counts behind the other
signals are small, so a blend fitted on every event rarely ranks it, however many users take it up.
So ``fresh_slots`` s of the top k are kept for fresh items: the blend's best k − s, then the s best
fresh candidates left (by the same blended score, so each user gets the fresh items nearest their
own), topped up from the blend when fewer are fresh. s is fitted like the weights, on the same past
events (0 when slots do not pay).

**Two blends by history length.** Users with fewer than ``SPLIT`` items have weights (and fresh slots)
of their own, fitted on their own events (``Blends``, ``fit_blends``): a new user's few items give the
rules, neighbours and trend little to read, and one set of weights for everybody is the long
histories' (ml-100k's first 60,000 events: 0.0480 → 0.0508 signals-only, new items 0.034 → 0.051).

Its score is w · features. ``fit`` chooses w on a small grid by Recall@10: each example is an event the
system has already applied — the features of its candidates as they were *before* the event, and
which candidate the user then chose — so the weights only ever come from the past (prequential),
never from the events they will score. ``fit(..., use_model=False)`` is the same blend with the
model's weight held at 0: the model's own share is the gap between the two.

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
TREND_GRID = (0.0, 0.5, 1.0, 2.0, 4.0)
COUNT_BLOCK = 1 << 18  # users' recent items whose follows are counted at once (bounds the count's memory)
TOP = 10  # the blend is fitted for Recall@TOP
MIN_EXAMPLES = 500  # no fit on fewer: the prior (PRIOR) serves until then
TIE_POPULAR, TIE_MODEL = 1e-4, 1e-6  # tie-breakers, far below any grid step
TIES = np.array([TIE_MODEL, 0.0, TIE_POPULAR, 0.0, 0.0, 0.0], dtype=np.float32)  # added to every weights, per feature
# Until a first fit: the model beside the neighbours and the trend, ties by popularity. The model alone (the
# prior until session 25) cost the first chunks on validation (simulate --in-process: ml-100k 0.0529 →
# 0.0542, synthetic seed 1 0.1669 → 0.1711); the trend's weight 1 (session 27) lifted the signals-only
# arm on both slices (paired: ml-100k +0.0015 ± 0.0010, synthetic seed 1 +0.0022 ± 0.0008).
PRIOR = (1.0, 0.0, 0.05, 1.0, 1.0, 0.0)
FRESH_EVENTS = 5000  # an item is fresh while its first event is among the stream's last this many
FRESH_CANDIDATES = 100  # the fresh items with the most events: candidates for every user
SLOTS = (0, 1, 2, 3)  # fresh slots tried by ``fit``
# Users with fewer items than this get a blend of their own (``Blends``): with few items the rules,
# neighbours and trend have little to read, and the weights that suit a long history misrank them.
# Validation signals-only (session 32), paired against one blend, split 10 / 20 / 30 / 40: synthetic
# seed 1 +0.0012 / +0.0011 / +0.0021 / +0.0032 (± 0.0012), seed 2 −0.0011 / +0.0008 / −0.0002 /
# +0.0007 (± 0.0013), ml-100k's first 60,000 events – / +0.0018 / – / +0.0028 (± 0.0008). A user's
# length is counted on their recent items (``recent_len``, 50 by default), as top-k reads them.
SPLIT = 40
FIT_GRID_BLOCK = 64  # weights scored per matrix product in ``fit`` (bounds its memory)
FIT_EXAMPLE_BLOCK = 256  # examples per block of ``rivals_of``
# The weights tried (model, rules, popular, neighbours, trend): every mix of these (only the ratios rank),
# each signal alone among them; the fresh weight 0 (it is fitted next, from FRESH_GRID). Features: a cosine
# in [-1, 1], log counts up to ~10 and a sum of NEAR cosines.
GRID = np.array([(m, r, p, n, t, 0.0) for m in (0.0, 0.25, 0.5, 1, 2, 4, 8, 16) for r in (0.0, 0.5, 1.0)
                 for p in (0.0, 0.1, 0.2, 0.4, 0.8, 1.6) for n in (0.0, 0.25, 0.5, 1, 2, 4) for t in TREND_GRID
                 if m or r or p or n or t], dtype=np.float32)
# The fresh weight, tried under the grid's best weights: a second pass over only these, not a grid six
# times the size (the fit's time is the worker's).
FRESH_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


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
        """Which of ``names`` are fresh (``top``'s and ``Example``'s flags)."""
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


def top(blend: Blend, names: list[str], features: np.ndarray, k: int, fresh: Sequence[bool] = ()) -> list[tuple[str, float]]:
    """The ``k`` best (candidate, blended score), ties by candidate id: the blend's best k − s, then
    the best ``fresh`` (a flag per candidate) of the rest in s = ``blend.fresh_slots`` slots, topped up
    from the blend."""
    scores = blend.score(features)
    order = sorted(range(len(names)), key=lambda j: (-float(scores[j]), names[j]))
    main = order[: max(0, k - blend.fresh_slots)]
    rest = order[len(main):]
    slots = [j for j in rest if len(fresh) and fresh[j]][: k - len(main)]
    chosen = main + slots + [j for j in rest if j not in slots][: k - len(main) - len(slots)]
    return [(names[j], float(scores[j])) for j in chosen]


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


@dataclass
class Example:
    """One applied event: its candidates' features [F, C] before it, which were fresh [C], the chosen
    candidate's column and how many items the user had before it (which of ``Blends`` it trains)."""

    features: np.ndarray
    chosen: int
    fresh: np.ndarray | None = None
    length: int = SPLIT  # unless told: a long history


@dataclass
class Blend:
    """w [F] over FEATURES; ``fresh_slots`` of the top k kept for fresh items; ``fitted_on``: how many
    examples the last fit saw (0: the prior)."""

    weights: np.ndarray = field(default_factory=lambda: np.array(PRIOR, dtype=np.float32))
    fitted_on: int = 0
    fresh_slots: int = 0

    def score(self, features: np.ndarray) -> np.ndarray:
        """features [F, C] → scores [C]; equal blends (e.g. items no rule reaches, with the weights of the
        rules alone) are ordered by popularity, then by the model."""
        return self.score_weights() @ features

    def score_weights(self) -> np.ndarray:
        """The weights ``score`` applies, tie-breakers included."""
        return self.weights + TIES

    def to_json(self) -> dict:
        return {"features": list(FEATURES), "weights": [round(float(w), 6) for w in self.weights],
                "fitted_on": self.fitted_on, "fresh_slots": self.fresh_slots}

    @classmethod
    def from_json(cls, d: dict) -> Blend:
        if list(d.get("features", [])) != list(FEATURES):
            return cls()  # another feature set: start from the prior rather than misread the weights
        return cls(np.asarray(d["weights"], dtype=np.float32), int(d.get("fitted_on", 0)), int(d.get("fresh_slots", 0)))


@dataclass
class Blends:
    """A ``Blend`` for users with fewer than SPLIT items (``short``) and one for the rest (``long``)."""

    short: Blend = field(default_factory=Blend)
    long: Blend = field(default_factory=Blend)

    def of(self, length: int) -> Blend:
        """The blend of a user with ``length`` items."""
        return self.short if length < SPLIT else self.long

    @property
    def fresh_slots(self) -> int:
        """The most fresh slots either keeps (whether top-k needs the fresh items' exact cosines)."""
        return max(self.short.fresh_slots, self.long.fresh_slots)

    def to_json(self) -> dict:
        return {"split": SPLIT, "short": self.short.to_json(), "long": self.long.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> Blends:
        """Also reads one ``Blend`` (what versions before the split stored): both start from it."""
        if "short" not in d:
            return cls(Blend.from_json(d), Blend.from_json(d))
        return cls(Blend.from_json(d["short"]), Blend.from_json(d["long"]))


def fit_blends(examples: Sequence[Example], start: Blends, *, use_model: bool = True) -> Blends:
    """Each of ``start``'s blends ``fit`` on its own users' examples; while one has fewer than
    MIN_EXAMPLES of them (ml-100k's users come with 20 ratings or more: its short histories are rare),
    it is fitted on all of them."""
    short = [e for e in examples if e.length < SPLIT]
    long = [e for e in examples if e.length >= SPLIT]
    fitted = [fit(own if len(own) >= MIN_EXAMPLES else examples, blend, use_model=use_model)
              for own, blend in ((short, start.short), (long, start.long))]
    return Blends(*fitted)


def fit(examples: Sequence[Example], start: Blend | None = None, *, use_model: bool = True) -> Blend:
    """The weights of ``GRID`` under which most examples' chosen candidate ranks in the top ``TOP``
    (the metric the blend is judged by); ties go to ``start``'s weights, then to the grid's order. Then,
    under those weights, the fresh weight of ``FRESH_GRID`` by the same rule; then the fresh slots (of
    ``SLOTS``) with the most such examples, ties to the fewest.
    ``use_model`` False keeps the model's weight at 0."""
    start = start or Blend()
    if len(examples) < MIN_EXAMPLES:
        return start  # a few dozen events pick weights by chance (ml-100k: a chunk is a handful of users)
    grid = GRID if use_model else GRID[GRID[:, 0] == 0]
    width = max(e.features.shape[1] for e in examples)
    x = np.zeros((len(examples), len(FEATURES), width), dtype=np.float32)
    pad = np.ones((len(examples), width), dtype=bool)
    for row, e in enumerate(examples):
        x[row, :, : e.features.shape[1]] = e.features
        pad[row, : e.features.shape[1]] = False
    chosen = np.array([e.chosen for e in examples])
    blocks = rivals_of(x, pad, chosen)
    best = best_of(grid[:, :-1], hits_of(grid, blocks), start.weights[:-1])
    tried = np.repeat(grid[best : best + 1], len(FRESH_GRID), axis=0)
    tried[:, -1] = FRESH_GRID
    weights = tried[best_of(tried, hits_of(tried, blocks), start.weights)].astype(np.float32)
    fresh = np.zeros((len(examples), width), dtype=bool)
    for row, e in enumerate(examples):
        if e.fresh is not None:
            fresh[row, : len(e.fresh)] = e.fresh
    scores = np.einsum("f,bfc->bc", weights + TIES, x)
    scores[pad] = -np.inf
    slot_hits = [slot_hits_of(scores, fresh, chosen, s) for s in SLOTS]
    return Blend(weights, len(examples), SLOTS[int(np.argmax(slot_hits))])


def best_of(tried: np.ndarray, hits: np.ndarray, start: np.ndarray) -> int:
    """The row of ``tried`` [G, F] with the most ``hits`` [G]: ``start``'s weights where they are among
    the best, else the first."""
    same = np.flatnonzero(np.all(np.isclose(tried, start), axis=1))
    return int(same[0]) if len(same) and hits[same[0]] == hits.max() else int(np.argmax(hits))


def hits_of(grid: np.ndarray, blocks: Sequence[np.ndarray]) -> np.ndarray:
    """For each weights of ``grid`` [G, F], how many examples (``rivals_of``'s blocks) rank their chosen
    candidate in the top TOP."""
    hits = np.zeros(len(grid), dtype=np.int64)
    for rivals in blocks:
        for g in range(0, len(grid), FIT_GRID_BLOCK):
            scores = np.einsum("gf,bfc->gbc", grid[g : g + FIT_GRID_BLOCK] + TIES, rivals)  # [G, B, 1 + R]
            hits[g : g + FIT_GRID_BLOCK] += ((scores[..., 1:] > scores[..., :1]).sum(axis=2) < TOP).sum(axis=1)
    return hits


def rivals_of(x: np.ndarray, pad: np.ndarray, chosen: np.ndarray) -> list[np.ndarray]:
    """Examples x [B, F, C] (``pad`` [B, C]: no candidate) cut to what ``fit`` counts, in blocks of
    FIT_EXAMPLE_BLOCK examples with about as many rivals, each [b, F, 1 + R]: column 0 an example's
    ``chosen`` candidate, then its candidates that some weights could rank above it, padded with copies
    of the chosen (which never score above it). Every weight is ≥ 0, so a candidate no feature of which
    exceeds the chosen's never scores above it (rounding is monotone too): dropping those leaves every
    count as it was, and grouping examples by their rivals pads each block to its own widest, not the
    widest of all (on the synthetic slice: 160 rivals on average, 340 at most)."""
    rows = np.arange(len(chosen))
    target = x[rows, :, chosen]  # [B, F]
    rival = (x > target[..., None]).any(axis=1) & ~pad  # [B, C]
    counts = rival.sum(axis=1)
    blocks = []
    for part in np.array_split(np.argsort(counts, kind="stable"), max(1, -(-len(rows) // FIT_EXAMPLE_BLOCK))):
        width = int(counts[part].max(initial=0))
        order = np.argsort(~rival[part], axis=1, kind="stable")[:, :width]  # rivals first
        kept = np.where(np.take_along_axis(rival[part], order, axis=1)[:, None, :],
                        np.take_along_axis(x[part], order[:, None, :], axis=2), target[part][..., None])
        blocks.append(np.concatenate([target[part][..., None], kept], axis=2))
    return blocks


def slot_hits_of(scores: np.ndarray, fresh: np.ndarray, chosen: np.ndarray, slots: int) -> int:
    """How many examples (scores [B, C], fresh [B, C], chosen [B]) ``top`` with ``slots`` fresh slots
    would answer with the chosen candidate in the top TOP (without its top-up from the blend)."""
    rows = np.arange(len(chosen))
    target = scores[rows, chosen]
    above = scores > target[:, None]  # [B, C]
    rank = above.sum(axis=1)
    main = max(0, TOP - slots)
    # Fresh candidates in the blend's best ``main``: the main part takes them; the slots go to the rest.
    order = np.argsort(-scores, axis=1, kind="stable")[:, :main]
    fresh_in_main = np.take_along_axis(fresh, order, axis=1).sum(axis=1)
    fresh_above = (above & fresh).sum(axis=1)
    hit = (rank < main) | (fresh[rows, chosen] & (fresh_above - fresh_in_main < slots))
    return int(hit.sum())
