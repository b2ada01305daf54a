"""The pool: endpoints, their latest metrics and the gateway's own in-flight counts.

This is the only shared state of the endpoint picker. Discovery sources (static YAML, Kubernetes) write
endpoints; the metrics scraper writes `Endpoint.metrics`; data planes bump `in_flight`; schedulers read.
Everything runs on one asyncio loop, so no locks are needed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)
class EndpointMetrics:
    """Latest model-server metrics of one endpoint, engine-neutral (see ingate.metrics for mappings)."""

    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    """KV-cache utilisation in [0, 1]."""
    active_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    max_loras: int = 0
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    updated_at: float = 0.0
    """time.monotonic() of the last successful scrape; 0 = never scraped."""
    scrape_error: str | None = None

    def age(self, now: float | None = None) -> float:
        """Seconds since the last successful scrape (inf when never scraped)."""
        if self.updated_at == 0.0:
            return float("inf")
        return (time.monotonic() if now is None else now) - self.updated_at


@dataclass(eq=False, slots=True)
class Endpoint:
    """One model-server replica (a pod IP:port). Hashable by identity so it can key score maps."""

    name: str
    host: str
    port: int
    engine: str = "vllm"
    labels: dict[str, str] = field(default_factory=dict)
    weight: float = 1.0
    metrics: EndpointMetrics = field(default_factory=EndpointMetrics)
    in_flight: int = 0
    """Requests the gateway has sent here that have not finished (tracked locally, not scraped)."""
    in_flight_by_priority: dict[int, int] = field(default_factory=dict)
    """`in_flight` split by priority; kept only with flowControl.preemption (empty otherwise)."""
    healthy: bool = True
    """False after a connection failure, until the next successful scrape."""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"Endpoint({self.name}@{self.address})"


class Datastore:
    """Endpoints of one pool keyed by address, with change listeners for plugins that keep per-endpoint
    state (e.g. the prefix index drops an endpoint's entries when it leaves)."""

    def __init__(self, endpoints: Iterable[Endpoint] = ()) -> None:
        self._endpoints: dict[str, Endpoint] = {}
        self._list: list[Endpoint] = []
        self._on_remove: list[Callable[[Endpoint], None]] = []
        self._on_add: list[Callable[[Endpoint], None]] = []
        for ep in endpoints:
            self.upsert(ep)

    def endpoints(self) -> list[Endpoint]:
        """All endpoints (the same list object until membership changes; do not mutate)."""
        return self._list

    def get(self, address: str) -> Endpoint | None:
        return self._endpoints.get(address)

    def upsert(self, ep: Endpoint) -> Endpoint:
        """Add an endpoint or update an existing one's labels/engine in place (keeps its metrics)."""
        cur = self._endpoints.get(ep.address)
        if cur is not None:
            cur.name, cur.labels, cur.engine, cur.weight = ep.name, ep.labels, ep.engine, ep.weight
            return cur
        self._endpoints[ep.address] = ep
        self._list = list(self._endpoints.values())
        for cb in self._on_add:
            cb(ep)
        return ep

    def remove(self, address: str) -> None:
        ep = self._endpoints.pop(address, None)
        if ep is None:
            return
        self._list = list(self._endpoints.values())
        for cb in self._on_remove:
            cb(ep)

    def replace_all(self, endpoints: Iterable[Endpoint]) -> None:
        """Make the pool exactly `endpoints` (used by discovery sources on each resync)."""
        new = {ep.address: ep for ep in endpoints}
        for addr in list(self._endpoints):
            if addr not in new:
                self.remove(addr)
        for ep in new.values():
            self.upsert(ep)

    def on_remove(self, cb: Callable[[Endpoint], None]) -> None:
        self._on_remove.append(cb)

    def on_add(self, cb: Callable[[Endpoint], None]) -> None:
        """Call `cb` when a new address joins (e.g. flow control dispatches requests held while the pool
        was empty the moment a pod turns ready: scale from zero)."""
        self._on_add.append(cb)
