"""Flow control policies, capacity, expiry, cancellation and shedding, driven by a virtual clock."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from ingate.datastore import Datastore, Endpoint
from ingate.errors import GatewayError
from ingate.flowcontrol import (
    FlowControlConfig,
    FlowController,
    SaturationDetector,
    Ticket,
    build_flow_controller,
    jain_index,
)
from ingate.flowcontrol.config import BandConfig, SaturationConfig
from ingate.flowcontrol.fairness import RoundRobin, VirtualTokenCounter
from ingate.flowcontrol.metrics import FlowControlMetrics
from ingate.request import InferenceRequest


class Clock:
    """Virtual monotonic clock."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def req(flow: str = "a", prio: int = 0, prompt: str = "hello world", rid: str = "r") -> InferenceRequest:
    return InferenceRequest(
        request_id=rid,
        path="/v1/completions",
        model="m",
        prompt_text=prompt,
        stream=False,
        max_tokens=None,
        body={},
        raw_body=prompt.encode(),
        headers={},
        priority=prio,
        fairness_id=flow,
    )


def pool(clock: Clock, n: int = 1, waiting: int = 0, kv: float = 0.0) -> Datastore:
    ds = Datastore([Endpoint(f"e{i}", "127.0.0.1", 8000 + i) for i in range(n)])
    for ep in ds.endpoints():
        set_metrics(ep, clock, waiting, kv)
    return ds


def set_metrics(ep: Endpoint, clock: Clock, waiting: int, kv: float = 0.0) -> None:
    ep.metrics.waiting = waiting
    ep.metrics.kv_usage = kv
    ep.metrics.updated_at = clock.t


def controller(clock: Clock, ds: Datastore, **kw: object) -> FlowController:
    return FlowController(
        FlowControlConfig.model_validate(kw), ds, clock=clock, metrics=FlowControlMetrics(CollectorRegistry())
    )


async def enqueue(fc: FlowController, r: InferenceRequest, **kw: object) -> asyncio.Task[Ticket]:
    t = asyncio.create_task(fc.admit(r, **kw))  # type: ignore[arg-type]
    for _ in range(3):
        await asyncio.sleep(0)
    assert not t.done(), "expected the request to be queued"
    return t


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


# ---- saturation -------------------------------------------------------------------------------------


def test_saturation_formula_and_staleness() -> None:
    clock = Clock()
    det = SaturationDetector(SaturationConfig())
    ep = Endpoint("e", "127.0.0.1", 1)
    assert det.saturation(ep, clock.t) == math.inf  # never scraped
    set_metrics(ep, clock, waiting=2, kv=0.6)
    assert det.saturation(ep, clock.t) == pytest.approx(0.75)  # max(2/5, 0.6/0.8)
    set_metrics(ep, clock, waiting=4, kv=0.1)
    assert det.saturation(ep, clock.t) == pytest.approx(0.8)
    clock.t += 0.25  # older than 0.2 s
    assert det.saturation(ep, clock.t) == math.inf
    assert det.pool_saturated([ep], clock.t)


def test_pool_saturated_only_when_no_endpoint_below_one() -> None:
    clock = Clock()
    ds = pool(clock, n=2, waiting=5)
    det = SaturationDetector(SaturationConfig())
    assert det.pool_saturated(ds.endpoints(), clock.t)
    set_metrics(ds.endpoints()[1], clock, waiting=1)
    assert not det.pool_saturated(ds.endpoints(), clock.t)


def test_requests_sent_since_scrape_count_as_waiting() -> None:
    clock = Clock()
    det = SaturationDetector(SaturationConfig())
    ep = Endpoint("e", "127.0.0.1", 1)
    set_metrics(ep, clock, waiting=0)
    assert det.saturation(ep, clock.t) == 0.0
    ep.in_flight += 5  # the gateway sent 5 more before the next scrape
    assert det.saturation(ep, clock.t) == pytest.approx(1.0)
    clock.t += 0.01
    set_metrics(ep, clock, waiting=0)  # new scrape: they are in the server's own numbers now
    ep.metrics.running = 5
    assert det.saturation(ep, clock.t) == 0.0


