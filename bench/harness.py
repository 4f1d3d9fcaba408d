"""The moving parts the streaming benchmarks share: a broker, fresh topics, and what is asked of a real
worker subprocess (started with ``hymirec.procs.faust_worker``).

Nothing here touches the user's data: each run gets its own topics (``bench-<run>-*``), consumer
group, LanceDB directory (in a temporary directory) and web port. A broker already answering at
``settings.kafka_bootstrap`` is used as it is; otherwise a private one is started in the temporary
directory on free ports and stopped afterwards.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
from prometheus_client.parser import text_string_to_metric_families

from hymirec.errors import HymirecError
from hymirec.procs import WORKER_START_S, ManagedProcess, wait_for, worker_exited, worker_get, worker_health
from hymirec.settings import Settings, kafka_client_options


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def broker(settings: Settings, workdir: Path) -> Iterator[tuple[Settings, str]]:
    """(settings pointing at a live broker, how it was found)."""
    from stream.broker import LocalKafka

    local = LocalKafka(settings)
    status = local.status()
    if status.running or status.port_taken:
        yield settings, f"existing broker at {settings.kafka_bootstrap}"
        return
    port, controller = free_port(), free_port()
    private = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{port}", "kafka_controller_port": controller,
                                          "kafka_home": workdir / "kafka"})
    local = LocalKafka(private, die_with_parent=True)
    try:
        local.start(timeout=120)
        yield private, f"private broker started for the run (127.0.0.1:{port}, heap {private.kafka_heap})"
    finally:
        local.stop()


def fresh(settings: Settings, workdir: Path, tag: str, **overrides) -> Settings:
    """Settings with this run's own topics, group, LanceDB directory (or prefix, when the store is on
    object storage) and web port (topics created)."""
    from stream.broker import create_topics

    run = f"bench-{tag}-{uuid.uuid4().hex[:6]}"
    uri = f"{settings.lancedb_uri.rstrip('/')}/{run}" if settings.lancedb_is_remote else str(workdir / run / "lancedb")
    s = settings.model_copy(update={
        "topic_interactions": f"{run}-interactions", "topic_items": f"{run}-items",
        "topic_model_versions": f"{run}-model-versions", "topic_dead_letter": f"{run}-dead-letter",
        "app_id": run, "lancedb_uri": uri, "worker_dir": workdir / run / "worker",
        "web_port": free_port(), **overrides,
    })
    create_topics(s)
    return s


health = worker_health


def metrics(settings: Settings) -> dict[str, list]:
    """{sample name: [(labels, value), ...]} from the worker's GET /metrics."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families((worker_get(settings, "/metrics") or b"").decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


class RssSampler:
    """Peak resident memory of a process and its children, sampled on a thread."""

    def __init__(self, pid: int, interval_s: float = 0.1):
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                return
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def counts(settings: Settings) -> dict[str, int]:
    return (health(settings) or {}).get("counts", {})


def warm_up(settings: Settings, proc: ManagedProcess, timeout: float = WORKER_START_S) -> None:
    """One event into every partition, waited for: the worker has joined its group and holds every
    partition, so what is timed next is not the group join."""
    from kafka import KafkaProducer

    before = counts(settings).get("events_applied", 0)
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", **kafka_client_options(settings))
    try:
        for p in range(settings.partitions):
            user = f"warm-up-{p}"
            body = json.dumps({"user_id": user, "item_id": "0", "ts": int(time.time() * 1000)}).encode()
            producer.send(settings.topic_interactions, key=user.encode(), value=body, partition=p)
        producer.flush(30)
    finally:
        producer.close()
    wait_for(lambda: (counts(settings).get("events_applied", 0) - before >= settings.partitions) if proc.alive
             else worker_exited(proc), timeout=timeout, interval=0.2, what="the warm-up events")


# --- a model and a store filled without replaying a log -------------------------------------------------
TOPIC_WORDS = ("jazz", "noir", "space", "cooking", "chess", "garden", "opera", "rally", "poetry", "robots",
               "surfing", "history", "physics", "comics", "travel", "horror")


