"""The serving blend: its signals and fit (model.blend, hand-computed cases), the worker's keeper of its
tables (serving.blend) and top-k ranked by it (serving.reader), on a real LanceDB directory."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from bench.diagnostic import Diagnostic, ExactBlend, SignalsOnly, exact_histories, extend
import model.blend
import model.blend_weights
from model.baselines import neighbours
from model.trend import HALF_LIFE, OFFER_PRIOR
from model.blend import FEATURES, FRESH_EVENTS, TREND_SCALE, FirstSeen, Follows, Signals, candidates, pool_of
from model.blend_weights import (FRESH_GRID, GRID, MIN_EXAMPLES, PRIOR, SPLIT, TIES, Blend, Blends, Example, fit, fit_blends,
                                 hits_of, model_earns, rivals_of, slot_hits_of, stacked, top)
from serving.blend import BlendKeeper, counted_at, read_blend, read_signals
from serving.reader import Recommender, recommend
from serving.runtime import ServingRuntime
from store import Store
from store.schemas import BLEND, FRESH, HISTORIES, TREND, blend_schema, fresh_schema, trend_schema
from store.tables import to_arrow

from helpers import Log, publish, users_of, world, world_settings  # noqa: F401 — world, world_settings: fixtures


# --- model.blend: pure ------------------------------------------------------------------------------
def test_signals_count_follows_and_popularity_by_hand():
    s = Signals.count([["a", "b", "c", "d", "e"], ["a", "c"]])
    assert s.popular == {"a": 2, "b": 1, "c": 2, "d": 1, "e": 1}
    # a → b at distance 1, a → c at 2 (user 1) and 1 (user 2), a → d at 3; nothing 4 steps on.
    assert s.follows["a"] == {"b": 1.0, "c": pytest.approx(1.5), "d": pytest.approx(1 / 3)}
    assert "e" not in s.follows["a"] and s.follows["d"] == {"e": 1.0} and "e" not in s.follows
    # The user's newest item counts fully, the one before it half (b → c 1, b → d 1/2, b → e 1/3).
    assert s.rules(["b", "a"]) == {"b": 1.0, "c": pytest.approx(1.5 + 0.5 * 1.0), "d": pytest.approx(1 / 3 + 0.5 * 0.5),
                                   "e": pytest.approx(0.5 / 3)}
    kept = s.kept(follows=1, popular=2)
    assert kept.follows["a"] == {"c": pytest.approx(1.5)} and kept.popular == {"a": 2, "c": 2}
    assert s.top_popular(3) == ["a", "c", "b"]  # ties by id
    # A running count grows by the new events only (d and e new items): the same follows as counting
    # the whole lists, in the same order.
    running = Follows.count([["a", "b", "c"], ["a", "c"]])
    running.add(["a", "b", "c", "d", "e"], 2)
    grown = running.top()
    assert grown == s.follows and all(list(grown[j]) == list(s.follows[j]) for j in s.follows)
    assert Signals.count([["a", "b", "c"]], keep=1).follows == {"a": {"b": 1.0}, "b": {"c": 1.0}}


def test_follows_keep_the_heaviest_ties_by_id_whatever_order_items_came_in():
    # x → z and x → y weigh 1 each, x → w 1/2: ties by id (y before z), though z was seen first.
    lists = [["x", "z"], ["x", "y"], ["x", "q", "w"]]
    assert Follows.count(lists).top(keep=2)["x"] == {"q": 1.0, "y": 1.0}
    assert Follows.count(lists).top()["x"] == {"q": 1.0, "y": 1.0, "z": 1.0, "w": 0.5}
    assert list(Follows.count(lists).top()["x"]) == ["q", "y", "z", "w"]
    running = Follows()
    for user in lists:  # counted one event at a time from nothing: the same
        for end in range(1, len(user) + 1):
            running.add(user[:end], 1)
    assert running.top() == Follows.count(lists).top() and Follows().top() == {}


def test_follows_count_the_same_in_any_blocks_and_order(monkeypatch):
    rng = np.random.default_rng(0)
    lists = [[f"i{j}" for j in rng.integers(0, 40, rng.integers(0, 30))] for _ in range(300)]
    whole = Follows.count(lists).top()
    monkeypatch.setattr(model.blend, "COUNT_BLOCK", 7)  # blocks that cut users' lists anywhere
    assert Follows.count(lists).top() == whole
    running = Follows()
    for user in reversed(lists):  # users in another order, each event on its own: sums are exact
        for end in range(1, len(user) + 1):
            running.add(user[:end], 1)
    assert running.top() == whole


def test_candidates_union_and_the_model_floor():
    lists = [["a", "b"], ["a", "c"], ["z"], ["a", "q1", "q2", "q3", "w"]]
    s = Signals.count(lists)
    s.neighbours = neighbours(lists, keep=100)
    # Who holds what: a {0, 1, 3}, every other item one user: cos(a, ·) = 1/sqrt(3) for b, c, q1..q3, w;
    # w is 4 steps after a (no rule), so it is a candidate as a's neighbour only.
    names, x = candidates(s, ["a"], {"x": 0.9, "b": 0.4}, ["z", "a"], seen={"a"})
    assert names == ["x", "b", "c", "q1", "q2", "q3", "z", "w"]  # pool, rules', popular, nearest; never a seen one
    assert x.shape == (len(FEATURES), 8)
    assert x[0].tolist() == pytest.approx([0.9, 0.4] + [0.4] * 6)  # outside the pool: the pool's lowest cosine
    assert x[1].tolist() == pytest.approx([0.0] + [np.log(2)] * 3 + [np.log(1.5), np.log(4 / 3), 0.0, 0.0])
    assert x[2].tolist() == pytest.approx([0.0] + [np.log(2)] * 7)
    assert x[3].tolist() == pytest.approx([0.0] + [3 ** -0.5] * 5 + [0.0, 3 ** -0.5])
    assert candidates(s, [], {}, [], seen=set()) == ([], pytest.approx(np.zeros((len(FEATURES), 0))))


def test_the_trend_feature_is_the_users_category_mix_times_the_items_share():
    s = Signals(trend={"a": ("x", 0.5), "b": ("x", 0.3), "c": ("x", 0.2), "d": ("y", 1.0), "e": ("z", 1.0)})
    # The user holds a (x) and d (y): mix x 1/2, y 1/2; z is not theirs. Trending candidates, best first:
    # b 0.15, c 0.1 (a and d are seen); then the pool's.
    names, x = candidates(s, ["a", "d"], {"q": 0.5}, [], seen={"a", "d"})
    assert names == ["q", "b", "c"]
    assert x[FEATURES.index("trend")].tolist() == pytest.approx([0.0, TREND_SCALE * 0.15, TREND_SCALE * 0.1])
    assert Signals().trending(["a"]) == {}  # nothing counted yet


def test_the_fresh_feature_counts_a_fresh_items_events_so_far():
    s = Signals(fresh={"f1": 3, "f2": 1})
    names, x = candidates(s, ["a"], {"q": 0.5, "f2": 0.1}, [], seen={"a"})
    assert names == ["q", "f2", "f1"]  # the pool, then the fresh candidates
    assert x[FEATURES.index("fresh")].tolist() == pytest.approx([0.0, np.log(2), np.log(4)])


def test_near_sums_the_weights_of_the_users_items():
    s = Signals(neighbours={"a": {"c": 0.5, "d": 0.25}, "b": {"c": 0.25}})
    assert s.near(["b", "a"]) == {"c": 0.75, "d": 0.25}


def test_fit_counts_only_the_rivals_and_the_counts_stay_exact(monkeypatch):
    """``rivals_of`` drops the candidates no weights can rank above the chosen one: for every weights of
    the grid the number of candidates above the chosen one is what scoring every candidate gives."""
    rng = np.random.default_rng(1)
    x = rng.random((50, len(FEATURES), 40)).astype(np.float32) * (rng.random((50, len(FEATURES), 40)) < 0.3)
    x[:, 0] = rng.normal(size=(50, 40)) * 0.3  # the model's cosine: negative too
    x[:, 1] = np.round(x[:, 1] * 2) / 2  # ties
    pad = np.zeros((50, 40), dtype=bool)
    pad[::3, 30:] = True  # shorter candidate lists
    chosen = rng.integers(30, size=50)
    monkeypatch.setattr(model.blend_weights, "FIT_EXAMPLE_BLOCK", 16)
    blocks = rivals_of(x, pad, chosen)
    assert [len(b) for b in blocks] == [13, 13, 12, 12] and sum(b.shape[2] - 1 for b in blocks) < 4 * 40
    weights = GRID + TIES
    every = np.einsum("gf,bfc->gbc", weights, x)
    every[:, pad] = -np.inf
    above = (every > every[:, np.arange(50), chosen][..., None]).sum(axis=2)  # [G, B]
    counted = np.concatenate([(k[..., 1:] > k[..., :1]).sum(axis=2) for k in
                              (np.einsum("gf,bfc->gbc", weights, b) for b in blocks)], axis=1)
    # the blocks hold the examples in the order of their rival counts
    target = x[np.arange(50), :, chosen]
    order = np.argsort(((x > target[..., None]).any(axis=1) & ~pad).sum(axis=1), kind="stable")
    assert np.array_equal(counted, above[:, order])


def test_fit_learns_the_informative_feature_and_can_leave_the_model_out():
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(600):
        x = rng.normal(size=(len(FEATURES), 20)).astype(np.float32)
        examples.append(Example(x, int(np.argmax(x[1]))))  # the choice follows the rules' feature only
    learnt = fit(examples)
    assert fit(examples[:MIN_EXAMPLES - 1]).to_json() == Blend().to_json()  # too few: the prior (the model alone)
    assert learnt.fitted_on == 600 and learnt.weights[1] > 0 and learnt.weights[0] <= learnt.weights[1]
    hits = np.mean([np.argmax(learnt.score(e.features)) == e.chosen for e in examples])
    assert hits > 0.9
    without = fit(examples, use_model=False)
    assert without.weights[0] == 0.0 and without.weights[1] > 0
    assert fit([], learnt) is learnt
    assert Blend.from_json(learnt.to_json()).weights.tolist() == pytest.approx(learnt.weights.tolist(), abs=1e-5)
    assert Blend.from_json({"features": ["other"], "weights": [1.0]}).fitted_on == 0  # never misread


def test_the_model_keeps_its_weight_only_while_it_earns_it():
    """The rules decide every choice but a few, where the chosen item ties on the rules with 12 others
    that popularity ranks above it and only the model's cosine sets it apart. Two such examples in 600
    are within MODEL_MARGIN standard errors: the fit leaves the model out. Sixty are not: it keeps it."""
    rng = np.random.default_rng(2)
    rules, popular = FEATURES.index("rules"), FEATURES.index("popular")

    def examples(tied: int) -> list[Example]:
        out = []
        for n in range(600):
            x = rng.random((len(FEATURES), 30)).astype(np.float32) * 0.001
            x[rules] = rng.permutation(30)
            chosen = int(np.argmax(x[rules]))
            if n < tied:
                rivals = rng.choice([j for j in range(30) if j != chosen], 12, replace=False)
                x[[f for f in range(len(FEATURES)) if f != rules]] = 0.0  # nothing else tells them apart
                x[rules, rivals], x[popular, rivals], x[0, chosen] = x[rules, chosen], 0.05, 1.0
            out.append(Example(x, chosen))
        return out

    few, many = examples(2), examples(60)
    hits, with_model = hits_of(GRID, rivals_of(*stacked(few))), GRID[:, 0] > 0
    assert hits[with_model].max() > hits[~with_model].max()  # the plain grid's best has the model in it
    fitted = fit(few)
    assert fitted.weights[0] == 0.0 and fitted.weights[rules] > 0
    assert fit(many).weights[0] > 0
    blocks = rivals_of(*stacked(many))
    rules_alone = np.eye(len(FEATURES), dtype=np.float32)[rules]
    assert model_earns(rules_alone + np.eye(len(FEATURES), dtype=np.float32)[0], rules_alone, blocks)
    assert not model_earns(rules_alone, rules_alone, blocks)  # the same hits: no gain


def test_short_and_long_histories_get_blends_of_their_own():
    """Short histories' choices follow the rules, long ones' the neighbours: each blend learns its own;
    a segment with too few examples of its own is fitted on all of them."""
    rng = np.random.default_rng(1)

    def examples(n: int, feature: int, length: int) -> list[Example]:
        out = []
        for _ in range(n):
            x = rng.random((len(FEATURES), 20)).astype(np.float32)
            out.append(Example(x, int(np.argmax(x[feature])), length=length))
        return out

    rules, neighbours = FEATURES.index("rules"), FEATURES.index("neighbours")
    short, long = examples(600, rules, SPLIT - 1), examples(600, neighbours, SPLIT)
    both = fit_blends(short + long, Blends())
    assert both.short.fitted_on == both.long.fitted_on == 600
    assert both.short.weights[rules] > 0 and both.short.weights[neighbours] == 0
    assert both.long.weights[neighbours] > 0 and both.long.weights[rules] == 0
    assert both.of(SPLIT - 1) is both.short and both.of(SPLIT) is both.long and both.of(0) is both.short
    few = fit_blends(short[:MIN_EXAMPLES - 1] + long, Blends())
    assert few.short.fitted_on == MIN_EXAMPLES - 1 + 600 and few.long.to_json() == both.long.to_json()
    assert fit_blends(short[:10], both).to_json() == both.to_json()  # too few in all: as they were
    assert Blends.from_json(both.to_json()).to_json() == both.to_json()
    # What versions before the split stored, one blend: both segments start from it.
    single = Blends.from_json(both.long.to_json())
    assert single.short.to_json() == single.long.to_json() == both.long.to_json()


def test_an_item_is_fresh_while_its_first_event_is_among_the_last_ones():
    seen = FirstSeen()
    seen.old(["a"])  # in the stream before counting began
    seen.add(["a", "b", "b"])
    assert seen.fresh() == {"b": 2}  # a is old however often it comes
    seen.add(["c"] * (FRESH_EVENTS - 2))  # b's first event (the 2nd) is now FRESH_EVENTS - 1 events back
    assert seen.fresh() == {"b": 2, "c": FRESH_EVENTS - 2}
    seen.add(["c"])
    assert seen.fresh() == {"c": FRESH_EVENTS - 1}  # b is out; c came at event 4, FRESH_EVENTS - 1 back
    assert Signals(fresh={"x": 1, "y": 3, "z": 3}).top_fresh() == ["y", "z", "x"]


def test_fresh_slots_take_the_best_fresh_items_after_the_blends_best():
    names = ["a", "b", "c", "f1", "f2", "f3"]
    features = np.zeros((len(FEATURES), 6), dtype=np.float32)
    features[0] = [0.9, 0.8, 0.7, 0.1, 0.3, 0.2]  # the model alone ranks a b c f2 f3 f1
    fresh = [False, False, False, True, True, True]
    assert [i for i, _ in top(Blend(), names, features, 3, fresh)] == ["a", "b", "c"]
    slotted = Blend(fresh_slots=2)
    assert [i for i, _ in top(slotted, names, features, 3, fresh)] == ["a", "f2", "f3"]
    # A fresh item in the blend's own best keeps its place; the slots go to the next fresh ones.
    features[0, 4] = 0.95
    assert [i for i, _ in top(slotted, names, features, 3, fresh)] == ["f2", "f3", "f1"]
    # Too few fresh items: topped up from the blend.
    assert [i for i, _ in top(Blend(fresh_slots=3), names, features, 5, [False] * 5 + [True])] == ["f2", "a", "f3", "b", "c"]
    assert Blend.from_json(slotted.to_json()).fresh_slots == 2


def test_slot_hits_count_what_top_would_answer(monkeypatch):
    monkeypatch.setattr(model.blend_weights, "TOP", 3)
    names = ["c0", "c1", "c2", "c3", "c4", "c5"]
    scores = np.array([[5, 4, 3, 2, 1, 0]] * 3, dtype=np.float32)
    fresh = np.array([[False, False, True, False, True, True]] * 3)
    chosen = np.array([0, 4, 5])  # ranks 0, 4 (the 2nd fresh), 5 (the 3rd fresh)
    # 0 slots: c0 c1 c2; 1: c0 c1 + c2; 2: c0 + c2 c4; 3: c2 c4 c5.
    assert [slot_hits_of(scores, fresh, chosen, s) for s in (0, 1, 2, 3)] == [1, 1, 2, 2]
    features = np.zeros((len(FEATURES), 6), dtype=np.float32)
    features[0] = scores[0]
    for slots, hits in zip((0, 1, 2, 3), (1, 1, 2, 2)):
        answer = [i for i, _ in top(Blend(fresh_slots=slots), names, features, 3, fresh[0])]
        assert sum(names[c] in answer for c in chosen) == hits


def test_fit_gives_fresh_items_slots_when_the_stream_takes_them():
    rng = np.random.default_rng(0)
    examples = []
    for n in range(600):
        x = rng.normal(size=(len(FEATURES), 30)).astype(np.float32)
        fresh = np.zeros(30, dtype=bool)
        fresh[20:] = True
        x[0, 20:] -= 10.0  # the model ranks every fresh candidate last...
        chosen = 20 + int(np.argmax(x[0, 20:])) if n % 2 else int(np.argmax(x[0]))  # ...yet half the events take one
        examples.append(Example(x, chosen, fresh))
    learnt = fit(examples)
    assert learnt.fresh_slots >= 1
    assert fit([Example(e.features, e.chosen, np.zeros(30, dtype=bool)) for e in examples]).fresh_slots == 0


def test_fit_weighs_the_fresh_items_events_when_the_stream_takes_the_hot_ones():
    """The fresh weight is fitted after the grid, under its best weights: positive when half the users
    take the fresh item the stream takes most, which no other feature ranks, 0 when nobody takes one."""
    fresh_row = FEATURES.index("fresh")

    def examples(hot: bool) -> list[Example]:
        rng = np.random.default_rng(0)
        out = []
        for n in range(600):
            x = np.zeros((len(FEATURES), 30), dtype=np.float32)
            x[:fresh_row] = rng.random((fresh_row, 30))  # noise, but for the model's cosine
            x[0] = rng.normal(size=30)
            x[0, 20:] -= 10.0  # the model ranks every fresh candidate last
            x[fresh_row, 20:] = np.log1p(rng.integers(1, 50, size=10))
            chosen = 20 + int(np.argmax(x[fresh_row, 20:])) if n % 2 and hot else int(np.argmax(x[0]))
            out.append(Example(x, chosen, np.arange(30) >= 20))
        return out

    learnt = fit(examples(hot=True))
    assert learnt.weights[0] > 0 and learnt.weights[fresh_row] > 0
    assert np.mean([e.chosen in np.argsort(-learnt.score(e.features))[:10] for e in examples(hot=True)]) > 0.99
    assert fit(examples(hot=False)).weights[fresh_row] == 0.0
    assert GRID[:, fresh_row].max() == 0.0 and 0.0 in FRESH_GRID  # the grid leaves it to the second pass


def test_signals_only_arm_learns_after_each_chunk():
    histories = {"u1": ["a", "b"], "u2": ["a", "b"], "u3": ["c"]}
    arm = SignalsOnly(histories, recent_len=50, categories={})
    assert arm.top({"u3": ["c"]}, 2) == {"u3": ["a", "b"]}  # no rule from c: the popular ones
    assert arm.top({"u9": ["a"]}, 1) == {"u9": ["b"]}  # a → b
    histories["u3"].append("a")
    arm.learn(histories, Counter(["u3"]))
    assert arm.blend.long.fitted_on == arm.blend.short.fitted_on == 0  # one event: too few to fit, the prior stays
    assert arm.examples and arm.blend.long.weights[0] == arm.blend.short.weights[0] == 0.0  # the model never enters
    assert arm.examples[-1].length == 1  # u3 had one item before it
    assert arm.signals.popular["a"] == 3


def test_pool_of_takes_the_best_scored_unseen_items():
    scores = np.array([0.9, 0.1, 0.8, 0.5, 0.7], dtype=np.float32)
    assert pool_of(scores, list("abcde"), {"a", "e"}, 2) == pytest.approx({"c": 0.8, "d": 0.5})
    assert pool_of(scores, list("abcde"), set(), 10) == pytest.approx(dict(zip("acedb", [0.9, 0.8, 0.7, 0.5, 0.1])))


def test_exact_blend_pools_the_models_best_items_and_learns_with_the_model(world, monkeypatch):
    """ExactBlend (simulate --in-process) is the worker's blend on exact histories: the model feature of
    its candidates is the diagnostic's max cosine, its pool the best unseen items, and its fit may weigh
    the model (the signals-only arm's never does)."""
    monkeypatch.setattr(model.blend_weights, "MIN_EXAMPLES", 5)  # the world is small
    items = world["items"][["item_id", "text", "category"]]
    diagnostic = Diagnostic(world["m1"], items)
    log = pd.DataFrame(world["interactions"])
    histories = exact_histories(log, 300)
    arm = ExactBlend(histories, 50, list(zip(log["user_id"].iloc[:300], log["item_id"].iloc[:300])), diagnostic,
                     categories=dict(zip(items["item_id"], items["category"])))
    assert arm.blend.long.weights[0] > 0 and arm.blend.long.fitted_on == 0  # the worker's prior
    users = sorted(histories)[:4]
    cosines = diagnostic.cosines([histories[u] for u in users])
    for user, (names, features, _), scores in zip(users, arm.candidates_of([histories[u] for u in users]), cosines):
        best = [diagnostic.item_ids[j] for j in np.argsort(-scores) if diagnostic.item_ids[j] not in histories[user]][:20]
        assert set(best) <= set(names) and not set(names) & set(histories[user])
        for name in best:
            assert features[0, names.index(name)] == pytest.approx(scores[diagnostic.index[name]], abs=1e-5)
        # The model's weight alone ranks by the model: the answer's cosines are the 10 best unseen ones
        # (up to tie-breaks).
        arm.blend = Blends(*[Blend(np.eye(len(FEATURES), dtype=np.float32)[0])] * 2)
        answer = arm.top({user: histories[user]}, 10)[user]
        assert sorted(scores[[diagnostic.index[i] for i in answer]]) == pytest.approx(
            sorted(scores[[diagnostic.index[i] for i in best[:10]]]), abs=1e-3)
    extend(histories, log.iloc[300:360])
    arm.learn(histories, Counter(log["user_id"].iloc[300:360]))
    assert len(arm.examples) >= 5 and arm.blend.long.fitted_on == len(arm.examples)  # too few short ones: all
    assert len({float(e.features[0, e.chosen]) for e in arm.examples}) > 1  # the model's cosines, not a constant


# --- serving.blend + reader: a real LanceDB directory ----------------------------------------------
def test_keeper_fits_on_the_events_since_its_last_count_and_topk_uses_it(world, world_settings, monkeypatch):
    monkeypatch.setattr(model.blend_weights, "MIN_EXAMPLES", 5)  # the world is small
    store = Store(world_settings)
    publish(world_settings, world["m1"])
    runtime = ServingRuntime(world_settings)
    runtime.start()
    users = users_of(store)
    assert read_blend(store) is None  # no signals counted yet: the model alone
    assert all(r.ranked_by == "model" for r in Recommender(store).many(users[:3], 10))
    runtime.refresh_popularity()  # the first count: nothing to learn from yet, so the prior serves
    prior = read_blend(store)
    assert prior is not None and prior.long.fitted_on == prior.short.fitted_on == 0 and counted_at(store) is not None
    assert prior.long.weights.tolist() == prior.short.weights.tolist() == pytest.approx(PRIOR)
    assert all(r.ranked_by == "blend" for r in Recommender(store).many(users[:3], 10))
    # New events for some users: the next count fits on exactly them.
    log = Log(store, world_settings)
    log.offsets = list(world["offsets"])
    items = world["items"]["item_id"].tolist()
    log.interactions([{"user_id": u, "item_id": items[(7 * n) % len(items)], "ts": 2_000_000_000_000 + n}
                      for n, u in enumerate(users[:12])])
    runtime.refresh()
    before = counted_at(store)
    runtime.refresh_popularity()
    blend = read_blend(store)
    assert blend is not None and 0 < blend.long.fitted_on <= 12 and counted_at(store) > before
    assert np.isfinite(blend.long.weights).all()
    signals = read_signals(store, [items])
    assert signals.popular and signals.follows and signals.neighbours
    # The fresh items are stored with when they first came: a restarted keeper takes them up again.
    assert BlendKeeper(store, world_settings.recent_len).first_seen.counts == signals.fresh
    # A count with no history changed since the last keeps the neighbours rather than recount them.
    recounts = []
    monkeypatch.setattr(runtime.blend.pairs, "weights", lambda *a: recounts.append(a) or {})
    runtime.refresh_popularity()
    assert recounts == [] and read_signals(store, [items]).neighbours == signals.neighbours
    answers = Recommender(store).many(users, 10)
    assert [a.to_json() for a in answers] == [recommend(store, u, 10).to_json() for u in users]
    for answer in answers:
        seen = set(store.get_histories([answer.user_id])[answer.user_id]["history_item_ids"])
        assert answer.ranked_by == "blend" and answer.to_json()["ranked_by"] == "blend"
        assert len(answer.items) == 10 and not seen & {s.item_id for s in answer.items}
        scores = [s.score for s in answer.items]
        assert scores == sorted(scores, reverse=True)
    # One fresh slot: every answer then holds the fresh item (unless the user has it), ranked with its
    # exact cosine although it may be outside the model's pool.
    seen = {u: set(h["history_item_ids"] or []) for u, h in store.get_histories(users).items()}
    fresh = min(items, key=lambda i: sum(i in s for s in seen.values()))  # the item fewest users have
    now = datetime.now(timezone.utc).replace(microsecond=0)
    store.db.create_table(FRESH, to_arrow(pa.table({"item_id": [fresh], "first_event": [0], "count": [1],
                                                    "updated_at": [now]}), fresh_schema(), FRESH), mode="overwrite")
    # The slot in the short histories' blend only: the reader still reads the fresh items' cosines.
    lengths = {u: len(h["recent_item_ids"] or []) for u, h in store.get_histories(users).items()}
    write_blend(store, Blends(Blend(blend.short.weights, fresh_slots=1), blend.long))
    unseen = [u for u in users if fresh not in seen[u] and lengths[u] < SPLIT]
    assert unseen
    for answer in Recommender(store).many(unseen, 10):
        assert fresh in [s.item_id for s in answer.items] and len(answer.items) == 10
        assert next(s for s in answer.items if s.item_id == fresh).interest is not None  # an exact cosine
    # Each user is ranked by the blend of their history's length.
    by_model, by_popular = (Blend(np.eye(len(FEATURES), dtype=np.float32)[FEATURES.index(f)]) for f in ("model", "popular"))

    def answers_under(blends: Blends) -> dict[str, dict]:
        write_blend(store, blends)
        return {a.user_id: a.to_json() for a in Recommender(store).many(users, 10)}

    models, populars, split = (answers_under(Blends(*b)) for b in ((by_model, by_model), (by_popular, by_popular),
                                                                   (by_model, by_popular)))
    for short in (True, False):
        assert any(models[u] != populars[u] for u in users if (lengths[u] < SPLIT) == short)
    assert split == {u: (models if lengths[u] < SPLIT else populars)[u] for u in users}


def write_blend(store: Store, blends: Blends) -> None:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    store.db.create_table(BLEND, to_arrow(pa.table({"blend": [json.dumps(blends.to_json())], "model_version": [None],
                                                    "updated_at": [now]}), blend_schema(), BLEND), mode="overwrite")


def interleaved(new: list[int]) -> list[tuple[int, int]]:
    """(user, k) of each of the users' ``new`` events, in the order model.trend counts an add: each user's
    k-th of n at (k + ½) / n of it, ties in the users' order."""
    return [(u, k) for _, u, k in sorted(((k + 0.5) / n, u, k) for u, n in enumerate(new) for k in range(n))]


def counted_by_hand(histories: list[list[str]], new: list[int], category: dict[str, str],
                    known: set[str]) -> tuple[Counter, Counter]:
    """(weights, offers) of the items from the users' ``new`` newest events, counted in one add (model.trend's
    definition, one event at a time, ``interleaved``, each decayed by the add's events after it): an
    event's item takes its weight, and it offers every item of its category the user had not taken among
    the ones ``known`` before and the add's from their first event on."""
    weights: Counter = Counter()
    offers: Counter = Counter()
    counted = set(known)
    order = interleaved(new)
    for at, (u, k) in enumerate(order):
        weight = 2 ** (-(len(order) - 1 - at) / HALF_LIFE)
        end = len(histories[u]) - new[u] + k
        item = histories[u][end]
        counted.add(item)
        weights[item] += weight
        taken = set(histories[u][:end])
        offers.update({i: weight for i in counted if category[i] == category[item] and i not in taken})
    return weights, offers


def test_keeper_counts_the_trend_along_the_stream_and_a_restart_keeps_it(world, world_settings):
    store = Store(world_settings)
    publish(world_settings, world["m1"])
    runtime = ServingRuntime(world_settings)
    runtime.start()
    runtime.refresh_popularity()  # the first count, nothing stored: every user's recent items in one add
    category = dict(zip(world["items"]["item_id"], world["items"]["category"]))
    rows = pa.concat_tables([store.scan_histories(s, ["recent_item_ids"]) for s in store.shards(HISTORIES)])
    recents = [r or [] for r in rows["recent_item_ids"].to_pylist()]
    per_item, offers = counted_by_hand(recents, [len(r) for r in recents], category, set())
    per_category = Counter()
    for i, w in per_item.items():
        per_category[category[i]] += w
    heat = {i: w / (offers[i] + OFFER_PRIOR * per_category[category[i]]) for i, w in per_item.items()}
    heat_of = Counter()
    for i, h in heat.items():
        heat_of[category[i]] += h
    first = read_signals(store, []).trend
    assert {i: c for i, (c, _) in first.items()} == {i: category[i] for i in per_item}
    assert {i: s for i, (_, s) in first.items()} == pytest.approx({i: h / heat_of[category[i]] for i, h in heat.items()})
    weights = {i: runtime.blend.trend.weight(i) for i in runtime.blend.trend.raw}
    assert weights == pytest.approx(dict(per_item))
    # Twelve new events: every weight and offer before decays by 12 events, each new event adds one (decayed
    # by the new events after it: one user's each, counted in the order the keeper reads the users).
    log = Log(store, world_settings)
    log.offsets = list(world["offsets"])
    items = world["items"]["item_id"].tolist()
    users = users_of(store)
    new = [items[(7 * n) % len(items)] for n in range(12)]
    log.interactions([{"user_id": u, "item_id": i, "ts": 2_000_000_000_000 + n}
                      for n, (u, i) in enumerate(zip(users[:12], new))])
    runtime.refresh()
    runtime.refresh_popularity()
    scanned = pa.concat_tables([store.scan_histories(s, ["user_id"]) for s in store.shards(HISTORIES)])
    order = [u for u in scanned["user_id"].to_pylist() if u in users[:12]]
    took = dict(zip(users[:12], new))
    after = store.get_histories(order)
    recent = [list(after[u]["recent_item_ids"]) for u in order]
    assert [r[-1] for r in recent] == [took[u] for u in order]
    decay = 2 ** (-12 / HALF_LIFE)
    added, offered_now = counted_by_hand(recent, [1] * 12, category, set(per_item))
    expected = Counter({i: w * decay for i, w in weights.items()}) + added
    assert {i: runtime.blend.trend.weight(i) for i in expected} == pytest.approx(dict(expected))
    offered = Counter({i: offers[i] * decay for i in per_item}) + offered_now
    assert {i: runtime.blend.trend.offers(i) for i in expected} == pytest.approx({i: offered[i] for i in expected})
    # A restart reads the counts back and goes on from them (no recount of the recent items).
    restarted = BlendKeeper(store, world_settings.recent_len)
    restarted.refresh(None, None, 0)
    assert {i: restarted.trend.weight(i) for i in expected} == pytest.approx(dict(expected))
    assert {i: restarted.trend.offers(i) for i in expected} == pytest.approx({i: offered[i] for i in expected})
    stored, counted = read_signals(store, []).trend, runtime.blend.signals.trend
    assert stored.keys() == counted.keys()
    assert {i: s for i, (_, s) in stored.items()} == pytest.approx({i: s for i, (_, s) in counted.items()})


def test_a_trend_table_of_an_older_version_is_recounted_not_read(world, world_settings):
    store = Store(world_settings)
    publish(world_settings, world["m1"])
    old = pa.schema([f for f in trend_schema() if f.name != "offers"])
    store.db.create_table(TREND, pa.table({"item_id": ["x"], "category": ["c"], "weight": [9.0], "share": [1.0],
                                           "updated_at": [datetime.now(timezone.utc)]}, schema=old))
    assert read_signals(store, []).trend == {}  # not the stale row: nothing until the keeper writes
    keeper = BlendKeeper(store, world_settings.recent_len)
    assert not keeper.trend_counted
    keeper.refresh(None, None, 0)
    stored = read_signals(store, []).trend
    assert stored and "x" not in stored  # recounted from the users' recent items, in the new schema
