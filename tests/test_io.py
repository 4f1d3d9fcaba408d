"""Reading logs and catalogues (JSONL, CSV, Parquet): same frames, contract enforced, file order kept."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from hymirec.errors import HymirecError
from store.events import parse_interaction
from store.logs import iter_interactions, read_interactions, read_items, write_jsonl

ROWS = [
    {"user_id": "u1", "item_id": "42", "ts": 1_000, "action": "rate", "event_id": "e1"},
    {"user_id": 7, "item_id": 42, "ts": 3_000, "action": "click", "event_id": None},  # numeric ids
    {"user_id": "u1", "item_id": "a-b", "ts": 2_000},  # out of ts order, no action, no event_id
    {"user_id": "007", "item_id": "x", "ts": 0, "action": "purchase", "event_id": 99},
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "log.jsonl"
    write_jsonl(path, ROWS)
    return path


def test_jsonl_follows_the_contract_in_file_order(log: Path):
    frame = read_interactions(log)
    expected = [parse_interaction(row) for row in ROWS]
    assert frame.to_dict("records") == [m.model_dump() for m in expected]
    assert list(frame.user_id) == ["u1", "7", "u1", "007"]  # numeric ids become strings
    assert list(frame.ts) == [1_000, 3_000, 2_000, 0]  # file order, not time order
    assert list(frame.action) == ["rate", "click", "click", "purchase"]  # the contract's default
    assert list(frame.event_id) == ["e1", None, None, "99"]
    assert str(frame.ts.dtype) == "int64" and frame.user_id.dtype == "str"


def test_csv_and_parquet_round_trips_give_equal_frames(log: Path, tmp_path: Path):
    frame = read_interactions(log)
    csv, parquet, gz = tmp_path / "log.csv", tmp_path / "log.parquet", tmp_path / "log.jsonl.gz"
    frame.to_csv(csv, index=False)
    frame.to_parquet(parquet)
    gz.write_bytes(gzip.compress(log.read_bytes()))
    for path in (csv, parquet, gz):
        pd.testing.assert_frame_equal(read_interactions(path), frame, obj=path.name)


def test_csv_keeps_ids_as_written_and_reads_empty_cells_as_absent(tmp_path: Path):
    path = write_lines(tmp_path / "log.csv", ["user_id,item_id,ts,action,event_id", "007,1,5,,", "8,2,6,like,e"])
    frame = read_interactions(path)
    assert list(frame.user_id) == ["007", "8"]
    assert list(frame.action) == ["click", "like"]
    assert list(frame.event_id) == [None, "e"]


def test_parquet_integer_ids_and_timestamp_column(tmp_path: Path):
    path = tmp_path / "log.parquet"
    pd.DataFrame({
        "user_id": [5, 6], "item_id": [10, 11],
        "ts": pd.to_datetime([1_000, 2_500], unit="ms"),  # a timestamp column: read as epoch ms
    }).to_parquet(path)
    frame = read_interactions(path)
    assert list(frame.user_id) == ["5", "6"] and list(frame.item_id) == ["10", "11"]
    assert list(frame.ts) == [1_000, 2_500]


@pytest.mark.parametrize("bad, reason", [
    ('{"user_id": "u", "item_id": "i", "ts": 1.5}', "ts"),
    ('{"user_id": "u", "item_id": "i", "ts": -1}', "greater than or equal"),
    ('{"user_id": true, "item_id": "i", "ts": 1}', "user_id"),
    ('{"user_id": "u", "item_id": "i", "ts": 1, "action": "teleport"}', "unknown action"),
    ('{"user_id": "u", "item_id": "i", "ts": 1, "action": null}', "action"),
    ('{"user_id": "u", "ts": 1}', "item_id"),
    ('{"user_id": "u", "item_id": "", "ts": 1}', "item_id"),
    ('{"user_id": "u", "item_id": "i", "ts": 1', "invalid_json"),
    ('["u", "i", 1]', "not_an_object"),
])
def test_a_bad_row_names_file_line_and_reason(tmp_path: Path, bad: str, reason: str):
    good = json.dumps(ROWS[0])
    path = write_lines(tmp_path / "bad.jsonl", [good, "", good, bad, good])
    with pytest.raises(HymirecError) as info:
        read_interactions(path)
    message = str(info.value)
    assert str(path) in message and "line 4:" in message  # the blank line 2 counts as a line
    assert reason in message


def test_bad_csv_and_parquet_rows_name_the_row(tmp_path: Path):
    csv = write_lines(tmp_path / "bad.csv", ["user_id,item_id,ts", "u,i,1", "u,i,soon"])
    with pytest.raises(HymirecError, match=r"bad\.csv, row 2: invalid_fields: ts"):
        read_interactions(csv)
    parquet = tmp_path / "bad.parquet"
    pd.DataFrame({"user_id": ["u", None], "item_id": ["i", "j"], "ts": [1, 2]}).to_parquet(parquet)
    with pytest.raises(HymirecError, match=r"bad\.parquet, row 2: invalid_fields: user_id"):
        read_interactions(parquet)
    no_ts = write_lines(tmp_path / "nots.csv", ["user_id,item_id", "u,i"])
    with pytest.raises(HymirecError, match="no ts column"):
        read_interactions(no_ts)


def test_invalid_utf8_and_unknown_format_are_errors(tmp_path: Path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"user_id": "caf\xe9", "item_id": "i", "ts": 1}\n')
    with pytest.raises(HymirecError, match="line 1: bad_encoding"):
        read_interactions(path)
    with pytest.raises(HymirecError, match="unknown format"):
        read_interactions(tmp_path / "log.txt")
    with pytest.raises(HymirecError, match="no such file"):
        read_interactions(tmp_path / "missing.jsonl")


def test_chunks_limit_and_empty_file(tmp_path: Path):
    path = tmp_path / "many.jsonl"
    rows = [{"user_id": f"u{i % 7}", "item_id": str(i), "ts": i} for i in range(25)]
    write_jsonl(path, rows)
    chunks = list(iter_interactions(path, chunk_rows=10))
    assert [len(c) for c in chunks] == [10, 10, 5]
    whole = pd.concat(chunks, ignore_index=True)
    assert list(whole.item_id) == [str(i) for i in range(25)]
    assert list(read_interactions(path, limit=12).item_id) == [str(i) for i in range(12)]
    empty = write_lines(tmp_path / "empty.jsonl", [])
    assert read_interactions(empty).empty and list(read_interactions(empty).columns) == list(whole.columns)


def test_items_all_formats(tmp_path: Path):
    path = tmp_path / "items.jsonl"
    write_jsonl(path, [
        {"item_id": 1, "text": "Toy Story (1995) | Animation", "category": "Animation", "ts": None},
        {"item_id": "2", "text": "", "ts": 5},  # empty text and no category are allowed
    ])
    items = read_items(path)
    assert list(items.item_id) == ["1", "2"]
    assert list(items.category) == ["Animation", None]
    assert items.ts.isna().tolist() == [True, False] and items.ts.iloc[1] == 5
    items.to_parquet(tmp_path / "items.parquet")
    pd.testing.assert_frame_equal(read_items(tmp_path / "items.parquet"), items)
    bad = write_lines(tmp_path / "bad_items.jsonl", ['{"item_id": "1", "text": "a"}', '{"item_id": "2", "category": "x"}'])
    with pytest.raises(HymirecError, match=r"line 2: invalid_fields: text"):
        read_items(bad)


TRICKY = {
    "user_id": ["u", 5, -3, True, 1.0, "", "x" * 256, "x" * 257, None, [1]],
    "ts": [0, 4_102_444_800_000, 4_102_444_800_001, -1, True, 1.0, "5", None, 2**70],
    "action": ["click", "share", "Click", "", None, 3],
    "event_id": [None, "e", 0, "", False, "y" * 257],
}


def test_column_check_agrees_with_the_contract_row_by_row(tmp_path: Path):
    """Every tricky value: the reader accepts exactly what parse_interaction accepts, with its values."""
    base = {"user_id": "u", "item_id": "i", "ts": 1}
    cases = [{**base, field: value} for field, values in TRICKY.items() for value in values]
    cases += [{k: v for k, v in base.items() if k != "ts"}, {**base, "extra": {"nested": 1}}]
    for i, row in enumerate(cases):
        path = tmp_path / f"case{i}.jsonl"
        write_jsonl(path, [row])
        try:
            expected = parse_interaction(row).model_dump()
        except ValueError:
            expected = None
        try:
            got = read_interactions(path).to_dict("records")[0]
        except HymirecError:
            got = None
        assert got == expected, row
