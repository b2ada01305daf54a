"""JSONL batch files: OpenAI Batch-API input/output lines <-> async messages and results.

Input lines may be OpenAI Batch requests ``{"custom_id", "method": "POST", "url", "body"}`` (the
``custom_id`` becomes the request id, ``url`` the endpoint, ``body`` the payload) or llm-d-async request
messages (passed through as they are, so a malformed one, or one without a deadline, is answered
``INVALID_REQUEST`` like any other).
Output lines are OpenAI Batch results ``{"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error"}``, or llm-d-async result objects.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from ingate.asyncproc.backends.base import DeadLetter
from ingate.asyncproc.models import AsyncResult

DEAD_LETTERED = "DEAD_LETTERED"


def to_message(line: bytes, *, ttl_s: float, now: float | None = None) -> bytes | None:
    """One input line as a message body (None for a blank line)."""
    s = line.strip()
    if not s:
        return None
    try:
        doc = orjson.loads(s)
    except orjson.JSONDecodeError:
        return s  # the processor answers it INVALID_REQUEST
    if isinstance(doc, dict) and "custom_id" in doc and "payload" not in doc:
        t = time.time() if now is None else now
        msg: dict[str, Any] = {
            "id": doc.get("custom_id"),
            "created": int(t),
            "deadline": int(t + ttl_s),
            "payload": doc.get("body"),
        }
        if doc.get("url"):
            msg["endpoint"] = doc["url"]
        return orjson.dumps(msg)
    return s  # an llm-d-async message goes in unchanged (no deadline is INVALID_REQUEST, as upstream)


def openai_line(r: AsyncResult) -> dict[str, Any]:
    """A result as an OpenAI Batch output line."""
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    if r.status_code:
        try:
            body: Any = orjson.loads(r.payload)
        except orjson.JSONDecodeError:
            body = r.payload
        response = {"status_code": r.status_code, "request_id": r.id, "body": body}
    if r.error_code:
        error = {"code": r.error_code, "message": r.error_message}
    return {"id": f"batch_req_{r.id}", "custom_id": r.id, "response": response, "error": error}


def dead_letter_line(d: DeadLetter) -> dict[str, Any]:
    """A dead-lettered request as an OpenAI Batch output line (error code DEAD_LETTERED)."""
    return {
        "id": f"batch_req_{d.id}",
        "custom_id": d.id,
        "response": None,
        "error": {"code": DEAD_LETTERED, "message": d.error},
    }