def test_requests_in_transit_at_the_scrape_still_count_as_waiting() -> None:
    clock = Clock()
    det = SaturationDetector(SaturationConfig(queue_depth_threshold=1))
    ep = Endpoint("e", "127.0.0.1", 1)
    ep.in_flight = 2  # sent two; the scrape saw only the first (the second was still on its way)
    set_metrics(ep, clock, waiting=0)
    ep.metrics.running = 1
    assert det.saturation(ep, clock.t) == pytest.approx(1.0)  # not 0: the second one counts
    assert det.headroom(ep, clock.t) == 0
    clock.t += 0.01
    set_metrics(ep, clock, waiting=1)  # the next scrape shows it waiting
    assert det.saturation(ep, clock.t) == pytest.approx(1.0)


# ---- Jain's index -----------------------------------------------------------------------------------


def test_jain_index() -> None:
    assert jain_index([5, 5, 5]) == pytest.approx(1.0)
    assert jain_index([1, 0, 0, 0]) == pytest.approx(0.25)
    assert jain_index([1, 3]) == pytest.approx(16 / 20)
    assert jain_index([]) == 1.0


# ---- policies in isolation --------------------------------------------------------------------------


def test_round_robin_cycles_backlogged_flows() -> None:
    rr = RoundRobin()
    for f in "abc":
        rr.activate(f)
    assert [rr.next() for _ in range(6)] == list("abcabc")
    rr.deactivate("b")
    assert [rr.next() for _ in range(4)] == list("acac")
    # A flow that drains and comes back at once still gets one turn per round, never two.
    rr.deactivate("a")
    rr.activate("a")
    rr.activate("b")
    assert [rr.next() for _ in range(6)] == list("acbacb")


def test_vtc_lifts_returning_flow_to_minimum() -> None:
    vtc = VirtualTokenCounter(1, 2)
    vtc.activate("a")
    vtc.charge("a", 1000, 0)
    vtc.activate("b")  # new flow starts at a's counter, not at 0
    assert vtc.counters["b"] == 1000
    vtc.charge("a", 10, 5)
    assert vtc.counters["a"] == 1020
    assert vtc.next() == "b"


# ---- controller -------------------------------------------------------------------------------------


async def test_admits_at_once_when_not_saturated() -> None:
    clock = Clock()
    fc = controller(clock, pool(clock))
    t = await fc.admit(req())
    assert not t.queued and fc.in_flight == 1
    fc.release(t)
    fc.release(t)  # exactly once
    assert fc.in_flight == 0


async def test_strict_priority_between_bands() -> None:
    clock = Clock()
    ds = pool(clock, waiting=5)
    fc = controller(clock, ds)
    low = await enqueue(fc, req("a", prio=0))
    high = await enqueue(fc, req("b", prio=10))
    set_metrics(ds.endpoints()[0], clock, waiting=4)  # room for exactly one
    assert fc.pump() == 1
    await settle()
    assert high.done() and not low.done()
    set_metrics(ds.endpoints()[0], clock, waiting=4)
    clock.t += 0.01
    fc.pump()
    await settle()
    assert low.done()


async def test_higher_band_waits_behind_nothing_but_lower_band_waits_behind_higher() -> None:
    clock = Clock()
    ds = pool(clock, waiting=5)
    fc = controller(clock, ds)
    await enqueue(fc, req("a", prio=5))
    set_metrics(ds.endpoints()[0], clock, waiting=0)
    # Capacity is back but a priority-5 request waits: a priority-0 request must queue behind it,
    # a priority-9 request may go at once.
    await enqueue(fc, req("b", prio=0))
    t = await fc.admit(req("c", prio=9))
    assert not t.queued


async def test_band_max_in_flight_reserves_capacity_for_higher_bands() -> None:
    clock = Clock()
    ds = pool(clock, waiting=0)  # plenty of room: headroom 5
    fc = controller(clock, ds, bands=[{"priority": 5, "max_in_flight": 2}])
    # Band 5 takes two at once, then waits although the pool has room; other bands are not capped.
    t1 = await fc.admit(req("a", prio=5))
    t2 = await fc.admit(req("a", prio=5))
    third = await enqueue(fc, req("a", prio=5))
    assert fc.pump() == 0
    high = await fc.admit(req("b", prio=10))
    assert not high.queued
    # A lower band queues behind band 5's queued request but is not blocked by band 5's cap.
    low = await enqueue(fc, req("c", prio=0))
    assert fc.pump() == 1
    await settle()
    assert low.done() and not third.done()
    fc.release(t1)
    assert fc.pump() == 1
    await settle()
    assert third.done() and fc.in_flight == 4
    for t in (t2, third.result(), high, low.result()):
        fc.release(t)
    assert fc.in_flight == 0 and fc._bands[5].in_flight == 0


