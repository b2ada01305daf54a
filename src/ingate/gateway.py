"""Assembles a gateway from its config: datastore, metrics scraper, scheduler, director, telemetry.

Data planes (built-in proxy, Envoy) take a started `Gateway` and serve its director.
"""

from __future__ import annotations

from ingate.config import GatewayConfig
from ingate.datastore import Datastore
from ingate.director import Director, FlowControl
from ingate.discovery import endpoints_from_config
from ingate.flowcontrol.controller import FlowController
from ingate.flowcontrol.metrics import FlowControlMetrics
from ingate.metrics.scraper import MetricsScraper
from ingate.scheduling.plugins.prefix import PrefixCacheScorer, PrefixMemoryCollector
from ingate.scheduling.scheduler import build_scheduler
from ingate.telemetry import Telemetry


class Gateway:
    """The endpoint picker's core, independent of the data plane."""

    def __init__(self, cfg: GatewayConfig, flow_control: FlowControl | None = None) -> None:
        self.config = cfg
        self.datastore = Datastore(endpoints_from_config(cfg))
        self.scheduler = build_scheduler(cfg.scheduler, self.datastore)
        self.telemetry = Telemetry(self.datastore, cfg.pool.name)
        prefix = [
            (name, sc)
            for name, prof in self.scheduler.profiles.items()
            for sc, _ in prof.scorers
            if isinstance(sc, PrefixCacheScorer)
        ]
        if prefix:
            self.telemetry.registry.register(PrefixMemoryCollector(prefix, self.datastore))
        m = cfg.metrics
        self.scraper = MetricsScraper(
            self.datastore,
            interval_s=m.interval_ms / 1000,
            timeout_s=m.timeout_ms / 1000,
            stale_after_s=m.stale_after_ms / 1000,
        )
        if flow_control is None and cfg.flow_control is not None and cfg.flow_control.enabled:
            fc = FlowController(
                cfg.flow_control, self.datastore, metrics=FlowControlMetrics(self.telemetry.registry)
            )
            self.datastore.on_remove(lambda ep: fc.detector.forget(ep.address))
            flow_control = fc
        self.flow_control = flow_control
        self.director = Director(cfg, self.datastore, self.scheduler, self.telemetry, flow_control)

    def ready(self) -> bool:
        """At least one healthy endpoint with fresh metrics."""
        return any(ep.healthy and self.scraper.is_fresh(ep) for ep in self.datastore.endpoints())

    async def start(self) -> None:
        await self.scraper.start()
        if isinstance(self.flow_control, FlowController):
            await self.flow_control.start()

    async def stop(self) -> None:
        if isinstance(self.flow_control, FlowController):
            await self.flow_control.stop()  # answers still-queued requests with 503
        await self.scraper.stop()
