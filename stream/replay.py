"""Replay an interaction log to Kafka: the catalogue first, then the interactions in file order.

    summary = replay(settings, "data/ml-100k/interactions.jsonl",
                     items_path="data/ml-100k/items.jsonl", rate=1000)
    print(summary)   # replay: 100,000 interactions, 1,682 items sent, 0 skipped, 0 failed in ...

Items go to ``settings.topic_items`` keyed by item_id, interactions to
``settings.topic_interactions`` keyed by user_id, as the contract's JSON. A user's events keep
their order: one key, one partition, and the producer is idempotent (kafka-python's default, with
up to 5 requests in flight per connection and sequence numbers), so a retried batch cannot
overtake the one after it.

The whole log (or its first ``limit`` rows) is read and validated before the first message goes
out, so a bad row never leaves a half-replayed topic.

Pacing (interactions only; the catalogue goes as fast as possible):
  * ``rate=N``: at most N events/s on average (a token bucket with a 50 ms burst);
  * ``speedup=X``: the log's own gaps between consecutive events divided by X, each scaled gap
    capped at ``MAX_GAP_S`` so a quiet night in the log does not stall the replay;
  * neither: as fast as the producer goes.
Ctrl-C stops sending between two messages, delivers what was already sent and returns the
summary so far (``interrupted``); a second Ctrl-C stops waiting for the broker's acknowledgements.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pandas as pd
from tqdm import tqdm

from hymirec.errors import HymirecError
from hymirec.settings import Settings, kafka_client_options
from store.events import Interaction, Item, to_json_bytes
from store.logs import read_interactions, read_items
from stream.kafka_errors import connection_problem

MAX_GAP_S = 2.0  # --speedup: longest wait between two events, after scaling
BURST_S = 0.05  # --rate: the token bucket holds this many seconds' worth of events


# --- pacing -----------------------------------------------------------------------------------------
class TokenBucket:
    """At most ``rate`` takes per second on average; bursts of ``rate * burst_s`` (at least 1)."""

    def __init__(self, rate: float, burst_s: float = BURST_S, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate = rate
        self.capacity = max(1.0, rate * burst_s)
        self.tokens = self.capacity
        self.clock, self.sleep = clock, sleep
        self.last = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now

    def take(self, ts_ms: int | None = None) -> None:
        self._refill()
        if self.tokens < 1:
            self.sleep((1 - self.tokens) / self.rate)
            self._refill()
        self.tokens -= 1


class LogClock:
    """Sends each event when its scaled log time comes: gaps / ``speedup``, each at most ``max_gap_s``.

    The schedule is absolute (start + sum of scaled gaps), so sleep overshoot does not accumulate;
    waits under a millisecond are skipped and made up by the schedule.
    """

    def __init__(self, speedup: float, max_gap_s: float = MAX_GAP_S, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.speedup, self.max_gap_s = speedup, max_gap_s
        self.clock, self.sleep = clock, sleep
        self.due: float | None = None
        self.prev_ts: int | None = None

    def take(self, ts_ms: int) -> None:
        if self.due is None:
            self.due = self.clock()
        else:
            gap_s = max(0, ts_ms - self.prev_ts) / 1000 / self.speedup  # an out-of-order ts: no wait
            self.due += min(gap_s, self.max_gap_s)
        self.prev_ts = ts_ms
        delay = self.due - self.clock()
        if delay > 1e-3:
            self.sleep(delay)


# --- sending ----------------------------------------------------------------------------------------
@dataclass
class ReplaySummary:
    interactions: int  # handed to the producer (``failed`` counts those not delivered)
    items: int
    skipped: int  # read and validated but not sent (Ctrl-C, or sending stopped on an error)
    failed: int  # not delivered: the broker refused them or they timed out
    elapsed_s: float  # the whole replay, catalogue included
    rate: float  # interactions per second over the interaction phase (its final flush included)
    interrupted: bool = False

    def __str__(self) -> str:
        head = "replay interrupted" if self.interrupted else "replay"
        return (f"{head}: {self.interactions:,} interactions, {self.items:,} items sent, {self.skipped:,} skipped, "
                f"{self.failed:,} failed in {self.elapsed_s:.1f} s ({self.rate:,.0f} events/s)")


class _Deliveries:
    """Counts failed deliveries (callbacks run on the producer's I/O thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.failed = 0
        self.first_error: str | None = None

    def on_error(self, exc: BaseException) -> None:
        with self.lock:
            self.failed += 1
            if self.first_error is None:
                self.first_error = f"{type(exc).__name__}: {exc}"


def _producer(settings: Settings, connect_timeout_s: float):
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    try:
        # api_version unset: the client asks the broker. enable_idempotence/acks='all' are
        # kafka-python's defaults, named to keep per-key order a stated requirement.
        return KafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap.split(","),
            client_id="hymirec-replay",
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
            batch_size=256 * 1024,
            bootstrap_timeout_ms=int(connect_timeout_s * 1000),
            max_block_ms=int(max(connect_timeout_s, 30.0) * 1000),
            **kafka_client_options(settings),
        )
    except (KafkaError, OSError):
        raise HymirecError(connection_problem(settings)) from None


