"""Real Envoy + ingate's ext_proc picker + `ingate sim` replicas on loopback.

Checks what a user of `ingate serve --proxy envoy` relies on: Envoy sends each request where the picker
says, SSE streams pass through intact, a too-large body gets a clear 413, and with the picker gone
FailOpen keeps serving (round robin over the pool) while FailClose answers 503.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest

from ingate.dataplane.envoy import HDR_UPSTREAM_DEBUG, EnvoyDataPlane, EnvoySettings
from ingate.datastore import Datastore, Endpoint
from ingate.errors import GatewayError
from ingate.request import parse_request
from ingate.scheduling.config import SchedulerConfig
from ingate.scheduling.scheduler import Scheduler, build_scheduler
from ingate.sim.fleet import SimFleetConfig, start_fleet
from ingate.sim.profiles import get_profile
from ingate.sim.server import ReplicaConfig

pytestmark = pytest.mark.e2e
TIMEOUT = aiohttp.ClientTimeout(total=20)


@dataclass
class _Decision:
    target: Endpoint
    upstream_body: bytes
    request: Any


@dataclass
class _SchedulingDirector:
    """Director stand-in until `ingate.director.Director` lands: the real request parser and the real
    scheduler (default profile: prefix affinity + load scorers) over the replicas."""

    addresses: list[str]
    finished: list[Any] = field(default_factory=list)
    scheduler: Scheduler = field(init=False)

    def __post_init__(self) -> None:
        eps = []
        for i, addr in enumerate(self.addresses):
            host, port = addr.rsplit(":", 1)
            eps.append(Endpoint(f"sim-{i}", host, int(port)))
        self.scheduler = build_scheduler(SchedulerConfig(), Datastore(eps))

    async def handle(self, path: str, headers: Mapping[str, str], raw_body: bytes) -> _Decision:
        req = parse_request(path, headers, raw_body)
        if req.model == "unknown":
            raise GatewayError(404, "model 'unknown' is not served", "model_not_found")
        result, _ = self.scheduler.schedule(req)
        return _Decision(result.target, req.body_for_upstream(), req)

    def on_first_token(self, decision: Any) -> None:
        pass

    def finish(self, decision: Any, info: Any) -> None:
        self.finished.append(info)


@pytest.fixture
async def replicas() -> AsyncIterator[list[str]]:
    """Three `ingate sim` replicas with the near-free profile (model "m")."""
    cfg = SimFleetConfig(
        replicas=3,
        profiles=["null"],
        replica=ReplicaConfig(profile=get_profile("null"), model="m"),
    )
    async with start_fleet(cfg) as fleet:
        yield fleet.addresses


async def _gateway(addrs: list[str], mode: str, **kw: Any) -> tuple[EnvoyDataPlane, _SchedulingDirector]:
    d = _SchedulingDirector(addrs)
    s = EnvoySettings(pool=addrs, failure_mode=mode, debug_headers=True, message_timeout_s=5, **kw)  # type: ignore[arg-type]
    dp = EnvoyDataPlane(d, s, info_factory=lambda dec, o: o)
    await dp.start()
    return dp, d


async def test_routing_follows_the_picker_and_streams_through(replicas: list[str]) -> None:
    dp, d = await _gateway(replicas, "FailClose")
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            for prefix in ("You are a helpful travel agent. " * 30, "Answer in French, briefly. " * 30):
                served = set()
                for q in range(4):
                    body = {"model": "m", "prompt": prefix + f"question {q}?"}
                    async with http.post(dp.url + "/v1/completions", json=body) as r:
                        assert r.status == 200
                        dest = r.headers["x-gateway-destination-endpoint-served"]
                        assert r.headers[HDR_UPSTREAM_DEBUG] == dest  # Envoy went where the picker said
                        assert (await r.json())["usage"]["prompt_tokens"] > 20
                        served.add(dest)
                assert len(served) == 1  # same long prefix, same replica (prefix affinity through Envoy)
            body = {
                "model": "m",
                "prompt": "stream me",
                "stream": True,
                "max_tokens": 5,
                "stream_options": {"include_usage": True},
            }
            async with http.post(dp.url + "/v1/completions", json=body) as r:
                assert r.status == 200
                text = (await r.read()).decode()
            events = [ln[6:] for ln in text.split("\n") if ln.startswith("data: ")]
            assert events[-1] == "[DONE]" and orjson.loads(events[-2])["usage"]["completion_tokens"] == 5
            for _ in range(100):  # the picker accounts the end just after Envoy forwards the last chunk
                if len(d.finished) == 9:
                    break
                await asyncio.sleep(0.02)
            assert [(o.status, o.error) for o in d.finished] == [(200, None)] * 9, [
                (o.error, o.body_bytes) for o in d.finished
            ]
            assert d.finished[-1].completion_tokens == 5 and d.finished[-1].first_token_at is not None
            async with http.post(dp.url + "/v1/completions", json={"model": "unknown", "prompt": "x"}) as r:
                assert r.status == 404
                assert (await r.json())["error"]["code"] == "model_not_found"
            async with http.get(dp.url + "/v1/models") as r:  # headers only: any endpoint
                assert r.status == 200
        assert len(d.finished) == 9  # one per decided request (not the 404, not the headers-only GET)
    finally:
        await dp.stop()


async def test_body_over_limit_is_413(replicas: list[str]) -> None:
    dp, _d = await _gateway(replicas, "FailClose", max_body_bytes=10_000)
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            big = {"model": "m", "prompt": "x" * 20_000}
            async with http.post(dp.url + "/v1/completions", json=big) as r:
                assert r.status == 413
                err = (await r.json())["error"]
                assert err["code"] == "too_large" and "10000" in err["message"]
            async with http.post(dp.url + "/v1/completions", json={"model": "m", "prompt": "ok"}) as r:
                assert r.status == 200
    finally:
        await dp.stop()


@pytest.mark.parametrize("mode", ["FailOpen", "FailClose"])
async def test_picker_down(replicas: list[str], mode: str) -> None:
    dp, _ = await _gateway(replicas, mode)
    try:
        await dp.grpc.stop(0)  # the picker dies; Envoy keeps running
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            if mode == "FailOpen":
                # Requests fail open once Envoy's health check has seen the picker down (documented
                # detection window: picker_health_interval_s); wait for it, bounded.
                for _ in range(100):
                    async with http.post(dp.url + "/v1/completions", json={"model": "m", "prompt": "w"}) as r:
                        await r.read()
                        if r.status == 200:
                            break
                    await asyncio.sleep(0.05)
            statuses = []
            upstreams = set()
            for i in range(6):
                async with http.post(dp.url + "/v1/completions", json={"model": "m", "prompt": f"p{i}"}) as r:
                    statuses.append(r.status)
                    await r.read()
                    assert "x-gateway-destination-endpoint-served" not in r.headers
                    if r.status == 200:
                        upstreams.add(r.headers[HDR_UPSTREAM_DEBUG])
        if mode == "FailOpen":
            assert statuses == [200] * 6
            assert len(upstreams) == 3  # plain round robin over the pool
        else:
            assert statuses == [503] * 6
    finally:
        await dp.stop()


async def test_envoy_is_restarted_after_a_crash(replicas: list[str]) -> None:
    dp, _ = await _gateway(replicas, "FailClose")
    try:
        assert dp.envoy is not None and dp.envoy.proc is not None
        url = dp.url
        dp.envoy.proc.kill()
        for _ in range(200):
            if dp.envoy.restarts == 1:
                break
            await asyncio.sleep(0.05)
        assert dp.envoy.restarts == 1 and dp.url == url  # same port after the restart
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            async with http.post(url + "/v1/completions", json={"model": "m", "prompt": "again"}) as r:
                assert r.status == 200
    finally:
        await dp.stop()
    assert dp.envoy.proc is not None and dp.envoy.proc.returncode is not None


async def test_request_only_processing_still_routes_and_releases(replicas: list[str]) -> None:
    dp, d = await _gateway(replicas, "FailClose", response_processing=False)
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            body = {"model": "m", "prompt": "hello", "stream": True, "max_tokens": 3}
            async with http.post(dp.url + "/v1/completions", json=body) as r:
                assert r.status == 200
                assert (await r.read()).endswith(b"data: [DONE]\n\n")
        for _ in range(100):  # Envoy closes the ext_proc stream as the HTTP stream ends
            if d.finished:
                break
            await asyncio.sleep(0.02)
        assert len(d.finished) == 1 and d.finished[0].error is None
    finally:
        await dp.stop()
