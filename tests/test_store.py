"""store.Store against a real LanceDB directory (tmp_path)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from hymirec.errors import HymirecError
from hymirec.settings import Settings
from store import Store
from store.schemas import (
    HISTORIES, INTERESTS, ITEMS, histories_schema, interests_schema, items_schema, shard_table,
)


DIM = Settings.model_fields["embedding_dim"].default  # db_settings keeps the default width


def item_rows(n: int, dim: int, *, seed: int = 0, start: int = 0, text: str = "item") -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"item_id": f"i{start + i}", "text": f"{text} {start + i}", "category": f"c{i % 3}", "ts": i,
         "vector": rng.standard_normal(dim).astype(np.float32)}
        for i in range(n)
    ]


def history_row(user: str, items: list[str], offset: int) -> dict:
    return {"user_id": user, "history_item_ids": items, "recent_item_ids": items[-2:],
            "history_codes": bytes(range(len(items))), "event_count": len(items), "last_ts": 100 + offset,
            "watermark_partition": 0, "watermark_offset": offset, "recent_event_ids": [f"e{offset}"]}


def snapshot(table: pa.Table, key: str) -> list[dict]:
    """Rows sorted by key, without updated_at (it is the write time)."""
    rows = table.drop_columns(["updated_at"]).to_pylist()
    return sorted(rows, key=lambda row: row[key])


@pytest.fixture
def store(db_settings) -> Store:
    return Store(db_settings)


def test_connects_to_the_configured_uri_and_starts_empty(store, db_settings):
    assert store.db.uri == db_settings.lancedb_uri
    assert store.table_counts() == {}
    assert store.get_items(["x"]) == {} and store.get_histories(["u"]) == {}
    assert store.all_items().schema.equals(items_schema(db_settings.embedding_dim))
    assert store.all_items(["item_id"]).column_names == ["item_id"]


def test_items_upsert_and_read(store, db_settings):
    dim = db_settings.embedding_dim
    rows = item_rows(20, dim)
    assert store.upsert_items(rows) == 20
    got = store.get_items(["i3", "i7", "missing"])
    assert set(got) == {"i3", "i7"}
    np.testing.assert_array_equal(np.asarray(got["i3"]["vector"], np.float32), rows[3]["vector"])
    assert got["i7"]["category"] == "c1" and got["i7"]["codes"] is None and got["i7"]["updated_at"] is not None
    table = store.all_items()
    assert table.schema.equals(items_schema(dim)) and table.num_rows == 20
    ids = store.all_items(["item_id"])
    assert ids.column_names == ["item_id"] and sorted(ids["item_id"].to_pylist()) == sorted(r["item_id"] for r in rows)
    with pytest.raises(HymirecError, match="unknown column"):
        store.all_items(["item_id", "colour"])


def test_item_without_vector_is_recorded(store):
    store.upsert_items([{"item_id": "new", "text": "no model yet"}])
    assert store.get_items(["new"])["new"]["vector"] is None


def test_same_batch_twice_is_idempotent(store, db_settings):
    rows = item_rows(50, db_settings.embedding_dim)
    store.upsert_items(rows)
    first = snapshot(store.all_items(), "item_id")
    store.upsert_items(rows)
    assert store.table_counts()[ITEMS] == 50
    assert snapshot(store.all_items(), "item_id") == first

    histories = [history_row(f"u{i}", ["a", "b", "c"], i) for i in range(10)]
    store.upsert_histories(1, histories)
    before = snapshot(store.table(shard_table(HISTORIES, 1)).to_arrow(), "user_id")
    store.upsert_histories(1, histories)
    assert store.table_counts()[shard_table(HISTORIES, 1)] == 10
    assert snapshot(store.table(shard_table(HISTORIES, 1)).to_arrow(), "user_id") == before


def test_update_replaces_existing_row(store, db_settings):
    dim = db_settings.embedding_dim
    store.upsert_items(item_rows(5, dim, seed=1))
    changed = item_rows(2, dim, seed=2, start=3, text="changed")  # i3, i4 again, plus nothing new
    store.upsert_items(changed + item_rows(1, dim, start=5))
    got = store.get_items([f"i{i}" for i in range(6)])
    assert store.table_counts()[ITEMS] == 6
    assert [got[f"i{i}"]["text"] for i in range(6)] == ["item 0", "item 1", "item 2", "changed 3", "changed 4", "item 5"]
    np.testing.assert_array_equal(np.asarray(got["i4"]["vector"], np.float32), changed[1]["vector"])


def test_duplicate_keys_in_one_batch_last_wins(store):
    batch = [{"item_id": "a", "text": "first"}, {"item_id": "b", "text": "b"}, {"item_id": "a", "text": "last"}]
    assert store.upsert_items(batch) == 2
    assert store.table_counts()[ITEMS] == 2
    assert store.get_items(["a"])["a"]["text"] == "last"


def test_arrow_table_input_with_missing_columns(store, db_settings):
    dim = db_settings.embedding_dim
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(3 * dim, np.float64)), dim)
    store.upsert_items(pa.table({"item_id": ["x", "y", "x"], "text": ["1", "2", "3"], "vector": vectors}))
    got = store.get_items(["x", "y"])
    assert got["x"]["text"] == "3" and got["y"]["category"] is None
    assert got["y"]["vector"] == [1.0] * dim


def test_histories_and_interests_sharded(store, db_settings):
    dim, k = db_settings.embedding_dim, db_settings.num_interests
    store.upsert_histories(0, [history_row("alice", ["a", "b"], 5)])
    store.upsert_histories(3, [history_row("bob", ["c", "d", "e"], 9)])
    assert store.shards(HISTORIES) == [0, 3]
    both = store.get_histories(["alice", "bob", "carol"])
    assert set(both) == {"alice", "bob"}
    assert both["bob"]["history_codes"] == bytes([0, 1, 2]) and both["bob"]["watermark_offset"] == 9
    assert both["alice"]["recent_item_ids"] == ["a", "b"]
    assert store.get_histories(["alice", "bob"], shard=3).keys() == {"bob"}
    assert store.get_histories(["alice"], shard=7) == {}

    vectors = np.linalg.qr(np.random.default_rng(0).standard_normal((dim, k)))[0].T.astype(np.float32)
    store.upsert_interests(2, [{"user_id": "bob", "interests": vectors, "model_version": "v0001"}])
    got = store.get_interests(["bob", "alice"])
    assert got.keys() == {"bob"} and got["bob"]["model_version"] == "v0001"
    np.testing.assert_allclose(np.asarray(got["bob"]["interests"]), vectors)
    assert store.shards(INTERESTS) == [2]
    assert store.table(shard_table(INTERESTS, 2)).schema.equals(interests_schema())
    assert store.table(shard_table(HISTORIES, 0)).schema.equals(histories_schema())


def test_user_in_two_shards_newest_wins(store):
    store.upsert_histories(0, [history_row("alice", ["old"], 1)])
    store.upsert_histories(1, [history_row("alice", ["old", "new"], 2)])
    assert store.get_histories(["alice"])["alice"]["history_item_ids"] == ["old", "new"]


def test_many_ids_and_awkward_keys(store):
    keys = ["it's", 'quo"te', "back\\slash", "semi;colon --", "ünï", "a b", "%", "_"]
    store.upsert_items([{"item_id": key, "text": key} for key in keys])
    store.upsert_items([{"item_id": f"n{i}", "text": ""} for i in range(2500)])
    assert {k: v["text"] for k, v in store.get_items(keys).items()} == {k: k for k in keys}
    wanted = [f"n{i}" for i in range(0, 2500, 2)]  # more ids than one IN list holds
    assert store.get_items(wanted).keys() == set(wanted)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"item_id": "a", "vector": [0.0] * 3}], "row 0 (item_id='a')"),
        ([{"item_id": "a"}, {"item_id": "b", "vector": ["x"] * DIM}], "row 1 (item_id='b')"),
        ([{"item_id": None, "text": "t"}], "item_id must not be null"),
        ([{"text": "no key"}], "item_id must not be null"),
        ([{"item_id": "a", "colour": "red"}], "unknown column"),
        ([{"item_id": "a"}, {"item_id": "n", "vector": [float("nan")] * DIM}], "row 1 (item_id='n'): vector has NaN"),
        ([{"item_id": 5}], "row 0"),
        (["not a dict"], "expected a dict"),
        (pa.table({"item_id": ["a"], "vector": pa.array([[1.0, 2.0]])}), "bad items table"),
    ],
)
def test_bad_item_rows_are_rejected_clearly(store, rows, message):
    with pytest.raises(HymirecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        store.upsert_items(rows)
    assert store.table_counts().get(ITEMS, 0) == 0  # nothing half-written


def test_wrong_interest_width_is_rejected(store, db_settings):
    dim = db_settings.embedding_dim
    good = {"user_id": "a", "interests": np.ones((2, dim), np.float32)}
    bad = {"user_id": "b", "interests": [[1.0] * dim, [1.0] * (dim - 1)]}
    with pytest.raises(HymirecError, match=rf"row 1 \(user_id='b'\).*width {dim}.*got {dim - 1}"):
        store.upsert_interests(0, [good, bad])
    with pytest.raises(HymirecError, match="row 0 .*interests has NaN or inf"):
        store.upsert_interests(0, [{"user_id": "c", "interests": [[np.inf] * dim]}])
    assert store.upsert_interests(0, [good]) == 1


def test_bad_shard_is_rejected(store):
    for shard in (-1, 1000, True, "1"):
        with pytest.raises(ValueError):
            store.upsert_histories(shard, [history_row("a", ["x"], 0)])


def test_other_embedding_dim_is_a_clear_error(store, db_settings):
    store.upsert_items([{"item_id": "a", "vector": [0.0] * db_settings.embedding_dim}])
    other = Store(db_settings.model_copy(update={"embedding_dim": db_settings.embedding_dim + 1}))
    with pytest.raises(HymirecError, match="embedding_dim"):
        other.get_items(["a"])


def test_scalar_index_on_key_after_upsert(store):
    store.upsert_items([{"item_id": "a"}])
    store.upsert_histories(4, [history_row("u", ["a"], 0)])
    for name, key in [(ITEMS, "item_id"), (shard_table(HISTORIES, 4), "user_id")]:
        indices = list(store.table(name).list_indices())
        assert [(idx.columns, idx.index_type) for idx in indices] == [([key], "BTree")]
    # A fresh Store on the same directory finds the index instead of adding a second one.
    again = Store(store.settings)
    again.upsert_items([{"item_id": "b"}])
    assert len(list(again.table(ITEMS).list_indices())) == 1


def test_optimize_folds_small_writes(store, db_settings):
    dim = db_settings.embedding_dim
    for i in range(12):
        store.upsert_items(item_rows(10, dim, seed=i, start=5 * i))  # half new, half updates
        store.upsert_histories(0, [history_row(f"u{i}", ["a"], i)])
    items_table = store.table(ITEMS)
    before = items_table.stats()["fragment_stats"]["num_fragments"]
    expected = snapshot(store.all_items(), "item_id")
    lines = store.optimize()
    after = items_table.stats()["fragment_stats"]["num_fragments"]
    assert before > 1 and after < before
    assert snapshot(store.all_items(), "item_id") == expected
    assert store.table_counts() == {ITEMS: 65, shard_table(HISTORIES, 0): 12}
    assert any(line.startswith(f"items: 65 rows, fragments {before} -> {after}") for line in lines)
    assert len(lines) == 2
    assert store.get_items(["i64"])["i64"]["text"] == "item 64"


def test_optimize_named_tables_only(store):
    store.upsert_items([{"item_id": "a"}])
    store.upsert_histories(0, [history_row("u", ["a"], 0)])
    lines = store.optimize([shard_table(HISTORIES, 0)])
    assert len(lines) == 1 and lines[0].startswith("user_histories_p000: 1 rows")
    with pytest.raises(HymirecError, match="no table"):
        store.optimize([shard_table(HISTORIES, 9)])


def test_get_interests_reads_only_the_columns_asked_for(db_settings):
    store = Store(db_settings)
    vec = np.zeros((db_settings.num_interests, db_settings.embedding_dim), dtype=np.float32)
    store.upsert_interests(0, [{"user_id": "u1", "interests": vec, "model_version": "v0001", "updated_at": None}])
    full = store.get_interests(["u1"], shard=0)["u1"]
    slim = store.get_interests(["u1"], shard=0, columns=["model_version"])["u1"]
    assert "interests" in full
    assert set(slim) == {"user_id", "model_version", "updated_at"}
    assert slim["updated_at"] == full["updated_at"] and slim["model_version"] == "v0001"
