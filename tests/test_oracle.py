"""bench.oracle: the synthetic log's ceiling rebuilds the generator's own next-item probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.arms import SimConfig, read_log
from bench.oracle import HINDSIGHT, ORACLE, ORACLE_ITEMS, ORACLE_MIX, Generator, hindsight_arm, oracle_arms
from store.logs import read_interactions
from stream.datasets import export_synthetic


def test_every_event_of_the_log_had_a_chance_under_the_rebuilt_generator(tmp_path: Path):
    export_synthetic(tmp_path, users=30, items=80, interests=4, events_per_user=12, drift=0.5, seed=3, fresh_items=0.3)
    generator = Generator(tmp_path)
    log = read_interactions(tmp_path / "interactions.jsonl")
    histories: dict[str, list[str]] = {}
    for user, item, now in zip(log["user_id"], log["item_id"], log["ts"]):
        history = histories.setdefault(user, [])
        p = generator.probabilities(user, history, now)
        assert p.sum() == pytest.approx(1.0) and (p >= 0).all()
        assert p[generator.index[item]] > 0  # the item drawn was one the rebuilt generator could draw
        assert (p[generator.release > now] == 0).all()  # nothing before its release
        start, _, end, _ = generator.mixes[user]
        assert p[~np.isin(generator.item_topic, np.union1d(start, end))].sum() == 0  # only the user's topics
        history.append(item)


def test_within_a_topic_the_odds_are_the_popularity_ratio(tmp_path: Path):
    export_synthetic(tmp_path, users=20, items=60, interests=3, events_per_user=10, drift=0.0, seed=5)
    generator = Generator(tmp_path)  # no fresh items: every item there from the start, no boost
    user = next(iter(generator.mixes))
    p = generator.probabilities(user, [], 0)
    topic = generator.mixes[user][0][0]
    a, b = generator.members[topic][:2]
    ranks = dict(zip(generator.members[topic], generator.log_popularity[topic]))
    assert p[a] / p[b] == pytest.approx(np.exp(ranks[a] - ranks[b]))


def test_the_oracle_arms_score_every_event_like_the_others_and_only_on_synthetic_logs(tmp_path: Path):
    export_synthetic(tmp_path, users=30, items=80, interests=4, events_per_user=12, drift=0.5, seed=3, fresh_items=0.3)
    config = SimConfig(chunk=40)
    log, boot = read_log(tmp_path / "interactions.jsonl", None, config)
    arms = oracle_arms(log, boot, config, tmp_path)
    assert list(arms) == [ORACLE, ORACLE_MIX, ORACLE_ITEMS]
    for name, records in arms.items():
        assert [r["position"] for r in records] == list(range(boot, len(log)))
        assert {r["model_version"] for r in records if not r["cold"]} == {name}
        assert not any(r["in_history"] and r["hit"] for r in records)  # a seen item is never answered
        assert sum(r["hit"] for r in records) > 0
    (tmp_path / "truth.json").unlink()
    assert oracle_arms(log, boot, config, tmp_path) == {}


def test_the_half_oracles_each_know_one_factor_of_the_generators_probability(tmp_path: Path):
    export_synthetic(tmp_path, users=20, items=60, interests=3, events_per_user=10, drift=0.5, seed=5, fresh_items=0.3)
    generator = Generator(tmp_path)
    log = read_interactions(tmp_path / "interactions.jsonl")
    user, now = log["user_id"].iloc[-1], int(log["ts"].iloc[-1])
    history = log.loc[log["user_id"] == user, "item_id"].tolist()[:-1]
    mix, within = generator.mix(user, history), generator.within(history, now)
    assert mix.sum() == pytest.approx(1.0)
    for pool in generator.members:  # a distribution over each topic's items
        assert within[pool].sum() == pytest.approx(1.0)
    assert generator.probabilities(user, history, now) == pytest.approx(mix[generator.item_topic] * within)
    # the counted mix: the topics' shares of the user's newest items
    topics = generator.item_topic[[generator.index[i] for i in history[-50:]]]
    assert generator.counted_mix(history) == pytest.approx(np.bincount(topics, minlength=3) / len(topics))


def test_hindsight_answers_each_warm_user_with_their_own_unseen_items_of_the_chunk():
    """By hand, one chunk after a bootstrap of 2: u (history a) takes b, b, a, then twelve other items;
    v, cold, takes c. u's answer: b (taken twice), then the first nine of the twelve, in the order taken
    — a is seen, c is not u's. So b hits twice, a never, nine of the twelve hit: a top-10 cannot hold
    twelve items. In the next chunk b is u's already."""
    rows = [("u", "a"), ("w", "z"), ("u", "b"), ("u", "b"), ("u", "a"), ("v", "c"),
            *[("u", f"i{n}") for n in range(12)], ("u", "b"), ("u", "d")]
    log = pd.DataFrame(rows, columns=["user_id", "item_id"]).assign(position=range(len(rows)))
    records = hindsight_arm(log, 2, SimConfig(chunk=16))
    assert [r["position"] for r in records] == list(range(2, len(rows)))
    assert [(r["cold"], r["hit"], r["rank"]) for r in records[:4]] == [(False, 1, 0), (False, 1, 0), (False, 0, -1),
                                                                       (True, 0, -1)]
    assert [r["rank"] for r in records[4:16]] == [*range(1, 10), -1, -1, -1]
    assert [r["rank"] for r in records[16:]] == [-1, 0]  # the next chunk: b is seen by then
    assert {r["model_version"] for r in records if not r["cold"]} == {HINDSIGHT}
