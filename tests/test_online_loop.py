"""The whole online loop against the real broker: worker (faust subprocess), trainer, hot-swap, top-k.

replay → worker histories → `hymirec trainer --once` publishes v0001 → the worker hot-swaps (top-k
goes from popular items to v0001) → a new interaction changes the user's history and top-k → a second
trainer cycle publishes v0002 (parent v0001), the guardrail decision logged → the worker switches.
Timings are printed (run with -s), never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hymirec.settings import Settings
from store import ModelRegistry, Store
from stream.replay import replay
from serving.reader import recommend
from trainer.online import total_events

from helpers import http_get, private_worker, produce, running_worker, tail, wait_for, worker_env

pytestmark = pytest.mark.broker

DEADLINE_S = 180.0


@pytest.fixture
def loop_settings(topic_settings: Settings, tmp_path: Path) -> Settings:
    return private_worker(
        topic_settings, tmp_path,
        batch_size=500,
        serving_refresh_s=0.2,
        version_poll_s=600.0,  # the switch must come from the model-versions message
        popularity_refresh_s=5.0,
        codebook_size=16,
        codebook_levels=2,
        trainer_epochs=1,
        trainer_bootstrap_epochs=1,
    )


def cli(settings: Settings, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hymirec.cli", *args], capture_output=True, text=True,
                          env=worker_env(settings), timeout=timeout)


def wait_until(what: str, check, proc: subprocess.Popen, log_file: Path, deadline_s: float = DEADLINE_S):
    # A short poll: the freshness it reports is measured with it.
    return wait_for(what, check, proc, log_file, deadline_s, interval=0.05)


def http_topk(settings: Settings, user: str, k: int = 10) -> dict | None:
    body = http_get(settings, f"/recommend/{user}?k={k}")
    return json.loads(body) if body else None


def test_online_loop_end_to_end(loop_settings: Settings, tmp_path: Path):
    s = loop_settings
    data = tmp_path / "data"
    exported = cli(s, "datasets", "export", "synthetic", "--users", "100", "--items", "300", "--out", str(data))
    assert exported.returncode == 0, exported.stderr
    events = sum(1 for _ in open(data / "interactions.jsonl"))
    log_file = tmp_path / "worker.log"
    store = Store(s)

    with running_worker(s, log_file) as proc:
        wait_until("the worker's web server", lambda: http_get(s, "/health"), proc, log_file)
        replay(s, data / "interactions.jsonl", items_path=data / "items.jsonl", progress=False)
        wait_until("every event in the histories", lambda: store.shards("user_histories") and total_events(store) == events,
                   proc, log_file)

        # No version yet: popular items, and the answer says so (CLI and HTTP alike).
        user = json.loads(open(data / "interactions.jsonl").readline())["user_id"]
        before = cli(s, "topk", user, "--json")
        assert before.returncode == 0, before.stderr
        popular = json.loads(before.stdout)
        assert popular["model_version"] is None and "popular" in popular["fallback"]
        assert http_topk(s, user)["model_version"] is None

        # First trainer cycle: bootstrap, guardrail against the popular items, publish, announce.
        started = time.monotonic()
        first = cli(s, "trainer", "--once", "--margin", "1")
        assert first.returncode == 0, first.stderr[-3000:]
        assert "published v0001" in first.stdout and "guardrail: PUBLISH" in first.stderr
        print(f"\ntrainer cycle 1: {time.monotonic() - started:.1f} s; {first.stdout.strip()}")
        swapped = wait_until("the worker to serve v0001", lambda: http_topk(s, user)["model_version"] == "v0001",
                             proc, log_file)
        assert swapped
        cli_answer = json.loads(cli(s, "topk", user, "--json").stdout)
        assert cli_answer["model_version"] == "v0001" and cli_answer["fallback"] is None
        # Served by the blend's prior from the worker's first count on: an item outside the model's pool
        # (reached by the stream's signals) has no interest that scored it.
        interests = [item["interest"] for item in cli_answer["items"]]
        assert all(i is None or 0 <= i < s.num_interests for i in interests)
        assert cli_answer["ranked_by"] == "blend" or None not in interests

        # A new interaction: the user takes its top item; history and top-k follow within a bounded wait.
        history = store.get_histories([user])[user]
        interests_before = store.get_interests([user])[user]
        taken = cli_answer["items"][0]["item_id"]
        event = {"user_id": user, "item_id": taken, "ts": int(time.time() * 1000), "action": "click", "event_id": "e2e-1"}
        t0 = time.monotonic()
        produce(s, [(s.topic_interactions, user.encode(), json.dumps(event).encode())])

        def fresh(who: str, item: str, since) -> bool:
            """The user's interests were recomputed after the event and top-k no longer offers the item."""
            answer = http_topk(s, who)
            row = store.get_interests([who])[who]
            return bool(answer) and row["updated_at"] > since and item not in {i["item_id"] for i in answer["items"]}

        wait_until("the new event in the user's top-k", lambda: fresh(user, taken, interests_before["updated_at"]),
                   proc, log_file)
        freshness = time.monotonic() - t0
        after = store.get_histories([user])[user]
        assert after["history_item_ids"] == list(history["history_item_ids"]) + [taken]
        assert not np.allclose(np.asarray(store.get_interests([user])[user]["interests"]),
                               np.asarray(interests_before["interests"]))
        lags = [freshness]
        for other in [u for u in (f"u{i:02d}" for i in range(1, 100)) if u != user][:4]:
            took = http_topk(s, other)["items"][0]["item_id"]
            since = store.get_interests([other])[other]["updated_at"]
            t0 = time.monotonic()
            produce(s, [(s.topic_interactions, other.encode(), json.dumps({**event, "user_id": other, "item_id": took,
                                                                            "event_id": f"e2e-{other}"}).encode())])
            wait_until(f"{other}'s new event in its top-k", lambda: fresh(other, took, since), proc, log_file)
            lags.append(time.monotonic() - t0)
        print(f"freshness (event produced → top-k changed, over HTTP), {len(lags)} events: "
              + ", ".join(f"{lag:.2f}" for lag in lags) + " s")

        # Second cycle: fine-tune v0001 on what it has not trained on, guard against v0001, publish v0002.
        second = cli(s, "trainer", "--once", "--margin", "1")
        assert second.returncode == 0, second.stderr[-3000:]
        assert "published v0002 (parent v0001)" in second.stdout
        assert "guardrail: PUBLISH candidate (parent v0001)" in second.stderr
        print(f"trainer cycle 2: {second.stdout.strip()}")
        registry = ModelRegistry(s)
        assert registry.get("v0002").parent == "v0001"
        wait_until("the worker to serve v0002", lambda: http_topk(s, user)["model_version"] == "v0002", proc, log_file)

        # Prequential scores of both versions, as published and as exported by the worker.
        for version in ("v0001", "v0002"):
            metrics = registry.get(version).manifest["metrics"]
            print(f"{version}: live {metrics['live']} candidate {metrics['candidate']}")
        exported_metrics = http_get(s, "/metrics").decode()
        assert 'hymirec_serving_info{version="v0002"} 1.0' in exported_metrics
        assert 'hymirec_trainer_score{metric="recall@10",model="candidate",version="v0002"}' in exported_metrics

        latencies = []
        for i in range(50):
            t = time.perf_counter()
            assert http_topk(s, f"u{i % 100:02d}") is not None
            latencies.append(time.perf_counter() - t)
        cli_started = time.perf_counter()
        recommend(store, user)
        print(f"GET /recommend p50 {np.median(latencies) * 1000:.1f} ms, p95 {np.percentile(latencies, 95) * 1000:.1f} ms; "
              f"in-process recommend {(time.perf_counter() - cli_started) * 1000:.1f} ms")
        assert "Traceback" not in log_file.read_text(errors="replace"), tail(log_file, 80)
