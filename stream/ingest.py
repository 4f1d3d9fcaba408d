"""The worker's ingest path: validate → dedupe → append to the user's history, one micro-batch at a time.

``prepare_interactions`` / ``write_interactions`` (together ``apply_interactions``) and
``apply_items`` are plain functions over a ``store.Store``, testable without a broker;
``stream.ingestor.Ingestor`` is what the agents of ``stream.app`` call.

Decisions this module makes:

- **Sharding.** A user's row lives in the shard of the Kafka partition its events arrive on (see
  ``store.schemas``); the worker owning that partition is its only writer. That holds only if every
  event of a user lands in one partition, i.e. if producers key interactions by ``user_id`` (and
  items by ``item_id``). A payload whose key is missing or differs is dead-lettered with reason
  ``key_mismatch``, rather than silently starting a second row for the user in another shard.
- **Idempotency** (Faust's exactly-once is not relied on, DESIGN §5). Each row carries the highest
  offset applied for it (``watermark_offset``; the partition is the shard): a redelivered event
  (offset ≤ watermark, e.g. after a crash between the write and the offset commit) is skipped.
  A producer's resend of the same event under a new offset is caught by ``event_id`` in the row's
  bounded ``recent_event_ids`` (``settings.dedupe_window``). Events without an ``event_id`` are
  deduplicated by offset only. Both kinds count as duplicates; the row is not rewritten for them.
- **Unknown items are recorded**, by exact id, and counted (``unknown_items``). The ``items`` and
  ``interactions`` topics are not ordered with respect to each other, so a catalogue event may
  trail the first clicks on its item; parking those clicks would need a second store and a re-drive
  path, while the id is already exact: the item gets its vector and codes when its catalogue event
  arrives, and the re-encode pass below fills the row's codes.
- **Ids and codes stay aligned** by one invariant: ``history_codes`` is either null (with
  ``codebook_version`` null) or exactly one code block per id of ``history_item_ids``, all encoded
  under ``codebook_version``. An append extends both when the encoder knows every new item under
  the row's version; a row without codes (or of an older version) is re-encoded whole when the
  encoder knows all its items; otherwise the row's codes become null, to be re-encoded later from the
  ids. Without an encoder (no model published yet) histories are kept by id only.
- **Nothing is lost** (DESIGN §7b). Each shard stores its partition's applied position in the same
  ``merge_insert`` as its rows (``store.schemas.POSITION_KEY``): offsets at or below it were handled
  and are skipped, and a batch that starts past position + 1 is held back (``gaps``) until the
  missing offsets are read. Bad payloads go to the dead-letter topic (raw bytes, reason, source
  partition/offset) before the write that moves the position past them. A failing write is retried
  with backoff (writes are idempotent), stalling the partition instead of skipping events.
- **One write per shard per batch** and one read of its touched users and position, so LanceDB sees
  few large ``merge_insert`` calls (DESIGN §6); the items table is written only by the items agent.
  The worker goes further (``stream.shard_cache``): its reads come from memory, and under a backlog
  several batches share one write.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from datetime import datetime, timezone
from sys import intern
from typing import Any, Protocol, TypeVar

from hymirec.settings import Settings
from store.tables import Store
from store.events import EventError, Item, dead_letter_record, parse_interaction_fields, parse_item

T = TypeVar("T")
USER_ID = itemgetter("user_id")  # of an interaction's fields (store.events.InteractionFields)
ITEM_ID = attrgetter("item_id")  # of a store.events.Item


class Encoder(Protocol):
    """What the model side hands the worker once a codebook version is published."""

    version: str

    def codes_for(self, item_ids: Sequence[str]) -> dict[str, bytes] | None:
        """Packed codes of the items it knows (others absent); None while it has no codebook."""


class HistorySource(Protocol):
    """Where ``prepare_interactions`` reads a shard's rows: the store, or the worker's
    ``stream.shard_cache.ShardCache`` in front of it."""

    def get_histories_and_position(self, user_ids: Iterable[str], shard: int) -> tuple[dict[str, dict], int | None]:
        """{user_id: row} of the users ``shard`` has, and its applied position (None: none yet)."""


@dataclass(slots=True)  # not frozen: a frozen dataclass costs 3–4× per construction, once per consumed message
class RawEvent:
    """One Kafka message as consumed: undecoded value and key, where it came from."""

    value: bytes | None
    key: bytes | None
    partition: int
    offset: int
    timestamp: float | None = None  # Kafka message timestamp, seconds since the epoch


@dataclass
class BatchResult:
    """What one micro-batch of interactions does: counted and prepared by ``prepare_interactions``,
    made durable by ``write_interactions``."""

    applied_by_shard: dict[int, int] = field(default_factory=dict)  # shard -> events appended
    duplicate_offsets: int = 0
    duplicate_event_ids: int = 0
    already_applied: int = 0  # at or below the shard's position: read again after a restart or rebalance
    unknown_items: int = 0
    dead: list[dict] = field(default_factory=list)
    rows: dict[int, list[dict]] = field(default_factory=dict)  # shard -> user rows to write
    positions: dict[int, int] = field(default_factory=dict)  # shard -> applied position the write records
    gaps: dict[int, Gap] = field(default_factory=dict)  # partitions left out: offsets missing before them
    timestamps_by_shard: dict[int, list[float]] = field(default_factory=dict)  # message timestamps, for freshness

    @property
    def applied(self) -> int:
        return sum(self.applied_by_shard.values())

    @property
    def applied_timestamps(self) -> list[float]:
        return [ts for stamps in self.timestamps_by_shard.values() for ts in stamps]

    @property
    def duplicates(self) -> int:
        return self.duplicate_offsets + self.duplicate_event_ids

    @property
    def touched(self) -> dict[int, list[str]]:
        """shard -> the user ids the write changes."""
        return {shard: [row["user_id"] for row in rows] for shard, rows in self.rows.items() if rows}


@dataclass(frozen=True, slots=True)
class Gap:
    """A partition's events started past its applied position: ``expected`` .. ``first`` - 1 never arrived."""

    expected: int
    first: int