async def test_sheddable_is_shed_not_queued_whenever_it_cannot_go_at_once() -> None:
    clock = Clock()
    ds = pool(clock, waiting=0)
    fc = controller(clock, ds, bands=[{"priority": -1, "max_in_flight": 1}])
    t = await fc.admit(req("s", prio=-1))
    assert not t.queued
    # The pool has room but the sheddable band is at its cap: shed, not queued.
    with pytest.raises(GatewayError) as e:
        await fc.admit(req("s", prio=-1))
    assert e.value.status == 429 and e.value.code == "shed"
    fc.release(t)
    # Requests of a higher band are waiting: a sheddable one would queue behind them, so it is shed.
    set_metrics(ds.endpoints()[0], clock, waiting=5)
    waiting = await enqueue(fc, req("a", prio=0))
    set_metrics(ds.endpoints()[0], clock, waiting=0)
    with pytest.raises(GatewayError) as e:
        await fc.admit(req("s", prio=-1))
    assert e.value.code == "shed" and fc.queued(-1) == 0
    assert fc.pump() == 1
    await settle()
    fc.release(waiting.result())


async def dispatch_one_by_one(
    fc: FlowController, ds: Datastore, clock: Clock, tasks: list[tuple[str, asyncio.Task[Ticket]]]
) -> list[str]:
    order: list[str] = []
    pending = list(tasks)
    for _ in range(len(tasks)):
        clock.t += 0.01
        set_metrics(ds.endpoints()[0], clock, waiting=4)  # headroom 1
        assert fc.pump() == 1
        await settle()
        done = [p for p in pending if p[1].done()]
        assert len(done) == 1
        order.append(done[0][0])
        pending.remove(done[0])
        done[0][1].result()
    return order


async def test_round_robin_across_flows_fcfs_within_flow() -> None:
    clock = Clock()
    ds = pool(clock, waiting=5)
    fc = controller(clock, ds, default_policy="round-robin")
    tasks = []
    for name in ["a1", "a2", "a3", "b1", "b2", "c1"]:
        tasks.append((name, await enqueue(fc, req(name[0], rid=name))))
    order = await dispatch_one_by_one(fc, ds, clock, tasks)
    assert order == ["a1", "b1", "c1", "a2", "b2", "a3"]


async def test_vtc_long_prompts_do_not_starve_others() -> None:
    clock = Clock()
    ds = pool(clock, waiting=5)
    fc = controller(clock, ds, default_policy="vtc")
    tasks = []
    for i in range(10):
        tasks.append(("long", await enqueue(fc, req("long", prompt="x" * 4000, rid=f"l{i}"))))
        tasks.append(("short", await enqueue(fc, req("short", prompt="x" * 400, rid=f"s{i}"))))
    order = await dispatch_one_by_one(fc, ds, clock, tasks)
    # 1000-token vs 100-token prompts: after the first long one, ~10 short ones go per long one.
    served = {"long": 0, "short": 0}
    for name in order[:12]:
        served[name] += 1000 if name == "long" else 100
    assert order[:12].count("short") >= 9
    assert jain_index(served.values()) > 0.8


async def test_vtc_release_corrects_estimate_with_output_weight() -> None:
    clock = Clock()
    fc = controller(clock, pool(clock), vtc_input_weight=1, vtc_output_weight=2)
    t = await fc.admit(req("a", prompt="x" * 400))  # estimate 100 tokens
    band = fc._bands[0]
    assert isinstance(band.policy, VirtualTokenCounter)
    assert band.policy.counters["a"] == 100

    class Info:
        prompt_tokens = 120
        completion_tokens = 50

    fc.release(t, Info())
    assert band.policy.counters["a"] == 120 + 2 * 50


