"""model.trend: decayed counts per item, shares within categories and a user's scores, by hand."""

from __future__ import annotations

import pytest

from model.trend import STEADY_PRIOR, Trend, by_category, user_scores


def test_every_add_halves_the_earlier_weights_after_half_life_events():
    trend = Trend({"a": "x", "b": "x", "c": "y"}, half_life=1)
    trend.add(["a"])
    trend.add(["b"])
    trend.add(["c", "a"])  # two events at once: everything before decays by two
    # a: 1 halved three times, + 1; b: 1 halved twice; c: 1
    assert [trend.weight(i) for i in "abc"] == [pytest.approx(1 / 8 + 1), pytest.approx(1 / 4), pytest.approx(1)]
    shares = trend.shares()
    assert shares == {"a": ("x", pytest.approx(1.125 / 1.375)), "b": ("x", pytest.approx(0.25 / 1.375)),
                      "c": ("y", pytest.approx(1.0))}
    assert trend.shares(keep=2) == {"a": shares["a"], "c": shares["c"]}  # the shares stay over the whole category


def test_weights_survive_the_rescale():
    trend = Trend({"a": "x", "b": "x"}, half_life=1)
    trend.add(["a"])
    for _ in range(400):  # 2^400 > RESCALE: the stored weights are renormalised on the way
        trend.add(["b"])
    assert trend.scale < 2.0 ** 400
    assert trend.weight("a") == pytest.approx(2.0 ** -400, rel=1e-9)
    assert trend.weight("b") == pytest.approx(2.0, rel=1e-9)  # 1 + 1/2 + 1/4 + …


def test_a_users_score_is_their_category_mix_times_the_items_share():
    shares = {"a": ("x", 0.75), "b": ("x", 0.25), "c": ("y", 1.0)}
    categories = by_category(shares)
    assert categories == {"x": {"a": 0.75, "b": 0.25}, "y": {"c": 1.0}}
    # two of x, one of y; "z" has no share (no category, or nobody took it lately): not in the mix
    assert user_scores(["a", "b", "c", "z"], shares, categories) == {
        "a": pytest.approx(2 / 3 * 0.75), "b": pytest.approx(2 / 3 * 0.25), "c": pytest.approx(1 / 3)}
    assert user_scores(["z"], shares, categories) == {}
    assert user_scores([], shares, categories) == {}


def test_items_without_a_category_are_counted_nowhere():
    trend = Trend({"a": "x", "b": None}, half_life=10)
    trend.add(["a", "b", "c"])  # c: not in the catalogue
    assert trend.shares() == {"a": ("x", 1.0)}


def test_steady_heat_adds_the_items_share_of_the_rates_by_hand():
    trend = Trend({"a": "x", "b": "x", "c": "y"}, half_life=1, steady=True)
    trend.add(["a"])
    for _ in range(STEADY_PRIOR):
        trend.add(["c"])
    trend.add(["b"])
    # weights: a 2^-(P+1), c 1/2 + 1/4 + … (P terms: its last event halved once), b 1. Rates: events over
    # (the events since the first, itself included, + 1 + P): a 1/(P+2+1+P), c P/(P+1+1+P), b 1/(1+1+P).
    p = STEADY_PRIOR
    weight = {"a": 2.0 ** -(p + 1), "b": 1.0, "c": 1.0 - 2.0 ** -p}
    rate = {"a": 1 / (2 * p + 3), "b": 1 / (p + 2), "c": p / (2 * p + 2)}
    assert [trend.since_first(i) for i in "abc"] == [p + 2, 1, p + 1]
    heat = {i: weight[i] / sum(weight.values()) + rate[i] / sum(rate.values()) for i in "abc"}
    assert trend.heat(list("abc")) == pytest.approx(heat)
    assert trend.shares() == {"a": ("x", pytest.approx(heat["a"] / (heat["a"] + heat["b"]))),
                              "b": ("x", pytest.approx(heat["b"] / (heat["a"] + heat["b"]))),
                              "c": ("y", pytest.approx(1.0))}
    # An item nobody took lately keeps a share by its rate; the plain decayed share all but forgets it.
    plain = Trend(trend.categories, half_life=1)
    plain.raw, plain.scale = trend.raw, trend.scale
    assert plain.shares()["a"][1] < 1e-50 < 1e-3 < trend.shares()["a"][1]


def test_restore_takes_back_the_stored_counts():
    trend = Trend({"a": "x", "b": "x"}, steady=True)
    trend.add(["a", "a"])
    trend.add(["b"])
    back = Trend(trend.categories, steady=True)
    back.restore({i: trend.weight(i) for i in "ab"}, trend.events, {i: trend.since_first(i) for i in "ab"})
    def share(t: Trend) -> dict[str, float]:
        return {i: s for i, (_, s) in t.shares().items()}

    assert share(back) == pytest.approx(share(trend))
    back.add(["b"]), trend.add(["b"])
    assert share(back) == pytest.approx(share(trend))
    assert [back.since_first(i) for i in "ab"] == [4, 2]


def test_an_add_larger_than_all_before_it_takes_its_new_items_from_its_start():
    trend = Trend({"a": "x", "b": "x", "c": "x", "d": "x"}, steady=True)
    trend.add(["a"] * 9)  # a start's recount: all at once, their order unknown, mostly old items
    trend.add(["b"])
    assert trend.since_first("a") == 10 and trend.since_first("b") == 1
    trend.add(["c"] * 4)  # 4 events after 10: the events since a count, new ones taken from its middle
    assert trend.since_first("c") == 2
    trend.add(["d"] * 20)  # 20 after 14: a backlog
    assert trend.since_first("d") == 20 and trend.since_first("a") == 34
    p = STEADY_PRIOR
    rates = {"a": 9 / (35 + p), "b": 1 / (26 + p), "c": 4 / (23 + p), "d": 20 / (21 + p)}
    heat = trend.heat(list("abcd"))
    weights = {i: trend.weight(i) for i in "abcd"}
    assert heat == pytest.approx({i: weights[i] / sum(weights.values()) + rates[i] / sum(rates.values()) for i in "abcd"})
