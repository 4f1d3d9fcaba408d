"""Helpers shared by the test modules: a worker subprocess and what it is asked and told, and a small
"serving world" (a filled LanceDB directory and two trained models) for the hot-swap tests.

Test modules import the fixtures they use from here (``world``, ``world_settings``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from hymirec.procs import faust_worker, settings_env, worker_get
from hymirec.settings import Settings, kafka_client_options
from store import ModelRegistry, Store
from stream.ingest import RawEvent

DEADLINE_S = 120.0
STOP_GRACE_S = 30.0


# --- the ingest path without a broker -----------------------------------------------------------------
def click(user: str, item: str, ts: int, *, partition: int = 0, offset: int, event_id: str | None = None,
          key: str | None = "user") -> RawEvent:
    """An ``interactions`` message as the worker consumes it (keyed by the user unless ``key`` says otherwise)."""
    payload = {"user_id": user, "item_id": item, "ts": ts, "action": "click", "event_id": event_id}
    key_bytes = None if key is None else (user if key == "user" else key).encode()
    return RawEvent(json.dumps(payload).encode(), key_bytes, partition, offset, timestamp=1.0)


class RecordingKafka:
    """The consumer side an ``Ingestor`` is given: records what it is asked (no broker)."""

    def __init__(self, owned=(0,)):
        self.owned, self.seeks, self.commits = set(owned), [], []

    def owns(self, topic, partition):
        return partition in self.owned

    async def seek(self, topic, partition, offset):
        self.seeks.append((partition, offset))

    async def commit(self, topic, offsets):
        self.commits.append(dict(offsets))


# --- a worker subprocess ------------------------------------------------------------------------------
def worker_env(settings: Settings) -> dict[str, str]:
    """This environment without its HYMIREC_* variables, plus ``settings`` as HYMIREC_* (for a CLI subprocess)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("HYMIREC_")} | settings_env(settings)


def private_worker(base: Settings, tmp_path: Path, **overrides) -> Settings:
    """``base`` with the test's own LanceDB directory, worker dir and web port, short micro-batch waits."""
    from conftest import free_ports

    return base.model_copy(update={
        "lancedb_uri": str(tmp_path / "lancedb"),
        "web_port": free_ports(1)[0],
        "worker_dir": tmp_path / "worker",
        "batch_within_s": 0.2,
        **overrides,
    })


@contextmanager
def running_worker(settings: Settings, log_file: Path):
    """``hymirec.procs.faust_worker`` (up once /health answers; SIGTERM, then SIGKILL after
    STOP_GRACE_S) yielding its ``subprocess.Popen``, as the tests that signal and wait on it want."""
    with faust_worker(settings, log_file, stop_timeout=STOP_GRACE_S) as proc:
        yield proc.proc


def wait_for(what: str, check, proc: subprocess.Popen, log_file: Path, deadline_s: float = DEADLINE_S,
             interval: float = 0.5):
    deadline = time.monotonic() + deadline_s
    while True:
        assert proc.poll() is None, f"worker exited ({proc.returncode}) while waiting for {what}:\n{tail(log_file)}"
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; worker log:\n{tail(log_file, 80)}")
        time.sleep(interval)


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


http_get = worker_get


def scrape(settings: Settings) -> dict[tuple[str, tuple], float]:
    body = http_get(settings, "/metrics")
    samples = {}
    for family in text_string_to_metric_families((body or b"").decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def produce(settings: Settings, records: list[tuple], **config) -> list:
    """Send (topic, key, value[, partition]) records in order; returns their RecordMetadata."""
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", **kafka_client_options(settings),
                             **config)
    try:
        futures = [producer.send(r[0], key=r[1], value=r[2], partition=r[3] if len(r) > 3 else None) for r in records]
        producer.flush(timeout=60)
        return [f.get(timeout=60) for f in futures]
    finally:
        producer.close()


