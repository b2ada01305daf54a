"""Open-loop (Poisson) and fixed-concurrency load generation against an OpenAI-compatible endpoint.

The client is kept cheap because it shares the CPU with the fleet and the gateway: one aiohttp session,
SSE parsed minimally (a timestamp per data chunk; token counts come from the final `usage` chunk).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

import aiohttp
import orjson

from ingate.bench.workload import BenchRequest, Load


@dataclass(slots=True)
class RequestRecord:
    """Outcome of one request. Times are seconds; `send` is relative to the start of its stage."""

    send: float
    group: int
    status: int = 0
    error: str = ""
    ttft: float | None = None
    e2e: float | None = None
    itl_mean: float | None = None
    itl_p50: float | None = None
    itl_p99: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Prompt tokens the server served from its prefix cache (`usage.prompt_tokens_details.cached_tokens`,
    # as vLLM and the simulator report it); None when the server does not report it.
    cached_tokens: int | None = None
    chunks: int = 0
    tenant: str = ""
    stream: int = 0  # which request stream of the workload (`load.streams`) sent it

    @property
    def ok(self) -> bool:
        """True when the request completed with HTTP 200 and no stream error."""
        return self.status == 200 and not self.error

    def to_json(self) -> dict[str, Any]:
        """Plain dict for the results file."""
        return asdict(self)


@dataclass(slots=True)
class StageResult:
    """All records of one load stage (one rate or one concurrency value)."""

    rate: float | None
    concurrency: int | None
    duration_s: float
    records: list[RequestRecord] = field(default_factory=list)
    max_inflight_hit: int = 0
    peak_inflight: int = 0


def _pct(sorted_vals: list[float], q: float) -> float:
    idx = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[idx]


async def send_one(
    session: aiohttp.ClientSession, url: str, req: BenchRequest, t0: float, timeout_s: float
) -> RequestRecord:
    """Send one streaming request and time it. Never raises: failures land in `error`."""
    start = time.perf_counter()
    rec = RequestRecord(send=start - t0, group=req.group, tenant=req.tenant)
    headers = {**_JSON, **req.headers} if req.headers else _JSON
    stamps: list[float] = []
    usage: Any = None
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url, data=orjson.dumps(req.body), headers=headers) as resp:
                rec.status = resp.status
                if resp.status != 200:
                    rec.error = (await resp.text())[:200]
                    return rec
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        break
                    now = time.perf_counter()
                    # Only the usage chunk (last, empty choices) is decoded; content chunks are timed.
                    if b'"usage"' in payload and b'"usage":null' not in payload:
                        obj = orjson.loads(payload)
                        if obj.get("usage"):
                            usage = obj["usage"]
                            if not obj.get("choices"):
                                continue
                    if b'"role"' in payload and b'"content":""' in payload:
                        continue  # a chat stream's role announcement (vLLM sends it first): no token yet
                    if b'"error"' in payload:
                        obj = orjson.loads(payload)
                        if "error" in obj:
                            rec.error = str(obj["error"])[:200]
                            break
                    stamps.append(now)
    except TimeoutError:
        rec.error = "timeout"
    except (aiohttp.ClientError, OSError) as e:
        rec.error = f"{type(e).__name__}: {e}"[:200]
    end = time.perf_counter()
    rec.chunks = len(stamps)
    if stamps:
        rec.ttft = stamps[0] - start
        if len(stamps) > 1:
            itls = sorted(b - a for a, b in pairwise(stamps))
            rec.itl_mean = sum(itls) / len(itls)
            rec.itl_p50 = _pct(itls, 0.5)
            rec.itl_p99 = _pct(itls, 0.99)
    if not rec.error:
        rec.e2e = end - start
        if usage:
            rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            rec.completion_tokens = int(usage.get("completion_tokens") or 0)
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and details.get("cached_tokens") is not None:
                rec.cached_tokens = int(details["cached_tokens"])
        elif rec.status == 200:
            rec.error = "no usage chunk"
    return rec


_JSON = {"content-type": "application/json"}


def make_session(limit: int) -> aiohttp.ClientSession:
    """One client session for a whole run, with a connection limit above the in-flight cap."""
    conn = aiohttp.TCPConnector(limit=limit + 16, limit_per_host=0, force_close=False)
    return aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None))


async def run_poisson(
    session: aiohttp.ClientSession,
    url: str,
    next_request: Callable[[], BenchRequest],
    rate: float,
    load: Load,
    rng: random.Random,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> StageResult:
    """Open loop: arrivals follow a Poisson process at `rate` req/s for `load.duration_s` and never wait
    for completions, except that no more than `load.max_inflight` are outstanding (counted if hit)."""
    stage = StageResult(rate=rate, concurrency=None, duration_s=load.duration_s)
    tasks: set[asyncio.Task[RequestRecord]] = set()
    ordered: list[asyncio.Task[RequestRecord]] = []
    t0 = time.perf_counter()
    period = load.burst_on_s + load.burst_off_s
    on_rate = rate * period / load.burst_on_s if load.burst_on_s > 0 and period > 0 else rate
    t = 0.0
    while True:
        t += rng.expovariate(on_rate)
        arrival = _burst_time(t, load) if load.burst_on_s > 0 else t
        if arrival >= load.duration_s:
            break
        delay = t0 + arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= load.max_inflight:
            stage.max_inflight_hit += 1
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.create_task(send_one(session, url, next_request(), t0, load.timeout_s))
        tasks.add(task)
        stage.peak_inflight = max(stage.peak_inflight, len(tasks))

        def _finish(tk: asyncio.Task[RequestRecord]) -> None:
            tasks.discard(tk)
            if on_done is not None and not tk.cancelled():
                on_done(tk.result())

        task.add_done_callback(_finish)
        ordered.append(task)
    stage.records = list(await asyncio.gather(*ordered))
    return stage


def _burst_time(t: float, load: Load) -> float:
    """Map time `t` on the on-phase clock to wall time (on for burst_on_s, then off for burst_off_s)."""
    cycle, phase = divmod(t, load.burst_on_s)
    return cycle * (load.burst_on_s + load.burst_off_s) + phase


async def run_concurrent(
    session: aiohttp.ClientSession,
    url: str,
    next_request: Callable[[], BenchRequest],
    concurrency: int,
    load: Load,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> StageResult:
    """Closed loop: `concurrency` clients each send a request as soon as their previous one ends."""
    stage = StageResult(rate=None, concurrency=concurrency, duration_s=load.duration_s)
    t0 = time.perf_counter()

    async def client() -> None:
        while time.perf_counter() - t0 < load.duration_s:
            rec = await send_one(session, url, next_request(), t0, load.timeout_s)
            stage.records.append(rec)
            if on_done is not None:
                on_done(rec)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    stage.peak_inflight = concurrency
    return stage
