"""The worker's consumer of ``interactions``: aiokafka's ``getmany`` straight into the ingest path.

Faust's per-event stream (message → event → channel queue → ``take_events``) caps a worker at
~0.025 × a raw read of the topic (``hymirec bench ingest``: an agent that only counts the events
gets 11–14k events/s), below what the ingest path itself applies. So ``interactions`` is read here,
a fetched batch at a time, in the consumer group ``settings.app_id`` (what `hymirec status` and
kafka-consumer-groups show); Faust keeps the other topics, the timers and the web views
(``stream.app``, its own group).

Offsets (DESIGN §7b): nothing is auto-committed. On each assignment the consumer seeks every
partition to the position stored with its shard + 1 (``Ingestor.resume``) and commits that; after
each write the ingest path commits the new positions (monitoring: the stored positions count). A
revoke writes what is staged before it returns, so a partition's next owner starts from it, and a
stop does the same before the consumer leaves the group (aiokafka calls no revoke on stop).
Records fetched before a rebalance are dropped: the partitions are read again from their stored
positions, so nothing fetched and not written is lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from hymirec.settings import Settings, kafka_client_options
from stream.ingest import RawEvent
from stream.ingestor import Ingestor, SendDead

log = logging.getLogger(__name__)

COMMIT_TIMEOUT_S = 10.0
IDLE_POLL_S = 1.0  # how long an empty fetch waits before the loop looks again


class InteractionsConsumer:
    """The ``interactions`` partitions this worker owns, read in micro-batches into ``ingestor``;
    also the ingest path's ``KafkaSide`` (ownership, seeks and commits of those partitions)."""

    def __init__(self, settings: Settings, ingestor: Ingestor, send_dead: SendDead,
                 on_revoked: Callable[[], Awaitable[None]] | None = None,
                 on_crash: Callable[[BaseException], Awaitable[None]] | None = None):
        self.settings, self.ingestor, self.send_dead = settings, ingestor, send_dead
        self.topic = settings.topic_interactions
        self.on_revoked = on_revoked  # after a revoke's write: e.g. wait for the interest writer's step
        self.on_crash = on_crash
        self._consumer: AIOKafkaConsumer | None = None
        self._loop_task: asyncio.Task | None = None
        self._generation = 0  # counts assignments: a batch fetched under an older one is dropped

    # --- KafkaSide ----------------------------------------------------------------------------
    def owns(self, topic: str, partition: int) -> bool:
        return topic == self.topic and partition in self.partitions()

    def partitions(self) -> set[int]:
        """The ``interactions`` partitions assigned to this worker now."""
        if self._consumer is None:
            return set()
        return {tp.partition for tp in self._consumer.assignment() if tp.topic == self.topic}

    async def seek(self, topic: str, partition: int, offset: int) -> None:
        if self.owns(topic, partition):
            self._consumer.seek(TopicPartition(topic, partition), offset)

    async def commit(self, topic: str, offsets: Mapping[int, int]) -> None:
        owned = {TopicPartition(topic, p): OffsetAndMetadata(offset, "")
                 for p, offset in offsets.items() if self.owns(topic, p)}
        if not owned:
            return  # revoked meanwhile: the next owner commits from the stored positions
        try:
            await asyncio.wait_for(self._consumer.commit(owned), COMMIT_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 — monitoring only: the positions in LanceDB count
            log.warning("committing %s to Kafka failed: %s: %s", owned, type(exc).__name__, exc)

    def end_offsets(self) -> dict[int, int]:
        """{owned partition: its high-water mark as of the last fetch} (partitions not fetched yet left out)."""
        ends = {p: self._consumer.highwater(TopicPartition(self.topic, p)) for p in self.partitions()}
        return {p: end for p, end in ends.items() if end is not None}

    # --- rebalances ---------------------------------------------------------------------------
    async def revoked(self) -> None:
        self._generation += 1
        await self.ingestor.release(self.send_dead, self)
        if self.on_revoked is not None:
            await self.on_revoked()

    async def assigned(self, partitions: list[int]) -> None:
        self._generation += 1
        offsets = await self.ingestor.resume(partitions)
        log.info("resuming %r from the positions stored in LanceDB: %s", self.topic, offsets)
        for partition, offset in offsets.items():
            await self.seek(self.topic, partition, offset)
        # Records fetched while the positions were read came from before these seeks: read again now.
        self._generation += 1
        await self.commit(self.topic, offsets)

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        session_ms = int(s.worker_session_timeout_s * 1000)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap, group_id=s.app_id, client_id=f"{s.app_id}-interactions",
            enable_auto_commit=False, auto_offset_reset="earliest", session_timeout_ms=session_ms,
            rebalance_timeout_ms=session_ms, heartbeat_interval_ms=session_ms // 10, **kafka_client_options(s))
        await self._consumer.start()
        self._consumer.subscribe([self.topic], listener=_Listener(self))
        self._loop_task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Finish the batch in flight, write what is staged, then leave the group."""
        if self._loop_task is not None:
            self._loop_task.cancel()  # a batch being applied still lands (Ingestor shields it)
            await asyncio.gather(self._loop_task, return_exceptions=True)
        try:
            if self._consumer is not None and self.partitions():
                await self.ingestor.flush(self.send_dead, self)
        finally:
            if self._consumer is not None:
                await self._consumer.stop()

    async def _run(self) -> None:
        try:
            while True:
                batch, generation = await self._take()
                if batch:
                    await self.ingestor.interactions(batch, self.send_dead, self,
                                                     current=lambda: generation == self._generation)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 — a dead loop must stop the worker, not leave it idle
            log.exception("consuming %r failed", self.topic)
            if self.on_crash is not None:
                await self.on_crash(exc)

    async def _take(self) -> tuple[list[RawEvent], int]:
        """Up to ``batch_size`` events, waiting at most ``batch_within_s`` after the first one came
        ([] after an idle poll), and the generation they were fetched under. A rebalance meanwhile drops
        what was fetched before it."""
        size, within = self.settings.batch_size, self.settings.batch_within_s
        loop = asyncio.get_running_loop()
        batch: list[RawEvent] = []
        generation, deadline = self._generation, loop.time() + IDLE_POLL_S
        while len(batch) < size:
            wait = deadline - loop.time()
            if wait <= 0:
                break
            fetched = await self._consumer.getmany(timeout_ms=max(1, int(wait * 1000)), max_records=size - len(batch))
            if self._generation != generation:
                batch, generation = [], self._generation
            for tp, records in fetched.items():
                batch += [RawEvent(r.value, r.key, tp.partition, r.offset,
                                   None if r.timestamp is None or r.timestamp < 0 else r.timestamp / 1000)
                          for r in records]
            if batch and deadline - loop.time() > within:
                deadline = loop.time() + within  # the first events of the batch: wait at most `within` for more
        return batch, generation


class _Listener(ConsumerRebalanceListener):
    """aiokafka awaits these during a rebalance, before the group moves on."""

    def __init__(self, consumer: InteractionsConsumer):
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.consumer.revoked()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.consumer.assigned(sorted(tp.partition for tp in assigned if tp.topic == self.consumer.topic))
