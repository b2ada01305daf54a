"""The processor against a real HTTP peer on loopback that answers like a gateway (200, 429, 500, 400,
slow), with the SQLite queue: outcomes, headers, retries, dead letters, cancellation, drain, gating."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import async_backends
import orjson
import pytest
from aiohttp import web
from loopback_http import start_app

from ingate.asyncproc.backends.base import QueueBackend
from ingate.asyncproc.backends.sqlite import SqliteBackend
from ingate.asyncproc.models import CANCELLED, DEADLINE_EXCEEDED, INVALID_REQUEST, AsyncResult
from ingate.asyncproc.processor import Processor, ProcessorConfig

Open = Callable[[], QueueBackend]
# The shared fixtures: the processor tests run on SQLite and on a real redis-server.
redis_url, queue_url, open_queue = (
    async_backends.redis_url,
    async_backends.queue_url,
    async_backends.open_queue,
)


class Gateway:
    """Answers by the prompt: ok, shed-once (429 + Retry-After then 200), fail (500), bad (400), slow."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.calls: Counter[str] = Counter()
        self.release = asyncio.Event()  # ends "slow" requests (at teardown)
        self.capacity: dict[str, Any] = {
            "free_capacity": {"-1": 100},
            "saturated": False,
            "realtime_queued": 0,
        }

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        prompt = body["prompt"]
        self.seen.append((prompt, {k.lower(): v for k, v in request.headers.items()}))
        self.calls[prompt] += 1
        kind = prompt.split(":")[0]
        if kind == "shed-once" and self.calls[prompt] == 1:
            return web.json_response(
                {"error": {"message": "shed", "type": "rate_limit_error", "code": "shed"}},
                status=429,
                headers={"retry-after": "0"},
            )
        if kind == "shed":
            return web.json_response(
                {"error": {"message": "shed", "code": "shed"}}, status=429, headers={"retry-after": "1"}
            )
        if kind == "fail":
            return web.json_response({"error": {"message": "boom", "code": "boom"}}, status=500)
        if kind == "bad":
            return web.json_response(
                {"error": {"message": "no model", "code": "model_not_found"}}, status=400
            )
        if kind == "slow":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await self.release.wait()
        return web.json_response({"choices": [{"text": f"echo {prompt}"}]})

    async def capacity_doc(self, request: web.Request) -> web.Response:
        return web.json_response(self.capacity)


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[Gateway, str]]:
    gw = Gateway()
    app = web.Application()
    app.router.add_post("/v1/completions", gw.handle)
    app.router.add_get("/v1/capacity", gw.capacity_doc)
    runner, port = await start_app(app)
    try:
        yield gw, f"http://127.0.0.1:{port}"
    finally:
        gw.release.set()
        await runner.cleanup()


