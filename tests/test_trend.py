"""model.trend: decayed counts per item, shares within categories and a user's scores, by hand."""

from __future__ import annotations

import pytest

from model.trend import OFFER_PRIOR, Trend, by_category, user_scores


def test_every_event_halves_the_earlier_weights_after_half_life_events():
    trend = Trend({"a": "x", "b": "x", "c": "y"}, half_life=1)
    trend.add([["a"]], [1])
    trend.add([["b"]], [1])
    trend.add([["c"], ["a"]], [1, 1])  # two users' events in one add: c, then a (the users' order)
    # a: 1 halved three times, + 1; b: 1 halved twice; c: 1 halved once
    assert [trend.weight(i) for i in "abc"] == [pytest.approx(1 / 8 + 1), pytest.approx(1 / 4), pytest.approx(1 / 2)]
    shares = trend.shares()
    assert shares == {"a": ("x", pytest.approx(1.125 / 1.375)), "b": ("x", pytest.approx(0.25 / 1.375)),
                      "c": ("y", pytest.approx(1.0))}
    assert trend.shares(keep=2) == {"a": shares["a"], "c": shares["c"]}  # the shares stay over the whole category


def test_an_adds_events_are_spread_evenly_over_it_user_by_user():
    trend = Trend({i: "x" for i in "abcdef"}, half_life=1)
    trend.add([["a", "b", "c", "d"], ["e", "f"]], [4, 2])
    # the first user's at 1/8, 3/8, 5/8, 7/8 of the add, the second's at 1/4, 3/4: a e b c f d
    assert [trend.weight(i) for i in "aebcfd"] == pytest.approx([2.0 ** -k for k in range(5, -1, -1)])


def test_weights_and_offers_survive_the_rescale():
    trend = Trend({"a": "x", "b": "x"}, half_life=1, per_offer=True)
    trend.add([["a"]], [1])
    for _ in range(400):  # 2^400 > RESCALE: the stored weights are renormalised on the way
        trend.add([["b"]], [1])  # users with nothing before: every event offers both
    assert trend.scale < 2.0 ** 400
    assert trend.weight("a") == pytest.approx(2.0 ** -400, rel=1e-9)
    assert trend.weight("b") == pytest.approx(2.0, rel=1e-9)  # 1 + 1/2 + 1/4 + …
    assert trend.offers("a") == pytest.approx(2.0, rel=1e-9)
    assert trend.offers("b") == pytest.approx(2.0, rel=1e-9)


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
    trend.add([["a", "b", "c"]], [3])  # c: not in the catalogue
    assert trend.shares() == {"a": ("x", 1.0)}


def test_an_item_is_offered_by_its_categorys_events_of_users_who_had_not_taken_it():
    trend = Trend({"a": "x", "b": "x", "c": "x", "d": "y"}, half_life=1e12, per_offer=True)  # no decay
    trend.add([["a"]], [1])  # u1 takes a
    assert trend.offers("a") == pytest.approx(1)  # its own event offered it
    trend.add([["b"], ["a", "c"], ["d"]], [1, 1, 1])  # in one add, in the users' order: u2 takes b, u1 c, u3 d
    # a: u1's first event and u2's b (not u1's c: u1 had it); b: its own event and u1's c; c: its own
    # (counted from its first event: b's came before it)
    assert [trend.offers(i) for i in "abcd"] == pytest.approx([2, 2, 1, 1])
    trend.add([["b", "a"]], [1])  # u2 takes a: a offered; b not (u2 had it); c offered
    assert [trend.offers(i) for i in "abc"] == pytest.approx([3, 2, 2])
    # heat: events over offers + OFFER_PRIOR × the category's events (a 2, b 1, c 1: 4)
    heat = {"a": 2 / (3 + OFFER_PRIOR * 4), "b": 1 / (2 + OFFER_PRIOR * 4), "c": 1 / (2 + OFFER_PRIOR * 4)}
    assert trend.heat(list("abc")) == pytest.approx(heat)
    x = sum(heat.values())
    assert trend.shares() == {"a": ("x", pytest.approx(heat["a"] / x)), "b": ("x", pytest.approx(heat["b"] / x)),
                              "c": ("x", pytest.approx(heat["c"] / x)), "d": ("y", pytest.approx(1.0))}
    # a has half of x's events but was offered more often than b and c: less than half of its heat.
    assert trend.shares()["a"][1] < 0.5


def test_a_users_events_in_one_add_offer_in_their_order():
    trend = Trend({"a": "x", "b": "x", "c": "x", "d": "y"}, half_life=1e12, per_offer=True)
    trend.add([["d", "a", "b", "c"], ["a"]], [3, 1])  # d taken before; then a, b, c; another user's a
    # Spread over the add: a (1/6), b (1/2, the first user's), the other user's a (1/2), c (5/6).
    # a: offered by its two events (not by b's or c's: their user had it); b: by its own and the other
    # user's a; c: by its own only
    assert [trend.offers(i) for i in "abc"] == pytest.approx([2, 2, 1])
    assert [trend.weight(i) for i in "abc"] == pytest.approx([2, 1, 1])


def test_offers_decay_like_the_events():
    trend = Trend({"a": "x", "b": "x"}, half_life=1, per_offer=True)
    trend.add([["a"]], [1])
    trend.add([["b"]], [1])  # another user: a offered again, its first offer halved
    assert (trend.offers("a"), trend.offers("b")) == (pytest.approx(1.5), pytest.approx(1.0))
    assert (trend.weight("a"), trend.weight("b")) == (pytest.approx(0.5), pytest.approx(1.0))
    assert trend.heat(["a", "b"]) == pytest.approx({"a": 0.5 / (1.5 + OFFER_PRIOR * 1.5), "b": 1 / (1 + OFFER_PRIOR * 1.5)})


def test_restore_takes_back_the_stored_counts():
    trend = Trend({"a": "x", "b": "x", "c": "x"}, per_offer=True)
    trend.add([["a", "a"], ["b"]], [2, 1])
    trend.add([["b", "c"]], [1])
    back = Trend(trend.categories, per_offer=True)
    back.restore({i: trend.weight(i) for i in "abc"}, {i: trend.offers(i) for i in "abc"})

    def share(t: Trend) -> dict[str, float]:
        return {i: s for i, (_, s) in t.shares().items()}

    assert share(back) == pytest.approx(share(trend))
    for t in (back, trend):
        t.add([["a", "c", "b"], ["d", "a"]], [2, 2])  # old items taken and offered again, and a new one (d)
    assert share(back) == pytest.approx(share(trend))
    assert [back.offers(i) for i in "abc"] == pytest.approx([trend.offers(i) for i in "abc"])


def test_replay_adds_a_logs_events_one_at_a_time_each_after_its_users_earlier_ones():
    trend = Trend({"a": "x", "b": "x"}, half_life=1e12, per_offer=True)
    trend.replay([("u", "a"), ("v", "a"), ("u", "b")])
    # a: offered by u's and v's a, not by u's b (u had it); b: came with the last event, offered by it
    assert [trend.offers(i) for i in "ab"] == pytest.approx([2, 1])
    assert [trend.weight(i) for i in "ab"] == pytest.approx([2, 1])
