"""Start an aiohttp app on an ephemeral loopback port, for unit tests that need a real HTTP peer.

A plain module (not a conftest: tests/e2e imports its conftest by name, so a second one would clash).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def start_app(app: web.Application) -> tuple[web.AppRunner, int]:
    """Serve `app` on 127.0.0.1 (a free port); the caller stops it with `await runner.cleanup()`."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]


@asynccontextmanager
async def completions_server(handler: Handler) -> AsyncIterator[str]:
    """Serve `handler` as POST /v1/completions on loopback; yields the endpoint's URL."""
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner, port = await start_app(app)
    try:
        yield f"http://127.0.0.1:{port}/v1/completions"
    finally:
        await runner.cleanup()
