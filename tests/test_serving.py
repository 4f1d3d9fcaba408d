"""The retrieval side on a real LanceDB directory, no broker: top-k, refresh, trainer cycle (the
hot-swap under bad artefacts and concurrent readers is in test_reliability.py).

Two small HyMiRec models (tiny backbone, one epoch) are trained once per module on a synthetic log
(tests/helpers.py build_world) and published into each test's own copy of a filled LanceDB directory.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hymirec.settings import Settings
from store import ModelRegistry, Store
import serving.hymirec
from serving.reader import open_own, recommend
import serving.runtime
from serving.runtime import ServingRuntime
from store.schemas import HISTORIES, item_vectors_schema
from store.tables import table_names
from trainer.serving_model import load_model
from trainer.online import Case, OnlineTrainer, guardrail, prequential_scores, read_histories, split_stream

from helpers import Log, publish, users_of, world, world_settings  # noqa: F401 — world, world_settings: fixtures


@pytest.fixture
def settings(world_settings) -> Settings:
    return world_settings


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
def serving_m1(world, settings: Settings) -> tuple[Store, ServingRuntime, Log]:
    """m1 published and live in a runtime, and a log that goes on where the world's left off."""
    store = Store(settings)
    publish(settings, world["m1"])
    runtime = ServingRuntime(settings)
    runtime.start()
    log = Log(store, settings)
    log.offsets = list(world["offsets"])
    return store, runtime, log


def test_new_event_and_new_item_are_served_after_one_refresh(world, settings):
    store, runtime, log = serving_m1(world, settings)
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


def test_rows_the_ingest_path_hands_over_are_refreshed_at_once_and_the_scan_finds_the_rest(world, settings):
    store, runtime, log = serving_m1(world, settings.model_copy(update={"serving_scan_s": 0.5}))
    users = users_of(store)[:4]
    before = store.get_interests(users)
    item = world["items"]["item_id"][0]

    def click(user: str, n: int) -> dict:
        return {"user_id": user, "item_id": item, "ts": 2_000_000_000_000 + n, "event_id": f"handed-{user}-{n}"}

    written = log.interactions([click(u, 0) for u in users[:3]], encoder=runtime.live.index)
    # Recomputed from the rows handed over; the scan (due: none yet since the switch) finds the same
    # rows changed and skips them, so each user is counted once.
    assert runtime.refresh(written.rows) == (0, 3)
    stored = store.get_histories(users[:3])
    expected = runtime.live.model.interests([stored[u]["history_item_ids"] for u in users[:3]],
                                            [stored[u]["history_codes"] for u in users[:3]])
    after = store.get_interests(users)
    for user, vectors in zip(users[:3], expected):
        assert after[user]["updated_at"] > before[user]["updated_at"]
        np.testing.assert_allclose(np.asarray(after[user]["interests"]), vectors, atol=1e-5)
    assert after[users[3]]["updated_at"] == before[users[3]]["updated_at"]

    # Written but not handed over (another process, a lost step): left until the next scan is due.
    log.interactions([click(users[3], 1)], encoder=runtime.live.index)
    assert runtime.refresh({}) == (0, 0)
    time.sleep(0.6)
    assert runtime.refresh({}) == (0, 1)
    assert store.get_interests([users[3]])[users[3]]["updated_at"] > before[users[3]]["updated_at"]

    # Rows of a shard this worker no longer owns are its new owner's to refresh.
    written = log.interactions([click(users[0], 2)], encoder=runtime.live.index)
    runtime.shards = set(range(settings.partitions)) - set(written.rows)
    assert runtime.refresh(written.rows) == (0, 0)


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

    # Stored codes (two bytes an item here) follow each held-out history: the prefix of its items.
    coded = histories.assign(history_codes=[b"a1a2a3a4", None, b"g7"], codebook_version=["v0001", None, "v0001"])
    cases = split_stream(coded, items, trained={"a": 3}, holdout=2).holdout
    assert [(c.codes, c.codes_version) for c in cases] == [(b"a1a2a3", "v0001"), (None, None)]


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


def test_fine_tuning_draws_negatives_as_todays_settings_say(world):
    items = world["items"][["item_id", "text", "category"]]
    sequences = {}
    for event in world["interactions"][:200]:
        sequences.setdefault(event["user_id"], []).append(event["item_id"])
    live = copy.copy(world["m1"])
    live.settings = live.settings.model_copy(update={"train_negatives": 5, "train_negatives_popular": 0.25})
    tuned = live.fine_tune(items, sequences, epochs=1).module.objective
    assert (tuned.negatives, tuned.negatives_popular) == (5, 0.25)
    assert world["m1"].module.objective.negatives != 5