async def test_band_capacity_requests_and_bytes_429() -> None:
    clock = Clock()
    fc = controller(
        clock, pool(clock, waiting=5), bands=[BandConfig(priority=0, max_requests=2, max_bytes=100)]
    )
    await enqueue(fc, req("a"), size_bytes=50)
    with pytest.raises(GatewayError) as e:
        await asyncio.wait_for(fc.admit(req("b"), size_bytes=60), 2.0)  # 110 bytes > 100
    assert e.value.status == 429 and e.value.retry_after is not None
    await enqueue(fc, req("b"), size_bytes=50)
    with pytest.raises(GatewayError) as e:
        await asyncio.wait_for(fc.admit(req("c"), size_bytes=0), 2.0)  # 3 requests > 2
    assert e.value.status == 429 and "priority 0" in e.value.message
    await enqueue(fc, req("c", prio=1))  # other bands are independent
    await fc.stop()


async def test_flow_capacity_429() -> None:
    clock = Clock()
    fc = controller(clock, pool(clock, waiting=5), flow_max_requests=1, flow_max_bytes=100)
    await enqueue(fc, req("a"))
    with pytest.raises(GatewayError) as e:
        await asyncio.wait_for(fc.admit(req("a")), 2.0)
    assert e.value.status == 429 and "queue full" in e.value.message
    with pytest.raises(GatewayError) as e:
        await asyncio.wait_for(fc.admit(req("b"), size_bytes=101), 2.0)
    assert e.value.status == 429
    await enqueue(fc, req("b"))  # another flow still has room
    await fc.stop()


async def test_ttl_expiry_503_with_message_and_deadline() -> None:
    clock = Clock()
    fc = controller(clock, pool(clock, waiting=5), queue_ttl_s=30)
    ttl = await enqueue(fc, req("a"))
    dl = await enqueue(fc, req("b"), deadline=clock.t + 5)
    clock.t += 6
    fc.pump()
    await settle()
    with pytest.raises(GatewayError) as e:
        dl.result()
    assert e.value.status == 503 and "deadline" in e.value.message
    assert not ttl.done()
    clock.t += 25
    fc.pump()
    await settle()
    with pytest.raises(GatewayError) as e:
        ttl.result()
    assert e.value.status == 503 and "queue TTL" in e.value.message
    assert fc.queued() == 0


class NoScan(deque[Any]):
    """A flow queue that fails the test if anyone iterates it (expiry must not scan the queues)."""

    def __iter__(self) -> Iterator[Any]:
        raise AssertionError("flow queue scanned")


async def test_expiry_is_o_expired_heap_not_a_queue_scan() -> None:
    clock = Clock()
    ds = pool(clock, waiting=5)
    fc = controller(clock, ds, queue_ttl_s=10, flow_max_requests=1000)
    # 200 queued in flow "a", 10 ms apart; number 50 carries a short deadline (deeper than the head);
    # "b" has one item that must survive.
    tasks = []
    for i in range(200):
        clock.t = 1000.0 + i * 0.01
        dl = clock.t + 2 if i == 50 else None
        tasks.append(await enqueue(fc, req("a", rid=str(i)), deadline=dl))
    keep = await enqueue(fc, req("b", rid="b"))
    band = fc._bands[0]
    band.flows["a"] = NoScan(band.flows["a"])
    assert fc.next_expiry() == pytest.approx(1000.0 + 50 * 0.01 + 2)
    # Nothing due: a wake touches only the heap top.
    fc.pump()
    assert fc.queued() == 201
    # At t0 + 10.105 s the first 11 items (10 s TTL) and the deadline item have expired.
    clock.t = 1000.0 + 10.105
    fc.pump()
    await settle()
    expired = [i for i, t in enumerate(tasks) if t.done()]
    assert expired == [*range(11), 50]
    for i in expired:
        err = tasks[i].exception()
        assert isinstance(err, GatewayError) and err.status == 503 and err.code == "queue_ttl_expired"
    assert "deadline" in str(tasks[50].exception()) and "queue TTL" in str(tasks[0].exception())
    assert fc.queued() == 200 - 12 + 1 and not keep.done()
    # FCFS survives expiry: the next dispatched is item 11.
    nq, plain = band.flows["a"], deque[Any]()
    while nq:
        plain.append(nq.popleft())
    band.flows["a"] = plain
    set_metrics(ds.endpoints()[0], clock, waiting=4)
    assert fc.pump() == 1
    await settle()
    assert tasks[11].done() and not tasks[11].cancelled() and tasks[11].exception() is None
    fc.release(tasks[11].result())


