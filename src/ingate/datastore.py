"""The pool: endpoints, their latest metrics and the gateway's own in-flight counts.

This is the only shared state of the endpoint picker. Discovery sources (static YAML, Kubernetes) write
endpoints; the metrics scraper writes `Endpoint.metrics`; data planes bump `in_flight` and time the
streamed chunks they relay (`Endpoint.steps`); schedulers read.
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


_BURST_GAP_S = 0.005
"""Chunks from one endpoint closer than this (and than a quarter step) belong to one step's burst: a
step's tokens leave the server within a few milliseconds; steps are rarely shorter than 10 ms."""
_SAME_BURST_S = 0.0005
"""Chunks closer than this are one burst even before the step is known."""
_STEP_DECAY = 0.1


@dataclass(slots=True)
class StepTiming:
    """When the endpoint's engine last emitted tokens, from the streamed responses the gateway relays.

    An engine such as vLLM runs in steps and every step sends one token to each request decoding
    there, so the chunks of one step reach the gateway as a burst. A request sent there mid-step
    waits for the step in progress; how far that step has got is not in any metric, but the time since
    the last burst tells it (measured in the scheduling replay, docs/scheduling.md). Updated on every
    streamed chunk by the data plane: a few float operations, no allocation.
    """

    last_chunk_at: float = 0.0
    """Monotonic time of the last streamed chunk from this endpoint (0 = none yet)."""
    burst_at: float = 0.0
    """Monotonic time of the first chunk of the last burst (a step's tokens)."""
    step_s: float = 0.0
    """Moving average of the time between bursts: the engine's step duration while it is busy."""

    def chunk(self, now: float) -> None:
        """One streamed chunk from this endpoint arrived at `now`."""
        gap = now - self.last_chunk_at
        self.last_chunk_at = now
        step = self.step_s
        if gap <= _SAME_BURST_S or (gap <= _BURST_GAP_S and gap <= 0.25 * step):
            return
        d = now - self.burst_at
        self.burst_at = now
        if step == 0.0:
            self.step_s = d if d < 1.0 else 0.0  # the first burst's d is since start-up
        elif d < 4.0 * step:  # longer: the engine was idle in between, not one step
            # Clamped to [0.5, 2] steps: a burst split in two (a chunk late by more than the burst
            # gap) moves it by at most 5%, one long prefill step by at most 10%.
            d = 0.5 * step if d < 0.5 * step else 2.0 * step if d > 2.0 * step else d
            self.step_s = step + _STEP_DECAY * (d - step)

    def since(self, now: float) -> float:
        """Seconds since the engine's last step ended as seen here, capped at two steps (an idle
        engine, or one not seen streaming, reads as the cap: nothing in progress to wait for)."""
        cap = 2.0 * self.step_s
        s = now - self.last_chunk_at
        if s < 0.0:
            return 0.0
        return s if s < cap else cap


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
    steps: StepTiming = field(default_factory=StepTiming)
    """Step timing seen in the streamed responses relayed from here (fed by the data planes)."""

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
