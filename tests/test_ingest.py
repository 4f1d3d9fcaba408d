"""The ingest path on a real LanceDB directory, no broker: validation, dedupe, bounds, sharding, codes."""

from __future__ import annotations

import asyncio
import json

import pytest

from store import Store
from store.schemas import HISTORIES, shard_table
from stream.ingest import Gap, ItemCache, RawEvent, apply_interactions, apply_items
import stream.ingestor
from stream.ingestor import Ingestor

from helpers import RecordingKafka as Kafka, click


def catalogue(item: str, text: str, *, offset: int, category: str | None = "Drama") -> RawEvent:
    payload = {"item_id": item, "text": text, "category": category}
    return RawEvent(json.dumps(payload).encode(), item.encode(), 0, offset)


class Codes:
    """A stand-in for the model side's encoder: two code bytes per item it knows."""

    def __init__(self, known: set[str], version: str = "v1"):
        self.known, self.version = known, version

    def codes_for(self, item_ids):
        return {i: bytes([int(i) % 256, 7]) for i in item_ids if i in self.known}


@pytest.fixture
def store(db_settings):
    return Store(db_settings)


def test_replayed_batch_applies_nothing_the_second_time(store, db_settings):
    batch = [click(f"u{i % 3}", str(i), 1000 + i, offset=i) for i in range(12)]
    first = apply_interactions(store, db_settings, batch)
    rows = store.get_histories(["u0", "u1", "u2"])
    second = apply_interactions(store, db_settings, batch)

    assert (first.applied, first.duplicates) == (12, 0)
    # Every offset is at or below the shard's stored position: skipped before any user row is looked at.
    assert (second.applied, second.already_applied, second.duplicates, second.touched) == (0, 12, 0, {})
    after = store.get_histories(["u0", "u1", "u2"])
    for user in ("u0", "u1", "u2"):
        expected = [str(i) for i in range(12) if f"u{i % 3}" == user]
        assert after[user]["history_item_ids"] == expected
        assert after[user]["event_count"] == 4
        assert after[user]["updated_at"] == rows[user]["updated_at"]  # not rewritten
    assert after["u2"]["watermark_offset"] == 11 and after["u2"]["last_ts"] == 1011


def test_event_id_resent_under_new_offset_counts_once(store, db_settings):
    apply_interactions(store, db_settings, [click("u", "1", 1, offset=0, event_id="e1")])
    result = apply_interactions(store, db_settings, [
        click("u", "1", 1, offset=1, event_id="e1"),  # producer retry, new offset
        click("u", "2", 2, offset=2, event_id="e2"),
        click("u", "2", 2, offset=3, event_id="e2"),  # duplicate inside one batch
        click("u", "3", 3, offset=4),                 # no event id: offset dedupe only
    ])
    assert (result.applied, result.duplicate_event_ids, result.duplicate_offsets) == (2, 2, 0)
    row = store.get_histories(["u"])["u"]
    assert row["history_item_ids"] == ["1", "2", "3"]
    assert row["event_count"] == 3
    assert row["recent_event_ids"] == ["e1", "e2"]


def test_bad_payloads_are_dead_lettered_and_good_ones_around_them_applied(store, db_settings):
    topic = db_settings.topic_interactions
    bad = {
        1: RawEvent(b"{not json", b"u", 0, 1),
        2: RawEvent(b"\xff\xfe\x00garbage", b"u", 0, 2),
        3: RawEvent(json.dumps({"user_id": "u", "item_id": "9", "ts": "yesterday"}).encode(), b"u", 0, 3),
        4: RawEvent(json.dumps({"user_id": "u", "item_id": "9", "ts": 5, "action": "teleport"}).encode(), b"u", 0, 4),
        5: RawEvent(None, b"u", 0, 5),
        6: click("u", "9", 6, offset=6, key="someone-else"),
        7: click("u", "9", 7, offset=7, key=None),
        8: RawEvent(b"[1, 2]", b"u", 0, 8),
    }
    good = [click("u", "1", 0, offset=0), click("u", "2", 9, offset=9)]
    result = apply_interactions(store, db_settings, sorted([*good, *bad.values()], key=lambda e: -e.offset))

    assert result.applied == 2
    reasons = {record["source"]["offset"]: record["reason"] for record in result.dead}
    assert reasons == {1: "invalid_json", 2: "bad_encoding", 3: "invalid_fields", 4: "invalid_fields",
                       5: "empty", 6: "key_mismatch", 7: "key_mismatch", 8: "not_an_object"}
    by_offset = {record["source"]["offset"]: record for record in result.dead}
    assert by_offset[2]["payload_encoding"] == "hex"
    assert bytes.fromhex(by_offset[2]["payload"]) == bad[2].value  # the raw bytes survive
    assert by_offset[1]["payload"] == "{not json"
    assert by_offset[4]["fields"] == ["action"]
    assert all(r["source"]["topic"] == topic and r["source"]["partition"] == 0 for r in result.dead)
    assert store.get_histories(["u"])["u"]["history_item_ids"] == ["1", "2"]


