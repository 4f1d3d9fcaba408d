"""memory: peak RSS of the worker and of the trainer on a store of N users × 1,000-item histories.

Replaying N × 1,000 events (100M at the target's 100k users) is not feasible here, so each
backbone's store is filled directly through ``store.Store`` (bench.harness.fill_histories: the rows,
shards and codes the ingest path writes), then the real processes run on it:

1. **Version.** ``ITEMS`` catalogue items go into ``items``; a HyMiRec version is bootstrapped on
   a few random histories (plan(): ``sample_users`` × ``sample_len`` items, one epoch) and
   published; every history is written with that version's codes. Every user except ``recompute``
   of them also gets an interests row of that version, as a worker serving it would have left them:
   recomputing 100k users' interests from 1,000-item histories takes hours on these cores (~15
   users/s, tiny), and its memory is bounded per micro-batch (interest_batch_size users), which the
   ``recompute`` users exercise.
2. **Worker** (`faust -A stream.app worker`, sampled every 0.1 s with its children): loads the
   version, writes the catalogue's vectors into its vectors table, compares every user's interests
   with their history and recomputes the stale ones; then ``touched`` users get ``EVENTS_PER_USER``
   events each through Kafka (applied, codes appended, interests recomputed) and top-k queries are
   answered.
3. **Trainer**: the worker stopped, `hymirec trainer --once` (a subprocess, sampled likewise) runs
   one cycle on that store: at most ``trainer_max_users`` users' histories read (those with the most
   events not yet trained on), the live version and a fine-tuned candidate scored, published.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench import Options
from bench.harness import (
    RssSampler, broker, catalogue, counts, fill_histories, fresh, item_codes, metrics, publish_model,
)
from bench.report import Result, not_measured, reported, target
from hymirec.errors import HymirecError
from hymirec.procs import (
    ManagedProcess, faust_worker, settings_env, wait_for, wait_serving, worker_exited, worker_get,
)
from hymirec.settings import Settings, kafka_client_options
from store import Store

ITEMS = 2000
EVENTS_PER_USER = 2  # per touched user
QUERIES = 50
TARGET_GIB = {"tiny": 2.0, "smollm2": 4.0}
DEADLINE_S = 1800.0
BACKBONES = ("tiny", "smollm2")
CHUNK = 5000  # users per write


def users(opts: Options) -> int:
    return 100_000 if opts.full else (5_000 if opts.quick else 20_000)


def backbones(opts: Options) -> tuple[str, ...]:
    """SmolLM2's version, interests and trainer cycle take minutes here: not in --quick."""
    return BACKBONES[:1] if opts.quick else BACKBONES


def plan(backbone: str) -> dict:
    """The users a version is bootstrapped on (and their history length); how many users the worker
    recomputes and is sent events for, and the trainer reads. The same at every store size: the
    memory they need is per micro-batch, not per stored user. SmolLM2 runs every one of them through
    a 135M-parameter model (and trains it): far fewer."""
    sample, sample_len, work = {"tiny": (200, 200, 256), "smollm2": (4, 20, 8)}[backbone]
    return {"sample_users": sample, "sample_len": sample_len, "recompute": work, "touched": work,
            "trainer_max_users": work}


