"""Async request and result messages, wire-compatible with llm-d-async (api.RequestMessage/ResultMessage).

Request: ``{id, created, deadline, payload, metadata, headers, endpoint}`` (unix seconds; ``endpoint`` is
the request path, default ``/v1/completions``). Result: ``{id, status_code, payload, error_code,
error_message}``: ``status_code > 0`` means the gateway answered and ``payload`` is its body as a string;
``status_code`` 0/absent means no HTTP answer and ``error_code`` says why.

Validation never raises to the caller: a message that cannot be processed becomes an
:class:`InvalidMessage`, which the processor answers with an ``INVALID_REQUEST`` result and acknowledges.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
CANCELLED = "CANCELLED"
GATE_DROPPED = "GATE_DROPPED"
GATE_ERROR = "GATE_ERROR"
INFERENCE_ERROR = "INFERENCE_ERROR"
INVALID_REQUEST = "INVALID_REQUEST"
ERROR_CODES = frozenset(
    {DEADLINE_EXCEEDED, CANCELLED, GATE_DROPPED, GATE_ERROR, INFERENCE_ERROR, INVALID_REQUEST}
)

DEFAULT_ENDPOINT = "/v1/completions"
DEFAULT_ENDPOINTS = frozenset(
    {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/rerank"}
)
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass(slots=True)
class AsyncRequest:
    """A validated request message."""

    id: str
    deadline: float
    """Unix seconds."""
    payload: dict[str, Any]
    created: float = 0.0
    metadata: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    endpoint: str = DEFAULT_ENDPOINT

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "created": int(self.created),
            "deadline": int(self.deadline),
            "payload": self.payload,
        }
        if self.metadata:
            out["metadata"] = self.metadata
        if self.headers:
            out["headers"] = self.headers
        if self.endpoint != DEFAULT_ENDPOINT:
            out["endpoint"] = self.endpoint
        return out

    def encode(self) -> bytes:
        return orjson.dumps(self.to_json())


@dataclass(slots=True)
class InvalidMessage:
    """A message that cannot be processed; ``id`` is the message's own id when it had a usable one."""

    id: str | None
    reason: str


@dataclass(slots=True)
class AsyncResult:
    """A result message (the same fields as llm-d-async's ResultMessage)."""

    id: str
    status_code: int = 0
    payload: str = ""
    error_code: str = ""
    error_message: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300

    def to_json(self) -> dict[str, Any]:
        # llm-d-async omits empty status_code/error fields (Go omitempty) but always sends payload.
        out: dict[str, Any] = {"id": self.id}
        if self.status_code:
            out["status_code"] = self.status_code
        out["payload"] = self.payload
        if self.error_code:
            out["error_code"] = self.error_code
        if self.error_message:
            out["error_message"] = self.error_message
        return out

    def encode(self) -> bytes:
        return orjson.dumps(self.to_json())

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> AsyncResult:
        return cls(
            id=str(doc.get("id", "")),
            status_code=int(doc.get("status_code") or 0),
            payload=str(doc.get("payload") or ""),
            error_code=str(doc.get("error_code") or ""),
            error_message=str(doc.get("error_message") or ""),
        )

    @classmethod
    def error(cls, id: str, code: str, message: str) -> AsyncResult:
        """A non-HTTP error result; like llm-d-async, the payload carries ``{"error": message}`` too so
        consumers that only read the payload see the failure."""
        return cls(
            id=id, payload=orjson.dumps({"error": message}).decode(), error_code=code, error_message=message
        )

    @classmethod
    def http(cls, id: str, status: int, body: bytes) -> AsyncResult:
        return cls(id=id, status_code=status, payload=body.decode("utf-8", errors="replace"))


def _str_map(v: Any, name: str) -> dict[str, str] | str:
    """``v`` as a dict of strings, or an error message."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        return f"{name} must be an object of strings"
    for k, x in v.items():
        if not isinstance(k, str) or not isinstance(x, str):
            return f"{name} must be an object of strings"
    return v


def parse_message(
    raw: bytes | str,
    *,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    endpoints: frozenset[str] = DEFAULT_ENDPOINTS,
) -> AsyncRequest | InvalidMessage:
    """Validate one request message (JSON text). Never raises."""
    data = raw.encode() if isinstance(raw, str) else raw
    if len(data) > max_bytes:
        doc_id = _sniff_id(data[:4096])
        return InvalidMessage(doc_id, f"message is {len(data)} bytes, more than the limit of {max_bytes}")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        return InvalidMessage(None, f"message is not JSON: {e}")
    return validate(doc, endpoints=endpoints)


def validate(doc: Any, *, endpoints: frozenset[str] = DEFAULT_ENDPOINTS) -> AsyncRequest | InvalidMessage:
    """Validate a decoded message document. Never raises."""
    if not isinstance(doc, dict):
        return InvalidMessage(None, "message must be a JSON object")
    rid = doc.get("id")
    if not isinstance(rid, str) or not rid:
        return InvalidMessage(None, "id is required (a non-empty string)")
    if len(rid) > 512:
        return InvalidMessage(None, "id is longer than 512 characters")

    def bad(reason: str) -> InvalidMessage:
        return InvalidMessage(rid, reason)

    deadline = doc.get("deadline")
    if isinstance(deadline, bool) or not isinstance(deadline, int | float) or deadline <= 0:
        return bad("deadline is required (unix seconds, > 0)")
    created = doc.get("created", 0)
    if isinstance(created, bool) or not isinstance(created, int | float) or created < 0:
        return bad("created must be unix seconds")
    payload = doc.get("payload")
    if not isinstance(payload, dict):
        return bad("payload must be a JSON object (the OpenAI request body)")
    metadata = _str_map(doc.get("metadata"), "metadata")
    if isinstance(metadata, str):
        return bad(metadata)
    headers = _str_map(doc.get("headers"), "headers")
    if isinstance(headers, str):
        return bad(headers)
    endpoint = doc.get("endpoint") or DEFAULT_ENDPOINT
    if not isinstance(endpoint, str) or endpoint not in endpoints:
        return bad(f"unknown endpoint {endpoint!r}; allowed: {', '.join(sorted(endpoints))}")
    return AsyncRequest(
        id=rid,
        deadline=float(deadline),
        payload=payload,
        created=float(created),
        metadata=metadata,
        headers=headers,
        endpoint=endpoint,
    )


def _sniff_id(head: bytes) -> str | None:
    """The id of an oversized message if it appears early as ``"id": "..."`` (best effort, no full parse)."""
    i = head.find(b'"id"')
    if i < 0:
        return None
    rest = head[i + 4 :].lstrip()
    if not rest.startswith(b":"):
        return None
    rest = rest[1:].lstrip()
    if not rest.startswith(b'"'):
        return None
    end = rest.find(b'"', 1)
    if end <= 1 or b"\\" in rest[1:end]:
        return None
    return rest[1:end].decode("utf-8", errors="replace")


def new_message(
    id: str,
    payload: dict[str, Any],
    *,
    ttl_s: float = 24 * 3600,
    metadata: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    endpoint: str = DEFAULT_ENDPOINT,
    now: float | None = None,
) -> AsyncRequest:
    """A request created now with a deadline ``ttl_s`` from now."""
    t = time.time() if now is None else now
    return AsyncRequest(
        id=id,
        deadline=float(int(t + ttl_s)),
        payload=payload,
        created=float(int(t)),
        metadata=dict(metadata or {}),
        headers=dict(headers or {}),
        endpoint=endpoint,
    )
