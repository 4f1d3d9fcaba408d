"""The retrieval side of the worker: agents, timers and a web view that ``register`` adds to the app.

stream.app calls ``register`` once, so one `faust -A stream.app worker` runs both halves:

    model-versions         → hot-swap to the announced version (serving.runtime.ServingRuntime)
    each ingest write         recompute the interests of the users it wrote (handed over: ``touched``)
    every serving_refresh_s   re-encode new/changed items; every serving_scan_s, a scan for missed users
    every version_poll_s      switch to a newer registry version nobody announced to this worker
                              (the trainer's messages share one partition: one worker of a group gets them)
    every popularity_refresh_s, optimize_interval_s: popular items; compaction and the ANN index
    GET /recommend/{user_id}?k=10&include_seen=0   the same answer as `hymirec topk --json`

Writes (switches, refreshes, maintenance) run on one thread, in the order they were asked for, so
the runtime is the one writer of its tables (of the shared ones only while this worker owns the
catalogue topic's partition: ``owns_catalogue``; a revoke waits for the step in flight, ``wait_idle``); top-k queries run on their own threads and never wait
behind a switch. The runtime, its threads and the reader are built when the worker starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, TypeVar

import faust
import torch
from faust.types import TP

from hymirec.errors import HymirecError
from hymirec.settings import Settings
from serving.metrics import ServingMetrics
from serving.reader import Recommender
from serving.runtime import ServingRuntime
from serving.versions import parse_version_message
from store.events import MAX_ID_CHARS
from store.tables import Store
from stream.ingestor import Ingestor
from stream.web import authorized, unauthorized

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_K = 1000


class ServingSide:
    """The retrieval side's state in a worker: the runtime is built by ``start`` (when the worker
    starts), the top-k reader by the first query."""

    def __init__(self, app: faust.App, settings: Settings, ingestor: Ingestor, shards: Callable[[], set[int]]):
        self.app, self.settings, self.ingestor, self.shards = app, settings, ingestor, shards
        self.metrics: ServingMetrics | None = None
        self.runtime: ServingRuntime | None = None
        self.recommender: Recommender | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._touched: dict[int, dict[str, dict]] = {}  # shard -> user -> newest history row written
        self._wake = asyncio.Event()

    def start(self) -> None:
        torch.set_num_threads(self.settings.worker_torch_threads)
        self.metrics = ServingMetrics(self.ingestor.metrics.registry)
        self.runtime = ServingRuntime(self.settings, metrics=self.metrics, on_live=self.ingestor.set_encoder,
                                      owns_catalogue=self.owns_catalogue)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="hymirec-serving")

    def owns_catalogue(self) -> bool:
        """Asked by the runtime's thread before each write to a shared table: never during a rebalance,
        whose new owner may already start once this worker's revoke has returned."""
        return not self.app.rebalancing and TP(self.settings.topic_items, 0) in self.app.consumer.assignment()

    async def wait_idle(self) -> None:
        """Return once the runtime step in flight (if any) has finished: its writer thread runs in order."""
        if self._writer is not None:
            await asyncio.get_running_loop().run_in_executor(self._writer, lambda: None)

    async def write(self, what: str, fn: Callable[[ServingRuntime], T], *args: Any) -> T | None:
        """Run a runtime step on the writer thread; a failure is logged and the next timer retries."""
        if self.runtime is None:
            return None  # not started yet: the next timer runs it
        self.runtime.shards = self.shards()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._writer, fn, self.runtime, *args)
        except Exception as exc:  # noqa: BLE001 — keep serving what is live; the step is retried
            log.error("serving: %s failed: %s: %s", what, type(exc).__name__, exc)
            return None

    def touched(self, rows: dict[int, list[dict]]) -> None:
        """Hand the history rows an ingest write has just made durable to the interest refresher."""
        for shard, written in rows.items():
            newest = self._touched.setdefault(shard, {})
            newest.update((row["user_id"], row) for row in written)
        if rows:
            self._wake.set()

    async def refresh_loop(self) -> None:
        """Refresh as soon as rows are handed over, else every ``serving_refresh_s``. Rows handed over
        while the runtime is not started, or lost with a failed step, are found by its next scan."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.serving_refresh_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            touched, self._touched = self._touched, {}
            # Every row written before now has been handed over, in this batch or an earlier one.
            await self.write("refreshing items and interests", ServingRuntime.refresh,
                             {shard: list(rows.values()) for shard, rows in touched.items()}, datetime.now(timezone.utc))

    async def recommend(self, user_id: str, k: int, include_seen: bool):
        if self.recommender is None:  # the first query: top-k needs no runtime, so none waits for it
            self.recommender = Recommender(Store(self.settings))
            self._readers = ThreadPoolExecutor(2, thread_name_prefix="hymirec-topk")
        return await asyncio.get_running_loop().run_in_executor(
            self._readers, lambda: self.recommender(user_id, k, include_seen=include_seen))


def register(app: faust.App, settings: Settings, ingestor: Ingestor, shards: Callable[[], set[int]]) -> ServingSide:
    """Add the retrieval side's topic, agent, timers and web view to ``app``; ``shards`` says which
    ``interactions`` partitions (hence interest shards) the worker owns now."""
    side = ServingSide(app, settings, ingestor, shards)
    versions_topic = app.topic(settings.topic_model_versions, key_serializer="raw", value_serializer="raw",
                               partitions=settings.partitions, internal=True)

    @app.agent(versions_topic, concurrency=1, name="serving.model_versions")
    async def model_versions(stream):
        async for value in stream:
            try:
                message = parse_version_message(value)
            except HymirecError as exc:
                log.error("ignoring a model-versions message: %s", exc)
                continue
            if side.metrics is not None:
                side.metrics.record_scores(message["version"], message.get("metrics") or {})
            log.info("model-versions: %s (parent %s)", message["version"], message.get("parent"))
            await side.write(f"switching to {message['version']}", ServingRuntime.switch_to, message["version"],
                             message.get("metrics"))

    @app.task
    async def start_serving() -> None:
        side.start()
        await side.write("resuming the live model", ServingRuntime.start)

    @app.task
    async def refresh_serving() -> None:
        await side.refresh_loop()

    @app.timer(settings.version_poll_s, name="serving.poll_registry")
    async def poll_registry() -> None:
        await side.write("checking the registry", ServingRuntime.catch_up)

    @app.timer(settings.popularity_refresh_s, name="serving.refresh_popularity")
    async def refresh_popularity() -> None:
        await side.write("counting popular items", ServingRuntime.refresh_popularity)

    @app.timer(settings.optimize_interval_s, name="serving.optimize")
    async def optimize_serving() -> None:
        for line in await side.write("optimizing serving tables", ServingRuntime.optimize) or []:
            log.info("optimized %s", line)

    @app.page("/recommend/{user_id}")
    async def recommend_view(web, request, user_id: str):
        if not authorized(request.headers, settings.http_token):
            return unauthorized(web)
        if len(user_id) > MAX_ID_CHARS:
            return web.json({"error": f"user_id must be at most {MAX_ID_CHARS} characters"}, status=400)
        try:
            k = int(request.query.get("k", "10"))
        except ValueError:
            k = 0
        if not 1 <= k <= MAX_K:
            return web.json({"error": f"k must be a whole number in 1..{MAX_K}"}, status=400)
        include_seen = request.query.get("include_seen", "0").lower() in ("1", "true", "yes")
        started = time.perf_counter()
        try:
            rec = await side.recommend(user_id, k, include_seen)
        except HymirecError as exc:
            return web.json({"error": str(exc)}, status=503)
        if side.metrics is not None:
            side.metrics.topk_seconds.observe(time.perf_counter() - started)
        return web.json(rec.to_json())

    return side