def catalogue(n: int) -> pd.DataFrame:
    """Items "0".."n-1": item_id, text (a topic word and the id), category (the topic)."""
    topics = [TOPIC_WORDS[i % len(TOPIC_WORDS)] for i in range(n)]
    return pd.DataFrame({"item_id": [str(i) for i in range(n)],
                         "text": [f"{t} item {i}" for i, t in enumerate(topics)], "category": topics})


def publish_model(settings: Settings, items: pd.DataFrame, sequences: dict[str, list[str]], backbone: str,
                  epochs: int = 1):
    """Bootstrap a HyMiRec version on ``sequences`` and publish it to the registry (no announcement: a
    worker started afterwards finds it) → (version, the model)."""
    from store.registry import ModelRegistry
    from trainer.serving_model import bootstrap

    model = bootstrap(settings, items[["item_id", "text", "category"]], sequences, epochs, backbone)
    files, manifest = model.to_files({"note": "published by a benchmark"})
    return ModelRegistry(settings).publish(files, manifest, parent=None).version, model


def item_codes(model, items: pd.DataFrame) -> np.ndarray:
    """The model's packed codes of ``items``, one row per item in their order: uint8 [n, bytes per item]."""
    encoded = model.encode_items(items[["item_id", "text", "category"]])
    if encoded.item_ids != [str(i) for i in items["item_id"]] or None in encoded.codes:
        raise HymirecError(f"model {model.version} did not code every catalogue item")
    return np.frombuffer(b"".join(encoded.codes), np.uint8).reshape(len(encoded.item_ids), -1)


def history_rows(user_ids: list[str], histories: list[np.ndarray], item_ids: pa.Array, shard: int, recent_len: int,
                 codes: np.ndarray | None = None, version: str | None = None) -> pa.Table:
    """user_histories rows as the ingest path leaves them: ``histories`` are item positions in
    ``item_ids`` (oldest first); ``codes`` [items, B] packs each item's codes (None: no codes)."""
    lengths = np.array([len(h) for h in histories], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate(histories) if histories else np.zeros(0, np.int64)
    recent = [h[-recent_len:] for h in histories]
    recent_offsets = np.concatenate([[0], np.cumsum([len(r) for r in recent])]).astype(np.int32)
    n = len(user_ids)
    if codes is not None:
        width = codes.shape[1]
        history_codes = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets * width),
                                                               pa.py_buffer(codes[flat].tobytes())])
    else:
        history_codes = pa.nulls(n, pa.binary())
    return pa.table({
        "user_id": pa.array(user_ids, pa.string()),
        "history_item_ids": pa.ListArray.from_arrays(pa.array(offsets), item_ids.take(pa.array(flat))),
        "history_codes": history_codes,
        "codebook_version": pa.array([version if codes is not None else None] * n, pa.string()),
        "recent_item_ids": pa.ListArray.from_arrays(pa.array(recent_offsets),
                                                    item_ids.take(pa.array(np.concatenate(recent) if recent else flat))),
        "event_count": pa.array(lengths),
        "last_ts": pa.array(np.full(n, 1_700_000_000_000, np.int64)),
        "watermark_partition": pa.array(np.full(n, shard, np.int32)),
        "watermark_offset": pa.array(np.full(n, -1, np.int64)),  # nothing consumed yet: every offset is new
        "recent_event_ids": pa.array([[] for _ in range(n)], pa.list_(pa.string())),
    })


def fill_histories(store, user_ids: list[str], histories: list[np.ndarray], items: pd.DataFrame,
                   codes: np.ndarray | None = None, version: str | None = None, chunk: int = 2000) -> dict[str, int]:
    """Write the users' history rows into the shard each belongs to (the partition Kafka's default
    partitioner gives its id, as for keyed events), ``chunk`` users per write → {user: shard}."""
    from serving.reader import shard_hint

    settings = store.settings
    item_ids = pa.array([str(i) for i in items["item_id"]], pa.string())
    shards = np.array([shard_hint(u, settings.partitions) for u in user_ids])
    for shard in range(settings.partitions):
        members = np.flatnonzero(shards == shard)
        for start in range(0, len(members), chunk):
            take = members[start : start + chunk]
            store.upsert_histories(shard, history_rows([user_ids[j] for j in take], [histories[j] for j in take],
                                                       item_ids, shard, settings.recent_len, codes, version))
    return dict(zip(user_ids, shards.tolist()))
