"""Prometheus metrics of flow control (upstream names where they exist)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class FlowControlMetrics:
    """Queue sizes, wait times, rejections and served tokens per band/flow."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = REGISTRY if registry is None else registry
        self.queue_size = Gauge(
            "inference_extension_flow_control_queue_size",
            "Requests queued in flow control",
            ["fairness_id", "priority"],
            registry=r,
        )
        self.queue_bytes = Gauge(
            "inference_extension_flow_control_queue_bytes",
            "Request bytes queued in flow control",
            ["fairness_id", "priority"],
            registry=r,
        )
        self.wait = Histogram(
            "inference_extension_flow_control_request_queue_duration_seconds",
            "Time requests spent in flow control, by outcome",
            ["fairness_id", "priority", "outcome"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "ingate_flow_control_rejected_total",
            "Requests rejected by flow control (shed, queue_full, expired, cancelled)",
            ["priority", "reason"],
            registry=r,
        )
        self.preemptive = Counter(
            "ingate_flow_control_preemptive_dispatch_total",
            "Requests dispatched past saturation to preempt lower-priority work (flowControl.preemption)",
            ["priority"],
            registry=r,
        )
        self.served_tokens = Counter(
            "ingate_flow_control_served_tokens_total",
            "Tokens served per flow (prompt + completion), the basis of fairness shares",
            ["fairness_id", "priority"],
            registry=r,
        )
