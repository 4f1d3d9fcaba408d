"""The simple streaming baselines (model.baselines, DESIGN §7a) on small logs whose counts and
rankings are worked out by hand in the comments."""

from __future__ import annotations

import pytest

from model.baselines import CategoryTrend, Ease, ItemNeighbours, MostPopular, RecentPopular, SequentialRules, neighbours, streaming_baselines
import model.ease
from model.ease import EASE_L2, EASE_SCALE, Cooccurrence


def pairs(text: str) -> list[tuple[str, str]]:
    """'u1:a u2:b' → [("u1", "a"), ("u2", "b")]."""
    return [tuple(p.split(":")) for p in text.split()]


def test_popularity_counts_every_applied_event():
    pop = MostPopular()
    pop.apply(pairs("a:x b:x b:y c:z c:y d:x"))
    # counts: x 3, y 2, z 1
    assert pop.top("nobody", 10) == ["x", "y", "z"]  # a cold user: every item; fewer than k known
    assert pop.history("nobody") is None and pop.history("b") == ["x", "y"]
    assert pop.top("a", 2) == ["y", "z"]  # a's x left out
    assert pop.top("b", 2) == ["z"]
    # A second chunk: w 2, x 3, y 2, z 1 + 1 = 2 → x, then y / z / w tied at 2, in order of first
    # appearance (y before z before w).
    pop.apply(pairs("e:w f:w g:z"))
    assert pop.top("nobody", 4) == ["x", "y", "z", "w"]
    assert pop.top("e", 10) == ["x", "y", "z"]


def test_recent_popularity_counts_the_window_only():
    recent = RecentPopular(window=3)
    recent.apply(pairs("u1:a u2:a u3:a u1:b u2:c u3:b"))
    # The last 3 events: b c b → b 2, c 1; a has none in the window (all-time 3): after them.
    assert recent.top("new", 3) == ["b", "c", "a"]
    assert recent.top("u1", 3) == ["c"]  # u1 has a and b
    # One more chunk: the window is now c b d → b 1, c 1, d 1, tied; all-time b 2, c 1, d 1: b first,
    # then c and d by first appearance; a (0 in the window) last.
    recent.apply(pairs("u4:d"))
    assert recent.top("new", 4) == ["b", "c", "d", "a"]
    with pytest.raises(ValueError):
        RecentPopular(window=0)


def test_recent_popularity_ties_go_to_all_time_popularity():
    recent = RecentPopular(window=2)
    recent.apply(pairs("u1:a u2:b u3:b u4:a u5:c"))
    # window: a c → 1 each; all-time a 2, c 1 → a, c; then b (0 in the window, all-time 2)
    assert recent.top("new", 3) == ["a", "c", "b"]
    assert recent.top("u1", 2) == ["c", "b"]


def named(rules: SequentialRules, table: dict[int, float]) -> dict[str, float]:
    return {rules.ids[i]: pytest.approx(v) for i, v in table.items()}


def test_sequential_rules_counts_one_over_distance_and_scores_one_over_recency():
    rules = SequentialRules()
    rules.apply(pairs("u:a u:b u:c u:d v:b v:d"))
    # u's b: a→b +1. u's c: b→c +1, a→c +1/2. u's d: c→d +1, b→d +1/2, a→d +1/3. v's d: b→d +1.
    follows = {(rules.ids[j], rules.ids[t]): c for j, row in rules.follows.items() for t, c in row.items()}
    assert follows == {("a", "b"): 1.0, ("a", "c"): 0.5, ("a", "d"): pytest.approx(1 / 3),
                       ("b", "c"): 1.0, ("b", "d"): 1.5, ("c", "d"): 1.0}
    rules.apply(pairs("w:a"))  # w's first event: no rule
    # w's last items: a (weight 1) → b 1, c 1/2, d 1/3.
    assert named(rules, rules.scores(rules.histories["w"])) == {"b": 1.0, "c": 0.5, "d": pytest.approx(1 / 3)}
    assert rules.top("w", 3) == ["b", "c", "d"]
    # v's last items: d (weight 1, no rule out of d), b (weight 1/2): c 1/2, d 1.5/2. d and b are v's
    # own: c, then the items without a rule by popularity (a: 2 events).
    assert named(rules, rules.scores(rules.histories["v"])) == {"c": 0.5, "d": 0.75}
    assert rules.top("v", 3) == ["c", "a"]
    # A cold user has no rule: the popular items (b 2, d 2, a 2, c 1; ties by first appearance).
    assert rules.top("nobody", 4) == ["a", "b", "d", "c"]


