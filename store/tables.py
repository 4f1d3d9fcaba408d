"""Thin typed access to the LanceDB tables of ``store.schemas``.

``Store(settings)`` connects to ``settings.lancedb_uri`` as given (a local directory, or an
object-store URI such as ``s3://bucket/path``, reached with the settings' ``s3_*`` endpoint and
credentials or LanceDB's usual ones), creates tables lazily with their schema, and writes each batch with ONE
``merge_insert`` by the table's key (``merge``): replaying a batch leaves the same rows, and a changed
row replaces the old one. A user's history row is replaced only by one at least as far along its
partition (``NEWER_HISTORY``): a write computed before a newer one cannot undo it, whoever sends it.

Sharding (see ``store.schemas``): writes to user state name their shard (the Kafka partition the
caller owns); reads take ``shard=None`` to look across every existing shard. A user normally lives
in one shard; if a repartition left copies in two, the newest ``updated_at`` wins.

Calls are synchronous and block (LanceDB runs them on its own background loop): from an asyncio
agent, run them in an executor if the loop must stay responsive. Reads see other processes'
writes within ``settings.lancedb_read_consistency_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.expr import col, lit
from lancedb.index import BTree
from lancedb.table import Table

from hymirec.errors import HymirecError
from hymirec.settings import Settings
from store.compaction import CompactionBudget
from store.objectstore import storage_options
from store.schemas import (
    HISTORIES, INTERESTS, ITEMS, KEYS, POSITION_KEY, PRIMARY_KEY, TIMESTAMP, parse_table_name, schema_for, shard_table,
)

log = logging.getLogger(__name__)

Rows = Iterable[Mapping[str, Any]] | pa.Table
# Ids per `IN (...)` filter: keeps the SQL plan small for callers that ask for thousands of users.
_IN_CHUNK = 1000
# optimize() deletes files of versions older than this; a reader still on such a version would
# fail, so keep it well above any query's duration.
CLEANUP_OLDER_THAN = timedelta(hours=1)
# Every history row (the shard's position row too) carries the partition offset it has applied up to,
# and rows are a function of the log up to that offset: keeping the further one is always right.
# Without it a shard's previous owner, finishing a batch after the partition moved on, or a lance
# retry of a conflicting commit, would put back an older row.
NEWER_HISTORY = ("target.watermark_offset IS NULL OR source.watermark_offset IS NULL "
                 "OR target.watermark_offset <= source.watermark_offset")


def connect(settings: Settings) -> lancedb.DBConnection:
    """The LanceDB connection for ``settings.lancedb_uri`` (the URI is passed through unchanged; an
    s3:// one with the endpoint and credentials of ``store.objectstore``)."""
    consistency = timedelta(seconds=settings.lancedb_read_consistency_s)
    return lancedb.connect(settings.lancedb_uri, read_consistency_interval=consistency,
                           storage_options=storage_options(settings) or None)


def table_names(db: lancedb.DBConnection) -> list[str]:
    names, token = [], None
    while True:
        page = db.list_tables(page_token=token)
        names.extend(page.tables)
        token = page.page_token
        if not token:
            return names


def open_table(db: lancedb.DBConnection, name: str, schema: pa.Schema, *, create: bool) -> Table | None:
    """Open ``name`` (creating it empty with ``schema`` if asked); None if missing and not created.

    An existing table with another schema (e.g. written with another embedding_dim) is an error,
    not something to write into.
    """
    try:
        table = db.open_table(name)
    except ValueError:  # LanceDB's "Table '...' was not found"
        if not create:
            return None
        table = db.create_table(name, schema=schema, exist_ok=True)
    if not table.schema.equals(schema):
        raise HymirecError(
            f"LanceDB table {name!r} at {db.uri} has schema [{_describe(table.schema)}] but this "
            f"version expects [{_describe(schema)}] (another embedding_dim?)"
        )
    if create:
        declare_keys(table, schema)
    return table


def declare_keys(table: Table, schema: pa.Schema) -> None:
    """Mark the key column as lance's primary key on a table created before keys were declared
    (done by a writer's open: readers write nothing)."""
    wanted = {f"{k}".encode(): f"{v}".encode() for k, v in PRIMARY_KEY.items()}
    stored = table.schema
    missing = [f.name for f in schema if (f.metadata or {}) == wanted and (stored.field(f.name).metadata or {}) != wanted]
    if missing:
        table.update_field_metadata(*({"path": name, "metadata": PRIMARY_KEY} for name in missing))


def merge(table: Table, key: str, rows: pa.Table, *, update: bool = True, only_if: str | None = None) -> Any:
    """ONE merge_insert of ``rows`` by ``key``: rows with a new key are inserted; matched rows are
    replaced (where ``only_if`` holds, a SQL condition over ``target.`` and ``source.`` columns) or,
    with ``update=False``, left alone.

    The join scans the key column instead of using its BTree index: lance records the inserted keys
    for its conflict check only on that path (measured: +7 ms per write at 100k rows).
    """
    plan = table.merge_insert(key)
    if update:
        plan = plan.when_matched_update_all(where=only_if)
    # Vectors are checked by to_arrow; "null" only keeps LanceDB from refusing null vectors (an item
    # is recorded before any model has embedded it).
    return plan.when_not_matched_insert_all().use_index(False).execute(rows, on_bad_vectors="null")


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}{'' if f.nullable else ' not null'}" for f in schema)


