"""The flow controller: admit (maybe queue), dispatch while the pool has capacity, release."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ingate.datastore import Datastore
from ingate.errors import GatewayError
from ingate.flowcontrol.config import FlowControlConfig
from ingate.flowcontrol.fairness import Policy, RoundRobin, VirtualTokenCounter
from ingate.flowcontrol.metrics import FlowControlMetrics
from ingate.flowcontrol.saturation import SaturationDetector
from ingate.request import InferenceRequest


@dataclass(eq=False, slots=True)
class Ticket:
    """Proof of admission; hand it back to :meth:`FlowController.release` exactly once."""

    fairness_id: str
    priority: int
    est_tokens: int
    enqueued_at: float
    dispatched_at: float
    queued: bool
    released: bool = False
    preempting: bool = False
    """Dispatched past saturation to displace lower-priority work (flowControl.preemption)."""


@dataclass(eq=False, slots=True)
class _Item:
    fairness_id: str
    priority: int
    size_bytes: int
    est_tokens: int
    enqueued_at: float
    expires_at: float
    expiry_reason: str
    future: asyncio.Future[Ticket]
    expiry_code: str = "queue_ttl_expired"
    """The 503's error code (and drop reason) at expiry: `no_endpoint` for scale-from-zero waits."""
    queued: bool = True
    """False once the item left its queue (dispatched, expired, cancelled): its heap entry is stale."""


@dataclass(eq=False, slots=True)
class _Band:
    priority: int
    max_requests: int
    max_bytes: int
    policy: Policy
    max_in_flight: int | None = None
    in_flight: int = 0
    flows: dict[str, deque[_Item]] = field(default_factory=dict)
    flow_bytes: dict[str, int] = field(default_factory=dict)
    count: int = 0
    bytes: int = 0