def test_sequential_rules_look_three_back_and_score_five_back():
    rules = SequentialRules()
    rules.apply(pairs("u:a u:b u:c u:d u:e"))
    # e: d→e 1, c→e 1/2, b→e 1/3; a is 4 back: no a→e.
    into_e = {rules.ids[j]: row[rules.index["e"]] for j, row in rules.follows.items() if rules.index["e"] in row}
    assert into_e == {"d": 1.0, "c": 0.5, "b": pytest.approx(1 / 3)}
    rules.apply(pairs("o:z o:y"))  # z→y 1
    rules.apply(pairs("h:z h:h1 h:h2 h:h3 h:h4"))
    # h's last 5 items: h4 h3 h2 h1 z → z at recency 5: y scores 1/5.
    assert rules.scores(rules.histories["h"])[rules.index["y"]] == pytest.approx(0.2)
    rules.apply(pairs("h:h5"))  # z is now 6 back: no longer read
    assert rules.index["y"] not in rules.scores(rules.histories["h"])


def test_sequential_rules_ties_go_to_popularity():
    rules = SequentialRules()
    rules.apply(pairs("s1:p s1:q s2:p s2:r s3:r x:p"))
    # p→q 1, p→r 1: tied for x (last item p); popularity r 2, q 1 → r before q (q appeared first).
    assert named(rules, rules.scores(rules.histories["x"])) == {"q": 1.0, "r": 1.0}
    assert rules.top("x", 2) == ["r", "q"]


def test_chunks_applied_one_by_one_equal_one_apply():
    log = pairs("u1:a u2:b u1:c u3:a u2:c u1:b u3:d u2:a u1:d u3:b")
    categories = {"a": "x", "b": "x", "c": "y", "d": None}
    whole, parts = streaming_baselines(categories, window=4), streaming_baselines(categories, window=4)
    for model in whole:
        model.apply(log)
    for model in parts:
        for start in range(0, len(log), 3):
            model.apply(log[start : start + 3])
    assert [m.name for m in whole] == ["pop", "recent-pop", "rules", "item-knn", "ease", "cat-trend"]
    for a, b in zip(whole, parts):
        for user in ("u1", "u2", "u3", "cold"):
            assert a.top(user, 10) == b.top(user, 10)
            assert a.history(user) == b.history(user)
            assert not set(a.top(user, 10)) & set(a.history(user) or [])


def test_item_neighbours_sum_cosines_of_the_users_items_in_any_order():
    knn = ItemNeighbours()
    knn.apply(pairs("u:a u:b u:c v:c v:a w:b w:d x:a"))
    # Who holds what: a {u, v, x}, b {u, w}, c {u, v}, d {w}. cos(a, c) = 2/sqrt(3·2), cos(a, b) =
    # 1/sqrt(3·2), cos(b, c) = 1/sqrt(2·2), cos(b, d) = 1/sqrt(2·1); a–d and c–d share no user.
    assert named(knn, knn.scores(knn.histories["x"])) == {"c": pytest.approx(2 / 6 ** 0.5),
                                                          "b": pytest.approx(1 / 6 ** 0.5)}
    assert knn.top("x", 3) == ["c", "b", "d"]  # then the popular items
    # w holds b and d: c 1/2 and a 0.408 through b; through d nothing new. Order does not matter:
    # v took c before a, u a before c, and both count alike in cos(a, c).
    assert knn.top("w", 2) == ["c", "a"]
    assert knn.top("nobody", 4) == ["a", "b", "c", "d"]  # cold: popularity (a 3, b 2, c 2, d 1)
    knn.apply(pairs("x:d"))  # recounted: d {w, x}, so cos(a, d) = 1/sqrt(3·2), cos(b, d) = 1/2
    scores = named(knn, knn.scores(knn.histories["w"]))  # w's own b and d score too; top leaves them out
    assert (scores["a"], scores["c"]) == (pytest.approx(2 / 6 ** 0.5), pytest.approx(0.5))
    assert knn.top("w", 2) == ["a", "c"]


