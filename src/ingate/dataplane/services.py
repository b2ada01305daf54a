"""The picker's production ports beside any data plane: gRPC health and the admin HTTP port
(metrics, liveness, readiness), configured by the `serving:` section (`ingate.config.ServingConfig`).
They behave the same whether the data plane is Envoy, the picker-only ext_proc server or the built-in
proxy."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from ingate.config import ConfigError, ServingConfig
from ingate.dataplane.admin import AdminServer
from ingate.dataplane.base import PickerCore
from ingate.dataplane.health import HealthServer, HealthState
from ingate.dataplane.tls import ServerTLS


class PickerServices:
    """Starts and stops what `serving:` turns on."""

    def __init__(
        self,
        core: PickerCore,
        cfg: ServingConfig,
        *,
        synced: Callable[[], bool] = lambda: True,
        leader: Callable[[], bool] = lambda: True,
        leader_election: bool = False,
        metrics_auth: Callable[[str | None], Awaitable[tuple[int, str]]] | None = None,
    ) -> None:
        self.draining = False
        """Set when shutdown begins: health answers NOT_SERVING (but liveness) while requests drain."""
        self.health: HealthServer | None = None
        self.admin: AdminServer | None = None
        self.metrics_tls: ServerTLS | None = None
        """HTTPS on the metrics port (`serving.metricsCertDir`), its files watched for changes."""
        if cfg.health_port is not None:
            state = HealthState(
                synced=synced, leader=leader, leader_election=leader_election, draining=lambda: self.draining
            )
            self.health = HealthServer(state, cfg.host, cfg.health_port)
        if cfg.metrics_port is not None:
            token = None
            if cfg.metrics_auth_token_file:
                try:
                    token = Path(cfg.metrics_auth_token_file).read_text().strip()
                except OSError as e:
                    raise ConfigError(f"serving.metricsAuthTokenFile: cannot read: {e}") from None
                if not token:
                    raise ConfigError("serving.metricsAuthTokenFile: the file is empty")
            if cfg.metrics_cert_dir:
                from ingate.dataplane.tls import metrics_tls

                try:
                    self.metrics_tls = metrics_tls(cfg.metrics_cert_dir, cfg.metrics_client_ca_file)
                except ValueError as e:
                    raise ConfigError(f"serving.metricsCertDir: {e}") from None
            self.admin = AdminServer(
                core.registry,
                core.ready,
                cfg.host,
                cfg.metrics_port,
                bearer_token=token,
                authorize=metrics_auth,
                capacity=core.capacity,
                ssl_context=self.metrics_tls.context if self.metrics_tls is not None else None,
            )

    async def start(self) -> None:
        if self.health is not None:
            await self.health.start()
        if self.admin is not None:
            if self.metrics_tls is not None:
                self.metrics_tls.start()
            await self.admin.start()

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.stop()
        if self.metrics_tls is not None:
            await self.metrics_tls.stop()
        if self.health is not None:
            await self.health.stop()

    def describe(self) -> str:
        parts = []
        if self.health is not None:
            parts.append(f"gRPC health on {self.health.host}:{self.health.port}")
        if self.admin is not None:
            parts.append(f"metrics on {self.admin.url}/metrics")
        return ", ".join(parts)
