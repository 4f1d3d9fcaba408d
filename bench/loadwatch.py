"""How busy the machine was around a benchmark: the load average before and after, and the CPU that
other processes (not this one, not its children: the broker and workers it starts are its own) used
before, during and after, so that a figure measured beside other work can be told apart.

The rule for the warning (``busy``), on a machine of N cores; any one clause is enough:

- the 1-minute load average before the run exceeds ``LOAD_FRACTION`` × N (on 2 cores: 1.0). It
  counts every runnable process, this one's included: in `bench all` the previous benchmark's load
  still decays in it, which is why the next clause measures the others apart;
- other processes used more than ``OTHERS_FRACTION`` × N cores (on 2 cores: half a core) just before
  the run, on average during it, or just after (CPU time of every process outside this one's tree,
  sampled over ``SAMPLE_S`` seconds before and after, and every ``EVERY_S`` seconds in between). A
  broker that was already running when the benchmark started is not its own: its work counts here.

The benchmarks here fill every core (a worker, a broker, a producer or a reader), so half a core
taken by something else already slows and scatters their timings.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psutil

LOAD_FRACTION = 0.5
OTHERS_FRACTION = 0.25
SAMPLE_S = 1.0
EVERY_S = 5.0


def own_pids() -> set[int]:
    """This process and every process descended from it."""
    me = psutil.Process()
    try:
        return {me.pid, *(child.pid for child in me.children(recursive=True))}
    except psutil.Error:
        return {me.pid}


def cpu_seconds_of_others() -> dict[int, float]:
    """{pid: user + system CPU seconds} of every process outside this one's tree."""
    mine = own_pids()
    out = {}
    for proc in psutil.process_iter():
        if proc.pid in mine:
            continue
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        out[proc.pid] = times.user + times.system
    return out


def others_cores(before: dict[int, float], after: dict[int, float], seconds: float) -> float:
    """Cores' worth of CPU the other processes used between two ``cpu_seconds_of_others``: a process
    only in ``after`` started in between (all its CPU counts), one only in ``before`` ended in between
    (its last moments are missed)."""
    if seconds <= 0:
        return 0.0
    used = sum(max(0.0, cpu - before.get(pid, 0.0)) for pid, cpu in after.items())
    return used / seconds


def sample_others(seconds: float = SAMPLE_S) -> float:
    start = cpu_seconds_of_others()
    time.sleep(seconds)
    return others_cores(start, cpu_seconds_of_others(), seconds)


def verdict(cores: int, load_1m_before: float, others: dict[str, float | None]) -> list[str]:
    """Why the machine counts as busy (the module's rule): [] when it does not."""
    reasons = []
    if load_1m_before > LOAD_FRACTION * cores:
        reasons.append(f"1-minute load average {load_1m_before:.2f} before the run > {LOAD_FRACTION:g} × {cores} cores")
    for when, value in others.items():
        if value is not None and value > OTHERS_FRACTION * cores:
            reasons.append(f"other processes used {value:.2f} cores {when} the run > {OTHERS_FRACTION:g} × {cores} cores")
    return reasons


def record(cores: int, before: tuple[float, ...], after: tuple[float, ...], others: dict[str, float | None]) -> dict[str, Any]:
    """What is written with a result: the load averages, the others' CPU and the warning."""
    reasons = verdict(cores, before[0], others)
    return {
        "cores": cores,
        "load_average_before": [round(x, 2) for x in before],  # 1, 5, 15 minutes
        "load_average_after": [round(x, 2) for x in after],
        "others_cores": {k: None if v is None else round(v, 2) for k, v in others.items()},
        "busy": bool(reasons),
        "warning": "; ".join(reasons),
        "rule": f"busy if the 1-min load average before > {LOAD_FRACTION:g} × cores, or other processes "
                f"(outside this one's tree) used > {OTHERS_FRACTION:g} × cores before, during or after",
    }


def describe(load: dict[str, Any]) -> str:
    """One line for people."""
    others = load["others_cores"]
    text = (f"Load average (1/5/15 min) before {'/'.join(f'{x:g}' for x in load['load_average_before'])}, "
            f"after {'/'.join(f'{x:g}' for x in load['load_average_after'])} on {load['cores']} cores; "
            "other processes' CPU (cores) " + ", ".join(f"{k} {'–' if v is None else f'{v:g}'}" for k, v in others.items()))
    return text + "."


class LoadWatch:
    """``with LoadWatch() as watch: ...`` then ``watch.record``: the load around the block."""

    def __init__(self, sample_s: float = SAMPLE_S, every_s: float = EVERY_S):
        self.sample_s, self.every_s = sample_s, every_s
        self.cores = os.cpu_count() or 1
        self.during: list[float] = []
        self.record: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last, at = cpu_seconds_of_others(), time.monotonic()
        while not self._stop.wait(self.every_s):
            now, now_at = cpu_seconds_of_others(), time.monotonic()
            self.during.append(others_cores(last, now, now_at - at))
            last, at = now, now_at

    def __enter__(self) -> LoadWatch:
        self.load_before = os.getloadavg()
        self.others_before = sample_others(self.sample_s)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(self.every_s + 5)
        after = os.getloadavg()
        others_after = sample_others(self.sample_s)
        during = sum(self.during) / len(self.during) if self.during else None
        self.record = record(self.cores, self.load_before, after,
                             {"before": self.others_before, "during": during, "after": others_after})