def test_trainer_cycle_bootstraps_then_guards(settings, world, caplog):
    caplog.set_level("INFO", logger="trainer.online")
    store = Store(settings)
    first = OnlineTrainer(settings, margin=1.0, epochs=1, backbone="tiny", announce=False, bootstrap_epochs=1).cycle()
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
    rejected = OnlineTrainer(settings, margin=-1.0, epochs=1, backbone="tiny", announce=False, bootstrap_epochs=1).cycle()
    assert rejected.published is None and rejected.parent == "v0001"
    assert "guardrail: REJECT" in caplog.text
    assert [v.version for v in registry.list()] == ["v0001"]

    second = OnlineTrainer(settings, margin=1.0, epochs=1, backbone="tiny", announce=False, bootstrap_epochs=1).cycle()
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
    from trainer.publish import train_and_publish

    data = world["root"] / "data"
    train_and_publish(settings, interactions=data / "interactions.jsonl", items=data / "items.jsonl", model="hymirec",
                      backbone="tiny", epochs=1, device="cpu")
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


def test_trainer_reads_at_most_max_users_those_with_most_untrained_events(settings):
    store = Store(settings)
    everyone = read_histories(store)
    counts = dict(zip(everyone["user_id"], everyone["event_count"]))
    # Every user trained on all but one event, except three users with 5 untrained ones.
    behind = sorted(counts)[:3]
    trained = {u: c - (5 if u in behind else 1) for u, c in counts.items()}
    picked = read_histories(store, max_users=3, trained=trained)
    assert sorted(picked["user_id"]) == behind
    for _, row in picked.iterrows():
        assert list(row["history_item_ids"]) == list(everyone.set_index("user_id").loc[row["user_id"], "history_item_ids"])
    assert len(read_histories(store, max_users=len(counts) + 1, trained=trained)) == len(counts)


# --- the coarse branch reads the stored history codes ---------------------------------------------------------
def stored_codes(model, history: list[str]) -> bytes:
    """A history's codes as the ingest path stores them: each item's packed codes, back to back."""
    items = model.module.items
    rows = torch.as_tensor([model.catalogue.index[i] for i in history])
    return items.codebook.pack_history(items.codes[rows], items.scales[rows])


def test_interests_come_from_the_stored_codes_not_the_item_table(world, settings):
    model = load_model(settings, publish(settings, world["m1"]))
    store = Store(settings)
    histories = [store.get_histories([u])[u]["history_item_ids"] for u in users_of(store)[:4]]
    blobs = [stored_codes(model, h) for h in histories]
    from_ids = model.interests(histories)
    from_codes = model.interests(histories, blobs)
    assert np.allclose(from_codes, from_ids, atol=1e-5)  # the same codebook: the same coarse inputs

    # A corrupted code in the coarse window changes the interests; the other users' stay.
    book = model.module.items.codebook
    bad = bytearray(blobs[0])
    at = (len(histories[0]) - 3) * book.bytes_per_item
    bad[at] = (bad[at] + 1) % book.config.size
    corrupted = model.interests(histories, [bytes(bad), *blobs[1:]])
    assert not np.allclose(corrupted[0], from_codes[0], atol=1e-4)
    assert np.allclose(corrupted[1:], from_codes[1:], atol=1e-6)

    # Without the model's table of every item's decoded codes, histories with codes are served alike.
    model.module.items.history_table.zero_()
    assert np.allclose(model.interests(histories, blobs), from_codes, atol=1e-6)
    assert not np.allclose(model.interests(histories), from_ids, atol=1e-4)


def test_a_users_interests_do_not_depend_on_the_other_users_of_the_batch(world, settings, monkeypatch):
    """Users are batched by history length (fewer per batch the longer they are) and the recent window
    is cut to the batch's longest history: none of it may change what a user gets (stored codes or not)."""
    publish(settings, world["m1"])
    runtime = ServingRuntime(settings)
    runtime.start()
    model = runtime.live.model
    rng = np.random.default_rng(0)
    items = list(world["items"]["item_id"])
    histories = [[str(i) for i in rng.choice(items, n)] for n in (1, 3, 90, 8, 2, 60, 5)]
    codes = [stored_codes(model, h) if n % 2 else None for n, h in enumerate(histories)]
    together = model.interests(histories, codes)
    alone = np.concatenate([model.interests([h], [c]) for h, c in zip(histories, codes)])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    monkeypatch.setattr(serving.hymirec, "INTERESTS_CELLS", 2 * 60**2)  # the 60- and 90-item users one at a time
    np.testing.assert_allclose(model.interests(histories, codes), together, atol=1e-5)
    assert not np.allclose(together[0], together[1], atol=1e-3)  # not all alike