async def test_expiry_heap_stays_bounded_by_queue_length() -> None:
    # Items dispatched long before their TTL leave stale heap entries; compaction keeps the heap O(queued).
    clock = Clock()
    ds = pool(clock, waiting=0)
    fc = controller(clock, ds, queue_ttl_s=1000, saturation={"queue_depth_threshold": 1})
    ep = ds.endpoints()[0]
    for i in range(500):
        set_metrics(ep, clock, waiting=1)
        t = await enqueue(fc, req("a", rid=str(i)))
        set_metrics(ep, clock, waiting=0)
        clock.t += 0.001
        assert fc.pump() == 1
        await settle()
        fc.release(t.result())
    assert fc.queued() == 0
    assert len(fc._expiry) <= 64 + 1
    assert fc.next_expiry() == math.inf


async def test_cancellation_removes_item() -> None:
    clock = Clock()
    ds = pool(clock, waiting=5)
    fc = controller(clock, ds)
    t1 = await enqueue(fc, req("a", rid="1"))
    t2 = await enqueue(fc, req("a", rid="2"))
    assert fc.queued() == 2
    t1.cancel()
    await settle()
    assert fc.queued() == 1
    set_metrics(ds.endpoints()[0], clock, waiting=4)
    assert fc.pump() == 1
    await settle()
    assert t2.done() and fc.in_flight == 1
    assert fc.queued() == 0 and not fc._bands[0].flows  # no leftover flow state


async def test_sheddable_rejected_when_saturated_admitted_when_not() -> None:
    clock = Clock()
    ds = pool(clock, waiting=5)
    fc = controller(clock, ds)
    with pytest.raises(GatewayError) as e:
        await fc.admit(req("a", prio=-1))
    assert e.value.status == 429 and e.value.retry_after is not None
    set_metrics(ds.endpoints()[0], clock, waiting=1)
    t = await fc.admit(req("a", prio=-1))
    assert not t.queued


async def test_stale_metrics_count_as_saturated() -> None:
    clock = Clock()
    ds = pool(clock, waiting=0)
    fc = controller(clock, ds)
    clock.t += 1.0  # no scrape for a second
    with pytest.raises(GatewayError) as e:
        await fc.admit(req("a", prio=-1))
    assert e.value.status == 429
    queued = await enqueue(fc, req("a", prio=0))
    set_metrics(ds.endpoints()[0], clock, waiting=0)
    fc.pump()
    await settle()
    assert queued.done()


async def test_dispatch_does_not_exceed_headroom_between_scrapes() -> None:
    clock = Clock()
    ds = pool(clock, n=2, waiting=5)
    fc = controller(clock, ds)
    tasks = [await enqueue(fc, req(str(i % 3))) for i in range(20)]
    set_metrics(ds.endpoints()[0], clock, waiting=2)  # 3 free
    set_metrics(ds.endpoints()[1], clock, waiting=4)  # 1 free
    assert fc.pump() == 4
    await settle()
    assert sum(t.done() for t in tasks) == 4
    # The director routes them (in_flight grows); without a new scrape there is no more room.
    ds.endpoints()[0].in_flight += 3
    ds.endpoints()[1].in_flight += 1
    assert fc.pump() == 0
    await fc.stop()
    await settle()
    assert all(t.done() for t in tasks)


async def test_dispatcher_task_wakes_on_metrics_change() -> None:
    clock = Clock()
    ds = pool(clock, waiting=5)
    fc = FlowController(
        FlowControlConfig(poll_interval_s=0.01),
        ds,
        clock=clock,
        metrics=FlowControlMetrics(CollectorRegistry()),
    )
    await fc.start()
    try:
        t = asyncio.create_task(fc.admit(req()))
        await asyncio.sleep(0.03)
        assert not t.done()
        set_metrics(ds.endpoints()[0], clock, waiting=0)
        ticket = await asyncio.wait_for(t, 2.0)
        assert ticket.queued
    finally:
        await fc.stop()


