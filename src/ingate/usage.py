"""Cheap extraction of `usage` from the tail of an OpenAI response (JSON body or SSE stream).

Data planes keep only the last `USAGE_TAIL` bytes of a response; the usage object is in the last SSE
data line before `[DONE]` (with `stream_options.include_usage`) or near the end of a JSON body.
"""

from __future__ import annotations

import orjson

USAGE_TAIL = 16_384
"""Bytes of the response tail kept to find usage."""

_NONE: tuple[None, None, None] = (None, None, None)


def _usage_object(tail: bytes, i: int) -> object:
    """The JSON object that follows `"usage"` at `i` (usage nests at most one level: *_details)."""
    start = tail.find(b"{", i)
    if start < 0:
        return None
    depth = 0
    for j in range(start, min(len(tail), start + 2048)):
        c = tail[j]
        if c == 0x7B:
            depth += 1
        elif c == 0x7D:
            depth -= 1
            if depth == 0:
                try:
                    return orjson.loads(tail[start : j + 1])
                except orjson.JSONDecodeError:
                    return None
    return None


def parse_usage_tail(tail: bytes) -> tuple[int | None, int | None, int | None]:
    """(prompt_tokens, completion_tokens, cached_tokens) from the last usage object in `tail`.

    An SSE data line carrying usage is decoded whole (one orjson call); otherwise (a JSON body whose
    head may be cut off) only the usage object is extracted. Nones when absent or malformed.
    """
    i = tail.rfind(b'"usage"')
    if i < 0:
        return _NONE
    u: object = None
    line = tail.rfind(b"data: ", 0, i)
    if line >= 0 and tail.find(b"\n", line, i) < 0:
        end = tail.find(b"\n", i)
        try:
            obj = orjson.loads(tail[line + 6 : end if end >= 0 else len(tail)])
            u = obj.get("usage") if isinstance(obj, dict) else None
        except orjson.JSONDecodeError:
            u = None
    if u is None:
        u = _usage_object(tail, i)
    if not isinstance(u, dict):
        return _NONE
    p, c = u.get("prompt_tokens"), u.get("completion_tokens")
    details = u.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return (
        p if isinstance(p, int) else None,
        c if isinstance(c, int) else None,
        cached if isinstance(cached, int) else None,
    )
