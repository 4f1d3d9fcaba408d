"""When a writer compacts the tables it writes between its own writes.

Every merge_insert adds a fragment, and both reads and the next merge_insert pay for each fragment
not yet compacted or indexed: on a 5,000-user shard, one key lookup takes 3 ms on one fragment and
25 ms on 60; a 250-row upsert 17 ms on a few and 51 ms on 360. A fixed timer lets a shard written
twice a second pile up hundreds of fragments between two compactions, so readers see the sawtooth.

Compacting costs about the table's size (LanceDB rewrites every fragment below a million rows), so
the budget is a share of the writer's wall time: after a compaction that took d seconds, the table
is not compacted again for d · (1 − share) / share seconds, nor before ``min_writes`` more writes.
A small shard is then compacted every second or so; a large one less often, at the same cost.

Pure bookkeeping: the caller (``store.tables.Store``) times the compaction and runs it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field


@dataclass
class CompactionBudget:
    """``share`` of the wall time a writer may spend compacting (0: never, the timer alone);
    ``min_writes`` writes to a table between two of its compactions."""

    share: float
    min_writes: int = 8
    writes: dict[str, int] = field(default_factory=dict)  # table → writes since its last compaction
    not_before: dict[str, float] = field(default_factory=dict)  # table → monotonic time it may be compacted again

    def wrote(self, name: str) -> None:
        self.writes[name] = self.writes.get(name, 0) + 1

    def due(self, now: float, among: Collection[str]) -> str | None:
        """The table of ``among`` (those the writer still owns) to compact now, if any: of those with
        enough writes and out of their pause, the one written most since its last compaction (ties
        by name)."""
        if self.share <= 0:
            return None
        ready = [(-n, name) for name, n in self.writes.items()
                 if name in among and n >= self.min_writes and now >= self.not_before.get(name, now)]
        return min(ready)[1] if ready else None

    def compacted(self, name: str, started: float, finished: float) -> None:
        """Record a compaction of ``name`` (by this budget or by a timer) that ran from ``started`` to
        ``finished`` (monotonic seconds)."""
        self.writes[name] = 0
        if self.share > 0:
            self.not_before[name] = finished + (finished - started) * (1 - self.share) / self.share
