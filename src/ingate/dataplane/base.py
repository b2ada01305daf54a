"""What every data plane is, and what it may see of the picker.

A data plane (`DataPlane`) is started and stopped by `ingate serve` and reached at `url`. It is built
around a `PickerCore` (structurally, `ingate.gateway.Gateway`): requests go through the director seam
(`ingate.lifecycle.DirectorLike`), and a data plane may also read the config, the pool's endpoints,
readiness and the metrics registry. Nothing in `ingate.dataplane` imports the gateway or scheduling.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from ingate.config import GatewayConfig
from ingate.datastore import Datastore
from ingate.lifecycle import DirectorLike


class DataPlane(Protocol):
    @property
    def url(self) -> str:
        """Where clients (or Envoy, for a picker-only server) reach it."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ServingDirector(DirectorLike, Protocol):
    """The director seam plus the model list a data plane serves on `/v1/models`."""

    def models(self) -> list[dict[str, Any]]: ...


class PickerCore(Protocol):
    """The parts of a started gateway a data plane may use."""

    @property
    def config(self) -> GatewayConfig: ...

    @property
    def director(self) -> ServingDirector: ...

    @property
    def datastore(self) -> Datastore: ...

    @property
    def registry(self) -> CollectorRegistry: ...

    def ready(self) -> bool:
        """At least one endpoint can take requests (readiness probes)."""
        ...

    def capacity(self, priorities: Iterable[int] = ()) -> dict[str, Any]:
        """The pool's free capacity document (`GET /v1/capacity`)."""
        ...
