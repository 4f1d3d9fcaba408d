"""The real worker: `faust -A stream.app worker` as a subprocess against the real broker and LanceDB.

It must apply every good event exactly (per-user counts and order), dead-letter every malformed one
with its reason and source offset, keep running, report the same numbers at GET /metrics, take an
event from a non-Python client (Kafka's own Java producer), and ignore a resend of the whole log.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from hymirec.settings import Settings
from store import Store
from stream.broker import LocalKafka

from helpers import (
    STOP_GRACE_S, http_get, private_worker, produce, read_dead_letters, running_worker, scrape, tail, wait_for,
)

pytestmark = pytest.mark.broker

USERS, ITEMS, EVENTS = 25, 40, 300

JAVA_PRODUCER = """
import java.util.Properties;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;

public class Produce {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.put("bootstrap.servers", args[0]);
        props.put("acks", "all");
        props.put("key.serializer", "org.apache.kafka.common.serialization.StringSerializer");
        props.put("value.serializer", "org.apache.kafka.common.serialization.StringSerializer");
        try (KafkaProducer<String, String> producer = new KafkaProducer<>(props)) {
            producer.send(new ProducerRecord<>(args[1], args[2], args[3])).get();
        }
    }
}
"""


def interaction(user: str, item: str, ts: int, event_id: str) -> bytes:
    return json.dumps({"user_id": user, "item_id": item, "ts": ts, "action": "view", "event_id": event_id}).encode()


@pytest.fixture
def worker_settings(topic_settings: Settings, tmp_path: Path) -> Settings:
    # several batches, so batching and per-batch watermarks are exercised
    return private_worker(topic_settings, tmp_path, batch_size=64)


def test_worker_applies_dead_letters_and_dedupes(worker_settings: Settings, tmp_path: Path):
    s = worker_settings
    log_file = tmp_path / "worker.log"
    items = [(s.topic_items, str(i).encode(), json.dumps({"item_id": str(i), "text": f"item {i}"}).encode())
             for i in range(ITEMS)]
    # Items ITEMS..ITEMS+4 are never in the catalogue: recorded anyway, counted as unknown.
    log = [(f"u{(i * 7) % USERS}", str((i * 13) % (ITEMS + 5)), 1_000_000 + i, f"e{i}") for i in range(EVENTS)]
    good = [(s.topic_interactions, user.encode(), interaction(user, item, ts, eid)) for user, item, ts, eid in log]
    malformed = {
        "invalid_json": (s.topic_interactions, b"u1", b'{"user_id": "u1", "item_id": '),
        "bad_encoding": (s.topic_interactions, b"u2", b"\xc3\x28\xff not utf-8"),
        "invalid_fields": (s.topic_interactions, b"u3", json.dumps({"user_id": "u3", "item_id": "1", "ts": "noon"}).encode()),
        "unknown_action": (s.topic_interactions, b"u4", json.dumps({"user_id": "u4", "item_id": "1", "ts": 5, "action": "teleport"}).encode()),
        "key_mismatch": (s.topic_interactions, b"u5", interaction("u6", "1", 5, "x1")),
        "bad_item": (s.topic_items, b"99", json.dumps({"item_id": "99"}).encode()),
    }
    expected_reason = {"unknown_action": "invalid_fields", "bad_item": "invalid_fields"}
    records = [*items, *good[:150], *malformed.values(), *good[150:]]

    with running_worker(s, log_file) as proc:
        meta = produce(s, records)
        bad_meta = dict(zip(malformed, meta[len(items) + 150 : len(items) + 150 + len(malformed)]))

        # 1. Every good event is in user_histories, exactly as in the log.
        history, counts = defaultdict(list), Counter()
        for user, item, _, _ in log:
            history[user].append(item)
            counts[user] += 1
        store = Store(s)

        def all_applied():
            rows = store.get_histories(list(history))
            return rows if {u: r["event_count"] for u, r in rows.items()} == dict(counts) else None

        rows = wait_for("all good events in LanceDB", all_applied, proc, log_file)
        for user, row in rows.items():
            assert row["history_item_ids"] == history[user]
            assert row["recent_item_ids"] == history[user][-s.recent_len:]
            assert row["recent_event_ids"] == [eid for u, _, _, eid in log if u == user][-s.dedupe_window:]
        assert store.table_counts()["items"] == ITEMS

        # 2. Every malformed payload is on the dead-letter topic, with its reason and source offset.
        dead = read_dead_letters(s, len(malformed))
        by_source = {(d["source"]["topic"], d["source"]["partition"], d["source"]["offset"]): d for d in dead}
        for name, (topic, _, value) in malformed.items():
            record = by_source[(topic, bad_meta[name].partition, bad_meta[name].offset)]
            assert record["reason"] == expected_reason.get(name, name)
            payload = bytes.fromhex(record["payload"]) if record["payload_encoding"] == "hex" else record["payload"].encode()
            assert payload == value

        # 3. The counters say the same.
        metrics = wait_for("metrics", lambda: scrape(s) or None, proc, log_file)
        unknown = sum(1 for _, item, _, _ in log if int(item) >= ITEMS)
        assert metrics[("hymirec_events_applied_total", ())] == EVENTS
        assert metrics[("hymirec_events_in_total", (("topic", s.topic_interactions),))] == EVENTS + 5
        assert metrics[("hymirec_events_in_total", (("topic", s.topic_items),))] == ITEMS + 1
        assert metrics[("hymirec_items_upserted_total", ())] == ITEMS
        assert metrics[("hymirec_unknown_items_total", ())] >= unknown  # items and clicks race
        assert metrics[("hymirec_dead_lettered_total", (("reason", "invalid_fields"), ("topic", s.topic_interactions)))] == 2
        assert metrics[("hymirec_dead_lettered_total", (("reason", "key_mismatch"), ("topic", s.topic_interactions)))] == 1
        assert metrics[("hymirec_dead_lettered_total", (("reason", "invalid_fields"), ("topic", s.topic_items)))] == 1
        assert metrics[("hymirec_freshness_lag_seconds_count", ())] == EVENTS
        health = json.loads(http_get(s, "/health"))
        assert health["counts"]["events_applied"] == EVENTS and health["model_version"] is None

        # 4. One event from a non-Python client: Kafka's own Java producer (same default partitioner).
        java_event = interaction("u0", "3", 2_000_000, "java-1").decode()
        java_producer(s, tmp_path, s.topic_interactions, "u0", java_event)
        counts["u0"] += 1
        history["u0"].append("3")
        rows = wait_for("the Java client's event", all_applied, proc, log_file)
        assert rows["u0"]["history_item_ids"] == history["u0"][-s.history_max_len:]
        assert rows["u0"]["last_ts"] == 2_000_000

        # 5. The same good events again (same event ids, new offsets): nothing changes.
        before = store.get_histories(list(history))
        produce(s, good)
        wait_for("the resent events to be skipped",
                 lambda: scrape(s).get(("hymirec_duplicates_skipped_total", (("kind", "event_id"),))) == EVENTS,
                 proc, log_file)
        after = store.get_histories(list(history))
        assert after == before
        assert scrape(s)[("hymirec_events_applied_total", ())] == EVENTS + 1
        assert proc.poll() is None

        proc.send_signal(signal.SIGTERM)
        proc.wait(STOP_GRACE_S)
        assert proc.returncode == 0, tail(log_file)


def java_producer(settings: Settings, tmp_path: Path, topic: str, key: str, value: str) -> None:
    """Send one record with the official Java client (kafka-clients from the broker's own jars)."""
    source = tmp_path / "Produce.java"
    source.write_text(JAVA_PRODUCER)
    libs = LocalKafka(settings).libs
    # Java 11+ runs a single source file directly; the broker's log4j config keeps it quiet.
    out = subprocess.run(
        ["java", "-cp", f"{libs}/*", str(source), settings.kafka_bootstrap, topic, key, value],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr[-2000:]
