"""Placement by priority (`flowControl.preemption`): per-priority in-flight counts per endpoint and the
preference for endpoints where lower-priority work runs.

With preemption on, model servers displace lower-priority work (vLLM `--scheduling-policy priority`,
SGLang priority scheduling), so a request that would otherwise wait should land where such work runs.
Flow control decides *that* a request may go past saturation (its ticket is `preempting`); this
decides *where*, after the scheduler picked, before the lifecycle hooks record the target.
"""

from __future__ import annotations

from typing import Any

from ingate.datastore import Endpoint
from ingate.lifecycle import SchedulingResult


class PriorityPlacement:
    """Keeps `Endpoint.in_flight_by_priority` and reorders a decision's endpoints by priority."""

    def __init__(self) -> None:
        self._peak_running: dict[str, int] = {}  # address -> most running requests ever scraped

    def place(self, result: SchedulingResult, ticket: Any, priority: int) -> None:
        """When the request is dispatched to preempt, or the scheduler's choice looks full for its
        priority, move to the front the candidate where it waits least behind work it cannot displace;
        ties: the fewest requests of at least its priority there, then one where lower-priority work
        runs, then the scheduler's order.

        Why the count: servers full of displaceable work look alike to the scorers (the scraped queue
        and KV hold that work too), so without it a burst of high-priority requests lands on the
        scheduler's favourite until its slots are full of them. They then finish together, and the
        next burst waits on that replica for a whole request's duration while the other's older work
        is about to free a slot (measured in `ingate bench async --preemption`, tuning seeds: server-side
        real-time queueing of 0.3-0.4 s against 0.15 s alone)."""
        if bool(getattr(ticket, "preempting", False)) or self.looks_full(result.endpoints[0], priority):
            eps = result.endpoints

            def rank(i: int) -> tuple[int, int, bool, int]:
                mine = at_or_above_in_flight(eps[i], priority)
                return self._ahead(eps[i], mine), mine, lower_in_flight(eps[i], priority) <= 0, i

            best = min(range(len(eps)), key=rank)
            if best:
                eps.insert(0, eps.pop(best))

    def wait_ahead(self, ep: Endpoint, priority: int) -> int:
        """Requests of at least ``priority`` from this gateway that would still be ahead of one more on
        ``ep`` once its learned batch slots are full (0: it starts at once, in a free slot or by
        preempting lower-priority work). Why not the scraped queue: on servers that preempt, that queue
        holds displaced lower-priority work too, and the scorers cannot tell it from real-time work."""
        return self._ahead(ep, at_or_above_in_flight(ep, priority))

    def _ahead(self, ep: Endpoint, mine: int) -> int:
        """`wait_ahead` given this gateway's requests of at least the priority on ``ep`` (``mine``)."""
        return max(0, mine - self._learn(ep) + 1)

    def _learn(self, ep: Endpoint) -> int:
        peak = self._peak_running.get(ep.address, 0)
        if ep.metrics.running > peak:
            self._peak_running[ep.address] = peak = ep.metrics.running
        return peak

    def looks_full(self, ep: Endpoint, priority: int) -> bool:
        """Whether a request of ``priority`` would wait on ``ep`` behind work it cannot displace: the
        replica queues requests, or this gateway's requests of at least this priority there already fill
        as many batch slots as the replica has ever been seen running (its learned batch size)."""
        m = ep.metrics
        if m.waiting > 0:
            return True
        peak = self._learn(ep)
        mine = at_or_above_in_flight(ep, priority)
        return mine >= max(1, peak)

    @staticmethod
    def count(ep: Endpoint, priority: int, delta: int) -> None:
        """Add ``delta`` requests of ``priority`` in flight on ``ep``."""
        by = ep.in_flight_by_priority
        n = by.get(priority, 0) + delta
        if n:
            by[priority] = n
        else:
            del by[priority]

    def forget(self, address: str) -> None:
        """Drop state for an endpoint that left the pool."""
        self._peak_running.pop(address, None)


def at_or_above_in_flight(ep: Endpoint, priority: int) -> int:
    """Requests of at least ``priority`` this gateway has in flight on ``ep`` (it cannot displace them)."""
    return sum(n for p, n in ep.in_flight_by_priority.items() if p >= priority)


def lower_in_flight(ep: Endpoint, priority: int) -> int:
    """Requests of lower priority than ``priority`` this gateway has in flight on ``ep``."""
    return sum(n for p, n in ep.in_flight_by_priority.items() if p < priority)
