"""The worker's write-behind (stream.shard_cache behind stream.ingestor) on a real LanceDB directory,
no broker: reads served from memory, batches staged under a backlog and written together, a crash
before the write losing nothing, a revoke writing what is staged, and the memory bound."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

from hymirec.settings import Settings
from stream.ingestor import Ingestor
from stream.ingest import BatchResult
from stream.shard_cache import ShardCache

from helpers import RecordingKafka, click

BATCH = 50


def log(n: int, users: int, partitions: int, seed: int):
    """n clicks, each user on one partition, offsets counted per partition; and the histories they make."""
    rng = random.Random(seed)
    offsets: dict[int, int] = defaultdict(int)
    events, expected = [], defaultdict(list)
    for i in range(n):
        user = rng.randrange(users)
        partition = user % partitions
        item = str(rng.randrange(100))
        events.append(click(f"u{user}", item, i, partition=partition, offset=offsets[partition],
                            event_id=f"e{i}" if i % 2 else None))
        offsets[partition] += 1
        expected[f"u{user}"].append(item)
    return events, dict(expected)


def batches(events, size=BATCH):
    return [events[i : i + size] for i in range(0, len(events), size)]


async def nothing_dead(records):
    assert not records


async def feed(ingestor: Ingestor, events, kafka: RecordingKafka) -> None:
    """The events, in batches of BATCH, as the agent hands them over."""
    for batch in batches(events):
        await ingestor.interactions(batch, nothing_dead, kafka)


async def assigned_and_fed(ingestor: Ingestor, events, kafka: RecordingKafka) -> None:
    """Resume the partitions ``kafka`` owns (an assignment), then ``feed``."""
    await ingestor.resume(sorted(kafka.owned))
    await feed(ingestor, events, kafka)


def run(ingestor: Ingestor, work):
    try:
        return asyncio.run(work())
    finally:
        ingestor.close()


def histories(settings: Settings, users) -> dict[str, list[str]]:
    return {u: r["history_item_ids"] for u, r in Ingestor(settings).store.get_histories(users).items()}


def backlog_settings(db_settings: Settings, **overrides) -> Settings:
    # Full batches (a backlog) are staged until 400 events or a minute: only the count or a partial batch writes.
    return db_settings.model_copy(update={"batch_size": BATCH, "ingest_flush_events": 400, "ingest_flush_s": 60.0,
                                          **overrides})


def test_a_backlog_is_written_in_fewer_larger_writes_and_a_partial_batch_writes_at_once(db_settings):
    s = backlog_settings(db_settings)
    events, expected = log(1000, users=30, partitions=2, seed=1)
    ingestor = Ingestor(s)
    kafka = RecordingKafka(owned=(0, 1))
    written_at: list[int] = []  # events handed in when each write landed
    handed: list[dict] = []
    ingestor.on_written = handed.append
    tail = [click("u0", "7", 5000, partition=0, offset=sum(e.partition == 0 for e in events))]

    async def work():
        await ingestor.resume([0, 1])
        fed = 0
        for batch in batches(events):
            await ingestor.interactions(batch, nothing_dead, kafka)
            fed += len(batch)
            if len(kafka.commits) > len(written_at):
                written_at.append(fed)
        await ingestor.interactions(tail, nothing_dead, kafka)  # a partial batch: nothing waits behind it

    run(ingestor, work)
    assert written_at == [400, 800], "a backlog is written every ingest_flush_events events"
    assert len(kafka.commits) == 3  # the last 200 events waited in memory until the partial batch
    expected["u0"].append("7")
    assert histories(s, expected) == expected
    assert ingestor.metrics.totals()["events_applied"] == len(events) + 1
    # Each write handed over the rows it made durable: the last one of every user is among them.
    newest = {row["user_id"]: row for rows in handed for shard_rows in rows.values() for row in shard_rows}
    assert {u: row["history_item_ids"] for u, row in newest.items()} == expected


def count_user_reads(ingestor: Ingestor, monkeypatch) -> list[list[str]]:
    """The user ids of each LanceDB read of users (the shard cache's reads of users it does not hold)."""
    asked: list[list[str]] = []
    real = ingestor.store.get_histories_and_position
    monkeypatch.setattr(ingestor.store, "get_histories_and_position",
                        lambda users, shard: asked.append(list(users)) or real(users, shard))
    return asked


def test_a_shard_that_fits_is_loaded_whole_so_no_user_is_read_one_by_one(db_settings, monkeypatch):
    s = backlog_settings(db_settings, ingest_flush_events=1)  # every batch written: only the reads differ
    events, expected = log(400, users=10, partitions=1, seed=2)
    first, second = Ingestor(s), Ingestor(s)
    first_reads, second_reads = count_user_reads(first, monkeypatch), count_user_reads(second, monkeypatch)
    run(first, lambda: assigned_and_fed(first, events[:200], RecordingKafka()))
    run(second, lambda: assigned_and_fed(second, events[200:], RecordingKafka()))  # the next owner
    assert histories(s, expected) == expected
    assert [u for users in first_reads + second_reads for u in users] == [], "only whole-shard loads"
    assert second.metrics.totals()["events_applied"] == 200


def test_a_shard_too_big_to_hold_reads_each_user_once_when_first_seen(db_settings, monkeypatch):
    s = backlog_settings(db_settings, ingest_flush_events=1, ingest_cache_ids=1000)
    events, expected = log(400, users=10, partitions=1, seed=2)  # 10 users: about 810 entries when held
    ingestor = Ingestor(s)
    # One stored user of 2,000 events (up to 1,000 ids + 100 event ids held) puts the shard over the budget.
    ingestor.store.upsert_histories(0, [{"user_id": "big", "history_item_ids": ["1"] * 1000, "recent_item_ids": [],
                                         "recent_event_ids": [f"b{i}" for i in range(100)], "event_count": 2000,
                                         "watermark_partition": 0, "watermark_offset": -1}])
    asked = count_user_reads(ingestor, monkeypatch)
    run(ingestor, lambda: assigned_and_fed(ingestor, events, RecordingKafka()))
    assert histories(s, expected) == expected
    assert sorted(u for users in asked for u in users) == sorted(expected), "each user read once, when first seen"


def test_a_crash_before_the_write_loses_nothing_and_applies_nothing_twice(db_settings):
    s = backlog_settings(db_settings)
    events, expected = log(1000, users=30, partitions=2, seed=3)
    first = Ingestor(s)
    kafka = RecordingKafka(owned=(0, 1))

    # 400 written, 300 staged in memory: then the process "dies" (nothing more runs).
    run(first, lambda: assigned_and_fed(first, events[:700], kafka))
    stored = first.store.positions()
    assert first.rows.staged_events() == 300 and len(kafka.commits) == 1
    assert sum(len(h) for h in histories(s, expected).values()) == 400

    second = Ingestor(s)

    async def restart():
        offsets = await second.resume([0, 1])
        assert offsets == {p: stored[p] + 1 for p in (0, 1)}
        # What Kafka redelivers from the stored positions: everything past them, the log's rest included.
        await feed(second, [e for e in events if e.offset > stored[e.partition]], kafka)
        await second.flush(nothing_dead, kafka)

    run(second, restart)
    assert histories(s, expected) == expected
    assert second.metrics.totals()["events_applied"] == 600


def test_a_revoke_writes_what_is_staged_and_forgets_the_held_rows(db_settings):
    s = backlog_settings(db_settings)
    events, expected = log(300, users=20, partitions=2, seed=4)
    ingestor = Ingestor(s)
    kafka = RecordingKafka(owned=(0, 1))

    async def work():
        await assigned_and_fed(ingestor, events, kafka)
        assert ingestor.rows.staged_events() == 300
        kafka.owned.clear()  # the consumer has let go of both partitions when the revoke callback runs
        await ingestor.release(nothing_dead, kafka)

    run(ingestor, work)
    assert histories(s, expected) == expected
    assert ingestor.store.positions() == {p: sum(e.partition == p for e in events) - 1 for p in (0, 1)}
    assert len(ingestor.rows) == 0 and ingestor.rows.staged_events() == 0


def test_memory_holds_at_most_the_budget_after_a_write_and_evicted_users_still_append(db_settings):
    # A budget of 60 entries holds two or three of these users (each ends with about 15 items and
    # 7 event ids): the others are read again from LanceDB when they come back.
    s = backlog_settings(db_settings, ingest_flush_events=1, ingest_cache_ids=60)
    events, expected = log(600, users=40, partitions=1, seed=5)
    ingestor = Ingestor(s)
    held: list[int] = []

    async def work():
        await ingestor.resume([0])
        for batch in batches(events):
            await ingestor.interactions(batch, nothing_dead, RecordingKafka())
            held.append(len(ingestor.rows))

    run(ingestor, work)
    assert histories(s, expected) == expected
    assert 0 < max(held[-3:]) <= 4, held


def test_the_cache_reads_a_shard_position_once_and_then_keeps_its_own(db_settings):
    ingestor = Ingestor(db_settings)
    ingestor.store.upsert_histories(3, [], position=41)
    cache = ShardCache(ingestor.store, db_settings.model_copy(update={"ingest_cache_ids": 1000}))
    assert cache.get_histories_and_position([], 3) == ({}, 41)
    assert cache.get_histories_and_position([], 4) == ({}, None)  # a shard without a position
    ingestor.store.upsert_histories(3, [], position=50)  # (another writer: the cache is the only one)
    assert cache.get_histories_and_position([], 3)[1] == 41
    ingestor.close()


def test_forgetting_a_shard_drops_its_staged_events_from_what_the_write_will_count(db_settings):
    ingestor = Ingestor(db_settings)
    cache = ShardCache(ingestor.store, db_settings.model_copy(update={"ingest_cache_ids": 1000}))
    row = {"user_id": "u", "history_item_ids": ["a"], "recent_event_ids": []}
    cache.stage(BatchResult(applied_by_shard={0: 3, 1: 2}, rows={0: [row], 1: [{**row, "user_id": "v"}]},
                            positions={0: 7, 1: 4}, timestamps_by_shard={0: [1.0, 2.0, 3.0], 1: [4.0, 5.0]}))
    cache.stage(BatchResult(applied_by_shard={1: 1}, positions={1: 5}, timestamps_by_shard={1: [6.0]}))
    assert cache.staged_events() == 6
    cache.forget([1])  # revoked: its events are read again by the next owner, and counted there
    pending = cache.pending()
    assert (pending.applied, pending.applied_timestamps, pending.positions) == (3, [1.0, 2.0, 3.0], {0: 7})
    assert cache.staged_events() == 3 and list(pending.rows) == [0]
    ingestor.close()


def test_a_batch_fetched_before_a_rebalance_is_dropped_once_it_has_the_store(db_settings):
    """The consumer asks, under the store's lock, whether the batch is still of the current assignment:
    fetched while an assignment read its positions (before its seeks), it would be applied, then read
    again from the sought position and skipped as duplicates (seen: 64 of 305 events counted twice)."""
    s = backlog_settings(db_settings, ingest_flush_events=1)
    events, expected = log(60, users=5, partitions=1, seed=2)
    ingestor = Ingestor(s)
    kafka = RecordingKafka(owned=(0,))

    async def work():
        await ingestor.resume([0])
        dropped = await ingestor.interactions(events[:20], nothing_dead, kafka, current=lambda: False)
        assert dropped.applied == 0 and not kafka.commits and ingestor.rows.staged_events() == 0
        for batch in batches(events):  # read again from the stored position: all of it applied once
            await ingestor.interactions(batch, nothing_dead, kafka, current=lambda: True)

    run(ingestor, work)
    assert histories(s, expected) == expected
    totals = ingestor.metrics.totals()
    assert totals["events_applied"] == len(events) and totals["events_in"] == len(events)
