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

**Take rates** (``per_offer=True``, what the serving blend reads; session 29). An item is *offered*
by every event of its category by a user who has not taken it (from its first event on):
the choice the user made was among the items of the category they had not had yet. Its *heat* is its
decayed events over its decayed offers + OFFER_PRIOR × its category's decayed events (so that an item
offered a few times and taken once is not the category's favourite), and its share is its heat over
the category's heat. A share of events counts a popular item's takers once and then goes on counting
their later events in the category against it, though none of those could have been it: it
understates how likely a user who has not had it is to take it. Offers leave those events out. On
validation, the counter alone (events one at a time, scored per chunk of 500): synthetic seed 1
0.2076 → 0.2179 (paired +0.0103 ± 0.0020; new items 0.324 → 0.379), ml-100k 0.0435 → 0.0438
(+0.0003 ± 0.0019). OFFER_PRIOR chosen there: 0.03: 0.2179 /
0.0407; 0.06: 0.2192 / 0.0435; 0.1: 0.2179 / 0.0438; 0.2: 0.2172 / 0.0453; as a fixed count of offers
(1 to 100) no prior suited both logs (their categories see ~150 and ~1,200 decayed events). Half of
this and half of the steady shares below gave 0.2170 / 0.0456. Taking the user's unseen items of a
category as its whole (their shares renormalised over them) did not help (0.2145 against 0.2179).
Weighting each offer by 1 / the share of the category the user had not taken (a step towards the
choice model's maximum likelihood; an offer from a user who had taken the favourites says more) gave
0.2204 / 0.0448 with this prior, 0.2201 / 0.0461 with 0.2, but in the signals-only blend 0.2144 /
0.0573: not kept.
The signals-only blend (counted as the worker counts, chunks of 500 at once): synthetic 0.2080 →
0.2153 (− cat-trend +0.0117 → +0.0190 ± 0.0023; new items 0.271 → 0.293), ml-100k 0.0585 → 0.0578.

**Events counted one at a time** (session 30). A worker counts what was applied since its last count:
many users' events at once, whose order across users it does not know (each user's it does). Until
session 30 they were taken as simultaneous: every item of the add came before any of its offers, so an
item first taken at the end of a chunk was offered by the whole chunk's events of its category, and the
counts depended on how the stream happened to be batched. Now each user's new events are spread evenly
over the add and counted one at a time in that order. On validation, the counter alone with chunks of
500: synthetic 0.2155 (new items 0.345) as simultaneous, 0.2179 (0.374) interleaved, 0.2179 (0.379) in
the log's true order; ml-100k 0.0450, 0.0440, 0.0438. The signals-only blend: synthetic seed 1 0.2153 →
0.2172 (+0.0018 ± 0.0012; new items 0.293 → 0.318), seed 2 0.2190 → 0.2199, ml-100k 0.0578 → 0.0580.
Not kept (session 30, counter alone, synthetic seed 1): an item's heat as an all-time take rate × a
curve of its age since its first event, pooled over every item (an EM over eight age buckets): 0.2218
at best (+0.0038 ± 0.0018), but ml-100k 0.0438 → 0.0346; HALF_LIFE 1,000 / 4,000 / 8,000 in the
signals-only blend: −0.0069 / −0.0026 / −0.0021 against 2,000.