def test_the_runtime_hands_the_model_the_rows_codes_of_its_codebook(world, settings):
    store = Store(settings)
    publish(settings, world["m1"])
    runtime = ServingRuntime(settings)
    runtime.start()
    user = users_of(store)[0]
    shard = next(s for s in store.shards(HISTORIES) if store.get_histories([user], shard=s))
    row = store.get_histories([user], shard=shard)[user]
    before = store.get_interests([user])[user]["interests"]
    blob = bytearray(stored_codes(runtime.live.model, row["history_item_ids"]))
    blob[-runtime.live.model.module.items.codebook.bytes_per_item] ^= 1  # the newest item's first code
    store.upsert_histories(shard, [{**row, "history_codes": bytes(blob), "codebook_version": runtime.live.version,
                                    "updated_at": None}])
    assert runtime.refresh_interests() == 1
    after = store.get_interests([user])[user]["interests"]
    assert not np.allclose(np.asarray(after), np.asarray(before), atol=1e-4)


# --- several workers: one writer of the shared tables --------------------------------------------------
def test_only_the_catalogue_writer_writes_shared_tables_and_followers_take_its_versions(world, settings, monkeypatch):
    """Two runtimes on one store, as two workers of a group: the one owning the catalogue partition
    embeds versions and new items and counts the blend; the other waits for the writer's versions,
    reads its vectors table and encodes new items for its own interests without writing them."""
    store = Store(settings)
    writer_role = {"writer": False}
    writer = ServingRuntime(settings, owns_catalogue=lambda: writer_role["writer"])
    follower = ServingRuntime(settings, owns_catalogue=lambda: False)
    publish(settings, world["m1"])

    assert follower.switch_to("v0001") == "waiting" and follower.live is None
    assert writer.switch_to("v0001") == "waiting"  # not (yet) the writer either: nothing is written
    assert "serving_versions" not in table_names(store.db)

    writer_role["writer"] = True
    assert writer.refresh() == (0, 0) and writer.live.version == "v0001"  # the version waited for
    table = writer.live.row["vectors_table"]
    assert follower.refresh()[0] == 0 and follower.live.version == "v0001"
    assert follower.live.row["vectors_table"] == table
    known = list(world["items"]["item_id"][:5])
    assert follower.live.index.codes_for(known) == writer.live.index.codes_for(known) and len(writer.live.index.codes_for(known)) == 5

    vectors = open_own(store.db, table, item_vectors_schema(settings.embedding_dim))
    Log(store, settings).items([{"item_id": "brand-new", "text": world["items"]["text"][0], "category": None}])
    written_at = vectors.version
    assert follower.refresh()[0] == 1 and follower.live.index.codes_for(["brand-new"])  # encoded, not written
    assert vectors.version == written_at and vectors.count_rows("item_id = 'brand-new'") == 0
    assert writer.refresh()[0] == 1 and vectors.count_rows("item_id = 'brand-new'") == 1
    assert follower.live.index.codes_for(["brand-new"]) == writer.live.index.codes_for(["brand-new"])

    # An item that arrives while the writer's role is in doubt (a rebalance) is encoded, not written;
    # once the role is back the vectors the table lacks are written.
    Log(store, settings).items([{"item_id": "mid-rebalance", "text": world["items"]["text"][1], "category": None}])
    writer_role["writer"] = False
    assert writer.refresh()[0] == 1 and vectors.count_rows("item_id = 'mid-rebalance'") == 0
    writer_role["writer"] = True
    assert writer.refresh()[0] == 1 and vectors.count_rows("item_id = 'mid-rebalance'") == 1
    assert writer.refresh()[0] == 0

    assert follower.refresh_popularity() == 0 and "popular_items" not in table_names(store.db)
    assert writer.refresh_popularity() > 0

    # A second version reaches the follower without a message: it looks for ready versions itself.
    publish(settings, world["m2"], parent="v0001")
    assert writer.catch_up() == "switched"
    monkeypatch.setattr(serving.runtime, "FOLLOW_S", 0.0)  # its once-a-second look is due at once
    follower.refresh()
    assert follower.live.version == "v0002"
    assert {r["model_version"] for r in store.get_interests(users_of(store)).values()} == {"v0002"}
