"""Built-in proxy against tiny in-test upstreams: pass-through, failover, timeouts, limits, side routes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from loopback_http import start_app

from ingate.config import parse_config
from ingate.dataplane.proxy import BuiltinProxy
from ingate.gateway import Gateway

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _upstream(handler: Handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner, port = await start_app(app)
    return runner, f"127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def _gateway(addresses: list[str], **extra: Any) -> AsyncIterator[tuple[Gateway, BuiltinProxy]]:
    cfg = parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "pool": {"endpoints": [{"address": a} for a in addresses]},
            "models": {"served": ["m"], "adapters": ["lora-a"]},
            "scheduler": {"defaultProfile": "round-robin"},
            "dataplane": {"type": "builtin"},
            **extra,
        }
    )
    gw = Gateway(cfg)  # scraper not started: these tests exercise the proxy, not the metrics
    proxy = BuiltinProxy.serving(gw)
    await proxy.start()
    try:
        yield gw, proxy
    finally:
        await proxy.stop()


BODY = {"model": "m", "prompt": "hi", "max_tokens": 2}


async def test_error_status_and_body_pass_through() -> None:
    async def bad(_: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "too long", "code": 400}}, status=400)

    runner, addr = await _upstream(bad)
    try:
        async with _gateway([addr]) as (gw, proxy):
            async with aiohttp.ClientSession() as s, s.post(proxy.url + "/v1/completions", json=BODY) as r:
                assert r.status == 400
                assert (await r.json())["error"]["message"] == "too long"
                assert r.headers["x-gateway-destination-endpoint-served"] == addr
            assert all(ep.in_flight == 0 for ep in gw.datastore.endpoints())
    finally:
        await runner.cleanup()


async def test_refused_connection_fails_over_then_503() -> None:
    async def ok(_: web.Request) -> web.StreamResponse:
        return web.json_response({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    runner, addr = await _upstream(ok)
    dead = f"127.0.0.1:{_free_port()}"
    try:
        async with _gateway([dead, addr]) as (gw, proxy):
            async with aiohttp.ClientSession() as s:
                for _ in range(4):  # round robin starts on each endpoint at least once
                    async with s.post(proxy.url + "/v1/completions", json=BODY) as r:
                        assert r.status == 200
                        assert r.headers["x-gateway-destination-endpoint-served"] == addr
                dead_ep = next(ep for ep in gw.datastore.endpoints() if ep.address == dead)
                assert not dead_ep.healthy
                for ep in gw.datastore.endpoints():
                    ep.healthy = True
                await runner.cleanup()  # now both refuse
                async with s.post(proxy.url + "/v1/completions", json=BODY) as r:
                    assert r.status == 503
                    assert (await r.json())["error"]["code"] == "upstream_unreachable"
            assert all(ep.in_flight == 0 for ep in gw.datastore.endpoints())
    finally:
        await runner.cleanup()


async def test_a_dropped_connection_is_retried_on_the_same_endpoint_before_it_is_called_down() -> None:
    # The first connection is closed without an answer (what a pooled keep-alive connection to a
    # restarted server looks like); the request goes to the same endpoint again on a new connection.
    conns = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal conns
        conns += 1
        head = await reader.readuntil(b"\r\n\r\n")
        if conns == 1:
            writer.close()
            return
        length = next(
            int(ln.split(b":", 1)[1])
            for ln in head.split(b"\r\n")
            if ln.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        body = json.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    addr = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with _gateway([addr]) as (gw, proxy):
            async with aiohttp.ClientSession() as s, s.post(proxy.url + "/v1/completions", json=BODY) as r:
                assert r.status == 200
                assert r.headers["x-gateway-destination-endpoint-served"] == addr
            assert conns == 2
            assert all(ep.healthy and ep.in_flight == 0 for ep in gw.datastore.endpoints())
    finally:
        server.close()
        await server.wait_closed()


async def test_upstream_timeout_before_headers_is_504() -> None:
    async def slow(_: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.json_response({})

    runner, addr = await _upstream(slow)
    try:
        async with _gateway([addr], proxy={"requestTimeoutS": 0.2}) as (gw, proxy):
            async with aiohttp.ClientSession() as s, s.post(proxy.url + "/v1/completions", json=BODY) as r:
                assert r.status == 504
                assert (await r.json())["error"]["type"] == "timeout_error"
            assert gw.datastore.endpoints()[0].in_flight == 0
    finally:
        await runner.cleanup()


async def test_body_limit_model_404_and_side_routes() -> None:
    async def never(_: web.Request) -> web.StreamResponse:
        raise AssertionError("must not be called")

    runner, addr = await _upstream(never)
    try:
        async with _gateway([addr], proxy={"maxBodyBytes": 1000}) as (_gw, proxy):
            async with aiohttp.ClientSession() as s:
                big = {**BODY, "prompt": "x" * 2000}
                async with s.post(proxy.url + "/v1/completions", json=big) as r:
                    assert r.status == 413
                    assert "error" in await r.json()
                async with s.post(proxy.url + "/v1/completions", json={**BODY, "model": "zz"}) as r:
                    assert r.status == 404
                async with s.post(proxy.url + "/v1/completions", data=b"{oops") as r:
                    assert r.status == 400
                async with s.get(proxy.url + "/v1/models") as r:
                    ids = [m["id"] for m in (await r.json())["data"]]
                    assert ids == ["m", "lora-a"]
                async with s.get(proxy.url + "/health") as r:
                    assert r.status == 200
                async with s.get(proxy.url + "/ready") as r:
                    assert r.status == 503  # no metrics scraped in this test
                async with s.get(proxy.url + "/metrics") as r:
                    text = await r.text()
                    assert "inference_objective_request_error_total" in text
                    assert 'inference_pool_ready_pods{name="default-pool"} 1.0' in text
    finally:
        await runner.cleanup()


async def test_stream_chunks_arrive_incrementally() -> None:
    chunks = 3
    gate = asyncio.Event()

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"text":"a"}]}\n\n')
        await asyncio.wait_for(gate.wait(), 5)  # held until the client saw the first chunk
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": chunks}}
        await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp

    runner, addr = await _upstream(sse)
    try:
        async with _gateway([addr]) as (gw, proxy):
            async with aiohttp.ClientSession() as s, s.post(proxy.url + "/v1/completions", json=BODY) as r:
                first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
                assert first.startswith(b"data: ")
                gate.set()
                rest = await r.content.read()
                assert rest.endswith(b"data: [DONE]\n\n")
            text = (await _metrics(proxy)).splitlines()
            assert any(
                ln.startswith("inference_objective_output_tokens_sum") and ln.endswith(f" {chunks}.0")
                for ln in text
            )
            assert gw.datastore.endpoints()[0].in_flight == 0
    finally:
        await runner.cleanup()


async def _metrics(proxy: BuiltinProxy) -> str:
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/metrics") as r:
        return await r.text()


async def test_client_gone_mid_stream_is_499_and_cancels_upstream(caplog: Any) -> None:
    upstream_done = asyncio.Event()
    client_read_first = asyncio.Event()

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await resp.write(b'data: {"choices":[{"text":"a"}]}\n\n')
            await asyncio.wait_for(client_read_first.wait(), 5)
            for _ in range(200):  # keeps streaming until the proxy drops the connection
                await resp.write(b'data: {"choices":[{"text":"b"}]}\n\n')
                await asyncio.sleep(0.01)
        except (ConnectionResetError, asyncio.CancelledError):
            upstream_done.set()
        return resp

    runner, addr = await _upstream(sse)
    try:
        async with _gateway([addr]) as (gw, proxy):
            async with aiohttp.ClientSession() as s:
                r = await s.post(proxy.url + "/v1/completions", json=BODY)
                assert (await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)).startswith(b"data: ")
                r.close()  # the client goes away mid-stream
                client_read_first.set()
            await asyncio.wait_for(upstream_done.wait(), 5)  # the upstream request was cancelled
            for _ in range(100):
                if gw.datastore.endpoints()[0].in_flight == 0:
                    break
                await asyncio.sleep(0.02)
            assert gw.datastore.endpoints()[0].in_flight == 0
            errors = [ln for ln in (await _metrics(proxy)).splitlines() if "request_error_total{" in ln]
            assert any('error_code="499"' in ln and ln.endswith(" 1.0") for ln in errors), errors
            assert not [rec for rec in caplog.records if rec.levelname == "ERROR"]
    finally:
        await runner.cleanup()