def interests_rows(user_ids: list[str], version: str, k: int, dim: int, rng: np.random.Generator) -> pa.Table:
    """Unit interests [K, D] per user, stamped with ``version`` and now (after the histories)."""
    x = rng.standard_normal((len(user_ids) * k, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim).cast(pa.list_(pa.float32()))
    return pa.table({
        "user_id": pa.array(user_ids, pa.string()),
        "interests": pa.FixedSizeListArray.from_arrays(inner, k).cast(pa.list_(pa.list_(pa.float32()))),
        "model_version": pa.array([version] * len(user_ids), pa.string()),
        "updated_at": pa.array([datetime.now(timezone.utc)] * len(user_ids), pa.timestamp("ms", tz="UTC")),
    })


def bootstrap(s: Settings, backbone: str, rng: np.random.Generator):
    """A version of ``backbone`` trained on a few random histories, published → (version, the model)."""
    p = plan(backbone)
    sample = {f"u{j}": [str(i) for i in rng.integers(0, ITEMS, p["sample_len"])] for j in range(p["sample_users"])}
    return publish_model(s, catalogue(ITEMS), sample, backbone)


def fill(s: Settings, n: int, version: str, codes: np.ndarray, rng: np.random.Generator) -> dict[str, int]:
    """The catalogue and ``n`` users' histories with ``version``'s codes → {user: shard}."""
    store = Store(s)
    items = catalogue(ITEMS)
    store.upsert_items(items.to_dict("records"))
    shard_of: dict[str, int] = {}
    for start in range(0, n, CHUNK):  # a chunk's histories at a time: 100M ids do not fit as lists
        ids = [f"u{j}" for j in range(start, min(n, start + CHUNK))]
        histories = list(rng.integers(0, ITEMS, (len(ids), s.history_max_len)))
        shard_of |= fill_histories(store, ids, histories, items, codes, version)
    return shard_of


def serve_all_but(s: Settings, shard_of: dict[str, int], version: str, recompute: int,
                  rng: np.random.Generator) -> None:
    """Interests rows of ``version`` for every user but the first ``recompute`` ones."""
    store = Store(s)
    served = list(shard_of)[recompute:]
    for shard in range(s.partitions):
        mine = [u for u in served if shard_of[u] == shard]
        for start in range(0, len(mine), CHUNK):
            store.upsert_interests(shard, interests_rows(mine[start : start + CHUNK], version, s.num_interests,
                                                         s.embedding_dim, rng))


def total(samples: dict, name: str) -> float:
    return sum(v for _, v in samples.get(name, []))


def run_worker(s: Settings, log_path: Path, version: str, user_ids: list[str], p: dict,
               rng: np.random.Generator) -> dict:
    """Step 2 → peak RSS and what the worker did."""
    from kafka import KafkaProducer

    touched = [user_ids[j] for j in rng.choice(len(user_ids), p["touched"], replace=False)]
    started = time.perf_counter()
    with faust_worker(s, log_path) as proc, RssSampler(proc.proc.pid) as rss:
        wait_serving(s, proc, version, timeout=DEADLINE_S)

        def computed() -> float:
            return total(metrics(s), "hymirec_interests_computed_total")

        wait_for(lambda: computed() >= p["recompute"] if proc.alive else worker_exited(proc), timeout=DEADLINE_S,
                 interval=1.0, what="the stale users' interests")
        ready_s = time.perf_counter() - started
        before, applied = computed(), counts(s).get("events_applied", 0)
        producer = KafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all", linger_ms=5, **kafka_client_options(s))
        try:
            for n in range(EVENTS_PER_USER):
                for user in touched:
                    body = {"user_id": user, "item_id": str(rng.integers(ITEMS)), "ts": int(time.time() * 1000),
                            "event_id": f"{version}-{n}-{user}"}  # unique per backbone: not a resend
                    producer.send(s.topic_interactions, key=user.encode(), value=json.dumps(body).encode())
            producer.flush(60)
        finally:
            producer.close()
        sent = len(touched) * EVENTS_PER_USER
        wait_for(lambda: counts(s).get("events_applied", 0) - applied >= sent if proc.alive else worker_exited(proc),
                 timeout=DEADLINE_S, interval=1.0, what="the events")
        wait_for(lambda: computed() - before >= len(touched) if proc.alive else worker_exited(proc), timeout=DEADLINE_S,
                 interval=1.0, what="the touched users' interests")
        answers = [json.loads(worker_get(s, f"/recommend/{user_ids[j]}") or b"{}")
                   for j in rng.choice(len(user_ids), QUERIES, replace=False)]
        seconds = time.perf_counter() - started
    return {"peak_gib": rss.peak / 2**30, "ready_s": ready_s, "seconds": seconds, "events": sent,
            "answers_from_model": sum(a.get("model_version") == version for a in answers)}


def run_trainer(s: Settings, log_path: Path) -> dict:
    """Step 3 → peak RSS and the cycle's outcome."""
    hymirec = str(Path(sys.executable).with_name("hymirec"))
    proc = ManagedProcess([hymirec, "trainer", "--once", "--margin", "1"], log_path=log_path,
                          env=settings_env(s))
    started = time.perf_counter()
    proc.start()
    try:
        with RssSampler(proc.proc.pid) as rss:
            code = proc.proc.wait(DEADLINE_S)
    finally:
        proc.stop()
    if code != 0:
        raise HymirecError(f"`hymirec trainer --once` exited {code}; last lines of {proc.log_path}:\n{proc.tail()}")
    outcome = next((line for line in proc.tail(50).splitlines() if line.startswith(("published", "not published"))), "")
    return {"peak_gib": rss.peak / 2**30, "seconds": time.perf_counter() - started, "outcome": outcome}


def run_backbone(s: Settings, workdir: Path, backbone: str, version: str, shard_of: dict[str, int],
                 rng: np.random.Generator) -> list[dict]:
    """Steps 2 and 3 for one backbone's version on the filled store; its worker and trainer rows."""
    p = plan(backbone)
    s = s.model_copy(update={"trainer_backbone": backbone, "trainer_max_users": p["trainer_max_users"]})
    started = time.perf_counter()
    serve_all_but(s, shard_of, version, p["recompute"], rng)
    interests_s = time.perf_counter() - started
    user_ids = list(shard_of)
    w = run_worker(s, workdir / f"worker-{backbone}.log", version, user_ids, p, rng)
    t = run_trainer(s, workdir / f"trainer-{backbone}.log")
    common = {"backbone": backbone, "users": len(user_ids), "history_len": s.history_max_len, "items": ITEMS}
    return [
        {**common, "process": "worker", "peak_rss_gib": round(w["peak_gib"], 3), "target_gib": TARGET_GIB[backbone],
         "seconds": round(w["seconds"], 1),
         "did": f"loaded {version}, wrote {ITEMS} item vectors, checked {len(user_ids):,} users' interests, "
                f"recomputed {p['recompute']} ({w['ready_s']:.0f} s); applied {w['events']} events of {p['touched']} "
                f"users and recomputed them; {w['answers_from_model']} of {QUERIES} top-k answers from {version}",
         "setup_s": round(interests_s, 1)},
        {**common, "process": "trainer", "peak_rss_gib": round(t["peak_gib"], 3), "target_gib": None,
         "seconds": round(t["seconds"], 1),
         "did": f"one cycle on at most trainer_max_users={p['trainer_max_users']} users: {t['outcome']}",
         "setup_s": None},
    ]


def run(settings: Settings, opts: Options) -> Result:
    rows: list[dict] = []
    n = users(opts)
    rng = np.random.default_rng(settings.seed)
    with tempfile.TemporaryDirectory(prefix="hymirec-bench-memory-") as tmp_name, \
            broker(settings, Path(tmp_name)) as (live, how):
        workdir = Path(tmp_name)
        s = fresh(live, workdir, "memory", trainer_epochs=1, version_poll_s=600.0)
        started = time.perf_counter()
        first, model = bootstrap(s, BACKBONES[0], rng)
        shard_of = fill(s, n, first, item_codes(model, catalogue(ITEMS)), rng)
        del model
        fill_s = time.perf_counter() - started
        for backbone in backbones(opts):
            version = first if backbone == BACKBONES[0] else bootstrap(s, backbone, rng)[0]
            rows += run_backbone(s, workdir, backbone, version, shard_of, rng)
    scale = "" if n >= 100_000 else f" (measured at {n:,} users, not the target's 100k: run --full)"
    targets = []
    for row in rows:
        if row["process"] == "worker":
            targets.append(target(f"memory: worker peak RSS, {row['backbone']} backbone{scale}", row["peak_rss_gib"],
                                  row["target_gib"], at_least=False, unit=" GiB",
                                  note=f"{row['users']:,} users × {row['history_len']:,}-item histories"))
        else:
            targets.append(reported(f"memory: trainer peak RSS (GiB), {row['backbone']} backbone", row["peak_rss_gib"],
                                    note=row["did"]))
    targets += [not_measured(f"memory: worker peak RSS, {b} backbone", "--quick runs the tiny backbone only")
                for b in BACKBONES if b not in backbones(opts)]
    return Result(
        name="memory", title="Memory: peak RSS of the worker and the trainer at N users × 1,000-item histories",
        params={"users": n, "history_len": settings.history_max_len, "items": ITEMS,
                "plan": {b: plan(b) for b in backbones(opts)}, "fill_s": round(fill_s, 1),
                "events_per_touched_user": EVENTS_PER_USER,
                "interest_batch_size": settings.interest_batch_size, "partitions": settings.partitions,
                "codebook": f"{settings.codebook_levels}×{settings.codebook_size}", "broker": how,
                "seed": settings.seed},
        rows=rows, targets=targets,
        notes=["One run per backbone: --repeat does not apply here (each run takes minutes; a peak RSS depends "
               "far less on other processes than a timing does).",
               "The store is filled directly (no 100M-event replay): histories with the version's codes, and "
               "interests rows of that version for every user but the `recompute` ones (see the module docstring).",
               "peak_rss_gib: resident memory of the process and its children, sampled every 0.1 s, start to stop.",
               "The trainer reads at most trainer_max_users users per cycle (those with the most events not yet "
               "trained on); without that cap a cycle would read every history (100M item ids at 100k users).",
               "Histories are random items: the figures are about memory, not model quality."]
        + ([f"Quick run: {n:,} users, not the target's 100k, and the tiny backbone only."] if opts.quick else []),
    )
