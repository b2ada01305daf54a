"""vLLM-named Prometheus metrics of one simulated replica (one CollectorRegistry per replica).

Gauges are computed at scrape time from the engine (no per-step updates); counters and histograms are
updated when requests finish. Latencies are wall-clock seconds as a client sees them (so at
--time-scale 10 a modelled 1 s TTFT reports 0.1 s), matching what a gateway measures.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ingate.sim.engine import Engine, SimRequest

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip


class _FastHistogram:
    """A lock-free histogram for the per-token inter-token latency (tens of thousands of observations
    per second in one process): prometheus_client's Histogram takes a lock per observation."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1
        self.sum += v


class _EngineGauges(Collector):
    def __init__(self, engine: Engine, labels: dict[str, str], max_loras: int) -> None:
        self.itl: _FastHistogram | None = None
        self.engine = engine
        self.labels = labels
        self.max_loras = max_loras

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=list(self.labels))
        g.add_metric(list(self.labels.values()), value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=list(self.labels))
        c.add_metric(list(self.labels.values()), value)
        return c

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        e = self.engine
        if self.itl is not None:
            h = HistogramMetricFamily(
                "vllm:inter_token_latency_seconds", "Inter-token latency.", labels=list(self.labels)
            )
            cum, buckets = 0, []
            for bound, c in zip((*self.itl.bounds, float("inf")), self.itl.counts, strict=True):
                cum += c
                buckets.append(("+Inf" if bound == float("inf") else str(bound), cum))
            h.add_metric(list(self.labels.values()), buckets, self.itl.sum)
            yield h
        yield self._counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the cache.", e.kv.queries
        )
        yield self._counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", e.kv.hits)
        yield self._counter("vllm:num_preemptions", "Cumulative number of preemptions.", e.preemptions)
        # The simulator's own health: how far engine steps ended later than modelled (CPU overload).
        yield self._counter("ingate_sim_steps", "Engine steps run.", e.steps)
        yield self._counter("ingate_sim_step_lag_seconds", "Total lateness of engine steps.", e.lag_s)
        yield self._counter(
            "ingate_sim_busy_seconds", "Modelled busy time of the engine (wall clock).", e.busy_s
        )
        yield self._gauge("vllm:num_requests_running", "Requests in the running batch.", len(e.running))
        yield self._gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", len(e.waiting))
        usage = e.kv.usage
        yield self._gauge("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", usage)
        yield self._gauge("vllm:gpu_cache_usage_perc", "KV-cache usage (pre-V1 name).", usage)
        p = e.profile
        cfg = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the cache configuration.",
            labels=["block_size", "num_gpu_blocks", "enable_prefix_caching", "cache_dtype"],
        )
        cfg.add_metric([str(p.block_size), str(e.kv.num_blocks), "True", "auto"], 1.0)
        yield cfg
        if self.max_loras > 0:
            info = GaugeMetricFamily(
                "vllm:lora_requests_info",
                "Running stats on LoRA requests.",
                labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
            )
            waiting = sorted({r.adapter for r in e.waiting if r.adapter is not None})
            info.add_metric(
                [",".join(sorted(e.lora.running_adapters())), ",".join(waiting), str(self.max_loras)],
                time.time(),
            )
            yield info


class SimMetrics:
    """The replica's registry and the metric objects the server and engine update."""

    def __init__(self, engine: Engine, model_name: str, max_loras: int) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name, "engine": "0"}
        self._labels = list(labels.values())
        self._gauges = _EngineGauges(engine, labels, max_loras)
        self.registry.register(self._gauges)
        names = list(labels)
        r = self.registry

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, [*names, *extra], registry=r)

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, names, buckets=buckets, registry=r)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens.")
        self.success = counter("vllm:request_success", "Finished requests.", ("finished_reason",))
        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY_BUCKETS)
        self.queue = hist("vllm:request_queue_time_seconds", "Time spent waiting.", _LATENCY_BUCKETS)
        # Bind label values once: the hot path calls plain .inc()/.observe().
        lv = self._labels
        self._pt, self._gt = self.prompt_tokens.labels(*lv), self.generation_tokens.labels(*lv)
        self._ok = self.success.labels(*lv, "length")
        self._ttft, self._e2e, self._queue = (
            self.ttft.labels(*lv),
            self.e2e.labels(*lv),
            self.queue.labels(*lv),
        )
        self.itl = _FastHistogram(_ITL_BUCKETS)
        engine.itl_observer = self.itl.observe
        self._gauges.itl = self.itl

    def on_finish(self, req: SimRequest) -> None:
        """Record a finished request (called by the engine)."""
        self._pt.inc(req.prompt_len)
        self._gt.inc(req.generated)
        self._ok.inc()
        if req.first_token_at is not None:
            self._ttft.observe(req.first_token_at - req.arrival)
        if req.finished_at is not None:
            self._e2e.observe(req.finished_at - req.arrival)
        if req.scheduled_at is not None:
            self._queue.observe(req.scheduled_at - req.arrival)
