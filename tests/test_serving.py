"""The retrieval side on a real LanceDB directory, no broker: hot-swap, top-k, refresh, trainer cycle.

Two small HyMiRec models (tiny backbone, one epoch) are trained once per module on a synthetic log
and published into each test's own copy of a filled LanceDB directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from hymirec.settings import Settings
from store import ModelRegistry, Store
from stream.datasets import export_synthetic
from stream.ingest import RawEvent, apply_interactions, apply_items
from stream.io import read_interactions, read_items
from store.tables import table_names
from stream.serving import ServingRuntime, item_vectors_schema, open_own, ready_versions, recommend
from trainer.online import Case, OnlineTrainer, guardrail, prequential_scores, read_histories, split_stream

USERS, ITEMS, EVENTS_PER_USER = 40, 120, 20
PARTITIONS = 2


def raw(payload: dict, key: str, offset: int, partition: int) -> RawEvent:
    return RawEvent(json.dumps(payload).encode(), key.encode(), partition, offset)


def shard_of(user: str) -> int:
    return zlib.crc32(user.encode()) % PARTITIONS


def model_settings(uri: str) -> Settings:
    return Settings(lancedb_uri=uri, partitions=PARTITIONS, codebook_size=16, codebook_levels=2, num_interests=3,
                    trainer_epochs=1, interest_batch_size=16)


class Log:
    """A synthetic log applied through the ingest path, offsets counted per partition."""

    def __init__(self, store: Store, settings: Settings):
        self.store, self.settings = store, settings
        self.offsets = [0] * PARTITIONS

    def items(self, rows: list[dict]) -> None:
        apply_items(self.store, self.settings, [raw(r, r["item_id"], i, 0) for i, r in enumerate(rows)])

    def interactions(self, rows: list[dict], encoder=None) -> None:
        batch = []
        for r in rows:
            p = shard_of(r["user_id"])
            batch.append(raw(r, r["user_id"], self.offsets[p], p))
            self.offsets[p] += 1
        apply_interactions(self.store, self.settings, batch, encoder=encoder)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A filled LanceDB directory (no versions) and two trained models: m1 and m1 fine-tuned (m2)."""
    root = tmp_path_factory.mktemp("serving")
    export_synthetic(root / "data", users=USERS, items=ITEMS, interests=6, events_per_user=EVENTS_PER_USER,
                     drift=0.0, seed=1)
    interactions = read_interactions(root / "data" / "interactions.jsonl").to_dict("records")
    items = read_items(root / "data" / "items.jsonl")
    settings = model_settings(str(root / "lancedb"))
    store = Store(settings)
    log = Log(store, settings)
    log.items(items.to_dict("records"))
    log.interactions(interactions)

    from trainer.serving_model import bootstrap

    catalogue = items[["item_id", "text", "category"]]
    sequences = read_histories(store).set_index("user_id")["history_item_ids"].map(list).to_dict()
    m1 = bootstrap(settings, catalogue, sequences, epochs=1)
    m2 = m1.fine_tune(catalogue, sequences, epochs=1)
    return {"root": root, "uri": root / "lancedb", "m1": m1, "m2": m2, "offsets": log.offsets,
            "interactions": interactions, "items": items}


@pytest.fixture
def settings(world, tmp_path) -> Settings:
    uri = tmp_path / "lancedb"
    shutil.copytree(world["uri"], uri)
    return model_settings(str(uri))


def publish(settings: Settings, model, parent=None) -> str:
    files, manifest = model.to_files({"note": "test"})
    return ModelRegistry(settings).publish(files, manifest, parent=parent).version


def users_of(store: Store) -> list[str]:
    return sorted(read_histories(store)["user_id"])


