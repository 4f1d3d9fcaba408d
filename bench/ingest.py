"""ingest: the worker's events/s into LanceDB next to the raw Kafka consume rate of the same topic.

One synthetic log is replayed once (stream.replay) into fresh topics; then, for each batch size of
the sweep, side by side on the same topic and data:

1. raw: an aiokafka consumer (the client library under Faust) reads every message of every
   partition from the beginning, doing nothing with them — the ceiling a consumer could reach;
2. faust (at the default batch size): ``bench.faust_ceiling``, a Faust app whose agent has the
   shape the worker's had, but only counts the events — the ceiling of a worker that consumes
   through Faust's per-event stream (the worker reads with aiokafka's getmany: stream.consumer),
   timed like the worker;
3. worker: a fresh `faust -A stream.app worker` (own consumer group, empty LanceDB directory,
   HYMIREC_BATCH_SIZE set) reads the same messages from the beginning and applies them. Its rate is
   timed from outside: /health is polled, and the rate counts the events applied between the first
   completed batch and the last (so process start and group join are not in it). The worker's own
   busy time (sum of its batch latencies) is reported too. A sampler thread records the worker's
   peak RSS.

At the default batch size (the one judged against DESIGN §7) the pair is run ``Options.repeat`` times
(each with a fresh worker) and the row shows the medians, the ratio's min–max beside it; the other
batch sizes of the sweep run once. Last, the same log is applied in-process under cProfile
(bench.ingest_profile): the top functions go to ``ingest_profile.txt`` next to the results and the
Markdown gets where the time of a 1,000-event batch goes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bench import Options
from bench.harness import RssSampler, broker, counts, fresh, metrics
from bench.ingest_profile import PER_EVENTS, profile_ingest, raw_events, summary, top_functions
from bench.report import Result, repeated, spread_text, target
from hymirec.errors import HymirecError
from hymirec.procs import ManagedProcess, faust_worker, settings_env, worker_exited, worker_get
from hymirec.settings import Settings, kafka_client_options
from stream.replay import replay

TARGET_RATIO = 0.1  # DESIGN §7, revised after the first measurements
EVENTS_PER_USER = 20
ITEMS = 5000
POLL_S = 0.1
DEADLINE_S = 900.0
T = TypeVar("T")


def write_log(path: Path, events: int, seed: int) -> int:
    """A synthetic interaction log (JSONL, an event_id on every event); returns the user count."""
    rng = random.Random(seed)
    users = max(1, events // EVENTS_PER_USER)
    t0 = 1_700_000_000_000
    with open(path, "w") as out:
        for i in range(events):
            out.write(json.dumps({"user_id": f"u{rng.randrange(users)}", "item_id": str(rng.randrange(ITEMS)),
                                  "ts": t0 + i, "action": "click", "event_id": f"e{i}"}) + "\n")
    return users


async def _consume_all(settings: Settings, expected: int) -> dict:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", **kafka_client_options(settings))
    await consumer.start()
    try:
        partitions = [TopicPartition(settings.topic_interactions, p) for p in range(settings.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        seen, nbytes = 0, 0
        started = time.perf_counter()
        deadline = started + DEADLINE_S
        while seen < expected:
            if time.perf_counter() > deadline:
                raise HymirecError(f"raw consumer read {seen} of {expected} messages in {DEADLINE_S:.0f} s")
            for records in (await consumer.getmany(timeout_ms=1000, max_records=10_000)).values():
                seen += len(records)
                nbytes += sum(len(r.value or b"") for r in records)
        seconds = time.perf_counter() - started
    finally:
        await consumer.stop()
    return {"events": seen, "seconds": seconds, "rate": seen / seconds, "mib": nbytes / 2**20}


def raw_consume(settings: Settings, expected: int, repeats: int = 3) -> dict:
    """The median of a few full reads (one read of a small topic takes a fraction of a second)."""
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    runs = sorted((asyncio.run(_consume_all(settings, expected)) for _ in range(repeats)), key=lambda r: r["rate"])
    return runs[len(runs) // 2]


def poll(proc: ManagedProcess, read: Callable[[], T], done: Callable[[T], bool], failure: Callable[[T], str]) -> T:
    """``read()`` every POLL_S until ``done`` says so (HymirecError if the process exits or DEADLINE_S passes)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        value = read()
        if done(value):
            return value
        if not proc.alive:
            worker_exited(proc)
        if time.monotonic() > deadline:
            raise HymirecError(failure(value))
        time.sleep(POLL_S)


