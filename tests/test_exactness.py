"""Exactness at any partition count, against the real broker (DESIGN §7b): every user's history equals
the log, in the log's order, and the applied count equals the events sent minus the dead letters —

- after a graceful stop (SIGTERM) while backlogged, at 1, 4, 12 and 16 partitions;
- when the group's committed offsets are already at the end of every partition while LanceDB holds
  nothing (the state the 12-partition bug left behind: acknowledged, never written);
- when a second worker joins mid-replay and leaves again (two rebalances);
- after `kill -9` of one of two workers mid-replay;
- after `kill -9` at each boundary of a write: events applied in memory but not yet written, and
  rows written but their offsets not yet committed to Kafka (``crash_worker.py``).

Each ends with the lag check: the position stored with every shard is its partition's end offset - 1,
and the group's committed offset (monitoring only) is the end offset.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from hymirec.procs import ManagedProcess, settings_env
from hymirec.settings import Settings
from store import Store
from stream.broker import create_topics
from stream.lag import partition_lag
from stream.replay import replay

from helpers import http_get, private_worker, produce, read_dead_letters, scrape, wait_for
from test_reliability import DEADLINE_S, applied, expected_histories, matches, synthetic_log, wait, worker

pytestmark = [pytest.mark.reliability, pytest.mark.broker]

CRASH_WORKER = Path(__file__).with_name("crash_worker.py")
BAD_EVERY = 250  # one payload in this many is not JSON: dead-lettered, and never counted as applied


def topics_for(broker_settings: Settings, tmp_path: Path, partitions: int) -> Settings:
    suffix = uuid.uuid4().hex[:10]
    settings = private_worker(broker_settings, tmp_path, partitions=partitions, batch_size=100,
                              worker_session_timeout_s=6.0, app_id=f"hymirec-exact-{suffix}",
                              topic_interactions=f"interactions-{suffix}", topic_items=f"items-{suffix}",
                              topic_model_versions=f"model-versions-{suffix}", topic_dead_letter=f"dead-{suffix}")
    create_topics(settings)
    return settings


def produce_log(settings: Settings, events: list[dict]) -> int:
    """All events keyed by user, with a bad payload after every BAD_EVERY-th; returns the bad count."""
    records, bad = [], 0
    for i, e in enumerate(events):
        records.append((settings.topic_interactions, e["user_id"].encode(), json.dumps(e).encode()))
        if i % BAD_EVERY == BAD_EVERY - 1:
            records.append((settings.topic_interactions, e["user_id"].encode(), b"not json"))
            bad += 1
    produce(settings, records)
    return bad


def end_offsets(settings: Settings) -> dict[int, int]:
    return {row.partition: row.end for row in partition_lag(settings)}


def committed_offsets(settings: Settings) -> dict[int, int | None]:
    return {row.partition: row.committed for row in partition_lag(settings)}


def caught_up(settings: Settings) -> bool:
    return all(row.caught_up for row in partition_lag(settings))


def assert_exact(settings: Settings, proc, events: list[dict], bad: int, *, dead_letters_resent: bool = False) -> None:
    """Histories equal the log; applied = sent - dead letters; every shard's position at its end
    (``dead_letters_resent``: a crash may have sent some dead letters twice; counted by source)."""
    store, expected = Store(settings), expected_histories(events)
    wait("every logged event applied", lambda: matches(store, expected), proc)
    wait("stored positions and committed offsets at every partition's end", lambda: caught_up(settings), proc)
    rows = store.get_histories(list(expected))
    assert {u: r["history_item_ids"] for u, r in rows.items()} == expected
    sent = len(events) + bad
    assert sum(r["event_count"] for r in rows.values()) == sent - len(read_dead_letters(settings, bad, by_source=dead_letters_resent))


@pytest.mark.parametrize("partitions", [1, 4, 12, 16])
def test_graceful_stop_while_backlogged_loses_and_repeats_nothing(broker_settings, tmp_path, partitions):
    # Under a backlog staged batches are written every ingest_flush_events (or ingest_flush_s): the
    # default count would let the worker write the whole log at once, so a stop could not land mid-way.
    s = topics_for(broker_settings, tmp_path, partitions).model_copy(update={"ingest_flush_events": 2000})
    events = synthetic_log(20_000, users=60, items=150, seed=partitions)
    bad = produce_log(s, events)  # the whole log is waiting before the worker starts: a backlog
    log_path = tmp_path / "worker.log"
    with worker(s, log_path) as first:
        # The backlog's first write; polled often: the worker applies thousands of events a second,
        # and goes on until the stop lands.
        wait_for("the backlog's first write", lambda: applied(s) > 0, first.proc, log_path, interval=0.05)
        assert first.stop(30.0) == 0, "the worker did not stop cleanly on SIGTERM"
    at_stop = sum(r["event_count"] for r in Store(s).get_histories(list(expected_histories(events))).values())
    assert at_stop < len(events), "the stop did not land mid-backlog"
    with worker(s, log_path) as second:
        assert_exact(s, second, events, bad)
        # Exactly what the first worker left is applied now: nothing of its part twice.
        assert scrape(s)[("hymirec_events_applied_total", ())] == len(events) - at_stop


def test_offsets_committed_past_unwritten_events_do_not_skip_them(broker_settings, tmp_path):
    s = topics_for(broker_settings, tmp_path, 12)
    events = synthetic_log(2000, users=50, items=100, seed=7)
    bad = produce_log(s, events)
    # What the bug left: the group committed every partition's end, LanceDB has none of it.
    ends = end_offsets(s)
    consumer = KafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=s.app_id, enable_auto_commit=False)
    try:
        consumer.commit({TopicPartition(s.topic_interactions, p): OffsetAndMetadata(end, "", -1)
                         for p, end in ends.items()})
    finally:
        consumer.close()
    assert committed_offsets(s) == ends
    with worker(s, tmp_path / "worker.log") as proc:
        assert_exact(s, proc, events, bad)


def two_workers(broker_settings: Settings, tmp_path: Path, n: int, seed: int) -> tuple[Settings, Settings, list[dict], Path]:
    """Settings of a 12-partition group and of a second worker in it (own web port and state), and a
    logged stream of ``n`` events written to a file for the replay."""
    s = topics_for(broker_settings, tmp_path, 12)
    events = synthetic_log(n, users=80, items=150, seed=seed)
    log_file = tmp_path / "log.jsonl"
    log_file.write_text("".join(json.dumps(e) + "\n" for e in events))
    second = s.model_copy(update={"web_port": private_worker(s, tmp_path).web_port, "worker_dir": tmp_path / "w2"})
    return s, second, events, log_file


@contextmanager
def replaying(settings: Settings, log_file: Path, rate: float) -> Iterator[None]:
    """A paced replay in the background for the block; it must have sent everything by the end."""
    summary: list = []
    sender = threading.Thread(target=lambda: summary.append(replay(settings, log_file, rate=rate, progress=False)))
    sender.start()
    try:
        yield
    finally:
        sender.join(180)
    assert not sender.is_alive() and summary and summary[0].failed == 0


def test_a_worker_joining_and_leaving_mid_replay_loses_and_repeats_nothing(broker_settings, tmp_path):
    s, second, events, log_file = two_workers(broker_settings, tmp_path, 6000, seed=11)
    with worker(s, tmp_path / "first.log") as first:
        wait("the worker's /health", lambda: http_get(s, "/health"), first)
        # Slow enough (40 s) that the joiner gets partitions while events still arrive.
        with replaying(s, log_file, rate=150):
            wait("a tenth of the replay applied", lambda: applied(s) >= len(events) // 10, first)
            with worker(second, tmp_path / "second.log") as joiner:
                wait_for("the second worker applying", lambda: applied(second) > 0, joiner.proc, joiner.log_path)
                joined_at = applied(s) + applied(second)
                assert joined_at < len(events), "the replay ended before the second worker joined"
                assert joiner.stop(30.0) == 0
        assert_exact(s, first, events, 0)


def test_kill_9_of_one_of_two_workers_mid_replay_loses_and_repeats_nothing(broker_settings, tmp_path):
    s, second, events, log_file = two_workers(broker_settings, tmp_path, 4000, seed=13)
    with worker(s, tmp_path / "first.log") as survivor, worker(second, tmp_path / "second.log") as victim:
        with replaying(s, log_file, rate=400):
            wait_for("the victim applying", lambda: applied(second) >= 200, victim.proc, victim.log_path)
            os.killpg(victim.proc.pid, signal.SIGKILL)
            victim.proc.wait(10)
        assert_exact(s, survivor, events, 0)


@pytest.mark.parametrize("point", ["before_write", "after_write"])
def test_kill_9_at_a_write_boundary_loses_and_repeats_nothing(broker_settings, tmp_path, point):
    # A backlog of full batches: the worker stages several of them in memory before each write.
    s = topics_for(broker_settings, tmp_path, 4).model_copy(update={"ingest_flush_events": 500,
                                                                      "ingest_flush_s": 30.0})
    events = synthetic_log(3000, users=60, items=150, seed=17)
    bad = produce_log(s, events)
    crashing = ManagedProcess([sys.executable, str(CRASH_WORKER)], log_path=tmp_path / "crashing.log",
                              env=settings_env(s) | {"HYMIREC_TEST_CRASH_AT": point, "HYMIREC_TEST_CRASH_AFTER": "2"})
    with crashing:
        assert crashing.proc.wait(DEADLINE_S) == -signal.SIGKILL, crashing.tail()
    at_crash = sum(r["event_count"] for r in Store(s).get_histories(list(expected_histories(events))).values())
    # Two writes of at least 500 events landed; the third died before (with >= 500 staged) or after its write.
    assert (1000 if point == "before_write" else 1500) <= at_crash < len(events), at_crash
    with worker(s, tmp_path / "worker.log") as second:
        assert_exact(s, second, events, bad, dead_letters_resent=point == "before_write")
        # Exactly what the crashed worker had not written is applied now: nothing of its part twice.
        assert scrape(s)[("hymirec_events_applied_total", ())] == len(events) - at_crash