@dataclass
class ItemsResult:
    upserted: int = 0
    unchanged: int = 0
    dead: list[dict] = field(default_factory=list)
    item_ids: list[str] = field(default_factory=list)  # every valid item of the batch


class ItemCache:
    """Ids of the catalogue's items, so that an interaction with an unknown item can be counted."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.loaded = False

    def refresh(self, store: Store) -> None:
        self.ids = set(store.all_items().column("item_id").to_pylist())
        self.loaded = True

    def add(self, ids: Iterable[str]) -> None:
        self.ids.update(ids)

    def __len__(self) -> int:
        return len(self.ids)


# --- validation ---------------------------------------------------------------------------------
def _check_key(raw: RawEvent, expected: str, field_name: str) -> None:
    key = None if raw.key is None else raw.key.decode("utf-8", "backslashreplace")
    if key != expected:
        raise EventError(
            "key_mismatch",
            f"message key {key!r} is not the event's {field_name} {expected!r}: producers must key by "
            f"{field_name} so that all its events land in one partition",
            (field_name,),
        )


def _validate(raw: RawEvent, parse: Callable[[bytes], T], key: Callable[[T], str], key_field: str,
              topic: str) -> tuple[T | None, dict | None]:
    """(the parsed event, None), or (None, its dead-letter record)."""
    try:
        event = parse(raw.value if raw.value is not None else b"")
        _check_key(raw, key(event), key_field)
        return event, None
    except EventError as error:
        return None, dead_letter_record(raw.value, error, topic=topic, partition=raw.partition, offset=raw.offset)


# --- interactions -------------------------------------------------------------------------------
def new_history_row(user_id: str, shard: int) -> dict:
    return {
        "user_id": user_id,
        "history_item_ids": [],
        "history_codes": None,
        "codebook_version": None,
        "recent_item_ids": [],
        "event_count": 0,
        "last_ts": None,
        "watermark_partition": shard,
        "watermark_offset": -1,
        "recent_event_ids": [],
        "updated_at": None,
    }


@dataclass(slots=True)
class _Pending:
    """A user's row while a batch is applied to it; lists are trimmed once, at the end."""

    row: dict  # a copy of the held row (history ids shared until _finish_rows joins them to `appended`)
    old_len: int  # ids in the stored history (what its codes, if any, cover)
    appended: list[str] = field(default_factory=list)


