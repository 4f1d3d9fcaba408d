"""Top-k for a user: its interests × its version's item vectors, else the popular items.

``recommend`` / ``Recommender`` answer `hymirec topk` and the worker's GET /recommend alike. An
answer uses the user's interests row and the vectors table of the version that computed that row,
so it always carries exactly one version. With no interests row (unknown user, or no model yet)
the answer is the popular items, and says so. A query reads the user's two rows from the shard
Kafka's default partitioner gives its id (all shards when it is not there), then searches the
version's vectors: three LanceDB reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
from kafka.partitioner.default import murmur2
from lancedb.expr import col

from hymirec.errors import HymirecError
from model.blend import Signals, candidates, popularity
from model.blend_weights import Blends, top
from serving.blend import POOL, POPULAR_CANDIDATES, read_blend, read_signals
from store.schemas import HISTORIES, POPULAR, VERSIONS, item_vectors_schema, popular_schema, versions_schema
from store.tables import Store, open_table, table_names

REFINE = 2  # ANN candidates per result re-ranked exactly (a flat search is exact anyway)
SEARCH_USERS = 64  # users whose interests share one vector search in Recommender.many


@dataclass
class Scored:
    item_id: str
    score: float
    interest: int | None  # which of the K interests gave the score; None for popular items


@dataclass
class Recommendation:
    user_id: str
    model_version: str | None
    items: list[Scored]
    fallback: str | None = None  # why the answer is the popular items, else None
    vectors_table: str | None = None  # the table the scores came from (provenance, for tests and logs)
    ranked_by: str = "model"  # "blend": the model's score beside the stream's signals (serving.blend)

    def to_json(self) -> dict:
        return {
            "user_id": self.user_id,
            "model_version": self.model_version,
            "items": [{"item_id": s.item_id, "score": round(s.score, 6), "interest": s.interest} for s in self.items],
            "fallback": self.fallback,
            "ranked_by": None if self.fallback else self.ranked_by,
        }


def open_own(db: lancedb.DBConnection, name: str, schema: pa.Schema, *, create: bool = False):
    """One of this module's tables (schema-checked), or None when it does not exist."""
    if not create and name not in table_names(db):
        return None
    return open_table(db, name, schema, create=create)


def ready_versions(store: Store) -> dict[str, dict]:
    """{version: its serving_versions row} for every version ready to serve."""
    table = open_own(store.db, VERSIONS, versions_schema())
    if table is None:
        return {}
    return {row["version"]: row for row in table.to_arrow().to_pylist()}


