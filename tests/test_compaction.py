"""When a writer compacts its shards between writes: the budget's arithmetic, then a Store and an
Ingestor on a real LanceDB directory."""

from __future__ import annotations

import asyncio

import numpy as np

from store import Store
from store.compaction import CompactionBudget
from store.schemas import HISTORIES, INTERESTS, shard_table
from stream.ingestor import Ingestor

from helpers import RecordingKafka as Kafka, click

P0, P1 = shard_table(HISTORIES, 0), shard_table(HISTORIES, 1)


def wrote(budget: CompactionBudget, name: str, times: int) -> None:
    for _ in range(times):
        budget.wrote(name)


def test_a_table_is_due_after_enough_writes_the_most_written_first():
    budget = CompactionBudget(share=0.1, min_writes=3)
    wrote(budget, P0, 2)
    assert budget.due(0.0, {P0, P1}) is None
    wrote(budget, P1, 4)
    wrote(budget, P0, 1)
    assert budget.due(0.0, {P0, P1}) == P1
    assert budget.due(0.0, {P0}) == P0  # a shard no longer owned is never compacted
    assert budget.due(0.0, set()) is None


def test_after_a_compaction_the_table_waits_in_proportion_to_what_it_cost():
    budget = CompactionBudget(share=0.25, min_writes=1)
    wrote(budget, P0, 5)
    budget.compacted(P0, started=10.0, finished=12.0)  # 2 s: 25% of the next 8 s, so paused for 6 s
    wrote(budget, P0, 5)
    assert budget.due(17.9, {P0}) is None
    assert budget.due(18.0, {P0}) == P0
    budget.compacted(P0, started=20.0, finished=20.5)
    assert budget.due(30.0, {P0}) is None  # no writes since


def test_share_zero_leaves_compaction_to_the_timer():
    budget = CompactionBudget(share=0.0, min_writes=1)
    wrote(budget, P0, 50)
    assert budget.due(1e9, {P0}) is None


def fragments(store: Store, name: str) -> int:
    return store.table(name).stats()["fragment_stats"]["num_fragments"]


def test_store_compacts_a_due_shard_and_keeps_every_row(db_settings):
    store = Store(db_settings.model_copy(update={"compact_share": 0.5}))
    for k in range(store.compaction.min_writes):  # new users each time: every write adds a fragment
        store.upsert_histories(0, [{"user_id": f"u{k}", "history_item_ids": [str(k)], "recent_item_ids": [str(k)],
                                    "recent_event_ids": [], "event_count": 1, "watermark_partition": 0,
                                    "watermark_offset": k}], position=k)
    before = fragments(store, P0)
    assert store.compact_due([P1]) is None  # not the caller's
    line = store.compact_due([P0])
    assert line is not None and line.startswith(f"{P0}: {store.compaction.min_writes + 1} rows, fragments {before} -> ")
    assert fragments(store, P0) < before
    assert store.compact_due([P0]) is None  # nothing written since
    rows = store.get_histories([f"u{k}" for k in range(store.compaction.min_writes)], shard=0)
    assert [rows[f"u{k}"]["history_item_ids"] for k in range(len(rows))] == [[str(k)] for k in range(len(rows))]
    assert store.positions([0]) == {0: store.compaction.min_writes - 1}


def test_interest_writes_count_towards_their_shard(db_settings):
    store = Store(db_settings.model_copy(update={"compact_share": 0.5}))
    vec = np.zeros((db_settings.num_interests, db_settings.embedding_dim), dtype=np.float32)
    for k in range(store.compaction.min_writes):
        store.upsert_interests(3, [{"user_id": f"u{k}", "interests": vec, "model_version": "v0001", "updated_at": None}])
    assert store.compact_due([shard_table(INTERESTS, 3)]).startswith(f"{shard_table(INTERESTS, 3)}: ")


def test_the_ingestor_compacts_its_shard_between_micro_batches(db_settings):
    settings = db_settings.model_copy(update={"compact_share": 0.5})
    ingestor = Ingestor(settings)
    kafka = Kafka(owned=(0,))
    writes = ingestor.store.compaction.min_writes + 2

    async def run():
        async def send_dead(records):
            pass

        for k in range(writes):  # each a partial micro-batch: written at once
            await ingestor.interactions([click(f"u{k}", str(k), k, offset=k)], send_dead, kafka)

    try:
        asyncio.run(run())
    finally:
        ingestor.close()
    assert fragments(ingestor.store, P0) < writes  # one write, one fragment, without a compaction
    assert ingestor.store.compaction.writes[P0] == writes - ingestor.store.compaction.min_writes
    rows = ingestor.store.get_histories([f"u{k}" for k in range(writes)])
    assert {u: r["history_item_ids"] for u, r in rows.items()} == {f"u{k}": [str(k)] for k in range(writes)}
    assert kafka.commits[-1] == {0: writes}
