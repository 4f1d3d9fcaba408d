"""The serving blend's weights over the features of ``model.blend``.

Its score is w · features. ``fit`` chooses w on a small grid by Recall@10: each example is an event the
system has already applied — the features of its candidates as they were *before* the event, and
which candidate the user then chose — so the weights only ever come from the past (prequential),
never from the events they will score. ``fit(..., use_model=False)`` is the same blend with the
model's weight held at 0: the model's own share is the gap between the two.

**Fresh slots.** An item is *fresh* while its first applied event is among the stream's last
``model.blend.FRESH_EVENTS``. The model has barely trained on it (or not at all) and the counts behind the other
signals are small, so a blend fitted on every event rarely ranks it, however many users take it up.
So ``fresh_slots`` s of the top k are kept for fresh items: the blend's best k − s, then the s best
fresh candidates left (by the same blended score, so each user gets the fresh items nearest their
own), topped up from the blend when fewer are fresh. s is fitted like the weights, on the same past
events (0 when slots do not pay).

**Two blends by history length.** Users with fewer than ``SPLIT`` items have weights (and fresh slots)
of their own, fitted on their own events (``Blends``, ``fit_blends``): a new user's few items give the
rules, neighbours and trend little to read, and one set of weights for everybody is the long
histories' (ml-100k's first 60,000 events: 0.0480 → 0.0508 signals-only, new items 0.034 → 0.051).

**The model earns its weight.** A grid with the model's weight is eight times the grid without it: its best
row wins the past examples by a few more hits, by chance or by a lead the model loses as the stream moves on
(its cosines of items it never trained on are low, so a large weight buries the new ones). So the fit keeps
the model's weight only when it beats the best weights without it by more than ``MODEL_MARGIN`` standard
errors on the same examples; without it, the blend is the signals' alone, as good as ``use_model=False``.

Pure numpy: no settings, no store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from model.blend import FEATURES

TREND_GRID = (0.0, 0.5, 1.0, 2.0, 4.0)
TOP = 10  # the blend is fitted for Recall@TOP
MIN_EXAMPLES = 500  # no fit on fewer: the prior (PRIOR) serves until then
TIE_POPULAR, TIE_MODEL = 1e-4, 1e-6  # tie-breakers, far below any grid step
TIES = np.array([TIE_MODEL, 0.0, TIE_POPULAR, 0.0, 0.0, 0.0], dtype=np.float32)  # added to every weights, per feature
# Until a first fit: the model beside the neighbours and the trend, ties by popularity. The model alone (the
# prior until session 25) cost the first chunks on validation (simulate --in-process: ml-100k 0.0529 →
# 0.0542, synthetic seed 1 0.1669 → 0.1711); the trend's weight 1 (session 27) lifted the signals-only
# arm on both slices (paired: ml-100k +0.0015 ± 0.0010, synthetic seed 1 +0.0022 ± 0.0008).
PRIOR = (1.0, 0.0, 0.05, 1.0, 1.0, 0.0)
SLOTS = (0, 1, 2, 3)  # fresh slots tried by ``fit``
# Users with fewer items than this get a blend of their own (``Blends``): with few items the rules,
# neighbours and trend have little to read, and the weights that suit a long history misrank them.
# Validation signals-only (session 32), paired against one blend, split 10 / 20 / 30 / 40: synthetic
# seed 1 +0.0012 / +0.0011 / +0.0021 / +0.0032 (± 0.0012), seed 2 −0.0011 / +0.0008 / −0.0002 /
# +0.0007 (± 0.0013), ml-100k's first 60,000 events – / +0.0018 / – / +0.0028 (± 0.0008). A user's
# length is counted on their recent items (``recent_len``, 50 by default), as top-k reads them.
SPLIT = 40
# The model's weight is kept only while the model earns it: the grid's best weights with the model must beat its
# best without it, on the fit's own examples, by more than this many standard errors of their paired difference
# (McNemar's: the examples one hits and the other misses). A grid eight times the size picks some model weight by
# chance, and a weight that wins the past 2,000 examples by a handful need not win the next ones. Validation
# (session 33: one frozen v0001 per slice, exact-blend paired against the fit without the margin): ml-100k's first
# 15,000 events +0.0041 ± 0.0017 (0.0573 → 0.0613; signals-only 0.0611), synthetic seed 1 +0.0015 ± 0.0018, seed 2
# −0.0002 ± 0.0016 (new items 0.264 → 0.303, 0.216 → 0.251).
MODEL_MARGIN = 2.0
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
    MIN_EXAMPLES of them (a stream's first counts, or a stream of few new users), it is fitted on all
    of them."""
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
    x, pad, chosen = stacked(examples)
    blocks = rivals_of(x, pad, chosen)
    hits = hits_of(grid, blocks)
    best = best_of(grid[:, :-1], hits, start.weights[:-1])
    if grid[best, 0] > 0:
        free = np.flatnonzero(grid[:, 0] == 0)
        without = int(free[best_of(grid[free, :-1], hits[free], start.weights[:-1])])
        if not model_earns(grid[best], grid[without], blocks):
            best = without
    tried = np.repeat(grid[best : best + 1], len(FRESH_GRID), axis=0)
    tried[:, -1] = FRESH_GRID
    weights = tried[best_of(tried, hits_of(tried, blocks), start.weights)].astype(np.float32)
    fresh = np.zeros(pad.shape, dtype=bool)
    for row, e in enumerate(examples):
        if e.fresh is not None:
            fresh[row, : len(e.fresh)] = e.fresh
    scores = np.einsum("f,bfc->bc", weights + TIES, x)
    scores[pad] = -np.inf
    slot_hits = [slot_hits_of(scores, fresh, chosen, s) for s in SLOTS]
    return Blend(weights, len(examples), SLOTS[int(np.argmax(slot_hits))])


def stacked(examples: Sequence[Example]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Examples as arrays: features x [B, F, C] (zero-padded to the widest), pad [B, C] (no candidate),
    chosen [B]."""
    width = max(e.features.shape[1] for e in examples)
    x = np.zeros((len(examples), len(FEATURES), width), dtype=np.float32)
    pad = np.ones((len(examples), width), dtype=bool)
    for row, e in enumerate(examples):
        x[row, :, : e.features.shape[1]] = e.features
        pad[row, : e.features.shape[1]] = False
    return x, pad, np.array([e.chosen for e in examples])


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
            hits[g : g + FIT_GRID_BLOCK] += in_top(grid[g : g + FIT_GRID_BLOCK], rivals).sum(axis=1)
    return hits


def in_top(weights: np.ndarray, rivals: np.ndarray) -> np.ndarray:
    """weights [G, F], one block of ``rivals_of`` [B, F, 1 + R] → [G, B]: whether each example's chosen
    candidate ranks in the top TOP under each weights."""
    scores = np.einsum("gf,bfc->gbc", weights + TIES, rivals)
    return (scores[..., 1:] > scores[..., :1]).sum(axis=2) < TOP


def model_earns(with_model: np.ndarray, without: np.ndarray, blocks: Sequence[np.ndarray]) -> bool:
    """Whether weights ``with_model`` [F] hit more of the examples than ``without`` [F] by more than
    MODEL_MARGIN standard errors: of the examples exactly one of them hits, each counts ±1."""
    a, b = np.concatenate([in_top(np.stack([with_model, without]), rivals) for rivals in blocks], axis=1)
    gain, split = int((a & ~b).sum()) - int((b & ~a).sum()), int((a ^ b).sum())
    return gain > MODEL_MARGIN * np.sqrt(split)


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