async def test_metrics_queue_size_and_rejections() -> None:
    clock = Clock()
    reg = CollectorRegistry()
    fc = FlowController(
        FlowControlConfig(), pool(clock, waiting=5), clock=clock, metrics=FlowControlMetrics(reg)
    )
    await enqueue(fc, req("a", prio=3))
    size = reg.get_sample_value(
        "inference_extension_flow_control_queue_size", {"fairness_id": "a", "priority": "3"}
    )
    assert size == 1
    with pytest.raises(GatewayError):
        await fc.admit(req("s", prio=-2))
    assert (
        reg.get_sample_value("ingate_flow_control_rejected_total", {"priority": "-2", "reason": "shed"}) == 1
    )
    await fc.stop()


def test_build_from_yaml_mapping() -> None:
    ds = Datastore([Endpoint("e", "127.0.0.1", 1)])
    assert build_flow_controller(None, ds) is None
    assert build_flow_controller({"enabled": False}, ds) is None
    fc = build_flow_controller(
        {"queueTtlS": 5, "defaultPolicy": "round-robin", "bands": [{"priority": 1, "maxRequests": 3}]},
        ds,
        CollectorRegistry(),
    )
    assert fc is not None and fc.config.queue_ttl_s == 5 and fc.config.band(1).max_requests == 3
    with pytest.raises(ValueError, match=r"queueTtlS|queue_ttl_s"):
        build_flow_controller({"queueTtlS": -1}, ds, CollectorRegistry())
    with pytest.raises(ValueError, match="bogus"):
        build_flow_controller({"bogus": 1}, ds, CollectorRegistry())


async def test_preemption_dispatches_past_saturation_up_to_the_learned_batch_slots() -> None:
    clock = Clock()
    ds = pool(clock, waiting=0)
    # queueDepthThreshold 1: a replica with one request waiting is saturated, so the room for
    # higher-priority work is the batch slots alone (no queue allowance).
    fc = controller(clock, ds, preemption=True, saturation={"queueDepthThreshold": 1})
    lows = [await fc.admit(req("std", prio=0)) for _ in range(3)]
    ep = ds.endpoints()[0]
    set_metrics(ep, clock, waiting=5)  # saturated from now on
    ep.metrics.running = 2  # the replica runs 2 at a time (it was seen running 2)
    h1 = await fc.admit(req("crit", prio=10))
    ep.metrics.running = 1  # the learned batch size is the peak, not the latest scrape
    h2 = await fc.admit(req("crit", prio=10))
    assert h1.preempting and h2.preempting and not h1.queued  # each displaces lower-priority work
    h3 = await enqueue(fc, req("crit", prio=10))  # both slots hold critical work now
    same = await enqueue(fc, req("std", prio=0))  # equal priority never preempts
    assert fc.pump() == 0
    fc.release(h1)
    assert fc.pump() == 1  # h3 takes the room h1 gave back; `same` still waits
    await settle()
    assert h3.done() and h3.result().preempting and not same.done()
    for t in (h2, h3.result(), *lows):
        fc.release(t)
    assert fc.in_flight == 0 and fc._preempting == 0
    assert fc.pump() == 0  # the pool is still saturated and nothing lower runs: `same` waits
    same.cancel()


async def test_preemption_lets_higher_priority_work_queue_on_servers_as_if_lower_work_were_absent() -> None:
    """Preempted lower-priority requests wait on the replicas and make the pool look saturated; a
    real-time request must still be dispatched while real-time work alone would not saturate the pool
    (batch slots + the queue below queueDepthThreshold), not held in the gateway behind a burst."""
    clock = Clock()
    ds = pool(clock, n=2, waiting=0)
    fc = controller(clock, ds, preemption=True, saturation={"queueDepthThreshold": 3})
    low = await fc.admit(req("batch", prio=-1))
    for ep in ds.endpoints():
        set_metrics(ep, clock, waiting=4)  # preempted batch work waits there: saturated
        ep.metrics.running = 2
    # 2 replicas x (2 slots + 2 queued before saturation) = 8 real-time requests go to the servers.
    rts = [await fc.admit(req("rt", prio=0)) for _ in range(8)]
    assert all(t.preempting and not t.queued for t in rts)
    ninth = await enqueue(fc, req("rt", prio=0))  # real-time work alone would saturate the pool now
    fc.release(rts[0])
    assert fc.pump() == 1
    await settle()
    assert ninth.done()
    for t in (low, *rts[1:], ninth.result()):
        fc.release(t)


