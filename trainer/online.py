"""`hymirec trainer`: the online trainer — learn from the stream's histories, guard, publish.

Every ``every_events`` new events or ``every_seconds`` (whichever first, and only if something is
new) one cycle runs:

1. **Data.** Users' histories from the ``user_histories`` shards: every user's, or, beyond
   ``trainer_max_users`` users, those with the most events not yet trained on. The live version
   records, per user, how many events it was trained on (``trained_events.json``); the user's events
   beyond that are *not yet trained on*. The newest of them, up to ``trainer_holdout`` per user, are
   held out.
2. **Train.** The live version is fine-tuned on the rest (or, with no version yet, a first one is
   trained from scratch: bootstrap).
3. **Prequential evaluation** (test-then-train, DESIGN §3): each held-out event is scored by the live
   model and by the candidate from the user's history before it, ranking the full catalogue and
   excluding the user's earlier items — Recall@10 and NDCG@10. With no version, the live scorer is
   what the worker serves then: the popular items.
4. **Guardrail.** The candidate is published unless its Recall@10 is below the live one's by more
   than ``margin``; the decision and both scores are logged either way.
5. **Publish**: ``ModelRegistry.publish`` (atomic, checksummed), then {"version", "parent",
   "metrics", "created_at"} on the ``model-versions`` topic. The held-out events are trained on in
   the next cycle, after they have been scored.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from lancedb.expr import col

from hymirec.errors import HymirecError
from hymirec.settings import Settings, kafka_client_options
from model.retrieval import popularity_vectors, rank_of_targets
from store.registry import ModelRegistry
from store.schemas import HISTORIES, shard_table
from store.tables import Store
from model.catalogue import with_log_only_ids
from serving.model import EncodedItems, ServingModel
from serving.reader import ready_versions
from trainer.metrics import ndcg_at_k, recall_at_k
from trainer.serving_model import bootstrap, load_model

log = logging.getLogger(__name__)

TRAINED = "trained_events.json"
POLL_S = 2.0
GUARD_METRIC = "recall@10"


@dataclass
class Case:
    """One held-out event: the user's history before it and the item."""

    user_id: str
    history: list[str]
    target: str
    codes: bytes | None = None  # the history's stored codes (user_histories.history_codes), if any
    codes_version: str | None = None  # the version whose codebook encoded them


@dataclass
class CycleData:
    items: pd.DataFrame  # the catalogue: item_id, text, category (plus ids only seen in histories)
    sequences: dict[str, list[str]]  # what the candidate trains on
    holdout: list[Case]
    trained: dict[str, int]  # per user: events the candidate has learned from
    events: int  # all events in the histories


def read_histories(store: Store, max_users: int | None = None, trained: dict[str, int] | None = None) -> pd.DataFrame:
    """user_id, history_item_ids, event_count of every user (all shards); with ``max_users``, of at
    most that many: those with the most events not in ``trained`` yet (the ids and counts of every
    user are read first, the histories only of those)."""
    columns = ["user_id", "history_item_ids", "event_count", "history_codes", "codebook_version"]
    shards = store.shards(HISTORIES)
    if not shards:
        return pd.DataFrame({c: [] for c in columns})
    if max_users is not None:
        counts = pd.concat([store.scan_histories(s, ["user_id", "event_count"]).to_pandas().assign(shard=s)
                            for s in shards], ignore_index=True)
        if len(counts) > max_users:
            new = counts["event_count"] - counts["user_id"].map(trained or {}).fillna(0)
            chosen = counts.loc[new.sort_values(ascending=False, kind="stable").index[:max_users]]
            tables = {s: store.table(shard_table(HISTORIES, s)) for s in shards}
            frames = [tables[s].search().where(col("user_id").isin(ids[start : start + 1000])).select(columns)
                      .limit(None).to_pandas()
                      for s, ids in chosen.groupby("shard")["user_id"].agg(list).items()
                      for start in range(0, len(ids), 1000)]
            return pd.concat(frames, ignore_index=True).drop_duplicates("user_id", keep="last")
    frames = [store.scan_histories(s, columns).to_pandas() for s in shards]
    return pd.concat(frames, ignore_index=True).drop_duplicates("user_id", keep="last")


