"""The Faust app of the online loop: its topics, agents, timers and web views (the logic is in
stream.ingest, stream.ingestor; ``interactions`` are read by stream.consumer).

    faust -A stream.app worker -l info      # reads HYMIREC_* (kafka_bootstrap, lancedb_uri, ...)

Input topics are consumed as raw bytes: the ingest path validates each payload itself, so a
malformed one becomes a dead-letter record instead of a deserialisation error that would stop the
worker. ``interactions`` bypass Faust's per-event stream (stream.consumer: aiokafka's getmany, group
``app_id``, its offsets and rebalances handled there, DESIGN §7b); Faust runs as group
``{app_id}-control`` for the rest. Its agents run with ``concurrency=1`` (faust #606: with more, an
offset can be committed past a message still in flight), in micro-batches of ``batch_size`` events
or ``batch_within_s`` seconds. Faust acknowledges messages it never handed to an agent (after a
rebalance, queued messages of the old generation are skipped *and acked*, faust/streams.py
``_py_aiter``), so ``items`` is declared ``acks=False`` and committed only after its write (an item
upsert is idempotent, so a re-read costs nothing).

Several workers share the groups. The ``items`` topic has one partition: the worker it is assigned
to is the one writer of the tables all workers share (items here; item vectors, serving versions
and the blend in serving.runtime), and the group hands the role over when that worker leaves.

    GET /metrics   Prometheus text format (stream.metrics)
    GET /health    JSON: app id, model version, known items, counters
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import Mapping

import faust
import mode
from faust.types import TP

from hymirec.errors import HymirecError
from hymirec.settings import load_settings
from store.layout import claim_layout
from store.tables import Store
from stream.consumer import COMMIT_TIMEOUT_S, InteractionsConsumer
from stream.credentials import app_options
from stream.ingest import RawEvent
from stream.ingestor import Ingestor
from stream.malloc import limit_arenas
from stream.metrics import CONTENT_TYPE
from stream.serving_agents import register as register_serving
from stream.web import authorized, unauthorized

log = logging.getLogger(__name__)

settings = load_settings()
gc.set_threshold(*settings.worker_gc_thresholds)
limit_arenas(settings.worker_malloc_arenas)  # before the worker's threads allocate
try:
    # Before any agent writes: with another partition count users would hash to other shards.
    claim_layout(Store(settings))
except HymirecError as exc:
    sys.exit(f"hymirec worker: error: {exc}")  # one line, not faust's traceback of an import error

app = faust.App(
    f"{settings.app_id}-control",
    **app_options(settings),
    topic_partitions=settings.partitions,
    producer_acks=-1,  # a dead-letter record counts as kept only once all in-sync replicas have it
    broker_session_timeout=settings.worker_session_timeout_s,
    broker_rebalance_timeout=settings.worker_session_timeout_s,
    broker_heartbeat_interval=settings.worker_session_timeout_s / 10,
)

# internal=True makes faust create the topics (with the project's partition count) before it
# subscribes, so a worker started before `hymirec kafka topics` does not get the broker's defaults;
# interactions, read by stream.consumer, are declared before it starts.
interactions_topic = app.topic(settings.topic_interactions, key_serializer="raw", value_serializer="raw",
                               partitions=settings.partitions, internal=True, acks=False)
items_topic = app.topic(settings.topic_items, key_serializer="raw", value_serializer="raw",
                        partitions=settings.topic_partitions()[settings.topic_items], internal=True, acks=False)
dead_letter_topic = app.topic(settings.topic_dead_letter, key_serializer="raw", value_serializer="json",
                              partitions=settings.partitions)

ingestor = Ingestor(settings)


class FaustKafka:
    """The items path's ``KafkaSide`` over this app's consumer."""

    def owns(self, topic: str, partition: int) -> bool:
        return TP(topic, partition) in app.consumer.assignment()

    async def seek(self, topic: str, partition: int, offset: int) -> None:
        if self.owns(topic, partition):
            await app.consumer.seek(TP(topic, partition), offset)

    async def commit(self, topic: str, offsets: Mapping[int, int]) -> None:
        if not offsets or app.rebalancing:
            return  # the next batch's commit carries it
        # Faust's public commit() commits only what it acked, and it acks nothing of these topics:
        # this is the step its own commit path ends in, given the offsets to record.
        tps = {TP(topic, partition): offset for partition, offset in offsets.items()}
        try:
            await asyncio.wait_for(app.consumer._commit(tps), COMMIT_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 — an item re-read is idempotent
            log.warning("committing %s to Kafka failed: %s: %s", tps, type(exc).__name__, exc)


kafka = FaustKafka()


def _raw(events) -> list[RawEvent]:
    return [RawEvent(e.value, e.key, e.message.partition, e.message.offset, e.message.timestamp) for e in events]


async def send_dead(records: list[dict]) -> None:
    """Put records on the dead-letter topic and wait until the broker has them."""
    pending = [await dead_letter_topic.send(value=record) for record in records]
    for future in pending:
        await future


@app.agent(items_topic, concurrency=1)
async def ingest_items(stream):
    async for events in stream.take_events(settings.batch_size, within=settings.batch_within_s):
        await ingestor.items(_raw(events), send_dead, kafka)


@app.on_rebalance_complete.connect
async def check_items_topic(sender, **kwargs) -> None:
    if any(tp.partition > 0 for tp in app.consumer.assignment() if tp.topic == settings.topic_items):
        await app.crash(HymirecError(  # a topic created before it had one partition
            f"topic {settings.topic_items!r} has more than one partition: every worker of the group would write "
            f"the shared tables; delete it and create it again with `hymirec kafka topics` (1 partition)"))


@app.on_partitions_revoked.connect
async def finish_the_step_in_flight(sender, *args, **kwargs) -> None:
    """The catalogue's next writer must not start before this worker's items write, or the
    runtime step writing the shared tables, has landed."""
    await ingestor.idle()
    await serving_side.wait_idle()


@app.service
class ConsumeInteractions(mode.Service):
    """Starts stream.consumer once the app runs; on stop (before Faust's producer stops: services
    stop in reverse order) it writes what is staged and leaves the interactions group."""

    async def on_start(self) -> None:
        await interactions_topic.maybe_declare()
        await interactions.start()

    async def on_stop(self) -> None:
        await interactions.stop()


@app.task
async def on_started() -> None:
    await dead_letter_topic.maybe_declare()  # a topic only sent to is not declared by faust itself
    ingestor.log_waiting_for_model()
    await ingestor.refresh_items()


@app.timer(settings.item_cache_refresh_s)
async def refresh_items() -> None:
    await ingestor.refresh_items()


@app.timer(settings.ingest_flush_s / 2)
async def flush_staged() -> None:
    """Under a backlog the consumer writes every ingest_flush_s; this catches a backlog that ended
    with a full micro-batch, whose events would otherwise wait for the next one."""
    await ingestor.flush(send_dead, interactions, only_if_due=True)


@app.timer(settings.lag_report_s)
async def report_lag() -> None:
    ingestor.report_lag(interactions.end_offsets())


@app.timer(settings.optimize_interval_s)
async def optimize_tables() -> None:
    await ingestor.optimize(shards=interactions.partitions(),
                            items=any(tp.topic == settings.topic_items for tp in app.consumer.assignment()))


@app.page("/metrics")
async def metrics(web, request):
    if not authorized(request.headers, settings.http_token):
        return unauthorized(web)
    # As a header: aiohttp refuses a content_type argument with a charset in it.
    return web.bytes(ingestor.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


@app.page("/health")
async def health(web, request):
    return web.json(ingestor.health(interactions.end_offsets()) | {"writes_catalogue": serving_side.owns_catalogue()})


interactions = InteractionsConsumer(settings, ingestor, send_dead, on_crash=app.crash)
serving_side = register_serving(app, settings, ingestor, interactions.partitions)  # hot-swap, refresh, /recommend
ingestor.on_written = serving_side.touched
interactions.on_revoked = serving_side.wait_idle  # a revoked shard's interests: its next owner writes them
