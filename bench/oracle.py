"""The synthetic log's ceiling: an arm that knows how the generator drew every event (issue 20, session 27).

``stream.datasets.export_synthetic`` draws a user's next item in two steps: a topic from the user's
mix at that point of their timeline (``truth.json``: the planted start and end mixes; ``topic_mix``),
then an unseen item of the topic by its log-popularity plus the boost of a recent release
(``item_logits``; the Zipf ranks come from the seed, ``planted_catalogue``). The ``oracle`` arm ranks
every item by that probability, computed from the hidden parameters, for the user's next event:

    P(i) = mix[topic of i] × softmax over the topic's released items the user has not had (logits)[i]

It is scored like every arm (``score_chunk``: one answer per user per chunk, against the state before
it), so its recall is what knowing the generator buys under this protocol: a ceiling no arm that
learns from the stream can be expected to reach. It leaves out the generator's short runs (the next
topic repeats the last one with probability ``STAY_PROB``): one answer serves a user's several events
of a chunk, and on validation (seed 1, first 20,000 events) the mix alone scored higher (0.285
against 0.274).

Two half-oracles say which of the two estimates the arms lack (session 29), each knowing one factor and
counting the other as the serving blend's trend does (``model.trend``):

- ``oracle-mix``: the user's true mix × each item's take-rate share of its topic, counted along the
  stream (``Trend(per_offer=True)``, the bootstrap one event at a time, then a chunk at a time);
- ``oracle-items``: the user's mix counted over their newest MIX_ITEMS items × the generator's
  probabilities within each topic.

Any log has one more ceiling (``hindsight``, session 34): the protocol's own. One answer serves all of a
user's events of a chunk, and a user with 30 events in a chunk can have at most 10 of them in a top-10.
``hindsight`` answers each warm user with their own unseen items of the chunk, the most frequent first:
no arm can score above it. On ml-100k a warm user has 22–26 events in a chunk of 500 on average (their
rating sessions) and hindsight scores about 0.25: the arms' 0.05 is a fifth of it, not a twentieth. On
the synthetic log (5 events) it scores 0.96: there the generator's draws (``oracle``), not the protocol,
bound what an arm can reach.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from bench.arms import SimConfig, categories_of
from bench.diagnostic import events_of, exact_histories, extend
from bench.prequential import K, score_chunk
from model.trend import MIX_ITEMS, Trend
from stream.datasets import item_logits, planted_catalogue, topic_mix
from store.logs import read_interactions, read_items

ORACLE, ORACLE_MIX, ORACLE_ITEMS, HINDSIGHT = "oracle", "oracle-mix", "oracle-items", "hindsight"


def _topics(names: list[str]) -> np.ndarray:
    return np.array([int(name.split("-")[1]) for name in names])  # "topic-07" → 7


class Generator:
    """What the generator of a synthetic dataset directory knew: topics, popularity, releases, mixes."""

    def __init__(self, directory: Path):
        truth = json.loads((directory / "truth.json").read_text())
        params = truth["params"]
        catalogue = read_items(directory / "items.jsonl")
        self.item_ids = catalogue["item_id"].tolist()
        self.categories = categories_of(catalogue)  # each item's topic, named as the catalogue names it
        self.index = {item: j for j, item in enumerate(self.item_ids)}
        self.item_topic, log_popularity = planted_catalogue(params["seed"], params["items"], params["interests"])
        self.members = [np.flatnonzero(self.item_topic == t) for t in range(params["interests"])]
        self.log_popularity = log_popularity
        self.release = catalogue["ts"].fillna(-1).to_numpy(dtype=np.int64)
        self.drift = params["drift"]
        self.mixes = {user: (_topics(u["topics"]), np.array(u["weights"]), _topics(u["end_topics"]),
                             np.array(u["end_weights"])) for user, u in truth["users"].items()}
        self.events = read_interactions(directory / "interactions.jsonl")["user_id"].value_counts().to_dict()

    def mix(self, user: str, history: list[str]) -> np.ndarray:
        """The user's topic weights [topics] at their next event, after ``history``."""
        start, w_start, end, w_end = self.mixes[user]
        topics, mix = topic_mix(start, w_start / w_start.sum(), end, w_end / w_end.sum(), self.drift,
                                np.array([len(history)]), self.events[user])
        out = np.zeros(len(self.members))
        out[topics] = mix[0]
        return out

    def within(self, history: list[str], now: int) -> np.ndarray:
        """P(next item = i | its topic is drawn) [items] after ``history``, at time ``now`` (ms)."""
        seen = np.zeros(len(self.item_ids), dtype=bool)
        seen[[self.index[i] for i in history]] = True
        p = np.zeros(len(self.item_ids))
        for topic, pool in enumerate(self.members):
            released = self.release[pool] <= now
            unseen = released & ~seen[pool]
            allowed = unseen if unseen.any() else released  # the generator's rule when a topic runs out
            logits = np.where(allowed, item_logits(self.log_popularity[topic], self.release[pool], now), -np.inf)
            if allowed.any():
                w = np.exp(logits - logits.max())
                p[pool] = w / w.sum()
        return p

    def probabilities(self, user: str, history: list[str], now: int) -> np.ndarray:
        """P(next item = i) [items] for ``user`` after ``history``, at time ``now`` (ms)."""
        return self.mix(user, history)[self.item_topic] * self.within(history, now)

    def counted_mix(self, history: list[str]) -> np.ndarray:
        """The topics' shares [topics] of the user's newest MIX_ITEMS items (the trend's mix)."""
        topics = self.item_topic[[self.index[i] for i in history[-MIX_ITEMS:]]]
        return np.bincount(topics, minlength=len(self.members)) / max(len(topics), 1)


