"""Real Envoy + the real gateway (config, director, scheduler) over ext_proc + `ingate sim` replicas.

Checks what a user of `ingate serve --proxy envoy` relies on: Envoy sends each request where the picker
says, SSE streams pass through intact, a too-large body gets a clear 413, and with the picker gone
FailOpen keeps serving (round robin over the pool) while FailClose answers 503.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from ingate.config import GatewayConfig
from ingate.dataplane.envoy_bootstrap import HDR_UPSTREAM_DEBUG
from ingate.dataplane.factory import make_dataplane
from ingate.gateway import Gateway
from ingate.lifecycle import ResponseInfo
from ingate.sim.fleet import SimFleetConfig, start_fleet
from ingate.sim.profiles import get_profile
from ingate.sim.server import ReplicaConfig

pytestmark = pytest.mark.e2e
TIMEOUT = aiohttp.ClientTimeout(total=20)


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


@pytest.fixture
async def slow_replica() -> AsyncIterator[list[str]]:
    """One replica that streams a token every 20 ms (a 200-token answer takes about 4 s)."""
    cfg = SimFleetConfig(
        replicas=1,
        profiles=["null"],
        replica=ReplicaConfig(profile=get_profile("null"), model="m", stream_interval_ms=20),
    )
    async with start_fleet(cfg) as fleet:
        yield fleet.addresses


def _record_finishes(gw: Gateway) -> list[ResponseInfo]:
    """Every call the data plane makes to `director.finish` (the director ignores repeats itself, so
    counting calls is what shows the picker reports each request exactly once)."""
    calls: list[ResponseInfo] = []
    real = gw.director.finish

    def finish(d: Any, info: ResponseInfo) -> None:
        calls.append(info)
        real(d, info)

    gw.director.finish = finish  # type: ignore[method-assign]
    return calls


async def _calls(calls: list[ResponseInfo], n: int, quiet_s: float = 1.5) -> list[ResponseInfo]:
    """Wait (bounded) for `n` reports, then `quiet_s` more, long enough for any late second report
    (the picker's linger and Envoy's observer close are shorter)."""
    for _ in range(250):
        if len(calls) >= n:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(quiet_s)
    return calls


async def _gateway(
    addrs: list[str], mode: str, max_body: int | None = None, **opts: Any
) -> tuple[Any, Gateway]:
    """The real gateway (config, director, scheduler, scraper) behind Envoy, as `ingate serve` builds it."""
    cfg = GatewayConfig.model_validate(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "pool": {"name": "e2e", "endpoints": [{"address": a} for a in addrs]},
            "models": {"served": ["m"]},
            "proxy": {"maxBodyBytes": max_body or 16 * 1024 * 1024},
            "dataplane": {
                "type": "envoy",
                "failureMode": mode,
                "options": {"debugHeaders": True, "messageTimeoutS": 5, **opts},
            },
        }
    )
    gw = Gateway(cfg)
    await gw.start()
    dp = make_dataplane(gw, "envoy", 0)
    try:
        await dp.start()
    except BaseException:
        await gw.stop()
        raise
    return dp, gw


async def _stop(dp: Any, gw: Gateway) -> None:
    try:
        await dp.stop()
    finally:
        await gw.stop()


async def _settled(gw: Gateway) -> bool:
    """True once every request's in-flight accounting was released (finish ran exactly once each)."""
    for _ in range(100):
        if all(ep.in_flight == 0 for ep in gw.datastore.endpoints()):
            return True
        await asyncio.sleep(0.02)
    return False


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.exists() else []


async def _access_log(path: Path, n: int) -> list[dict[str, Any]]:
    """Envoy's JSON access log once it has `n` lines (Envoy flushes it every second)."""
    for _ in range(100):
        lines = await asyncio.to_thread(_lines, path)
        if len(lines) >= n:
            return [orjson.loads(x) for x in lines]
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path}: fewer than {n} lines after 5 s")


