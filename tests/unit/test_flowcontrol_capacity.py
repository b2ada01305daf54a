"""The capacity document agrees with what the flow controller would do with a request right now."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from loopback_http import start_app
from prometheus_client import CollectorRegistry
from test_flowcontrol import Clock, controller, enqueue, pool, req, set_metrics, settle

from ingate.errors import GatewayError
from ingate.flowcontrol.capacity import CapacityCollector, SlotTracker, capacity_handler, capacity_snapshot


async def test_free_capacity_is_headroom_and_shrinks_with_dispatches() -> None:
    clock = Clock()
    ds = pool(clock, n=2, waiting=2)
    fc = controller(clock, ds, bands=[{"priority": -1, "max_in_flight": 2}])
    snap = capacity_snapshot(ds, fc, wall_time=1.0)
    assert snap["version"] == 1 and snap["timestamp"] == 1.0
    assert snap["ready_endpoints"] == 2
    assert snap["pool_saturation"] == pytest.approx(0.4)  # waiting 2 of threshold 5 on both
    assert snap["saturated"] is False
    assert snap["free_capacity"] == {"0": 6, "-1": 2}  # headroom 3 + 3; band -1 capped at maxInFlight 2
    assert snap["realtime_queued"] == 0 and snap["in_flight"] == 0

    # Two sheddable requests dispatched: the band is at its cap, the pool has 4 left for band 0.
    t1 = await fc.admit(req("s", prio=-1))
    t2 = await fc.admit(req("s", prio=-1))
    ds.endpoints()[0].in_flight += 2  # what the data plane does when it sends them
    snap = capacity_snapshot(ds, fc)
    assert snap["free_capacity"] == {"0": 4, "-1": 0}
    assert snap["in_flight"] == 2
    with pytest.raises(GatewayError) as e:  # the document said 0: the controller sheds
        await fc.admit(req("s", prio=-1))
    assert e.value.status == 429
    fc.release(t1)
    fc.release(t2)


async def test_queued_realtime_traffic_closes_every_band_at_or_below() -> None:
    clock = Clock()
    ds = pool(clock, n=1, waiting=5)  # saturated
    fc = controller(clock, ds)
    waiting = await enqueue(fc, req("rt", prio=0))
    snap = capacity_snapshot(ds, fc, priorities=[-1, 5])
    assert snap["saturated"] is True and snap["pool_saturation"] == 1.0
    assert snap["queued"] == {"5": 0, "0": 1, "-1": 0}
    assert snap["realtime_queued"] == 1
    assert snap["free_capacity"] == {"5": 0, "0": 0, "-1": 0}
    # Capacity comes back but the queued request has not been dispatched yet: band 5 could go at once
    # (nothing at or above it waits), bands 0 and -1 would wait behind it.
    set_metrics(ds.endpoints()[0], clock, waiting=1)
    snap = capacity_snapshot(ds, fc, priorities=[-1, 5])
    assert snap["free_capacity"] == {"5": 4, "0": 0, "-1": 0}
    assert fc.pump() == 1
    await settle()
    fc.release(waiting.result())


def test_stale_metrics_and_no_controller() -> None:
    clock = Clock()
    ds = pool(clock, n=2, waiting=0)
    snap = capacity_snapshot(ds, None, now=clock.t, priorities=[-1])
    assert snap["free_capacity"] == {"0": 10, "-1": 10}  # default queue-depth threshold 5 per endpoint
    assert snap["queued"] == {} and snap["in_flight"] == 0
    clock.t += 10  # metrics go stale: nothing is known, nothing is free
    snap = capacity_snapshot(ds, None, now=clock.t)
    assert snap["ready_endpoints"] == 0 and snap["saturated"] is True
    assert snap["free_capacity"] == {"0": 0} and snap["pool_saturation"] == 1.0


async def test_served_over_http_and_as_metrics() -> None:
    clock = Clock()
    ds = pool(clock, n=2, waiting=2)
    fc = controller(clock, ds)
    app = web.Application()
    app.router.add_get("/v1/capacity", capacity_handler(ds, fc, priorities=[-1]))
    runner, port = await start_app(app)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/v1/capacity?priority=-5") as r:
                doc = await r.json()
    finally:
        await runner.cleanup()
    assert doc["free_capacity"] == {"0": 6, "-1": 6, "-5": 6} and doc["saturated"] is False
    reg = CollectorRegistry()
    reg.register(CapacityCollector(ds, fc, priorities=[-1], pool="p"))
    assert reg.get_sample_value("ingate_pool_free_capacity", {"priority": "-1"}) == 6
    assert reg.get_sample_value("ingate_pool_saturation") == pytest.approx(0.4)
    sat = reg.get_sample_value("inference_extension_flow_control_pool_saturation", {"inference_pool": "p"})
    assert sat == pytest.approx(0.4)  # upstream's name for the same signal
    assert reg.get_sample_value("ingate_pool_saturated") == 0
    assert reg.get_sample_value("ingate_pool_realtime_queued") == 0
    assert reg.get_sample_value("ingate_pool_free_slots") == 0  # requests wait on both endpoints


def test_free_slots_learn_batch_size_and_never_queue() -> None:
    clock = Clock()
    ds = pool(clock, n=1, waiting=0)
    ep = ds.endpoints()[0]
    fc = controller(clock, ds)
    slots = SlotTracker()
    # Nothing seen running yet: one probe at a time.
    assert capacity_snapshot(ds, fc, slots=slots)["free_slots"] == 1
    ep.in_flight += 1  # the probe is in transit (sent since the scrape)
    assert capacity_snapshot(ds, fc, slots=slots)["free_slots"] == 0
    # Scrapes show 6 running at most: 6 slots learned; 4 running -> 2 free.
    ep.metrics.running, ep.metrics.updated_at = 6, clock.t + 0.01
    clock.t += 0.01
    capacity_snapshot(ds, fc, slots=slots)
    ep.in_flight = 4
    ep.metrics.running, ep.metrics.updated_at = 4, clock.t + 0.01
    clock.t += 0.01
    assert capacity_snapshot(ds, fc, slots=slots)["free_slots"] == 2
    # Anything waiting there: no free slot, whatever the queue-depth headroom says.
    ep.metrics.waiting = 1
    snap = capacity_snapshot(ds, fc, slots=slots)
    assert snap["free_slots"] == 0 and snap["free_capacity"]["0"] > 0
    assert "free_slots" not in capacity_snapshot(ds, fc)
