"""The worker's batch-filled histogram renders what prometheus-client's own gives for the same values."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stream.metrics import LAG_BUCKETS, BatchHistogram, Metrics

VALUES = [0.0, 0.05, 0.0500001, 0.3, 1.0, 1.0, 2.5, 299.9, 300.0, 301.0, 1e9]


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for s in family.samples if not s.name.endswith("_created")}


def test_batches_render_as_one_value_at_a_time():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batched = BatchHistogram("lag_seconds", "help", LAG_BUCKETS, ours)
    reference = Histogram("lag_seconds", "help", buckets=LAG_BUCKETS, registry=theirs)
    batched.observe_many(VALUES[:4])
    batched.observe_many([])
    batched.observe_many(VALUES[4:])
    for value in VALUES:
        reference.observe(value)
    got, want = samples(ours), samples(theirs)
    assert got == want
    assert got[("lag_seconds_bucket", (("le", "0.05"),))] == 2  # a bound holds the values equal to it
    assert got[("lag_seconds_count", ())] == len(VALUES)


def test_the_worker_metrics_expose_the_freshness_histogram():
    metrics = Metrics()
    metrics.freshness_lag.observe_many([0.2, 0.7])
    rendered = samples(metrics.registry)
    assert rendered[("hymirec_freshness_lag_seconds_count", ())] == 2
    assert rendered[("hymirec_freshness_lag_seconds_bucket", (("le", "0.5"),))] == 1
    assert abs(rendered[("hymirec_freshness_lag_seconds_sum", ())] - 0.9) < 1e-9