def test_histories_and_recent_windows_are_bounded(store, db_settings):
    settings = db_settings.model_copy(update={"history_max_len": 5, "recent_len": 3, "dedupe_window": 4})
    items = [str(i) for i in range(13)]
    apply_interactions(store, settings, [click("u", it, i, offset=i, event_id=f"e{i}") for i, it in enumerate(items[:8])])
    apply_interactions(store, settings, [click("u", it, i, offset=i, event_id=f"e{i}") for i, it in enumerate(items) if i >= 8])
    row = store.get_histories(["u"])["u"]
    assert row["history_item_ids"] == items[-5:]
    assert row["recent_item_ids"] == items[-3:]
    assert row["recent_event_ids"] == ["e9", "e10", "e11", "e12"]
    assert row["event_count"] == 13


def test_partitions_write_their_own_shards(store, db_settings):
    batch = [click("a", "1", 1, partition=0, offset=0), click("b", "2", 2, partition=1, offset=0),
             click("a", "3", 3, partition=0, offset=1), click("b", "4", 4, partition=1, offset=1)]
    result = apply_interactions(store, db_settings, batch)
    assert result.touched == {0: ["a"], 1: ["b"]}
    assert store.shards(HISTORIES) == [0, 1]
    assert store.get_histories(["a", "b"], shard=0).keys() == {"a"}
    assert store.get_histories(["a", "b"], shard=1).keys() == {"b"}
    rows = store.get_histories(["a", "b"])
    assert rows["a"]["history_item_ids"] == ["1", "3"] and rows["a"]["watermark_partition"] == 0
    assert rows["b"]["history_item_ids"] == ["2", "4"] and rows["b"]["watermark_partition"] == 1
    # Offsets are per partition: offset 1 of partition 1 is new even though partition 0 reached 1.
    again = apply_interactions(store, db_settings, [click("b", "5", 5, partition=1, offset=2)])
    assert again.applied == 1


def test_unknown_items_are_recorded_and_counted(store, db_settings):
    assert apply_items(store, db_settings, [catalogue("1", "One", offset=0)]).upserted == 1
    cache = ItemCache()
    cache.refresh(store)
    result = apply_interactions(store, db_settings, [click("u", "1", 1, offset=0), click("u", "2", 2, offset=1)],
                                known_items=cache)
    assert (result.applied, result.unknown_items) == (2, 1)
    assert store.get_histories(["u"])["u"]["history_item_ids"] == ["1", "2"]


def test_items_upsert_new_and_changed_only(store, db_settings):
    first = apply_items(store, db_settings, [
        catalogue("1", "One", offset=0), catalogue("2", "Two", offset=1),
        RawEvent(b'{"item_id": "3"}', b"3", 0, 2),          # no text
        catalogue("1", "One (1996)", offset=3),             # later event for the same item wins
    ])
    assert (first.upserted, first.unchanged) == (2, 0)
    assert [(r["reason"], r["source"]["offset"]) for r in first.dead] == [("invalid_fields", 2)]
    assert store.get_items(["1"])["1"]["text"] == "One (1996)"

    vec = [0.5] * db_settings.embedding_dim
    store.upsert_items([{**store.get_items(["2"])["2"], "vector": vec, "codes": b"\x01", "model_version": "v1"}])
    second = apply_items(store, db_settings, [catalogue("2", "Two", offset=4), catalogue("1", "One (1996)", offset=5)])
    assert (second.upserted, second.unchanged) == (0, 2)
    assert store.get_items(["2"])["2"]["model_version"] == "v1"  # a resend keeps the embedding

    third = apply_items(store, db_settings, [catalogue("2", "Two", offset=6, category="Comedy")])
    assert third.upserted == 1
    changed = store.get_items(["2"])["2"]
    assert (changed["category"], changed["vector"], changed["codes"], changed["model_version"]) == ("Comedy", None, None, None)
    assert store.table_counts()["items"] == 2


