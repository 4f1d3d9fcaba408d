"""The Faust app of the online loop: its topics, agents and web views (the logic is in stream.ingest, stream.ingestor).

    faust -A stream.app worker -l info      # reads HYMIREC_* (kafka_bootstrap, lancedb_uri, ...)

Input topics are consumed as raw bytes: the agents validate each payload themselves, so a malformed
one becomes a dead-letter record instead of a deserialisation error that would stop the worker.
Agents run with ``concurrency=1`` (faust #606: with more, an offset can be committed past a message
still in flight), in micro-batches of ``batch_size`` events or ``batch_within_s`` seconds.

Offsets (DESIGN §7b). Faust acknowledges messages it never handed to an agent: after a rebalance
or while its flow is paused, queued messages of the old generation are skipped *and acked*
(faust/streams.py ``_py_aiter``), and its commit loop then commits past them. So the input topics
are declared ``acks=False``: Faust commits nothing of them. Each ``user_histories_pNNN`` shard
stores its partition's applied position in the same write as its rows; on every assignment the
worker commits and seeks each ``interactions`` partition to position + 1, and after each write
it commits the new position (for monitoring; the stored position is what counts). Items are
committed after their write (an item upsert is idempotent, so a re-read costs nothing).

Several workers share one group. The ``items`` topic has one partition: the worker it is assigned
to is the one writer of the tables all workers share (items here; item vectors, serving versions
and the blend in serving.runtime), and the group hands the role over when that worker leaves.

    GET /metrics   Prometheus text format (stream.metrics)
    GET /health    JSON: app id, model version, known items, counters
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Mapping

import faust
from faust.types import TP

from hymirec.errors import HymirecError
from hymirec.settings import load_settings
from store.layout import claim_layout
from store.tables import Store
from stream.credentials import app_options
from stream.ingest import RawEvent
from stream.ingestor import Ingestor
from stream.metrics import CONTENT_TYPE
from stream.serving_agents import register as register_serving
from stream.web import authorized, unauthorized

log = logging.getLogger(__name__)

settings = load_settings()
try:
    # Before any agent writes: with another partition count users would hash to other shards.
    claim_layout(Store(settings))
except HymirecError as exc:
    sys.exit(f"hymirec worker: error: {exc}")  # one line, not faust's traceback of an import error

app = faust.App(
    settings.app_id,
    **app_options(settings),
    topic_partitions=settings.partitions,
    producer_acks=-1,  # a dead-letter record counts as kept only once all in-sync replicas have it
    broker_session_timeout=settings.worker_session_timeout_s,
    broker_rebalance_timeout=settings.worker_session_timeout_s,
    broker_heartbeat_interval=settings.worker_session_timeout_s / 10,
)

# internal=True makes faust create the topics (with the project's partition count) before it
# subscribes, so a worker started before `hymirec kafka topics` does not get the broker's defaults.
interactions_topic = app.topic(settings.topic_interactions, key_serializer="raw", value_serializer="raw",
                               partitions=settings.partitions, internal=True, acks=False)
items_topic = app.topic(settings.topic_items, key_serializer="raw", value_serializer="raw",
                        partitions=settings.topic_partitions()[settings.topic_items], internal=True, acks=False)
dead_letter_topic = app.topic(settings.topic_dead_letter, key_serializer="raw", value_serializer="json",
                              partitions=settings.partitions)

ingestor = Ingestor(settings)
COMMIT_TIMEOUT_S = 10.0


class FaustKafka:
    """The ingest path's ``KafkaSide`` over this app's consumer."""

    def owns(self, topic: str, partition: int) -> bool:
        return TP(topic, partition) in app.consumer.assignment()

    async def seek(self, topic: str, partition: int, offset: int) -> None:
        if self.owns(topic, partition):
            await app.consumer.seek(TP(topic, partition), offset)

    async def commit(self, topic: str, offsets: Mapping[int, int], *, during_rebalance: bool = False) -> None:
        if not offsets or (app.rebalancing and not during_rebalance):
            return  # the next batch's commit, or the next assignment's, carries it
        # Faust's public commit() commits only what it acked, and it acks nothing of these topics:
        # this is the step its own commit path ends in, given the offsets to record.
        tps = {TP(topic, partition): offset for partition, offset in offsets.items()}
        try:
            await asyncio.wait_for(app.consumer._commit(tps), COMMIT_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 — monitoring only: the positions in LanceDB count
            log.warning("committing %s to Kafka failed: %s: %s", tps, type(exc).__name__, exc)


kafka = FaustKafka()


def _raw(events) -> list[RawEvent]:
    return [RawEvent(e.value, e.key, e.message.partition, e.message.offset, e.message.timestamp) for e in events]


async def send_dead(records: list[dict]) -> None:
    """Put records on the dead-letter topic and wait until the broker has them."""
    pending = [await dead_letter_topic.send(value=record) for record in records]
    for future in pending:
        await future


@app.agent(interactions_topic, concurrency=1)
async def ingest_interactions(stream):
    try:
        async for events in stream.take_events(settings.batch_size, within=settings.batch_within_s):
            await ingestor.interactions(_raw(events), send_dead, kafka)
    finally:  # a stop writes what is staged (else the next start reads it again from the stored positions)
        await ingestor.flush(send_dead, kafka)


@app.agent(items_topic, concurrency=1)
async def ingest_items(stream):
    async for events in stream.take_events(settings.batch_size, within=settings.batch_within_s):
        await ingestor.items(_raw(events), send_dead, kafka)


def _owned(topic: str) -> list[int]:
    return sorted(tp.partition for tp in app.consumer.assignment() if tp.topic == topic)


@app.on_rebalance_complete.connect
async def resume_from_stored_positions(sender, **kwargs) -> None:
    """Before Faust seeks its partitions to their committed offsets (right after this signal),
    make those offsets the positions stored with the shards, and seek there ourselves too."""
    if any(p > 0 for p in _owned(settings.topic_items)):  # a topic created before it had one partition
        await app.crash(HymirecError(
            f"topic {settings.topic_items!r} has more than one partition: every worker of the group would write "
            f"the shared tables; delete it and create it again with `hymirec kafka topics` (1 partition)"))
        return
    offsets = await ingestor.resume(_owned(settings.topic_interactions))
    log.info("resuming %r from the positions stored in LanceDB: %s", settings.topic_interactions, offsets)
    await kafka.commit(settings.topic_interactions, offsets, during_rebalance=True)
    for partition, offset in offsets.items():
        await kafka.seek(settings.topic_interactions, partition, offset)


@app.on_partitions_revoked.connect
async def finish_the_batch_in_flight(sender, *args, **kwargs) -> None:
    """A revoked partition's new owner must not start before this worker's last write to it lands
    (the catalogue's too: the shared tables' writer may be in the middle of a step)."""
    await ingestor.release(send_dead, kafka)
    await serving_side.wait_idle()


def _end_offsets() -> dict[int, int]:
    ends = {p: app.consumer.highwater(TP(settings.topic_interactions, p)) for p in _owned(settings.topic_interactions)}
    return {p: end for p, end in ends.items() if end is not None}


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
    """Under a backlog the agent writes every ingest_flush_s; this catches a backlog that ended
    with a full micro-batch, whose events would otherwise wait for the next one."""
    await ingestor.flush(send_dead, kafka, only_if_due=True)


@app.timer(settings.lag_report_s)
async def report_lag() -> None:
    ingestor.report_lag(_end_offsets())


@app.timer(settings.optimize_interval_s)
async def optimize_tables() -> None:
    assigned = app.consumer.assignment()
    await ingestor.optimize(
        shards={tp.partition for tp in assigned if tp.topic == settings.topic_interactions},
        items=any(tp.topic == settings.topic_items for tp in assigned),
    )


@app.page("/metrics")
async def metrics(web, request):
    if not authorized(request.headers, settings.http_token):
        return unauthorized(web)
    # As a header: aiohttp refuses a content_type argument with a charset in it.
    return web.bytes(ingestor.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


@app.page("/health")
async def health(web, request):
    return web.json(ingestor.health(_end_offsets()) | {"writes_catalogue": serving_side.owns_catalogue()})


serving_side = register_serving(app, settings, ingestor)  # hot-swap, interest refresh, GET /recommend
ingestor.on_written = serving_side.touched
