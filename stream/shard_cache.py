"""The history rows of the shards a worker writes, kept in memory between writes (write-behind).

The worker is its shards' only writer (a late writer is fenced in the store, store.tables), so the
rows it last wrote are the rows the table holds: a micro-batch reads its users here, and only a user
not held is read from LanceDB. Applied batches are *staged* here and written back together, in
fewer, larger upserts (``pending`` → ``stream.ingest.write_interactions`` → ``written``).

A shard is loaded whole the first time a batch needs it (after an assignment) when all its users
fit what the budget leaves: from then on a user not held is a new user, and a batch reads nothing
from LanceDB (otherwise, and once one of its users is dropped, only the users not held are read).

Nothing is lost by holding them (DESIGN §7b): a shard's stored position moves only with the write
that makes its rows durable, so after a crash its partition is read again from there and the staged
events are applied again. Memory is bounded by ``max_ids`` history entries (item ids and event ids):
after a write, the least recently used users beyond it are dropped (staged rows never are).
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Iterable

import pyarrow.compute as pc

from hymirec.settings import Settings
from store.schemas import histories_schema
from store.tables import Store
from stream.ingest import BatchResult

Key = tuple[int, str]  # (shard, user id)


def _entries(row: dict) -> int:
    return 1 + len(row["history_item_ids"] or ()) + len(row["recent_event_ids"] or ())


class ShardCache:
    """A ``HistorySource`` for ``stream.ingest.prepare_interactions`` that also holds what is staged:
    rows, positions, and the dead letters whose offsets those positions pass."""

    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.max_ids = settings.ingest_cache_ids
        self.history_max_len, self.dedupe_window = settings.history_max_len, settings.dedupe_window
        self._complete: set[int] = set()  # shards whose every user is held
        self._rows: OrderedDict[Key, dict] = OrderedDict()  # least recently used first
        self._size = 0  # _entries over _rows
        self._positions: dict[int, int] = {}  # shard -> applied position, staged or written (-1: none)
        self._staged_rows: dict[int, dict[str, dict]] = {}  # shard -> user -> newest staged row
        self._staged_positions: dict[int, int] = {}
        self._staged_applied: dict[int, int] = {}  # shard -> events
        self._staged_timestamps: dict[int, list[float]] = {}
        self._staged_dead: list[dict] = []  # dead-letter records, sent right before the write
        self._staged_at: float | None = None  # when the oldest staged batch was staged (monotonic)

    # --- reads (prepare_interactions) ---------------------------------------------------------
    def get_histories_and_position(self, user_ids: Iterable[str], shard: int) -> tuple[dict[str, dict], int | None]:
        """The users' newest rows (those the shard has) and the shard's applied position."""
        if shard not in self._positions:
            self._load(shard)
        found: dict[str, dict] = {}
        missing = []
        for user in user_ids:
            row = self._rows.get((shard, user))
            if row is None:
                missing.append(user)
            else:
                self._rows.move_to_end((shard, user))
                found[user] = row
        if missing and shard not in self._complete:
            # A user not held has nothing staged (staged rows are never dropped): the table is current.
            for user, row in self.store.get_histories_and_position(missing, shard)[0].items():
                self._hold_stored(shard, row)
                found[user] = row
        position = self._positions[shard]
        return found, None if position < 0 else position

    def _load(self, shard: int) -> None:
        """Read the shard's position and, if every user row fits what the budget leaves, the rows."""
        counts = self.store.scan_histories(shard, ["event_count"])["event_count"]
        entries = len(counts) + sum(pc.sum(pc.min_element_wise(counts, cap)).as_py() or 0
                                    for cap in (self.history_max_len, self.dedupe_window))
        if entries <= self.max_ids - self._size:
            for row in self.store.scan_histories(shard, histories_schema().names).to_pylist():
                self._hold_stored(shard, row)
            self._complete.add(shard)
        self._positions[shard] = self.store.positions([shard]).get(shard, -1)

    def _hold_stored(self, shard: int, row: dict) -> None:
        # One string object per item id, shared by every history that holds it (LanceDB hands each
        # row its own copies): an entry then costs a list slot, not a string.
        for column in ("history_item_ids", "recent_item_ids"):
            row[column] = [sys.intern(item) for item in row[column] or ()]
        self._hold(shard, row)

    # --- staging and writing ------------------------------------------------------------------
    def stage(self, result: BatchResult) -> None:
        """Hold a prepared batch's rows and positions until ``written``."""
        for shard, rows in result.rows.items():
            staged = self._staged_rows.setdefault(shard, {})
            for row in rows:
                self._hold(shard, row)
                staged[row["user_id"]] = row
        self._positions.update(result.positions)
        self._staged_positions.update(result.positions)
        for shard, applied in result.applied_by_shard.items():
            self._staged_applied[shard] = self._staged_applied.get(shard, 0) + applied
        for shard, stamps in result.timestamps_by_shard.items():
            self._staged_timestamps.setdefault(shard, []).extend(stamps)
        self._staged_dead += result.dead
        if result.positions and self._staged_at is None:
            self._staged_at = time.monotonic()

    def staged_events(self) -> int:
        return sum(self._staged_applied.values())

    def staged_for_s(self) -> float:
        """Seconds the oldest staged batch has waited for its write (0 when nothing is staged)."""
        return 0.0 if self._staged_at is None else time.monotonic() - self._staged_at

    def pending(self) -> BatchResult:
        """What is staged, as one batch for ``write_interactions``: per shard its staged rows and position."""
        return BatchResult(
            applied_by_shard=dict(self._staged_applied),
            rows={shard: list(self._staged_rows.get(shard, {}).values()) for shard in self._staged_positions},
            positions=dict(self._staged_positions),
            timestamps_by_shard={shard: list(stamps) for shard, stamps in self._staged_timestamps.items()},
            dead=list(self._staged_dead),
        )

    def written(self) -> None:
        """The ``pending`` batch is durable: nothing is staged any more; drop users beyond the budget."""
        self._clear_staged()
        while self._size > self.max_ids and self._rows:
            (shard, _), row = self._rows.popitem(last=False)
            self._size -= _entries(row)
            self._complete.discard(shard)

    def forget(self, shards: Iterable[int] | None = None) -> None:
        """Drop what is held of ``shards`` (None: all), staged or not: their partitions are read
        again from the stored positions by whoever owns them next."""
        if shards is None:
            self._rows.clear()
            self._size = 0
            self._positions.clear()
            self._complete.clear()
            self._clear_staged()
            return
        gone = set(shards)
        for key in [key for key in self._rows if key[0] in gone]:
            self._size -= _entries(self._rows.pop(key))
        for shard in gone:
            self._positions.pop(shard, None)
            self._complete.discard(shard)
            self._staged_rows.pop(shard, None)
            self._staged_positions.pop(shard, None)
            self._staged_applied.pop(shard, None)
            self._staged_timestamps.pop(shard, None)
        self._staged_dead = [record for record in self._staged_dead if record["source"]["partition"] not in gone]
        if not self._staged_positions:
            self._clear_staged()

    def _hold(self, shard: int, row: dict) -> None:
        key = (shard, row["user_id"])
        old = self._rows.get(key)
        if old is not None:
            self._size -= _entries(old)
        # A held user keeps its place: the batch's read has just moved it to the most recent end.
        self._rows[key] = row
        self._size += _entries(row)

    def _clear_staged(self) -> None:
        self._staged_rows.clear()
        self._staged_positions.clear()
        self._staged_applied = {}
        self._staged_timestamps = {}
        self._staged_dead = []
        self._staged_at = None

    def __len__(self) -> int:
        return len(self._rows)
