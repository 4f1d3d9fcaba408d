"""The partition count the user shards are laid out for, and the guard against changing it.

A user's shard is the partition Kafka's default partitioner gives its id, modulo the partition
count. With another count the same users hash to other shards: their new events would start a
second, partial history beside the old one. Nothing migrates the shards, so a LanceDB directory
keeps the count it was first written with, recorded in ``store_layout``:

- ``claim_layout`` (the worker, at start-up, before anything writes) checks, then records its
  count;
- ``check_layout`` (readers that report per partition, such as `hymirec status`) only checks.

Until a user shard exists nobody has been placed, so any count is accepted (and a claim replaces
the record). A directory written before the record existed is trusted if none of its shards lies
beyond the count: from shards p000..p001 alone it cannot tell 2 partitions from 4.
"""

from __future__ import annotations

import time

from hymirec.errors import HymirecError
from store.schemas import HISTORIES, INTERESTS, LAYOUT, layout_schema
from store.tables import Store, open_table, to_arrow

CLAIM_TRIES, CLAIM_BACKOFF_S = 10, 0.1


def recorded_partitions(store: Store) -> int | None:
    """The partition count recorded in ``store_layout``; None if none is recorded."""
    table = open_table(store.db, LAYOUT, layout_schema(), create=False)
    rows = [] if table is None else table.to_arrow().to_pylist()
    return rows[-1]["partitions"] if rows else None


def check_layout(store: Store) -> None:
    """Raise HymirecError if the store's user shards are laid out for another partition count
    than ``store.settings.partitions``."""
    partitions = store.settings.partitions
    shards = sorted(set(store.shards(HISTORIES)) | set(store.shards(INTERESTS)))
    if not shards:
        return
    recorded = recorded_partitions(store)
    if shards[-1] < partitions and recorded in (None, partitions):
        return
    # A shard beyond the record means the topic grew under a worker: the record is a lower bound too.
    exact = recorded is not None and shards[-1] < recorded
    written = str(recorded) if exact else f"at least {shards[-1] + 1}"
    names = f"p{shards[0]:03d}" + (f"..p{shards[-1]:03d}" if len(shards) > 1 else "")
    fix = f"HYMIREC_PARTITIONS={recorded}" if exact else "HYMIREC_PARTITIONS set to the count it was written with"
    raise HymirecError(
        f"LanceDB at {store.db.uri} holds user shards of {written} partitions ({names}) but "
        f"HYMIREC_PARTITIONS is {partitions}: users would move between shards; run with {fix}, or start "
        f"from an empty LanceDB directory and replay the log (migration is not supported)"
    )


def claim_layout(store: Store) -> None:
    """``check_layout``, then record ``store.settings.partitions`` as the store's layout.

    Workers of a group start together and race to record it: a write that loses (LanceDB's commit
    conflict, or a table another worker created meanwhile) is checked and tried again."""
    for attempt in range(CLAIM_TRIES):
        check_layout(store)
        if recorded_partitions(store) == store.settings.partitions:
            return
        row = {"partitions": store.settings.partitions}  # to_arrow stamps updated_at
        try:
            store.db.create_table(LAYOUT, to_arrow([row], layout_schema(), LAYOUT), mode="overwrite")
            return
        except Exception as exc:  # noqa: BLE001 — LanceDB raises RuntimeError or its own panic type here
            failure = exc
            time.sleep(CLAIM_BACKOFF_S * (attempt + 1))
    raise HymirecError(f"could not record the partition count in {LAYOUT} at {store.db.uri}: "
                       f"{type(failure).__name__}: {failure}")
