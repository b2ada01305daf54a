"""The picker's admin HTTP port (upstream: the metrics port, 9090), in every serving mode.

- `GET /metrics`: the gateway's Prometheus registry (the same series the built-in proxy serves on its
  own port). With a bearer token configured (`serving.metricsAuthTokenFile`), scrapes must send
  `Authorization: Bearer <token>`; anything else gets 401 (upstream authenticates scrapes against the
  Kubernetes API instead: a deliberate difference, see docs/kubernetes.md).
- `GET /health`: the process is up (200).
- `GET /ready`: 200 when the picker can route (the same check as the built-in proxy's `/ready`),
  else 503 with an OpenAI-style error body.
- `GET /v1/capacity`: the pool's free capacity per priority band (docs/async.md), what `ingate async`
  dispatches into.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ingate.errors import GatewayError


class AdminServer:
    """Serves metrics, liveness and readiness on one HTTP port."""

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        host: str = "0.0.0.0",
        port: int = 9090,
        *,
        bearer_token: str | None = None,
        authorize: Callable[[str | None], Awaitable[tuple[int, str]]] | None = None,
        capacity: Callable[[Iterable[int]], dict[str, Any]] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.registry = registry
        self.ssl_context = ssl_context
        """HTTPS (`--metrics-cert-dir`, optionally client certificates: `--metrics-client-ca-file`)."""
        self.ready = ready
        self.host = host
        self.port = port
        self._token = bearer_token.encode() if bearer_token else None
        self._authorize = authorize
        """Kubernetes mode (`--metrics-endpoint-auth`): the scrape's Authorization header -> (status,
        message), a TokenReview and a SubjectAccessReview as upstream does."""
        self._capacity = capacity
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        if self._capacity is not None:
            app.router.add_get("/v1/capacity", capacity_route(self._capacity))
        return app

    async def start(self) -> int:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        sockets = getattr(site._server, "sockets", None)
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        if self._authorize is not None:
            status, message = await self._authorize(request.headers.get("Authorization"))
            if status != 200:
                code = {401: "unauthorized", 403: "forbidden"}.get(status, "auth_unavailable")
                err = GatewayError(status, message or "metrics access denied", code)
                return web.Response(status=status, body=err.body(), headers=err.headers())
        if self._token is not None:
            got = request.headers.get("Authorization", "")
            if not got.startswith("Bearer ") or not hmac.compare_digest(got[7:].encode(), self._token):
                err = GatewayError(401, "metrics need a valid bearer token", "unauthorized")
                return web.Response(status=401, body=err.body(), headers=err.headers())
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _ready(self, request: web.Request) -> web.Response:
        if self.ready():
            return web.json_response({"status": "ready"})
        err = GatewayError(503, "no endpoint with fresh metrics yet", "not_ready")
        return web.Response(status=503, body=err.body(), headers=err.headers())


def capacity_route(
    capacity: Callable[[Iterable[int]], dict[str, Any]],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """`GET /v1/capacity[?priority=P...]`: the pool's free capacity document as JSON."""

    async def handle(request: web.Request) -> web.Response:
        extra = [int(p) for p in request.query.getall("priority", []) if p.lstrip("-").isdigit()]
        return web.Response(body=orjson.dumps(capacity(extra)), content_type="application/json")

    return handle
