"""The serving side's Prometheus series (model version, switches, interests, top-k latency)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info


class ServingMetrics:
    """The serving side's Prometheus series, registered in the worker's registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = registry or CollectorRegistry()
        self.version = Info("hymirec_serving", "Model version whose interests new answers use.", registry=r)
        self.version.info({"version": "none"})
        self.switches = Counter("hymirec_model_switches", "Model version switches by outcome.", ["outcome"], registry=r)
        self.switch_seconds = Histogram("hymirec_model_switch_seconds", "Load, re-embed, commit and rewrite interests.",
                                        buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800), registry=r)
        self.items_encoded = Counter("hymirec_items_encoded", "Item vectors written (new, changed, or re-embedded).", registry=r)
        self.interests = Counter("hymirec_interests_computed", "User interest rows written.", registry=r)
        self.interest_lag = Histogram(
            "hymirec_interest_lag_seconds", "History row written → that user's interests written.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 120), registry=r)
        self.topk_seconds = Histogram("hymirec_topk_seconds", "GET /recommend latency.",
                                      buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1), registry=r)
        self.trainer_score = Gauge("hymirec_trainer_score", "Prequential scores the trainer published a version with.",
                                   ["version", "model", "metric"], registry=r)

    def record_scores(self, version: str, metrics: dict) -> None:
        """``metrics`` as the trainer sends it: {"live": {...}, "candidate": {...}, ...}."""
        for model in ("live", "candidate"):
            for name, value in (metrics.get(model) or {}).items():
                if isinstance(value, (int, float)):
                    self.trainer_score.labels(version, model, name).set(value)


