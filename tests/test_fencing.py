"""Two writers of one table, on a real LanceDB directory: what one writer per table cannot promise.

A worker that lost a partition (revoked, or evicted while paused) can still be finishing the batch
it prepared before; the partition's new owner reads the same offsets again. Whatever order their
writes land in, the shard must end as the log says, with each key once.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import lancedb
import pyarrow as pa
import pytest

from hymirec.settings import Settings
from store import Store
from store.schemas import HISTORIES, ITEMS, KEYS, PRIMARY_KEY, items_schema, shard_table
from store.tables import merge, open_table, to_arrow
from stream.ingest import RawEvent, prepare_interactions, write_interactions

EVENTS = 80
USERS = 6


def log(seed: int) -> list[RawEvent]:
    rng = random.Random(seed)
    events = []
    for offset in range(EVENTS):
        user = f"u{rng.randrange(USERS)}"
        payload = {"user_id": user, "item_id": str(rng.randrange(40)), "ts": 1_000 + offset}
        events.append(RawEvent(json.dumps(payload).encode(), user.encode(), 0, offset))
    return events


def replayed(events: list[RawEvent]) -> dict[str, list[str]]:
    """Each user's history as the log gives it."""
    histories: dict[str, list[str]] = {}
    for raw in events:
        event = json.loads(raw.value)
        histories.setdefault(event["user_id"], []).append(event["item_id"])
    return histories


def shard_rows(settings: Settings) -> list[dict]:
    return lancedb.connect(settings.lancedb_uri).open_table(shard_table(HISTORIES, 0)).to_arrow().to_pylist()


@pytest.mark.parametrize("seed", range(6))
def test_a_replaced_owner_finishing_late_never_undoes_the_new_owners_writes(db_settings: Settings, seed: int):
    """The new owner applies the whole log in batches. The old one prepares batches of its own from
    what the store holds at the time and writes each of them later, in between the new owner's."""
    rng = random.Random(seed)
    events = log(seed)
    old, new = Store(db_settings), Store(db_settings)
    late: list = []  # the old owner's prepared batches, written at random later steps
    old_next, new_next = 0, 0
    while new_next < EVENTS or late:
        step = rng.random()
        if step < 0.35 and old_next < EVENTS:
            end = min(EVENTS, old_next + rng.randint(1, 20))
            late.append(prepare_interactions(old, db_settings, events[old_next:end]))
            old_next = end
        elif step < 0.6 and late:
            write_interactions(old, late.pop(rng.randrange(len(late))))
        elif new_next < EVENTS:
            end = min(EVENTS, new_next + rng.randint(1, 20))
            result = prepare_interactions(new, db_settings, events[new_next:end])
            write_interactions(new, result)
            new_next = end

    rows = shard_rows(db_settings)
    counts = Counter(row["user_id"] for row in rows)
    assert [key for key, n in counts.items() if n > 1] == []
    stored = {row["user_id"]: row for row in rows}
    assert stored.pop("")["watermark_offset"] == EVENTS - 1  # the position row: never moved back
    assert {user: row["history_item_ids"] for user, row in stored.items()} == replayed(events)
    assert {user: row["event_count"] for user, row in stored.items()} == {
        user: len(items) for user, items in replayed(events).items()}


def test_two_writers_inserting_the_same_new_keys_store_each_once(db_settings: Settings):
    """Both writers plan against the same version (neither has seen the other's commit): with the key
    declared lance's primary key, the second commit conflicts, is planned again and finds the key."""
    Store(db_settings).upsert_items([{"item_id": "first", "text": "x"}])
    schema = items_schema(db_settings.embedding_dim)
    handles = [lancedb.connect(db_settings.lancedb_uri).open_table(ITEMS) for _ in range(2)]
    for writer, table in enumerate(handles):
        rows = [{"item_id": key, "text": f"writer {writer}"} for key in ("new-1", "new-2")]
        merge(table, KEYS[ITEMS], to_arrow(rows, schema, ITEMS))
    rows = Store(db_settings).all_items(["item_id", "text"]).to_pylist()
    assert Counter(row["item_id"] for row in rows) == {"first": 1, "new-1": 1, "new-2": 1}
    assert {row["text"] for row in rows if row["item_id"] != "first"} == {"writer 1"}  # the retried one updated


def test_a_table_from_before_keys_were_declared_gets_its_key_on_its_writers_open(db_settings: Settings):
    schema = items_schema(db_settings.embedding_dim)
    undeclared = pa.schema([field.remove_metadata() for field in schema])
    db = lancedb.connect(db_settings.lancedb_uri)
    db.create_table(ITEMS, schema=undeclared)
    assert not db.open_table(ITEMS).schema.field("item_id").metadata

    assert not open_table(db, ITEMS, schema, create=False).schema.field("item_id").metadata  # a reader writes nothing
    open_table(db, ITEMS, schema, create=True)
    declared = db.open_table(ITEMS).schema.field("item_id").metadata
    assert {k.decode(): v.decode() for k, v in declared.items()} == PRIMARY_KEY
