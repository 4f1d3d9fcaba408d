"""Reliability of the online loop under crashes, broker outages, bad input and bad models (real LanceDB;
a real broker where a worker runs).

- kill -9 of the worker in the middle of a paced replay, then a restart: every user's history equals
  the log exactly (count and order), with and without event ids, so no event is lost or applied twice;
- the broker stopped and restarted while the worker runs: the same worker recovers on its own;
- 30+ kinds of bad payload interleaved with good ones: each is dead-lettered with its reason and
  source partition/offset, duplicates and unknown items are counted (not dead-lettered), every good
  event is applied and the worker keeps answering;
- a tampered and a truncated model artefact are refused while the old version keeps serving, and 8
  concurrent top-k clients during a hot-swap all get answers, each from exactly one version.

Every wait has a deadline; every worker is stopped SIGTERM → SIGKILL (hymirec.procs.ManagedProcess).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
import time
import uuid
from collections import defaultdict
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

from hymirec.procs import ManagedProcess, faust_worker
from hymirec.settings import Settings
from store import ModelRegistry, Store
from store.tables import table_names
from stream.broker import LocalKafka, create_topics
from stream.replay import replay
from serving.reader import open_own, ready_versions, recommend
from serving.runtime import ServingRuntime
from store.schemas import item_vectors_schema
from trainer.online import read_histories

from conftest import start_or_unavailable
from helpers import (  # noqa: F401 — world, world_settings: fixtures
    http_get, private_worker, produce, publish, read_dead_letters, scrape, tail, users_of, wait_for, world, world_settings,
)

pytestmark = pytest.mark.reliability

STOP_GRACE_S = 30.0
DEADLINE_S = 180.0  # a restarted worker waits out the dead member's session timeout first
BIG_LIMIT = 4 << 20  # max.message.bytes / max_request_size for the > 1 MiB payload


# --- helpers --------------------------------------------------------------------------------------------
def worker(settings: Settings, log_path: Path, **faust_env: str) -> AbstractContextManager[ManagedProcess]:
    """``hymirec.procs.faust_worker``: up once /health answers; SIGTERM, then SIGKILL after
    STOP_GRACE_S, however the block ends."""
    return faust_worker(settings, log_path, env=faust_env, stop_timeout=STOP_GRACE_S)


def wait(what: str, check, proc: ManagedProcess, deadline_s: float = DEADLINE_S):
    return wait_for(what, check, proc.proc, proc.log_path, deadline_s)


def applied(settings: Settings) -> int:
    return int(scrape(settings).get(("hymirec_events_applied_total", ()), 0))


def event(user: str, item: str, ts: int, event_id: str | None = None, **extra) -> dict:
    body = {"user_id": user, "item_id": item, "ts": ts, "action": "click", **extra}
    if event_id is not None:
        body["event_id"] = event_id
    return body


def expected_histories(events: list[dict]) -> dict[str, list[str]]:
    history: dict[str, list[str]] = defaultdict(list)
    for e in events:
        history[e["user_id"]].append(e["item_id"])
    return dict(history)


def matches(store: Store, expected: dict[str, list[str]]) -> dict | None:
    """The users' rows once every one of them has exactly its expected event count, else None."""
    rows = store.get_histories(list(expected))
    if {u: r["event_count"] for u, r in rows.items()} != {u: len(h) for u, h in expected.items()}:
        return None
    return rows


def assert_exact(store: Store, expected: dict[str, list[str]]) -> None:
    rows = store.get_histories(list(expected))
    assert set(rows) == set(expected)
    for user, items in expected.items():
        assert rows[user]["event_count"] == len(items), user
        assert rows[user]["history_item_ids"] == items, user


def drain(settings: Settings, proc: ManagedProcess, store: Store, expected: dict[str, list[str]]) -> None:
    """Wait until every expected event is applied, then push one sentinel through every partition and
    wait for those too: whatever the worker still had to (re)read of the log is then behind it, so a
    late double application would show in the final comparison."""
    wait("every logged event applied", lambda: matches(store, expected), proc)
    sentinels = [event(f"sentinel-{uuid.uuid4().hex[:6]}-p{p}", "0", 1) for p in range(settings.partitions)]
    produce(settings, [(settings.topic_interactions, e["user_id"].encode(), json.dumps(e).encode(), p)
                       for p, e in enumerate(sentinels)])
    wait("the sentinels", lambda: matches(store, expected_histories(sentinels)), proc)
    assert_exact(store, expected)


