"""What the ext_proc processor saw of one response (`ResponseOutcome`) and how it becomes the
director's `ResponseInfo` (`to_response_info`, the default `InfoFactory`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ingate.lifecycle import Decision, ResponseInfo


@dataclass(slots=True)
class ResponseOutcome:
    """What the processor saw of one response; turned into the director's `ResponseInfo`."""

    status: int = 0
    started_at: float = 0.0
    """time.monotonic() when the request headers arrived."""
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_at: float | None = None
    ended_at: float = 0.0
    error: str | None = None
    """Why the stream ended early (client disconnect, reset), None when the response completed."""
    body_bytes: int = 0
    last_chunk_at: float = 0.0
    chunk_gaps: list[float] = field(default_factory=list)
    """Seconds between consecutive response body chunks (inter-token latency when streamed)."""


InfoFactory = Callable[[Decision, ResponseOutcome], ResponseInfo]
"""Builds the director's `ResponseInfo` from what the processor observed."""


def to_response_info(decision: Decision, o: ResponseOutcome) -> ResponseInfo:
    """The default `InfoFactory`: `ingate.lifecycle.ResponseInfo` with TTFT and e2e times, the body's
    size and its chunk gaps.

    A stream that ended early (client gone, reset) reports status 499 when the upstream had answered
    with success, so learning plugins do not count a cut-off response as a complete one.
    """
    status = o.status if o.error is None or o.status >= 400 else 499
    return ResponseInfo(
        status=status,
        prompt_tokens=o.prompt_tokens,
        completion_tokens=o.completion_tokens,
        cached_tokens=o.cached_tokens,
        ttft_s=None if o.first_token_at is None else o.first_token_at - o.started_at,
        e2e_s=(o.ended_at - o.started_at) if o.ended_at else None,
        response_bytes=o.body_bytes,
        chunk_gaps=o.chunk_gaps,
    )
