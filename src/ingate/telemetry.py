"""The gateway's own Prometheus metrics (upstream names where they exist) and structured logging."""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ingate.datastore import Datastore

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_SCHED = (1e-5, 2.5e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2)
_TOKENS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)
# Upstream's bucket bounds for the request-level llm_d_epp_* series (llm-d-router's metrics package).
_CACHED = (
    1,
    8,
    16,
    32,
    64,
    128,
    256,
    512,
    1024,
    2048,
    4096,
    8192,
    16384,
    32768,
    65536,
    131072,
    262144,
    524288,
    1048576,
)
_NTPOT = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_TPOT = (
    0.0005,
    0.00205,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.125,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.8,
    1.0,
    2.0,
)
_ITL = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0)
_REQ_BYTES = tuple(64 * 2**i for i in range(25))
_RESP_BYTES = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class _PoolCollector(Collector):
    """Per-endpoint and pool gauges computed at scrape time from the datastore (nothing per request)."""

    def __init__(self, datastore: Datastore, pool: str) -> None:
        self.ds = datastore
        self.pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        eps = self.ds.endpoints()
        q = GaugeMetricFamily(
            "ingate_endpoint_queue_size", "Waiting requests per endpoint (scraped).", labels=["endpoint"]
        )
        kv = GaugeMetricFamily(
            "ingate_endpoint_kv_cache_utilization", "KV-cache utilisation per endpoint.", labels=["endpoint"]
        )
        fl = GaugeMetricFamily(
            "ingate_endpoint_in_flight", "Requests in flight from this gateway.", labels=["endpoint"]
        )
        for ep in eps:
            q.add_metric([ep.address], ep.metrics.waiting)
            kv.add_metric([ep.address], ep.metrics.kv_usage)
            fl.add_metric([ep.address], ep.in_flight)
        yield q
        yield kv
        yield fl
        n = len(eps) or 1
        kv_s, queue_s, run_s = (
            [e.metrics.kv_usage for e in eps],
            [float(e.metrics.waiting) for e in eps],
            [float(e.metrics.running) for e in eps],
        )
        for name, doc, value in (
            (
                "inference_pool_average_running_requests",
                "Average requests running on the pool's model servers.",
                sum(run_s) / n,
            ),
            (
                "llm_d_epp_std_dev_kv_cache_utilization",
                "Std. deviation of KV-cache utilisation.",
                _pstdev(kv_s),
            ),
            (
                "llm_d_epp_std_dev_queue_size",
                "Std. deviation of the model servers' queues.",
                _pstdev(queue_s),
            ),
            ("llm_d_epp_std_dev_running_requests", "Std. deviation of running requests.", _pstdev(run_s)),
            (
                "inference_pool_average_kv_cache_utilization",
                "Average KV-cache utilisation of the pool.",
                sum(e.metrics.kv_usage for e in eps) / n,
            ),
            (
                "inference_pool_average_queue_size",
                "Average waiting queue of the pool.",
                sum(e.metrics.waiting for e in eps) / n,
            ),
            ("inference_pool_ready_pods", "Endpoints currently healthy.", sum(1 for e in eps if e.healthy)),
        ):
            g = GaugeMetricFamily(name, doc, labels=["name"])
            g.add_metric([self.pool], value)
            yield g