def total_events(store: Store) -> int:
    return int(sum(store.scan_histories(s, ["event_count"])["event_count"].to_numpy().sum()
                   for s in store.shards(HISTORIES)))


def split_stream(histories: pd.DataFrame, items: pd.DataFrame, trained: dict[str, int], holdout: int) -> CycleData:
    """Hold out each user's newest not-yet-trained events (at most ``holdout``, always leaving one
    earlier item to predict from); the rest is the training data."""
    sequences, cases, learned = {}, [], {}
    codes = histories["history_codes"] if "history_codes" in histories else [None] * len(histories)
    versions = histories["codebook_version"] if "codebook_version" in histories else [None] * len(histories)
    for user, ids, count, blob, version in zip(histories["user_id"], histories["history_item_ids"],
                                               histories["event_count"], codes, versions):
        ids = [str(i) for i in ids]
        new = int(count) - trained.get(user, 0)
        held = max(0, min(holdout, new, len(ids) - 1))
        cut = len(ids) - held
        sequences[user] = ids[:cut]
        block = len(blob) // len(ids) if blob is not None and len(ids) else 0  # codes are aligned with ids
        cases += [Case(user, ids[:j], ids[j], blob[: j * block] if block else None, version if block else None)
                  for j in range(cut, len(ids))]
        learned[user] = int(count) - held
    seen = (i for seq in histories["history_item_ids"] for i in seq)
    catalogue = with_log_only_ids(items[["item_id", "text", "category"]], seen)
    return CycleData(catalogue, sequences, cases, learned, int(histories["event_count"].sum()))


# --- prequential scoring ------------------------------------------------------------------------
class PopularScorer:
    """The no-model answer (most popular among the training data) as a scorer
    (model.retrieval.popularity_vectors)."""

    def __init__(self, sequences: dict[str, list[str]]):
        counts = pd.Series([i for seq in sequences.values() for i in seq], dtype=object).value_counts()
        self.counts = counts.to_dict()
        self.top = max(1, int(counts.max())) if len(counts) else 1

    def encode_items(self, items: pd.DataFrame) -> EncodedItems:
        ids = [str(i) for i in items["item_id"]]
        vectors = popularity_vectors(np.array([self.counts.get(i, 0) for i in ids], dtype=np.float64), self.top)
        return EncodedItems(ids, vectors.numpy(), [None] * len(ids))

    def interests(self, histories, codes=None) -> np.ndarray:
        return np.tile(np.array([[[1.0, 0.0]]], np.float32), (len(histories), 1, 1))


def prequential_scores(model: ServingModel | PopularScorer, items: pd.DataFrame, cases: list[Case], k: int = 10,
                       batch: int = 256, codes_readable: frozenset[str] = frozenset()) -> dict[str, float]:
    """Recall@k / NDCG@k of the held-out events over the full catalogue (a target the model cannot
    embed counts as a miss); each user's earlier items are excluded. The model reads a history's
    stored codes when they were encoded by a version in ``codes_readable`` (its codebook's)."""
    encoded = model.encode_items(items)
    position = {item_id: j for j, item_id in enumerate(encoded.item_ids)}
    vectors = torch.as_tensor(encoded.vectors)
    ranks = np.full(len(cases), len(items), dtype=np.int64)
    for start in range(0, len(cases), batch):
        chunk = cases[start : start + batch]
        rows = [j for j, c in enumerate(chunk) if c.target in position]
        if not rows:
            continue
        codes = [chunk[j].codes if chunk[j].codes_version in codes_readable else None for j in rows]
        interests = torch.as_tensor(model.interests([chunk[j].history for j in rows], codes))
        targets = torch.as_tensor([position[chunk[j].target] for j in rows])
        exclude = [torch.as_tensor([position[i] for i in set(chunk[j].history) if i in position], dtype=torch.long)
                   for j in rows]
        ranks[[start + j for j in rows]] = rank_of_targets(interests, vectors, targets, exclude).numpy()
    return {f"recall@{k}": recall_at_k(ranks, k), f"ndcg@{k}": ndcg_at_k(ranks, k), "events": len(cases)}