def to_arrow(rows: Rows, schema: pa.Schema, what: str) -> pa.Table:
    """Validate ``rows`` (dicts or an Arrow table) against ``schema`` -> a table of exactly it.

    Missing nullable columns become null; a null ``updated_at`` becomes now. Unknown columns,
    values of the wrong type or width, and nulls in not-null columns raise HymirecError naming the
    first bad row.
    """
    # Convert against an all-nullable copy so that missing values reach the checks below.
    loose = pa.schema([field.with_nullable(True) for field in schema])
    if isinstance(rows, pa.Table):
        _reject_unknown(rows.column_names, schema, what)
        columns = [rows[f.name] if f.name in rows.column_names else pa.nulls(len(rows), f.type) for f in loose]
        try:
            table = pa.table(dict(zip(loose.names, columns))).cast(loose)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise HymirecError(f"bad {what} table: {exc}") from None
    else:
        known = frozenset(schema.names)
        nested = [f.name for f in schema if _holds_matrices(f.type)]
        rows = [_plain_row(row, schema, known, nested, what, i) for i, row in enumerate(rows)]
        try:
            table = pa.Table.from_pylist(rows, schema=loose)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            raise _first_bad_row(rows, loose, what) from None
    if "updated_at" in schema.names:
        now = pa.scalar(datetime.now(timezone.utc), TIMESTAMP)
        table = table.set_column(
            schema.get_field_index("updated_at"), loose.field("updated_at"), pc.fill_null(table["updated_at"], now)
        )
    for field in schema:
        if not field.nullable and table[field.name].null_count:
            first = pc.index(pc.is_null(table[field.name]), True).as_py()
            raise HymirecError(f"bad {what} row {first}: {field.name} must not be null")
        _check_finite(table, field.name, what)
    return table.cast(schema)


def _check_finite(table: pa.Table, name: str, what: str) -> None:
    """NaN/inf in an embedding column would poison every cosine it enters."""
    values = table[name]
    while pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type):
        values = pc.list_flatten(values)
    if not pa.types.is_floating(values.type) or pc.all(pc.is_finite(values)).as_py() in (True, None):
        return
    for i, row in enumerate(table[name].to_pylist()):
        if not np.isfinite(np.asarray(row if row is not None else [], dtype=np.float64)).all():
            key = table.column_names[0]
            raise HymirecError(f"bad {what} row {i} ({key}={table[key][i].as_py()!r}): {name} has NaN or inf")


def _reject_unknown(names: Iterable[str], schema: pa.Schema, what: str, row: int | None = None) -> None:
    unknown = sorted(set(names) - set(schema.names))
    if unknown:
        where = f"{what} row {row}" if row is not None else f"{what} table"
        raise HymirecError(f"bad {where}: unknown column(s) {unknown}; expected {schema.names}")


