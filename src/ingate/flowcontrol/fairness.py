"""Fairness policies between flows of one band, and Jain's fairness index."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from typing import Protocol


def jain_index(values: Iterable[float]) -> float:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1.0 = perfectly equal, 1/n = one gets all."""
    xs = list(values)
    if not xs:
        return 1.0
    sq = sum(x * x for x in xs)
    if sq == 0:
        return 1.0
    return sum(xs) ** 2 / (len(xs) * sq)


class Policy(Protocol):
    """Chooses which backlogged flow of a band is served next."""

    def activate(self, flow: str) -> None:
        """``flow`` went from empty to backlogged."""

    def next(self) -> str | None:
        """The flow to serve next, or None when no flow is backlogged. The flow stays active."""

    def deactivate(self, flow: str) -> None:
        """``flow`` became empty."""

    def charge(self, flow: str, input_tokens: float, output_tokens: float) -> None:
        """Account tokens served to ``flow`` (may be negative to correct an estimate)."""


class RoundRobin:
    """One request per backlogged flow in turn."""

    def __init__(self) -> None:
        self._ring: deque[str] = deque()
        self._in_ring: set[str] = set()
        self._active: set[str] = set()

    def activate(self, flow: str) -> None:
        self._active.add(flow)
        if flow not in self._in_ring:
            # A flow that went idle and came back before its old ring slot was reaped keeps that slot,
            # so it never holds two turns per round.
            self._in_ring.add(flow)
            self._ring.append(flow)

    def next(self) -> str | None:
        while self._ring:
            flow = self._ring[0]
            self._ring.rotate(-1)
            if flow in self._active:
                return flow
            self._ring.pop()  # inactive: it was rotated to the end; drop it
            self._in_ring.discard(flow)
        return None

    def deactivate(self, flow: str) -> None:
        self._active.discard(flow)

    def charge(self, flow: str, input_tokens: float, output_tokens: float) -> None:
        return None


class VirtualTokenCounter:
    """VTC: serve the backlogged flow with the fewest weighted tokens served.

    A flow that becomes backlogged has its counter lifted to the smallest counter among backlogged flows
    (or the band's last served counter), so idle time is not banked as credit.
    """

    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0) -> None:
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.counters: dict[str, float] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._active: set[str] = set()
        self._seq = 0
        self._vtime = 0.0

    def _push(self, flow: str) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (self.counters[flow], self._seq, flow))

    def _min_active(self) -> float | None:
        # Pop stale entries (inactive flows, or counters that changed since the push).
        while self._heap:
            c, _, flow = self._heap[0]
            if flow not in self._active:
                heapq.heappop(self._heap)
            elif c != self.counters[flow]:
                heapq.heappop(self._heap)
                self._push(flow)
            else:
                return c
        return None

    def activate(self, flow: str) -> None:
        if flow in self._active:
            return
        floor = self._min_active()
        if floor is None:
            floor = self._vtime
        self.counters[flow] = max(self.counters.get(flow, 0.0), floor)
        self._active.add(flow)
        self._push(flow)

    def next(self) -> str | None:
        if self._min_active() is None:
            return None
        flow = self._heap[0][2]
        self._vtime = self.counters[flow]
        return flow

    def deactivate(self, flow: str) -> None:
        self._active.discard(flow)
        if not self._active:
            self._heap.clear()

    def charge(self, flow: str, input_tokens: float, output_tokens: float) -> None:
        # Flows served without queueing are charged too; an unknown flow starts at the band's floor.
        c = self.counters.get(flow)
        if c is None:
            if len(self.counters) > 4 * max(256, len(self._active)):
                # Forget idle flows at or below the floor: lifting would give them that counter anyway.
                self.counters = {
                    f: v for f, v in self.counters.items() if f in self._active or v > self._vtime
                }
            c = self._vtime
        self.counters[flow] = c + self.input_weight * input_tokens + self.output_weight * output_tokens
