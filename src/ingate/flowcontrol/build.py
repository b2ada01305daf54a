"""Build a FlowController from the gateway YAML's ``flowControl`` mapping."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from ingate.datastore import Datastore
from ingate.flowcontrol.config import FlowControlConfig
from ingate.flowcontrol.controller import FlowController
from ingate.flowcontrol.metrics import FlowControlMetrics


def build_flow_controller(
    raw: Mapping[str, Any] | None, datastore: Datastore, registry: CollectorRegistry | None = None
) -> FlowController | None:
    """A controller for ``raw`` (None or ``enabled: false`` -> None); raises pydantic ValidationError."""
    if raw is None:
        return None
    return flow_controller(FlowControlConfig.model_validate(dict(raw)), datastore, registry)


def flow_controller(
    cfg: FlowControlConfig, datastore: Datastore, registry: CollectorRegistry | None = None
) -> FlowController | None:
    """A controller for a validated config (None when not enabled), forgetting endpoints that leave
    the pool and exporting its metrics to `registry`."""
    if not cfg.enabled:
        return None
    fc = FlowController(cfg, datastore, metrics=FlowControlMetrics(registry))
    datastore.on_remove(lambda ep: fc.detector.forget(ep.address))
    return fc
