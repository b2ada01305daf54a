"""Cheap extraction of `usage` from the tail of an OpenAI response (JSON body or SSE stream)."""

from __future__ import annotations

import orjson

USAGE_TAIL = 4096
"""Bytes of the response tail kept to find usage: the usage chunk is the last (or next to last) event."""


def parse_usage_tail(tail: bytes) -> tuple[int | None, int | None, int | None]:
    """(prompt_tokens, completion_tokens, cached_tokens) from the last object in `tail` carrying usage."""
    i = tail.rfind(b'"usage"')
    if i < 0:
        return None, None, None
    start = tail.rfind(b"data: ", 0, i)
    if start >= 0:
        end = tail.find(b"\n", i)
        blob = tail[start + 6 : end if end >= 0 else len(tail)]
    else:
        blob = tail  # a plain JSON body
    try:
        obj = orjson.loads(blob)
    except orjson.JSONDecodeError:
        return None, None, None
    u = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(u, dict):
        return None, None, None
    details = u.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return u.get("prompt_tokens"), u.get("completion_tokens"), cached