def read_dead_letters(settings: Settings, expected: int, *, by_source: bool = False) -> list[dict]:
    """The dead-letter topic's records, once ``expected`` of them are there; ``by_source``: one per
    source partition and offset (a worker killed between a dead-letter send and the write past it
    sends the record again: dead letters are at least once)."""
    consumer = KafkaConsumer(settings.topic_dead_letter, bootstrap_servers=settings.kafka_bootstrap, **kafka_client_options(settings),
                             auto_offset_reset="earliest", consumer_timeout_ms=2000)
    records: dict = {}
    deadline = time.monotonic() + DEADLINE_S
    try:
        while len(records) < expected and time.monotonic() < deadline:
            for message in consumer:
                record = json.loads(message.value)
                source = (record["source"]["partition"], record["source"]["offset"]) if by_source else len(records)
                records[source] = record
    finally:
        consumer.close()
    assert len(records) == expected, list(records.values())
    return list(records.values())


# --- the serving world: a filled LanceDB directory and two trained models ----------------------------------
WORLD_USERS, WORLD_ITEMS, WORLD_EVENTS_PER_USER = 40, 120, 20
PARTITIONS = 2


def raw(payload: dict, key: str, offset: int, partition: int):
    from stream.ingest import RawEvent

    return RawEvent(json.dumps(payload).encode(), key.encode(), partition, offset)


def shard_of(user: str) -> int:
    return zlib.crc32(user.encode()) % PARTITIONS


def model_settings(uri: str) -> Settings:
    return Settings(lancedb_uri=uri, partitions=PARTITIONS, codebook_size=16, codebook_levels=2, num_interests=3,
                    trainer_epochs=1, trainer_bootstrap_epochs=1,
                    interest_batch_size=16)


class Log:
    """A synthetic log applied through the ingest path, offsets counted per partition."""

    def __init__(self, store: Store, settings: Settings):
        self.store, self.settings = store, settings
        self.offsets = [0] * PARTITIONS

    def items(self, rows: list[dict]) -> None:
        from stream.ingest import apply_items

        apply_items(self.store, self.settings, [raw(r, r["item_id"], i, 0) for i, r in enumerate(rows)])

    def interactions(self, rows: list[dict], encoder=None):
        from stream.ingest import apply_interactions

        batch = []
        for r in rows:
            p = shard_of(r["user_id"])
            batch.append(raw(r, r["user_id"], self.offsets[p], p))
            self.offsets[p] += 1
        return apply_interactions(self.store, self.settings, batch, encoder=encoder)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The serving world, built once per test module that imports this fixture."""
    return build_world(tmp_path_factory.mktemp("serving"))


@pytest.fixture
def world_settings(world, tmp_path) -> Settings:
    """Settings of the test's own copy of the world's LanceDB directory."""
    return world_copy(world, tmp_path)


def build_world(root: Path) -> dict:
    """A filled LanceDB directory under ``root`` (no versions) and two trained models: m1 and m1
    fine-tuned (m2)."""
    from stream.datasets import export_synthetic
    from store.logs import read_interactions, read_items
    from trainer.online import read_histories
    from trainer.serving_model import bootstrap

    export_synthetic(root / "data", users=WORLD_USERS, items=WORLD_ITEMS, interests=6,
                     events_per_user=WORLD_EVENTS_PER_USER, drift=0.0, seed=1)
    interactions = read_interactions(root / "data" / "interactions.jsonl").to_dict("records")
    items = read_items(root / "data" / "items.jsonl")
    settings = model_settings(str(root / "lancedb"))
    store = Store(settings)
    log = Log(store, settings)
    log.items(items.to_dict("records"))
    log.interactions(interactions)

    catalogue = items[["item_id", "text", "category"]]
    sequences = read_histories(store).set_index("user_id")["history_item_ids"].map(list).to_dict()
    m1 = bootstrap(settings, catalogue, sequences, epochs=1)
    m2 = m1.fine_tune(catalogue, sequences, epochs=1)
    return {"root": root, "uri": root / "lancedb", "m1": m1, "m2": m2, "offsets": log.offsets,
            "interactions": interactions, "items": items}


def world_copy(world: dict, tmp_path: Path) -> Settings:
    """Settings of a private copy of the world's LanceDB directory."""
    uri = tmp_path / "lancedb"
    shutil.copytree(world["uri"], uri)
    return model_settings(str(uri))


def publish(settings: Settings, model, parent=None) -> str:
    files, manifest = model.to_files({"note": "test"})
    return ModelRegistry(settings).publish(files, manifest, parent=parent).version


def users_of(store: Store) -> list[str]:
    from trainer.online import read_histories

    return sorted(read_histories(store)["user_id"])
