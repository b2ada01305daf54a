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


SLO_HOLD_EXPIRED = "slo.hold_expired"
"""`InferenceRequest.extra` key the director sets when a held request's hold is over: schedule it now."""


class SloHold(GatewayError):
    """Raised by a scheduling plugin: no endpoint is predicted to meet this (non-sheddable) request's
    SLO now; the director holds the request and schedules it again after `poll_s`, until `until`
    (time.monotonic()), then once more with `extra[SLO_HOLD_EXPIRED]` set, when it is dispatched
    anyway. A caller that does not hold answers it as the 503 it is."""

    def __init__(self, message: str, poll_s: float, until: float) -> None:
        super().__init__(503, message, "slo_unattainable", retry_after=poll_s)
        self.poll_s = poll_s
        self.until = until
