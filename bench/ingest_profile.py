"""Where the worker's ingest time goes: cProfile of the worker's ingest path applied in-process, batch
by batch, to the ingest benchmark's log (no broker: each line becomes the RawEvent the worker would
consume, on the partition Kafka's default partitioner gives its user id, offsets counted per
partition), into an empty LanceDB directory. As in the worker under a backlog, each batch is
prepared against the shard cache (``stream.shard_cache``) and staged, and what is staged is written
every ``flush_every`` events.

What this leaves out of the worker's path: Faust's per-event consumption and the agent around the
calls (dead letters, metrics, offset commits, the store thread). cProfile slows Python code (not
LanceDB's native code) by a fraction, so the shares are indicative and the milliseconds an upper bound.
"""

from __future__ import annotations

import cProfile
import gc
import io
import json
import pstats
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hymirec.settings import Settings
from serving.reader import shard_hint
from store import Store
from stream.ingest import ItemCache, RawEvent, prepare_interactions, write_interactions
from stream.shard_cache import ShardCache

PER_EVENTS = 1000  # the summary is per batch of this many events
TOP = 40  # functions listed in the text file, by cumulative time
# The calls the worker makes per batch (and per write): (file the function is in, function name).
ENTRIES = (("stream/ingest.py", "prepare_interactions"), ("stream/shard_cache.py", "stage"),
           ("stream/ingest.py", "write_interactions"))
# The parts of that time the summary names: (label, file, function, [(label, file, function) within it]).
# The rest is the entries' time outside them.
PARTS = (
    ("reading the touched users and the position (ShardCache.get_histories_and_position)", "stream/shard_cache.py",
     "get_histories_and_position",
     [("… of which LanceDB reads of users not held yet (Store.get_histories_and_position)", "store/tables.py",
       "get_histories_and_position")]),
    ("writing the staged rows: one LanceDB merge_insert per shard (Store.upsert_histories)", "store/tables.py",
     "upsert_histories", [("… of which LanceDB's merge_insert().execute", "lancedb/merge.py", "execute")]),
    ("validation: parse and key check of each event (stream.ingest._validate)", "stream/ingest.py", "_validate", []),
)


def raw_events(lines: Iterable[bytes | str], partitions: int) -> list[RawEvent]:
    """The log's events as the worker consumes them: keyed by user id, on its partition, in order."""
    next_offset: dict[int, int] = defaultdict(int)
    events = []
    for line in lines:
        value = line.encode() if isinstance(line, str) else line
        user = json.loads(value)["user_id"]
        partition = shard_hint(user, partitions)
        events.append(RawEvent(value=value, key=user.encode(), partition=partition, offset=next_offset[partition],
                               timestamp=time.time()))
        next_offset[partition] += 1
    return events


def profile_ingest(settings: Settings, events: Sequence[RawEvent], batch_size: int, lancedb_dir: Path,
                   flush_every: int) -> pstats.Stats:
    """Prepare and stage ``events`` in batches of ``batch_size`` into a fresh store under cProfile,
    writing what is staged every ``flush_every`` events and at the end."""
    s = settings.model_copy(update={"lancedb_uri": str(lancedb_dir)})
    store, known = Store(s), ItemCache()
    cache = ShardCache(store, s)
    profiler = cProfile.Profile()
    thresholds = gc.get_threshold()
    gc.set_threshold(*s.worker_gc_thresholds)  # as stream.app sets them in the worker
    try:
        for start in range(0, len(events), batch_size):
            profiler.enable()
            cache.stage(prepare_interactions(cache, s, events[start : start + batch_size], known_items=known))
            if cache.staged_events() >= flush_every or start + batch_size >= len(events):
                write_interactions(store, cache.pending())
                cache.written()
            profiler.disable()
    finally:
        gc.set_threshold(*thresholds)
    return pstats.Stats(profiler)


def cumulative(stats: pstats.Stats, path_end: str, function: str) -> tuple[float, int]:
    """(cumulative seconds, primitive calls) of the functions named ``function`` in files ending ``path_end``."""
    seconds, calls = 0.0, 0
    for (filename, _, name), (primitive, _, _, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        if name == function and filename.replace("\\", "/").endswith(path_end):
            seconds, calls = seconds + ct, calls + primitive
    return seconds, calls


def summary(stats: pstats.Stats, events: int) -> list[dict[str, Any]]:
    """Rows: each part's milliseconds per ``PER_EVENTS``-event batch and share of the entries' time."""
    total = sum(cumulative(stats, path, name)[0] for path, name in ENTRIES)
    per = PER_EVENTS / events if events else 0.0

    def row(label: str, function: str, seconds: float, calls: int | None) -> dict[str, Any]:
        return {"part": label, "function": function, "calls": calls, "ms_per_1000_events": round(1000 * seconds * per, 1),
                "share": round(seconds / total, 3) if total else None}

    rows, named = [], 0.0
    for label, path, name, within in PARTS:
        seconds, calls = cumulative(stats, path, name)
        named += seconds
        rows.append(row(label, name, seconds, calls))
        rows += [row(inner, inner_name, *cumulative(stats, inner_path, inner_name)) for inner, inner_path, inner_name in within]
    return [*rows, row("the rest (building rows, dedupe, staging, bookkeeping)", "", max(0.0, total - named), None),
            row("total: prepare_interactions + staging + write_interactions", "", total, None)]


def top_functions(stats: pstats.Stats, heading: str, top: int = TOP) -> str:
    """The text file: ``heading`` then the ``top`` functions by cumulative time (pstats' own format)."""
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats("cumulative").print_stats(top)
    return heading.rstrip() + "\n\n" + out.getvalue()