def shard_hint(user_id: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (Java, kafka-python and aiokafka alike) gives the
    key ``user_id``: where the ingest agent keeps that user, when producers key by user id."""
    return (murmur2(user_id.encode("utf-8")) & 0x7FFFFFFF) % partitions


class Recommender:
    """Top-k for a user: its interests × its version's item vectors, else the popular items.

    Keeps what only grows — ready versions, opened vector tables — between calls; a version it has
    not seen is read again, and a table dropped since it was opened is reopened (or the answer falls
    back), so a long-lived Recommender never hides a switch.
    """

    def __init__(self, store: Store):
        self.store = store
        self._versions: dict[str, dict] = {}
        self._tables: dict[str, Any] = {}

    def __call__(self, user_id: str, k: int = 10, *, include_seen: bool = False) -> Recommendation:
        return self.many([user_id], k, include_seen=include_seen)[0]

    def many(self, user_ids: Sequence[str], k: int = 10, *, include_seen: bool = False) -> list[Recommendation]:
        """One answer per id, in order: the answers of one call each, with the row reads batched and
        users of one version sharing a vector search (grouped by the length of their seen-lists, since
        each query fetches k + that many candidates). A user's answer can only gain from sharing: with
        an ANN index a larger candidate list finds more of the true top-k; a flat search is exact."""
        if k < 1:
            raise HymirecError(f"k must be at least 1, got {k}")
        users = list(dict.fromkeys(user_ids))
        answers: dict[str, Recommendation] = {}
        fallback: dict[str, tuple[set[str], str]] = {}
        by_version: dict[str, list[tuple[str, np.ndarray, set[str]]]] = {}
        recent: dict[str, list[str]] = {}
        for user_id, (row, history) in self._users(users).items():
            seen = set() if include_seen or history is None else set(history["history_item_ids"] or [])
            if row is None:
                fallback[user_id] = (seen, "unknown user" if history is None else "no interests computed for this user yet")
            else:
                by_version.setdefault(row["model_version"], []).append(
                    (user_id, np.asarray(row["interests"], dtype=np.float32), seen))
                recent[user_id] = list(history["recent_item_ids"] or []) if history is not None else []
        blend = read_blend(self.store) if by_version else None
        signals = read_signals(self.store, list(recent.values())) if blend else None
        pool = POOL if blend else 0
        fresh_vectors: dict[str, tuple[list[str], np.ndarray]] = {}  # per version, read once per call
        for version, members in by_version.items():
            members.sort(key=lambda m: len(m[2]))
            for start in range(0, len(members), SEARCH_USERS):
                group = members[start : start + SEARCH_USERS]
                hits = self._search_reopening(version, np.concatenate([q for _, q, _ in group]),
                                              k + pool + len(group[-1][2]))
                if hits is None:
                    fallback.update({u: (seen, f"the item vectors of version {version} are gone") for u, _, seen in group})
                    continue
                table = self._versions[version]["vectors_table"]
                which = (hits["query_index"].to_numpy() if "query_index" in hits.column_names
                         else np.zeros(len(hits), np.int64))
                owner = np.repeat(np.arange(len(group)), [len(q) for _, q, _ in group])  # query row -> member
                first = np.cumsum([0] + [len(q) for _, q, _ in group])  # member -> its first query row
                best: list[dict[str, tuple[float, int]]] = [{} for _ in group]
                for item_id, distance, query in zip(hits["item_id"].to_pylist(), hits["_distance"].to_numpy(), which):
                    m = owner[query]
                    score, interest = 1.0 - float(distance), int(query - first[m])
                    if item_id not in group[m][2] and (item_id not in best[m] or score > best[m][item_id][0]):
                        best[m][item_id] = (score, interest)
                if blend is not None and blend.fresh_slots and version not in fresh_vectors:
                    fresh_vectors[version] = self._fresh_vectors(version, signals.top_fresh())
                fresh = _fresh_cosines(*fresh_vectors.get(version, ([], np.zeros((0, 0), np.float32))),
                                       [q for _, q, _ in group])
                for (user_id, _, seen), scores, known in zip(group, best, fresh):
                    if blend is None:
                        ranked = sorted(scores.items(), key=lambda kv: (-kv[1][0], kv[0]))[:k]
                        items = [Scored(i, s, w) for i, (s, w) in ranked]
                    else:
                        items = _blended(blend, signals, recent[user_id], scores, known, seen, k)
                    answers[user_id] = Recommendation(user_id, version, items, vectors_table=table,
                                                      ranked_by="model" if blend is None else "blend")
        if fallback:
            popular = popular_items(self.store, k + max(len(seen) for seen, _ in fallback.values()))
            for user_id, (seen, why) in fallback.items():
                answers[user_id] = _popular_answer(popular, user_id, k, seen, why)
        return [answers[u] for u in user_ids]

    def _users(self, user_ids: list[str]) -> dict[str, tuple[dict | None, dict | None]]:
        """{user: (interests row, history row)}: from each user's hinted shard, else from every shard."""
        out: dict[str, tuple[dict | None, dict | None]] = {}
        hinted: dict[int, list[str]] = {}
        for user_id in user_ids:
            hinted.setdefault(shard_hint(user_id, self.store.settings.partitions), []).append(user_id)
        for shard, group in [*hinted.items(), (None, None)]:
            group = group if group is not None else [u for u in user_ids if u not in out]
            if not group:
                continue
            rows, histories = self.store.get_interests(group, shard=shard), self.store.get_histories(group, shard=shard)
            for user_id in group:
                if rows.get(user_id) is not None or histories.get(user_id) is not None or shard is None:
                    out[user_id] = (rows.get(user_id), histories.get(user_id))
        return out

    def _fresh_vectors(self, version: str, fresh: list[str]) -> tuple[list[str], np.ndarray]:
        """The ``fresh`` items' ids and unit vectors [F, d] under ``version`` (those it has embedded)."""
        table = self._tables.get(self._versions[version]["vectors_table"]) if version in self._versions else None
        if table is None or not fresh:
            return [], np.zeros((0, 0), np.float32)
        rows = (table.search().where(col("item_id").isin(fresh)).select(["item_id", "vector"]).limit(None)
                .to_arrow())
        ids = rows["item_id"].to_pylist()
        vectors = rows["vector"].combine_chunks().flatten().to_numpy().reshape(len(ids), -1).astype(np.float32)
        return ids, vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def _search_reopening(self, version: str, queries: np.ndarray, limit: int) -> pa.Table | None:
        try:
            return self._search(version, queries, limit)
        except Exception:  # noqa: BLE001 — a table dropped after it was opened: reopen once
            self._tables.clear()
            return self._search(version, queries, limit)

    def _search(self, version: str, queries: np.ndarray, limit: int) -> pa.Table | None:
        if version not in self._versions:
            self._versions = ready_versions(self.store)
        ready = self._versions.get(version)
        if ready is None:
            return None
        name = ready["vectors_table"]
        if name not in self._tables:
            table = open_own(self.store.db, name, item_vectors_schema(self.store.settings.embedding_dim))
            if table is None:
                return None
            self._tables[name] = table
        return (self._tables[name].search(queries).distance_type("cosine").limit(limit).refine_factor(REFINE)
                .select(["item_id", "_distance"]).to_arrow())


def _fresh_cosines(ids: list[str], vectors: np.ndarray, queries: list[np.ndarray]) -> list[dict[str, tuple[float, int]]]:
    """Per member (``queries``: its interests [K, d]), {fresh item: (max cosine, which interest)}: exact, for
    the fresh items the ANN pool did not reach (a fresh slot ranks them by the blend, model included)."""
    out = []
    for q in queries:
        if not ids:
            out.append({})
            continue
        cosine = (q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)) @ vectors.T  # [K, F]
        best = cosine.argmax(axis=0)
        out.append({i: (float(cosine[w, f]), int(w)) for f, (i, w) in enumerate(zip(ids, best.tolist()))})
    return out


