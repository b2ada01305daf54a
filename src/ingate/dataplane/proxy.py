"""The built-in asyncio data plane: an OpenAI-API HTTP proxy around the director (aiohttp).

Streams responses through as they arrive (no buffering), forwards status codes and bodies faithfully,
retries on a fallback endpoint when a connection is refused before any byte reached the client, turns a
client disconnect into a cancelled upstream request, and answers its own errors OpenAI-style.

It talks to the picker only through `ingate.lifecycle.DirectorLike` (the seam the Envoy data plane
uses too), plus a readiness check, a metrics registry and the model list.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ingate.config import ProxyConfig
from ingate.dataplane.admin import capacity_route
from ingate.dataplane.base import PickerCore
from ingate.errors import GatewayError
from ingate.lifecycle import Decision, DirectorLike, ResponseInfo
from ingate.request import HDR_DESTINATION_SERVED, HDR_REQUEST_ID, INFERENCE_PATHS
from ingate.telemetry import get_logger, kv
from ingate.usage import USAGE_TAIL, parse_usage_tail

log = get_logger("ingate.proxy")

# Hop-by-hop and length headers are the proxy's own business (RFC 9110 7.6.1).
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
        "host",
    }
)
_CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, ConnectionResetError)


def _error_response(e: GatewayError) -> web.Response:
    return web.Response(status=e.status, body=e.body(), headers=e.headers())


class BuiltinProxy:
    """Serves a director on one HTTP port (`BuiltinProxy.serving(gateway)` wires a whole gateway)."""

    def __init__(
        self,
        director: DirectorLike,
        settings: ProxyConfig,
        host: str,
        port: int,
        *,
        ready: Callable[[], bool] = lambda: True,
        registry: CollectorRegistry | None = None,
        models: Callable[[], list[dict[str, Any]]] = list,
        capacity: Callable[[Iterable[int]], dict[str, Any]] | None = None,
    ) -> None:
        self.director = director
        self.host = host
        self.port = port
        self._ready_check = ready
        self._registry = registry
        self._model_list = models
        self._capacity = capacity
        p = settings
        self._timeout = aiohttp.ClientTimeout(total=p.request_timeout_s, connect=p.connect_timeout_s)
        self._retries = p.retries
        self._max_body = p.max_body_bytes
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    @classmethod
    def serving(cls, core: PickerCore, host: str | None = None, port: int | None = None) -> BuiltinProxy:
        """The proxy for a gateway core, on `host`/`port` or its config's `listen` address."""
        cfg = core.config
        return cls(
            core.director,
            cfg.proxy,
            cfg.listen.host if host is None else host,
            cfg.listen.port if port is None else port,
            ready=core.ready,
            registry=core.registry,
            models=core.director.models,
            capacity=core.capacity,
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def app(self) -> web.Application:
        # Bodies over the limit are refused by our own check with a JSON 413, not aiohttp's text one.
        app = web.Application(client_max_size=self._max_body + 1)
        for path in INFERENCE_PATHS:
            app.router.add_post(path, self._inference)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        if self._capacity is not None:
            app.router.add_get("/v1/capacity", capacity_route(self._capacity))
        return app

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30),
            auto_decompress=False,
        )
        # handler_cancellation: a client disconnect cancels the handler, which closes the upstream request.
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=2048)
        await site.start()
        sockets = getattr(site._server, "sockets", None)
        if sockets:
            self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- plain endpoints ------------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _ready(self, request: web.Request) -> web.Response:
        if self._ready_check():
            return web.json_response({"status": "ready"})
        err = GatewayError(503, "no endpoint with fresh metrics yet", "not_ready")
        return _error_response(err)

    async def _metrics(self, request: web.Request) -> web.Response:
        if self._registry is None:
            raise web.HTTPNotFound()
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self._model_list()})

    # -- inference ------------------------------------------------------------------------------------
    async def _inference(self, request: web.Request) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > self._max_body:
            return _error_response(
                GatewayError(413, f"request body exceeds the limit of {self._max_body} bytes", "too_large")
            )
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error_response(
                GatewayError(413, f"request body exceeds the limit of {self._max_body} bytes", "too_large")
            )
        director = self.director
        try:
            decision = await director.handle(request.path, request.headers, raw)
        except GatewayError as e:
            return _error_response(e)
        info = ResponseInfo(status=0)
        try:
            return await self._forward(request, decision, info)
        finally:
            director.finish(decision, info)

    @staticmethod
    def _client_gone(
        upstream: aiohttp.ClientResponse, info: ResponseInfo, resp: web.StreamResponse
    ) -> web.StreamResponse:
        """The client closed its connection: cancel the upstream request and report 499 to learners."""
        upstream.close()
        if info.status < 400:
            info.status = 499
        log.debug(kv(event="client_disconnected_mid_stream"))
        return resp

    async def _forward(self, request: web.Request, d: Decision, info: ResponseInfo) -> web.StreamResponse:
        assert self._session is not None
        director = self.director
        fwd = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        fwd[HDR_REQUEST_ID] = d.request.request_id
        fwd["Content-Type"] = "application/json"
        path = request.path_qs
        attempts = 0
        fresh = False
        while True:
            ep = d.target
            try:
                upstream = await self._session.post(ep.url + path, data=d.upstream_body, headers=fwd)
                break
            except _CONNECT_ERRORS as e:
                if not fresh and not isinstance(e, aiohttp.ClientConnectorError):
                    # A dropped connection (not a refused one) is most often a pooled keep-alive
                    # connection the server closed (e.g. it restarted): once more to the same endpoint,
                    # on a new connection, before calling it down and losing its cache affinity.
                    fresh = True
                    continue
                # Nothing reached the client yet: mark the endpoint down and try the next fallback once.
                ep.healthy = False
                log.warning(kv(event="upstream_connect_failed", endpoint=ep.address, error=type(e).__name__))
                nxt = director.retarget(d) if attempts < self._retries else None
                attempts += 1
                if nxt is None:
                    info.status = 503
                    return _error_response(
                        GatewayError(503, f"model server {ep.address} is unreachable", "upstream_unreachable")
                    )
            except TimeoutError:
                info.status = 504
                return _error_response(
                    GatewayError(504, f"model server {ep.address} did not answer in time", "upstream_timeout")
                )
        info.status = upstream.status
        try:
            headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
            headers[HDR_DESTINATION_SERVED] = ep.address
            resp = web.StreamResponse(status=upstream.status, headers=headers)
            await resp.prepare(request)
            tail = bytearray()  # the response tail, for usage; trimmed in amortised O(chunk)
            first = True
            info.response_bytes = 0
            gaps: list[float] = []
            info.chunk_gaps = gaps
            last = 0.0
            try:
                steps = ep.steps if d.request.stream else None  # a whole answer tells no steps
                async for chunk in upstream.content.iter_any():
                    now = time.monotonic()
                    if steps is not None:
                        steps.chunk(now)  # the engine's step timing, for the latency model
                    if first:
                        director.on_first_token(d)
                        first = False
                    else:
                        gaps.append(now - last)
                    last = now
                    info.response_bytes += len(chunk)
                    await resp.write(chunk)
                    tail += chunk
                    if len(tail) > 2 * USAGE_TAIL:
                        del tail[:-USAGE_TAIL]
            except TimeoutError:
                info.status = 504  # headers already went out: all we can do is end the stream
                log.warning(kv(event="upstream_timeout_mid_stream", endpoint=ep.address))
                return resp
            except aiohttp.ClientPayloadError:
                info.status = 502
                return resp
            except ConnectionResetError:
                # The client went away mid-stream (aiohttp raises this from `write`): not a server error.
                return self._client_gone(upstream, info, resp)
            info.prompt_tokens, info.completion_tokens, info.cached_tokens = parse_usage_tail(
                bytes(tail[-USAGE_TAIL:])
            )
            try:
                await resp.write_eof()
            except ConnectionResetError:
                return self._client_gone(upstream, info, resp)
            return resp
        except BaseException as e:
            upstream.close()  # client gone or failure mid-stream: drop the upstream connection, cancelling it
            if info.status < 400:  # the response did not complete: learners must not count it as a success
                info.status = 499 if isinstance(e, asyncio.CancelledError | ConnectionResetError) else 500
            raise
        finally:
            upstream.release()
