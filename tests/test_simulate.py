"""`hymirec simulate`: the pure parts (scoring, windows, summary, plot) and, against the real broker,
both arms through a small drifting log."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import bench.arms
from bench.diagnostic import Diagnostic, exact_histories, extend
from bench.prequential import paired_gap, rank_of, rolling, score_chunk, score_event, thirds, windows
from bench.arms import SimConfig, baseline_arms, categories_of
from bench.in_process import run_in_process
from bench.oracle import HINDSIGHT, ORACLE, ORACLE_ITEMS, ORACLE_MIX
from bench.simulate import run_simulation
from bench.simulate_report import summarise, summary_markdown
from bench.simulate_plot import plot
from hymirec.settings import Settings
from model.baselines import MostPopular
from store import Store
from stream.datasets import export_synthetic
from serving.reader import Recommender, recommend
from serving.runtime import ServingRuntime
from store.logs import read_interactions, read_items
from trainer.serving_model import HyMiRecServing

from helpers import model_settings, publish, users_of, world, world_settings  # noqa: F401 — world, world_settings: fixtures

BASELINES = ("pop", "recent-pop", "rules", "item-knn", "ease", "cat-trend")
ORACLES = (ORACLE, ORACLE_MIX, ORACLE_ITEMS, HINDSIGHT)


# --- pure parts ------------------------------------------------------------------------------------
def test_score_event_known_ranks():
    assert score_event(0) == (1, 1.0)
    hit, ndcg = score_event(2)
    assert hit == 1 and ndcg == pytest.approx(1 / math.log2(4))
    assert score_event(9) == (1, pytest.approx(1 / math.log2(11)))
    assert score_event(10) == (0, 0.0)  # outside the top 10
    assert score_event(-1) == (0, 0.0)  # not in the answer
    assert rank_of("b", ["a", "b", "c"]) == 1 and rank_of("z", ["a"]) == -1


def test_score_chunk_separates_cold_users_and_reads_the_history():
    events = pd.DataFrame({"position": [7, 8, 9], "user_id": ["u1", "u2", "u1"], "item_id": ["x", "y", "q"]})
    answers = {"u1": ("v0002", ["a", "x", "b"]), "u2": (None, ["y"])}
    records = score_chunk(events, answers, {"u1": ["a", "q"]}, applied=7, bootstrap_items={"x", "q"})
    first, cold, repeat = records
    assert (first["hit"], first["rank"], first["cold"], first["history_len"], first["model_version"]) == (1, 1, False, 2, "v0002")
    assert first["ndcg"] == pytest.approx(1 / math.log2(3))
    assert cold["cold"] and cold["history_len"] == 0 and cold["hit"] == 1  # scored, but counted apart
    assert repeat["in_history"] and repeat["hit"] == 0
    assert [r["new_item"] for r in records] == [False, True, False]
    assert {r["applied"] for r in records} == {7}


def records_of(hits: list[int], start: int = 100, cold_every: int = 0) -> list[dict]:
    return [{"position": start + i, "hit": h, "ndcg": float(h) * 0.5, "cold": bool(cold_every) and i % cold_every == 0,
             "new_item": i % 4 == 1,
             "model_version": "v0001" if i < len(hits) // 2 else "v0002"} for i, h in enumerate(hits)]


def test_windows_rolling_and_thirds():
    recs = records_of([1, 0, 0, 0] * 5 + [1, 1, 0, 0] * 5, cold_every=0)
    wins = windows(recs, 8)
    assert [w["events"] for w in wins] == [8, 8, 8, 8, 8]
    assert wins[0]["recall@10"] == pytest.approx(0.25) and wins[-1]["recall@10"] == pytest.approx(0.5)
    assert wins[0]["first_position"] == 100 and wins[-1]["last_position"] == 139
    assert wins[2]["versions"] == ["v0001", "v0002"]
    curve = rolling(recs, 4)
    assert curve["recall"].iloc[-1] == pytest.approx(0.5) and curve["ndcg"].iloc[-1] == pytest.approx(0.25)
    parts = thirds(recs, 100, 140)
    assert sum(p["events"] for p in parts) == 40 and parts[0]["recall@10"] < parts[2]["recall@10"]
    # Cold events are left out of every windowed metric.
    with_cold = records_of([1] * 10, cold_every=2)
    assert sum(w["events"] for w in windows(with_cold, 3)) == 5


def test_summary_and_paired_gap():
    frozen = records_of([1, 0, 0, 0] * 10)
    online = records_of([1, 1, 0, 0] * 10)
    mean, se = paired_gap(frozen, online)
    assert mean == pytest.approx(0.25) and se > 0
    cycles = {"frozen": [{"position": 100, "published": "v0001", "train_s": 3.0}],
              "online": [{"position": 100, "published": "v0001", "train_s": 3.0},
                         {"position": 120, "published": "v0002", "train_s": 2.0},
                         {"position": 130, "published": None, "train_s": 2.0}]}
    summary = summarise({"frozen": frozen, "online": online}, cycles, dataset="toy", log_events=140,
                        bootstrap_events=100, config=asdict(SimConfig()))
    arms = summary["arms"]
    assert arms["frozen"]["recall@10"] == pytest.approx(0.25) and arms["online"]["recall@10"] == pytest.approx(0.5)
    assert arms["online"]["versions"] == ["v0001", "v0002"] and arms["online"]["rejected"] == 1
    assert arms["online"]["switch_positions"] == [100, 120] and arms["online"]["train_s"] == 7.0
    assert summary["gap"]["online − frozen"]["recall@10"]["mean"] == pytest.approx(0.25)
    # Every fourth event (i % 4 == 1) is of a new item: the online arm hits exactly those, the frozen one none.
    assert arms["online"]["new_items"] == {"events": 10, "recall@10": 1.0, "ndcg@10": 0.5}
    assert arms["frozen"]["new_items"]["recall@10"] == 0.0 and arms["frozen"]["old_items"]["events"] == 30
    table = summary_markdown(summary)
    assert "| online | 40 | 0.5000 |" in table and "+0.2500" in table
    json.dumps(summary)  # the summary is written as JSON


def test_summary_sets_the_baseline_arms_apart_and_names_the_best():
    records = {"frozen": records_of([1, 0, 0, 0] * 10), "online": records_of([1, 1, 0, 0] * 10),
               "pop": records_of([1, 0, 0, 0, 0] * 8), "rules": records_of([1, 0] * 20)}
    cycles = {"frozen": [{"position": 100, "published": "v0001", "train_s": 3.0}],
              "online": [{"position": 100, "published": "v0001", "train_s": 3.0}]}
    summary = summarise(records, cycles, dataset="toy", log_events=140, bootstrap_events=100, config=asdict(SimConfig()))
    arms = summary["arms"]
    assert [arms[a]["kind"] for a in arms] == ["live", "live", "baseline", "baseline"]
    assert arms["pop"]["recall@10"] == pytest.approx(0.2) and arms["rules"]["cycles"] == 0
    assert arms["rules"]["thirds"] and arms["rules"]["new_items"]["events"] == 10 and arms["rules"]["cold"]["events"] == 0
    assert summary["best_baseline"] == {"baseline": "rules", "recall@10": 0.5, "online_over_best": 1.0}
    assert list(summary["gap"]) == ["online − frozen", "online − rules"]  # no diagnostic arm in this run
    assert summary["gap"]["online − rules"]["recall@10"]["mean"] == pytest.approx(0.0)
    table = summary_markdown(summary)
    assert "| rules | 40 | 0.5000 |" in table and "| pop | 40 | 0.2000 |" in table
    assert "| 0 (-) | - | - | - |" in table  # no versions, cycles or training for a baseline
    assert "online / best = 1.00" in table
    json.dumps(summary)


def test_a_reference_arm_shows_no_cold_figure():
    """The diagnostic and signals-only arms answer warm users only: their cold cell is "-", not 0."""
    records = {"online": records_of([1, 0] * 10, cold_every=4), "signals-only": records_of([0, 1] * 10, cold_every=4)}
    summary = summarise(records, {}, dataset="toy", log_events=120, bootstrap_events=100, config=asdict(SimConfig()))
    assert summary["arms"]["signals-only"]["kind"] == "reference"
    lines = summary_markdown(summary).splitlines()
    online, reference = (next(line for line in lines if line.startswith(f"| {arm} |")) for arm in ("online", "signals-only"))
    assert "| 5 (1.0000) |" in online  # every cold event of the online arm is a hit here
    assert reference.endswith("| - | - | - | - |")  # cold, then no versions, cycles or training


def test_baseline_arms_are_scored_like_the_live_arms(tmp_path: Path, monkeypatch):
    """On a tiny synthetic stream: every event after the bootstrap, once per baseline, by ``score_chunk``
    itself, in the live arms' chunks, against the state before the chunk (warm = an applied event)."""
    export_synthetic(tmp_path, users=30, items=80, interests=4, events_per_user=12, drift=0.5, seed=3, fresh_items=0.3)
    log = read_interactions(tmp_path / "interactions.jsonl")
    log = log.assign(position=range(len(log)))
    n, boot, config = len(log), 100, SimConfig(chunk=40, recent_window=50)
    calls = []

    def spy(events, answers, histories, applied, bootstrap_items, k=10):
        calls.append((events["position"].tolist(), applied))
        return score_chunk(events, answers, histories, applied, bootstrap_items, k)

    monkeypatch.setattr(bench.arms, "score_chunk", spy)
    records = baseline_arms(log, boot, config, categories_of(read_items(tmp_path / "items.jsonl")))
    assert list(records) == list(BASELINES)
    chunks = [(list(range(s, min(s + 40, n))), s) for s in range(boot, n, 40)]
    assert calls == [c for c in chunks for _ in range(6)]  # each chunk, each baseline, before it is applied
    users, items = log["user_id"].tolist(), log["item_id"].tolist()
    for name, recs in records.items():
        assert [r["position"] for r in recs] == list(range(boot, n))
        for r in recs:
            before = [i for u, i in zip(users[: r["applied"]], items[: r["applied"]]) if u == r["user_id"]]
            assert r["applied"] == boot + (r["position"] - boot) // 40 * 40
            assert r["cold"] == (not before) and r["history_len"] == len(before) and r["model_version"] == name
            assert r["in_history"] == (r["item_id"] in before) and not (r["in_history"] and r["hit"])
            assert r["new_item"] == (r["item_id"] not in items[:boot])
        assert sum(r["hit"] for r in recs if not r["cold"]) > 0
    # One chunk redone by hand: popularity learnt up to the chunk, its top-10 per user, scored.
    pop, start = MostPopular(), boot + 40
    pop.apply(zip(users[:start], items[:start]))
    chunk = log.iloc[start : start + 40]
    answers = {u: ("pop", pop.top(u, 10)) for u in chunk["user_id"]}
    histories = {u: pop.history(u) for u in chunk["user_id"] if pop.history(u) is not None}
    assert records["pop"][40:80] == score_chunk(chunk, answers, histories, start, set(items[:boot]))