def prepare_interactions(
    store: HistorySource,
    settings: Settings,
    batch: Sequence[RawEvent],
    *,
    topic: str | None = None,
    known_items: ItemCache | None = None,
    encoder: Encoder | None = None,
    accepted_gaps: Mapping[int, int] | None = None,
) -> BatchResult:
    """Validate one micro-batch of ``interactions`` messages and build the rows it changes; one read
    per shard (its touched users and its applied position), nothing written.

    Per partition, offsets at or below the shard's applied position were handled by an earlier
    write and are skipped (not even dead-lettered again). A partition whose first offset lies past
    position + 1 has a gap: its events are left out (``gaps``) so that the caller can read the
    missing offsets first, unless ``accepted_gaps[partition]`` names that first offset (a re-read
    met the same gap: those offsets do not exist, e.g. removed by retention).
    """
    topic = topic or settings.topic_interactions
    window = settings.dedupe_window
    known = None if known_items is None else known_items.ids
    result = BatchResult()
    by_partition: dict[int, list[RawEvent]] = defaultdict(list)
    for raw in batch:
        by_partition[raw.partition].append(raw)

    pending: list[tuple[int, _Pending]] = []
    for shard, raws in sorted(by_partition.items()):
        raws.sort(key=lambda raw: raw.offset)
        checked = [(raw, *_validate(raw, parse_interaction_fields, USER_ID, "user_id", topic)) for raw in raws]
        users_wanted = dict.fromkeys(ev["user_id"] for _, ev, _ in checked if ev is not None)
        stored, position = store.get_histories_and_position(users_wanted, shard)
        position = -1 if position is None else position  # a shard without one: nothing of it applied yet
        if raws[0].offset > position + 1 and (accepted_gaps or {}).get(shard) != raws[0].offset:
            result.gaps[shard] = Gap(position + 1, raws[0].offset)
            continue
        fresh = [checked_event for checked_event in checked if checked_event[0].offset > position]
        result.already_applied += len(checked) - len(fresh)
        if not fresh:
            continue
        result.positions[shard] = fresh[-1][0].offset
        users: dict[str, _Pending] = {}
        stamps = result.timestamps_by_shard.setdefault(shard, [])
        applied = 0
        for raw, ev, dead in fresh:
            if ev is None:
                result.dead.append(dead)
                continue
            user_id, item_id, ts = ev["user_id"], ev["item_id"], ev["ts"]
            user = users.get(user_id)
            if user is None:
                row = stored.get(user_id) or new_history_row(user_id, shard)
                # The held row stays as it was until the batch is staged: only the lists this loop
                # changes are copied (the history is joined to `appended` once, in _finish_rows).
                history = row["history_item_ids"] or []
                row = {**row, "history_item_ids": history, "recent_event_ids": list(row["recent_event_ids"] or [])}
                user = users[user_id] = _Pending(row, len(history))
            row = user.row
            if raw.offset <= row["watermark_offset"]:
                result.duplicate_offsets += 1
                continue
            event_id = ev["event_id"]
            # A list scan (at most dedupe_window + this batch's ids) is cheaper than a set built per user.
            if event_id is not None and event_id in row["recent_event_ids"]:
                result.duplicate_event_ids += 1
                continue
            user.appended.append(intern(item_id))  # shared with the other held histories (shard_cache)
            if event_id is not None and window:
                row["recent_event_ids"].append(event_id)
            row["event_count"] += 1
            last_ts = row["last_ts"]
            row["last_ts"] = ts if last_ts is None or ts > last_ts else last_ts
            row["watermark_offset"] = raw.offset
            applied += 1
            if raw.timestamp is not None:
                stamps.append(raw.timestamp)
            if known is not None and item_id not in known:
                result.unknown_items += 1
        if applied:
            result.applied_by_shard[shard] = applied
        pending += [(shard, user) for user in users.values() if user.appended]

    _finish_rows([user for _, user in pending], settings, encoder)
    for shard in result.positions:
        result.rows[shard] = [user.row for s, user in pending if s == shard]
    return result


