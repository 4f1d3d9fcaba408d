"""Where the worker's ingest time goes: cProfile of ``stream.ingest.prepare_interactions`` and
``write_interactions`` applied in-process, batch by batch, to the ingest benchmark's log (no broker:
each line becomes the RawEvent the worker would consume, on the partition Kafka's default
partitioner gives its user id, offsets counted per partition), into an empty LanceDB directory.

What this leaves out of the worker's path: Faust's per-event consumption and the agent around the
two calls (dead letters, metrics, offset commits). cProfile slows Python code (not LanceDB's native
code) by a fraction, so the shares are indicative and the milliseconds an upper bound.
"""

from __future__ import annotations

import cProfile
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

PER_EVENTS = 1000  # the summary is per batch of this many events
TOP = 40  # functions listed in the text file, by cumulative time
# The parts of a batch the summary names: (label, file the function is in, function name). The rest
# is the entry functions' time outside them.
ENTRIES = (("stream/ingest.py", "prepare_interactions"), ("stream/ingest.py", "write_interactions"))
PARTS = (
    ("reading the touched users and the position (Store.get_histories_and_position)", "store/tables.py",
     "get_histories_and_position"),
    ("writing the rows: one LanceDB merge_insert per shard (Store.upsert_histories)", "store/tables.py",
     "upsert_histories"),
    ("validation: parse and key check of each event (stream.ingest._validate)", "stream/ingest.py", "_validate"),
)
# Shown inside a part above (not subtracted again from the rest).
WITHIN = (("… of which LanceDB's merge_insert().execute", "lancedb/merge.py", "execute"),)


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


def profile_ingest(settings: Settings, events: Sequence[RawEvent], batch_size: int, lancedb_dir: Path) -> pstats.Stats:
    """Prepare and write ``events`` in batches of ``batch_size`` into a fresh store under cProfile."""
    s = settings.model_copy(update={"lancedb_uri": str(lancedb_dir)})
    store, known = Store(s), ItemCache()
    profiler = cProfile.Profile()
    for start in range(0, len(events), batch_size):
        batch = events[start : start + batch_size]
        profiler.enable()
        result = prepare_interactions(store, s, batch, known_items=known)
        write_interactions(store, result)
        profiler.disable()
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

    parts = [(label, name, *cumulative(stats, path, name)) for label, path, name in PARTS]
    within = [(label, name, *cumulative(stats, path, name)) for label, path, name in WITHIN]
    rest = max(0.0, total - sum(part[2] for part in parts))
    return [*(row(*part) for part in parts[:2]), *(row(*part) for part in within), row(*parts[2]),
            row("the rest of prepare/write (building rows, dedupe, bookkeeping)", "", rest, None),
            row("total: prepare_interactions + write_interactions", "", total, None)]


def top_functions(stats: pstats.Stats, heading: str, top: int = TOP) -> str:
    """The text file: ``heading`` then the ``top`` functions by cumulative time (pstats' own format)."""
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats("cumulative").print_stats(top)
    return heading.rstrip() + "\n\n" + out.getvalue()