def _blended(blend: Blends, signals: Signals, recent: list[str], scores: dict[str, tuple[float, int]],
             fresh: dict[str, tuple[float, int]], seen: set[str], k: int) -> list[Scored]:
    """The top-k of the blend (model.blend) over the model's POOL best items, the rules', the popular, the
    nearest and the ``fresh`` ones (exact cosines); ``interest`` says which interest gave a candidate its
    cosine (None for those outside the pool and not fresh)."""
    pool = dict(sorted(((i, s) for i, (s, _) in scores.items()), key=lambda kv: (-kv[1], kv[0]))[:POOL])
    names, features = candidates(signals, recent, pool, signals.top_popular(POPULAR_CANDIDATES), seen,
                                 {i: c for i, (c, _) in fresh.items()})
    interest = {i: w for i, (_, w) in fresh.items()} | {i: scores[i][1] for i in pool}
    return [Scored(item, score, interest.get(item))
            for item, score in top(blend.of(len(recent)), names, features, k, signals.fresh_flags(names))]


def recommend(store: Store, user_id: str, k: int = 10, *, include_seen: bool = False) -> Recommendation:
    """One top-k answer (see ``Recommender``; a long-lived caller keeps one of those instead)."""
    return Recommender(store)(user_id, k, include_seen=include_seen)


def _popular_answer(popular: list[tuple[str, int]], user_id: str, k: int, seen: set[str], why: str) -> Recommendation:
    top = [(i, c) for i, c in popular if i not in seen][:k]
    return Recommendation(user_id, None, [Scored(i, float(c), None) for i, c in top],
                          fallback=f"{why}: popular items (by event counts)")


def popular_items(store: Store, limit: int) -> list[tuple[str, int]]:
    """The ``limit`` most interacted-with items, most first: from the worker's ``popular_items``
    table, or counted from the histories when no worker has written it yet."""
    table = open_own(store.db, POPULAR, popular_schema())
    counts = table.to_arrow() if table is not None else count_popularity(store)
    counts = counts.sort_by([("count", "descending"), ("item_id", "ascending")]).slice(0, limit)
    return list(zip(counts["item_id"].to_pylist(), counts["count"].to_pylist()))


def count_popularity(store: Store) -> pa.Table:
    """item_id, count over every user's recent items (all shards).

    The recent items (``recent_len`` per user), not the whole histories: a recount then reads
    ``recent_len`` ids per user whatever the history length, and favours what is popular now.
    """
    lists = [store.scan_histories(shard, ["recent_item_ids"])["recent_item_ids"] for shard in store.shards(HISTORIES)]
    counts = popularity(pa.chunked_array([c for part in lists for c in part.chunks], pa.list_(pa.string())))
    return pa.table({"item_id": pa.array(list(counts), pa.string()), "count": pa.array(list(counts.values()), pa.int64())})


def format_recommendation(rec: Recommendation) -> str:
    lines = []
    if rec.fallback:
        lines.append(f"user {rec.user_id}: {rec.fallback}")
    else:
        how = " beside the stream's signals (serving blend)" if rec.ranked_by == "blend" else ""
        lines.append(f"user {rec.user_id}: model {rec.model_version}{how}")
    lines.append(f"{'rank':>4}  {'item_id':<20} {'score':>10}  {'interest':>8}  model_version")
    for rank, s in enumerate(rec.items, 1):
        interest = "-" if s.interest is None else str(s.interest)
        score = f"{s.score:.4f}" if s.interest is not None else f"{int(s.score)}"
        lines.append(f"{rank:>4}  {s.item_id:<20} {score:>10}  {interest:>8}  {rec.model_version or 'popular'}")
    if not rec.items:
        lines.append("(no items: the catalogue and the histories are empty)")
    return "\n".join(lines)