They replace session 28's *steady shares*: the decayed share plus the share of the rates, a rate
being events over the events since the item's first (+ 250). On the same slices 0.196 → 0.208 and
0.0435 → 0.0438 over the decayed shares, but the rate needed when an item came, which an add of many
events at once (a worker's start on a backlog) does not say. Offers need each user's own order, and
across users the interleaving above.
The release date of an item (the catalogue's ``ts``) as a boost gave 0.212 at best over the steady
shares (new items 0.44 over the decayed ones, 0.190 overall): not kept, as it needs the generator's
notion of a release and ml-100k's films have none. The cat-trend baseline keeps the plain decayed
shares.
Pure python: no numpy, no settings.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence

HALF_LIFE = 2000  # events
MIX_ITEMS = 50  # a user's mix is over this many of their newest items
KEEP = 4096  # items with the largest weights kept (the serving table's rows)
OFFER_PRIOR = 0.1  # offers added to every item's, as a share of its category's decayed events
RESCALE = 1e100  # weights are stored × a growing scale (no pass over every item per event): renormalise past it


class Trend:
    """Decayed event counts per item (and, per offer, decayed offers), and each kept item's category
    and share."""

    def __init__(self, categories: Mapping[str, str | None], half_life: float = HALF_LIFE, *, per_offer: bool = False):
        self.categories = categories
        self.per_offer = per_offer
        self.decay = 2.0 ** (1.0 / half_life)  # the scale's growth per event
        self.scale = 1.0
        self.raw: dict[str, float] = {}  # item → weight × scale
        # Offers × scale, without a pass over the category per event: an item's are its category's
        # events since it came (``offered`` now − ``base``) less those of users who had taken it.
        self.offered: dict[str, float] = {}  # category → its events' weight × scale
        self.base: dict[str, float] = {}  # item → its category's ``offered`` before its first event
        self.withheld: dict[str, float] = {}  # item → the weight × scale of the offers its takers did not make

    def add(self, histories: Sequence[Sequence[str]], new: Sequence[int]) -> None:
        """Each user's ``new`` newest events, ``histories`` being their items (oldest first, the new ones
        last). Their order across users is not known: each user's are taken as spread evenly over the
        add (the k-th of n at (k + ½) / n, ties in the users' order) and counted one at a time."""
        spans = [min(n, len(h)) for h, n in zip(histories, new)]
        had = [self._by_category(h[: len(h) - n]) for h, n in zip(histories, spans)]  # before each user's new events
        # Merged user by user (memory per user, not per event: a start adds every user's recent items).
        for _, user, k in heapq.merge(*(_spread(user, n) for user, n in enumerate(spans))):
            history = histories[user]
            self._take(history[len(history) - spans[user] + k], had[user])

    def replay(self, events: Iterable[tuple[str, str]]) -> None:
        """Add (user, item) events one at a time, in order: a log replayed as it came."""
        had: dict[str, dict[str, set[str]]] = {}
        for user, item in events:
            self._take(item, had.setdefault(user, {}))

    def _by_category(self, items: Iterable[str]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for item in items:
            if (category := self.categories.get(item)) is not None:
                out.setdefault(category, set()).add(item)
        return out

    def _take(self, item: str, had: dict[str, set[str]]) -> None:
        """One event of ``item`` by a user who had taken ``had`` ({category: items}; updated): every earlier
        event decays by one. Per offer, it offers every counted item of its category the user had not
        taken, itself included (an item is counted from its first event)."""
        self.scale *= self.decay
        self.raw[item] = self.raw.get(item, 0.0) + self.scale
        category = self.categories.get(item)
        if self.per_offer and category is not None:
            self.base.setdefault(item, self.offered.get(category, 0.0))
            self.offered[category] = self.offered.get(category, 0.0) + self.scale
            earlier = had.setdefault(category, set())
            for taken in earlier:
                if taken in self.base:
                    self.withheld[taken] = self.withheld.get(taken, 0.0) + self.scale
            earlier.add(item)
        if self.scale > RESCALE:
            for counts in (self.raw, self.offered, self.base, self.withheld):
                counts.update((k, v / self.scale) for k, v in counts.items())
            self.scale = 1.0

    def weight(self, item: str) -> float:
        return self.raw.get(item, 0.0) / self.scale

    def offers(self, item: str) -> float:
        """The item's decayed offers (0 for one without a category)."""
        category = self.categories.get(item)
        if item not in self.base or category is None:
            return 0.0
        return (self.offered.get(category, 0.0) - self.base[item] - self.withheld.get(item, 0.0)) / self.scale

    def restore(self, weights: Mapping[str, float], offers: Mapping[str, float]) -> None:
        """Take back what a run stored (``weight`` and ``offers`` of its kept items)."""
        self.scale, self.raw, self.offered, self.withheld = 1.0, dict(weights), {}, {}
        self.base = {i: -n for i, n in offers.items()}

    def heat(self, items: list[str]) -> dict[str, float]:
        """{item: its decayed weight (per offer: over its offers + the prior)} of ``items``, each
        with a category."""
        if not self.per_offer:
            return {i: self.raw[i] for i in items}
        in_category: Counter = Counter()
        for i in items:
            in_category[self.categories[i]] += self.raw[i]
        return {i: self.raw[i] / self.scale / (self.offers(i) + OFFER_PRIOR * in_category[self.categories[i]] / self.scale)
                for i in items}

    def shares(self, keep: int = KEEP) -> dict[str, tuple[str, float]]:
        """{item: (category, share)} of the ``keep`` hottest items (ties by id) that have a category;
        a share is over every counted item of the category, kept or not."""
        heat = self.heat([i for i in self.raw if self.categories.get(i) is not None])
        totals: Counter = Counter()
        for item, h in heat.items():
            totals[self.categories[item]] += h
        hottest = sorted(heat, key=lambda i: (-heat[i], i))[:keep]
        return {i: (self.categories[i], heat[i] / totals[self.categories[i]]) for i in hottest}


def _spread(user: int, n: int) -> Iterator[tuple[float, int, int]]:
    """(place in the add, user, k) of the user's n new events: the k-th at (k + ½) / n."""
    return (((k + 0.5) / n, user, k) for k in range(n))


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
