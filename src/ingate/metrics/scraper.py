"""Polls every endpoint's /metrics concurrently and writes the results into the datastore.

One task per endpoint, so a slow or dead endpoint never delays the others; a supervisor reconciles the
tasks with the datastore's membership. A failed scrape keeps the previous values but not their
freshness (`EndpointMetrics.updated_at` stays old), so consumers see the staleness.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Mapping

import aiohttp

from ingate.datastore import Datastore, Endpoint
from ingate.metrics.engines import ENGINES, EngineMetricNames, parse_metrics

log = logging.getLogger("ingate.metrics")


class MetricsScraper:
    """Keeps `Endpoint.metrics` fresh (default every 50 ms) for every endpoint in the datastore."""

    def __init__(
        self,
        datastore: Datastore,
        interval_s: float = 0.05,
        timeout_s: float = 1.0,
        stale_after_s: float = 0.2,
        path: str = "/metrics",
        *,
        port: int | None = None,
        scheme: str = "http",
        insecure_skip_verify: bool = True,
        engines: Mapping[str, EngineMetricNames] = ENGINES,
    ) -> None:
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError("interval and timeout must be positive")
        self.datastore = datastore
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.stale_after_s = stale_after_s
        self.path = path
        self.port = port
        """Scrape this port instead of each endpoint's serving port (`--model-server-metrics-port`)."""
        self.scheme = scheme
        self.insecure_skip_verify = insecure_skip_verify
        self.engines = engines
        """Engine -> where its signals live (with `metrics.names` overrides applied)."""
        self._tasks: dict[Endpoint, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self.scrapes = 0
        self.failures = 0
        self._stopping = False
        # A new endpoint (a pod that just turned ready) is scraped at once rather than at the next
        # supervisor tick: until its first scrape it counts as saturated, so requests held while the
        # pool was empty (scale from zero) would wait up to 0.5 s longer.
        datastore.on_add(self._endpoint_added)

    async def __aenter__(self) -> MetricsScraper:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._stopping = False
        tls: ssl.SSLContext | bool = True
        if self.scheme == "https" and self.insecure_skip_verify:
            tls = False  # aiohttp: do not verify the certificate
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, ssl=tls),
        )
        self._reconcile()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def stop(self) -> None:
        """Stop every scrape loop and close the session; never waits more than a few seconds.

        The loops also check a stop flag: a cancellation that lands while aiohttp's own request timeout
        fires can come back as a TimeoutError, which a loop would otherwise treat as a failed scrape
        and carry on after.
        """
        self._stopping = True
        tasks = list(self._tasks.values())
        if self._supervisor is not None:
            tasks.append(self._supervisor)
        for t in tasks:
            t.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(2.0, 2 * self.timeout_s))
            for t in pending:
                log.warning("scrape task %s did not stop", t.get_name())
        self._tasks.clear()
        self._supervisor = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def is_fresh(self, ep: Endpoint, now: float | None = None) -> bool:
        return ep.metrics.age(now) <= self.stale_after_s

    def target(self, ep: Endpoint) -> str:
        """The URL scraped for `ep`."""
        host = f"[{ep.host}]" if ":" in ep.host else ep.host
        return f"{self.scheme}://{host}:{self.port or ep.port}{self.path}"

    async def scrape_once(self, ep: Endpoint) -> bool:
        """Scrape one endpoint now; True on success."""
        assert self._session is not None, "scraper not started"
        names = self.engines.get(ep.engine) or self.engines.get("vllm") or ENGINES["vllm"]
        try:
            async with self._session.get(self.target(ep)) as resp:
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
                text = await resp.text()
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError from e  # we were cancelled while the timeout fired
            self.failures += 1
            ep.metrics.scrape_error = f"{type(e).__name__}: {e}"
            if isinstance(e, aiohttp.ClientConnectorError) and not isinstance(e, TimeoutError):
                ep.healthy = False  # refuses connections: keep it out of scheduling until it answers
            # A slow answer (timeout) or a dropped keep-alive connection only makes the metrics stale:
            # on an overloaded host every scrape can time out at once, and taking the whole pool out
            # of scheduling for that would turn a slow gateway into one that answers 503.
            return False
        ep.metrics = parse_metrics(text, names, time.monotonic())
        ep.healthy = True
        self.scrapes += 1
        return True

    async def _loop(self, ep: Endpoint) -> None:
        while not self._stopping:
            t0 = time.monotonic()
            await self.scrape_once(ep)
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - t0)))

    def _reconcile(self) -> None:
        current = set(self.datastore.endpoints())
        for ep, task in list(self._tasks.items()):
            if ep not in current:
                task.cancel()
                del self._tasks[ep]
        loop = asyncio.get_running_loop()
        for ep in current:
            if ep not in self._tasks:
                self._tasks[ep] = loop.create_task(self._loop(ep), name=f"scrape-{ep.address}")

    def _endpoint_added(self, ep: Endpoint) -> None:
        if self._session is not None and not self._stopping and ep not in self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks[ep] = loop.create_task(self._loop(ep), name=f"scrape-{ep.address}")

    async def _supervise(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.5)
            self._reconcile()