async def test_routing_follows_the_picker_and_streams_through(replicas: list[str], tmp_path: Path) -> None:
    log = tmp_path / "access.jsonl"
    dp, gw = await _gateway(replicas, "FailClose", accessLog=str(log))
    served_by: list[str] = []
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
                        served_by.append(dest)
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
            assert await _settled(gw)  # every routed request released its in-flight slot once
            async with http.post(dp.url + "/v1/completions", json={"model": "unknown", "prompt": "x"}) as r:
                assert r.status == 404
                assert (await r.json())["error"]["code"] == "model_not_found"
            async with http.get(dp.url + "/v1/models") as r:  # headers only: any endpoint
                assert r.status == 200
        assert await _settled(gw)
        assert all(ep.in_flight == 0 for ep in gw.datastore.endpoints())
        # The access log has one line per request, in order, naming the endpoint the picker chose and
        # timing the picker's decision.
        lines = await _access_log(log, 11)
        routed = lines[:8]
        assert [x["endpoint"] for x in routed] == served_by
        assert all(x["status"] == 200 and x["upstream_host"] == x["endpoint"] for x in routed)
        assert all(x["decision_us"] > 0 and float(x["picker_body_us"]) > 0 for x in routed)
        assert lines[8]["path"] == "/v1/completions" and lines[8]["status"] == 200  # the stream
        assert lines[9]["status"] == 404 and lines[9]["endpoint"] is None  # refused by the picker
        assert lines[10]["path"] == "/v1/models"
    finally:
        await _stop(dp, gw)


async def test_body_over_limit_is_413(replicas: list[str]) -> None:
    dp, gw = await _gateway(replicas, "FailClose", max_body=10_000)
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
        await _stop(dp, gw)


@pytest.mark.parametrize("mode", ["FailOpen", "FailClose"])
async def test_picker_down(replicas: list[str], mode: str) -> None:
    dp, gw = await _gateway(replicas, mode)
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
            errors = []
            for i in range(6):
                async with http.post(dp.url + "/v1/completions", json={"model": "m", "prompt": f"p{i}"}) as r:
                    statuses.append(r.status)
                    body = await r.read()
                    assert "x-gateway-destination-endpoint-served" not in r.headers
                    if r.status == 200:
                        upstreams.add(r.headers[HDR_UPSTREAM_DEBUG])
                    else:
                        assert r.headers["content-type"] == "application/json"
                        errors.append(orjson.loads(body)["error"]["code"])
        if mode == "FailOpen":
            assert statuses == [200] * 6
            assert len(upstreams) == 3  # plain round robin over the pool
        else:
            assert statuses == [503] * 6
            assert errors == ["picker_unavailable"] * 6  # OpenAI-style JSON body, not Envoy's empty one
    finally:
        await _stop(dp, gw)


async def test_failopen_pool_follows_the_pool_at_runtime(replicas: list[str]) -> None:
    """With the picker down, FailOpen round robin uses the *current* pool: an endpoint removed from
    the pool (discovery) stops receiving requests and comes back when it is re-added."""
    dp, gw = await _gateway(replicas, "FailOpen", poolRefreshS=0.1)
    try:
        await dp.grpc.stop(0)

        async def upstreams(n: int) -> set[str]:
            seen = set()
            for i in range(n):
                async with http.post(dp.url + "/v1/completions", json={"model": "m", "prompt": f"q{i}"}) as r:
                    await r.read()
                    if r.status == 200:
                        seen.add(r.headers[HDR_UPSTREAM_DEBUG])
            return seen

        async def settle(want: set[str]) -> set[str]:
            got: set[str] = set()
            for _ in range(60):  # bounded: the pool file is rewritten every 0.1 s, Envoy reloads it
                got = await upstreams(6)
                if got == want:
                    break
                await asyncio.sleep(0.1)
            return got

        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            assert await settle(set(replicas)) == set(replicas)
            gone = gw.datastore.get(replicas[0])
            assert gone is not None
            gw.datastore.remove(replicas[0])
            assert await settle(set(replicas[1:])) == set(replicas[1:])
            gw.datastore.upsert(gone)
            assert await settle(set(replicas)) == set(replicas)
    finally:
        await _stop(dp, gw)