def _pstdev(values: list[float]) -> float:
    """Population standard deviation (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return float((sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5)


LLM_D_NAMES: dict[str, str] = {
    "inference_objective_request": "llm_d_epp_request",
    "inference_objective_request_error": "llm_d_epp_request_error",
    "inference_objective_request_duration_seconds": "llm_d_epp_request_duration_seconds",
    "ingate_time_to_first_token_seconds": "llm_d_epp_request_ttft_seconds",
    "inference_objective_input_tokens": "llm_d_epp_request_input_tokens",
    "inference_objective_output_tokens": "llm_d_epp_request_output_tokens",
    "inference_pool_average_kv_cache_utilization": "llm_d_epp_average_kv_cache_utilization",
    "inference_pool_average_queue_size": "llm_d_epp_average_queue_size",
    "inference_pool_average_running_requests": "llm_d_epp_average_running_requests",
    "inference_objective_prompt_cached_tokens": "llm_d_epp_request_cached_tokens",
    "inference_objective_normalized_time_per_output_token_seconds": "llm_d_epp_request_ntpot_seconds",
    "inference_objective_request_sizes": "llm_d_epp_request_size_bytes",
    "inference_objective_response_sizes": "llm_d_epp_response_size_bytes",
    "inference_objective_running_requests": "llm_d_epp_request_running",
    "inference_pool_ready_pods": "llm_d_epp_ready_endpoints",
    "inference_extension_scheduler_e2e_duration_seconds": "llm_d_epp_scheduler_e2e_duration_seconds",
    "inference_extension_plugin_duration_seconds": "llm_d_epp_plugin_duration_seconds",
    "inference_extension_flow_control_queue_size": "llm_d_epp_flow_control_queue_size",
    "inference_extension_flow_control_queue_bytes": "llm_d_epp_flow_control_queue_bytes",
    "inference_extension_flow_control_pool_saturation": "llm_d_epp_flow_control_pool_saturation",
    "inference_extension_flow_control_request_queue_duration_seconds": (
        "llm_d_epp_flow_control_request_queue_duration_seconds"
    ),
}
"""Metric families exported again under upstream's current `llm_d_epp_` names (llm-d-router), beside
the older `inference_*` names existing dashboards use."""


class UpstreamNames(Collector):
    """Re-exports the registry's families named in `LLM_D_NAMES` under their new names, at scrape
    time: nothing is counted twice on the request path, and both names always agree."""

    def __init__(self, registry: CollectorRegistry, names: dict[str, str] = LLM_D_NAMES) -> None:
        self.registry = registry
        self.names = names
        self._collecting = False

    def describe(self) -> list[Metric]:
        # Names are known up front: the registry must not call `collect` while registering us.
        return [Metric(new, "", "untyped") for new in self.names.values()]

    def collect(self) -> Iterator[Metric]:
        if self._collecting:  # the registry's own collect (below) reaches us again
            return
        self._collecting = True
        try:
            families = list(self.registry.collect())
        finally:
            self._collecting = False
        for fam in families:
            new = self.names.get(fam.name)
            if new is None:
                continue
            m = Metric(new, fam.documentation, fam.type, fam.unit)
            cut = len(fam.name)
            m.samples = [s._replace(name=new + s.name[cut:]) for s in fam.samples]
            yield m


SERIES_CACHE = 4096
"""Label sets whose metric children are kept per Telemetry (models x target models, endpoints)."""


@dataclass(slots=True, frozen=True)
class ModelSeries:
    """The per-request metric children of one (model, target model) pair, looked up once."""

    requests: Any
    duration: Any
    ttft: Any
    input_tokens: Any
    output_tokens: Any
    cached_tokens: BucketCounts
    ntpot: BucketCounts
    streaming_tpot: BucketCounts
    itl: BucketCounts
    request_bytes: BucketCounts
    response_bytes: BucketCounts


class Telemetry:
    """Metric objects the director updates; one registry per gateway (tests run several).

    `series` and `decision` hand out cached label children: `labels()` takes a lock and builds a key on
    every call, which is measurable on the per-request path. Children stay valid because no series is
    ever removed from these metrics.
    """

    def __init__(self, datastore: Datastore, pool: str) -> None:
        self.registry = r = CollectorRegistry()
        mt = ["model_name", "target_model_name"]
        self.requests = Counter("inference_objective_request", "Requests received.", mt, registry=r)
        self.errors = Counter(
            "inference_objective_request_error", "Requests that failed.", [*mt, "error_code"], registry=r
        )
        self.duration = Histogram(
            "inference_objective_request_duration_seconds",
            "End-to-end latency seen by the gateway.",
            mt,
            buckets=_LAT,
            registry=r,
        )
        self.ttft = Histogram(
            "ingate_time_to_first_token_seconds",
            "Time to first response byte seen by the gateway.",
            mt,
            buckets=_LAT,
            registry=r,
        )
        self.input_tokens = Histogram(
            "inference_objective_input_tokens", "Prompt tokens per request.", mt, buckets=_TOKENS, registry=r
        )
        self.output_tokens = Histogram(
            "inference_objective_output_tokens",
            "Completion tokens per request.",
            mt,
            buckets=_TOKENS,
            registry=r,
        )
        self.scheduling = Histogram(
            "inference_extension_scheduler_e2e_duration_seconds",
            "Time to schedule one request.",
            buckets=_SCHED,
            registry=r,
        )
        self.decisions = Counter(
            "ingate_scheduler_decisions",
            "Scheduling decisions per endpoint.",
            ["endpoint", "profile"],
            registry=r,
        )
        self.retries = Counter(
            "ingate_upstream_retries", "Requests re-sent to a fallback endpoint.", registry=r
        )
        # Request-level series observed once per response (ITL once per streamed chunk): lock-free
        # bucket counts, built into families at scrape time.
        self.cached_tokens = FastHistogramVec(
            "inference_objective_prompt_cached_tokens",
            "Prompt tokens the model server read from its cache, per request (from usage).",
            mt,
            _CACHED,
        )
        self.ntpot = FastHistogramVec(
            "inference_objective_normalized_time_per_output_token_seconds",
            "End-to-end latency divided by output tokens, per request.",
            mt,
            _NTPOT,
        )
        self.streaming_tpot = FastHistogramVec(
            "llm_d_epp_request_streaming_tpot_seconds",
            "Streaming requests: (end-to-end - TTFT) / (output tokens - 1).",
            mt,
            _TPOT,
        )
        self.itl = FastHistogramVec(
            "llm_d_epp_request_streaming_itl_seconds",
            "Streaming requests: time between consecutive response body chunks.",
            mt,
            _ITL,
        )
        self.request_bytes = FastHistogramVec(
            "inference_objective_request_sizes", "Request body size in bytes.", mt, _REQ_BYTES
        )
        self.response_bytes = FastHistogramVec(
            "inference_objective_response_sizes", "Response body size in bytes.", mt, _RESP_BYTES
        )
        self.running: dict[str, int] = {}
        """Requests in flight through this picker, per model (`inference_objective_running_requests`)."""
        for c in (
            self.cached_tokens,
            self.ntpot,
            self.streaming_tpot,
            self.itl,
            self.request_bytes,
            self.response_bytes,
        ):
            r.register(c)
        r.register(_RunningCollector(self.running))
        r.register(_PoolCollector(datastore, pool))
        r.register(UpstreamNames(r))
        self._series: dict[tuple[str, str], ModelSeries] = {}
        self._decisions: dict[tuple[str, str], Any] = {}

    def series(self, model: str, target: str) -> ModelSeries:
        """The metric children for requests of `model` served as `target`."""
        key = (model, target)
        s = self._series.get(key)
        if s is None:
            s = _keep(
                self._series,
                key,
                ModelSeries(
                    self.requests.labels(model, target),
                    self.duration.labels(model, target),
                    self.ttft.labels(model, target),
                    self.input_tokens.labels(model, target),
                    self.output_tokens.labels(model, target),
                    self.cached_tokens.child(model, target),
                    self.ntpot.child(model, target),
                    self.streaming_tpot.child(model, target),
                    self.itl.child(model, target),
                    self.request_bytes.child(model, target),
                    self.response_bytes.child(model, target),
                ),
            )
        return s

    def decision(self, endpoint: str, profile: str) -> Any:
        """The decisions counter child for `endpoint` under `profile`."""
        key = (endpoint, profile)
        c = self._decisions.get(key)
        if c is None:
            c = _keep(self._decisions, key, self.decisions.labels(endpoint, profile))
        return c


def _keep(cache: dict[Any, Any], key: Any, value: Any) -> Any:
    """Store `value` in a label-children cache bounded at SERIES_CACHE entries (cleared when full:
    the children stay valid, only the lookups are redone); returns it."""
    if len(cache) >= SERIES_CACHE:
        cache.clear()
    cache[key] = value
    return value


class BucketCounts:
    """Histogram state for per-request and per-message paths: `observe` is a bisect, an increment and
    an addition (no lock, no label lookup); `cumulative` gives Prometheus' buckets at scrape time."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus `le`).
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        acc = 0
        out: list[tuple[str, float]] = []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            acc += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), acc))
        return out