def worker_settings(base: Settings, tmp_path: Path, **overrides) -> Settings:
    return private_worker(
        base, tmp_path,
        batch_size=100,  # many batches, so a kill or an outage falls between and inside them
        worker_session_timeout_s=6.0,  # the dead member of a killed worker expires sooner
        **overrides,
    )


def synthetic_log(n: int, users: int, items: int, seed: int) -> list[dict]:
    """n events; every other one without an event_id (deduplicated by offset watermark only)."""
    rng = random.Random(seed)
    return [event(f"u{rng.randrange(users)}", str(rng.randrange(items)), 1_700_000_000_000 + i,
                  f"e{i}" if i % 2 == 0 else None) for i in range(n)]


# --- 1. kill -9 mid-replay --------------------------------------------------------------------------------
@pytest.mark.broker
def test_worker_killed_mid_replay_loses_and_repeats_nothing(topic_settings: Settings, tmp_path: Path):
    s = worker_settings(topic_settings, tmp_path)
    log_path = tmp_path / "worker.log"
    warm = [event("u-warm", "0", 1, "warm-0")]
    events = warm + synthetic_log(3000, users=40, items=150, seed=1)
    log_file = tmp_path / "log.jsonl"
    log_file.write_text("".join(json.dumps(e) + "\n" for e in events[1:]))
    expected = expected_histories(events)
    store = Store(s)

    with worker(s, log_path) as first:
        # The group is joined once the warm-up event is applied: the replay then meets a live worker.
        produce(s, [(s.topic_interactions, b"u-warm", json.dumps(warm[0]).encode())])
        wait("the warm-up event", lambda: matches(store, expected_histories(warm)), first)

        summary: list = []
        sender = threading.Thread(target=lambda: summary.append(replay(s, log_file, rate=600, progress=False)))
        sender.start()
        try:
            wait("a third of the replay applied", lambda: applied(s) >= len(events) // 3, first)
            os.killpg(first.proc.pid, signal.SIGKILL)
            first.proc.wait(10)
            at_kill = sum(r["event_count"] for r in store.get_histories(list(expected)).values())
        finally:
            sender.join(120)
    assert not sender.is_alive() and summary and summary[0].failed == 0
    assert 0 < at_kill < len(events), "the kill did not land mid-stream"

    with worker(s, log_path) as second:
        drain(s, second, store, expected)
        metrics = scrape(s)
        # Everything the first worker applied but had not committed is redelivered and skipped.
        redelivered = metrics.get(("hymirec_duplicates_skipped_total", (("kind", "offset"),)), 0)
        # ...and the rest applied once: the second worker's count is exactly what the first left.
        assert metrics[("hymirec_events_applied_total", ())] == len(events) - at_kill + s.partitions  # + sentinels
        print(f"applied before the kill: {at_kill}; redelivered and skipped after it: {redelivered:.0f}")
        assert second.alive, tail(log_path)


# --- 2. broker stopped and restarted mid-stream ------------------------------------------------------------
@pytest.mark.broker
def test_worker_recovers_by_itself_from_a_broker_restart(make_broker_settings, tmp_path: Path):
    s = worker_settings(make_broker_settings(), tmp_path, app_id=f"hymirec-outage-{uuid.uuid4().hex[:6]}")
    local = LocalKafka(s, die_with_parent=True)
    start_or_unavailable(local)
    log_path = tmp_path / "worker.log"
    events = synthetic_log(3000, users=30, items=100, seed=2)
    log_file = tmp_path / "log.jsonl"
    log_file.write_text("".join(json.dumps(e) + "\n" for e in events))
    store = Store(s)
    try:
        create_topics(s)
        with worker(s, log_path) as proc:
            wait("the worker's /health", lambda: http_get(s, "/health"), proc)
            pid = proc.proc.pid
            # A paced replay runs across the outage: its producer holds and retries what it cannot send.
            summary: list = []
            sender = threading.Thread(target=lambda: summary.append(replay(s, log_file, rate=300, progress=False)))
            sender.start()
            try:
                wait("a fifth of the replay applied", lambda: applied(s) >= len(events) // 5, proc)
                assert local.stop()
                at_stop = applied(s)
                time.sleep(8)
                # While the broker is away the worker stays up and keeps answering.
                assert proc.alive, tail(log_path)
                health = wait("/health during the outage", lambda: http_get(s, "/health"), proc)
                assert json.loads(health)["status"] == "ok"
                start_or_unavailable(local)
            finally:
                sender.join(180)
            assert not sender.is_alive() and summary and summary[0].failed == 0
            assert at_stop < len(events), "the broker stopped after the stream had ended"
            drain(s, proc, store, expected_histories(events))
            assert proc.alive and proc.proc.pid == pid, tail(log_path)
    finally:
        local.stop()


# --- 3. bad input -----------------------------------------------------------------------------------------
def bad_interactions() -> dict[str, tuple[bytes | None, bytes | None, str]]:
    """name -> (key, value, expected dead-letter reason), for the interactions topic."""
    def obj(body, key: bytes | None = b"u1") -> tuple[bytes | None, bytes, str]:
        return key, json.dumps(body).encode(), "invalid_fields"

    ok = {"user_id": "u1", "item_id": "1", "ts": 1_700_000_000_000}
    return {
        "truncated json": (b"u1", b'{"user_id": "u1", "item_id": ', "invalid_json"),
        "not json at all": (b"u1", b"user=u1&item=1", "invalid_json"),
        "json with a BOM": (b"u1", b"\xef\xbb\xbf" + json.dumps(ok).encode(), "invalid_json"),
        "nested 100k deep": (b"u1", b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
        "5000-digit integer ts": (b"u1", b'{"user_id": "u1", "item_id": "1", "ts": 1' + b"0" * 5000 + b"}", "invalid_json"),
        "empty payload": (b"u1", b"", "empty"),
        "tombstone (null value)": (b"u1", None, "empty"),
        "whitespace only": (b"u1", b" \n\t\r ", "empty"),
        "huge payload (> 1 MiB)": (b"u1", json.dumps({**ok, "pad": "x" * (1 << 20)}).encode(), "too_large"),
        "not UTF-8": (b"u1", b'{"user_id": "u1", "item_id": "\xff\xfe"}', "bad_encoding"),
        "json array": (b"u1", json.dumps([ok]).encode(), "not_an_object"),
        "json number": (b"u1", b"42", "not_an_object"),
        "json null": (b"u1", b"null", "not_an_object"),
        "json string": (b"u1", b'"u1 clicked 1"', "not_an_object"),
        "missing user_id": obj({"item_id": "1", "ts": 5}),
        "missing item_id": obj({"user_id": "u1", "ts": 5}),
        "missing ts": obj({"user_id": "u1", "item_id": "1"}),
        "ts as a string": obj({**ok, "ts": "2024-01-01T00:00:00Z"}),
        "ts as NaN": (b"u1", b'{"user_id": "u1", "item_id": "1", "ts": NaN}', "invalid_fields"),
        "user_id bool": obj({**ok, "user_id": True}),
        "user_id object": obj({**ok, "user_id": {"id": "u1"}}),
        "item_id list": obj({**ok, "item_id": ["1"]}),
        "negative ts": obj({**ok, "ts": -1}),
        "float ts": obj({**ok, "ts": 1_700_000_000_000.5}),
        "ts after 2100": obj({**ok, "ts": 4_200_000_000_000}),
        "ts over 2^63": obj({**ok, "ts": 2**63 + 7}),
        "unknown action": obj({**ok, "action": "teleport"}),
        "empty user_id": obj({**ok, "user_id": ""}, key=b""),
        "too-long item_id": obj({**ok, "item_id": "i" * 300}),
        "lone surrogate in user_id": (b"u1", b'{"user_id": "\\ud800", "item_id": "1", "ts": 5}', "invalid_fields"),
        "empty event_id": obj({**ok, "event_id": ""}),
        "key is not the user_id": (b"u2", json.dumps(ok).encode(), "key_mismatch"),
        "no key": (None, json.dumps(ok).encode(), "key_mismatch"),
    }


def bad_items() -> dict[str, tuple[bytes | None, bytes | None, str]]:
    return {
        "item: invalid json": (b"i1", b'{"item_id": "i1", "text": ', "invalid_json"),
        "item: missing text": (b"i1", b'{"item_id": "i1"}', "invalid_fields"),
        "item: text is a number": (b"i1", b'{"item_id": "i1", "text": 7}', "invalid_fields"),
        "item: text over 64 KiB": (b"i1", json.dumps({"item_id": "i1", "text": "t" * 70_000}).encode(), "invalid_fields"),
        "item: category object": (b"i1", json.dumps({"item_id": "i1", "text": "x", "category": {}}).encode(), "invalid_fields"),
        "item: key is not the item_id": (b"i2", json.dumps({"item_id": "i1", "text": "x"}).encode(), "key_mismatch"),
        "item: json list": (b"i1", b"[]", "not_an_object"),
    }


def raise_message_limit(settings: Settings, topics: list[str]) -> None:
    """Let these topics hold the > 1 MiB payload a producer may send."""
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, t, configs={"max.message.bytes": str(BIG_LIMIT)})
                             for t in topics])
    finally:
        admin.close()


