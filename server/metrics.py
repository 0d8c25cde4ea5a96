"""Prometheus metrics of one app instance (its own registry, so apps in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
FRACTION_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.125, 0.2, 0.3, 0.5, 0.75, 0.9, 1.0, 1.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "ann_mlp_request_seconds", "Request latency", ["route", "mode"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.in_flight = Gauge("ann_mlp_requests_in_flight", "Requests being served", registry=r)
        self.requests = Counter(
            "ann_mlp_requests", "Requests by route and status code", ["route", "status"], registry=r
        )
        self.scanned_fraction = Histogram(
            "ann_mlp_keys_scanned_fraction",
            "Keys scored per token / d_ff, per approximate request",
            ["model"],
            buckets=FRACTION_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "ann_mlp_batch_rows",
            "Inputs per forward pass (kind pass) and rows per decode step (kind decode): how much work requests share",
            ["model", "kind"],
            buckets=ROWS_BUCKETS,
            registry=r,
        )
        self.live_recall = Gauge(
            "ann_mlp_live_recall_at_k", "Mean recall@k over shadow-sampled requests", ["model"], registry=r
        )
        self.live_output_error = Gauge(
            "ann_mlp_live_rel_output_error",
            "Mean relative MLP output error over shadow-sampled requests",
            ["model"],
            registry=r,
        )
        self.shadow_samples = Counter(
            "ann_mlp_shadow_samples", "Requests re-run exactly for live recall", ["model"], registry=r
        )
        self.jobs = Gauge("ann_mlp_jobs", "Requests queued or running on the engine's worker", registry=r)
        self.jobs_submitted = Counter("ann_mlp_jobs_submitted", "Requests handed to the engine's queue", registry=r)
        self.abandoned = Counter(
            "ann_mlp_requests_abandoned",
            "Requests whose work was stopped: the caller left, the deadline or a drain ended",
            ["reason"],
            registry=r,
        )
        self.shadow_dropped = Counter(
            "ann_mlp_shadow_dropped", "Shadow samples skipped because requests waited", ["model"], registry=r
        )
