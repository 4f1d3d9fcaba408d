"""The LanceDB tables, declared once: names, key columns and pyarrow schemas.

Layout (one writer per table, DESIGN §6; every key column is declared lance's primary key, so that
a replaced writer still finishing a batch cannot duplicate a key, see ``PRIMARY_KEY``):

- ``items`` — the catalogue; written only by the items agent.
- ``user_histories_pNNN`` / ``user_interests_pNNN`` — user state *sharded by Kafka partition*
  (``NNN`` = the partition of the ``interactions`` topic, keyed by user_id), so the one Faust
  worker that owns a partition is the one writer of its shard. Adding workers is then a setting,
  not a rewrite; readers look across all shards. The partition count is not: it decides which
  shard a user hashes to, so it is recorded in ``store_layout`` and a worker of another count
  refuses to start (``store.layout``).
- ``model_registry`` — published model versions; written only by the trainer.

Code blobs (``items.codes``, ``user_histories.history_codes``) are the CSRC bytes that
``model.codebook`` packs: per item its L codes, uint8 when the codebook has ≤ 256 centres per
level, else uint16 little-endian (plus L scale bytes when that codebook stores scales); a history
is its items' rows back to back, aligned with ``history_item_ids``.
"""

from __future__ import annotations

import re

import pyarrow as pa

ITEMS = "items"
HISTORIES = "user_histories"
INTERESTS = "user_interests"
REGISTRY = "model_registry"
# The retrieval side's tables (serving/): written by the worker's serving runtime.
VERSIONS = "serving_versions"
POPULAR = "popular_items"
FOLLOWS = "item_follows"  # the serving blend's sequential rules (model.blend)
NEIGHBOURS = "item_neighbours"  # the serving blend's item-to-item co-occurrence (model.blend)
FRESH = "fresh_items"  # the serving blend's fresh items (model.blend.FirstSeen)
TREND = "item_trend"  # the serving blend's decayed item counts and category shares (model.trend)
BLEND = "serving_blend"  # the serving blend's weights, one row
# The partition count the user shards are laid out for (one row; written by the worker at start-up).
LAYOUT = "store_layout"
SHARDED = (HISTORIES, INTERESTS)
MAX_SHARD = 999  # three digits in the table name

KEYS = {ITEMS: "item_id", HISTORIES: "user_id", INTERESTS: "user_id", REGISTRY: "version"}

# The key of the one row of a ``user_histories_pNNN`` shard that is not a user: its Kafka partition's
# applied position (``watermark_offset``: every offset up to it has been applied, skipped as a
# duplicate or dead-lettered). It is written in the same ``merge_insert`` as the batch's user rows,
# so the position can never run ahead of the rows (DESIGN §7b). "" is no user id: the event
# contract requires at least one character.
POSITION_KEY = ""

TIMESTAMP = pa.timestamp("ms", tz="UTC")

# Declared on every table's key column. With it lance records the keys a merge_insert inserts, so two
# writers inserting the same new key conflict and one is retried against the other's rows instead of
# both committing it (lance #4585). One writer per table is the rule; this makes a writer that has
# not yet learnt it was replaced (a revoked or evicted worker's last batch) harmless.
PRIMARY_KEY = {"lance-schema:unenforced-primary-key": "true"}


def key_field(name: str) -> pa.Field:
    return pa.field(name, pa.string(), nullable=False, metadata=PRIMARY_KEY)


def items_schema(dim: int) -> pa.Schema:
    """One row per item. ``vector`` is null until a model version has embedded the item."""
    return pa.schema([
        key_field("item_id"),
        pa.field("text", pa.string()),
        pa.field("category", pa.string()),
        pa.field("ts", pa.int64()),
        pa.field("vector", pa.list_(pa.float32(), dim)),
        pa.field("codes", pa.binary()),
        pa.field("model_version", pa.string()),
        pa.field("updated_at", TIMESTAMP, nullable=False),
    ])


def histories_schema() -> pa.Schema:
    """One row per user: long history (ids oldest first, codes aligned), recent ids, watermark.

    ``watermark_partition``/``watermark_offset``: the highest Kafka offset applied for this user,
    so a redelivered event (offset ≤ watermark) is skipped; ``recent_event_ids`` is a bounded
    dedupe set for producers that resend the same event under a new offset. The row keyed
    ``POSITION_KEY`` holds the shard's applied position in ``watermark_offset`` instead.
    """
    return pa.schema([
        key_field("user_id"),
        pa.field("history_item_ids", pa.list_(pa.string())),
        pa.field("history_codes", pa.binary()),
        pa.field("codebook_version", pa.string()),
        pa.field("recent_item_ids", pa.list_(pa.string())),
        pa.field("event_count", pa.int64()),
        pa.field("last_ts", pa.int64()),
        pa.field("watermark_partition", pa.int32()),
        pa.field("watermark_offset", pa.int64()),
        pa.field("recent_event_ids", pa.list_(pa.string())),
        pa.field("updated_at", TIMESTAMP, nullable=False),
    ])


def interests_schema() -> pa.Schema:
    """One row per user: K interest vectors (each of width embedding_dim, L2-normalised)."""
    return pa.schema([
        key_field("user_id"),
        pa.field("interests", pa.list_(pa.list_(pa.float32()))),
        pa.field("model_version", pa.string()),
        pa.field("updated_at", TIMESTAMP, nullable=False),
    ])