def worker_ingest(settings: Settings, expected: int, log_path: Path) -> dict:
    """Start a worker on the topic and time it from its first completed batch to the last event."""
    with faust_worker(settings, log_path) as proc, RssSampler(proc.proc.pid) as rss:
        first: dict[str, float] = {}  # when the first completed batch was seen, and what it had applied

        def applied_now() -> tuple[int, float]:
            applied, now = counts(settings).get("events_applied", 0), time.perf_counter()
            if not first and applied:
                first.update(at=now, applied=applied)
            return applied, now

        _, done_at = poll(proc, applied_now, lambda seen: seen[0] >= expected,
                          lambda seen: f"the worker applied {seen[0]} of {expected} events in {DEADLINE_S:.0f} s")
        first_at, first_applied = first["at"], first["applied"]
        samples = metrics(settings)
    busy = sum(v for labels, v in samples.get("hymirec_batch_latency_seconds_sum", [])
               if labels.get("topic") == settings.topic_interactions)
    batches = sum(v for labels, v in samples.get("hymirec_batch_latency_seconds_count", [])
                  if labels.get("topic") == settings.topic_interactions)
    timed = expected - first_applied
    return {
        "rate": timed / (done_at - first_at) if timed and done_at > first_at else None,
        "timed_events": timed,
        "seconds": done_at - first_at,
        "busy_rate": expected / busy if busy else None,
        "batches": int(batches),
        "peak_rss_mib": rss.peak / 2**20,
    }


def faust_ceiling(settings: Settings, expected: int, log_path: Path) -> float | None:
    """Start ``bench.faust_ceiling`` on the topic; events/s from its first batch to the last event."""
    faust = str(Path(sys.executable).with_name("faust"))
    proc = ManagedProcess([faust, "-A", "bench.faust_ceiling", "worker", "-l", "warn"], log_path=log_path,
                          env=settings_env(settings))
    with proc:
        seen = poll(proc, lambda: json.loads(worker_get(settings, "/count") or b'{"events": 0}'),
                    lambda count: count["events"] >= expected,
                    lambda count: f"the Faust ceiling app read {count['events']} of {expected} events in {DEADLINE_S:.0f} s")
    seconds = seen["last_at"] - seen["first_at"]
    return (seen["events"] - seen["first_batch"]) / seconds if seconds > 0 else None


def side_by_side(live: Settings, topic: Settings, tmp: Path, events: int, batch_size: int, run_no: int,
                 *, ceiling: bool) -> dict:
    """One raw read (median of 3), the Faust ceiling (``ceiling``) and one fresh worker on the same topic."""
    raw = raw_consume(topic, events)
    tag = f"b{batch_size}-r{run_no}"
    run_settings = fresh(live, tmp, f"ingest-{tag}", batch_size=batch_size, topic_interactions=topic.topic_interactions)
    faust_rate = None
    if ceiling:
        null_settings = fresh(live, tmp, f"ceiling-{tag}", batch_size=batch_size,
                              topic_interactions=topic.topic_interactions)
        faust_rate = faust_ceiling(null_settings, events, tmp / f"ceiling-{tag}.log")
    w = worker_ingest(run_settings, events, tmp / f"worker-{tag}.log")
    return {"batch_size": batch_size, "run": run_no, "raw_consume_ev_s": raw["rate"], "faust_ceiling_ev_s": faust_rate,
            "worker_ev_s": w["rate"], "ratio": w["rate"] / raw["rate"] if w["rate"] else None,
            "worker_vs_faust": w["rate"] / faust_rate if w["rate"] and faust_rate else None,
            "worker_busy_ev_s": w["busy_rate"],
            "batches": w["batches"], "timed_events": w["timed_events"], "worker_s": w["seconds"],
            "raw_s": raw["seconds"], "peak_rss_mib": w["peak_rss_mib"]}


def sweep_row(runs: list[dict]) -> dict:
    """One batch size's row: the medians of its runs, the ratio's min–max beside its median."""
    med = {key: repeated(r[key] for r in runs)["median"]  # None where no run measured it
           for key in ("raw_consume_ev_s", "faust_ceiling_ev_s", "worker_ev_s", "worker_vs_faust", "worker_busy_ev_s",
                       "worker_s", "raw_s", "peak_rss_mib")}
    ratio = repeated(r["ratio"] for r in runs)
    rounded = lambda v, digits=None: None if v is None else round(v, digits)
    return {
        "batch_size": runs[0]["batch_size"], "runs": len(runs), "raw_consume_ev_s": rounded(med["raw_consume_ev_s"]),
        "faust_ceiling_ev_s": rounded(med["faust_ceiling_ev_s"]), "worker_ev_s": rounded(med["worker_ev_s"]),
        "ratio": rounded(ratio["median"], 3), "worker_vs_faust": rounded(med["worker_vs_faust"], 2),
        "ratio_min_max": spread_text(ratio), "worker_busy_ev_s": rounded(med["worker_busy_ev_s"]),
        "batches": runs[0]["batches"], "timed_events": runs[0]["timed_events"], "worker_s": rounded(med["worker_s"], 2),
        "raw_s": rounded(med["raw_s"], 2), "peak_rss_mib": rounded(med["peak_rss_mib"]),
    }


