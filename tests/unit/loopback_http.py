"""Start an aiohttp app on an ephemeral loopback port, for unit tests that need a real HTTP peer, and
stream OpenAI-style completions from it.

The unit tests' shared helpers live here, a plain module, rather than in a second conftest: tests/e2e
imports its conftest by name (`from conftest import ...`), so another module named conftest would clash.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import orjson
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


async def stream_completion(
    request: web.Request, tokens: int, usage: dict[str, object], delay_s: float
) -> web.StreamResponse:
    """Answer with an SSE completion of `tokens` chunks `delay_s` apart, then a usage chunk and
    `[DONE]`, the way vLLM streams with `include_usage`."""
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    for _ in range(tokens):
        await asyncio.sleep(delay_s)
        await resp.write(b'data: {"choices":[{"index":0,"text":"the "}],"usage":null}\n\n')
    await resp.write(b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    return resp
