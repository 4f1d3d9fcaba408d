"""The serving blend's state in LanceDB (model.blend): written by the worker's runtime, read by every
top-k reader.

- ``popular_items``: the POPULAR_KEEP items most present in users' recent items (also the answer
  when there is no model);
- ``item_follows``: per item, its FOLLOWS_KEEP heaviest followers in users' recent items;
- ``item_neighbours``: per item, its NEIGHBOURS_KEEP heaviest EASE weights (``model.ease``) over the
  co-occurrence counted along the stream (solved again whenever a history changed);
- ``fresh_items``: the fresh items, when each first came and its events since (read back at a start,
  so that a restart does not make every item old, or new);
- ``item_trend``: the TREND_KEEP hottest items (``model.trend``, take rates), with their decayed
  events and offers and their category and share of it (read back at a start too: a recount from
  users' recent items would weigh an event of last month like one of the last minute; a table an
  older version wrote, with other counts, is recounted);
- ``serving_blend``: the weights, one row.

``BlendKeeper.refresh`` (the popularity timer) recounts the signals from every history shard's recent
items and refits the weights on the events applied since its previous count. That makes the fit
prequential by construction: an example's features come from the previous count, which had not seen
the event, and from the user's history before it; the weights then score only later events.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
from lancedb.expr import col

from model.blend import LAST, NEAR, FirstSeen, Follows, Signals, model_candidates, popularity
from model.blend_weights import Blends, Example, fit_blends
from model.ease import Cooccurrence
from model.trend import KEEP as TREND_KEEP
from model.trend import Trend
from serving.model import ServingModel
from store.schemas import (BLEND, FOLLOWS, FRESH, HISTORIES, NEIGHBOURS, POPULAR, TREND, blend_schema, follows_schema,
                           fresh_schema, histories_schema, item_vectors_schema, neighbours_schema, popular_schema,
                           trend_schema)
from store.tables import Store, open_table, table_names, to_arrow

log = logging.getLogger(__name__)

POPULAR_KEEP = 1000  # most popular items stored: enough for k plus a long seen-list
FOLLOWS_KEEP = 100  # followers stored per item
NEIGHBOURS_KEEP = 100  # neighbours stored per item
POOL = 100  # the model's candidates per user, beside the rules' and the popular ones
POPULAR_CANDIDATES = 50  # the most popular items, candidates for every user
EXAMPLES_KEEP = 2000  # the newest applied events the weights are fitted on
EXAMPLES_PER_COUNT = 512  # newest events learnt from per count: bounds a count's model work
FULL_READS = 2048  # users per count whose whole histories are read to pair their new events (below)
FIT_USERS = 256  # users per interests call while building examples


def _blend_row(store: Store) -> dict | None:
    if BLEND not in table_names(store.db):
        return None
    rows = open_table(store.db, BLEND, blend_schema(), create=False).to_arrow().to_pylist()
    return rows[0] if rows else None


def read_blend(store: Store) -> Blends | None:
    """The weights (the prior until a first fit), or None before the worker's first count: with no
    signals stored yet, top-k ranks by the model alone."""
    row = _blend_row(store)
    return Blends.from_json(json.loads(row["blend"])) if row is not None else None


def counted_at(store: Store) -> datetime | None:
    """When the last count (and fit) was written; None before the first."""
    row = _blend_row(store)
    return row["updated_at"] if row is not None else None


def read_signals(store: Store, recents: list[list[str]]) -> Signals:
    """The stored signals the readers of users with these ``recents`` (their items, oldest first) need:
    the popular counts, the follows of their last LAST items and the neighbours of their last NEAR."""
    signals = Signals()
    names = table_names(store.db)
    if POPULAR in names:
        popular = open_table(store.db, POPULAR, popular_schema(), create=False).to_arrow()
        signals.popular = dict(zip(popular["item_id"].to_pylist(), popular["count"].to_pylist()))
    if FRESH in names:
        fresh = open_table(store.db, FRESH, fresh_schema(), create=False).to_arrow()
        signals.fresh = dict(zip(fresh["item_id"].to_pylist(), fresh["count"].to_pylist()))
    if (trend := _stored_trend(store, names)) is not None:
        signals.trend = dict(zip(trend["item_id"].to_pylist(), zip(trend["category"].to_pylist(), trend["share"].to_pylist())))
    signals.follows = _rows_of(store, names, FOLLOWS, follows_schema(), {i for r in recents for i in r[-LAST:]})
    signals.neighbours = _rows_of(store, names, NEIGHBOURS, neighbours_schema(), {i for r in recents for i in r[-NEAR:]})
    return signals


def _stored_trend(store: Store, names: list[str]) -> pa.Table | None:
    """The ``item_trend`` rows; None when there are none, or an older version wrote them (the keeper
    recounts and overwrites them at its first count)."""
    if TREND not in names:
        return None
    table = store.db.open_table(TREND)
    return table.to_arrow() if table.schema.equals(trend_schema()) else None


def _rows_of(store: Store, names: list[str], table: str, schema: pa.Schema, items: set[str]) -> dict[str, dict[str, float]]:
    """{item: {other: weight}} of ``items`` in a table of per-item lists (``schema``: key, ids, weights)."""
    if not items or table not in names:
        return {}
    key, ids, weights = schema.names[:3]
    rows = (open_table(store.db, table, schema, create=False).search()
            .where(col(key).isin(sorted(items))).limit(None).to_arrow().to_pylist())
    return {r[key]: dict(zip(r[ids], r[weights])) for r in rows}


class BlendKeeper:
    """Counts the signals and fits the weights; the runtime's one writer of its tables."""

    def __init__(self, store: Store, recent_len: int):
        self.store = store
        self.recent_len = recent_len
        self.signals: Signals | None = None  # the previous count, as stored
        self.follows = Follows()  # the running count, whole (stored: each item's heaviest)
        self.pairs = Cooccurrence(recent_len - 1)  # the running co-occurrence the neighbours are solved from
        self.events: dict[str, int] = {}  # user → event_count at the previous count
        self.examples: deque[Example] = deque(maxlen=EXAMPLES_KEEP)
        self.blend = read_blend(store) or Blends()
        self.first_seen = FirstSeen()
        if FRESH in table_names(store.db):  # the fresh items of the last run stay fresh
            fresh = open_table(store.db, FRESH, fresh_schema(), create=False).to_arrow()
            self.first_seen.first = dict(zip(fresh["item_id"].to_pylist(), fresh["first_event"].to_pylist()))
            self.first_seen.counts = dict(zip(fresh["item_id"].to_pylist(), fresh["count"].to_pylist()))
        self.trend = Trend({}, per_offer=True)
        trend = _stored_trend(store, table_names(store.db))
        self.trend_counted = trend is not None  # the last run's weights go on decaying
        if trend is not None:
            items = trend["item_id"].to_pylist()
            self.trend.restore(*(dict(zip(items, trend[c].to_pylist())) for c in ("weight", "offers")))

    def refresh(self, model: ServingModel | None, vectors_table: str | None, dim: int) -> int:
        """Count, refit (with a live ``model`` and its ``vectors_table``), write; returns popular items kept.

        Follows and co-occurrence are running counts: the first count (a start) takes every user's
        recent items, each later one adds the events since (a user with more new events than
        ``recent_len``: the newest ``recent_len``). So is the trend, but a start takes the recent items
        only when no trend was stored (interleaved across users, ``model.trend``: their order across users
        is not stored, each user's is). Popularity is recounted from the recent items every time, the
        neighbours solved whenever a history changed."""
        scans = [self.store.scan_histories(shard, ["user_id", "recent_item_ids", "event_count"])
                 for shard in self.store.shards(HISTORIES)]
        rows = pa.concat_tables(scans) if scans else histories_schema().empty_table()
        users, recents = rows["user_id"].to_pylist(), rows["recent_item_ids"]
        counts = dict(zip(users, rows["event_count"].to_pylist()))
        new = {u: n - self.events.get(u, 0) for u, n in counts.items() if n > self.events.get(u, 0)}
        if self.signals is not None and model is not None and vectors_table is not None and new:
            self._learn(model, vectors_table, dim, new)
        catalogue = self.store.all_items(["item_id", "category"])
        self.trend.categories = dict(zip(catalogue["item_id"].to_pylist(), catalogue["category"].to_pylist()))
        if self.signals is None:
            self.follows = Follows.count(recents)
            self.pairs = Cooccurrence.count(recents, self.recent_len - 1)
            self.first_seen.old(popularity(recents))
            if not self.trend_counted:
                taken = [r or [] for r in recents.to_pylist()]
                self.trend.add(taken, [len(r) for r in taken])
        else:
            row_of = {u: r for r, u in enumerate(users)}
            recent = {u: recents[row_of[u]].as_py() or [] for u in new}
            for user, n in new.items():
                self.follows.add(recent[user], n)
                self.first_seen.add(recent[user][-n:])
            self.trend.add([recent[u] for u in new], list(new.values()))
            whole = self._bursts(new, counts, recent)
            self.pairs.add([whole.get(u, recent[u]) for u in new], list(new.values()))
        # Numbered by the stream's applied events (every user's event_count): the same after a restart.
        self.first_seen.events = sum(counts.values())
        # The neighbours are the count's costly part (a dense inverse): unchanged histories keep the last ones.
        near = self.pairs.weights(NEIGHBOURS_KEEP) if self.signals is None or new else self.signals.neighbours
        self.signals = Signals(self.follows.top(FOLLOWS_KEEP), popularity(recents), near, self.first_seen.fresh(),
                               self.trend.shares(TREND_KEEP)).kept(FOLLOWS_KEEP, POPULAR_KEEP)
        self.events = counts
        self._write(model.version if model is not None else None)
        return len(self.signals.popular)

    def _bursts(self, new: dict[str, int], counts: dict[str, int], recent: dict[str, list[str]]) -> dict[str, list[str]]:
        """{user: whole history} of the (first FULL_READS) users with ``new`` events whose ``recent``
        items do not hold the items those events came after. Each event pairs with the ``recent_len`` − 1
        items before it; with n new events the recent items hold that for the last one only, and a user
        who rated 200 films in one sitting (ml-100k) would otherwise have most of their pairs never
        counted."""
        bursty = [u for u, n in new.items() if n > 1 and counts[u] > len(recent[u])]
        rows = self.store.get_histories(bursty[:FULL_READS]) if bursty else {}
        return {u: list(r["history_item_ids"] or []) for u, r in rows.items()}

    def _learn(self, model: ServingModel, vectors_table: str, dim: int, new: dict[str, int]) -> None:
        """Every event applied since the previous count ({user: how many}; at most EXAMPLES_PER_COUNT),
        against that count's signals and the user's history before it; then a refit."""
        table = open_table(self.store.db, vectors_table, item_vectors_schema(dim), create=False).to_arrow()
        ids = table["item_id"].to_pylist()
        matrix = table["vector"].combine_chunks().flatten().to_numpy().astype(np.float32).reshape(len(ids), dim)
        matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
        popular = self.signals.top_popular(POPULAR_CANDIDATES)
        fresh_rows = [j for j, i in enumerate(ids) if i in self.signals.fresh]
        events = []  # (history before, item)
        for user, row in self.store.get_histories(list(new)).items():
            history = list(row["history_item_ids"] or [])
            events += [(history[:end], history[end]) for end in range(max(1, len(history) - new[user]), len(history))]
        events = events[-EXAMPLES_PER_COUNT:]
        for start in range(0, len(events), FIT_USERS):
            group = events[start : start + FIT_USERS]
            cosine = (model.interests([before for before, _ in group]) @ matrix.T).max(axis=1)  # [B, N]
            for (before, target), scores in zip(group, cosine):
                names, features = model_candidates(self.signals, before, scores, ids, fresh_rows, popular, POOL)
                if target in names:  # an item no candidate list holds cannot be learnt to rank
                    self.examples.append(Example(features, names.index(target), self.signals.fresh_flags(names),
                                                 min(len(before), self.recent_len)))
        self.blend = fit_blends(list(self.examples), self.blend)
        log.info("serving blend: %d examples, weights %s", len(self.examples), self.blend.to_json())

    def _write(self, version: str | None) -> None:
        now = datetime.now(timezone.utc)
        popular = sorted(self.signals.popular.items(), key=lambda kv: (-kv[1], kv[0]))
        self._overwrite(POPULAR, popular_schema(), {
            "item_id": [i for i, _ in popular], "count": [c for _, c in popular], "updated_at": [now] * len(popular)})
        for name, schema, rows in ((FOLLOWS, follows_schema(), self.signals.follows),
                                   (NEIGHBOURS, neighbours_schema(), self.signals.neighbours)):
            key, ids, weights = schema.names[:3]
            ordered = sorted(rows.items())
            self._overwrite(name, schema, {key: [j for j, _ in ordered], ids: [list(row) for _, row in ordered],
                                           weights: [[float(w) for w in row.values()] for _, row in ordered],
                                           "updated_at": [now] * len(ordered)})
        fresh = sorted(self.signals.fresh.items())
        self._overwrite(FRESH, fresh_schema(), {
            "item_id": [i for i, _ in fresh], "first_event": [self.first_seen.first[i] for i, _ in fresh],
            "count": [c for _, c in fresh], "updated_at": [now] * len(fresh)})
        trend = sorted(self.signals.trend.items())
        self._overwrite(TREND, trend_schema(), {
            "item_id": [i for i, _ in trend], "category": [c for _, (c, _) in trend],
            "weight": [self.trend.weight(i) for i, _ in trend], "offers": [self.trend.offers(i) for i, _ in trend],
            "share": [share for _, (_, share) in trend],
            "updated_at": [now] * len(trend)})
        # Written last, always: its time says a whole count (and fit) is in place.
        self._overwrite(BLEND, blend_schema(), {"blend": [json.dumps(self.blend.to_json())], "model_version": [version],
                                                "updated_at": [now]})

    def _overwrite(self, name: str, schema: pa.Schema, columns: dict) -> None:
        data = pa.table({f.name: pa.array(columns[f.name], f.type) for f in schema})
        self.store.db.create_table(name, to_arrow(data, schema, name), mode="overwrite")
