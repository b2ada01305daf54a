"""The async processor: claim messages, send them to the gateway as sheddable traffic, write results.

One loop claims as many messages as the dispatch window allows; each message is handled by its own task:
validate -> skip if its id already has an outcome -> expire/cancel -> POST to the gateway with the
objective and fairness headers -> write the result, or put the message back with a delay. While a request
is in flight its lease is renewed and its cancellation checked. On SIGTERM (``stop``) it stops claiming,
lets in-flight requests finish for ``grace_s`` and puts the rest back at once (no attempt counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from ingate.asyncproc.backends.base import Delivery, QueueBackend
from ingate.asyncproc.backoff import parse_retry_after, retry_delay
from ingate.asyncproc.metrics import AsyncMetrics
from ingate.asyncproc.models import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    DEFAULT_ENDPOINTS,
    DEFAULT_MAX_MESSAGE_BYTES,
    INVALID_REQUEST,
    AsyncRequest,
    AsyncResult,
    InvalidMessage,
    parse_message,
)
from ingate.asyncproc.window import AimdWindow

REQUEUE_TIMEOUT_S = 5.0
"""How long a drained request's requeue may take before its lease is left to expire instead."""

log = logging.getLogger("ingate.async")

# Objective and fairness headers: ingate reads the x-gateway-* names, llm-d-router the x-llm-d-* ones;
# both are sent so the processor works in front of either.
OBJECTIVE_HEADERS = ("x-gateway-inference-objective", "x-llm-d-inference-objective")
FAIRNESS_HEADERS = ("x-llm-d-inference-fairness-id", "x-gateway-inference-fairness-id")
DROPPED_REASON_HEADER = "x-llm-d-request-dropped-reason"
GATES = ("ingate", "prometheus-saturation", "prometheus-budget")


@dataclass
class ProcessorConfig:
    """Settings of one processor (CLI flags of ``ingate async run``; defaults documented in docs/async.md)."""

    gateway_url: str
    objective: str | None = "async"
    """InferenceObjective sent with every request; give it a negative priority (sheddable) in the gateway."""
    band: int = -1
    """Priority of that objective: the band whose free capacity the capacity signal reports for us."""
    max_concurrency: int = 64
    initial_window: int = 4
    min_window: int = 1
    latency_objective_s: float | None = None
    """Grow the window only on successes faster than this (None: every success)."""
    lease_s: float = 60.0
    max_attempts: int = 5
    backoff_base_s: float = 2.0
    backoff_max_s: float = 60.0
    request_timeout_s: float = 600.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    endpoints: frozenset[str] = DEFAULT_ENDPOINTS
    poll_interval_s: float = 0.2
    capacity_url: str | None = None
    capacity_interval_s: float = 0.1
    capacity_stale_s: float = 2.0
    slots_only: bool = True
    """Dispatch only into the signal's ``free_slots`` too (requests that start running at once); off: up
    to the gateway's queue-depth headroom (more throughput, real-time requests may queue behind async)."""
    reserve_slots: int = 0
    """With ``slots_only``: leave this many of the pool's free batch slots to real-time arrivals (they
    start at once instead of preempting or waiting for async work); trades idle capacity for real-time
    tail latency."""
    grace_s: float = 30.0
    cancel_check_s: float = 1.0
    gate: str = "ingate"
    """``ingate``: AIMD window + free capacity per band (capacity_interval_s). ``prometheus-saturation``
    and ``prometheus-budget`` reproduce llm-d-async's gates for comparison: every ``gate_poll_s`` at most
    ``floor(gate_batch_size x budget)`` new dispatches into a fixed pool of ``max_concurrency`` workers,
    budget from the same capacity document (see docs/async.md)."""
    gate_threshold: float = 0.8
    gate_baseline: float = 0.05
    gate_max_concurrency: float = 100.0
    gate_batch_size: int = 10
    gate_poll_s: float = 1.0
    exit_when_empty: bool = False
    """Return from ``run`` once the backend holds no message (batch mode)."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra headers on every request (e.g. authorization)."""


