"""`hymirec demo`: the whole system on the embedded default, bounded in time, nothing left running.

local broker → topics → dataset export → faust worker → replay at a set rate → wait until every
event is applied → trainer publishes a version → worker hot-swaps → top-k for a few users and the
worker's key metrics → clean shutdown (the broker too, when the demo started it).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from hymirec.errors import HymirecError
from hymirec.procs import ManagedProcess, faust_worker, wait_for, wait_serving, worker_exited, worker_health
from hymirec.settings import Settings


def _step(number: int, total: int, text: str) -> None:
    print(f"\n[{number}/{total}] {text}", flush=True)


def _processed(health: dict | None) -> int:
    """Interactions the worker has finished with: applied, or skipped as already applied (a rerun)."""
    if not health:
        return 0
    counts = health["counts"]
    return int(counts.get("events_applied", 0) + counts.get("duplicates_skipped", 0))


def run_demo(settings: Settings, *, dataset: str, limit: int, rate: float, timeout: float, epochs: int,
             users_shown: int = 3) -> int:
    from store import Store
    from store.registry import ModelRegistry
    from stream import broker, datasets, replay
    from serving.reader import format_recommendation, recommend

    steps = 8
    data_dir = Path(settings.kafka_home).parent
    logs = data_dir / "logs"
    local = broker.LocalKafka(settings)
    with ExitStack() as stack:  # unwinds in reverse: the worker is stopped before the broker
        _step(1, steps, "Kafka broker (KRaft, 127.0.0.1)")
        if not local.status().running:
            stack.callback(_stop_broker, local)
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

        _step(3, steps, f"faust worker (log: {logs / 'worker.log'})")
        worker = stack.enter_context(faust_worker(settings, logs / "worker.log", start_timeout=120))
        before = _processed(worker_health(settings))
        print(f"worker up: http://{settings.web_host}:{settings.web_port}/metrics")

        _step(4, steps, f"replay {limit} interactions at {rate:.0f} events/s")
        summary = replay.replay(settings, out / "interactions.jsonl", items_path=out / "items.jsonl",
                                rate=rate, limit=limit, progress=sys.stderr.isatty())
        print(summary)

        _step(5, steps, "waiting until the worker has applied every event")
        t0 = time.monotonic()
        wait_for(lambda: (_processed(worker_health(settings)) - before >= summary.interactions) if worker.alive
                 else worker_exited(worker), timeout=timeout, what="the worker to apply the replay")
        print(f"all {summary.interactions} events processed {time.monotonic() - t0:.1f}s after the replay ended")

        _step(6, steps, f"trainer: the first version ({epochs} epochs, log: {logs / 'trainer.log'})")
        # The service's own guardrail (HYMIREC_TRAINER_MARGIN): the first version is published only if
        # it is at least as good as the popular items on the held-out newest events.
        trainer = ManagedProcess(
            [str(Path(sys.executable).with_name("hymirec")), "trainer", "--once", "--bootstrap-epochs", str(epochs)],
            log_path=logs / "trainer.log",
        )
        t0 = time.monotonic()
        with trainer:
            wait_for(lambda: not trainer.alive, timeout=timeout * 4, interval=1.0, what="the trainer cycle")
        if trainer.proc.returncode != 0:
            raise HymirecError(f"the trainer failed; last log lines:\n{trainer.tail()}")
        print(trainer.tail(1), f"({time.monotonic() - t0:.0f} s)")
        latest = ModelRegistry(settings).latest()
        if latest is None:
            raise HymirecError(f"the guardrail kept the first version back; the trainer said:\n{trainer.tail(3)}")
        print(prequential_table(latest.manifest.get("metrics") or {}))

        _step(7, steps, f"worker hot-swaps to {latest.version}")
        t0 = time.monotonic()
        wait_serving(settings, worker, latest.version, timeout=timeout)
        print(f"serving {latest.version} {time.monotonic() - t0:.1f}s after it was published")

        _step(8, steps, "what the system did")
        store = Store(settings)
        users = _sample_users(out / "interactions.jsonl", limit, users_shown)
        for user_id in users:
            rec = wait_for(lambda: (r := recommend(store, user_id, 5)).model_version == latest.version and r,
                           timeout=timeout, what=f"interests of user {user_id} under {latest.version}")
            print(format_recommendation(rec))
        health = worker_health(settings) or {}
        print("worker counters:", json.dumps(health.get("counts", {})))
        for name, rows in store.table_counts().items():
            print(f"  {name:<24} {rows:>8} rows")
        return 0


def prequential_table(metrics: dict) -> str:
    """The cycle's test-then-train scores (the trainer's manifest ``metrics``) as a table."""
    live, candidate = metrics.get("live") or {}, metrics.get("candidate") or {}
    against = metrics.get("live_version") or "popular items (no version yet)"
    lines = [f"held-out newest events: {candidate.get('events', 0):,} (each scored from the user's history before it)",
             f"{'scorer':<34} {'Recall@10':>10} {'NDCG@10':>10}"]
    for name, scores in ((f"live: {against}", live), ("candidate (published)", candidate)):
        lines.append(f"{name:<34} {scores.get('recall@10', 0.0):>10.4f} {scores.get('ndcg@10', 0.0):>10.4f}")
    return "\n".join(lines)


def _stop_broker(local) -> None:
    local.stop()
    print("broker stopped")


def _sample_users(path: Path, limit: int, count: int) -> list[str]:
    """The users with the most events among the first ``limit`` of the log (the ones replayed)."""
    from store.logs import read_interactions

    replayed = read_interactions(path, limit=limit)
    return replayed["user_id"].value_counts().index[:count].tolist()