@pytest.mark.broker
def test_bad_input_is_dead_lettered_and_good_input_around_it_applied(topic_settings: Settings, tmp_path: Path):
    s = worker_settings(topic_settings, tmp_path)
    raise_message_limit(s, [s.topic_interactions])
    catalogue = [str(i) for i in range(20)]
    items = [(s.topic_items, i.encode(), json.dumps({"item_id": i, "text": f"item {i}"}).encode()) for i in catalogue]
    bad_i = bad_items()
    # Good items first, each bad one after the good item of its position, so they interleave.
    item_records = []
    for n, record in enumerate(items):
        item_records.append(record)
        if n < len(bad_i):
            name = list(bad_i)[n]
            item_records.append((s.topic_items, *bad_i[name][:2], name))

    bad = bad_interactions()
    good: list[dict] = []
    records: list[tuple] = []
    rng = random.Random(3)
    for n, name in enumerate([None, *bad]):
        for _ in range(3):
            e = event(f"u{rng.randrange(6)}", rng.choice(catalogue), 1_700_000_000_000 + len(good), f"g{len(good)}")
            good.append(e)
            records.append((s.topic_interactions, e["user_id"].encode(), json.dumps(e).encode(), None))
        if name is not None:
            records.append((s.topic_interactions, *bad[name][:2], name))
    # A producer's resend (same event_id, new offset): skipped as a duplicate, not dead-lettered.
    resent = good[5]
    records.insert(len(records) // 2, (s.topic_interactions, resent["user_id"].encode(), json.dumps(resent).encode(), None))
    # Items not in the catalogue: recorded by id and counted, not dead-lettered.
    unknown = [event("u1", "not-in-catalogue-1", 1_800_000_000_000, "unk-1"), event("u2", "not-in-catalogue-2", 1_800_000_000_001)]
    for e in unknown:
        good.append(e)
        records.append((s.topic_interactions, e["user_id"].encode(), json.dumps(e).encode(), None))
    tail_events = [event("u3", "1", 1_900_000_000_000, "last")]  # after every bad one: the worker still applies
    good += tail_events
    records += [(s.topic_interactions, e["user_id"].encode(), json.dumps(e).encode(), None) for e in tail_events]

    store = Store(s)
    # The worker runs with Faust's default 1 MB producer limit: the huge payload's dead-letter record
    # must fit it (it keeps a prefix, the length and the sha256).
    with worker(s, tmp_path / "worker.log") as proc:
        item_meta = produce(s, [r[:3] for r in item_records])
        wait("the catalogue", lambda: scrape(s).get(("hymirec_items_upserted_total", ())) == len(catalogue), proc)
        meta = produce(s, [r[:3] for r in records], max_request_size=BIG_LIMIT)

        drain(s, proc, store, expected_histories(good))

        sources = {}
        for record, m in [*zip(item_records, item_meta), *zip(records, meta)]:
            if len(record) == 4 and record[3] is not None:
                sources[(m.topic, m.partition, m.offset)] = record
        dead = read_dead_letters(s, len(bad) + len(bad_i))
        by_source = {(d["source"]["topic"], d["source"]["partition"], d["source"]["offset"]): d for d in dead}
        assert set(by_source) == set(sources)
        for where, (_, key, value, name) in sources.items():
            record = by_source[where]
            expected_reason = (bad | bad_i)[name][2]
            assert record["reason"] == expected_reason, (name, record["reason"], record["detail"])
            payload = record["payload"]
            if payload is not None:
                payload = bytes.fromhex(payload) if record["payload_encoding"] == "hex" else payload.encode()
            if record.get("payload_truncated"):  # the > 1 MiB one: a prefix, its length and sha256
                assert value.startswith(payload) and record["payload_bytes"] == len(value), name
                assert record["payload_sha256"] == hashlib.sha256(value).hexdigest(), name
            else:
                assert payload == value, name

        metrics = wait("metrics", lambda: scrape(s) or None, proc)
        reasons = defaultdict(int)
        for name, (_, _, reason) in bad.items():
            reasons[(s.topic_interactions, reason)] += 1
        for name, (_, _, reason) in bad_i.items():
            reasons[(s.topic_items, reason)] += 1
        for (topic, reason), count in reasons.items():
            assert metrics[("hymirec_dead_lettered_total", (("reason", reason), ("topic", topic)))] == count, reason
        assert metrics[("hymirec_events_applied_total", ())] == len(good) + s.partitions  # + the sentinels
        assert metrics[("hymirec_duplicates_skipped_total", (("kind", "event_id"),))] == 1
        assert metrics[("hymirec_unknown_items_total", ())] == len(unknown)  # the sentinels click item "0", known
        health = json.loads(http_get(s, "/health"))
        assert health["status"] == "ok" and proc.alive, tail(proc.log_path)


# --- 4. bad model artefacts, and a hot-swap under concurrent readers -----------------------------------------
def test_corrupt_versions_are_refused_and_the_switch_is_never_half_seen(world, world_settings):
    settings = world_settings
    store = Store(settings)
    runtime = ServingRuntime(settings)
    v1 = publish(settings, world["m1"])
    runtime.start()
    users = users_of(store)
    assert runtime.live.version == v1
    assert {recommend(store, u).model_version for u in users} == {v1}

    # v0002: one byte flipped; v0003: a file cut short. Both refused, v0001 keeps answering.
    v2 = publish(settings, world["m2"], parent=v1)
    path = Path(ModelRegistry(settings).get(v2).path) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    v3 = publish(settings, world["m2"], parent=v1)
    path = Path(ModelRegistry(settings).get(v3).path) / "items.json"
    path.write_bytes(path.read_bytes()[:-10])
    assert runtime.switch_to(v2) == "refused"
    assert runtime.switch_to(v3) == "refused"
    assert runtime.live.version == v1
    assert set(ready_versions(store)) == {v1}
    assert {recommend(store, u).model_version for u in users} == {v1}

    # v0004 is good: switch while 8 threads keep asking.
    v4 = publish(settings, world["m2"], parent=v1)
    answers, errors, done = [], [], threading.Event()
    asked = threading.Barrier(9)  # every thread has answered once before the switch starts

    def ask(seed: int) -> None:
        rng = np.random.default_rng(seed)
        reader = Store(settings)
        first = True
        while True:
            finished = done.is_set()
            try:
                answers.append(recommend(reader, users[rng.integers(len(users))], 5))
            except Exception as exc:  # noqa: BLE001 — any failure is the test's finding
                errors.append(exc)
            if first:
                asked.wait(60)
                first = False
            if finished:
                return

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        asked.wait(60)
        assert runtime.switch_to(v4) == "switched"
    finally:
        done.set()
        for t in threads:
            t.join(60)
    assert not errors, errors[:3]
    # Answers from before the switch and after it (the last one of each thread), none from anything else.
    assert {a.model_version for a in answers} == {v1, v4}
    assert {recommend(store, u).model_version for u in users} == {v4}

    # Each answer's scores are those of exactly its version's interests and item vectors.
    histories = {row["user_id"]: list(row["history_item_ids"]) for _, row in read_histories(store).iterrows()}
    models = {v1: world["m1"], v4: world["m2"]}
    tables = {v: ready_versions(store)[v]["vectors_table"] for v in (v1, v4)}
    vectors = {}
    for v, name in tables.items():
        rows = open_own(store.db, name, item_vectors_schema(settings.embedding_dim)).to_arrow()
        vectors[v] = dict(zip(rows["item_id"].to_pylist(), np.asarray(rows["vector"].to_pylist(), dtype=np.float64)))
    assert tables[v1] != tables[v4]

    def expected(version, user, item):
        interests = models[version].interests([histories[user]])[0].astype(np.float64)
        v = vectors[version][item]
        return float((interests @ v / np.linalg.norm(interests, axis=1) / np.linalg.norm(v)).max())

    # The previous version's vectors stay (rows may still point to them); older ones go.
    v5 = publish(settings, world["m1"], parent=v4)
    assert runtime.switch_to(v5) == "switched"
    assert {recommend(store, u).model_version for u in users} == {v5}
    names = set(table_names(store.db))
    assert tables[v4] in names and tables[v1] not in names

    sample = answers[:: max(1, len(answers) // 40)]
    for answer in sample:
        other = v4 if answer.model_version == v1 else v1
        assert answer.vectors_table == tables[answer.model_version]
        top = answer.items[0]
        assert top.score == pytest.approx(expected(answer.model_version, answer.user_id, top.item_id), abs=1e-4)
        assert top.score != pytest.approx(expected(other, answer.user_id, top.item_id), abs=1e-4)
