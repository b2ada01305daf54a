"""Load-based plugins: queue depth, KV-cache utilisation, the gateway's in-flight count, load guard.

An endpoint's `weight` (`pool.endpoints[].weight`, default 1) is its relative capacity: queue and
in-flight counts are divided by it, so a replica of weight 2 scores like one with half its load.

Between two metric scrapes (50 ms by default) a burst can arrive that the model servers' gauges don't
show yet. The gateway counts what it has in flight per endpoint; requests in flight beyond what the
server reports as waiting + running were dispatched since the last scrape and are counted as queued.
"""

from __future__ import annotations

from dataclasses import dataclass

from ingate.datastore import Endpoint
from ingate.request import InferenceRequest
from ingate.scheduling.framework import CycleState
from ingate.scheduling.plugins.registry import register


def effective_queue(ep: Endpoint) -> int:
    """Waiting requests, including ones dispatched since the last scrape."""
    m = ep.metrics
    return m.waiting + max(0, ep.in_flight - m.waiting - m.running)


def _inverse_scaled(values: dict[Endpoint, float], scale: float) -> dict[Endpoint, float]:
    """1 - value / max(scale, largest value): 0 -> 1, falling linearly.

    Small differences under `scale` cost little (one queued request must not outweigh a long prefix
    hit), while under heavy load the scores stay relative to the most loaded candidate.
    """
    top = max(scale, max(values.values()))
    return {ep: 1.0 - v / top for ep, v in values.items()}


@register("scorer", "queue")
@dataclass
class QueueScorer:
    """Shorter effective queue scores higher: 1 - queue / max(scale, longest queue)."""

    scale: float = 8.0
    name: str = "queue"

    def score(
        self, ctx: CycleState, request: InferenceRequest, endpoints: list[Endpoint]
    ) -> dict[Endpoint, float]:
        return _inverse_scaled({ep: effective_queue(ep) / ep.weight for ep in endpoints}, self.scale)


@register("scorer", "kv-cache")
@dataclass
class KVCacheScorer:
    """Free KV cache scores higher: 1 - utilisation (absolute, so a full cache is 0 everywhere)."""

    name: str = "kv-cache"

    def score(
        self, ctx: CycleState, request: InferenceRequest, endpoints: list[Endpoint]
    ) -> dict[Endpoint, float]:
        return {ep: 1.0 - min(1.0, max(0.0, ep.metrics.kv_usage)) for ep in endpoints}


@register("scorer", "least-in-flight")
@dataclass
class LeastInFlightScorer:
    """Fewer requests in flight from this gateway scores higher (least-request balancing)."""

    scale: float = 32.0
    name: str = "least-in-flight"

    def score(
        self, ctx: CycleState, request: InferenceRequest, endpoints: list[Endpoint]
    ) -> dict[Endpoint, float]:
        return _inverse_scaled({ep: ep.in_flight / ep.weight for ep in endpoints}, self.scale)


@register("filter", "load-guard")
@dataclass
class LoadGuardFilter:
    """Keep only endpoints not far more loaded than the least-loaded candidate.

    An endpoint is dropped when its effective queue exceeds the smallest one by more than the margin,
    or its KV utilisation is above `kv_threshold` while some candidate is below it. This lets affinity
    scorers stay sticky until a replica saturates, then spill over (affinity without such a guard is
    known to be slower than round robin under load).

    The margin is `queue_margin`, widened for each endpoint to `margin_factor` x the mean effective
    queue of the *other* candidates when that is larger (0: off). While some replica has room,
    spilling a request off the replica that caches its prefix costs one prefill and saves a wait;
    once every replica queues, it saves little wait and the extra prefills take capacity the pool no
    longer has, so past saturation a fixed margin makes the pool lose its cache hits and collapse
    (docs/scheduling.md, "Load guard"). The others' mean, not the mean of all: one replica that runs
    away while the rest idle must not widen its own margin.
    """

    queue_margin: int = 3
    kv_threshold: float = 0.9
    margin_factor: float = 0.0
    name: str = "load-guard"

    def __post_init__(self) -> None:
        if self.queue_margin < 0 or self.margin_factor < 0:
            raise ValueError("queueMargin and marginFactor must be >= 0")

    def filter(self, ctx: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        if len(endpoints) < 2:
            return endpoints
        queues = [effective_queue(ep) for ep in endpoints]
        lo = min(queues)
        limit = lo + self.queue_margin
        if self.margin_factor > 0:
            total, per_other = sum(queues), self.margin_factor / (len(queues) - 1)
            out = [
                ep
                for ep, q in zip(endpoints, queues, strict=True)
                if q <= limit or q <= lo + per_other * (total - q)
            ]
        else:
            out = [ep for ep, q in zip(endpoints, queues, strict=True) if q <= limit]
        cool = [ep for ep in out if ep.metrics.kv_usage <= self.kv_threshold]
        return cool or out


@register("filter", "label-selector")
@dataclass
class LabelSelectorFilter:
    """Keep endpoints whose labels include every `match_labels` pair (`matchLabels` in YAML): a profile
    can serve from part of the pool (e.g. `{accelerator: h100}`). Labels come from the static config
    (`pool.endpoints[].labels`) or the pods' labels in Kubernetes."""

    match_labels: dict[str, str] | None = None
    name: str = "label-selector"

    def __post_init__(self) -> None:
        if not self.match_labels or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.match_labels.items()
        ):
            raise ValueError("matchLabels: a non-empty mapping of label names to string values")
        self._items = tuple(self.match_labels.items())

    def filter(self, ctx: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        items = self._items
        return [ep for ep in endpoints if all(ep.labels.get(k) == v for k, v in items)]
