"""What is being taken now inside the categories a user takes: the serving blend's ``trend`` signal and
the ``cat-trend`` baseline (issue 20, session 27).

An item's *weight* is its events along the stream, each halved every HALF_LIFE events since; its
*share* is that weight over the weights of every counted item of its category. A user's *mix* is the
fraction of their recent items in each category, and their score of an item is

    mix[category of the item] × share of the item.

Co-occurrence (EASE) says which items go together but not which of them the stream is taking up this
week; recent popularity says that, but over every category at once. On the synthetic log a user's
next item is drawn from their topic mix, then by its (recency-boosted) popularity inside the topic,
and the topic is the item's category: on validation (seed 1, first 20,000 events) this score alone
gave R@10 0.197 against EASE's 0.168, and 0.211 on items released during the log (recent
popularity: 0.109). On ml-100k (first 15,000 events), where the category is a film's first genre, it
gave 0.044, below popularity's 0.048.

HALF_LIFE was chosen there (1,000: 0.175; 2,000: 0.197; 3,000: 0.200 but new items 0.173; no decay:
0.193, new items 0.049). A mix weighted towards the newest items (0.95^age) scored lower (0.190).
Pure python: no numpy, no settings.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

HALF_LIFE = 2000  # events
MIX_ITEMS = 50  # a user's mix is over this many of their newest items
KEEP = 4096  # items with the largest weights kept (the serving table's rows)
RESCALE = 1e100  # weights are stored × a growing scale (no pass over every item per event): renormalise past it


class Trend:
    """Decayed event counts per item, and each kept item's category and share."""

    def __init__(self, categories: Mapping[str, str | None], half_life: float = HALF_LIFE):
        self.categories = categories
        self.decay = 2.0 ** (1.0 / half_life)  # the scale's growth per event
        self.scale = 1.0
        self.raw: dict[str, float] = {}  # item → weight × scale

    def add(self, items: Sequence[str]) -> None:
        """Events of ``items``, taken as simultaneous: every earlier event decays by len(items) events."""
        self.scale *= self.decay ** len(items)
        for item in items:
            self.raw[item] = self.raw.get(item, 0.0) + self.scale
        if self.scale > RESCALE:
            self.raw = {i: w / self.scale for i, w in self.raw.items()}
            self.scale = 1.0

    def weight(self, item: str) -> float:
        return self.raw.get(item, 0.0) / self.scale

    def shares(self, keep: int = KEEP) -> dict[str, tuple[str, float]]:
        """{item: (category, share)} of the ``keep`` heaviest items (ties by id) that have a category;
        a share is over every counted item of the category, kept or not."""
        totals: Counter = Counter()
        for item, w in self.raw.items():
            if (c := self.categories.get(item)) is not None:
                totals[c] += w
        heaviest = sorted((i for i in self.raw if self.categories.get(i) is not None),
                          key=lambda i: (-self.raw[i], i))[:keep]
        return {i: (self.categories[i], self.raw[i] / totals[self.categories[i]]) for i in heaviest}


def by_category(shares: Mapping[str, tuple[str, float]]) -> dict[str, dict[str, float]]:
    """{category: {item: share}}: what ``user_scores`` reads."""
    out: dict[str, dict[str, float]] = {}
    for item, (category, share) in shares.items():
        out.setdefault(category, {})[item] = share
    return out


def user_scores(recent: Iterable[str], shares: Mapping[str, tuple[str, float]],
                categories: Mapping[str, dict[str, float]]) -> dict[str, float]:
    """{item: mix[its category] × its share} over the categories of the user's ``recent`` items found in
    ``shares`` (``categories``: ``by_category(shares)``); empty when none is."""
    mix = Counter(shares[i][0] for i in recent if i in shares)
    n = sum(mix.values())
    return {item: part / n * share for c, part in mix.items() for item, share in categories[c].items()}