def test_item_neighbours_count_fifty_items_a_user_and_read_twenty():
    knn = ItemNeighbours()
    knn.apply(pairs("u:a " + " ".join(f"u:b{n}" for n in range(50)) + " v:a v:c"))
    # u's newest 50 are b0..b49: u's a is not counted, so a's only co-holder is v, with c.
    assert named(knn, knn.scores([knn.index["a"]])) == {"c": pytest.approx(1.0)}
    knn.apply(pairs("o:h0 o:y " + " ".join(f"h:h{n}" for n in range(20))))
    # h's last 20 items hold h0, which o shares with y: cos(h0, y) = 1/sqrt(2·1).
    assert named(knn, knn.scores(knn.histories["h"]))[("y")] == pytest.approx(2 ** -0.5)
    knn.apply(pairs("h:h20"))  # h0 is now 21 back: no longer read
    assert "y" not in named(knn, knn.scores(knn.histories["h"]))


def test_neighbours_are_the_cosines_of_who_holds_what_nearest_first():
    near = neighbours([["a", "b", "a"], ["a", "c"], ["b"], ["d"]], keep=1)
    # a {0, 1}, b {0, 2}, c {1}, d {3}: cos(a, b) = 1/2 (a twice in one list counts once), cos(a, c) =
    # 1/sqrt(2), cos(b, c) = 0; d shares no user. keep=1: each item's nearest, ties by id.
    assert near == {"a": {"c": pytest.approx(2 ** -0.5)}, "b": {"a": pytest.approx(0.5)},
                    "c": {"a": pytest.approx(2 ** -0.5)}}
    assert neighbours([], keep=5) == {} and neighbours([["a"]], keep=5) == {}


def test_cooccurrence_counted_along_the_stream_equals_the_gram_matrix():
    lists = [["a", "b", "c"], ["a", "c"], ["b", "d"]]
    whole = Cooccurrence.count(lists, window=2)
    running = Cooccurrence(window=2)
    for user in lists:  # one event at a time, each paired with the items before it
        for end in range(1, len(user) + 1):
            running.add([user[:end]], [1])
    at_once = Cooccurrence(window=2)  # or every user's events in one call
    at_once.add(lists, [len(user) for user in lists])
    at_once.merge()
    running.merge()
    # users × items X = [[1,1,1,0],[1,0,1,0],[0,1,0,1]] (a, b, c, d): XᵀX by hand.
    expected = [[2, 1, 2, 0], [1, 2, 1, 1], [2, 1, 2, 0], [0, 1, 0, 1]]
    assert (whole.names, whole.matrix.toarray().tolist()) == (["a", "b", "c", "d"], expected)
    assert (running.names, running.matrix.toarray().tolist()) == (["a", "b", "c", "d"], expected)
    assert (at_once.names, at_once.matrix.toarray().tolist()) == (["a", "b", "c", "d"], expected)
    # A repeat pairs with the other items once, never with itself: a user holds an item or not.
    again = Cooccurrence(window=2)
    again.add([["a", "b", "a"]], [3])
    again.merge()
    assert again.matrix.toarray().tolist() == [[2, 2], [2, 1]]
    # An event pairs with the ``window`` items before it only: with 1, c meets b, not a.
    short = Cooccurrence(window=1)
    short.add([["a", "b", "c"], ["x"]], [3, 0])
    short.merge()
    assert short.matrix.toarray().tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]


