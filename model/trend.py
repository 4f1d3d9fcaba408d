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

**Steady shares** (``steady=True``, what the serving blend reads; session 28). Halving every 2,000
events keeps ~3,000 events in view, ~150 per category on the synthetic log: too few to rank a
category's 75 items well, and an old favourite that nobody took this week drops out. So an item's
*heat* adds to its share of the decayed weight its share of the stream's *rates*, where its rate is
its events over the events since its first one (+ STEADY_PRIOR, so that an item seen once a moment
ago is not the stream's favourite); the share is then heat over the category's heat. The rate is
what the item has drawn since it came, so it holds an old item's long-run popularity and lifts a new
item as soon as it draws. The counter alone on validation (the same slices), STEADY_PRIOR 500:
synthetic 0.196 → 0.208 (new items 0.209 → 0.306), ml-100k 0.0435 → 0.0438. STEADY_PRIOR chosen there, events one at a time: 200: 0.211 /
0.0433; 500: 0.208 / 0.0438; 1,000: 0.207 / 0.0440; 0 (the bare rate): 0.210 / 0.0397. Counted as
the worker counts (chunks of 500 at once, an item new in one taken from the chunk's middle), the
signals-only blend: 250: 0.2080 / 0.0585; 200: 0.2067 / 0.0585 (taken from a chunk's end, 500:
0.2089 / 0.0585, but a backlog's new items would look brand new). A second, slower decay instead of
the rate (half-lives 10,000 to ∞) gave 0.199 / 0.044. The release date of an item (the catalogue's
``ts``) as a boost: over the decayed shares, new items 0.44 but 0.190 overall; over the steady ones,
0.212 at best (× e for a release a day old) — not kept, as it needs the generator's notion of a
release and ml-100k's films have none. The cat-trend baseline keeps the plain decayed shares.
Pure python: no numpy, no settings.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

HALF_LIFE = 2000  # events
MIX_ITEMS = 50  # a user's mix is over this many of their newest items
KEEP = 4096  # items with the largest weights kept (the serving table's rows)
STEADY_PRIOR = 250  # events added to every item's exposure in its rate
RESCALE = 1e100  # weights are stored × a growing scale (no pass over every item per event): renormalise past it


class Trend:
    """Decayed event counts per item (and, steady, all-time counts and first events), and each kept
    item's category and share."""

    def __init__(self, categories: Mapping[str, str | None], half_life: float = HALF_LIFE, *, steady: bool = False):
        self.categories = categories
        self.steady = steady
        self.decay = 2.0 ** (1.0 / half_life)  # the scale's growth per event
        self.scale = 1.0
        self.raw: dict[str, float] = {}  # item → weight × scale
        self.clock = 0  # events added
        self.events: dict[str, int] = {}  # item → its events
        # item → when it came: the clock at the start or the middle of the add of its first event (``add``).
        # An add's order is not known: a worker adds what came since its last count, 30 s of events or a
        # backlog of thousands, and from the add's end every item new in it would have a rate as if it
        # had come just now (in a live synthetic run, a worker whose first count held 276 items and its
        # next the rest of the bootstrap scored 0.161 on the first chunk, its twin 0.220).
        self.first: dict[str, int] = {}

    def add(self, items: Sequence[str]) -> None:
        """Events of ``items``, taken as simultaneous: every earlier event decays by len(items) events."""
        self.scale *= self.decay ** len(items)
        # An add larger than all before it is a start catching up (a recount, a backlog): its items were
        # mostly there long before, so new ones are taken from its start; otherwise from its middle.
        began = self.clock if len(items) > self.clock else self.clock + len(items) // 2
        self.clock += len(items)
        for item in items:
            self.raw[item] = self.raw.get(item, 0.0) + self.scale
            self.events[item] = self.events.get(item, 0) + 1
            self.first.setdefault(item, began)
        if self.scale > RESCALE:
            self.raw = {i: w / self.scale for i, w in self.raw.items()}
            self.scale = 1.0

    def weight(self, item: str) -> float:
        return self.raw.get(item, 0.0) / self.scale

    def since_first(self, item: str) -> int:
        """Events added since the item came (see ``first``)."""
        return self.clock - self.first[item]

    def restore(self, weights: Mapping[str, float], events: Mapping[str, int], since_first: Mapping[str, int]) -> None:
        """Take back what a run stored (``weight``, ``events``, ``since_first`` of its kept items)."""
        self.scale, self.raw, self.events = 1.0, dict(weights), dict(events)
        self.clock = max(since_first.values(), default=0)
        self.first = {i: self.clock - n for i, n in since_first.items()}

    def heat(self, items: list[str]) -> dict[str, float]:
        """{item: its share of the decayed weight (+ its share of the rates, steady)} of ``items``."""
        total = sum(self.raw[i] for i in items) or 1.0
        heat = {i: self.raw[i] / total for i in items}
        if self.steady:
            rates = {i: self.events[i] / (self.since_first(i) + 1 + STEADY_PRIOR) for i in items}
            total = sum(rates.values()) or 1.0
            heat = {i: h + rates[i] / total for i, h in heat.items()}
        return heat

    def shares(self, keep: int = KEEP) -> dict[str, tuple[str, float]]:
        """{item: (category, share)} of the ``keep`` hottest items (ties by id) that have a category;
        a share is over every counted item of the category, kept or not."""
        heat = self.heat([i for i in self.raw if self.categories.get(i) is not None])
        totals: Counter = Counter()
        for item, h in heat.items():
            totals[self.categories[item]] += h
        hottest = sorted(heat, key=lambda i: (-heat[i], i))[:keep]
        return {i: (self.categories[i], heat[i] / totals[self.categories[i]]) for i in hottest}


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
