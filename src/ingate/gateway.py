"""Assembles a gateway from its config: datastore, metrics scraper, scheduler, director, telemetry.

Data planes (built-in proxy, Envoy) take a started `Gateway` and serve its director.
"""

from __future__ import annotations

from ingate.config import GatewayConfig
from ingate.datastore import Datastore
from ingate.director import Director, FlowControl
from ingate.discovery import endpoints_from_config
from ingate.metrics.scraper import MetricsScraper
from ingate.scheduling.scheduler import build_scheduler
from ingate.telemetry import Telemetry


class Gateway:
    """The endpoint picker's core, independent of the data plane."""

    def __init__(self, cfg: GatewayConfig, flow_control: FlowControl | None = None) -> None:
        self.config = cfg
        self.datastore = Datastore(endpoints_from_config(cfg))
        self.scheduler = build_scheduler(cfg.scheduler, self.datastore)
        self.telemetry = Telemetry(self.datastore, cfg.pool.name)
        m = cfg.metrics
        self.scraper = MetricsScraper(
            self.datastore,
            interval_s=m.interval_ms / 1000,
            timeout_s=m.timeout_ms / 1000,
            stale_after_s=m.stale_after_ms / 1000,
        )
        self.director = Director(cfg, self.datastore, self.scheduler, self.telemetry, flow_control)

    def ready(self) -> bool:
        """At least one healthy endpoint with fresh metrics."""
        return any(ep.healthy and self.scraper.is_fresh(ep) for ep in self.datastore.endpoints())

    async def start(self) -> None:
        await self.scraper.start()

    async def stop(self) -> None:
        await self.scraper.stop()
