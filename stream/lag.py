"""Where the ``interactions`` partitions stand: end offset, the position stored with each shard
(what counts, DESIGN §7b) and the group's committed offset (monitoring only). ``hymirec status``
prints it; the reliability tests assert on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import CoordinatorNotAvailableError, KafkaError

from hymirec.errors import HymirecError
from hymirec.settings import Settings, kafka_client_options
from store.layout import check_layout
from store.tables import Store
from stream.kafka_errors import connection_problem


COORDINATOR_WAIT_S = 20.0


def events_behind(end: int, stored: int | None) -> int:
    """Events of a partition whose end offset is ``end`` past its applied position ``stored``."""
    return max(0, end - (-1 if stored is None else stored) - 1)


@dataclass(frozen=True, slots=True)
class PartitionLag:
    partition: int
    end: int  # the next offset a producer writes
    stored: int | None  # the shard's applied position (None: nothing of it applied yet)
    committed: int | None  # the group's committed offset (the next one to read), None if never committed

    @property
    def lag(self) -> int:
        """Events of the partition not applied yet."""
        return events_behind(self.end, self.stored)

    @property
    def caught_up(self) -> bool:
        return self.lag == 0 and self.committed in ((None, 0) if self.end == 0 else (self.end,))


def _clients(settings: Settings) -> tuple[KafkaConsumer, KafkaAdminClient]:
    options = kafka_client_options(settings)
    try:
        return (KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, **options),
                KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **options))
    except (KafkaError, OSError):
        raise HymirecError(connection_problem(settings)) from None


def partition_lag(settings: Settings, store: Store | None = None) -> list[PartitionLag]:
    """One row per partition of ``settings.topic_interactions`` (HymirecError if the store's
    shards are laid out for another partition count: their positions are not these partitions')."""
    store = store or Store(settings)
    check_layout(store)
    consumer, admin = _clients(settings)
    try:
        partitions = consumer.partitions_for_topic(settings.topic_interactions)
        if not partitions:
            raise HymirecError(f"no topic {settings.topic_interactions!r} on {settings.kafka_bootstrap}")
        ends = consumer.end_offsets([TopicPartition(settings.topic_interactions, p) for p in sorted(partitions)])
        committed = {tp.partition: meta.offset for tp, meta in _group_offsets(admin, settings).items()
                     if tp.topic == settings.topic_interactions and meta.offset >= 0}
    finally:
        consumer.close()
        admin.close()
    stored = store.positions()
    return [PartitionLag(tp.partition, end, stored.get(tp.partition), committed.get(tp.partition))
            for tp, end in sorted(ends.items(), key=lambda kv: kv[0].partition)]


def _group_offsets(admin: KafkaAdminClient, settings: Settings) -> dict:
    """The group's committed offsets. A fresh broker has no group coordinator until its offsets topic
    exists, which the first lookup creates: wait for it rather than fail."""
    deadline = time.monotonic() + COORDINATOR_WAIT_S
    while True:
        try:
            return admin.list_group_offsets(settings.app_id).get(settings.app_id, {})
        except CoordinatorNotAvailableError:
            if time.monotonic() > deadline:
                raise HymirecError(f"the Kafka broker at {settings.kafka_bootstrap} has no group coordinator after "
                                   f"{COORDINATOR_WAIT_S:.0f} s; try again once it has started") from None
            time.sleep(0.5)