def test_cooccurrence_keeps_the_most_counted_items_only(monkeypatch):
    monkeypatch.setattr(model.ease, "PAIR_ITEMS", 2)
    pairs = Cooccurrence(window=3)
    pairs.add([["a", "b", "c", "b"], ["c", "d"]], [4, 2])
    pairs.merge()  # counts: a 1, b 2, c 2, d 1: b and c stay, in order of first sight, with their pairs
    assert (pairs.names, pairs.matrix.toarray().tolist()) == (["b", "c"], [[2, 2], [2, 2]])
    pairs.add([["b", "a"]], [2])  # a comes back, counted afresh, and goes again (b 3, c 2, a 1)
    pairs.merge()
    assert (pairs.names, pairs.matrix.toarray().tolist()) == (["b", "c"], [[3, 2], [2, 2]])
    assert pairs.code == {"b": 0, "c": 1}


def test_ease_weights_solve_the_regularised_least_squares_by_hand():
    # Two items always taken together by n users: G = [[n, n], [n, n]]. P = (G + λI)⁻¹ and
    # B[a, b] = −P[a, b] / P[b, b] = n / (n + λ): holding a says b, shrunk by λ.
    pairs = Cooccurrence.count([["a", "b"]] * 4, window=1)
    assert pairs.weights(keep=5) == {"a": {"b": pytest.approx(EASE_SCALE * 4 / (4 + EASE_L2))},
                                     "b": {"a": pytest.approx(EASE_SCALE * 4 / (4 + EASE_L2))}}
    # c with a only, d alone: d gets nothing (B = 0 is not kept), and a's weight on c is below its weight
    # on b (c co-occurs with a once, b four times).
    pairs = Cooccurrence.count([["a", "b"]] * 4 + [["a", "c"], ["d"]], window=1)
    weights = pairs.weights(keep=5)
    assert "d" not in weights and list(weights["a"]) == ["b", "c"] and weights["a"]["b"] > weights["a"]["c"] > 0
    assert Cooccurrence(window=1).weights(keep=5) == {} and Cooccurrence.count([["a"]], window=1).weights(keep=5) == {}


def test_ease_baseline_scores_the_weights_of_the_users_last_items():
    ease = Ease()
    ease.apply(pairs(" ".join(f"u{n}:a u{n}:b" for n in range(4)) + " x:a y:c"))
    # G over (a, b, c) = [[5, 4, 0], [4, 4, 0], [0, 0, 1]]: B[a, b] = 4 / (5 + λ) (the 2 × 2 block's
    # inverse), a's one positive weight. x holds a: b, then the popular items (c, y's).
    assert ease.scores(ease.histories["x"]) == {ease.index["b"]: pytest.approx(EASE_SCALE * 4 / (5 + EASE_L2))}
    assert ease.top("x", 2) == ["b", "c"]
    assert ease.top("y", 2) == ["a", "b"]  # c has no positive weight: the popular items


def test_category_trend_ranks_the_users_categories_by_their_decayed_events():
    trend = CategoryTrend({"a": "x", "b": "x", "c": "x", "d": "y", "e": "y", "f": None})
    trend.trend.decay = 2.0  # half-life one event, to count by hand
    trend.apply(pairs("u:a v:b v:b w:d u:c w:e v:f"))
    # Weights after the last event (each event halves every earlier one): a 1/64, b 1/16 + 1/32 = 3/32,
    # d 1/8, c 1/4, e 1/2, f (no category) not counted. Shares: x = a + b + c = 23/64 → c 16/23,
    # b 6/23, a 1/23; y = d + e = 5/8 → e 4/5, d 1/5.
    shares = trend.trend.shares()
    assert shares == {"a": ("x", pytest.approx(1 / 23)), "b": ("x", pytest.approx(6 / 23)),
                      "c": ("x", pytest.approx(16 / 23)), "d": ("y", pytest.approx(1 / 5)),
                      "e": ("y", pytest.approx(4 / 5))}
    # v holds b (x) and f (none): mix x 1 → c 16/23, a 1/23; then the popular items (b's left out).
    assert trend.top("v", 3) == ["c", "a", "d"]
    # w holds d and e, both y: y's items all seen → popularity: b 2, then a, c (first seen order).
    assert trend.top("w", 2) == ["b", "a"]
    # u holds a and c (x): b 6/23; y is not u's.
    assert trend.top("u", 1) == ["b"]
