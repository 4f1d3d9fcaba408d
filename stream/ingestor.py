"""The worker's ingest runtime: what stream.consumer (interactions) and the agents of ``stream.app`` call.

``Ingestor`` wraps the plain functions of ``stream.ingest`` with one store thread, retries, the
dead-letter send, metrics, the item-id cache, the model-version hook and the applied positions:
a batch's dead letters are sent right before its write (once the stored position passes their
offsets they are never read again; a crash in between sends them again when they are read again:
at least once, each record naming its source offset), its rows and position are written in one
commit per shard, and only then is the position committed to Kafka (monitoring; see stream.consumer)
and are the written rows handed on (``on_written``: the interest refresher).

Writes are behind (``stream.shard_cache``): a batch is applied to the rows held in memory, and
written at once when it leaves nothing waiting behind it (a partial micro-batch); under a backlog,
after ``ingest_flush_events`` events or ``ingest_flush_s`` seconds, and always before a revoke
returns or the worker stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import numpy as np

from hymirec.settings import Settings
from store.schemas import HISTORIES, ITEMS, shard_table
from store.tables import Store, table_names
from stream.ingest import (
    BatchResult, Encoder, ItemCache, ItemsResult, RawEvent, apply_items, prepare_interactions, write_interactions,
)
from stream.lag import events_behind
from stream.metrics import Metrics
from stream.shard_cache import ShardCache

log = logging.getLogger(__name__)

WAITING_LOG_INTERVAL_S = 60.0
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 30.0
GAP_RESEEK_S = 5.0  # how long a partition held at a gap waits for the re-read before seeking again

T = TypeVar("T")
SendDead = Callable[[list[dict]], Awaitable[None]]
Written = Callable[[dict[int, list[dict]]], None]


class KafkaSide(Protocol):
    """What the ingest path needs of its Kafka consumer (stream.consumer for interactions, stream.app
    over Faust for items)."""

    def owns(self, topic: str, partition: int) -> bool:
        """True while ``partition`` of ``topic`` is assigned to this worker."""

    async def seek(self, topic: str, partition: int, offset: int) -> None:
        """Read ``partition`` again from ``offset``."""

    async def commit(self, topic: str, offsets: Mapping[int, int]) -> None:
        """Record {partition: next offset to read} in the group's committed offsets (for monitoring
        and a quick restart; the positions stored with the shards are what counts)."""


def partition_lag(positions: Mapping[int, int], end_offsets: Mapping[int, int]) -> dict[int, dict[str, int | None]]:
    """{partition: {"applied": position or None, "end": end offset, "lag": events not yet applied}}."""
    return {p: {"applied": positions.get(p), "end": end, "lag": events_behind(end, positions.get(p))}
            for p, end in sorted(end_offsets.items())}


def next_offsets(batch: Sequence[RawEvent]) -> dict[int, int]:
    """{partition: the offset after the batch's last one}."""
    offsets: dict[int, int] = {}
    for raw in batch:
        offsets[raw.partition] = max(offsets.get(raw.partition, 0), raw.offset + 1)
    return offsets


class Ingestor:
    """State the agents share: the store (used from one thread only), metrics, item cache, encoder."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, encoder: Encoder | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.known_items = ItemCache()
        self.encoder: Encoder | None = None
        self.set_encoder(encoder)
        # LanceDB calls block: run them off the event loop (heartbeats, /metrics stay live), and on
        # ONE thread so the store object and the cache are never used concurrently.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="hymirec-store")
        self._store: Store | None = None
        self._rows: ShardCache | None = None
        self.on_written: Written | None = None  # called with {shard: rows} right after each write
        self._waiting_logged_at: float | None = None
        self._busy = asyncio.Lock()  # held while a batch is applied or written, so a revoke can wait for it
        self.positions: dict[int, int] = {}  # applied position of each owned shard, as last written
        self._gaps_sought: dict[int, int] = {}  # partition -> first offset of a gap sought back from
        self._gaps_sought_at: dict[int, float] = {}  # partition -> when it was last sought back

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.settings)
        return self._store

    @property
    def rows(self) -> ShardCache:
        if self._rows is None:
            self._rows = ShardCache(self.store, self.settings)
        return self._rows

    def set_encoder(self, encoder: Encoder | None) -> None:
        """Called by the model side when a codebook version is published (None: no model)."""
        self.encoder = encoder
        self.metrics.model.info({"version": encoder.version if encoder is not None else "none"})

    def log_waiting_for_model(self) -> None:
        """Say, at most once a minute, that histories are kept without codes until a model exists."""
        now = time.monotonic()
        if self.encoder is None and (self._waiting_logged_at is None or now - self._waiting_logged_at >= WAITING_LOG_INTERVAL_S):
            self._waiting_logged_at = now
            log.warning(
                "waiting for a model version (none published on %r yet): recording interactions by item "
                "id, without codebook codes; they are encoded once a version is published",
                self.settings.topic_model_versions,
            )

    async def _in_store_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def refresh_items(self) -> None:
        try:
            await self._in_store_thread(self._refresh_items)
        except Exception as exc:  # noqa: BLE001 — the cache only feeds a metric; the next refresh retries
            log.warning("could not load the item ids from LanceDB at %s: %s: %s", self.settings.lancedb_uri,
                        type(exc).__name__, exc)
        self.metrics.known_items.set(len(self.known_items))

    def _refresh_items(self) -> None:
        self.known_items.refresh(self.store)

    async def optimize(self, shards: Iterable[int], items: bool) -> None:
        """Compact the tables this worker writes: each micro-batch adds a fragment, and reads slow down
        as fragments pile up. Only the writer may do it (compaction races a concurrent merge_insert),
        hence the shards of the partitions assigned now, on the store thread between batches."""
        try:
            for line in await self._in_store_thread(self._optimize, set(shards), items):
                log.info("optimized %s", line)
        except Exception as exc:  # noqa: BLE001 — compaction is an optimisation; the next timer retries
            log.warning("optimizing LanceDB tables failed: %s: %s", type(exc).__name__, exc)

    def _optimize(self, shards: set[int], items: bool) -> list[str]:
        existing = set(table_names(self.store.db))
        names = [shard_table(HISTORIES, shard) for shard in sorted(shards)] + ([ITEMS] if items else [])
        return self.store.optimize([name for name in names if name in existing])

    async def resume(self, partitions: Iterable[int]) -> dict[int, int]:
        """On assignment: the next offset to read in each ``interactions`` partition, from the
        positions stored with the shards (0 where a shard has none: nothing of it was applied)."""
        partitions = sorted(set(partitions))
        async with self._busy:
            stored = await self._retrying(self.settings.topic_interactions, "reading the applied positions",
                                          self.store.positions, partitions)
            self.positions = dict(stored)
            self.rows.forget()  # held rows of a shard owned meanwhile by another worker are stale
            self._gaps_sought.clear()
            self._gaps_sought_at.clear()
        return {p: stored.get(p, -1) + 1 for p in partitions}

    async def idle(self) -> None:
        """Return once the batch or write in flight (if any) has landed."""
        async with self._busy:
            pass

    async def release(self, send_dead: SendDead, kafka: KafkaSide) -> None:
        """On revoke: write what is staged and forget the held rows, so that a partition's next owner
        starts from everything this worker applied (it may start once this returns)."""
        await _complete(self._release(send_dead, kafka))

    async def _release(self, send_dead: SendDead, kafka: KafkaSide) -> None:
        async with self._busy:
            await self._flush(send_dead, kafka, revoking=True)
            self.rows.forget()

    async def flush(self, send_dead: SendDead, kafka: KafkaSide, *, only_if_due: bool = False) -> None:
        """Write what is staged (``only_if_due``: only once it has waited ``ingest_flush_s``)."""
        if only_if_due and self.rows.staged_for_s() < self.settings.ingest_flush_s:
            return  # most timer ticks: nothing waits, and a batch being applied is not waited for
        await _complete(self._flush_locked(send_dead, kafka, only_if_due))

    async def _flush_locked(self, send_dead: SendDead, kafka: KafkaSide, only_if_due: bool) -> None:
        async with self._busy:
            if not only_if_due or self.rows.staged_for_s() >= self.settings.ingest_flush_s:
                await self._flush(send_dead, kafka)

    async def interactions(self, batch: Sequence[RawEvent], send_dead: SendDead, kafka: KafkaSide,
                           current: Callable[[], bool] | None = None) -> BatchResult:
        """Apply a batch; ``current`` False (asked once the batch has the store) drops it unapplied: it
        was fetched before a rebalance, and its partitions are read again from their stored positions."""
        return await _complete(self._interactions(batch, send_dead, kafka, current))

    async def items(self, batch: Sequence[RawEvent], send_dead: SendDead, kafka: KafkaSide) -> ItemsResult:
        return await _complete(self._items(batch, send_dead, kafka))

    async def _interactions(self, batch: Sequence[RawEvent], send_dead: SendDead, kafka: KafkaSide,
                            current: Callable[[], bool] | None) -> BatchResult:
        topic, m = self.settings.topic_interactions, self.metrics
        started = time.perf_counter()
        self.log_waiting_for_model()
        async with self._busy:
            if current is not None and not current():
                return BatchResult()
            result = await self._retrying(topic, "reading histories", self._prepare_interactions, batch)
            self.rows.stage(result)
            s = self.settings
            if (len(batch) < s.batch_size or self.rows.staged_events() >= s.ingest_flush_events
                    or self.rows.staged_for_s() >= s.ingest_flush_s):
                await self._flush(send_dead, kafka)
            await self._seek_over_gaps(topic, result, kafka)
        m.events_in.labels(topic).inc(len(batch))
        m.duplicates.labels("offset").inc(result.duplicate_offsets)
        m.duplicates.labels("event_id").inc(result.duplicate_event_ids)
        m.duplicates.labels("position").inc(result.already_applied)
        m.unknown_items.inc(result.unknown_items)
        for record in result.dead:
            m.dead_lettered.labels(topic, record["reason"]).inc()
        m.batch_latency.labels(topic).observe(time.perf_counter() - started)
        return result

    async def _flush(self, send_dead: SendDead, kafka: KafkaSide, *, revoking: bool = False) -> None:
        """Send the staged dead letters, write every staged row and position (one merge_insert per
        shard), then commit the positions to Kafka and hand the rows on. A revoke's flush writes
        partitions the consumer has already let go of: their next owner starts only once the revoke
        returns."""
        topic = self.settings.topic_interactions
        pending = self.rows.pending()
        if not pending.positions:
            return
        lost = [] if revoking else [p for p in pending.positions if not kafka.owns(topic, p)]
        if lost:  # revoked without a release (a lost session): the new owner reads them again
            log.warning("not writing partitions %s of %r: no longer assigned to this worker", lost, topic)
            self.rows.forget(lost)
            pending = self.rows.pending()
        # Dead letters first: once the position passes their offsets they are never read again.
        await self._retrying(topic, "sending to the dead-letter topic", send_dead, pending.dead, sync=False)
        await self._retrying(topic, "writing histories", write_interactions, self.store, pending)
        self.rows.written()
        if self.on_written is not None:  # before any await: the refresher counts on it (serving_agents)
            self.on_written({shard: rows for shard, rows in pending.rows.items() if rows})
        self.positions.update(pending.positions)
        self.metrics.applied.inc(pending.applied)
        self.metrics.freshness_lag.observe_many(np.maximum(0.0, time.time() - np.asarray(pending.applied_timestamps)))
        await kafka.commit(topic, {p: position + 1 for p, position in pending.positions.items()})
        if not revoking:
            await self._compact_due([shard_table(HISTORIES, p) for p in self.positions if kafka.owns(topic, p)])

    async def _compact_due(self, shards: list[str]) -> None:
        """Compact a shard if the store's compaction budget says so: after the commit and hand-over,
        so only the next batch waits for it, and on the store thread, never beside a write."""
        line = await self._in_store_thread(self.store.compact_due, shards)
        if line is not None:
            log.debug("compacted %s", line)

    async def _seek_over_gaps(self, topic: str, result: BatchResult, kafka: KafkaSide) -> None:
        """Read a gap's missing offsets before what came after them: seek back to the position once;
        the events already buffered past the gap are left out until the re-read reaches them. A gap
        still held GAP_RESEEK_S later is sought again: a re-read can be lost too (seen once when a
        worker joined mid-stream: the partition stayed held until the next rebalance)."""
        for partition in result.positions:
            self._gaps_sought.pop(partition, None)
            self._gaps_sought_at.pop(partition, None)
        now = time.monotonic()
        for partition, gap in result.gaps.items():
            self.metrics.offset_gaps.inc()
            if now - self._gaps_sought_at.get(partition, -GAP_RESEEK_S) < GAP_RESEEK_S:
                continue
            self._gaps_sought.setdefault(partition, gap.first)  # a re-read meeting it again accepts it
            self._gaps_sought_at[partition] = now
            log.warning("%r partition %d: offsets %d..%d were not delivered; reading again from %d",
                        topic, partition, gap.expected, gap.first - 1, gap.expected)
            await kafka.seek(topic, partition, gap.expected)

    def _prepare_interactions(self, batch: Sequence[RawEvent]) -> BatchResult:
        # Until the item ids are loaded (refresh_items, at start and on a timer) unknown items are not counted.
        known = self.known_items if self.known_items.loaded else None
        return prepare_interactions(self.rows, self.settings, batch, known_items=known, encoder=self.encoder,
                                    accepted_gaps=self._gaps_sought)

    async def _items(self, batch: Sequence[RawEvent], send_dead: SendDead, kafka: KafkaSide) -> ItemsResult:
        topic, m = self.settings.topic_items, self.metrics
        started = time.perf_counter()
        async with self._busy:  # a revoke waits for it: the next owner is the items table's next writer
            if not all(kafka.owns(topic, p) for p in next_offsets(batch)):
                log.warning("not writing %d items of %r: no longer assigned to this worker", len(batch), topic)
                return ItemsResult()
            result = await self._retrying(topic, "writing items", self._apply_items, batch)
            await self._retrying(topic, "sending to the dead-letter topic", send_dead, result.dead, sync=False)
            await kafka.commit(topic, next_offsets(batch))
        m.events_in.labels(topic).inc(len(batch))
        m.items_upserted.inc(result.upserted)
        m.known_items.set(len(self.known_items))
        for record in result.dead:
            m.dead_lettered.labels(topic, record["reason"]).inc()
        m.batch_latency.labels(topic).observe(time.perf_counter() - started)
        return result

    def _apply_items(self, batch: Sequence[RawEvent]) -> ItemsResult:
        result = apply_items(self.store, self.settings, batch)
        self.known_items.add(result.item_ids)
        return result

    async def _retrying(self, topic: str, what: str, fn: Callable[..., Any], *args: Any, sync: bool = True) -> Any:
        """Run ``fn`` until it succeeds: the partition's stored position stays behind the batch
        meanwhile, so nothing is lost (writes are idempotent)."""
        delay = RETRY_FIRST_S
        while True:
            try:
                return await (self._in_store_thread(fn, *args) if sync else fn(*args))
            except Exception as exc:  # noqa: BLE001 — any failure: retry, never drop the batch
                self.metrics.retries.labels(topic).inc()
                log.error("%s from %r failed (%s: %s); retrying in %.1f s", what, topic, type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    def report_lag(self, end_offsets: Mapping[int, int]) -> dict[int, dict[str, int | None]]:
        """Per owned ``interactions`` partition: applied position, end offset and the events between
        (also set as gauges); ``end_offsets`` are the partitions' high-water marks."""
        lag = partition_lag(self.positions, end_offsets)
        for partition, row in lag.items():
            self.metrics.set_partition(partition, row)
        return lag

    def health(self, end_offsets: Mapping[int, int]) -> dict[str, Any]:
        return {
            "status": "ok",
            "app_id": self.settings.app_id,
            "model_version": getattr(self.encoder, "version", None),
            "known_items": len(self.known_items),
            "counts": self.metrics.totals(),
            "partitions": {str(p): row for p, row in self.report_lag(end_offsets).items()},
        }

    def close(self) -> None:
        self._executor.shutdown(wait=True)


async def _complete(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` to its end even if the caller is cancelled meanwhile.

    A graceful stop cancels the agents: the batch in flight still lands its write (its rows and
    position in one commit), so the next owner does not read it all again.
    """
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
