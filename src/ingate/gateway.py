"""Assembles a gateway from its config: datastore, metrics scraper, scheduler, director, telemetry.

Data planes (built-in proxy, Envoy) are built around a started `Gateway` by
`ingate.dataplane.factory.make_dataplane`, which sees it only through the `PickerCore` protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry

from ingate.config import GatewayConfig
from ingate.datastore import Datastore
from ingate.director import Director, FlowControl
from ingate.discovery import endpoints_from_config
from ingate.flowcontrol.build import flow_controller
from ingate.flowcontrol.capacity import CapacityCollector, SlotTracker, capacity_snapshot
from ingate.flowcontrol.controller import FlowController
from ingate.metrics.engines import ENGINES, with_overrides
from ingate.metrics.scraper import MetricsScraper
from ingate.objectives import ObjectiveStore
from ingate.scheduling.plugins.registry import PluginMetricsCollector
from ingate.scheduling.scheduler import build_scheduler
from ingate.telemetry import Telemetry


class Gateway:
    """The endpoint picker's core, independent of the data plane."""

    def __init__(self, cfg: GatewayConfig, flow_control: FlowControl | None = None) -> None:
        self.config = cfg
        self.datastore = Datastore(endpoints_from_config(cfg))
        self.scheduler = build_scheduler(cfg.scheduler, self.datastore)
        self.telemetry = Telemetry(self.datastore, cfg.pool.name)
        plugin_metrics = PluginMetricsCollector(self.scheduler.plugins(), self.datastore)
        if plugin_metrics.plugins:
            self.telemetry.registry.register(plugin_metrics)
        self.telemetry.registry.register(self.scheduler.timings())
        m = cfg.metrics
        engine = cfg.pool.engine
        self.scraper = MetricsScraper(
            self.datastore,
            interval_s=m.interval_ms / 1000,
            timeout_s=m.timeout_ms / 1000,
            stale_after_s=m.stale_after_ms / 1000,
            path=m.path,
            port=m.port,
            scheme=m.scheme,
            insecure_skip_verify=m.insecure_skip_verify,
            # the metric-name overrides apply to the pool's default engine (pods labelled with
            # another engine keep its names)
            engines={**ENGINES, engine: with_overrides(ENGINES[engine], m.names.model_dump())},
        )
        if flow_control is None and cfg.flow_control is not None:
            flow_control = flow_controller(cfg.flow_control, self.datastore, self.telemetry.registry)
        self.flow_control = flow_control
        self.objectives = ObjectiveStore.from_config(cfg)
        """Objectives and rewrites: the config's, plus what a discovery source adds at run time."""
        self.synced: Callable[[], bool] = lambda: True
        """The pool is known (static config: at once; a discovery source replaces this)."""
        self.director = Director(
            cfg, self.datastore, self.scheduler, self.telemetry, flow_control, objectives=self.objectives
        )
        fc_ctl = flow_control if isinstance(flow_control, FlowController) else None
        if fc_ctl is not None:
            # Scale from zero: a request waiting for an endpoint goes as soon as one appears.
            self.datastore.on_add(lambda ep: fc_ctl.wake())
        # The capacity signal async processors dispatch into (GET /v1/capacity, ingate_pool_* gauges),
        # for the bands the objectives use.
        self._bands = sorted({o.priority for o in cfg.objectives} | {0})
        self._slots = SlotTracker()
        self.telemetry.registry.register(
            CapacityCollector(self.datastore, fc_ctl, priorities=self._bands, pool=cfg.pool.name)
        )

    @property
    def registry(self) -> CollectorRegistry:
        """The gateway's Prometheus registry (what `/metrics` serves)."""
        return self.telemetry.registry

    def capacity(self, priorities: Iterable[int] = ()) -> dict[str, Any]:
        """The pool's free capacity document (`ingate.flowcontrol.capacity`), e.g. for `ingate async`."""
        fc = self.flow_control if isinstance(self.flow_control, FlowController) else None
        bands = (*self._bands, *priorities)
        return capacity_snapshot(self.datastore, fc, priorities=bands, slots=self._slots)

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
        # Plugins holding background resources (e.g. precise-prefix's KV-event subscriptions).
        for _, plugin in self.scheduler.plugins():
            aclose = getattr(plugin, "aclose", None)
            if aclose is not None:
                await aclose()
