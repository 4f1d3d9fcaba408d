"""Interaction logs and item catalogues on disk, in the event contract's format.

    read_interactions("interactions.jsonl")   # user_id, item_id, ts, action, event_id, in file order
    read_items("items.parquet")               # item_id, text, category, ts
    for chunk in iter_interactions(path):      # the same, 100k rows at a time
        ...

Formats by suffix: JSON lines (``.jsonl``, ``.ndjson``, ``.json``), CSV (``.csv``, header row) and
Parquet (``.parquet``); JSON lines and CSV may be gzipped (``.jsonl.gz``, ``.csv.gz``). Every row is
held to the contract of ``store.events``: numeric ids become strings, a missing ``action`` is
"click", and a row the contract rejects stops the read with a ``HymirecError`` naming the file, the
line (JSON lines) or row (CSV, Parquet; header not counted) and the contract's reason. Nothing is
dropped silently.

The contract's pydantic parser costs ~10 µs a row, so rows are checked column-wise first and only
the rows that check does not clear go through ``parse_interaction``/``parse_item``, which either
accepts them (e.g. a missing field that has a default) or says why not. The column check accepts
a subset of what the contract accepts, never more.

CSV has no types: an empty cell is an absent field (its default applies) in the optional columns
and the empty string in the required ones, and ``ts`` cells must be whole numbers. Parquet
timestamp columns are read as epoch milliseconds.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel

from hymirec.errors import HymirecError
from store.events import (
    ACTIONS,
    MAX_ID_CHARS,
    MAX_PAYLOAD_BYTES,
    MAX_TEXT_CHARS,
    MAX_TS_MS,
    EventError,
    parse_interaction,
    parse_item,
)

CHUNK_ROWS = 100_000
INTERACTION_COLUMNS = ("user_id", "item_id", "ts", "action", "event_id")
ITEM_COLUMNS = ("item_id", "text", "category", "ts")
_INTEGER = re.compile(r"-?[0-9]+")


class _Absent:
    """A field the row does not have (unlike JSON null, which some fields reject)."""

    def __repr__(self) -> str:
        return "<absent>"


ABSENT = _Absent()


# --- what a row must be ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Kind:
    parse: Callable[[dict], BaseModel]  # the contract's own parser: the last word on a row
    required: tuple[str, ...]
    optional: tuple[str, ...]  # fields with a default: absent is fine
    integers: tuple[str, ...]  # columns CSV cells are converted to int for
    check: Callable[[dict[str, list]], tuple[dict[str, list], np.ndarray]]
    frame: Callable[[dict[str, list]], pd.DataFrame]

    @property
    def columns(self) -> tuple[str, ...]:
        return self.required + self.optional


def _ids(values: list, *, optional: bool = False) -> tuple[list, np.ndarray]:
    """Ids as strings (JSON integers converted) and which ones the column check clears."""
    out = [v if type(v) is str else str(v) if type(v) is int else None for v in values]
    ok = [v is not None and 0 < len(v) <= MAX_ID_CHARS for v in out]
    if optional:  # absent or null: None
        ok = [good or raw is ABSENT or raw is None for good, raw in zip(ok, values)]
    return out, np.array(ok, dtype=bool)


def _epoch_ms(values: list, *, optional: bool = False) -> tuple[list, np.ndarray]:
    # `type(v) is int` keeps out bool (a JSON true is not a timestamp) and float (1.5e12 is not ms).
    ok = [type(v) is int and 0 <= v <= MAX_TS_MS for v in values]
    if optional:
        ok = [good or v is ABSENT or v is None for good, v in zip(ok, values)]
    return [v if type(v) is int else None for v in values], np.array(ok, dtype=bool)


def _check_interactions(cols: dict[str, list]) -> tuple[dict[str, list], np.ndarray]:
    user_id, ok_user = _ids(cols["user_id"])
    item_id, ok_item = _ids(cols["item_id"])
    ts, ok_ts = _epoch_ms(cols["ts"])
    action = ["click" if v is ABSENT else v for v in cols["action"]]
    ok_action = np.array([type(v) is str and v in ACTIONS for v in action], dtype=bool)
    event_id, ok_event = _ids(cols["event_id"], optional=True)
    values = dict(user_id=user_id, item_id=item_id, ts=ts, action=action, event_id=event_id)
    return values, ok_user & ok_item & ok_ts & ok_action & ok_event


def _check_items(cols: dict[str, list]) -> tuple[dict[str, list], np.ndarray]:
    item_id, ok_item = _ids(cols["item_id"])
    text = cols["text"]
    ok_text = np.array([type(v) is str and len(v) <= MAX_TEXT_CHARS for v in text], dtype=bool)
    category = [None if v is ABSENT else v for v in cols["category"]]
    ok_category = np.array([v is None or (type(v) is str and len(v) <= MAX_ID_CHARS) for v in category], dtype=bool)
    ts, ok_ts = _epoch_ms(cols["ts"], optional=True)
    return dict(item_id=item_id, text=text, category=category, ts=ts), ok_item & ok_text & ok_category & ok_ts


def _interaction_frame(values: dict[str, list]) -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": pd.Series(values["user_id"], dtype="str"),
        "item_id": pd.Series(values["item_id"], dtype="str"),
        "ts": pd.Series(values["ts"], dtype="int64"),
        "action": pd.Series(values["action"], dtype="str"),
        "event_id": pd.Series(values["event_id"], dtype=object),  # None where the log has none
    })


def _item_frame(values: dict[str, list]) -> pd.DataFrame:
    return pd.DataFrame({
        "item_id": pd.Series(values["item_id"], dtype="str"),
        "text": pd.Series(values["text"], dtype="str"),
        "category": pd.Series(values["category"], dtype=object),
        "ts": pd.Series(values["ts"], dtype="Int64"),
    })


INTERACTION = _Kind(parse_interaction, ("user_id", "item_id", "ts"), ("action", "event_id"), ("ts",),
                    _check_interactions, _interaction_frame)
ITEM = _Kind(parse_item, ("item_id", "text"), ("category", "ts"), ("ts",), _check_items, _item_frame)


# --- file formats: each yields (columns of raw JSON-like values, where each row is) ----------------
@dataclass
class _Chunk:
    cols: dict[str, list]
    numbers: list[int] | range  # each row's line (JSON lines) or row (CSV, Parquet) number
    unit: str  # "line" or "row"

    def where(self, i: int) -> str:
        return f"{self.unit} {self.numbers[i]}"

    def payload(self, i: int) -> dict:
        return {k: v[i] for k, v in self.cols.items() if v[i] is not ABSENT}


def _format(path: Path) -> tuple[str, bool]:
    name = path.name.lower()
    gz = name.endswith(".gz")
    suffix = Path(name[:-3] if gz else name).suffix
    fmt = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}.get(suffix)
    if fmt is None or (gz and fmt == "parquet"):
        raise HymirecError(f"{path}: unknown format; expected .jsonl/.ndjson/.json, .csv (optionally .gz) or .parquet")
    return fmt, gz


_raw_decode = json.JSONDecoder().raw_decode


def _json_object(raw: bytes) -> dict | None:
    """The JSON object on one line, or None if the line is not one (the contract then says why)."""
    if len(raw) > MAX_PAYLOAD_BYTES:
        return None
    try:
        text = raw.decode("utf-8")
        value, end = _raw_decode(text)  # json.loads without its two whitespace scans: ~2x faster
        if end < len(text) and not text[end:].isspace():
            return None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        try:
            value = json.loads(raw)  # leading whitespace or a byte-order mark
        except ValueError:
            return None
    return value if type(value) is dict else None


def _jsonl_chunks(path: Path, kind: _Kind, gz: bool, chunk_rows: int) -> Iterator[_Chunk]:
    def chunk(records: list[dict], lines: list[int]) -> _Chunk:
        return _Chunk({c: [r.get(c, ABSENT) for r in records] for c in kind.columns}, lines, "line")

    records: list[dict] = []
    lines: list[int] = []
    with (gzip.open if gz else open)(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            record = _json_object(raw)
            if record is None:
                if raw.isspace() or not raw:
                    continue  # blank lines carry no event
                _reject(path, f"line {number}", kind.parse, raw)
            records.append(record)
            lines.append(number)
            if len(records) == chunk_rows:
                yield chunk(records, lines)
                records, lines = [], []
    if records:
        yield chunk(records, lines)


def _require_columns(path: Path, kind: _Kind, have: Iterable[str]) -> None:
    missing = [c for c in kind.required if c not in have]
    if missing:
        raise HymirecError(f"{path}: no {', '.join(missing)} column (columns: {', '.join(have) or 'none'})")


def _csv_chunks(path: Path, kind: _Kind, chunk_rows: int) -> Iterator[_Chunk]:
    try:
        with pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=chunk_rows, encoding="utf-8") as reader:
            start = 1
            for frame in reader:
                if start == 1:
                    _require_columns(path, kind, list(frame.columns))
                yield _Chunk({c: _csv_cells(frame, c, kind) for c in kind.columns}, range(start, start + len(frame)), "row")
                start += len(frame)
    except pd.errors.EmptyDataError:
        raise HymirecError(f"{path}: empty file, not even a CSV header") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise HymirecError(f"{path}: not readable as CSV: {str(exc).strip().splitlines()[-1]}") from None


def _csv_cells(frame: pd.DataFrame, column: str, kind: _Kind) -> list:
    # Short rows give NaN even with keep_default_na=False: they are empty cells too.
    cells = [v if type(v) is str else "" for v in frame[column].tolist()] if column in frame else [""] * len(frame)
    if column in kind.optional:
        cells = [ABSENT if v == "" else v for v in cells]
    if column in kind.integers:
        cells = [int(v) if type(v) is str and _INTEGER.fullmatch(v) else v for v in cells]
    return cells


def _parquet_chunks(path: Path, kind: _Kind, chunk_rows: int) -> Iterator[_Chunk]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise HymirecError(f"{path}: not readable as Parquet: {exc}") from None
    have = parquet.schema_arrow.names
    _require_columns(path, kind, have)
    present = [c for c in kind.columns if c in have]
    start = 1
    for batch in parquet.iter_batches(batch_size=chunk_rows, columns=present):
        cols = {}
        for c in kind.columns:
            if c not in present:
                cols[c] = [ABSENT] * batch.num_rows
                continue
            array = batch.column(c)
            if pa.types.is_timestamp(array.type):
                array = pc.cast(pc.cast(array, pa.timestamp("ms", array.type.tz)), pa.int64())
            cols[c] = array.to_pylist()  # JSON-like values: int, str, float, None
        yield _Chunk(cols, range(start, start + batch.num_rows), "row")
        start += batch.num_rows


def _reject(path: Path, where: str, parse: Callable, payload) -> BaseModel:
    """Run the contract's parser on one row: its model if it accepts, else the error a user sees."""
    try:
        return parse(payload)
    except EventError as exc:
        raise HymirecError(f"{path}, {where}: {exc.reason}: {exc.detail}") from None


