"""The Faust app of the online loop: its topics, agents and web views (the logic is in stream.ingest).

    faust -A stream.app worker -l info      # reads HYMIREC_* (kafka_bootstrap, lancedb_uri, ...)

Input topics are consumed as raw bytes: the agents validate each payload themselves, so a malformed
one becomes a dead-letter record instead of a deserialisation error that would stop the worker.
Agents run with ``concurrency=1`` (faust #606: with more, an offset can be committed past a message
still in flight), in micro-batches of ``batch_size`` events or ``batch_within_s`` seconds.

    GET /metrics   Prometheus text format (stream.metrics)
    GET /health    JSON: app id, model version, known items, counters
"""

from __future__ import annotations

import faust

from hymirec.settings import load_settings
from stream.ingest import Ingestor, RawEvent
from stream.metrics import CONTENT_TYPE

settings = load_settings()
settings.worker_dir.mkdir(parents=True, exist_ok=True)  # faust creates only the last level

app = faust.App(
    settings.app_id,
    broker=[f"kafka://{server.strip()}" for server in settings.kafka_bootstrap.split(",")],
    web_host=settings.web_host,
    web_bind=settings.web_host,
    web_port=settings.web_port,
    datadir=str(settings.worker_dir / settings.app_id),
    topic_partitions=settings.partitions,
    topic_disable_leader=True,
    consumer_auto_offset_reset="earliest",
    producer_acks=-1,  # a dead-letter record counts as kept only once all in-sync replicas have it
    broker_session_timeout=settings.worker_session_timeout_s,
    broker_rebalance_timeout=settings.worker_session_timeout_s,
    broker_heartbeat_interval=settings.worker_session_timeout_s / 10,
)

# internal=True makes faust create the topics (with the project's partition count) before it
# subscribes, so a worker started before `hymirec kafka topics` does not get the broker's defaults.
interactions_topic = app.topic(settings.topic_interactions, key_serializer="raw", value_serializer="raw",
                               partitions=settings.partitions, internal=True)
items_topic = app.topic(settings.topic_items, key_serializer="raw", value_serializer="raw",
                        partitions=settings.partitions, internal=True)
dead_letter_topic = app.topic(settings.topic_dead_letter, key_serializer="raw", value_serializer="json",
                              partitions=settings.partitions)

ingestor = Ingestor(settings)


def _raw(events) -> list[RawEvent]:
    return [RawEvent(e.value, e.key, e.message.partition, e.message.offset, e.message.timestamp) for e in events]


async def send_dead(records: list[dict]) -> None:
    """Put records on the dead-letter topic and wait until the broker has them."""
    pending = [await dead_letter_topic.send(value=record) for record in records]
    for future in pending:
        await future


@app.agent(interactions_topic, concurrency=1)
async def ingest_interactions(stream):
    async for events in stream.take_events(settings.batch_size, within=settings.batch_within_s):
        await ingestor.interactions(_raw(events), send_dead)


@app.agent(items_topic, concurrency=1)
async def ingest_items(stream):
    async for events in stream.take_events(settings.batch_size, within=settings.batch_within_s):
        await ingestor.items(_raw(events), send_dead)


@app.task
async def on_started() -> None:
    await dead_letter_topic.maybe_declare()  # a topic only sent to is not declared by faust itself
    ingestor.log_waiting_for_model()
    await ingestor.refresh_items()


@app.timer(settings.item_cache_refresh_s)
async def refresh_items() -> None:
    await ingestor.refresh_items()


@app.timer(settings.optimize_interval_s)
async def optimize_tables() -> None:
    assigned = app.consumer.assignment()
    await ingestor.optimize(
        shards={tp.partition for tp in assigned if tp.topic == settings.topic_interactions},
        items=any(tp.topic == settings.topic_items for tp in assigned),
    )


@app.page("/metrics")
async def metrics(web, request):
    # As a header: aiohttp refuses a content_type argument with a charset in it.
    return web.bytes(ingestor.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


@app.page("/health")
async def health(web, request):
    return web.json(ingestor.health())

# The retrieval side (hot-swap, interest refresh, GET /recommend) registers on this app.
from stream import serving_agents  # noqa: E402,F401
