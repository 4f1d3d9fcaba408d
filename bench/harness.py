"""The moving parts the streaming benchmarks share: a broker, fresh topics, a real worker subprocess.

Nothing here touches the user's data: each run gets its own topics (``bench-<run>-*``), consumer
group, LanceDB directory (in a temporary directory) and web port. A broker already answering at
``settings.kafka_bootstrap`` is used as it is; otherwise a private one is started in the temporary
directory on free ports and stopped afterwards.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from hymirec.errors import HymirecError
from hymirec.procs import ManagedProcess, wait_for, worker_get, worker_health
from hymirec.settings import Settings

WORKER_START_S = 180.0


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
    """Settings with this run's own topics, group, LanceDB directory and web port (topics created)."""
    from stream.broker import create_topics

    run = f"bench-{tag}-{uuid.uuid4().hex[:6]}"
    s = settings.model_copy(update={
        "topic_interactions": f"{run}-interactions", "topic_items": f"{run}-items",
        "topic_model_versions": f"{run}-model-versions", "topic_dead_letter": f"{run}-dead-letter",
        "app_id": run, "lancedb_uri": str(workdir / run / "lancedb"), "worker_dir": workdir / run / "worker",
        "web_port": free_port(), **overrides,
    })
    create_topics(s)
    return s


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as the HYMIREC_* variables a worker process reads."""
    return {f"HYMIREC_{name.upper()}": str(getattr(settings, name)) for name in Settings.model_fields}


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


@contextmanager
def worker(settings: Settings, log_path: Path) -> Iterator[ManagedProcess]:
    """`faust -A stream.app worker` with these settings, up (its /health answers); stopped after."""
    proc = ManagedProcess([str(Path(sys.executable).with_name("faust")), "-A", "stream.app", "worker", "-l", "info"],
                          log_path=log_path, env=settings_env(settings))
    proc.start()
    try:
        wait_for(lambda: health(settings) if proc.alive else _dead(proc), timeout=WORKER_START_S,
                 interval=0.2, what="the worker's /health")
        yield proc
    finally:
        proc.stop()


def _dead(proc: ManagedProcess):
    raise HymirecError(f"the worker exited; last lines of {proc.log_path}:\n{proc.tail()}")


def counts(settings: Settings) -> dict[str, int]:
    return (health(settings) or {}).get("counts", {})


def warm_up(settings: Settings, proc: ManagedProcess, timeout: float = WORKER_START_S) -> None:
    """One event into every partition, waited for: the worker has joined its group and holds every
    partition, so what is timed next is not the group join."""
    from kafka import KafkaProducer

    before = counts(settings).get("events_applied", 0)
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    try:
        for p in range(settings.partitions):
            user = f"warm-up-{p}"
            body = json.dumps({"user_id": user, "item_id": "0", "ts": int(time.time() * 1000)}).encode()
            producer.send(settings.topic_interactions, key=user.encode(), value=body, partition=p)
        producer.flush(30)
    finally:
        producer.close()
    wait_for(lambda: (counts(settings).get("events_applied", 0) - before >= settings.partitions) if proc.alive
             else _dead(proc), timeout=timeout, interval=0.2, what="the warm-up events")