# --- hot-swap ---------------------------------------------------------------------------------
def test_corrupt_versions_are_refused_and_the_switch_is_never_half_seen(world, settings):
    store = Store(settings)
    runtime = ServingRuntime(settings)
    v1 = publish(settings, world["m1"])
    runtime.start()
    users = users_of(store)
    assert runtime.live.version == v1
    assert {recommend(store, u).model_version for u in users} == {v1}

    # v0002: one byte flipped; v0003: a file cut short. Both refused, v0001 keeps answering.
    v2 = publish(settings, world["m2"], parent=v1)
    path = Path(ModelRegistry(settings).get(v2).path) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    v3 = publish(settings, world["m2"], parent=v1)
    path = Path(ModelRegistry(settings).get(v3).path) / "items.json"
    path.write_bytes(path.read_bytes()[:-10])
    assert runtime.switch_to(v2) == "refused"
    assert runtime.switch_to(v3) == "refused"
    assert runtime.live.version == v1
    assert set(ready_versions(store)) == {v1}
    assert {recommend(store, u).model_version for u in users} == {v1}

    # v0004 is good: switch while 8 threads keep asking.
    v4 = publish(settings, world["m2"], parent=v1)
    answers, errors, done = [], [], threading.Event()
    asked = threading.Barrier(9)  # every thread has answered once before the switch starts

    def ask(seed: int) -> None:
        rng = np.random.default_rng(seed)
        reader = Store(settings)
        first = True
        while True:
            finished = done.is_set()
            try:
                answers.append(recommend(reader, users[rng.integers(len(users))], 5))
            except Exception as exc:  # noqa: BLE001 — any failure is the test's finding
                errors.append(exc)
            if first:
                asked.wait(60)
                first = False
            if finished:
                return

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        asked.wait(60)
        assert runtime.switch_to(v4) == "switched"
    finally:
        done.set()
        for t in threads:
            t.join(60)
    assert not errors, errors[:3]
    # Answers from before the switch and after it (the last one of each thread), none from anything else.
    assert {a.model_version for a in answers} == {v1, v4}
    assert {recommend(store, u).model_version for u in users} == {v4}

    # Each answer's scores are those of exactly its version's interests and item vectors.
    histories = {row["user_id"]: list(row["history_item_ids"]) for _, row in read_histories(store).iterrows()}
    models = {v1: world["m1"], v4: world["m2"]}
    tables = {v: ready_versions(store)[v]["vectors_table"] for v in (v1, v4)}
    vectors = {}
    for v, name in tables.items():
        rows = open_own(store.db, name, item_vectors_schema(settings.embedding_dim)).to_arrow()
        vectors[v] = dict(zip(rows["item_id"].to_pylist(), np.asarray(rows["vector"].to_pylist(), dtype=np.float64)))
    assert tables[v1] != tables[v4]

    def expected(version, user, item):
        interests = models[version].interests([histories[user]])[0].astype(np.float64)
        v = vectors[version][item]
        return float((interests @ v / np.linalg.norm(interests, axis=1) / np.linalg.norm(v)).max())

    # The previous version's vectors stay (rows may still point to them); older ones go.
    v5 = publish(settings, world["m1"], parent=v4)
    assert runtime.switch_to(v5) == "switched"
    assert {recommend(store, u).model_version for u in users} == {v5}
    names = set(table_names(store.db))
    assert tables[v4] in names and tables[v1] not in names

    sample = answers[:: max(1, len(answers) // 40)]
    for answer in sample:
        other = v4 if answer.model_version == v1 else v1
        assert answer.vectors_table == tables[answer.model_version]
        top = answer.items[0]
        assert top.score == pytest.approx(expected(answer.model_version, answer.user_id, top.item_id), abs=1e-4)
        assert top.score != pytest.approx(expected(other, answer.user_id, top.item_id), abs=1e-4)


def test_no_version_means_popular_items_and_says_so(settings):
    store = Store(settings)
    rec = recommend(store, users_of(store)[0], 5)
    assert rec.model_version is None and "popular" in rec.fallback
    seen = set(store.get_histories([rec.user_id])[rec.user_id]["history_item_ids"])
    assert len(rec.items) == 5 and not seen & {s.item_id for s in rec.items}
    counts = [s.score for s in rec.items]
    assert counts == sorted(counts, reverse=True)


# --- top-k through the CLI -------------------------------------------------------------------------
def run_topk(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYMIREC_")}
    env["HYMIREC_LANCEDB_URI"] = settings.lancedb_uri
    return subprocess.run([sys.executable, "-m", "hymirec.cli", "topk", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_topk_cli(world, settings):
    store = Store(settings)
    publish(settings, world["m1"])
    ServingRuntime(settings).start()
    user = users_of(store)[3]
    seen = set(store.get_histories([user])[user]["history_item_ids"])

    unknown = run_topk(settings, "nobody-at-all", "--k", "3")
    assert unknown.returncode == 0, unknown.stderr
    assert "unknown user" in unknown.stdout and "popular" in unknown.stdout

    result = run_topk(settings, user, "--k", "7", "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert set(answer) >= {"user_id", "model_version", "items"}
    assert answer["user_id"] == user and answer["model_version"] == "v0001" and answer["fallback"] is None
    assert len(answer["items"]) == 7
    for item in answer["items"]:
        assert set(item) == {"item_id", "score", "interest"}
        assert isinstance(item["score"], float) and 0 <= item["interest"] < settings.num_interests
        assert item["item_id"] not in seen
    scores = [i["score"] for i in answer["items"]]
    assert scores == sorted(scores, reverse=True)

    with_seen = json.loads(run_topk(settings, user, "--k", "7", "--json", "--include-seen").stdout)
    assert with_seen["items"][0]["score"] >= scores[0]
    assert {i["item_id"] for i in with_seen["items"]} & seen  # a user's own items score high

    text = run_topk(settings, user, "--k", "2")
    assert text.returncode == 0 and "v0001" in text.stdout and answer["items"][0]["item_id"] in text.stdout


# --- freshness: events and items after the switch ------------------------------------------------------
def test_new_event_and_new_item_are_served_after_one_refresh(world, settings):
    store = Store(settings)
    publish(settings, world["m1"])
    runtime = ServingRuntime(settings)
    runtime.start()
    log = Log(store, settings)
    log.offsets = list(world["offsets"])
    user = users_of(store)[5]
    before = recommend(store, user, 5)
    interests_before = store.get_interests([user])[user]

    # The user takes the top recommendation: it is now seen, and the interests move.
    log.interactions([{"user_id": user, "item_id": before.items[0].item_id, "ts": 2_000_000_000_000,
                       "event_id": "fresh-1"}], encoder=runtime.live.index)
    assert runtime.refresh() == (0, 1)
    after = recommend(store, user, 5)
    row = store.get_interests([user])[user]
    assert before.items[0].item_id not in {s.item_id for s in after.items}
    assert row["updated_at"] > interests_before["updated_at"]
    assert not np.allclose(np.asarray(row["interests"]), np.asarray(interests_before["interests"]))
    history = store.get_histories([user])[user]
    assert history["codebook_version"] == "v0001"  # the ingest path encodes with the live codes

    # A brand-new item: embedded from its text, coded, retrievable, and encodable in histories.
    log.items([{"item_id": "brand-new", "text": world["items"]["text"][0] + " deluxe", "category": "x"}])
    assert runtime.refresh()[0] == 1
    table = open_own(store.db, runtime.live.row["vectors_table"], item_vectors_schema(settings.embedding_dim))
    row = table.search().where("item_id = 'brand-new'").to_arrow().to_pylist()[0]
    assert row["codes"] is not None and np.linalg.norm(row["vector"]) > 0
    assert runtime.live.index.codes_for(["brand-new"])["brand-new"] == row["codes"]
    hit = table.search(np.asarray(row["vector"])).distance_type("cosine").limit(1).to_arrow()
    assert hit["item_id"][0].as_py() == "brand-new"


# --- trainer ---------------------------------------------------------------------------------------
def test_guardrail_and_holdout():
    assert guardrail({"recall@10": 0.50}, {"recall@10": 0.45}, 0.1)[0]
    assert not guardrail({"recall@10": 0.50}, {"recall@10": 0.45}, 0.01)[0]
    assert guardrail({"recall@10": 0.50}, {"recall@10": 0.60}, 0.0)[0]

    import pandas as pd

    histories = pd.DataFrame({"user_id": ["a", "b", "c"],
                              "history_item_ids": [["1", "2", "3", "4"], ["5", "6"], ["7"]],
                              "event_count": [4, 2, 1]})
    items = pd.DataFrame({"item_id": ["1", "2", "3", "4", "5", "6"], "text": ["t"] * 6, "category": [None] * 6})
    data = split_stream(histories, items, trained={"a": 3}, holdout=2)
    # a: one event not trained on → held out; b: two new, holdout 2 but one earlier item must stay;
    # c: nothing to predict from.
    assert data.sequences == {"a": ["1", "2", "3"], "b": ["5"], "c": ["7"]}
    assert [(c.user_id, c.history, c.target) for c in data.holdout] == [("a", ["1", "2", "3"], "4"), ("b", ["5"], "6")]
    assert data.trained == {"a": 3, "b": 1, "c": 1}
    assert set(data.items["item_id"]) == {"1", "2", "3", "4", "5", "6", "7"}  # "7" only in a history


def test_prequential_scores_rank_the_full_catalogue(world):
    items = world["items"][["item_id", "text", "category"]]
    model = world["m1"]
    history = [items["item_id"][0], items["item_id"][1]]
    # The target is the model's own top item: a hit at rank 0 (Recall@10 = NDCG@10 = 1).
    scores = model.interests([history])[0]
    encoded = model.encode_items(items)
    sims = (encoded.vectors / np.linalg.norm(encoded.vectors, axis=1, keepdims=True)) @ (
        scores / np.linalg.norm(scores, axis=1, keepdims=True)).T
    order = [encoded.item_ids[j] for j in np.argsort(-sims.max(axis=1)) if encoded.item_ids[j] not in history]
    hit = prequential_scores(model, items, [Case("u", history, order[0])])
    miss = prequential_scores(model, items, [Case("u", history, order[-1])])
    assert hit["recall@10"] == 1.0 and hit["ndcg@10"] == pytest.approx(1.0)
    assert miss["recall@10"] == 0.0 and miss["events"] == 1


def test_trainer_cycle_bootstraps_then_guards(settings, world, caplog):
    caplog.set_level("INFO", logger="trainer.online")
    store = Store(settings)
    first = OnlineTrainer(settings, margin=1.0, epochs=1, backbone="tiny", announce=False).cycle()
    assert first.published == "v0001" and first.parent is None
    assert first.live["events"] == first.candidate["events"] > 0
    assert "guardrail: PUBLISH" in caplog.text

    registry = ModelRegistry(settings)
    _, files = registry.load("v0001")
    trained = json.loads(files["trained_events.json"])
    assert sum(trained.values()) == sum(r["event_count"] for r in store.get_histories(users_of(store)).values()) - first.live["events"]

    # Nothing new since v0001 apart from what it held out: those are now scored, then trained on.
    log = Log(store, settings)
    log.offsets = list(world["offsets"])
    user = users_of(store)[0]
    log.interactions([{"user_id": user, "item_id": world["items"]["item_id"][7], "ts": 2_000_000_000_000, "event_id": "n1"}])
    rejected = OnlineTrainer(settings, margin=-1.0, epochs=1, backbone="tiny", announce=False).cycle()
    assert rejected.published is None and rejected.parent == "v0001"
    assert "guardrail: REJECT" in caplog.text
    assert [v.version for v in registry.list()] == ["v0001"]

    second = OnlineTrainer(settings, margin=1.0, epochs=1, backbone="tiny", announce=False).cycle()
    assert second.published == "v0002" and second.parent == "v0001"
    manifest = registry.get("v0002").manifest
    assert manifest["parent"] == "v0001" and manifest["metrics"]["live_version"] == "v0001"
    assert set(manifest["metrics"]["candidate"]) == {"recall@10", "ndcg@10", "events"}


def test_vectors_get_an_ann_index_that_keeps_the_exact_answers(world, settings):
    settings = settings.model_copy(update={"ann_min_rows": 100})  # the catalogue has 120 items
    store = Store(settings)
    publish(settings, world["m1"])
    runtime = ServingRuntime(settings)
    runtime.start()
    table = open_own(store.db, runtime.live.row["vectors_table"], item_vectors_schema(settings.embedding_dim))
    assert any(index.columns == ["vector"] for index in table.list_indices())

    rows = table.to_arrow()
    ids = rows["item_id"].to_pylist()
    vectors = np.asarray(rows["vector"].to_pylist())
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    found = []
    for user in users_of(store):
        interests = np.asarray(store.get_interests([user])[user]["interests"])
        seen = set(store.get_histories([user])[user]["history_item_ids"])
        scores = (vectors @ (interests / np.linalg.norm(interests, axis=1, keepdims=True)).T).max(axis=1)
        exact = [ids[j] for j in np.argsort(-scores) if ids[j] not in seen][:5]
        found.append(len(set(exact) & {s.item_id for s in recommend(store, user, 5).items}) / 5)
    assert np.mean(found) >= 0.9


def test_a_version_from_hymirec_train_is_served_and_embeds_new_items(world, settings):
    """`hymirec train` publishes no encoder files: the worker rebuilds the encoder from the recipe,
    checks it against the stored content, and uses it for items that version has not seen."""
    from argparse import Namespace

    from trainer.publish import train_and_publish

    data = world["root"] / "data"
    train_and_publish(Namespace(interactions=data / "interactions.jsonl", items=data / "items.jsonl", model="hymirec",
                                backbone="tiny", epochs=1, seed=None, device="cpu"), settings)
    store = Store(settings)
    runtime = ServingRuntime(settings)
    runtime.start()
    assert runtime.live.version == "v0001" and runtime.live.model.encoder is not None
    assert recommend(store, users_of(store)[0]).model_version == "v0001"
    Log(store, settings).items([{"item_id": "brand-new", "text": world["items"]["text"][3], "category": None}])
    assert runtime.refresh()[0] == 1
    # Same text as a catalogue item: the same content. The codebook quantises whole item vectors, and
    # a new item has no trained ID embedding, so its codes are those of its twin's content part alone.
    twin = world["items"]["item_id"][3]
    codes = runtime.live.index.codes_for(["brand-new", twin])
    items = runtime.live.model.module.items
    with torch.no_grad():
        content_only = items.content_vectors(items.content[runtime.live.model.catalogue.index[twin]])[None]
        expected = items.codebook.pack(*items.codebook.encode(content_only))[0].tobytes()
    assert codes["brand-new"] == expected
    assert codes[twin] is not None and len(codes[twin]) == len(expected)
