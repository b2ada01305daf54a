"""Prometheus metrics of the async processor (``ingate_async_*``), on their own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class AsyncMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.backlog = Gauge(
            "ingate_async_backlog", "Messages queued or in flight in the backend", registry=r
        )
        self.in_flight = Gauge(
            "ingate_async_in_flight", "Requests this processor has at the gateway", registry=r
        )
        self.window = Gauge("ingate_async_window", "Concurrency window size (AIMD)", registry=r)
        self.headroom = Gauge(
            "ingate_async_headroom",
            "Free capacity for our band at the last signal reading (-1 = none)",
            registry=r,
        )
        self.completed = Counter(
            "ingate_async_completed", "Results written, by outcome", ["outcome"], registry=r
        )
        self.retried = Counter(
            "ingate_async_retried", "Messages put back for another attempt", ["reason"], registry=r
        )
        self.shed = Counter(
            "ingate_async_shed", "Requests the gateway shed (429/503)", ["status"], registry=r
        )
        self.dead_lettered = Counter(
            "ingate_async_dead_lettered", "Messages moved to the dead letters", registry=r
        )
        self.deadline_expired = Counter(
            "ingate_async_deadline_expired", "Messages answered DEADLINE_EXCEEDED", registry=r
        )
        self.invalid = Counter("ingate_async_invalid", "Messages answered INVALID_REQUEST", registry=r)
        self.duplicates = Counter(
            "ingate_async_duplicates", "Redelivered messages whose id already had an outcome", registry=r
        )
        self.window_decreases = Counter(
            "ingate_async_window_decreases", "Multiplicative decreases of the window", ["reason"], registry=r
        )
        self.age = Histogram(
            "ingate_async_age_seconds",
            "End-to-end age of a message when its result was written (now - created)",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400),
            registry=r,
        )
        self.request_seconds = Histogram(
            "ingate_async_request_seconds",
            "Gateway request latency of async requests, by status class",
            ["status"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
