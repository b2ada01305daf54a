"""The dispatch window: how many async requests may be in flight at the gateway at once.

AIMD, as TCP does it, because the problem is the same (find a shared bottleneck's free capacity from
loss signals, give it back at once when others need it):

- slow start: +1 per success (doubling per round trip) until the first congestion signal;
- then additive increase: +1/size per success (about +1 per round trip), only while the successes come
  back within the latency objective;
- multiplicative decrease (x ``decrease``) at once on a congestion signal (the gateway shed with 429/503,
  a capacity signal says saturated or real-time traffic is queued), at most once per round trip so one
  burst of 429s for requests sent together counts as one event, not thirty.

On top of the window, a headroom budget read from the gateway's capacity signal (``set_headroom``) caps
dispatches to what the pool can take right now: the window finds the level, the signal keeps each step
inside the free capacity.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable


class AimdWindow:
    """An AIMD concurrency window with an optional headroom budget. Single event loop, no locks."""

    def __init__(
        self,
        *,
        initial: float = 4,
        minimum: int = 1,
        maximum: int = 64,
        decrease: float = 0.5,
        min_hold_s: float = 0.05,
        objective_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError("window: need 1 <= minimum <= maximum")
        if not 0 < decrease < 1:
            raise ValueError("window: decrease must be in (0, 1)")
        self.minimum = minimum
        self.maximum = maximum
        self.decrease = decrease
        self.min_hold_s = min_hold_s
        self.objective_s = objective_s
        self.clock = clock
        self.size = float(min(max(initial, minimum), maximum))
        self.ssthresh = float(maximum)
        self.in_flight = 0
        self.rtt_s: float | None = None
        """EWMA of request latency: the hold time between two decreases."""
        self.headroom: int | None = None
        """Dispatches allowed until the next capacity reading; None = no signal (window only)."""
        self.decreases = 0
        self._last_decrease = -math.inf
        self._changed = asyncio.Event()

    @property
    def limit(self) -> int:
        """Requests allowed in flight by the window alone."""
        return max(self.minimum, int(self.size))

    def can_dispatch(self) -> bool:
        return self.in_flight < self.limit and (self.headroom is None or self.headroom > 0)

    async def acquire(self) -> None:
        """Wait for a slot (window and headroom), then take it. Cancellable."""
        while not self.can_dispatch():
            self._changed.clear()
            await self._changed.wait()
        self.in_flight += 1
        if self.headroom is not None:
            self.headroom -= 1

    def release(self) -> None:
        """Give a slot back (after the request's outcome was recorded)."""
        self.in_flight -= 1
        self._changed.set()

    def set_headroom(self, free: int | None) -> None:
        """A fresh capacity reading: the pool can take ``free`` more requests of our band (None = no
        usable signal, dispatch by the window alone)."""
        self.headroom = None if free is None else max(0, free)
        self._changed.set()

    def on_success(self, latency_s: float) -> None:
        """A request finished (2xx): grow if it came back within the objective."""
        self.rtt_s = latency_s if self.rtt_s is None else 0.8 * self.rtt_s + 0.2 * latency_s
        if self.objective_s is not None and latency_s > self.objective_s:
            return  # within capacity but slow: hold the level
        if self.size < self.ssthresh:
            self.size = min(self.maximum, self.size + 1)
        else:
            self.size = min(float(self.maximum), self.size + 1 / self.size)
        self._changed.set()

    def on_congestion(self) -> bool:
        """Shrink at once (at most once per round trip). Returns whether it shrank."""
        now = self.clock()
        hold = max(self.min_hold_s, self.rtt_s or 0.0)
        if now - self._last_decrease < hold:
            return False
        self._last_decrease = now
        self.size = max(float(self.minimum), self.size * self.decrease)
        self.ssthresh = max(float(self.minimum), self.size)
        self.decreases += 1
        self._changed.set()
        return True

    def wake(self) -> None:
        """Wake waiters (e.g. on shutdown, so they can notice)."""
        self._changed.set()