def test_codes_stay_aligned_with_ids(store, db_settings):
    settings = db_settings.model_copy(update={"history_max_len": 4})

    def history():
        row = store.get_histories(["u"])["u"]
        return row["history_item_ids"], row["history_codes"], row["codebook_version"]

    def expected_codes(ids):
        return b"".join(bytes([int(i), 7]) for i in ids)

    apply_interactions(store, settings, [click("u", "1", 1, offset=0), click("u", "2", 2, offset=1)])
    assert history() == (["1", "2"], None, None)  # no model yet: ids only

    encoder = Codes({"1", "2", "3", "4", "5", "6"})
    apply_interactions(store, settings, [click("u", "3", 3, offset=2)], encoder=encoder)
    assert history() == (["1", "2", "3"], expected_codes(["1", "2", "3"]), "v1")  # re-encoded whole

    apply_interactions(store, settings, [click("u", "4", 4, offset=3), click("u", "5", 5, offset=4)], encoder=encoder)
    assert history() == (["2", "3", "4", "5"], expected_codes(["2", "3", "4", "5"]), "v1")  # appended, trimmed

    apply_interactions(store, settings, [click("u", "99", 6, offset=5)], encoder=encoder)
    assert history() == (["3", "4", "5", "99"], None, None)  # item without codes: row waits for re-encoding

    apply_interactions(store, settings, [click("u", "6", 7, offset=6)], encoder=Codes(encoder.known | {"99"}, "v2"))
    assert history() == (["4", "5", "99", "6"], expected_codes(["4", "5", "99", "6"]), "v2")


def test_ingestor_retries_the_dead_letter_send_and_counts(db_settings):
    ingestor = Ingestor(db_settings)
    sent: list[list[dict]] = []
    failures = iter([ConnectionError("broker away")])

    async def send_dead(records):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        sent.append(records)

    batch = [click("u", "1", 1, offset=0), RawEvent(b"nope", b"u", 0, 1), click("u", "2", 2, offset=2)]

    async def run():
        await ingestor.refresh_items()
        return await ingestor.interactions(batch, send_dead, Kafka())

    try:
        result = asyncio.run(run())
    finally:
        ingestor.close()
    assert result.applied == 2
    assert [[r["source"]["offset"] for r in records] for records in sent] == [[1]]
    totals = ingestor.metrics.totals()
    assert (totals["events_in"], totals["events_applied"], totals["dead_lettered"], totals["store_retries"]) == (3, 2, 1, 1)
    assert totals["unknown_items"] == 2  # the catalogue is empty
    assert b'hymirec_dead_lettered_total{reason="invalid_json",topic="interactions"} 1.0' in ingestor.metrics.render()


def test_optimize_compacts_only_the_given_shards(db_settings):
    ingestor = Ingestor(db_settings)
    store = ingestor.store
    for k in range(4):  # new users each time: every batch inserts a fragment
        apply_interactions(store, db_settings, [click(f"a{k}", str(k), k, partition=0, offset=k),
                                                click(f"b{k}", str(k), k, partition=1, offset=k)])

    def fragments(shard):
        table = store.db.open_table(shard_table(HISTORIES, shard))
        return table.stats()["fragment_stats"]["num_fragments"]

    before = {0: fragments(0), 1: fragments(1)}
    try:
        asyncio.run(ingestor.optimize({0, 7}, items=True))  # shard 7 and items do not exist: skipped
    finally:
        ingestor.close()
    assert fragments(0) < before[0]
    assert fragments(1) == before[1] > 1
    rows = store.get_histories([f"a{k}" for k in range(4)], shard=0)
    assert [rows[f"a{k}"]["history_item_ids"] for k in range(4)] == [["0"], ["1"], ["2"], ["3"]]


# --- applied positions stored with the shards ---------------------------------------------------------------
def test_the_position_is_written_with_the_rows_and_covers_dead_letters(store, db_settings):
    batch = [click("u", "1", 1, offset=0), click("v", "2", 2, offset=1), RawEvent(b"nope", b"u", 0, 2)]
    first = apply_interactions(store, db_settings, batch)
    assert store.positions() == {0: 2}  # the trailing bad event counts: it is dead-lettered by then
    assert [r["source"]["offset"] for r in first.dead] == [2]
    # The position row is no user: readers of the shard never see it.
    assert store.table_counts() == {shard_table(HISTORIES, 0): 2}
    assert sorted(store.scan_histories(0, ["user_id"])["user_id"].to_pylist()) == ["u", "v"]
    assert set(store.get_histories(["u", "v", ""])) == {"u", "v"}

    again = apply_interactions(store, db_settings, batch + [click("u", "3", 3, offset=3)])
    assert (again.applied, again.already_applied, again.dead) == (1, 3, [])  # not dead-lettered twice
    assert store.positions() == {0: 3}
    assert store.get_histories(["u"])["u"]["history_item_ids"] == ["1", "3"]


def test_a_batch_of_only_bad_or_skipped_events_still_advances_the_position(store, db_settings):
    apply_interactions(store, db_settings, [click("u", "1", 1, offset=0)])
    result = apply_interactions(store, db_settings, [RawEvent(b"{}", b"u", 0, 1), click("u", "1", 1, offset=2, key="x")])
    assert (result.applied, len(result.dead), result.touched) == (0, 2, {})
    assert store.positions() == {0: 2}