def guardrail(live: dict, candidate: dict, margin: float) -> tuple[bool, str]:
    """Publish unless the candidate's Recall@10 is below the live one's by more than ``margin``."""
    gap = candidate[GUARD_METRIC] - live[GUARD_METRIC]
    if gap >= -margin:
        return True, f"candidate {GUARD_METRIC} {candidate[GUARD_METRIC]:.4f} vs live {live[GUARD_METRIC]:.4f} (gap {gap:+.4f} ≥ -{margin})"
    return False, f"candidate {GUARD_METRIC} {candidate[GUARD_METRIC]:.4f} is {-gap:.4f} below live {live[GUARD_METRIC]:.4f} (margin {margin})"


# --- one cycle ------------------------------------------------------------------------------------
@dataclass
class CycleResult:
    published: str | None  # the new version, or None
    parent: str | None
    decision: str
    live: dict | None = None
    candidate: dict | None = None

    def __str__(self) -> str:
        head = f"published {self.published} (parent {self.parent or '-'})" if self.published else "not published"
        return f"{head}: {self.decision}"


class OnlineTrainer:
    def __init__(self, settings: Settings, *, margin: float, epochs: int, backbone: str, announce: bool = True,
                 bootstrap_epochs: int | None = None):
        """``epochs`` per fine-tune, ``bootstrap_epochs`` (default ``trainer_bootstrap_epochs``) for the first
        version; ``announce`` False: publish to the registry only (workers find it by polling it)."""
        self.settings = settings
        self.announce = announce
        self.margin = margin
        self.epochs = epochs
        self.bootstrap_epochs = bootstrap_epochs or settings.trainer_bootstrap_epochs
        self.backbone = backbone
        self.store = Store(settings)
        self.registry = ModelRegistry(settings)

    def trained_counts(self, version: str | None) -> dict[str, int]:
        if version is None:
            return {}
        _, files = self.registry.load(version)
        return json.loads(files[TRAINED]) if TRAINED in files else {}

    def codes_readable(self, model) -> frozenset[str]:
        """The versions whose stored history codes ``model``'s codebook decodes (the same codebook)."""
        codebook = getattr(model, "codebook_id", None)
        if codebook is None:
            return frozenset()
        return frozenset(v for v, row in ready_versions(self.store).items() if row["codebook_id"] == codebook)

    def cycle(self) -> CycleResult:
        started = time.perf_counter()
        latest = self.registry.latest()
        live = load_model(self.settings, latest.version) if latest is not None else None
        trained = self.trained_counts(latest.version if latest else None)
        histories = read_histories(self.store, self.settings.trainer_max_users, trained)
        if histories.empty:
            raise HymirecError(f"no user histories in {self.settings.lancedb_uri} yet: replay some events first")
        items = self.store.all_items(["item_id", "text", "category"]).to_pandas()
        data = split_stream(histories, items, trained, self.settings.trainer_holdout)
        if not data.holdout:
            return CycleResult(None, live.version if live else None, "no events the live model has not trained on")

        live_scores = prequential_scores(live if live is not None else PopularScorer(data.sequences), data.items,
                                         data.holdout, codes_readable=self.codes_readable(live))
        if live is None:
            candidate = bootstrap(self.settings, data.items, data.sequences, self.bootstrap_epochs, self.backbone)
        else:
            candidate = live.fine_tune(data.items, data.sequences, self.epochs)
        cand_scores = prequential_scores(candidate, data.items, data.holdout, codes_readable=self.codes_readable(candidate))
        publish, why = guardrail(live_scores, cand_scores, self.margin)
        parent = live.version if live is not None else None
        against = parent or "popular items (no version yet)"
        log.info("guardrail: %s candidate (parent %s) — %s; live %s %s, candidate %s; %d held-out events, %.1f s",
                 "PUBLISH" if publish else "REJECT", parent or "-", why, against,
                 json.dumps(live_scores), json.dumps(cand_scores), len(data.holdout), time.perf_counter() - started)
        result = CycleResult(None, parent, why, live_scores, cand_scores)
        if not publish:
            return result
        metrics = {"live": live_scores, "candidate": cand_scores, "live_version": parent,
                   "guardrail": {"metric": GUARD_METRIC, "margin": self.margin, "decision": "publish"}}
        files, manifest = candidate.to_files(metrics)
        # Users left out of this cycle (trainer_max_users) keep their counts.
        files[TRAINED] = json.dumps(trained | data.trained, sort_keys=True).encode("utf-8")
        published = self.registry.publish(files, manifest, parent=parent)
        if self.announce:
            announce(self.settings, {"version": published.version, "parent": parent, "metrics": metrics,
                                     "created_at": published.manifest["created_at"]})
        result.published = published.version
        return result