class Processor:
    """Consumes one backend; ``await run()`` until ``stop()`` (or until empty in batch mode)."""

    def __init__(
        self,
        backend: QueueBackend,
        config: ProcessorConfig,
        *,
        metrics: AsyncMetrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.backend = backend
        self.config = config
        self._last_got = time.monotonic()  # the last claim that returned messages
        self.metrics = metrics if metrics is not None else AsyncMetrics()
        self.rng = rng or random.Random()
        c = config
        if c.gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(GATES)}")
        self.adaptive = c.gate == "ingate"
        if not self.adaptive and not c.capacity_url:
            raise ValueError(f"gate {c.gate} reads the capacity document: set capacity_url")
        self.window = AimdWindow(
            initial=c.initial_window if self.adaptive else c.max_concurrency,
            minimum=c.min_window,
            maximum=c.max_concurrency,
            objective_s=c.latency_objective_s,
        )
        self.stats: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._signal_at = 0.0
        self.last_signal: dict[str, Any] | None = None

    # ---- lifecycle --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Begin a graceful drain: stop claiming; in-flight requests get ``grace_s`` to finish."""
        self._stop.set()
        self.window.wake()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> None:
        c = self.config
        self._last_got = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=timeout,
            json_serialize=lambda o: orjson.dumps(o).decode(),
        ) as session:
            self._session = session
            helpers = [asyncio.create_task(self._backlog_loop(), name="async-backlog")]
            if c.capacity_url:
                # Nothing is sent before the first reading (or until it is overdue by capacity_stale_s).
                self.window.set_headroom(0)
                self._signal_at = time.monotonic()
                helpers.append(asyncio.create_task(self._signal_loop(session), name="async-capacity"))
            try:
                await self._claim_loop()
                await self._drain()
            finally:
                for t in helpers:
                    t.cancel()
                for t in helpers:
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
                self._session = None

    async def _claim_loop(self) -> None:
        c = self.config
        w = self.window
        while not self.stopping:
            if not await self._acquire():
                return
            n = 1
            while w.can_dispatch() and n < 32:
                w.in_flight += 1
                if w.headroom is not None:
                    w.headroom -= 1
                n += 1
            try:
                got = await self.backend.claim(n, c.lease_s)
            except Exception as e:  # a failing store must not kill the processor: wait and retry
                log.warning("claim failed: %s", e)
                got = []
            for _ in range(n - len(got)):
                w.in_flight -= 1
                if w.headroom is not None:
                    w.headroom += 1
            self._set_gauges()
            if got:
                self._last_got = time.monotonic()
            for d in got:
                t = asyncio.create_task(self._handle_guarded(d), name=f"async-{d.key}")
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)
            if not got:
                if c.exit_when_empty and not self._tasks and await self._empty():
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(c.poll_interval_s):
                        await self._stop.wait()

    async def _empty(self) -> bool:
        # A broker that hides messages a dead consumer pulled (Pub/Sub: until their ack deadline) is
        # empty only after that long without a delivery (the backend's `quiet_s`).
        if time.monotonic() - self._last_got < self.backend.quiet_s:
            return False
        try:
            return await self.backend.backlog() == 0
        except Exception:
            return False

    async def _acquire(self) -> bool:
        """Take a window slot; False if stopping first."""
        acq = asyncio.create_task(self.window.acquire())
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({acq, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if acq.done() and not acq.cancelled():
            if self.stopping:
                self.window.release()
                return False
            return True
        acq.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acq
        if acq.done() and not acq.cancelled():
            self.window.release()  # acquired in the same tick as the stop
        return False

    async def _drain(self) -> None:
        """Give in-flight requests ``grace_s``, then put the rest back on the queue."""
        if not self._tasks:
            return
        log.info("draining %d in-flight requests (grace %.0f s)", len(self._tasks), self.config.grace_s)
        _done, pending = await asyncio.wait(set(self._tasks), timeout=self.config.grace_s)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=REQUEUE_TIMEOUT_S + 1.0)

    def _set_gauges(self) -> None:
        self.metrics.in_flight.set(self.window.in_flight)
        self.metrics.window.set(self.window.limit)
        h = self.window.headroom
        self.metrics.headroom.set(-1 if h is None else h)

    async def _backlog_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                self.metrics.backlog.set(await self.backend.backlog())
            self._set_gauges()
            await asyncio.sleep(1.0)

    async def _signal_loop(self, session: aiohttp.ClientSession) -> None:
        """Poll the gateway's capacity document; shrink on saturation or queued real-time traffic."""
        c = self.config
        assert c.capacity_url is not None
        while True:
            now = time.monotonic()
            try:
                async with session.get(c.capacity_url, timeout=aiohttp.ClientTimeout(total=1.0)) as r:
                    doc = await r.json(content_type=None) if r.status == 200 else None
            except (aiohttp.ClientError, TimeoutError, ValueError):
                doc = None
            if not self.adaptive:
                self.apply_budget_gate(doc if isinstance(doc, dict) else None)
            elif isinstance(doc, dict):
                self.apply_signal(doc, now)
            elif now - self._signal_at > c.capacity_stale_s:
                # No fresh signal: dispatch by the window alone; the gateway still sheds what it cannot take.
                self.window.set_headroom(None)
            self._set_gauges()
            await asyncio.sleep(c.capacity_interval_s if self.adaptive else c.gate_poll_s)

    def apply_signal(self, doc: dict[str, Any], now: float | None = None) -> None:
        """Use one capacity reading (the shape of ingate.flowcontrol.capacity.capacity_snapshot)."""
        self._signal_at = time.monotonic() if now is None else now
        self.last_signal = doc
        free_map = doc.get("free_capacity")
        free: int | None = None
        if isinstance(free_map, dict):
            v = free_map.get(str(self.config.band))
            if isinstance(v, int | float):
                free = int(v)
        slots = doc.get("free_slots")
        if self.config.slots_only and isinstance(slots, int | float):
            # Only into batch slots that are free now: async work never queues on a model server, so a
            # real-time request never waits behind it there (it may still wait for a slot to free up).
            usable = max(0, int(slots) - self.config.reserve_slots)
            free = usable if free is None else min(free, usable)
        congested = bool(doc.get("saturated")) or (doc.get("realtime_queued") or 0) > 0
        if congested and self.window.in_flight > 0 and self.window.on_congestion():
            self.metrics.window_decreases.labels("signal").inc()
        self.window.set_headroom(free)

    def gate_budget(self, doc: dict[str, Any] | None) -> float:
        """llm-d-async's metric gates on one capacity reading: budget in [0, 1] (0 = closed; an unreadable
        reading uses the fallback 0, failing closed as upstream does)."""
        c = self.config
        if doc is None:
            return 0.0
        if c.gate == "prometheus-saturation":
            sat = doc.get("pool_saturation")
            if not isinstance(sat, int | float):
                return 0.0
            value, threshold = 1.0 - float(sat), 1.0 - c.gate_threshold
        else:  # prometheus-budget, first source: the picker's flow-control queue
            ready = doc.get("ready_endpoints") or 0
            queued = doc.get("queued") or {}
            if not ready or not isinstance(queued, dict):
                return 0.0
            q = sum(v for v in queued.values() if isinstance(v, int | float))
            value, threshold = 1.0 - q / (ready * c.gate_max_concurrency), c.gate_baseline
        return 0.0 if value <= threshold else min(1.0, value - threshold)

    def apply_budget_gate(self, doc: dict[str, Any] | None) -> None:
        """One poll of an llm-d-async gate: allow ``floor(batch x budget)`` dispatches until the next."""
        self.last_signal = doc
        self.window.set_headroom(math.floor(self.config.gate_batch_size * self.gate_budget(doc)))

    # ---- one message ------------------------------------------------------------------------------

    async def _handle_guarded(self, d: Delivery) -> None:
        try:
            await self._handle(d)
        except asyncio.CancelledError:
            # Drain timeout: back to the queue at once, no attempt counted. Bounded: if the store does not
            # answer, the lease expires and the message is redelivered all the same.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(REQUEUE_TIMEOUT_S):
                    await self.backend.retry(d.key, 0.0, count_attempt=False, error="processor shut down")
            self.stats["requeued"] += 1
        except Exception as e:
            # A bug or a failing store: leave the message to its lease (redelivered), never crash the loop.
            log.exception("message %s: %s", d.key, e)
            self.stats["internal_error"] += 1
        finally:
            self.window.release()
            self._set_gauges()

    async def _finish(self, d: Delivery, result: AsyncResult, outcome: str, created: float = 0.0) -> None:
        wrote = await self.backend.complete(d.key, result)
        if not wrote:
            self.metrics.duplicates.inc()
            self.stats["duplicate"] += 1
            return
        self.metrics.completed.labels(outcome).inc()
        self.stats[outcome] += 1
        if created > 0:
            self.metrics.age.observe(max(0.0, time.time() - created))

    async def _handle(self, d: Delivery) -> None:
        c = self.config
        msg = parse_message(d.body, max_bytes=c.max_message_bytes, endpoints=c.endpoints)
        if isinstance(msg, InvalidMessage):
            rid = msg.id or f"invalid-{self.backend.name}-{_short(d.key)}"
            self.metrics.invalid.inc()
            await self._finish(d, AsyncResult.error(rid, INVALID_REQUEST, msg.reason), "invalid")
            return
        req = msg
        if await self.backend.has_result(req.id):
            await self.backend.ack(d.key)
            self.metrics.duplicates.inc()
            self.stats["duplicate"] += 1
            return
        if req.deadline <= time.time():
            self.metrics.deadline_expired.inc()
            await self._finish(
                d, AsyncResult.error(req.id, DEADLINE_EXCEEDED, "deadline exceeded"), "expired", req.created
            )
            return
        if await self.backend.is_cancelled(req.id):
            await self._finish(d, AsyncResult.error(req.id, CANCELLED, "cancelled"), "cancelled", req.created)
            return

        send = asyncio.create_task(self._send(req))
        outcome = await self._watch(d, req, send)
        if outcome is None:  # cancelled while in flight
            await self._finish(d, AsyncResult.error(req.id, CANCELLED, "cancelled"), "cancelled", req.created)
            return
        status, body, headers, latency, err = outcome
        label = "error" if status == 0 else f"{status // 100}xx"
        self.metrics.request_seconds.labels(label).observe(latency)
        if 200 <= status < 300:
            if self.adaptive:
                self.window.on_success(latency)
            await self._finish(d, AsyncResult.http(req.id, status, body), "ok", req.created)
            return
        if status == 429 or status == 503:
            self.metrics.shed.labels(str(status)).inc()
            if self.adaptive and self.window.on_congestion():
                self.metrics.window_decreases.labels(str(status)).inc()
        if status == 429:
            # Shed: not a failure, back to the queue after Retry-After (bounded by the deadline).
            ra = parse_retry_after(headers.get("retry-after"))
            await self._again(
                d,
                req,
                1,
                ra,
                count=False,
                error=f"shed: 429 {_reason(headers, body)}",
                why="shed",
                latency=latency,
            )
            return
        if status >= 500 or status == 0:
            error = err or f"{status} {_reason(headers, body)}"
            if status == 0 and req.deadline <= time.time():
                self.metrics.deadline_expired.inc()
                await self._finish(
                    d,
                    AsyncResult.error(req.id, DEADLINE_EXCEEDED, f"deadline exceeded in flight: {error}"),
                    "expired",
                    req.created,
                )
                return
            attempts = d.attempts + 1
            if attempts >= c.max_attempts:
                await self.backend.dead_letter(d.key, req.id, f"after {attempts} attempts: {error}")
                self.metrics.dead_lettered.inc()
                self.stats["dead_lettered"] += 1
                return
            ra = parse_retry_after(headers.get("retry-after"))
            await self._again(d, req, attempts, ra, count=True, error=error, why="error", latency=latency)
            return
        # Any other answer (400, 404, 413, ...) is final: the gateway's answer is the result.
        await self._finish(d, AsyncResult.http(req.id, status, body), "client_error", req.created)

    async def _again(
        self,
        d: Delivery,
        req: AsyncRequest,
        attempt: int,
        retry_after: float | None,
        *,
        count: bool,
        error: str,
        why: str,
        latency: float,
    ) -> None:
        c = self.config
        left = req.deadline - time.time()
        delay = retry_delay(
            attempt,
            left,
            retry_after_s=retry_after,
            base_s=c.backoff_base_s,
            max_s=c.backoff_max_s,
            rng=self.rng,
        )
        # A retry that cannot come back before the deadline (it took ``latency`` this time) is useless; this
        # also stops ever-shorter backoffs converging on the deadline.
        if delay is None or left - delay < max(0.1, latency):
            self.metrics.deadline_expired.inc()
            await self._finish(
                d,
                AsyncResult.error(req.id, DEADLINE_EXCEEDED, f"deadline exceeded; last: {error}"),
                "expired",
                req.created,
            )
            return
        await self.backend.retry(d.key, delay, count_attempt=count, error=error)
        self.metrics.retried.labels(why).inc()
        self.stats["retried_" + why] += 1

    async def _watch(
        self,
        d: Delivery,
        req: AsyncRequest,
        send: asyncio.Task[tuple[int, bytes, dict[str, str], float, str]],
    ) -> tuple[int, bytes, dict[str, str], float, str] | None:
        """Wait for ``send`` while renewing the lease and checking for cancellation; None if cancelled."""
        c = self.config
        period = max(0.05, min(c.lease_s / 3, c.cancel_check_s))
        try:
            while True:
                done, _ = await asyncio.wait({send}, timeout=period)
                if done:
                    return send.result()
                # Shielded: a drain cancelling this task mid-command must not cut a store command in
                # half (a Redis connection left mid-reply is unusable); the cancellation lands after it.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.backend.extend(d.key, c.lease_s))
                cancelled = False
                with contextlib.suppress(Exception):
                    cancelled = await asyncio.shield(self.backend.is_cancelled(req.id))
                if cancelled:
                    send.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await send
                    return None
        finally:
            if not send.done():
                send.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await send

    def request_headers(self, req: AsyncRequest) -> dict[str, str]:
        """Headers sent to the gateway: the message's own, then ours (objective, fairness) over them."""
        h = {k.lower(): v for k, v in req.headers.items()}
        h.update({k.lower(): v for k, v in self.config.headers.items()})
        h["content-type"] = "application/json"
        h.setdefault("x-request-id", req.id)
        if self.config.objective:
            for name in OBJECTIVE_HEADERS:
                h[name] = self.config.objective
        user = req.metadata.get("userid")
        if user:
            for name in FAIRNESS_HEADERS:
                h[name] = user
        return h

    async def _send(self, req: AsyncRequest) -> tuple[int, bytes, dict[str, str], float, str]:
        """POST the payload; (status, body, headers, seconds, error); status 0 when no HTTP answer."""
        assert self._session is not None
        c = self.config
        budget = min(c.request_timeout_s, req.deadline - time.time())
        t0 = time.monotonic()
        try:
            async with self._session.post(
                c.gateway_url.rstrip("/") + req.endpoint,
                data=orjson.dumps(req.payload),
                headers=self.request_headers(req),
                timeout=aiohttp.ClientTimeout(total=max(0.001, budget)),
            ) as r:
                body = await r.read()
                return r.status, body, {k.lower(): v for k, v in r.headers.items()}, time.monotonic() - t0, ""
        except TimeoutError:
            return 0, b"", {}, time.monotonic() - t0, f"no answer within {budget:.1f} s"
        except aiohttp.ClientError as e:
            return 0, b"", {}, time.monotonic() - t0, f"gateway unreachable: {e.__class__.__name__}: {e}"


def _short(key: str) -> str:
    """A backend key short enough for an id (some backends key a message by its whole text)."""
    if len(key) <= 40:
        return key
    return hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()[:16]


def _reason(headers: dict[str, str], body: bytes) -> str:
    """A short reason from a gateway error answer (drop-reason header or OpenAI error code/message)."""
    r = headers.get(DROPPED_REASON_HEADER)
    if r:
        return r
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
        err = orjson.loads(body).get("error") or {}
        return str(err.get("code") or err.get("message") or "")[:200]
    return body[:200].decode("utf-8", errors="replace")