def _require_topics(producer, settings: Settings, topics: list[str]) -> None:
    from kafka.errors import KafkaError

    for topic in topics:
        try:
            partitions = producer.partitions_for(topic)
        except KafkaError as exc:
            partitions, why = None, type(exc).__name__
        except ValueError as exc:  # an illegal name, refused by the client itself
            partitions, why = None, str(exc)
        else:
            why = "no partitions"
        if not partitions:
            raise HymirecError(f"topic {topic!r} is not available on {settings.kafka_bootstrap} ({why}); "
                               f"create the topics with `hymirec kafka topics`")


def _interaction_messages(frame: pd.DataFrame) -> Iterator[tuple[bytes, bytes, int]]:
    for user_id, item_id, ts, action, event_id in zip(frame.user_id.tolist(), frame.item_id.tolist(),
                                                      frame.ts.tolist(), frame.action.tolist(), frame.event_id.tolist()):
        # Validated by read_interactions already: construct without validating again.
        event = Interaction.model_construct(user_id=user_id, item_id=item_id, ts=ts, action=action, event_id=event_id)
        yield user_id.encode(), to_json_bytes(event), ts


def _item_messages(frame: pd.DataFrame) -> Iterator[tuple[bytes, bytes, int | None]]:
    ts_values = [None if pd.isna(t) else int(t) for t in frame.ts.tolist()]
    for item_id, text, category, ts in zip(frame.item_id.tolist(), frame.text.tolist(), frame.category.tolist(), ts_values):
        event = Item.model_construct(item_id=item_id, text=text, category=category, ts=ts)
        yield item_id.encode(), to_json_bytes(event), ts


class _Interrupt:
    """The first Ctrl-C asks the send loop to stop between two messages (none is half-sent, and what
    was sent is still flushed); a second one raises KeyboardInterrupt as usual."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="ev", unit_scale=True, leave=False,
                disable=not (progress and sys.stderr.isatty()))


def replay(settings: Settings, path: str | os.PathLike, *, items_path: str | os.PathLike | None = None,
           rate: float | None = None, speedup: float | None = None, limit: int | None = None,
           progress: bool = True, connect_timeout_s: float = 10.0) -> ReplaySummary:
    """Produce ``items_path`` (if given), then the interaction log at ``path``; see the module doc.

    Raises HymirecError for a bad file, an unreachable broker (after ``connect_timeout_s``), a
    missing topic, or when any message was not delivered (the message then carries the summary).
    """
    from kafka.errors import KafkaError

    if rate is not None and speedup is not None:
        raise HymirecError("choose one of rate and speedup")
    items = read_items(items_path) if items_path is not None else None
    frame = read_interactions(path, limit=limit)
    pacer = TokenBucket(rate) if rate else LogClock(speedup) if speedup else None

    started = time.perf_counter()
    producer = _producer(settings, connect_timeout_s)
    deliveries = _Deliveries()
    sent = {"items": 0, "interactions": 0}
    stop_error: str | None = None
    phase_start = started

    def send_all(name: str, topic: str, messages: Iterator[tuple[bytes, bytes, int | None]], total: int,
                 pace: TokenBucket | LogClock | None) -> None:
        with _bar(total, name, progress) as bar:
            for key, value, ts in messages:
                if interrupt.requested:
                    return
                if pace is not None:
                    pace.take(ts)
                producer.send(topic, key=key, value=value).add_errback(deliveries.on_error)
                sent[name] += 1
                bar.update()

    with _Interrupt() as interrupt:
        try:
            _require_topics(producer, settings, ([settings.topic_items] if items is not None else [])
                            + [settings.topic_interactions])
            if items is not None:
                send_all("items", settings.topic_items, _item_messages(items), len(items), None)
                producer.flush()  # the catalogue is in before the first interaction refers to it
            phase_start = time.perf_counter()
            send_all("interactions", settings.topic_interactions, _interaction_messages(frame), len(frame), pacer)
        except KafkaError as exc:  # send() itself failed: buffer full for max_block_ms, metadata gone
            stop_error = f"{type(exc).__name__}: {exc}"
        except KeyboardInterrupt:  # a second Ctrl-C
            pass
        finally:
            try:
                producer.flush()
            except KeyboardInterrupt:  # a second Ctrl-C: stop waiting for acknowledgements
                pass
            finally:
                producer.close(timeout=5)
    now = time.perf_counter()
    summary = ReplaySummary(
        interactions=sent["interactions"], items=sent["items"],
        skipped=len(frame) - sent["interactions"] + (len(items) - sent["items"] if items is not None else 0),
        failed=deliveries.failed, elapsed_s=now - started,
        rate=sent["interactions"] / max(now - phase_start, 1e-9), interrupted=interrupt.requested,
    )
    if stop_error is not None:
        raise HymirecError(f"{summary}; sending stopped: {stop_error}")
    if deliveries.failed:
        raise HymirecError(f"{summary}; {deliveries.failed:,} messages not delivered (first: {deliveries.first_error})")
    return summary
