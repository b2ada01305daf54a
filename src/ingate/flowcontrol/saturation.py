"""Per-endpoint saturation from scraped metrics and the gateway's own in-flight accounting."""

from __future__ import annotations

import math
from collections.abc import Iterable

from ingate.datastore import Endpoint
from ingate.flowcontrol.config import SaturationConfig


class SaturationDetector:
    """``saturation = max(waiting / queue_threshold, kv / kv_threshold)``; stale metrics -> inf."""

    def __init__(self, config: SaturationConfig) -> None:
        self.config = config
        # address -> (metrics.updated_at seen, ep.in_flight at that moment): requests the gateway sent
        # since the last scrape are not in the scraped numbers yet, so they count as waiting.
        self._seen: dict[str, tuple[float, int]] = {}

    def recent(self, ep: Endpoint) -> int:
        """Requests the gateway sent to ``ep`` that its last scrape does not show: those sent since the
        scrape, or, if more, the gateway's in-flight requests beyond everything the scrape counted
        (requests still on their way when it was taken)."""
        m = ep.metrics
        seen = self._seen.get(ep.address)
        if seen is None or seen[0] != m.updated_at:
            self._seen[ep.address] = (m.updated_at, ep.in_flight)
            since = 0
        else:
            since = ep.in_flight - seen[1]
        unseen = ep.in_flight - m.running - m.waiting
        return max(0, since, unseen)

    def saturation(self, ep: Endpoint, now: float) -> float:
        """0 = idle, >= 1 saturated, inf when unhealthy or metrics are stale."""
        c = self.config
        if not ep.healthy or ep.metrics.age(now) > c.stale_after_s:
            return math.inf
        waiting = ep.metrics.waiting + self.recent(ep)
        return max(waiting / c.queue_depth_threshold, ep.metrics.kv_usage / c.kv_utilization_threshold)

    def headroom(self, ep: Endpoint, now: float, extra: int = 0) -> int:
        """Requests ``ep`` can take before it is saturated (0 when saturated)."""
        c = self.config
        if self.saturation(ep, now) >= 1.0:
            return 0
        waiting = ep.metrics.waiting + self.recent(ep)
        return max(1, math.ceil(c.queue_depth_threshold - waiting)) + extra

    def pool_saturated(self, endpoints: Iterable[Endpoint], now: float) -> bool:
        """True when no endpoint is below 1.0."""
        return all(self.saturation(ep, now) >= 1.0 for ep in endpoints)

    def forget(self, address: str) -> None:
        """Drop state for an endpoint that left the pool."""
        self._seen.pop(address, None)
