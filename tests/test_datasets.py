"""Dataset exports: MovieLens-100k from the recbole wheel and the planted multi-interest generator."""

from __future__ import annotations

import json
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from hymirec.errors import HymirecError
from hymirec.settings import Settings
from stream.datasets import ML100K_PREFIX, export_ml100k, export_synthetic, recbole_wheel
from store.events import parse_interaction, parse_item
from store.logs import read_interactions, read_items


def parse_lines(path: Path, parse) -> list:
    with open(path, "rb") as f:
        return [parse(line) for line in f]


# --- MovieLens-100k ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ml100k(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Settings]:
    settings = Settings()  # the machine's cache_dir: the wheel is fetched once, like the broker jars
    out = tmp_path_factory.mktemp("ml-100k")
    export_ml100k(out, settings)
    return out, settings


def raw_inter(settings: Settings) -> list[list[str]]:
    with zipfile.ZipFile(recbole_wheel(settings)) as wheel:
        lines = wheel.read(f"{ML100K_PREFIX}.inter").decode().rstrip("\n").split("\n")
    assert lines[0].split("\t") == ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
    return [line.split("\t") for line in lines[1:]]


def test_ml100k_counts_and_contract(ml100k):
    out, _ = ml100k
    events = parse_lines(out / "interactions.jsonl", parse_interaction)  # every row validates
    items = parse_lines(out / "items.jsonl", parse_item)
    assert len(events) == 100_000
    assert len({e.user_id for e in events}) == 943
    assert len(items) == 1_682 == len({i.item_id for i in items})
    assert {e.item_id for e in events} <= {i.item_id for i in items}
    assert {e.action for e in events} == {"rate"}
    assert len({e.event_id for e in events}) == 100_000
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["interactions"], meta["users"], meta["items"]) == (100_000, 943, 1_682)


def test_ml100k_is_a_stable_time_sort_of_the_source(ml100k):
    out, settings = ml100k
    raw = raw_inter(settings)
    frame = read_interactions(out / "interactions.jsonl")
    ts = frame.ts.to_numpy()
    assert (np.diff(ts) >= 0).all()
    rows = [int(e.removeprefix("ml100k-")) for e in frame.event_id]
    # Each event is its source row, ms = s * 1000 ...
    for i in (0, 1, 4_999, 99_999):
        user, item, _, seconds = raw[rows[i]]
        assert (frame.user_id[i], frame.item_id[i], int(ts[i])) == (user, item, int(seconds) * 1000)
    # ... and within equal timestamps the source order is kept (ties are frequent in ml-100k).
    ties = np.flatnonzero(np.diff(ts) == 0)
    assert len(ties) > 10_000
    assert all(rows[i] < rows[i + 1] for i in ties)


def test_ml100k_item_text_has_title_year_and_genres(ml100k):
    out, _ = ml100k
    items = read_items(out / "items.jsonl").set_index("item_id")
    assert items.loc["1", "text"] == "Toy Story (1995) | Animation, Children's, Comedy"
    assert items.loc["1", "category"] == "Animation"
    assert items.text.str.contains(r" \(\d{4}\) \| ", regex=True).mean() > 0.99
    assert items.category.notna().all()


def test_ml100k_from_a_broken_wheel_is_a_clear_error(tmp_path: Path):
    # A wheel that is not a zip: the export says which file to delete.
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "recbole-1.2.1-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(HymirecError, match="not a readable wheel"):
        export_ml100k(tmp_path / "out", Settings(cache_dir=tmp_path))


# --- synthetic ----------------------------------------------------------------------------------------
PARAMS = dict(users=120, items=300, interests=10, events_per_user=40)


def synthetic(path: Path, *, drift: float = 0.0, seed: int = 0) -> Path:
    export_synthetic(path, drift=drift, seed=seed, **PARAMS)
    return path


