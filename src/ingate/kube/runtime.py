"""Everything Kubernetes mode runs beside the gateway, started and stopped in the right order.

`ingate serve` in Kubernetes mode: `rt = await KubeRuntime.start(KubeOptions.from_epp(epp),
gateway.datastore, gateway.objectives, metrics_auth=epp.get("metrics-endpoint-auth"))`, then the health
service reads `rt.synced` and `rt.leader`, the metrics server asks `rt.metrics_auth.check(header)`, and
shutdown calls `await rt.stop()`: the Lease is released first (a standby takes over at once), then the
watches stop (endpoints stay as they were) and the client closes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from kubernetes_asyncio import client

from ingate.datastore import Datastore
from ingate.kube.controller import KubeDiscovery
from ingate.kube.leader import Elector
from ingate.kube.metrics_auth import MetricsAuth
from ingate.kube.options import KubeOptions
from ingate.objectives import ObjectiveStore


@dataclass
class KubeRuntime:
    options: KubeOptions
    api: client.ApiClient
    discovery: KubeDiscovery
    elector: Elector
    metrics_auth: MetricsAuth | None = None

    @classmethod
    async def start(
        cls,
        options: KubeOptions,
        datastore: Datastore,
        objectives: ObjectiveStore,
        *,
        metrics_auth: bool = False,
        identity: str | None = None,
    ) -> KubeRuntime:
        """Validate the options (ValueError naming the flag), connect, start watching and campaigning."""
        options.validate()
        api = await options.connect()
        disc = options.discovery(datastore, objectives, api=api)
        el = options.elector(identity=identity, api=api)
        rt = cls(options, api, disc, el, MetricsAuth(api) if metrics_auth else None)
        try:
            await disc.start()
            await el.start()
        except BaseException:
            await rt.stop()
            raise
        return rt

    def synced(self) -> bool:
        """The pool and its pods were read (readiness, with `leader`)."""
        return self.discovery.synced.is_set()

    def leader(self) -> bool:
        return self.elector.is_leader

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.elector.stop()
        with contextlib.suppress(Exception):
            await self.discovery.stop()
        await self.api.close()
