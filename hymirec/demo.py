"""`hymirec demo`: the whole system on the embedded default, bounded in time, nothing left running.

local broker → topics → dataset export → faust worker → replay at a set rate → wait until every
event is applied → trainer publishes a version → worker hot-swaps → top-k for a few users and the
worker's key metrics → clean shutdown (the broker too, when the demo started it).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

from hymirec.errors import HymirecError
from hymirec.procs import ManagedProcess, wait_for
from hymirec.settings import Settings


def _step(number: int, total: int, text: str) -> None:
    print(f"\n[{number}/{total}] {text}", flush=True)


def _health(settings: Settings) -> dict | None:
    url = f"http://{settings.web_host}:{settings.web_port}/health"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except OSError:
        return None


def _processed(health: dict | None) -> int:
    """Interactions the worker has finished with: applied, or skipped as already applied (a rerun)."""
    if not health:
        return 0
    counts = health["counts"]
    return int(counts.get("events_applied", 0) + counts.get("duplicates_skipped", 0))


def run_demo(settings: Settings, *, dataset: str, limit: int, rate: float, timeout: float) -> int:
    from stream import broker, datasets, replay
    from store import Store

    steps = 6
    data_dir = Path(settings.kafka_home).parent
    logs = data_dir / "logs"
    local = broker.LocalKafka(settings)
    started_broker = False
    worker = ManagedProcess(
        [str(Path(sys.executable).with_name("faust")), "-A", "stream.app", "worker", "-l", "info"],
        log_path=logs / "worker.log",
    )
    try:
        _step(1, steps, "Kafka broker (KRaft, 127.0.0.1)")
        started_broker = not local.status().running
        print(local.start().describe())
        print("topics:", ", ".join(broker.create_topics(settings)))

        _step(2, steps, f"dataset {dataset}")
        out = data_dir / "datasets" / dataset
        if not (out / "interactions.jsonl").exists():
            if dataset == "ml-100k":
                print(datasets.export_ml100k(out, settings))
            else:
                print(datasets.export_synthetic(out, users=1000, items=2000, interests=20,
                                                events_per_user=60, drift=0.5, seed=settings.seed))
        else:
            print(f"reusing {out}")

        _step(3, steps, f"faust worker (log: {worker.log_path})")
        worker.start()
        before = _processed(wait_for(lambda: _health(settings) if worker.alive else _dead(worker),
                                     timeout=120, what="the worker's /health"))
        print(f"worker up: http://{settings.web_host}:{settings.web_port}/metrics")

        _step(4, steps, f"replay {limit} interactions at {rate:.0f} events/s")
        summary = replay.replay(settings, out / "interactions.jsonl", items_path=out / "items.jsonl",
                                rate=rate, limit=limit, progress=sys.stderr.isatty())
        print(summary)

        _step(5, steps, "waiting until the worker has applied every event")
        t0 = time.monotonic()
        wait_for(lambda: (_processed(_health(settings)) - before >= summary.interactions) if worker.alive
                 else _dead(worker), timeout=timeout, what="the worker to apply the replay")
        print(f"all {summary.interactions} events processed {time.monotonic() - t0:.1f}s after the replay ended")

        _step(6, steps, "what the system did")
        health = _health(settings) or {}
        print(json.dumps(health.get("counts", {}), indent=None))
        store = Store(settings)
        for name, rows in store.table_counts().items():
            print(f"  {name:<24} {rows:>8} rows")
        return 0
    finally:
        worker.stop()
        if started_broker:
            local.stop()
            print("broker stopped")


def _dead(process: ManagedProcess):
    raise HymirecError(f"the worker exited; last log lines:\n{process.tail()}")