def run(settings: Settings, opts: Options) -> Result:
    events = 30_000 if opts.quick else (1_000_000 if opts.full else 200_000)
    sweep = sorted({250, 1000, 4000, settings.batch_size})
    runs: dict[int, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="hymirec-bench-ingest-") as tmp_name, \
            broker(settings, Path(tmp_name)) as (live, how):
        tmp = Path(tmp_name)
        topic = fresh(live, tmp, "ingest")
        users = write_log(tmp / "log.jsonl", events, settings.seed)
        sent = replay(topic, tmp / "log.jsonl", progress=False)
        for batch_size in sweep:
            repeats = opts.repeat if batch_size == settings.batch_size else 1
            runs[batch_size] = [side_by_side(live, topic, tmp, events, batch_size, i + 1,
                                             ceiling=batch_size == settings.batch_size) for i in range(repeats)]
        # The profile needs no broker, but the log lives in this directory. It writes as often as the
        # worker did under this backlog: what ingest_flush_s holds at the worker's measured rate.
        rate = repeated(r["worker_ev_s"] for r in runs[settings.batch_size])["median"] or 0.0
        flush_every = max(settings.batch_size, min(settings.ingest_flush_events, round(rate * settings.ingest_flush_s)))
        profile_events = raw_events((tmp / "log.jsonl").read_bytes().splitlines(), settings.partitions)
        stats = profile_ingest(settings, profile_events, settings.batch_size, tmp / "profile-lancedb", flush_every)
    rows = [sweep_row(runs[b]) for b in sweep]
    per_run = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in runs[settings.batch_size]]
    where = summary(stats, len(profile_events))
    profile_head = (f"cProfile of the worker's ingest path (stream.ingest.prepare_interactions against the shard cache, "
                    f"staging, stream.ingest.write_interactions), in-process, {len(profile_events):,} events of the "
                    f"ingest log in batches of {settings.batch_size:,} over {settings.partitions} partitions, written "
                    f"every {flush_every:,} events, into an empty LanceDB directory (no broker, no Faust).")

    default = next(r for r in rows if r["batch_size"] == settings.batch_size)
    ratio = repeated(r["ratio"] for r in runs[settings.batch_size])
    targets = [
        target(f"ingest: worker / raw consume rate (batch size {settings.batch_size})", ratio, TARGET_RATIO,
               at_least=True, note=f"medians {default['worker_ev_s']:,} vs {default['raw_consume_ev_s']:,} events/s"
               if default["worker_ev_s"] else ""),
    ]
    return Result(
        name="ingest", title="Ingest: worker events/s into LanceDB vs raw Kafka consume rate",
        params={"events": events, "users": users, "items": ITEMS, "partitions": settings.partitions,
                "batch_sizes": sweep, "repeat_at_default_batch_size": opts.repeat,
                "batch_within_s": settings.batch_within_s, "broker": how,
                "producer_rate_ev_s": round(sent.rate), "poll_s": POLL_S, "seed": settings.seed},
        rows=rows, targets=targets,
        tables={f"Each run at the default batch size ({settings.batch_size:,})": per_run,
                f"Where the ingest time goes, per {PER_EVENTS:,}-event batch (cProfile, in-process)": where},
        attachments={"profile.txt": top_functions(stats, profile_head)},
        notes=["raw_consume_ev_s: aiokafka, all partitions assigned, from the beginning, values untouched; "
               "the median of 3 reads right before each worker run, on the same topic.",
               "worker_ev_s: events applied between the worker's first completed batch and the last event, "
               "timed from outside by polling /health; ratio = worker_ev_s / raw_consume_ev_s, per run.",
               "faust_ceiling_ev_s (default batch size only): bench.faust_ceiling, a Faust app with the agent shape "
               "the worker had before it read interactions with aiokafka (stream.consumer), that only counts the "
               "events, timed the same way: what Faust's per-event stream allows on this machine; "
               "worker_vs_faust = worker_ev_s / faust_ceiling_ev_s.",
               f"runs: worker runs at that batch size (each after its own raw reads); the row holds their medians "
               f"and ratio_min_max the spread of the ratio. The default batch size runs {opts.repeat}× (--repeat), "
               "the rest of the sweep once.",
               "worker_busy_ev_s: events / sum of the worker's batch latencies (its own view, without idle waits).",
               "peak_rss_mib: resident memory of the worker process and its children, sampled every 0.1 s "
               "(at this run's small scale; the memory target is `hymirec bench memory`).",
               "No model is published in this run: histories are kept by item id, without codes.",
               "Profile: " + profile_head + " Faust's per-event path and the agent around the calls are not in "
               "it; cProfile slows the Python parts, so the milliseconds are an upper bound. Top functions by "
               "cumulative time: ingest_profile.txt."],
    )