def test_signals_only_runs_the_arms_that_need_no_model_on_the_same_events(tmp_path: Path):
    export_synthetic(tmp_path, users=30, items=80, interests=4, events_per_user=12, drift=0.5, seed=3, fresh_items=0.3)
    config = SimConfig(frozen_after=0.3, chunk=40, recent_window=50)
    summary = run_in_process(Settings(), tmp_path / "interactions.jsonl", tmp_path / "items.jsonl", config=config,
                             dataset="toy")
    arms = summary["arms"]
    assert list(arms) == [*BASELINES, *ORACLES, "signals-only"]  # a synthetic log: its oracles too, and hindsight
    assert {arms[a]["kind"] for a in ("signals-only", *ORACLES)} == {"reference"} and arms["signals-only"]["recall@10"] > 0
    assert len({a["events"] for a in arms.values()}) == 1  # the same warm events for every arm
    best = max(BASELINES, key=lambda a: arms[a]["recall@10"])
    gap = summary["gap"][f"signals-only − {best}"]["recall@10"]
    assert gap["mean"] == pytest.approx(arms["signals-only"]["recall@10"] - arms[best]["recall@10"])
    assert "only the arms that need no model" in summary_markdown(summary)


def test_in_process_runs_the_trainers_cycles_beside_the_frozen_bootstrap(tmp_path: Path, monkeypatch):
    export_synthetic(tmp_path, users=30, items=80, interests=4, events_per_user=12, drift=0.5, seed=3, fresh_items=0.3)
    config = SimConfig(frozen_after=0.3, every_events=100, chunk=40, recent_window=50, bootstrap_epochs=1)
    settings = model_settings(str(tmp_path / "lancedb"))
    tuned = []  # (the version fine-tuned, the histories' events then)
    fine_tune = HyMiRecServing.fine_tune
    monkeypatch.setattr(HyMiRecServing, "fine_tune", lambda self, items, sequences, epochs: tuned.append(
        (self, sum(map(len, sequences.values())))) or fine_tune(self, items, sequences, epochs))
    summary = run_in_process(settings, tmp_path / "interactions.jsonl", tmp_path / "items.jsonl", config=config,
                             dataset="toy", model=True)
    arms, boot, n = summary["arms"], summary["bootstrap_events"], summary["log_events"]
    assert list(arms) == [*BASELINES, *ORACLES, "diagnostic", "frozen-diagnostic",
                          "signals-only", "exact-blend", "frozen-blend"]
    assert {arms[a]["kind"] for a in ("diagnostic", "frozen-diagnostic", "signals-only", "exact-blend", "frozen-blend")} == {"reference"}
    assert len({a["events"] for a in arms.values()}) == 1 and arms["diagnostic"]["recall@10"] > 0
    # A fine-tune after every 3 chunks (120 ≥ 100 events), never after the last; each from the one before.
    positions = list(range(boot + 120, n, 120))
    assert arms["diagnostic"]["switch_positions"] == arms["exact-blend"]["switch_positions"] == positions
    assert arms["frozen-diagnostic"]["cycles"] == arms["frozen-blend"]["cycles"] == 0
    assert len(tuned) == len(positions) and len({id(version) for version, _ in tuned}) == len(tuned)
    assert [events for _, events in tuned] == sorted(events for _, events in tuned)  # the histories grow
    for a, b in (("frozen-blend", "exact-blend"), ("signals-only", "exact-blend"), ("frozen-diagnostic", "diagnostic")):
        gap = summary["gap"][f"{b} − {a}"]["recall@10"]
        assert gap["mean"] == pytest.approx(arms[b]["recall@10"] - arms[a]["recall@10"])
    assert "--in-process" in summary_markdown(summary)