def oracle_arms(log: pd.DataFrame, boot: int, config: SimConfig, directory: Path) -> dict[str, list[dict]]:
    """{oracle arm: its records} on ``log`` (position, user_id, item_id, ts), chunk by chunk like every
    arm; empty when ``directory`` holds no generator's truth (not a synthetic dataset)."""
    if not (directory / "truth.json").exists():
        return {}
    generator = Generator(directory)
    trend = Trend(generator.categories, per_offer=True)
    trend.replay(events_of(log.iloc[:boot]))
    histories = exact_histories(log, boot)
    bootstrap_items = set(log["item_id"].iloc[:boot])
    records: dict[str, list[dict]] = {ORACLE: [], ORACLE_MIX: [], ORACLE_ITEMS: []}
    for start in range(boot, len(log), config.chunk):
        chunk = log.iloc[start : start + config.chunk]
        counted = np.zeros(len(generator.item_ids))
        for item, (_, share) in trend.shares().items():
            counted[generator.index[item]] = share
        answers: dict[str, dict] = {name: {} for name in records}
        for user, now in zip(chunk["user_id"].tolist(), chunk["ts"].tolist()):
            if user in answers[ORACLE]:
                continue  # one answer per user per chunk, at the time of their first event in it
            history = histories.get(user)
            if history is None:
                for name in records:
                    answers[name][user] = (None, [])
                continue
            mix, within = generator.mix(user, history), generator.within(history, now)
            counted_mix = generator.counted_mix(history)
            for name, p in ((ORACLE, mix[generator.item_topic] * within),
                            (ORACLE_MIX, mix[generator.item_topic] * counted),
                            (ORACLE_ITEMS, counted_mix[generator.item_topic] * within)):
                p[[generator.index[i] for i in history]] = -1.0
                answers[name][user] = (name, [generator.item_ids[j] for j in np.argsort(-p, kind="stable")[:K]])
        for name in records:
            records[name] += score_chunk(chunk, answers[name], histories, start, bootstrap_items)
        new = Counter(chunk["user_id"].tolist())
        extend(histories, chunk)
        trend.add([histories[user] for user in new], list(new.values()))
    return records


def hindsight_arm(log: pd.DataFrame, boot: int, config: SimConfig) -> list[dict]:
    """The ``hindsight`` arm's records on ``log`` (position, user_id, item_id): each warm user answered, once
    per chunk, with their unseen items of that chunk, the most frequent first (ties: the first taken)."""
    histories = exact_histories(log, boot)
    bootstrap_items = set(log["item_id"].iloc[:boot])
    records: list[dict] = []
    for start in range(boot, len(log), config.chunk):
        chunk = log.iloc[start : start + config.chunk]
        taken: dict[str, Counter] = {}
        for user, item in events_of(chunk):
            taken.setdefault(user, Counter())[item] += 1
        answers: dict[str, tuple[str | None, list[str]]] = {}
        for user, items in taken.items():
            if user not in histories:
                answers[user] = (None, [])  # cold: scored apart, like every arm's cold events
                continue
            seen = set(histories[user])
            unseen = Counter({i: n for i, n in items.items() if i not in seen})  # in the order first taken
            answers[user] = (HINDSIGHT, [i for i, _ in unseen.most_common(K)])
        records += score_chunk(chunk, answers, histories, start, bootstrap_items)
        extend(histories, chunk)
    return records
