"""The pool's free capacity as a small JSON document, for async processors that fill idle capacity.

The gateway serves it (``capacity_handler`` at ``GET /v1/capacity``) and exports the same numbers as
metrics (``CapacityCollector``, ``ingate_pool_*``).
Shape (version 1)::

    {
      "version": 1,
      "timestamp": 1764745200.12,          # unix seconds when computed
      "ready_endpoints": 4,                 # healthy endpoints with fresh metrics
      "pool_saturation": 0.42,              # mean per-endpoint saturation, each capped at 1 (stale = 1)
      "saturated": false,                   # no endpoint below 1.0: flow control queues or sheds now
      "free_capacity": {"0": 7, "-1": 7},   # requests of that priority the pool would dispatch at once
      "queued": {"0": 0},                   # requests waiting in flow control per priority band
      "realtime_queued": 0,                 # queued requests with priority >= 0
      "in_flight": 12,                      # requests flow control dispatched and not yet released
      "free_slots": 3                       # (with a SlotTracker) requests that would start running at
    }                                       # once: learned batch slots - running - in transit

``free_capacity[p]`` is what a request of priority ``p`` would get right now under the controller's own
rules: 0 while anything of the same or higher priority waits (it would queue behind it, or be shed if
sheddable), else the pool's headroom (sum over endpoints of requests before each saturates), capped by
the pool-wide and the band's ``maxInFlight``. An async processor dispatching at priority ``p`` only into
``free_capacity[p]`` never dispatches while real-time requests wait in the gateway; to keep them from
waiting on the model servers as well, it also stays within ``free_slots`` (requests that start running at
once), or the servers preempt lower-priority work (flowControl.preemption).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import orjson
from aiohttp import web
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ingate.datastore import Datastore, Endpoint
from ingate.flowcontrol.config import SaturationConfig
from ingate.flowcontrol.controller import FlowController
from ingate.flowcontrol.saturation import SaturationDetector

VERSION = 1


class SlotTracker:
    """Learns each endpoint's batch slots as the most requests it was seen running, and says how many
    more requests would start running at once (``free``): the learned slots minus running and in transit;
    0 while anything waits there; 1 (a probe, so the estimate can grow) when the endpoint runs at its
    learned peak with nothing waiting or in transit."""

    def __init__(self) -> None:
        self.peak: dict[str, int] = {}

    def free(self, ep: Endpoint, in_transit: int) -> int:
        m = ep.metrics
        peak = self.peak.get(ep.address, 0)
        if m.running > peak:
            self.peak[ep.address] = peak = m.running
        if m.waiting > 0:
            return 0
        room = peak - m.running - in_transit
        if room > 0:
            return room
        return 1 if in_transit == 0 else 0


def capacity_snapshot(
    datastore: Datastore,
    controller: FlowController | None,
    *,
    priorities: Iterable[int] = (),
    detector: SaturationDetector | None = None,
    now: float | None = None,
    wall_time: float | None = None,
    slots: SlotTracker | None = None,
) -> dict[str, Any]:
    """Compute the capacity document (pure: reads, never changes state except the detector's
    per-scrape bookkeeping, which is idempotent for the same scrape).

    Without a controller (flow control off) the detector (default thresholds if None) gives headroom and
    nothing is queued. ``priorities`` adds bands to report beyond 0 and the controller's known bands.
    ``now`` is on the datastore's monotonic clock. With ``slots`` (kept across calls) the document also
    has ``free_slots``: requests that would start running at once without queueing anywhere.
    """
    t = (controller.clock() if controller is not None else time.monotonic()) if now is None else now
    det = (
        controller.detector
        if controller is not None
        else (detector or SaturationDetector(SaturationConfig()))
    )
    endpoints = datastore.endpoints()
    sats: list[float] = []
    headroom = 0
    extra = controller.config.dispatch_headroom if controller is not None else 0
    free_slots = 0
    for ep in endpoints:
        s = det.saturation(ep, t)
        sats.append(s)
        headroom += det.headroom(ep, t, extra)
        if slots is not None and math.isfinite(s):
            free_slots += slots.free(ep, det.recent(ep))
    ready = sum(1 for s in sats if math.isfinite(s))
    pool_sat = sum(min(1.0, s) for s in sats) / len(sats) if sats else 1.0
    saturated = not sats or all(s >= 1.0 for s in sats)

    bands: set[int] = {0, *priorities}
    queued: dict[int, int] = {}
    in_flight = 0
    if controller is not None:
        cfg = controller.config
        bands.update(b.priority for b in cfg.bands)
        # The controller's live bands (same package: read-only use of its bookkeeping).
        bands.update(controller._bands)
        in_flight = controller.in_flight
        if cfg.max_in_flight is not None:
            headroom = min(headroom, cfg.max_in_flight - in_flight)
        for p in bands:
            queued[p] = controller.queued(p)
    headroom = max(0, headroom)

    free: dict[str, int] = {}
    for p in sorted(bands, reverse=True):
        if any(q for bp, q in queued.items() if bp >= p):
            free[str(p)] = 0
            continue
        f = headroom
        if controller is not None:
            band = controller._bands.get(p)
            cap = controller.config.band(p).max_in_flight
            if cap is not None:
                f = min(f, cap - (band.in_flight if band is not None else 0))
        free[str(p)] = max(0, f)

    doc: dict[str, Any] = {
        "version": VERSION,
        "timestamp": time.time() if wall_time is None else wall_time,
        "ready_endpoints": ready,
        "pool_saturation": round(pool_sat, 4),
        "saturated": saturated,
        "free_capacity": free,
        "queued": {str(p): q for p, q in sorted(queued.items(), reverse=True)},
        "realtime_queued": sum(q for p, q in queued.items() if p >= 0),
        "in_flight": in_flight,
    }
    if slots is not None:
        doc["free_slots"] = free_slots
    return doc


def capacity_handler(
    datastore: Datastore, controller: FlowController | None, *, priorities: Iterable[int] = ()
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp handler serving :func:`capacity_snapshot` as JSON (mount it at ``GET /v1/capacity``)."""
    bands = tuple(priorities)
    slots = SlotTracker()

    async def handle(request: web.Request) -> web.Response:
        extra = [int(p) for p in request.query.getall("priority", []) if p.lstrip("-").isdigit()]
        doc = capacity_snapshot(datastore, controller, priorities=(*bands, *extra), slots=slots)
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    return handle