def _holds_matrices(kind: pa.DataType) -> bool:
    """A list column of lists (the K x dim interests): the only kind a 2-d numpy array belongs in."""
    listy = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    return any(is_list(kind) for is_list in listy) and any(is_list(kind.value_type) for is_list in listy)


def _plain_row(row: Any, schema: pa.Schema, known: frozenset[str], nested: Sequence[str], what: str,
               index: int) -> Mapping[str, Any]:
    if not isinstance(row, Mapping):
        raise HymirecError(f"bad {what} row {index}: expected a dict, got {type(row).__name__}")
    if not row.keys() <= known:
        _reject_unknown(row.keys(), schema, what, index)
    # pyarrow converts 1-d numpy arrays itself but not 2-d ones. Only the nested columns are looked
    # at: this runs once per history row on the ingest path.
    matrices = {name: list(value) for name in nested
                if isinstance(value := row.get(name), np.ndarray) and value.ndim > 1}
    return {**row, **matrices} if matrices else row


def _first_bad_row(rows: list[dict], schema: pa.Schema, what: str) -> HymirecError:
    key = schema.names[0]
    for i, row in enumerate(rows):
        try:
            pa.Table.from_pylist([row], schema=schema)
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            return HymirecError(f"bad {what} row {i} ({key}={row.get(key)!r}): {exc}")
    return HymirecError(f"bad {what} rows: they do not convert to {_describe(schema)}")


def dedupe_last(table: pa.Table, key: str) -> pa.Table:
    """Keep the last row of each key: merge_insert misbehaves on duplicate source keys."""
    keys = table[key].to_pylist()
    last = {k: i for i, k in enumerate(keys)}
    return table if len(last) == len(keys) else table.take(sorted(last.values()))


def _check_interest_width(table: pa.Table, dim: int) -> None:
    """Each interest vector must have the embedding width (the list<list> type cannot say so)."""
    widths = pc.list_value_length(pc.list_flatten(table["interests"])).fill_null(-1)
    if pc.all(pc.equal(widths, dim)).as_py() in (True, None):
        return
    for i, interests in enumerate(table["interests"].to_pylist()):
        for vector in interests or []:
            if vector is None or len(vector) != dim:
                raise HymirecError(
                    f"bad user_interests row {i} (user_id={table['user_id'][i].as_py()!r}): interest "
                    f"vectors must have width {dim} (embedding_dim), got {None if vector is None else len(vector)}"
                )


