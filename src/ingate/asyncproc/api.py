"""HTTP face of the processor: submit/poll/cancel for clients without a queue, metrics, health.

- ``POST /v1/async/requests``: one request message (llm-d-async fields; ``id`` and ``deadline`` optional:
  a generated id, ``now + default TTL``). 202 ``{"id", "status": "queued"}``; 400 on an invalid message
  (OpenAI-style error body); 409 when the id is already known.
- ``GET /v1/async/requests/{id}``: ``{"id", "status", "result"}`` with status ``queued``, ``in_progress``,
  ``completed`` (``result`` is the llm-d-async result object) or ``dead_lettered`` (``error`` is the last
  error); 404 for an unknown id.
- ``POST /v1/async/requests/{id}/cancel`` (or ``DELETE /v1/async/requests/{id}``): 202; the request ends
  ``CANCELLED`` unless it already has an outcome.
- ``POST /v1/async/batches`` (body: OpenAI Batch input JSONL; ``?deadline_s=`` optional): validates every
  line (400 naming the line otherwise), enqueues them with ids ``<batch id>:<custom_id>``; answers an
  OpenAI-style batch object. ``GET /v1/async/batches/{id}``: the object with request counts;
  ``GET /v1/async/batches/{id}/output``: OpenAI Batch output JSONL of the finished requests.
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
from ingate.asyncproc.batchfile import dead_letter_line, openai_line
from ingate.asyncproc.metrics import AsyncMetrics
from ingate.asyncproc.models import DEFAULT_ENDPOINTS, DEFAULT_MAX_MESSAGE_BYTES, InvalidMessage, validate
from ingate.errors import error_body


def _error(status: int, message: str, code: str) -> web.Response:
    return web.Response(
        status=status, body=error_body(status, message, code), content_type="application/json"
    )


def _json(status: int, doc: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


def _batch_object(m: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
    """An OpenAI Batch-shaped status object."""
    done = counts.get("completed", 0) + counts.get("failed", 0) >= counts["total"]
    return {
        "id": m["id"],
        "object": "batch",
        "status": "completed" if done else "in_progress",
        "created_at": m["created_at"],
        "expires_at": m["deadline"],
        "output_file": f"/v1/async/batches/{m['id']}/output",
        "request_counts": counts,
    }


def build_app(
    backend: QueueBackend,
    metrics: AsyncMetrics | None = None,
    *,
    default_ttl_s: float = 24 * 3600,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    endpoints: frozenset[str] = DEFAULT_ENDPOINTS,
    max_batch_bytes: int = 64 * 1024 * 1024,
) -> web.Application:
    """The aiohttp application (the caller runs it)."""
    app = web.Application(client_max_size=max(max_bytes, max_batch_bytes) + 1024)

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

    async def create_batch(request: web.Request) -> web.Response:
        raw = await request.read()
        if len(raw) > max_batch_bytes:
            return _error(
                413, f"batch is {len(raw)} bytes, more than the limit of {max_batch_bytes}", "too_large"
            )
        now = time.time()
        bid = f"batch_{uuid.uuid4().hex}"
        deadline = int(now + float(request.query.get("deadline_s", default_ttl_s)))
        bodies: list[bytes] = []
        custom_ids: list[str] = []
        seen: set[str] = set()
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                return _error(400, f"line {n}: not JSON: {e}", "invalid_batch")
            cid = doc.get("custom_id") if isinstance(doc, dict) else None
            if not isinstance(cid, str) or not cid:
                return _error(400, f"line {n}: custom_id is required", "invalid_batch")
            if cid in seen:
                return _error(400, f"line {n}: duplicate custom_id {cid!r}", "invalid_batch")
            seen.add(cid)
            msg = {
                "id": f"{bid}:{cid}",
                "created": int(now),
                "deadline": deadline,
                "payload": doc.get("body"),
                "endpoint": doc.get("url") or "/v1/completions",
            }
            checked = validate(msg, endpoints=endpoints)
            if isinstance(checked, InvalidMessage):
                return _error(400, f"line {n}: {checked.reason}", "invalid_batch")
            bodies.append(checked.encode())
            custom_ids.append(cid)
        if not bodies:
            return _error(400, "the batch has no requests", "invalid_batch")
        manifest = {"id": bid, "created_at": int(now), "deadline": deadline, "custom_ids": custom_ids}
        await backend.put_meta(f"batch:{bid}", orjson.dumps(manifest))
        for i in range(0, len(bodies), 500):
            await backend.submit(bodies[i : i + 500])
        return _json(200, _batch_object(manifest, {"total": len(bodies), "completed": 0, "failed": 0}))

    async def _manifest(request: web.Request) -> dict[str, Any] | None:
        raw = await backend.get_meta(f"batch:{request.match_info['id']}")
        return None if raw is None else orjson.loads(raw)

    async def get_batch(request: web.Request) -> web.Response:
        m = await _manifest(request)
        if m is None:
            return _error(404, f"unknown batch {request.match_info['id']!r}", "not_found")
        dead = {d.id for d in await backend.dead_letters()}
        completed = failed = 0
        for cid in m["custom_ids"]:
            rid = f"{m['id']}:{cid}"
            r = await backend.get_result(rid)
            if r is not None:
                if r.ok:
                    completed += 1
                else:
                    failed += 1
            elif rid in dead:
                failed += 1
        counts = {"total": len(m["custom_ids"]), "completed": completed, "failed": failed}
        return _json(200, _batch_object(m, counts))

    async def batch_output(request: web.Request) -> web.StreamResponse:
        m = await _manifest(request)
        if m is None:
            return _error(404, f"unknown batch {request.match_info['id']!r}", "not_found")
        dead = {d.id: d for d in await backend.dead_letters()}
        resp = web.StreamResponse(headers={"content-type": "application/jsonl"})
        await resp.prepare(request)
        for cid in m["custom_ids"]:
            rid = f"{m['id']}:{cid}"
            r = await backend.get_result(rid)
            if r is not None:
                line = openai_line(r)
            elif rid in dead:
                line = dead_letter_line(dead[rid])
            else:
                continue  # still pending
            line["custom_id"] = cid
            await resp.write(orjson.dumps(line) + b"\n")
        await resp.write_eof()
        return resp

    async def prom(request: web.Request) -> web.Response:
        text = generate_latest(metrics.registry) if metrics is not None else b""
        return web.Response(body=text, headers={"content-type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_post("/v1/async/requests", submit)
    app.router.add_get("/v1/async/requests/{id}", get)
    app.router.add_post("/v1/async/requests/{id}/cancel", cancel)
    app.router.add_delete("/v1/async/requests/{id}", cancel)
    app.router.add_post("/v1/async/batches", create_batch)
    app.router.add_get("/v1/async/batches/{id}", get_batch)
    app.router.add_get("/v1/async/batches/{id}/output", batch_output)
    app.router.add_get("/metrics", prom)
    app.router.add_get("/healthz", healthz)
    return app