async def test_envoy_is_restarted_after_a_crash(replicas: list[str]) -> None:
    dp, gw = await _gateway(replicas, "FailClose")
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
        await _stop(dp, gw)
    assert dp.envoy.proc is not None and dp.envoy.proc.returncode is not None


async def test_request_only_processing_still_routes_and_releases(replicas: list[str]) -> None:
    dp, gw = await _gateway(replicas, "FailClose", responseProcessing="none")
    calls = _record_finishes(gw)
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            body = {"model": "m", "prompt": "hello", "stream": True, "max_tokens": 3}
            async with http.post(dp.url + "/v1/completions", json=body) as r:
                assert r.status == 200
                # Envoy adds the served header itself, so it is there without response processing too.
                assert r.headers["x-gateway-destination-endpoint-served"] == r.headers[HDR_UPSTREAM_DEBUG]
                assert (await r.read()).endswith(b"data: [DONE]\n\n")
        assert await _settled(gw)  # released when Envoy closes the ext_proc stream
        assert len(await _calls(calls, 1)) == 1
    finally:
        await _stop(dp, gw)


@pytest.mark.parametrize("responses", ["observe", "full"])
async def test_feedback_from_the_response_once_per_request(replicas: list[str], responses: str) -> None:
    """TTFT and usage reach the director from the streamed SSE response, once per request, in the
    default mode (the response on an observability-mode filter) as in full processing."""
    dp, gw = await _gateway(replicas, "FailClose", responseProcessing=responses)
    calls = _record_finishes(gw)
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            body = {
                "model": "m",
                "prompt": "count to five",
                "stream": True,
                "max_tokens": 5,
                "stream_options": {"include_usage": True},
            }
            async with http.post(dp.url + "/v1/completions", json=body) as r:
                assert r.status == 200
                served = r.headers["x-gateway-destination-endpoint-served"]
                assert served == r.headers[HDR_UPSTREAM_DEBUG]
                assert (await r.read()).endswith(b"data: [DONE]\n\n")
            await _calls(calls, 1, quiet_s=0.0)  # its finish runs after its last chunk was seen
            seen = {ep.address: ep.steps.last_chunk_at for ep in gw.datastore.endpoints()}
            async with http.post(dp.url + "/v1/completions", json={"model": "m", "prompt": "one"}) as r:
                assert r.status == 200
                assert (await r.json())["usage"]["prompt_tokens"] > 0
        got = await _calls(calls, 2)
        # Every chunk of the streamed answer was timed on its endpoint (the latency model's step
        # phase); the plain answer's body is no engine step and timed nothing.
        assert seen[served] > 0
        assert {ep.address: ep.steps.last_chunk_at for ep in gw.datastore.endpoints()} == seen
        assert len(got) == 2
        streamed, plain = got
        assert (streamed.status, streamed.completion_tokens) == (200, 5)
        assert streamed.prompt_tokens is not None and streamed.prompt_tokens > 0
        assert streamed.ttft_s is not None and streamed.e2e_s is not None
        assert 0 < streamed.ttft_s <= streamed.e2e_s
        assert plain.status == 200 and plain.prompt_tokens is not None and plain.prompt_tokens > 0
        assert await _settled(gw)
        assert dp.servicer.pending == 0
    finally:
        await _stop(dp, gw)


async def test_client_gone_mid_stream_is_released_once_as_cut_off(slow_replica: list[str]) -> None:
    """The client leaves after the first token: Envoy ends the HTTP stream, the request is released
    exactly once, reported as cut off (499), and nothing is left pending in the picker."""
    dp, gw = await _gateway(slow_replica, "FailClose")
    calls = _record_finishes(gw)
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            body = {"model": "m", "prompt": "a long story", "stream": True, "max_tokens": 200}
            r = await http.post(dp.url + "/v1/completions", json=body)
            assert r.status == 200
            assert (await r.content.readany()).startswith(b"data: ")
            assert gw.datastore.endpoints()[0].in_flight == 1
            r.close()  # drops the connection mid-stream
        got = await _calls(calls, 1)
        assert len(got) == 1
        assert got[0].status == 499 and got[0].ttft_s is not None
        assert await _settled(gw)
        assert dp.servicer.pending == 0
    finally:
        await _stop(dp, gw)