class Store:
    """The project's LanceDB tables behind thin typed methods (one instance per process is enough)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.db = connect(settings)
        self._tables: dict[str, Table] = {}
        self._indexed: set[str] = set()
        self.compaction = CompactionBudget(settings.compact_share)  # of the user-state shards this Store writes

    # --- items (one writer: the items agent) ---------------------------------------------------
    def upsert_items(self, rows: Rows) -> int:
        """Insert or replace items by item_id; returns the number of distinct items written."""
        return self._upsert(ITEMS, ITEMS, rows)

    def get_items(self, ids: Iterable[str]) -> dict[str, dict]:
        """{item_id: row} for the ids found (missing ids are absent)."""
        return self._get(ITEMS, [ITEMS], ids)

    def all_items(self, columns: list[str] | None = None) -> pa.Table:
        """The whole catalogue, or only ``columns`` (["item_id"] skips reading every vector)."""
        schema = self._schema(ITEMS)
        if columns is not None:
            _reject_unknown(columns, schema, ITEMS)
        table = self._open(ITEMS, ITEMS, create=False)
        if table is None:
            empty = schema.empty_table()
            return empty if columns is None else empty.select(columns)
        if columns is None:
            return table.to_arrow()
        return table.search().select(columns).limit(None).to_arrow()

    # --- user state (one writer per shard = Kafka partition) -----------------------------------
    def upsert_histories(self, shard: int, rows: Rows, *, position: int | None = None) -> int:
        """Insert or replace users' history rows in ``shard`` (the Kafka partition this writer owns);
        with ``position``, the partition's applied position is written in the same commit."""
        if position is not None:
            rows = [*rows, {"user_id": POSITION_KEY, "watermark_partition": shard, "watermark_offset": position,
                            "history_item_ids": [], "recent_item_ids": [], "recent_event_ids": [], "event_count": 0}]
        return self._upsert(HISTORIES, shard_table(HISTORIES, shard), rows)

    def get_histories(self, user_ids: Iterable[str], shard: int | None = None) -> dict[str, dict]:
        """{user_id: row} for the users found, in ``shard`` or (None) in every shard."""
        return self._get(HISTORIES, self._shard_names(HISTORIES, shard), [u for u in user_ids if u != POSITION_KEY])

    def get_histories_and_position(self, user_ids: Iterable[str], shard: int) -> tuple[dict[str, dict], int | None]:
        """The users' rows of ``shard`` and its applied position (None if it has none yet), in one read."""
        rows = self._get(HISTORIES, [shard_table(HISTORIES, shard)], [POSITION_KEY, *user_ids])
        position = rows.pop(POSITION_KEY, None)
        return rows, None if position is None else position["watermark_offset"]

    def positions(self, shards: Iterable[int] | None = None) -> dict[int, int]:
        """{shard: applied position} of the shards that have one (None: every existing shard).

        Every offset of the shard's partition up to its position has been applied, skipped or
        dead-lettered; the next one to read is position + 1.
        """
        wanted = self.shards(HISTORIES) if shards is None else sorted(set(shards))
        # The position row's offset alone, not every column of what the read meets.
        found = {shard: self._get(HISTORIES, [shard_table(HISTORIES, shard)], [POSITION_KEY], ["watermark_offset"])
                 for shard in wanted}
        return {shard: rows[POSITION_KEY]["watermark_offset"] for shard, rows in found.items() if POSITION_KEY in rows}

    def scan_histories(self, shard: int, columns: Sequence[str], since: datetime | None = None) -> pa.Table:
        """``columns`` of every user row of ``shard`` (written at or after ``since``), without its position row."""
        _reject_unknown(columns, self._schema(HISTORIES), HISTORIES)
        table = self._open(HISTORIES, shard_table(HISTORIES, shard), create=False)
        if table is None:
            return self._schema(HISTORIES).empty_table().select(list(columns))
        where = col(KEYS[HISTORIES]) != lit(POSITION_KEY)
        if since is not None:
            where = where & (col("updated_at") >= lit(since))
        return table.search().where(where).select(list(columns)).limit(None).to_arrow()

    def upsert_interests(self, shard: int, rows: Rows) -> int:
        return self._upsert(INTERESTS, shard_table(INTERESTS, shard), rows)

    def get_interests(self, user_ids: Iterable[str], shard: int | None = None,
                      columns: Sequence[str] | None = None) -> dict[str, dict]:
        """{user_id: row}; ``columns`` limits what is read (the key and ``updated_at`` always come)."""
        return self._get(INTERESTS, self._shard_names(INTERESTS, shard), user_ids, columns)

    def shards(self, base: str) -> list[int]:
        """The shards of ``base`` (HISTORIES or INTERESTS) that exist, ascending."""
        found = (parse_table_name(name) for name in table_names(self.db))
        return sorted(p[1] for p in found if p is not None and p[0] == base)

    def table(self, name: str) -> Table:
        """The LanceDB table ``name`` (e.g. ITEMS for vector search), schema-checked; must exist."""
        parsed = parse_table_name(name)
        if parsed is None:
            raise HymirecError(f"{name!r} is not a HyMiRec table")
        table = self._open(parsed[0], name, create=False)
        if table is None:
            raise HymirecError(f"no table {name!r} in {self.db.uri}")
        return table

    # --- maintenance ----------------------------------------------------------------------------
    def table_counts(self) -> dict[str, int]:
        """Rows per project table (shards listed one by one; a history shard counts its users)."""
        users = f"{KEYS[HISTORIES]} != '{POSITION_KEY}'"
        return {name: self.table(name).count_rows(users if parse_table_name(name)[0] == HISTORIES else None)
                for name in self._project_tables()}

    def optimize(self, tables: Iterable[str] | None = None, *,
                 cleanup_older_than: timedelta = CLEANUP_OLDER_THAN) -> list[str]:
        """Compact fragments, fold new rows into indices and drop old versions; one line per table.

        Run it from the writer of a table (or while nothing writes): compaction racing another
        process's merge_insert makes one of the two commits retry or fail.
        """
        lines = []
        for name in tables if tables is not None else self._project_tables():
            table = self.table(name)
            before = table.stats()["fragment_stats"]["num_fragments"]
            parsed = parse_table_name(name)
            if parsed is not None:
                self._ensure_key_index(name, table, KEYS[parsed[0]])
            started = time.monotonic()
            table.optimize(cleanup_older_than=cleanup_older_than)
            self.compaction.compacted(name, started, time.monotonic())
            stats = table.stats()
            lines.append(
                f"{name}: {stats['num_rows']} rows, fragments {before} -> "
                f"{stats['fragment_stats']['num_fragments']}, indices {stats['num_indices']}"
            )
        return lines

    def compact_due(self, among: Collection[str]) -> str | None:
        """Compact the one user-state shard of ``among`` (those the caller still writes) that
        ``self.compaction`` says is due, if any; its ``optimize`` line. Call it between the caller's
        own writes, never beside them."""
        name = self.compaction.due(time.monotonic(), among)
        if name is None:
            return None
        try:
            return self.optimize([name])[0]
        except Exception as exc:  # noqa: BLE001 — an optimisation: the next due one retries, the timer too
            log.warning("compacting %s failed: %s: %s", name, type(exc).__name__, exc)
            return None

    # --- internals ------------------------------------------------------------------------------
    def _schema(self, base: str) -> pa.Schema:
        return schema_for(base, self.settings.embedding_dim)

    def _open(self, base: str, name: str, *, create: bool) -> Table | None:
        if name not in self._tables:
            table = open_table(self.db, name, self._schema(base), create=create)
            if table is None:
                return None
            self._tables[name] = table
        return self._tables[name]

    def _project_tables(self) -> list[str]:
        return [name for name in table_names(self.db) if parse_table_name(name) is not None]

    def _shard_names(self, base: str, shard: int | None) -> list[str]:
        if shard is not None:
            return [shard_table(base, shard)]
        return [shard_table(base, s) for s in self.shards(base)]

    def _upsert(self, base: str, name: str, rows: Rows) -> int:
        key = KEYS[base]
        batch = dedupe_last(to_arrow(rows, self._schema(base), name), key)
        if base == INTERESTS:
            _check_interest_width(batch, self.settings.embedding_dim)
        if not len(batch):
            return 0
        table = self._open(base, name, create=True)
        merge(table, key, batch, only_if=NEWER_HISTORY if base == HISTORIES else None)
        self._ensure_key_index(name, table, key)
        if base in (HISTORIES, INTERESTS):
            self.compaction.wrote(name)
        return len(batch)

    def _ensure_key_index(self, name: str, table: Table, key: str) -> None:
        if name in self._indexed:
            return
        try:
            if not any(index.columns == [key] for index in table.list_indices()):
                table.create_index(key, config=BTree())
            self._indexed.add(name)
        except Exception as exc:  # noqa: BLE001 — the write is committed; a missing index only slows reads
            log.warning("could not create the %s index on %s (retried on the next write): %s", key, name, exc)

    def _get(self, base: str, names: list[str], ids: Iterable[str], columns: Sequence[str] | None = None) -> dict[str, dict]:
        key = KEYS[base]
        select = None if columns is None else list(dict.fromkeys([key, "updated_at", *columns]))
        wanted = list(dict.fromkeys(ids))
        found: dict[str, dict] = {}
        for name in names:
            table = self._open(base, name, create=False)
            if table is None:
                continue
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[start : start + _IN_CHUNK]
                query = table.search().where(col(key).isin(chunk))
                if select is not None:
                    query = query.select(select)
                rows = query.limit(len(chunk)).to_arrow()
                for row in rows.to_pylist():
                    old = found.get(row[key])
                    if old is None or row["updated_at"] > old["updated_at"]:
                        found[row[key]] = row
        return found