async def test_without_preemption_a_high_priority_request_waits_for_capacity() -> None:
    clock = Clock()
    ds = pool(clock, waiting=0)
    fc = controller(clock, ds)
    low = await fc.admit(req("std", prio=0))
    set_metrics(ds.endpoints()[0], clock, waiting=5)
    high = await enqueue(fc, req("crit", prio=10))
    assert fc.pump() == 0
    set_metrics(ds.endpoints()[0], clock, waiting=0)
    assert fc.pump() == 1
    await settle()
    assert not high.result().preempting
    fc.release(low)
    fc.release(high.result())


async def test_request_timeout_header_is_its_queue_deadline() -> None:
    from ingate.request import parse_request

    clock = Clock()
    fc = controller(clock, pool(clock, waiting=5), queue_ttl_s=30)
    body = b'{"model": "m", "prompt": "hi"}'
    r = parse_request("/v1/completions", {"x-gateway-request-timeout-ms": "1500"}, body)
    assert r.timeout_s == 1.5
    t = await enqueue(fc, r)
    clock.t += 1.0
    fc.pump()
    await settle()
    assert not t.done()
    clock.t += 0.6
    fc.pump()
    await settle()
    with pytest.raises(GatewayError) as e:
        t.result()
    assert e.value.status == 503 and "deadline" in e.value.message
    for bad in ("soon", "0", "-5", "nan", "inf"):
        with pytest.raises(GatewayError) as e:
            parse_request("/v1/completions", {"x-gateway-request-timeout-ms": bad}, body)
        assert e.value.status == 400 and "x-gateway-request-timeout-ms" in e.value.message


async def test_scale_from_zero_requests_wait_for_the_first_ready_endpoint() -> None:
    """With no ready endpoint every request waits (sheddable ones too) and is dispatched as soon as
    one is ready; past `noEndpointTtlS` it gets 503 `no_endpoint` with Retry-After and the drop reason."""
    import time as _time

    from ingate.datastore import Datastore, Endpoint
    from ingate.flowcontrol.config import FlowControlConfig
    from ingate.flowcontrol.controller import FlowController
    from ingate.request import parse_request

    ds = Datastore([])
    fc = FlowController(FlowControlConfig(noEndpointTtlS=0.3, pollIntervalS=0.01), ds)
    await fc.start()
    try:
        body = b'{"model": "m", "prompt": "hi"}'
        normal = asyncio.create_task(fc.admit(parse_request("/v1/completions", {}, body)))
        shed = parse_request("/v1/completions", {}, body)
        shed.priority = -1
        sheddable = asyncio.create_task(fc.admit(shed))
        await asyncio.sleep(0.05)
        assert not normal.done() and not sheddable.done() and fc.queued() == 2
        ep = Endpoint(name="e", host="127.0.0.1", port=1)
        ep.metrics.updated_at = _time.monotonic()
        ds.upsert(ep)  # a pod turned ready and was scraped
        t1, t2 = await asyncio.wait_for(asyncio.gather(normal, sheddable), 2)
        assert t1.queued and t2.queued and fc.queued() == 0
        fc.release(t1)
        fc.release(t2)
        ds.remove(ep.address)  # scaled back to zero
        with pytest.raises(GatewayError) as ei:
            await asyncio.wait_for(fc.admit(parse_request("/v1/completions", {}, body)), 2)
        e = ei.value
        assert e.status == 503 and e.code == "no_endpoint" and "became ready within 0.3 s" in e.message
        assert (
            e.headers()["retry-after"] == "1"
            and e.headers()["x-llm-d-request-dropped-reason"] == "no_endpoint"
        )
    finally:
        await fc.stop()
