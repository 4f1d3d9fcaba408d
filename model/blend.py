"""The serving blend: the model's score beside two online signals of the stream, with weights learnt
from the stream itself (DESIGN §7a's baselines are the bar; issue 20).

A candidate item i of a user u gets features (``FEATURES``):

- ``model``: the max cosine of i over u's K interests (the model's own score);
- ``rules``: log(1 + Σ over u's last ``LAST`` items j, the most recent first (recency r = 1, 2, …),
  of follows[j → i] / r), where follows[j → i] adds 1/d each time i came d ≤ ``BACK`` steps after j in
  somebody's recent items (the sequential rules of ``model.baselines``);
- ``popular``: log(1 + how many users' recent items hold i).

Its score is w · features. ``fit`` learns w by softmax regression: each example is an event the
system has already applied — the features of its candidates as they were *before* the event, and
which candidate the user then chose — so the weights only ever come from the past (prequential),
never from the events they will score. ``without_model`` is the same blend with the model's weight
held at 0: the model's own share is the gap between the two.

Pure numpy/torch: no settings, no store.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

FEATURES = ("model", "rules", "popular")
BACK = 3  # follows[j → i] counts i up to this many steps after j
LAST = 5  # a user's rules score reads this many of their newest items
L2 = 1e-3  # keeps weights finite when a feature separates the examples perfectly
STEPS = 50  # Adam steps per fit (warm-started from the previous weights)
LR = 0.05


@dataclass
class Signals:
    """The stream's item-level state the blend reads: follows[j][i] and per-item user counts."""

    follows: dict[str, dict[str, float]] = field(default_factory=dict)
    popular: dict[str, int] = field(default_factory=dict)

    @classmethod
    def count(cls, sequences: Iterable[Sequence[str]]) -> Signals:
        """From users' recent items (each oldest first): follows and popularity, as defined above."""
        out = cls()
        for seq in sequences:
            for pos, item in enumerate(seq):
                out.popular[item] = out.popular.get(item, 0) + 1
                for distance in range(1, min(BACK, pos) + 1):
                    row = out.follows.setdefault(seq[pos - distance], {})
                    row[item] = row.get(item, 0.0) + 1.0 / distance
        return out

    def rules(self, recent: Sequence[str]) -> dict[str, float]:
        """{item: Σ follows[j → item] / recency} over the user's last LAST items j."""
        acc: dict[str, float] = {}
        for recency, j in enumerate(reversed(recent[-LAST:]), start=1):
            for item, count in self.follows.get(j, {}).items():
                acc[item] = acc.get(item, 0.0) + count / recency
        return acc

    def top_popular(self, n: int) -> list[str]:
        return [i for i, _ in sorted(self.popular.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]

    def kept(self, follows: int, popular: int) -> Signals:
        """What the serving tables hold: each item's ``follows`` heaviest followers, the ``popular`` most
        popular items (the weights are fitted on exactly what the readers will see)."""
        return Signals({j: dict(sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[:follows])
                        for j, row in self.follows.items()},
                       dict(sorted(self.popular.items(), key=lambda kv: (-kv[1], kv[0]))[:popular]))


def candidates(signals: Signals, recent: Sequence[str], pool: dict[str, float], popular: Sequence[str],
               seen: set[str]) -> tuple[list[str], np.ndarray]:
    """A user's candidates and their features [len(FEATURES), C]: the model's ``pool`` ({item: cosine},
    its top items), the items the rules reach from ``recent`` (the user's items, oldest first) and
    ``popular``, none in ``seen``. A candidate outside the pool scores the pool's lowest cosine for the
    model: being outside the model's top, its own cosine is no higher."""
    rules = signals.rules(recent)
    ids = [i for i in dict.fromkeys([*pool, *rules, *popular]) if i not in seen]
    floor = min(pool.values()) if pool else 0.0
    return ids, np.stack([
        np.array([pool.get(i, floor) for i in ids], dtype=np.float32),
        np.log1p(np.array([rules.get(i, 0.0) for i in ids], dtype=np.float32)),
        np.log1p(np.array([signals.popular.get(i, 0) for i in ids], dtype=np.float32)),
    ]).reshape(len(FEATURES), len(ids))


@dataclass
class Example:
    """One applied event: its candidates' features [F, C] before it, and the chosen candidate's column."""

    features: np.ndarray
    chosen: int


@dataclass
class Blend:
    """w [F] over FEATURES; ``fitted_on``: how many examples the last fit saw (0: the prior)."""

    weights: np.ndarray = field(default_factory=lambda: np.array([1.0, 0.0, 0.0], dtype=np.float32))
    fitted_on: int = 0

    def score(self, features: np.ndarray) -> np.ndarray:
        """features [F, C] → scores [C]."""
        return self.weights @ features

    def without_model(self) -> Blend:
        return Blend(self.weights * np.array([0.0, 1.0, 1.0], dtype=np.float32), self.fitted_on)

    def to_json(self) -> dict:
        return {"features": list(FEATURES), "weights": [round(float(w), 6) for w in self.weights],
                "fitted_on": self.fitted_on}

    @classmethod
    def from_json(cls, d: dict) -> Blend:
        if list(d.get("features", [])) != list(FEATURES):
            return cls()  # another feature set: start from the prior rather than misread the weights
        return cls(np.asarray(d["weights"], dtype=np.float32), int(d.get("fitted_on", 0)))


def fit(examples: Sequence[Example], start: Blend | None = None, *, use_model: bool = True) -> Blend:
    """Softmax regression of the chosen candidate over each example's candidates (L2 ``L2``),
    ``STEPS`` Adam steps from ``start``'s weights. ``use_model`` False keeps the model's weight at 0."""
    start = start or Blend()
    if not examples:
        return start
    width = max(e.features.shape[1] for e in examples)
    x = torch.zeros(len(examples), len(FEATURES), width)
    mask = torch.ones(len(examples), width, dtype=torch.bool)  # True = padding
    for row, e in enumerate(examples):
        x[row, :, : e.features.shape[1]] = torch.as_tensor(e.features)
        mask[row, : e.features.shape[1]] = False
    chosen = torch.as_tensor([e.chosen for e in examples])
    keep = torch.tensor([1.0 if use_model else 0.0, 1.0, 1.0])
    w = torch.as_tensor(start.weights * keep.numpy(), dtype=torch.float32).clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=LR)
    for _ in range(STEPS):
        logits = torch.einsum("f,bfc->bc", w * keep, x).masked_fill(mask, -1e9)
        loss = torch.nn.functional.cross_entropy(logits, chosen) + L2 * (w * keep).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return Blend((w * keep).detach().numpy().astype(np.float32), len(examples))
