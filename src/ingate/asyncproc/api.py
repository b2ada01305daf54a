"""HTTP face of the processor: submit/poll/cancel for clients without a queue, metrics, health.

- ``POST /v1/async/requests``: one request message (llm-d-async fields; ``id`` and ``deadline`` optional:
  a generated id, ``now + default TTL``). 202 ``{"id", "status": "queued"}``; 400 on an invalid message
  (OpenAI-style error body); 409 when the id is already known.
- ``GET /v1/async/requests/{id}``: ``{"id", "status", "result"}`` with status ``queued``, ``in_progress``,
  ``completed`` (``result`` is the llm-d-async result object) or ``dead_lettered`` (``error`` is the last
  error); 404 for an unknown id.
- ``POST /v1/async/requests/{id}/cancel`` (or ``DELETE /v1/async/requests/{id}``): 202; the request ends
  ``CANCELLED`` unless it already has an outcome.
- ``GET /metrics`` (Prometheus), ``GET /healthz``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ingate.asyncproc.backends.base import QueueBackend
from ingate.asyncproc.metrics import AsyncMetrics
from ingate.asyncproc.models import DEFAULT_ENDPOINTS, DEFAULT_MAX_MESSAGE_BYTES, InvalidMessage, validate
from ingate.errors import error_body


def _error(status: int, message: str, code: str) -> web.Response:
    return web.Response(
        status=status, body=error_body(status, message, code), content_type="application/json"
    )


def _json(status: int, doc: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


def build_app(
    backend: QueueBackend,
    metrics: AsyncMetrics | None = None,
    *,
    default_ttl_s: float = 24 * 3600,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    endpoints: frozenset[str] = DEFAULT_ENDPOINTS,
) -> web.Application:
    """The aiohttp application (the caller runs it)."""
    app = web.Application(client_max_size=max_bytes + 1024)

    async def submit(request: web.Request) -> web.Response:
        raw = await request.read()
        if len(raw) > max_bytes:
            return _error(
                413, f"message is {len(raw)} bytes, more than the limit of {max_bytes}", "too_large"
            )
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            return _error(400, f"body is not JSON: {e}", "invalid_json")
        if not isinstance(doc, dict):
            return _error(400, "body must be a JSON object", "invalid_request")
        now = time.time()
        doc.setdefault("id", f"req-{uuid.uuid4().hex}")
        doc.setdefault("created", int(now))
        doc.setdefault("deadline", int(now + default_ttl_s))
        msg = validate(doc, endpoints=endpoints)
        if isinstance(msg, InvalidMessage):
            return _error(400, msg.reason, "invalid_request")
        if msg.deadline <= now:
            return _error(400, "deadline is in the past", "invalid_request")
        if await backend.status(msg.id) is not None:
            return _error(409, f"request id {msg.id!r} already exists", "duplicate_id")
        await backend.submit([msg.encode()])
        return _json(202, {"id": msg.id, "status": "queued"})

    async def get(request: web.Request) -> web.Response:
        rid = request.match_info["id"]
        status = await backend.status(rid)
        if status is None:
            return _error(404, f"unknown request id {rid!r}", "not_found")
        out: dict[str, Any] = {"id": rid, "status": status, "result": None}
        if status == "completed":
            r = await backend.get_result(rid)
            out["result"] = None if r is None else r.to_json()
        elif status == "dead_lettered":
            for d in await backend.dead_letters():
                if d.id == rid:
                    out["error"] = {"message": d.error, "attempts": d.attempts}
        return _json(200, out)

    async def cancel(request: web.Request) -> web.Response:
        rid = request.match_info["id"]
        status = await backend.status(rid)
        if status is None:
            return _error(404, f"unknown request id {rid!r}", "not_found")
        if status in ("completed", "dead_lettered"):
            return _json(200, {"id": rid, "status": status})
        await backend.cancel(rid)
        return _json(202, {"id": rid, "status": "cancelling"})

    async def prom(request: web.Request) -> web.Response:
        text = generate_latest(metrics.registry) if metrics is not None else b""
        return web.Response(body=text, headers={"content-type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_post("/v1/async/requests", submit)
    app.router.add_get("/v1/async/requests/{id}", get)
    app.router.add_post("/v1/async/requests/{id}/cancel", cancel)
    app.router.add_delete("/v1/async/requests/{id}", cancel)
    app.router.add_get("/metrics", prom)
    app.router.add_get("/healthz", healthz)
    return app
