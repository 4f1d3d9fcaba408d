"""Prometheus metrics of the ingest worker, in a registry of their own.

Each ``Metrics`` owns a ``CollectorRegistry`` (not prometheus-client's global default), so several
apps or tests in one process do not collide. The worker serves ``render()`` at ``GET /metrics``;
``totals()`` sums them for ``GET /health``.

    hymirec_events_in_total{topic}                 payloads consumed (good and bad)
    hymirec_events_applied_total                   interactions appended to a user's history
    hymirec_duplicates_skipped_total{kind}         offset (a user's redelivered event) | event_id (resent by
                                                   producer) | position (at or below the shard's applied position)
    hymirec_offset_gaps_total                      batches whose partition started past its applied position + 1
    hymirec_partition_applied_offset{partition}    the interactions partition's applied position (LanceDB)
    hymirec_partition_end_offset{partition}        its end offset (high-water mark) as the consumer last saw it
    hymirec_partition_lag{partition}               events between the two: consumed-but-unapplied or not read yet
    hymirec_dead_lettered_total{topic,reason}      payloads put on the dead-letter topic
    hymirec_unknown_items_total                    interactions with an item not (yet) in the catalogue
    hymirec_items_upserted_total                   new or changed catalogue items written
    hymirec_store_retries_total{topic}             failed LanceDB/dead-letter writes, retried
    hymirec_batch_latency_seconds{topic}           one micro-batch: validate, read, write, dead-letter
    hymirec_freshness_lag_seconds                  per applied event: row written − Kafka message timestamp
    hymirec_known_items                            item ids in the worker's cache
    hymirec_model_info{version}                    the codebook version the worker encodes with ("none")
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes
# Freshness target is p95 ≤ 2 s (DESIGN §7): resolve well below and above it.
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.events_in = Counter("hymirec_events_in", "Payloads consumed.", ["topic"], registry=r)
        self.applied = Counter("hymirec_events_applied", "Interactions appended to histories.", registry=r)
        self.duplicates = Counter(
            "hymirec_duplicates_skipped", "Interactions skipped as already applied.", ["kind"], registry=r
        )
        self.dead_lettered = Counter(
            "hymirec_dead_lettered", "Payloads sent to the dead-letter topic.", ["topic", "reason"], registry=r
        )
        self.unknown_items = Counter(
            "hymirec_unknown_items", "Interactions whose item is not in the catalogue yet.", registry=r
        )
        self.items_upserted = Counter("hymirec_items_upserted", "New or changed items written.", registry=r)
        self.retries = Counter("hymirec_store_retries", "Failed batch writes, retried.", ["topic"], registry=r)
        self.batch_latency = Histogram(
            "hymirec_batch_latency_seconds", "Time to apply one micro-batch.", ["topic"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.freshness_lag = BatchHistogram(
            "hymirec_freshness_lag_seconds", "Kafka message timestamp to history row written.", LAG_BUCKETS, r,
        )
        self.offset_gaps = Counter(
            "hymirec_offset_gaps", "Batches whose partition skipped past its applied position.", registry=r
        )
        self.applied_offset = Gauge("hymirec_partition_applied_offset", "Applied position per interactions partition.",
                                    ["partition"], registry=r)
        self.end_offset = Gauge("hymirec_partition_end_offset", "End offset per interactions partition.",
                                ["partition"], registry=r)
        self.lag = Gauge("hymirec_partition_lag", "Events not yet applied per interactions partition.",
                         ["partition"], registry=r)
        self.known_items = Gauge("hymirec_known_items", "Item ids in the worker's cache.", registry=r)
        self.model = Info("hymirec_model", "Codebook/model version used to encode histories.", registry=r)
        self.model.info({"version": "none"})

    def set_partition(self, partition: int, row: dict[str, int | None]) -> None:
        label = str(partition)
        self.applied_offset.labels(label).set(-1 if row["applied"] is None else row["applied"])
        self.end_offset.labels(label).set(row["end"])
        self.lag.labels(label).set(row["lag"])

    def totals(self) -> dict[str, int]:
        """Every counter summed over its labels, by name without the ``hymirec_`` prefix."""
        return {
            family.name.removeprefix("hymirec_"): int(sum(s.value for s in family.samples if s.name.endswith("_total")))
            for family in self.registry.collect()
            if family.type == "counter"
        }

    def render(self) -> bytes:
        """The registry in Prometheus text exposition format."""
        return generate_latest(self.registry)


class BatchHistogram(Collector):
    """A histogram without labels that is filled a batch of values at a time.

    ``prometheus_client.Histogram.observe`` takes a lock and walks the buckets per value: 0.8–1 µs,
    a few percent of the worker's whole ingest path when it is called once per applied event.
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry):
        self.name, self.documentation = name, documentation
        self.bounds = np.asarray(sorted(buckets), dtype=np.float64)  # upper bounds; +Inf is implied
        self._counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)  # per bucket, not cumulative
        self._sum = 0.0
        self._lock = threading.Lock()  # /metrics is rendered on the event loop, the batches come from anywhere
        registry.register(self)

    def observe_many(self, values: Sequence[float] | np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        # Prometheus buckets hold values <= their bound: the first bound >= the value.
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=len(self._counts))
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            cumulative, total = np.cumsum(self._counts).tolist(), self._sum
        buckets = [(floatToGoString(bound), count) for bound, count in zip(self.bounds.tolist(), cumulative)]
        yield HistogramMetricFamily(self.name, self.documentation, buckets=[*buckets, ("+Inf", cumulative[-1])],
                                    sum_value=total)