def test_a_shard_written_before_positions_existed_is_deduplicated_by_its_users_watermarks(store, db_settings):
    store.upsert_histories(0, [{"user_id": "u", "history_item_ids": ["1", "2"], "recent_item_ids": ["1", "2"],
                                "recent_event_ids": [], "event_count": 2, "watermark_partition": 0, "watermark_offset": 1}])
    result = apply_interactions(store, db_settings, [click("u", "1", 1, offset=0), click("u", "2", 2, offset=1),
                                                     click("u", "3", 3, offset=2)])
    assert (result.applied, result.duplicate_offsets, result.already_applied) == (1, 2, 0)
    assert store.get_histories(["u"])["u"]["history_item_ids"] == ["1", "2", "3"]
    assert store.positions() == {0: 2}


def test_a_partition_that_starts_past_its_position_is_left_out_until_the_gap_is_read(store, db_settings):
    apply_interactions(store, db_settings, [click("a", "1", 1, offset=0), click("b", "1", 1, partition=1, offset=0)])
    late = [click("a", "2", 2, offset=5), click("b", "2", 2, partition=1, offset=1)]
    result = apply_interactions(store, db_settings, late)
    assert result.gaps == {0: Gap(expected=1, first=5)}
    assert (result.applied, store.positions()) == (1, {0: 0, 1: 1})  # partition 1 went on; 0 wrote nothing
    assert store.get_histories(["a"])["a"]["history_item_ids"] == ["1"]
    # A re-read that meets the same first offset again: offsets 1..4 do not exist (e.g. retention).
    accepted = apply_interactions(store, db_settings, late[:1], accepted_gaps={0: 5})
    assert (accepted.gaps, accepted.applied, store.positions()[0]) == ({}, 1, 5)


def test_ingestor_seeks_back_once_over_a_gap_and_commits_what_it_wrote(db_settings):
    ingestor = Ingestor(db_settings)
    kafka = Kafka(owned=(0, 1))

    async def nothing_dead(records):
        assert not records

    async def run():
        assert await ingestor.resume([0, 1]) == {0: 0, 1: 0}
        await ingestor.interactions([click("a", "0", 0, offset=0)], nothing_dead, kafka)
        await ingestor.interactions([click("a", "4", 4, offset=3)], nothing_dead, kafka)  # 1, 2 never came
        await ingestor.interactions([click("a", "5", 5, offset=4)], nothing_dead, kafka)  # still buffered past it
        await ingestor.interactions([click("a", str(i), i, offset=i) for i in range(1, 5)], nothing_dead, kafka)
        return await ingestor.resume([0, 1])

    try:
        resumed = asyncio.run(run())
    finally:
        ingestor.close()
    assert kafka.seeks == [(0, 1)]  # once, however many buffered batches lay past the gap
    assert kafka.commits == [{0: 1}, {0: 5}]  # the batches held at the gap wrote and committed nothing
    assert ingestor.store.get_histories(["a"])["a"]["history_item_ids"] == ["0", "1", "2", "3", "4"]
    assert resumed == {0: 5, 1: 0}
    assert ingestor.metrics.totals()["offset_gaps"] == 2


def test_ingestor_does_not_write_a_partition_revoked_while_its_batch_was_prepared(db_settings):
    ingestor = Ingestor(db_settings)

    async def nothing_dead(records):
        pass

    try:
        result = asyncio.run(ingestor.interactions([click("a", "1", 1, offset=0)], nothing_dead, Kafka(owned=())))
    finally:
        ingestor.close()
    assert result.applied == 1 and ingestor.store.positions() == {} and len(ingestor.rows) == 0


def test_ingestor_seeks_again_over_a_gap_still_held_after_a_while(db_settings, monkeypatch):
    """A re-read that never comes (lost in the consumer) must not hold the partition for good."""
    monkeypatch.setattr(stream.ingestor, "GAP_RESEEK_S", 0.0)  # "a while" has passed at every batch
    ingestor = Ingestor(db_settings)
    kafka = Kafka(owned=(0,))

    async def nothing_dead(records):
        assert not records

    async def run():
        await ingestor.resume([0])
        await ingestor.interactions([click("a", "0", 0, offset=0)], nothing_dead, kafka)
        await ingestor.interactions([click("a", "3", 3, offset=3)], nothing_dead, kafka)  # 1, 2 never came
        await ingestor.interactions([click("a", "4", 4, offset=4)], nothing_dead, kafka)  # nor after the seek
        await ingestor.interactions([click("a", str(i), i, offset=i) for i in range(1, 5)], nothing_dead, kafka)

    try:
        asyncio.run(run())
    finally:
        ingestor.close()
    assert kafka.seeks == [(0, 1), (0, 1)]
    assert ingestor.store.get_histories(["a"])["a"]["history_item_ids"] == ["0", "1", "2", "3", "4"]