class FlowController:
    """Strict priority between bands, a fair policy between flows within a band, FCFS within a flow.

    Capacity: an endpoint takes more requests while its saturation is below 1.0, counting scraped
    waiting requests plus requests the gateway sent it since that scrape; a queued request is dispatched
    while the sum of headroom over endpoints is positive. While the pool is saturated requests wait here
    instead of piling onto model servers; sheddable ones (priority < 0) are answered 429 at once.
    """

    def __init__(
        self,
        config: FlowControlConfig,
        datastore: Datastore,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: FlowControlMetrics | None = None,
    ) -> None:
        self.config = config
        self.datastore = datastore
        self.clock = clock
        self.detector = SaturationDetector(config.saturation)
        self.metrics = metrics if metrics is not None else FlowControlMetrics()
        self._bands: dict[int, _Band] = {}
        self._order: list[int] = []  # priorities with a band, highest first
        self._in_flight = 0
        self._preempting = 0  # tickets in flight that were dispatched by preemption
        self._peak_running: dict[str, int] = {}  # address -> most requests it was seen running
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Expiry heap (expires_at, seq, item) over queued items, stale entries deleted lazily: a wake
        # costs O(log n) per expired or stale entry, never a scan of the queues.
        self._expiry: list[tuple[float, int, _Item]] = []
        self._seq = itertools.count()

    # ---- public API -------------------------------------------------------------------------------

    async def admit(
        self,
        request: InferenceRequest,
        *,
        size_bytes: int | None = None,
        est_tokens: int | None = None,
        deadline: float | None = None,
    ) -> Ticket:
        """Admit ``request`` now, or queue it until dispatched; raise GatewayError 429/503.

        ``deadline`` is on this controller's clock; without it the request's own timeout (header
        x-gateway-request-timeout-ms) counts from now. Cancelling the caller removes the queued item.
        """
        now = self.clock()
        if deadline is None and request.timeout_s is not None:
            deadline = now + request.timeout_s
        prio = request.priority
        flow = request.fairness_id
        size = len(request.raw_body) if size_bytes is None else size_bytes
        tokens = request.estimated_prompt_tokens if est_tokens is None else est_tokens
        no_endpoint = not any(ep.healthy for ep in self.datastore.endpoints())
        if no_endpoint:
            return await self._wait_for_endpoint(flow, prio, size, tokens, now, deadline)
        if not self._queued_at_or_above(prio) and self._band_room(prio):
            if self._capacity(now) > 0:
                return self._dispatched(flow, prio, tokens, now, now, queued=False)
            if self._preempt_room(prio) > 0:
                return self._dispatched(flow, prio, tokens, now, now, queued=False, preempting=True)
        if prio < 0:
            # Sheddable: dispatched at once or shed, never queued (the pool is saturated, the band is
            # at its maxInFlight, or requests of the same or higher priority are waiting).
            self.metrics.rejected.labels(str(prio), "shed").inc()
            saturated = self.detector.pool_saturated(self.datastore.endpoints(), now)
            raise GatewayError(
                429,
                "request shed: objective is sheddable and "
                + ("the pool is saturated" if saturated else "no capacity is free for it"),
                "shed",
                retry_after=self.config.retry_after_s,
            )
        band = self._band(prio)
        fq = band.flows.get(flow)
        fbytes = band.flow_bytes.get(flow, 0)
        c = self.config
        if (
            band.count >= band.max_requests
            or band.bytes + size > band.max_bytes
            or (fq is not None and len(fq) >= c.flow_max_requests)
            or fbytes + size > c.flow_max_bytes
        ):
            self.metrics.rejected.labels(str(prio), "queue_full").inc()
            raise GatewayError(
                429,
                f"flow-control queue full for priority {prio}, flow {flow!r}",
                "queue_full",
                retry_after=c.retry_after_s,
            )
        expires, reason = now + c.queue_ttl_s, f"queued longer than the queue TTL ({c.queue_ttl_s:g} s)"
        if deadline is not None and deadline < expires:
            expires, reason = deadline, "request deadline passed while queued"
        return await self._enqueue(band, fq, fbytes, flow, prio, size, tokens, now, expires, reason)

    async def _wait_for_endpoint(
        self,
        flow: str,
        prio: int,
        size: int,
        tokens: int,
        now: float,
        deadline: float | None,
    ) -> Ticket:
        """Scale from zero: no endpoint is ready, so the request waits for one (any priority)."""
        c = self.config
        band = self._band(prio)
        fq = band.flows.get(flow)
        fbytes = band.flow_bytes.get(flow, 0)
        if band.count >= band.max_requests or band.bytes + size > band.max_bytes:
            self.metrics.rejected.labels(str(prio), "queue_full").inc()
            raise GatewayError(
                503,
                "no model-server endpoint is ready and the wait queue is full",
                "no_endpoint",
                retry_after=c.retry_after_s,
            )
        expires = now + c.no_endpoint_ttl_s
        reason = f"no model-server endpoint became ready within {c.no_endpoint_ttl_s:g} s"
        if deadline is not None and deadline < expires:
            expires, reason = deadline, "request deadline passed while waiting for an endpoint"
        return await self._enqueue(
            band, fq, fbytes, flow, prio, size, tokens, now, expires, reason, code="no_endpoint"
        )

    async def _enqueue(
        self,
        band: _Band,
        fq: deque[_Item] | None,
        fbytes: int,
        flow: str,
        prio: int,
        size: int,
        tokens: int,
        now: float,
        expires: float,
        reason: str,
        code: str = "queue_ttl_expired",
    ) -> Ticket:
        item = _Item(
            flow, prio, size, tokens, now, expires, reason, asyncio.get_running_loop().create_future(), code
        )
        if fq is None:
            fq = band.flows[flow] = deque()
        if not fq:
            band.policy.activate(flow)
        fq.append(item)
        self._push_expiry(item)
        band.count += 1
        band.bytes += size
        band.flow_bytes[flow] = fbytes + size
        self._gauges(band, flow)
        self._wake.set()
        try:
            return await item.future
        except asyncio.CancelledError:
            if not item.future.done() or item.future.cancelled():
                self._remove(band, item)
                self.metrics.rejected.labels(str(prio), "cancelled").inc()
                self.metrics.wait.labels(flow, str(prio), "cancelled").observe(self.clock() - now)
            else:
                # Dispatched in the same tick the caller went away: give the capacity back.
                self.release(item.future.result())
            raise

    def release(self, ticket: Ticket, info: Any = None) -> None:
        """Give back the capacity of ``ticket`` and account served tokens (exactly once).

        ``info`` is anything with ``prompt_tokens`` / ``completion_tokens`` (e.g. scheduling.ResponseInfo);
        the estimate charged at dispatch is corrected by the real counts.
        """
        if ticket.released:
            return
        ticket.released = True
        self._in_flight -= 1
        if ticket.preempting:
            self._preempting -= 1
        band = self._bands.get(ticket.priority)
        if band is not None:
            band.in_flight -= 1
        prompt = getattr(info, "prompt_tokens", None)
        completion = getattr(info, "completion_tokens", None) or 0
        self.account(ticket, prompt, completion)
        self._wake.set()

    def account(self, ticket: Ticket, prompt_tokens: int | None, completion_tokens: int) -> None:
        """Correct the dispatch-time estimate with real token counts (VTC accounting)."""
        extra_in = 0 if prompt_tokens is None else prompt_tokens - ticket.est_tokens
        band = self._bands.get(ticket.priority)
        if band is not None:
            band.policy.charge(ticket.fairness_id, extra_in, completion_tokens)
        served = extra_in + completion_tokens
        if served > 0:
            self.metrics.served_tokens.labels(ticket.fairness_id, str(ticket.priority)).inc(served)

    def wake(self) -> None:
        """Run the dispatcher now (e.g. an endpoint appeared: waiting requests may go)."""
        self._wake.set()

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet released."""
        return self._in_flight

    def queued(self, priority: int | None = None) -> int:
        """Requests waiting (in one band or all)."""
        if priority is not None:
            b = self._bands.get(priority)
            return 0 if b is None else b.count
        return sum(b.count for b in self._bands.values())

    def pump(self) -> int:
        """Expire overdue items, then dispatch while there is capacity. Returns how many dispatched."""
        now = self.clock()
        self._expire(now)
        budget = self._capacity(now)
        n = 0
        while True:
            preempting = budget <= 0
            item = self._pop_next(preempting)
            if item is None:
                break
            item.future.set_result(
                self._dispatched(
                    item.fairness_id,
                    item.priority,
                    item.est_tokens,
                    item.enqueued_at,
                    now,
                    True,
                    preempting=preempting,
                )
            )
            self.metrics.wait.labels(item.fairness_id, str(item.priority), "dispatched").observe(
                now - item.enqueued_at
            )
            budget -= 1
            n += 1
        return n

    def next_expiry(self) -> float:
        """Earliest expiry among queued items (inf when none)."""
        heap = self._expiry
        while heap and not heap[0][2].queued:
            heapq.heappop(heap)
        return heap[0][0] if heap else math.inf

    async def start(self) -> None:
        """Start the dispatcher task (wakes on enqueue, release, and every poll interval)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="flowcontrol-dispatcher")

    async def stop(self) -> None:
        """Stop the dispatcher and answer every queued request 503."""
        if self._task is not None:
            self._stopping = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            self._stopping = False
        for band in self._bands.values():
            for fq in band.flows.values():
                while fq:
                    item = fq.popleft()
                    if not item.future.done():
                        item.future.set_exception(GatewayError(503, "gateway shutting down", "shutdown"))
            band.count = band.bytes = 0
            band.flow_bytes.clear()
        self._expiry.clear()

    # ---- internals --------------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            self.pump()
            timeout = self.config.poll_interval_s
            if self.queued() == 0:
                timeout = 1.0  # nothing waits: only enqueue/release matter, they set the event
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that races completion.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _band(self, prio: int) -> _Band:
        band = self._bands.get(prio)
        if band is None:
            bc = self.config.band(prio)
            policy_name = bc.policy or self.config.default_policy
            policy: Policy = (
                RoundRobin()
                if policy_name == "round-robin"
                else VirtualTokenCounter(self.config.vtc_input_weight, self.config.vtc_output_weight)
            )
            band = self._bands[prio] = _Band(prio, bc.max_requests, bc.max_bytes, policy, bc.max_in_flight)
            self._order = sorted(self._bands, reverse=True)
        return band

    def _queued_at_or_above(self, prio: int) -> bool:
        for p in self._order:
            if p < prio:
                return False
            if self._bands[p].count:
                return True
        return False

    def _capacity(self, now: float) -> int:
        extra = self.config.dispatch_headroom
        cap = sum(self.detector.headroom(ep, now, extra) for ep in self.datastore.endpoints())
        if self.config.max_in_flight is not None:
            cap = min(cap, self.config.max_in_flight - self._in_flight)
        return cap

    def _band_room(self, prio: int) -> bool:
        band = self._bands.get(prio)
        if band is None:
            return True  # a band's first request: max_in_flight >= 1
        return band.max_in_flight is None or band.in_flight < band.max_in_flight

    def _preempt_room(self, prio: int) -> int:
        """How many more requests of ``prio`` the pool takes on servers that preempt lower-priority work
        (0 when preemption is off or nothing lower is in flight): the pool's batch slots, learned as the
        most requests each endpoint has been seen running, plus the queue each endpoint may hold before
        it counts as saturated (``queueDepthThreshold``), minus this gateway's requests of at least this
        priority in flight (those a request of ``prio`` cannot displace).

        Why the queue allowance: preempted lower-priority requests wait on the servers and make the pool
        look saturated, but a request of ``prio`` goes ahead of them there. It should be held back only
        when work it cannot displace would saturate the pool, exactly as if the lower-priority work were
        not there; holding it at the batch slots queued real-time requests in the gateway behind every
        burst (measured: ``ingate bench async --preemption``, docs/async.md)."""
        if not self.config.preemption:
            return 0
        lower = at_or_above = 0
        for p in self._order:
            if p >= prio:
                at_or_above += self._bands[p].in_flight
            else:
                lower += self._bands[p].in_flight
        if lower == 0:
            return 0
        peaks = self._peak_running
        queue = math.ceil(self.detector.config.queue_depth_threshold) - 1
        slots = 0
        for ep in self.datastore.endpoints():
            if not ep.healthy:
                continue
            peak = peaks.get(ep.address, 0)
            if ep.metrics.running > peak:
                peaks[ep.address] = peak = ep.metrics.running
            slots += peak + queue
        room = slots - at_or_above
        if self.config.max_in_flight is not None:
            room = min(room, self.config.max_in_flight - self._in_flight)
        return room

    def _dispatched(
        self,
        flow: str,
        prio: int,
        tokens: int,
        enq: float,
        now: float,
        queued: bool,
        preempting: bool = False,
    ) -> Ticket:
        self._in_flight += 1
        band = self._band(prio)
        band.in_flight += 1
        if preempting:
            self._preempting += 1
            self.metrics.preemptive.labels(str(prio)).inc()
        # Charge the estimate now so long prompts count before their response completes.
        band.policy.charge(flow, tokens, 0)
        self.metrics.served_tokens.labels(flow, str(prio)).inc(tokens)
        return Ticket(flow, prio, tokens, enq, now, queued, preempting=preempting)

    def _pop_next(self, preempting: bool = False) -> _Item | None:
        """The next item to dispatch; with ``preempting``, only from a band with preemption room."""
        for p in self._order:
            band = self._bands[p]
            if not band.count:
                continue
            if preempting and self._preempt_room(p) <= 0:
                return None  # a lower band has no more room (more requests at or above it, less below)
            if band.max_in_flight is not None and band.in_flight >= band.max_in_flight:
                continue  # at its own cap: lower bands may use the capacity (work-conserving)
            flow = band.policy.next()
            if flow is None:
                continue
            fq = band.flows[flow]
            item = fq.popleft()
            self._account_removed(band, item)
            return item
        return None

    def _account_removed(self, band: _Band, item: _Item) -> None:
        item.queued = False
        band.count -= 1
        band.bytes -= item.size_bytes
        flow = item.fairness_id
        left = band.flow_bytes[flow] - item.size_bytes
        fq = band.flows[flow]
        if not fq:
            band.policy.deactivate(flow)
            del band.flows[flow]
            del band.flow_bytes[flow]
        else:
            band.flow_bytes[flow] = left
        self._gauges(band, flow)

    def _remove(self, band: _Band, item: _Item) -> None:
        fq = band.flows.get(item.fairness_id)
        if fq is None:
            return
        with contextlib.suppress(ValueError):
            fq.remove(item)
            self._account_removed(band, item)

    def _push_expiry(self, item: _Item) -> None:
        heap = self._expiry
        if len(heap) > 2 * self.queued() + 64:
            # Mostly stale entries (items dispatched or cancelled before their expiry): compact, so the
            # heap stays O(queued); amortised O(1) per push.
            heap[:] = [e for e in heap if e[2].queued]
            heapq.heapify(heap)
        heapq.heappush(heap, (item.expires_at, next(self._seq), item))

    def _expire(self, now: float) -> None:
        """Answer 503 to every queued item whose expiry passed: O(log n) per expired or stale entry."""
        heap = self._expiry
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)[2]
            if not item.queued:
                continue  # dispatched or cancelled earlier: a stale entry
            band = self._bands[item.priority]
            fq = band.flows[item.fairness_id]
            # FCFS with one TTL: the item is its flow's head; a shorter per-request deadline may sit deeper.
            if fq[0] is item:
                fq.popleft()
            else:
                fq.remove(item)
            self._account_removed(band, item)
            self.metrics.rejected.labels(str(band.priority), "expired").inc()
            self.metrics.wait.labels(item.fairness_id, str(band.priority), "expired").observe(
                now - item.enqueued_at
            )
            if not item.future.done():
                retry = self.config.retry_after_s if item.expiry_code == "no_endpoint" else None
                item.future.set_exception(
                    GatewayError(
                        503, f"flow control: {item.expiry_reason}", item.expiry_code, retry_after=retry
                    )
                )

    def _gauges(self, band: _Band, flow: str) -> None:
        fq = band.flows.get(flow)
        self.metrics.queue_size.labels(flow, str(band.priority)).set(0 if fq is None else len(fq))
        self.metrics.queue_bytes.labels(flow, str(band.priority)).set(band.flow_bytes.get(flow, 0))
