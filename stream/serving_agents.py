"""The retrieval side of the worker: agents, timers and a web view on the Faust app of stream.app.

stream.app imports this module at its end, so one `faust -A stream.app worker` runs both halves:

    model-versions         → hot-swap to the announced version (stream.serving.ServingRuntime)
    every serving_refresh_s   re-encode new/changed items, recompute the interests of touched users
    every version_poll_s      switch to a newer registry version nobody announced to this worker
                              (the trainer's messages share one partition: one worker of a group gets them)
    every popularity_refresh_s, optimize_interval_s: popular items; compaction and the ANN index
    GET /recommend/{user_id}?k=10&include_seen=0   the same answer as `hymirec topk --json`

Writes (switches, refreshes, maintenance) run on one thread, in the order they were asked for, so
the runtime is the one writer of its tables; top-k queries run on their own threads and never wait
behind a switch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from hymirec.errors import HymirecError
from store.tables import Store
from stream.app import app, ingestor, settings
from stream.serving import Recommender, ServingMetrics, ServingRuntime, parse_version_message

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_K = 1000

versions_topic = app.topic(settings.topic_model_versions, key_serializer="raw", value_serializer="raw",
                           partitions=settings.partitions, internal=True)

serving_metrics = ServingMetrics(ingestor.metrics.registry)
runtime = ServingRuntime(settings, metrics=serving_metrics, on_live=ingestor.set_encoder)
_writer = ThreadPoolExecutor(1, thread_name_prefix="hymirec-serving")
_readers = ThreadPoolExecutor(2, thread_name_prefix="hymirec-topk")
_recommender: Recommender | None = None


async def _write(what: str, fn: Callable[..., T], *args: Any) -> T | None:
    """Run a runtime step on the writer thread; a failure is logged and the next timer retries."""
    runtime.shards = {tp.partition for tp in app.consumer.assignment() if tp.topic == settings.topic_interactions}
    try:
        return await asyncio.get_running_loop().run_in_executor(_writer, fn, *args)
    except Exception as exc:  # noqa: BLE001 — keep serving what is live; the step is retried
        log.error("serving: %s failed: %s: %s", what, type(exc).__name__, exc)
        return None


@app.agent(versions_topic, concurrency=1)
async def model_versions(stream):
    async for value in stream:
        try:
            message = parse_version_message(value)
        except HymirecError as exc:
            log.error("ignoring a model-versions message: %s", exc)
            continue
        serving_metrics.record_scores(message["version"], message.get("metrics") or {})
        log.info("model-versions: %s (parent %s)", message["version"], message.get("parent"))
        await _write(f"switching to {message['version']}", runtime.switch_to, message["version"], message.get("metrics"))


@app.task
async def start_serving() -> None:
    await _write("resuming the live model", runtime.start)


@app.timer(settings.serving_refresh_s)
async def refresh_serving() -> None:
    await _write("refreshing items and interests", runtime.refresh)


@app.timer(settings.version_poll_s)
async def poll_registry() -> None:
    await _write("checking the registry", runtime.catch_up)


@app.timer(settings.popularity_refresh_s)
async def refresh_popularity() -> None:
    await _write("counting popular items", runtime.refresh_popularity)


@app.timer(settings.optimize_interval_s)
async def optimize_serving() -> None:
    for line in await _write("optimizing serving tables", runtime.optimize) or []:
        log.info("optimized %s", line)


def _recommend(user_id: str, k: int, include_seen: bool):
    global _recommender
    if _recommender is None:
        _recommender = Recommender(Store(settings))
    return _recommender(user_id, k, include_seen=include_seen)


@app.page("/recommend/{user_id}")
async def recommend_view(web, request, user_id: str):
    try:
        k = int(request.query.get("k", "10"))
    except ValueError:
        k = 0
    if not 1 <= k <= MAX_K:
        return web.json({"error": f"k must be a whole number in 1..{MAX_K}"}, status=400)
    include_seen = request.query.get("include_seen", "0").lower() in ("1", "true", "yes")
    started = time.perf_counter()
    try:
        rec = await asyncio.get_running_loop().run_in_executor(_readers, _recommend, user_id, k, include_seen)
    except HymirecError as exc:
        return web.json({"error": str(exc)}, status=503)
    serving_metrics.topk_seconds.observe(time.perf_counter() - started)
    return web.json(rec.to_json())