async def wait_for(cond: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def msg(i: str, prompt: str, *, deadline: float | None = None, **extra: Any) -> bytes:
    return orjson.dumps(
        {"id": i, "deadline": deadline or time.time() + 300, "payload": {"prompt": prompt}, **extra}
    )


def config(url: str, **kw: Any) -> ProcessorConfig:
    base: dict[str, Any] = dict(
        gateway_url=url,
        backoff_base_s=0.02,
        max_attempts=3,
        poll_interval_s=0.02,
        lease_s=5,
        exit_when_empty=True,
    )
    base.update(kw)
    return ProcessorConfig(**base)


async def outcomes(q: QueueBackend) -> dict[str, AsyncResult]:
    return {r.id: r async for r in q.results()}


async def test_every_message_gets_exactly_one_outcome(open_queue: Open, gateway: tuple[Gateway, str]) -> None:
    gw, url = gateway
    q = open_queue()
    bodies = [msg(f"ok{i}", f"ok:{i}", metadata={"userid": "alice"}) for i in range(20)]
    bodies += [
        b"{not json",
        msg("nopayload", "x")[:-1] + b', "payload": "text"}',
        msg("shed", "shed-once:1"),
        msg("fail", "fail:1"),
        msg("bad", "bad:1"),
        msg("expired", "ok:expired", deadline=time.time() - 1),
        msg("cancelled", "ok:cancelled"),
        msg("ok0", "ok:dup"),  # a duplicate id: one result only
    ]
    await q.submit(bodies)
    await q.cancel("cancelled")
    p = Processor(q, config(url))
    try:
        async with asyncio.timeout(20):
            await p.run()
        res = await outcomes(q)
        dead = {d.id: d for d in await q.dead_letters()}
    finally:
        await q.close()
    for i in range(20):
        assert res[f"ok{i}"].status_code == 200
    assert orjson.loads(res["shed"].payload)["choices"][0]["text"] == "echo shed-once:1"  # 429 then retried
    assert gw.calls["shed-once:1"] == 2
    assert res["bad"].status_code == 400 and "model_not_found" in res["bad"].payload  # final, not retried
    assert gw.calls["bad:1"] == 1
    assert res["expired"].error_code == DEADLINE_EXCEEDED and gw.calls["ok:expired"] == 0
    assert res["cancelled"].error_code == CANCELLED and gw.calls["ok:cancelled"] == 0
    assert res["nopayload"].error_code == INVALID_REQUEST and "payload" in res["nopayload"].error_message
    (invalid_no_id,) = [r for k, r in res.items() if k.startswith("invalid-")]
    assert invalid_no_id.error_code == INVALID_REQUEST and "not JSON" in invalid_no_id.error_message
    # 500 three times (max_attempts 3): dead-lettered with the last error, and no result.
    assert "fail" not in res and gw.calls["fail:1"] == 3
    assert dead["fail"].attempts == 3 and "500" in dead["fail"].error and "boom" in dead["fail"].error
    assert len(res) + len(dead) == len(bodies) - 1  # the duplicate id has no second outcome
    assert p.stats["duplicate"] == 1
    # Headers: the objective (both names) and the tenant as fairness id (both names).
    hdrs = next(h for prompt, h in gw.seen if prompt == "ok:0")
    assert hdrs["x-gateway-inference-objective"] == "async" == hdrs["x-llm-d-inference-objective"]
    assert hdrs["x-llm-d-inference-fairness-id"] == "alice" == hdrs["x-gateway-inference-fairness-id"]
    assert hdrs["x-request-id"] == "ok0"


async def test_shed_retries_never_pass_the_deadline(open_queue: Open, gateway: tuple[Gateway, str]) -> None:
    gw, url = gateway
    q = open_queue()
    deadline = time.time() + 2.5
    await q.submit([msg("s", "shed:always", deadline=deadline)])
    p = Processor(q, config(url, backoff_base_s=0.2))
    try:
        async with asyncio.timeout(10):
            await p.run()
        r = await q.get_result("s")
    finally:
        await q.close()
    # Shed every time (Retry-After 1 s, clamped to half the time left): retried while time was left, then
    # answered DEADLINE_EXCEEDED with the last answer, never dead-lettered (a shed is not a failure).
    assert r is not None and r.error_code == DEADLINE_EXCEEDED and "429" in r.error_message
    assert 2 <= gw.calls["shed:always"] <= 8
    assert p.stats["retried_shed"] == gw.calls["shed:always"] - 1
    assert time.time() < deadline + 1.0


async def test_cancel_in_flight_and_graceful_drain_requeues(
    open_queue: Open, gateway: tuple[Gateway, str]
) -> None:
    gw, url = gateway
    q = open_queue()
    await q.submit([msg("c", "slow:c"), msg("d1", "slow:d1"), msg("d2", "slow:d2")])
    p = Processor(q, config(url, exit_when_empty=False, cancel_check_s=0.05, grace_s=0.3))
    run = asyncio.create_task(p.run())
    try:
        async with asyncio.timeout(10):

            async def all_in_flight() -> bool:
                return len(gw.calls) == 3  # all three reached the gateway

            await wait_for(all_in_flight)
            await q.cancel("c")

            async def cancelled() -> bool:
                return await q.get_result("c") is not None

            await wait_for(cancelled)
            p.stop()  # SIGTERM: the two slow ones cannot finish within the grace period
            await run
        r = await q.get_result("c")
        assert r is not None and r.error_code == CANCELLED
        assert p.stats["requeued"] == 2
        # Back on the queue at once, no attempt counted.
        got = await q.claim(10, 5)
        assert sorted(orjson.loads(d.body)["id"] for d in got) == ["d1", "d2"]
        assert all(d.attempts == 0 for d in got)
    finally:
        run.cancel()
        await q.close()


async def test_capacity_signal_gates_dispatch(open_queue: Open, gateway: tuple[Gateway, str]) -> None:
    gw, url = gateway
    gw.capacity = {"free_capacity": {"0": 5, "-1": 0}, "saturated": False, "realtime_queued": 0}
    q = open_queue()
    await q.submit([msg(f"g{i}", f"ok:g{i}") for i in range(5)])
    p = Processor(q, config(url, capacity_url=url + "/v1/capacity", capacity_interval_s=0.02))
    run = asyncio.create_task(p.run())
    try:
        await asyncio.sleep(0.5)
        assert not gw.calls  # no headroom for band -1: nothing sent
        gw.capacity = {"free_capacity": {"-1": 2}, "saturated": False, "realtime_queued": 0}
        async with asyncio.timeout(10):
            await run
        assert len(await outcomes(q)) == 5
    finally:
        run.cancel()
        await q.close()


def test_signal_congestion_shrinks_the_window() -> None:
    p = Processor(
        SqliteBackend(":memory:"), ProcessorConfig(gateway_url="http://127.0.0.1:1", initial_window=16)
    )
    p.window.in_flight = 4
    p.apply_signal({"free_capacity": {"-1": 3}, "saturated": False, "realtime_queued": 2})
    assert p.window.limit == 8 and p.window.headroom == 3  # real-time traffic queued: halve at once
    p.apply_signal({"free_capacity": {"-1": 9}})
    assert p.window.limit == 8 and p.window.headroom == 9
    p.apply_signal({"free_capacity": {"-1": 9}, "free_slots": 2})
    assert p.window.headroom == 2  # only into batch slots free now
    p.config.reserve_slots = 3  # three free slots stay for real-time arrivals
    p.apply_signal({"free_capacity": {"-1": 9}, "free_slots": 5})
    assert p.window.headroom == 2
    p.apply_signal({"free_capacity": {"-1": 9}, "free_slots": 2})
    assert p.window.headroom == 0
    p.config.slots_only = False
    p.apply_signal({"free_capacity": {"-1": 9}, "free_slots": 2})
    assert p.window.headroom == 9


def test_llm_d_async_gates_reproduced() -> None:
    def proc(gate: str) -> Processor:
        cfg = ProcessorConfig(
            gateway_url="http://127.0.0.1:1", gate=gate, capacity_url="http://127.0.0.1:1/c"
        )
        return Processor(SqliteBackend(":memory:"), cfg)

    sat = proc("prometheus-saturation")
    assert sat.window.limit == 64  # a fixed worker pool, no AIMD
    # Closed at saturation >= 0.8; budget 0.8 - saturation below it; 10 per poll at most.
    assert sat.gate_budget({"pool_saturation": 0.0}) == pytest.approx(0.8)
    assert sat.gate_budget({"pool_saturation": 0.5}) == pytest.approx(0.3)
    assert sat.gate_budget({"pool_saturation": 0.8}) == 0.0 and sat.gate_budget(None) == 0.0
    sat.apply_budget_gate({"pool_saturation": 0.5})
    assert sat.window.headroom == 3
    bud = proc("prometheus-budget")
    # D = 1 - queued / (ready x 100), open above the baseline 0.05, budget D - 0.05.
    assert bud.gate_budget({"ready_endpoints": 2, "queued": {"0": 0}}) == pytest.approx(0.95)
    assert bud.gate_budget({"ready_endpoints": 2, "queued": {"0": 150, "-1": 0}}) == pytest.approx(0.2)
    assert bud.gate_budget({"ready_endpoints": 2, "queued": {"0": 195}}) == 0.0
    assert bud.gate_budget({"ready_endpoints": 0, "queued": {}}) == 0.0  # no data: fails closed
    with pytest.raises(ValueError, match="capacity_url"):
        Processor(SqliteBackend(":memory:"), ProcessorConfig(gateway_url="x", gate="prometheus-budget"))