class CapacityCollector(Collector):
    """The capacity document as Prometheus gauges, computed at scrape time:
    ``ingate_pool_saturation``, ``ingate_pool_saturated``, ``ingate_pool_free_capacity{priority}``,
    ``ingate_pool_free_slots``, ``ingate_pool_realtime_queued``; and the saturation under upstream's
    name, ``inference_extension_flow_control_pool_saturation{inference_pool}``."""

    def __init__(
        self,
        datastore: Datastore,
        controller: FlowController | None,
        *,
        priorities: Iterable[int] = (),
        pool: str = "",
    ) -> None:
        self.pool = pool
        self.datastore = datastore
        self.controller = controller
        self.priorities = tuple(priorities)
        self.slots = SlotTracker()

    def collect(self) -> Iterator[Metric]:
        doc = capacity_snapshot(self.datastore, self.controller, priorities=self.priorities, slots=self.slots)
        yield GaugeMetricFamily(
            "ingate_pool_saturation",
            "Mean per-endpoint saturation, each capped at 1",
            value=doc["pool_saturation"],
        )
        sat = GaugeMetricFamily(
            "inference_extension_flow_control_pool_saturation",
            "Saturation of the pool (0 = idle, 1 = saturated): mean per-endpoint saturation, each capped at 1",
            labels=["inference_pool"],
        )
        sat.add_metric([self.pool], doc["pool_saturation"])
        yield sat
        yield GaugeMetricFamily(
            "ingate_pool_saturated",
            "1 when no endpoint is below saturation 1.0",
            value=float(doc["saturated"]),
        )
        free = GaugeMetricFamily(
            "ingate_pool_free_capacity",
            "Requests of this priority the pool would dispatch at once",
            labels=["priority"],
        )
        for p, v in doc["free_capacity"].items():
            free.add_metric([p], v)
        yield free
        yield GaugeMetricFamily(
            "ingate_pool_free_slots",
            "Requests that would start running at once (learned batch slots)",
            value=doc["free_slots"],
        )
        yield GaugeMetricFamily(
            "ingate_pool_realtime_queued",
            "Requests with priority >= 0 waiting in flow control",
            value=doc["realtime_queued"],
        )