def _iter(path: str | os.PathLike, kind: _Kind, chunk_rows: int) -> Iterator[pd.DataFrame]:
    path = Path(path)
    fmt, gz = _format(path)
    if not path.is_file():
        raise HymirecError(f"no such file: {path}")
    if fmt == "jsonl":
        chunks = _jsonl_chunks(path, kind, gz, chunk_rows)
    elif fmt == "csv":
        chunks = _csv_chunks(path, kind, chunk_rows)
    else:
        chunks = _parquet_chunks(path, kind, chunk_rows)
    for chunk in chunks:
        values, ok = kind.check(chunk.cols)
        for i in np.flatnonzero(~ok):
            model = _reject(path, chunk.where(i), kind.parse, chunk.payload(i))
            for c in values:  # the contract accepted what the column check did not: take its reading
                values[c][i] = getattr(model, c)
        yield kind.frame(values)


def _empty(kind: _Kind) -> pd.DataFrame:
    return kind.frame({c: [] for c in kind.columns})


# --- public -----------------------------------------------------------------------------------------
def iter_interactions(path: str | os.PathLike, chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """The log as validated DataFrames of at most ``chunk_rows`` rows each, in file order."""
    return _iter(path, INTERACTION, chunk_rows)


def read_interactions(path: str | os.PathLike, *, limit: int | None = None) -> pd.DataFrame:
    """A validated interaction log, in file order (a RangeIndex counts its rows).

    Columns: user_id (str), item_id (str), ts (int64 epoch ms), action (str), event_id (object:
    str or None). ``limit`` reads only the first rows.
    """
    chunk_rows = CHUNK_ROWS if limit is None else max(1, min(limit, CHUNK_ROWS))
    frames, rows = [], 0
    for frame in iter_interactions(path, chunk_rows):
        frames.append(frame)
        rows += len(frame)
        if limit is not None and rows >= limit:
            break
    if not frames:
        return _empty(INTERACTION)
    out = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return out if limit is None else out.iloc[:limit]


def read_items(path: str | os.PathLike) -> pd.DataFrame:
    """A validated item catalogue in file order: item_id (str), text (str), category (object: str or
    None), ts (Int64, <NA> where absent)."""
    frames = list(_iter(path, ITEM, CHUNK_ROWS))
    if not frames:
        return _empty(ITEM)
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records as compact JSON lines (the contract's wire form), atomically; returns the count.

    The file appears under its name only when complete, so a reader never sees half an export.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    count = 0
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(encode(record) + "\n")
            count += 1
    os.replace(tmp, path)
    return count