def test_plot_writes_a_png(tmp_path: Path):
    recs = {"frozen": records_of([1, 0] * 50), "online": records_of([1, 1, 0] * 33), "rules": records_of([1, 0, 0] * 33)}
    path = plot(recs, [120, 160], [180], tmp_path / "p" / "plot.png", window=10, bootstrap_events=100, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_cli_bad_arguments_are_one_line(tmp_path: Path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hymirec.cli", "simulate", *args], capture_output=True, text=True)

    for args, why in ((["--dataset", "ml-100k", "--frozen-after", "1.5"], "fraction"),
                      (["--dataset", "nope"], "invalid choice"),
                      (["--interactions", str(tmp_path / "missing.jsonl")], "no such file"),
                      ([], "required")):
        proc = run(*args)
        assert proc.returncode == 2 and why in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    log = tmp_path / "log.jsonl"
    log.write_text('{"user_id": "u", "item_id": "i", "ts": 1}\n')
    proc = run("--interactions", str(log))
    assert proc.returncode == 1 and proc.stderr.startswith("hymirec: error: --interactions needs --items"), proc.stderr


# --- the batched top-k the simulation scores with ---------------------------------------------------------
def test_batched_topk_gives_the_single_user_answers(world, world_settings):
    """Recommender.many (one search per group of users) answers exactly as `hymirec topk` does per user:
    model users, a user whose interests are missing (popular fallback) and an unknown one."""
    store = Store(world_settings)
    publish(world_settings, world["m1"])
    ServingRuntime(world_settings).start()
    users = users_of(store)
    for shard in store.shards("user_interests"):  # one user loses its interests row: popular items
        store.table(f"user_interests_p{shard:03d}").delete(f"user_id = '{users[3]}'")
    asked = users + ["nobody", users[0]]
    batched = Recommender(store).many(asked, 10)
    single = [recommend(store, u, 10) for u in asked]
    assert [b.to_json() for b in batched] == [s.to_json() for s in single]
    assert {(b.model_version, b.fallback) for b in batched[: len(users)] if b.user_id != users[3]} == {("v0001", None)}
    assert batched[3].fallback.startswith("no interests") and batched[len(users)].fallback.startswith("unknown user")
    seen = set(store.get_histories([users[0]])[users[0]]["history_item_ids"])
    assert len(batched[0].items) == 10 and not seen & {s.item_id for s in batched[0].items}


def test_diagnostic_ranks_by_max_cosine_on_the_exact_history(world):
    """The diagnostic arm's top-k is the full ranking by max cosine over the version's interests of
    the exact history, the user's items left out; an item the version never trained on (embedded
    from its text on load) can be recommended."""
    model, items = world["m1"], world["items"][["item_id", "text", "category"]]
    fresh = pd.DataFrame({"item_id": ["fresh-1"], "text": [items["text"].iloc[0]], "category": [items["category"].iloc[0]]})
    diagnostic = Diagnostic(model, pd.concat([items, fresh], ignore_index=True))
    assert "fresh-1" in diagnostic.item_ids and diagnostic.version is None  # never published
    log = pd.DataFrame(world["interactions"])
    histories = exact_histories(log, 300)
    assert sum(map(len, histories.values())) == 300
    users = sorted(histories)[:5]
    tops = diagnostic.top({u: histories[u] for u in users}, 10)
    vectors = torch.nn.functional.normalize(torch.as_tensor(diagnostic.model.encode_items(
        pd.concat([items, fresh], ignore_index=True)).vectors), dim=-1)
    interests = torch.as_tensor(model.interests([histories[u] for u in users]))
    for row, user in enumerate(users):
        scores = (interests[row] @ vectors.T).amax(0)
        seen = {diagnostic.index[i] for i in histories[user]}
        expected = [diagnostic.item_ids[j] for j in scores.argsort(descending=True).tolist() if j not in seen][:10]
        assert tops[user] == expected and not set(tops[user]) & set(histories[user])
    # The fresh item is ranked like any other (the whole catalogue asked for: it is in the answer).
    assert "fresh-1" in diagnostic.top({users[0]: histories[users[0]]}, len(diagnostic.item_ids))[users[0]]
    extend(histories, log.iloc[300:310])
    assert sum(map(len, histories.values())) == 310 and histories == exact_histories(log, 310)


# --- through the live system -------------------------------------------------------------------------
@pytest.mark.broker
def test_simulate_end_to_end(broker_settings: Settings, tmp_path: Path):
    data = tmp_path / "data"
    export_synthetic(data, users=100, items=300, interests=10, events_per_user=25, drift=0.5, seed=1, fresh_items=0.3)
    settings = broker_settings.model_copy(update={"codebook_size": 16, "codebook_levels": 2})
    config = SimConfig(frozen_after=0.3, every_events=600, chunk=250, epochs=1, bootstrap_epochs=1, window=200, timeout=180)
    out = tmp_path / "out"
    summary = run_simulation(settings, data / "interactions.jsonl", data / "items.jsonl", config=config, out=out,
                             dataset="tiny", progress=False)

    log = read_interactions(data / "interactions.jsonl")
    boot = summary["bootstrap_events"]
    assert boot == round(0.3 * len(log))
    frozen = pd.read_csv(out / "frozen_events.csv", dtype={"user_id": str, "item_id": str})
    online = pd.read_csv(out / "online_events.csv", dtype={"user_id": str, "item_id": str})
    # Both arms scored exactly the same events: every event after the bootstrap, once.
    assert frozen["position"].tolist() == online["position"].tolist() == list(range(boot, len(log)))
    assert (frozen["user_id"] == online["user_id"]).all() and (frozen["cold"] == online["cold"]).all()
    for events in (frozen, online):
        assert events["hit"].isin([0, 1]).all() and events["ndcg"].between(0, 1).all()
        # Test-then-train: the stored history at scoring time held exactly the user's events before
        # the event's chunk, so not the event itself (nor any later one).
        for position, user, history_len, applied, in_history in zip(
                events["position"], events["user_id"], events["history_len"], events["applied"], events["in_history"]):
            earlier = log.iloc[:applied]
            assert applied <= position
            assert history_len == int((earlier["user_id"] == user).sum())
            first_time = not ((log.iloc[:position]["user_id"] == user) & (log.iloc[:position]["item_id"] == log.iloc[position]["item_id"])).any()
            assert not (first_time and in_history)
    for arm in summary["arms"].values():
        for metric in ("recall@10", "ndcg@10"):
            assert 0 <= arm[metric] <= 1
    assert summary["arms"]["frozen"]["versions"] == ["v0001"] and summary["arms"]["frozen"]["cycles"] == 1
    assert set(frozen["model_version"].dropna()) == {"v0001"}
    assert summary["arms"]["online"]["cycles"] > 1
    cycles = [json.loads(line) for line in (out / "online_cycles.jsonl").read_text().splitlines()]
    assert len(cycles) == summary["arms"]["online"]["cycles"] and all(c["decision"] for c in cycles)
    # The online arm's answers carry the versions it switched to, in publishing order.
    served = online["model_version"].dropna().tolist()
    assert set(served) <= set(summary["arms"]["online"]["versions"]) and served == sorted(served)
    # The baseline arms, in-process, scored the same events with the same warm users and seen items.
    for name in BASELINES:
        base = pd.read_csv(out / f"{name}_events.csv", dtype={"user_id": str, "item_id": str})
        assert base["position"].tolist() == frozen["position"].tolist()
        for column in ("user_id", "cold", "history_len", "in_history", "new_item", "applied"):
            assert (base[column] == frozen[column]).all(), column
        assert summary["arms"][name]["kind"] == "baseline" and 0 <= summary["arms"][name]["recall@10"] <= 1
    assert summary["best_baseline"]["baseline"] in BASELINES
    # The diagnostic arm: the online arm's live version scored in-process on the exact histories, the
    # same events, warm users and seen items; never an item the user already has.
    diag = pd.read_csv(out / "diagnostic_events.csv", dtype={"user_id": str, "item_id": str})
    assert diag["position"].tolist() == frozen["position"].tolist()
    for column in ("user_id", "cold", "history_len", "in_history", "new_item", "applied"):
        assert (diag[column] == frozen[column]).all(), column
    assert not (diag["in_history"] & (diag["hit"] == 1)).any()
    assert summary["arms"]["diagnostic"]["kind"] == "reference" and summary["arms"]["diagnostic"]["recall@10"] > 0
    assert set(diag["model_version"].dropna()) <= set(summary["arms"]["online"]["versions"])
    # The blend arms: the same events; exact-blend follows the online arm's versions like the diagnostic.
    for name in ("signals-only", "exact-blend"):
        blended = pd.read_csv(out / f"{name}_events.csv", dtype={"user_id": str, "item_id": str})
        assert blended["position"].tolist() == frozen["position"].tolist()
        assert not (blended["in_history"] & (blended["hit"] == 1)).any()
        assert summary["arms"][name]["kind"] == "reference"
    assert {"online − frozen", "online − diagnostic", "online − signals-only", "online − exact-blend"} <= set(summary["gap"])
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert "| frozen |" in (out / "summary.md").read_text() and json.loads((out / "summary.json").read_text())["arms"]