def write_interactions(store: Store, result: BatchResult) -> None:
    """Make a prepared batch durable: per shard ONE merge_insert of its rows and its new position.

    The rows are stamped with the write's time (to the stored millisecond) first, so that once
    written they are exactly the stored rows: the worker hands them to its interest refresher."""
    now = datetime.now(timezone.utc)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)
    for shard, position in result.positions.items():
        for row in result.rows[shard]:
            row["updated_at"] = now
        store.upsert_histories(shard, result.rows[shard], position=position)


def apply_interactions(store: Store, settings: Settings, batch: Sequence[RawEvent], **options: Any) -> BatchResult:
    """``prepare_interactions`` then ``write_interactions`` (dead letters are the caller's to send)."""
    result = prepare_interactions(store, settings, batch, **options)
    write_interactions(store, result)
    return result


def _finish_rows(users: list[_Pending], settings: Settings, encoder: Encoder | None) -> None:
    """Append, bound the lists, and keep ``history_codes`` aligned with ``history_item_ids``."""
    longest, recent, window = settings.history_max_len, settings.recent_len, settings.dedupe_window
    for user in users:
        row = user.row
        ids = row["history_item_ids"] + user.appended
        # Trimmed in place (lists this batch made): a slice would copy even a list within its bound.
        del ids[:-longest]
        row["history_item_ids"], row["recent_item_ids"] = ids, ids[-recent:]
        if window:
            del row["recent_event_ids"][:-window]
        else:
            row["recent_event_ids"] = []
        row["updated_at"] = None  # write_interactions stamps the write time

    if encoder is None:  # no model yet: histories by id only
        for user in users:
            user.row["history_codes"], user.row["codebook_version"] = None, None
        return
    version = encoder.version
    extend = {id(u) for u in users if _codes_cover(u, version)}
    wanted = {i for u in users for i in (u.appended if id(u) in extend else u.row["history_item_ids"])}
    codes = encoder.codes_for(sorted(wanted)) if wanted else None
    for user in users:
        row = user.row
        if codes is not None and id(user) in extend and all(i in codes for i in user.appended):
            block = len(row["history_codes"]) // user.old_len
            full = row["history_codes"] + b"".join(codes[i] for i in user.appended)
            row["history_codes"] = full[len(full) - block * len(row["history_item_ids"]):]
        elif codes is not None and all(i in codes for i in row["history_item_ids"]):
            row["history_codes"] = b"".join(codes[i] for i in row["history_item_ids"])
            row["codebook_version"] = version
        else:
            row["history_codes"], row["codebook_version"] = None, None


def _codes_cover(user: _Pending, version: str | None) -> bool:
    """True if the stored codes are of ``version`` and hold one block per stored id."""
    codes = user.row["history_codes"]
    return (
        version is not None
        and codes is not None
        and user.row["codebook_version"] == version
        and user.old_len > 0
        and len(codes) % user.old_len == 0
    )


# --- items --------------------------------------------------------------------------------------
def apply_items(store: Store, settings: Settings, batch: Sequence[RawEvent], *, topic: str | None = None) -> ItemsResult:
    """Validate one micro-batch of ``items`` messages and write new or changed items in one upsert.

    A changed text or category makes the item's vector and codes stale: they are written as null
    for the model side to recompute. A resend of the same item writes nothing.
    """
    topic = topic or settings.topic_items
    result = ItemsResult()
    latest: dict[str, Item] = {}
    for raw in sorted(batch, key=lambda r: (r.partition, r.offset)):
        item, dead = _validate(raw, parse_item, ITEM_ID, "item_id", topic)
        if item is None:
            result.dead.append(dead)
        else:
            latest[item.item_id] = item
    stored = store.get_items(latest) if latest else {}
    rows = []
    for item_id, item in latest.items():
        old = stored.get(item_id)
        same_content = old is not None and old["text"] == item.text and old["category"] == item.category
        if same_content and old["ts"] == item.ts:
            result.unchanged += 1
            continue
        keep = same_content  # only the timestamp changed: the embedding still holds
        rows.append({
            "item_id": item_id, "text": item.text, "category": item.category, "ts": item.ts,
            "vector": old["vector"] if keep else None,
            "codes": old["codes"] if keep else None,
            "model_version": old["model_version"] if keep else None,
            "updated_at": None,
        })
    if rows:
        result.upserted = store.upsert_items(rows)
    result.item_ids = list(latest)
    return result