def registry_schema() -> pa.Schema:
    """One row per published model version; the row is the commit point of a publish."""
    return pa.schema([
        key_field("version"),
        pa.field("parent", pa.string()),
        pa.field("created_at", TIMESTAMP, nullable=False),
        pa.field("artifact_uri", pa.string(), nullable=False),
        pa.field("manifest_sha256", pa.string(), nullable=False),
        pa.field("manifest", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
    ])


def vectors_table(version: str) -> str:
    """The item vectors of model ``version`` (shared by later versions with the same item encoder and codebook)."""
    return f"item_vectors_{version}"


def item_vectors_schema(dim: int) -> pa.Schema:
    """``item_updated_at``: the ``items`` row the vector was computed from (a newer one is re-encoded)."""
    return pa.schema([
        key_field("item_id"),
        pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
        pa.field("codes", pa.binary()),
        pa.field("item_updated_at", TIMESTAMP, nullable=False),
        pa.field("updated_at", TIMESTAMP, nullable=False),
    ])


def versions_schema() -> pa.Schema:
    """One row per model version ready to serve; inserting it is a switch's commit point."""
    return pa.schema([
        key_field("version"),
        pa.field("parent", pa.string()),
        pa.field("vectors_table", pa.string(), nullable=False),
        pa.field("item_encoder_id", pa.string(), nullable=False),
        pa.field("codebook_id", pa.string()),
        pa.field("items", pa.int64(), nullable=False),
        pa.field("metrics", pa.string()),  # the trainer's scores (JSON)
        pa.field("updated_at", TIMESTAMP, nullable=False),  # when it became ready
    ])


def popular_schema() -> pa.Schema:
    """The most interacted-with items: the answer when there is no model."""
    return pa.schema([
        key_field("item_id"),
        pa.field("count", pa.int64(), nullable=False),
        pa.field("updated_at", TIMESTAMP, nullable=False),
    ])


def follows_schema() -> pa.Schema:
    """Per item j: the items that followed j in users' recent items, with weights Σ 1/distance
    (model.blend.Signals.follows), the heaviest first."""
    return _per_item_lists("next_item_ids", "next_weights")


def fresh_schema() -> pa.Schema:
    """The fresh items: when each first came (the stream's applied-event count then) and its events since."""
    return pa.schema([
        key_field("item_id"),
        pa.field("first_event", pa.int64(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),
        pa.field("updated_at", TIMESTAMP, nullable=False),
    ])


def trend_schema() -> pa.Schema:
    """The hottest items of the stream (model.trend): each one's category, decayed weight and decayed
    offers, and its share of its category's heat."""
    return pa.schema([
        key_field("item_id"),
        pa.field("category", pa.string(), nullable=False),
        pa.field("weight", pa.float64(), nullable=False),
        pa.field("offers", pa.float64(), nullable=False),
        pa.field("share", pa.float64(), nullable=False),
        pa.field("updated_at", TIMESTAMP, nullable=False),
    ])


def neighbours_schema() -> pa.Schema:
    """Per item j: its nearest items by co-occurrence in users' recent items, with their cosines
    (model.blend.Signals.neighbours), the nearest first."""
    return _per_item_lists("neighbour_ids", "cosines")


def _per_item_lists(ids: str, weights: str) -> pa.Schema:
    """Per item: a list of other items and their weights (the key, ``ids``, ``weights``, in that order)."""
    return pa.schema([
        key_field("item_id"),
        pa.field(ids, pa.list_(pa.string())),
        pa.field(weights, pa.list_(pa.float32())),
        pa.field("updated_at", TIMESTAMP, nullable=False),
    ])


def blend_schema() -> pa.Schema:
    """The one row of ``serving_blend``: model.blend_weights.Blends as JSON, refitted on the popularity timer."""
    return pa.schema([
        pa.field("blend", pa.string(), nullable=False),
        pa.field("model_version", pa.string()),  # the version whose scores the weights were fitted with
        pa.field("updated_at", TIMESTAMP, nullable=False),
    ])


def layout_schema() -> pa.Schema:
    """The one row of ``store_layout``."""
    return pa.schema([
        pa.field("partitions", pa.int32(), nullable=False),
        pa.field("updated_at", TIMESTAMP, nullable=False),
    ])


def schema_for(base: str, dim: int) -> pa.Schema:
    """The schema of table family ``base`` (one of ITEMS, HISTORIES, INTERESTS, REGISTRY)."""
    if base == ITEMS:
        return items_schema(dim)
    return {HISTORIES: histories_schema, INTERESTS: interests_schema, REGISTRY: registry_schema}[base]()


def shard_table(base: str, shard: int) -> str:
    """``user_histories``, 3 -> ``user_histories_p003``."""
    if base not in SHARDED:
        raise ValueError(f"{base} is not sharded")
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard <= MAX_SHARD:
        raise ValueError(f"shard must be an int in 0..{MAX_SHARD}, got {shard!r}")
    return f"{base}_p{shard:03d}"


_SHARD_NAME = re.compile(r"^(?P<base>[a-z_]+)_p(?P<shard>\d{3})$")


def parse_table_name(name: str) -> tuple[str, int | None] | None:
    """``user_interests_p012`` -> (INTERESTS, 12); ``items`` -> (ITEMS, None); foreign -> None."""
    if name in (ITEMS, REGISTRY):
        return name, None
    match = _SHARD_NAME.match(name)
    if match and match["base"] in SHARDED:
        return match["base"], int(match["shard"])
    return None