class FastHistogram(BucketCounts, Collector):
    """An unlabelled histogram on `BucketCounts`, exported as one Prometheus family."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        super().__init__(buckets)
        self.name = name
        self.documentation = documentation

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterator[Metric]:
        fam = HistogramMetricFamily(self.name, self.documentation)
        fam.add_metric([], self.cumulative(), self.total)
        yield fam


class FastHistogramVec(Collector):
    """A labelled histogram on `BucketCounts` (one per label set, never removed; the event loop is the
    only writer), exported as one Prometheus family."""

    def __init__(self, name: str, documentation: str, labels: list[str], buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.buckets = buckets
        self._children: dict[tuple[str, ...], BucketCounts] = {}

    def child(self, *values: str) -> BucketCounts:
        c = self._children.get(values)
        if c is None:
            c = self._children[values] = BucketCounts(self.buckets)
        return c

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labels)]

    def collect(self) -> Iterator[Metric]:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for values, c in list(self._children.items()):
            fam.add_metric(list(values), c.cumulative(), c.total)
        yield fam


class _RunningCollector(Collector):
    """`inference_objective_running_requests{model_name}` from the director's per-model count."""

    def __init__(self, running: dict[str, int]) -> None:
        self.running = running

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "inference_objective_running_requests", "Requests in flight per model.", labels=["model_name"]
        )
        for model, n in list(self.running.items()):
            g.add_metric([model], n)
        yield g


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line (`--zap-encoder json`, what log pipelines in a cluster parse): `ts`
    (unix seconds), `level`, `logger`, `msg`, and `error` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def setup_logging(level: str, encoder: str = "console") -> None:
    """Root logging for `ingate serve`: key=value text (`console`) or JSON lines (`json`) on stderr."""
    handler = logging.StreamHandler()
    if encoder == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def get_logger(name: str = "ingate") -> logging.Logger:
    return logging.getLogger(name)


def kv(**fields: object) -> str:
    """key=value rendering for structured log lines."""
    return " ".join(f"{k}={v}" for k, v in fields.items())
