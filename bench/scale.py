"""scale: events/s with 1, 2 and 4 workers of one group, and the pause a dead worker leaves.

For each worker count: fresh topics of ``PARTITIONS`` partitions and an empty LanceDB directory; the
workers are started and waited for until the group has settled (every partition owned by exactly one
of them); then one synthetic log is produced unpaced and the rate is the events applied (summed over
the workers' /health) from the first one applied to the last. On one machine the workers share its
cores and its disk, so no linear gain is expected: the figure says what a second or fourth process
buys here, not on a cluster.

Rebalance pause: with two workers running and a paced stream arriving on every partition, one
worker is killed with SIGKILL (or stopped with SIGTERM). The pause is the time from the signal to
the first event applied by the survivor on a partition the other one owned: for kill -9 it is
bounded below by the group's session timeout (HYMIREC_WORKER_SESSION_TIMEOUT_S), for a clean stop
by the leave and the rejoin.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from bench import Options
from bench.harness import broker, counts, free_port, fresh, health
from bench.ingest import write_log
from bench.report import Result, repeated, spread_text
from hymirec.errors import HymirecError
from hymirec.procs import ManagedProcess, faust_worker, wait_for
from hymirec.settings import Settings
from store import Store
from stream.replay import replay

PARTITIONS = 12
WORKER_COUNTS = (1, 2, 4)
PAUSE_RATE = 300.0  # events/s arriving while a worker dies
POLL_S = 0.1
DEADLINE_S = 900.0


def member(s: Settings, tmp: Path, i: int) -> Settings:
    return s.model_copy(update={"web_port": free_port(), "worker_dir": tmp / f"{s.app_id}-w{i}"})


def owned(s: Settings) -> set[int]:
    return {int(p) for p in ((health(s) or {}).get("partitions") or {})}


def settled(members: list[Settings]) -> bool:
    """Every worker owns partitions and every partition is owned by exactly one of them."""
    owners = [owned(m) for m in members]
    return all(owners) and sum(len(o) for o in owners) == PARTITIONS and set().union(*owners) == set(range(PARTITIONS))


def applied(members: list[Settings]) -> int:
    return sum(counts(m).get("events_applied", 0) for m in members)


def start_group(stack: ExitStack, s: Settings, tmp: Path, n: int) -> list[tuple[Settings, ManagedProcess]]:
    """``n`` workers of one group, each (settings, process), once they share the partitions."""
    members = [member(s, tmp, i) for i in range(n)]
    procs = [stack.enter_context(faust_worker(m, tmp / f"{s.app_id}-w{i}.log")) for i, m in enumerate(members)]
    wait_for(lambda: settled(members), timeout=DEADLINE_S, interval=0.5, what=f"{n} workers sharing the partitions")
    return list(zip(members, procs))


def throughput(live: Settings, tmp: Path, log: Path, events: int, n: int, run_no: int) -> dict:
    s = fresh(live, tmp, f"scale-n{n}-r{run_no}", partitions=PARTITIONS)
    with ExitStack() as stack:
        members = [m for m, _ in start_group(stack, s, tmp, n)]
        sender = threading.Thread(target=replay, args=(s, log), kwargs={"progress": False})
        sender.start()
        first_at = first = None
        deadline = time.monotonic() + DEADLINE_S
        while (done := applied(members)) < events:
            if first_at is None and done:
                first_at, first = time.perf_counter(), done
            if time.monotonic() > deadline:
                raise HymirecError(f"{n} workers applied {done} of {events} events in {DEADLINE_S:.0f} s")
            time.sleep(POLL_S)
        seconds = time.perf_counter() - first_at
        sender.join()
        split = [counts(m).get("events_applied", 0) for m in members]
    return {"workers": n, "run": run_no, "ev_s": (events - first) / seconds, "seconds": seconds,
            "per_worker_events": split}


def rebalance_pause(live: Settings, tmp: Path, log: Path, how: signal.Signals, run_no: int) -> float:
    """Seconds from ``how`` sent to one of two workers to the survivor's first event applied on a
    partition the other one owned (past the position the other one left in LanceDB)."""
    s = fresh(live, tmp, f"scale-pause-{how.name.lower()}-r{run_no}", partitions=PARTITIONS)
    with ExitStack() as stack:
        (survivor, _), (_, victim) = start_group(stack, s, tmp, 2)
        sender = threading.Thread(target=replay, args=(s, log), kwargs={"progress": False, "rate": PAUSE_RATE})
        sender.start()
        wait_for(lambda: counts(survivor).get("events_applied", 0) > 0, timeout=DEADLINE_S, interval=POLL_S,
                 what="the stream reaching the workers")
        orphaned = sorted(set(range(PARTITIONS)) - owned(survivor))
        sent_at = time.perf_counter()
        os.killpg(victim.proc.pid, how)
        victim.proc.wait(60)
        left = Store(s).positions(orphaned)  # what it had applied: the survivor resumes past it

        def took_over() -> bool:
            rows = (health(survivor) or {}).get("partitions") or {}
            return any(int(p) in orphaned and (row["applied"] or -1) > left.get(int(p), -1) for p, row in rows.items())

        wait_for(took_over, timeout=DEADLINE_S, interval=0.05, what="the survivor applying the other's partitions")
        pause = time.perf_counter() - sent_at
        sender.join()
    return pause


def run(settings: Settings, opts: Options) -> Result:
    events = 20_000 if opts.quick else (400_000 if opts.full else 100_000)
    repeats = 1 if opts.quick else opts.repeat
    with tempfile.TemporaryDirectory(prefix="hymirec-bench-scale-") as tmp_name, \
            broker(settings, Path(tmp_name)) as (live, how):
        tmp = Path(tmp_name)
        write_log(tmp / "log.jsonl", events, settings.seed)
        write_log(tmp / "pause.jsonl", int(PAUSE_RATE * 60), settings.seed + 1)
        runs = {n: [throughput(live, tmp, tmp / "log.jsonl", events, n, r + 1) for r in range(repeats)]
                for n in WORKER_COUNTS}
        pauses = {sig: repeated(rebalance_pause(live, tmp, tmp / "pause.jsonl", sig, r + 1) for r in range(repeats))
                  for sig in (signal.SIGKILL, signal.SIGTERM)}
    base = repeated(r["ev_s"] for r in runs[1])["median"]
    rows = []
    for n in WORKER_COUNTS:
        rate = repeated(r["ev_s"] for r in runs[n])
        rows.append({"workers": n, "events_s": round(rate["median"]), "min_max": spread_text(rate),
                     "speedup": round(rate["median"] / base, 2), "per_worker_events": runs[n][0]["per_worker_events"]})
    pause_rows = [{"worker": "killed (SIGKILL)" if sig == signal.SIGKILL else "stopped (SIGTERM)",
                   "pause_s": round(p["median"], 2), "min_max": spread_text(p), "runs": p["runs"]}
                  for sig, p in pauses.items()]
    return Result(
        name="scale", title=f"Scale: events/s with {', '.join(map(str, WORKER_COUNTS))} workers; the rebalance pause",
        params={"events": events, "partitions": PARTITIONS, "repeats": repeats, "broker": how,
                "cores": os.cpu_count(), "batch_size": settings.batch_size,
                "session_timeout_s": settings.worker_session_timeout_s, "pause_stream_ev_s": PAUSE_RATE},
        rows=rows, tables={"Rebalance pause (signal → survivor's first event on the other's partitions)": pause_rows},
        notes=[f"{os.cpu_count()} cores: the workers, the broker and this process share them, so more workers "
               "cannot add linear throughput here; the rows show what they cost or buy on one machine.",
               "events_s: events applied (summed over the workers' /health) from the first applied to the last, "
               "the log produced unpaced after the group settled (every partition owned once); median of the runs.",
               "per_worker_events: how the first run's events split over the workers.",
               "No model is published: the ingest path alone (histories by item id)."],
    )
