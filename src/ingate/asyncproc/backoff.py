"""Retry delays: exponential backoff with jitter, ``Retry-After`` honoured, never past the deadline.

The rules follow llm-d-async's worker so a message behaves the same under either processor:
``base x 2^attempt`` capped at ``min(max_delay, time left)`` with equal jitter (a delay in ``[d/2, d)``);
a server's ``Retry-After`` longer than that wins, clamped to half the time left (a wrong estimate may cost
at most half the budget), plus up to 25% jitter so messages shed by the same event do not return together.
"""

from __future__ import annotations

import email.utils
import random
import time


def retry_delay(
    attempt: int,
    time_left_s: float,
    *,
    retry_after_s: float | None = None,
    base_s: float = 2.0,
    max_s: float = 60.0,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds to wait before attempt ``attempt + 1`` (``attempt`` >= 0 tries made so far, the failed one
    included), or None when no retry fits before the deadline (``time_left_s`` <= 0)."""
    if time_left_s <= 0:
        return None
    r = rng or random
    cap = min(max_s, time_left_s)
    d = min(cap, base_s * (2.0 ** max(0, attempt - 1)))
    delay = d / 2 + r.random() * d / 2
    if retry_after_s is not None and retry_after_s > delay:
        clamped = min(retry_after_s, time_left_s / 2)
        delay = max(delay, clamped * (1 + r.random() / 4))
    # Both arms stay below time_left_s: the first by the cap and equal jitter, the second at <= 0.625 x.
    return delay


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    v = value.strip()
    try:
        s = float(v)
    except ValueError:
        try:
            dt = email.utils.parsedate_to_datetime(v)
        except (TypeError, ValueError):
            return None
        s = dt.timestamp() - (time.time() if now is None else now)
    if s != s or s < 0:  # NaN or in the past
        return 0.0 if s == s else None
    return s