def announce(settings: Settings, message: dict) -> bool:
    """Put a version message on ``model-versions``; the registry already has the version, so a
    broker that is down only delays workers until their next registry poll."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    try:
        producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", request_timeout_ms=10_000,
                                 max_block_ms=10_000, **kafka_client_options(settings))
        try:
            # One key: every version message lands in one partition, in publish order.
            producer.send(settings.topic_model_versions, key=b"model", value=json.dumps(message).encode("utf-8")).get(timeout=30)
        finally:
            producer.close(timeout=10)
    except KafkaError as exc:
        log.warning("published %s but could not announce it on %r (%s); workers find it within version_poll_s=%s",
                    message["version"], settings.topic_model_versions, exc, settings.version_poll_s)
        return False
    log.info("announced %s on %r", message["version"], settings.topic_model_versions)
    return True


def run(settings: Settings, *, every_events: int, every_seconds: float, once: bool, margin: float, epochs: int,
        backbone: str, bootstrap_epochs: int | None = None) -> int:
    trainer = OnlineTrainer(settings, margin=margin, epochs=epochs, backbone=backbone, bootstrap_epochs=bootstrap_epochs)
    if once:
        print(trainer.cycle())
        return 0
    latest = trainer.registry.latest()
    baseline = sum(trainer.trained_counts(latest.version).values()) if latest else 0
    last = time.monotonic()
    log.info("trainer: a cycle every %d new events or %.0f s (margin %.3f, %d epochs)", every_events, every_seconds, margin, epochs)
    while True:
        events = total_events(trainer.store) if trainer.store.shards(HISTORIES) else 0
        new = events - baseline
        if new >= every_events or (new > 0 and time.monotonic() - last >= every_seconds):
            log.info("trainer: %d new events, cycle starts", new)
            last = time.monotonic()
            try:
                print(trainer.cycle(), flush=True)
                baseline = events
            except Exception:  # noqa: BLE001 — a long-running service: log, retry after every_seconds
                log.exception("trainer: the cycle failed; retrying in %.0f s", every_seconds)
        time.sleep(POLL_S)


def trainer_command(args, settings: Settings) -> int:
    return run(
        settings,
        every_events=args.every_events or settings.trainer_every_events,
        every_seconds=args.every_seconds or settings.trainer_every_seconds,
        once=args.once,
        margin=settings.trainer_margin if args.margin is None else args.margin,
        epochs=args.epochs or settings.trainer_epochs,
        backbone=args.backbone or settings.trainer_backbone,
        bootstrap_epochs=args.bootstrap_epochs,
    )
