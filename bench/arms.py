"""What the live and the in-process runs of `hymirec simulate` share: the run's settings, the log, and
the arms that run in the simulation's own process, one chunk at a time (the baselines, the diagnostic
and the blend arms), each scored by ``bench.prequential.score_chunk`` against its state before the chunk."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench.diagnostic import Diagnostic, SignalsOnly, events_of, extend
from bench.prequential import K, score_chunk
from hymirec.errors import HymirecError
from model.baselines import streaming_baselines
from store.logs import read_interactions


@dataclass
class SimConfig:
    frozen_after: float = 0.3
    every_events: int = 5000
    chunk: int = 500
    epochs: int = 5  # per online cycle, a fine-tune (the service's trainer_epochs)
    bootstrap_epochs: int = 30  # v0001, which the frozen arm keeps (the service's trainer_bootstrap_epochs)
    backbone: str = "tiny"
    margin: float = 0.01
    window: int = 1000
    timeout: float = 300.0  # longest wait for one worker step (apply a chunk, switch a version)
    recent_window: int = 2000  # recent-pop: counts over this many events before the chunk


def read_log(interactions: Path, limit: int | None, config: SimConfig) -> tuple[pd.DataFrame, int]:
    """The log (with its ``position`` column) and how many of its first events bootstrap."""
    log = read_interactions(interactions, limit=limit)
    boot = int(round(config.frozen_after * len(log)))
    if not 0 < boot < len(log):
        raise HymirecError(f"--frozen-after {config.frozen_after} leaves no bootstrap or no events to score ({len(log)} events)")
    return log.assign(position=np.arange(len(log))), boot


def categories_of(catalogue: pd.DataFrame) -> dict[str, str | None]:
    """{item_id: category} of a catalogue (``store.logs.read_items``)."""
    return dict(zip(catalogue["item_id"].tolist(), catalogue["category"].tolist()))


def baseline_arms(log: pd.DataFrame, boot: int, config: SimConfig, categories: Mapping[str, str | None]) -> dict[str, list[dict]]:
    """{baseline name: records}: the baselines through ``log`` (position, user_id, item_id) with the live
    arms' protocol — the first ``boot`` events learnt, then chunk by chunk each event scored by
    ``score_chunk`` against the state before its chunk, then the chunk applied. ``categories``: the
    items' (cat-trend's)."""
    models = streaming_baselines(categories, config.recent_window)
    bootstrap_items = set(log["item_id"].iloc[:boot])
    events = events_of(log)
    for m in models:
        m.apply(events[:boot])
    records = {m.name: [] for m in models}
    for start in range(boot, len(log), config.chunk):
        chunk = log.iloc[start : start + config.chunk]
        users = list(dict.fromkeys(chunk["user_id"].tolist()))
        for m in models:
            histories = {u: h for u in users if (h := m.history(u)) is not None}
            records[m.name] += score_chunk(chunk, {u: (m.name, m.top(u, K)) for u in users}, histories, start,
                                           bootstrap_items)
            m.apply(events[start : start + config.chunk])
    return records


def blend_step(arms: list[SignalsOnly], exact: dict[str, list[str]], chunk: pd.DataFrame, start: int,
               bootstrap_items: set[str]) -> dict[str, list[dict]]:
    """The in-process blend arms on one chunk: its events scored against each arm's answers from
    ``exact`` (the users' histories before it), then the chunk applied to ``exact`` and learnt from."""
    users = list(dict.fromkeys(chunk["user_id"].tolist()))
    known = {u: exact[u] for u in users if u in exact}
    records = {}
    for arm in arms:
        tops = arm.top(known, K)
        records[arm.name] = score_chunk(chunk, {u: (arm.name, tops.get(u, [])) for u in users}, known, start,
                                        bootstrap_items)
    extend(exact, chunk)
    for arm in arms:
        arm.learn(exact, Counter(chunk["user_id"].tolist()))
    return records


def diagnostic_step(diagnostic: Diagnostic, exact: dict[str, list[str]], chunk: pd.DataFrame, start: int,
                    bootstrap_items: set[str]) -> list[dict]:
    """The diagnostic arm on one chunk, against ``exact`` as it stands before it."""
    users = list(dict.fromkeys(chunk["user_id"].tolist()))
    known = {u: exact[u] for u in users if u in exact}
    tops = diagnostic.top(known, K)
    return score_chunk(chunk, {u: (diagnostic.version, tops.get(u, [])) for u in users}, known, start, bootstrap_items)