def test_synthetic_is_deterministic_per_seed(tmp_path: Path):
    a, b, c = (synthetic(tmp_path / name, seed=seed) for name, seed in (("a", 1), ("b", 1), ("c", 2)))
    for name in ("interactions.jsonl", "items.jsonl", "truth.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
        assert (a / name).read_bytes() != (c / name).read_bytes(), name


def test_synthetic_rows_valid_time_ordered_and_planted(tmp_path: Path):
    out = synthetic(tmp_path / "s")
    events = parse_lines(out / "interactions.jsonl", parse_interaction)
    items = {i.item_id: i for i in parse_lines(out / "items.jsonl", parse_item)}
    truth = json.loads((out / "truth.json").read_text())
    assert len(items) == PARAMS["items"]
    ts = [e.ts for e in events]
    assert ts == sorted(ts)
    per_user = defaultdict(list)
    for e in events:
        per_user[e.user_id].append(e)
    assert len(per_user) == PARAMS["users"] == len(truth["users"])
    counts = [len(v) for v in per_user.values()]
    mixed = 0
    assert min(counts) >= 5 and len(set(counts)) > 5
    assert abs(np.mean(counts) - PARAMS["events_per_user"]) < 0.25 * PARAMS["events_per_user"]
    for user, evs in per_user.items():
        planted = truth["users"][user]
        assert 2 <= len(planted["topics"]) <= 5 and abs(sum(planted["weights"]) - 1) < 1e-3
        assert planted["topics"] == planted["end_topics"]  # no drift
        seen = {items[e.item_id].category for e in evs}
        assert seen <= set(planted["topics"])  # users only touch their planted topics
        mixed += len(seen) >= 2
        assert [e.event_id for e in evs] == [f"{user}-{k}" for k in range(len(evs))]
    assert mixed > 0.95 * len(per_user)  # users interleave several topics
    # Item text comes from its topic's vocabulary.
    for item in list(items.values())[:50]:
        words = set(item.text.lower().split())
        assert len(words & set(truth["topics"][item.category])) == 3


def share_of_faded_topics(out: Path) -> tuple[float, float]:
    """Over all users: share of events in topics planted at the start but not at the end,
    in the first and in the last third of each user's timeline."""
    items = {i.item_id: i.category for i in parse_lines(out / "items.jsonl", parse_item)}
    truth = json.loads((out / "truth.json").read_text())["users"]
    per_user = defaultdict(list)
    for e in parse_lines(out / "interactions.jsonl", parse_interaction):
        per_user[e.user_id].append(items[e.item_id])
    early = late = n_early = n_late = 0
    for user, cats in per_user.items():
        faded = set(truth[user]["topics"]) - set(truth[user]["end_topics"])
        third = len(cats) // 3
        early += sum(c in faded for c in cats[:third])
        late += sum(c in faded for c in cats[-third:])
        n_early += third
        n_late += third
    return early / n_early, late / n_late


def test_drift_shifts_the_topic_mix(tmp_path: Path):
    early, late = share_of_faded_topics(synthetic(tmp_path / "drift", drift=1.0))
    assert early > 0.3 and late < early / 2
    assert share_of_faded_topics(synthetic(tmp_path / "still", drift=0.0)) == (0.0, 0.0)
    truth = json.loads((tmp_path / "drift" / "truth.json").read_text())["users"]
    assert all(2 <= len(u["end_topics"]) <= 5 and u["end_topics"] != u["topics"] for u in truth.values())


def test_synthetic_bad_parameters(tmp_path: Path):
    with pytest.raises(HymirecError, match="interests"):
        export_synthetic(tmp_path, users=5, items=10, interests=1, events_per_user=5, drift=0, seed=0)
    with pytest.raises(HymirecError, match="drift"):
        export_synthetic(tmp_path, users=5, items=10, interests=3, events_per_user=5, drift=1.5, seed=0)


def test_fresh_items_are_released_over_time_and_taken_up(tmp_path: Path):
    out = tmp_path / "fresh"
    export_synthetic(out, drift=0.0, seed=0, fresh_items=0.3, **PARAMS)
    truth = json.loads((out / "truth.json").read_text())
    releases = truth["releases"]
    items = {i.item_id: i for i in parse_lines(out / "items.jsonl", parse_item)}
    per_topic = defaultdict(int)
    for item in items.values():
        per_topic[item.category] += 1
    assert len(releases) == sum(int(0.3 * n) for n in per_topic.values())
    assert all(items[i].ts == t for i, t in releases.items()) and sum(i.ts is not None for i in items.values()) == len(releases)
    events = parse_lines(out / "interactions.jsonl", parse_interaction)
    assert all(e.ts >= releases[e.item_id] for e in events if e.item_id in releases)  # never before its release
    third = len(events) // 3
    early = np.mean([e.item_id in releases for e in events[:third]])
    late = np.mean([e.item_id in releases for e in events[-third:]])
    assert late > early + 0.1  # the popular items move to the released ones
    # A just-released item draws more events than the old item it displaces: the first day after a
    # release holds more of its events than a uniform spread over the rest of the log would.
    span = events[-1].ts - events[0].ts
    first_day = np.mean([e.ts - releases[e.item_id] < 24 * 3600 * 1000 for e in events if e.item_id in releases])
    assert first_day > 2 * (24 * 3600 * 1000) / span
    assert (json.loads((out / "meta.json").read_text())["fresh_items"]) == 0.3
    again = tmp_path / "again"
    export_synthetic(again, drift=0.0, seed=0, fresh_items=0.3, **PARAMS)
    assert (again / "interactions.jsonl").read_bytes() == (out / "interactions.jsonl").read_bytes()
    plain = synthetic(tmp_path / "plain")
    assert "fresh_items" not in json.loads((plain / "meta.json").read_text())
    assert (plain / "interactions.jsonl").read_bytes() != (out / "interactions.jsonl").read_bytes()
    with pytest.raises(HymirecError, match="fresh-items"):
        export_synthetic(tmp_path / "bad", drift=0.0, seed=0, fresh_items=1.0, **PARAMS)
