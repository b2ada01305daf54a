"""OpenAI-style error bodies shared by every data plane.

Every error a client sees from ingate is ``{"error": {"message", "type", "code"}}`` with the status code
DESIGN.md's conventions name, so clients written for OpenAI's API handle them without special cases.
"""

from __future__ import annotations

import orjson

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


HDR_DROPPED_REASON = "x-llm-d-request-dropped-reason"
"""Why the gateway dropped a request (429 shed / queue full, 503 no endpoint / queue TTL): the error
code, as a header that proxies and clients can read without parsing the body (upstream's name)."""
_DROPPED = frozenset({429, 503})


class GatewayError(Exception):
    """An error answered to the client with an OpenAI-style JSON body."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "error")

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.code)

    def headers(self) -> dict[str, str]:
        h = {"content-type": "application/json"}
        if self.status in _DROPPED and self.code:
            h[HDR_DROPPED_REASON] = self.code
        if self.retry_after is not None:
            h["retry-after"] = str(max(1, round(self.retry_after)))
        return h


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    """Serialise an OpenAI-style error body."""
    return orjson.dumps({"error": {"message": message, "type": _TYPES.get(status, "error"), "code": code}})
