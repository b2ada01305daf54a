"""`grpc.health.v1.Health` on the health port (upstream: 9003), as the upstream endpoint picker answers
its Kubernetes gRPC probes and Envoy's gRPC health checks.

Without leader election every service name answers SERVING once the pool is synced (NOT_SERVING
before). With leader election (`--ha-enable-leader-election`, active-passive):

| service | SERVING when |
|---|---|
| `liveness` | always (a standby must not be restarted for being a standby) |
| `readiness`, `""`, `inference-extension`, `envoy.service.ext_proc.v3.ExternalProcessor` | synced and leader |
| anything else | never: `SERVICE_UNKNOWN` |

`Check` answers at once; `Watch` streams the status now and on every change (upstream leaves Watch
unimplemented; Envoy's and grpc-health-probe's checks use Check).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
LIVENESS = "liveness"
READINESS = "readiness"
INFERENCE_EXTENSION = "inference-extension"
"""The service name the upstream chart's single-replica probes ask for."""
READY_SERVICES = frozenset({READINESS, "", INFERENCE_EXTENSION, EXT_PROC_SERVICE})
WATCH_POLL_S = 0.2

Status = health_pb2.HealthCheckResponse.ServingStatus


@dataclass
class HealthState:
    """What the answers depend on: the pool is synced (static config: at once; Kubernetes: after the
    first list of the pool and its pods), and, with leader election, this replica leads."""

    synced: Callable[[], bool]
    leader: Callable[[], bool] = lambda: True
    leader_election: bool = False
    draining: Callable[[], bool] = lambda: False
    """Shutting down (`--drain-timeout`): every service but `liveness` answers NOT_SERVING, so the
    gateway stops sending new streams while the open ones finish."""

    def status(self, service: str) -> int:
        if self.draining():
            return (
                health_pb2.HealthCheckResponse.SERVING
                if service == LIVENESS
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
        synced = self.synced()
        if not self.leader_election:
            return (
                health_pb2.HealthCheckResponse.SERVING
                if synced
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
        if service == LIVENESS:
            return health_pb2.HealthCheckResponse.SERVING
        if service not in READY_SERVICES:
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        ok = synced and self.leader()
        return health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self, state: HealthState) -> None:
        self.state = state

    async def Check(self, request: Any, context: Any) -> Any:
        return health_pb2.HealthCheckResponse(status=self.state.status(request.service))

    async def Watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        last = None
        while True:
            now = self.state.status(request.service)
            if now != last:
                last = now
                yield health_pb2.HealthCheckResponse(status=now)
            await asyncio.sleep(WATCH_POLL_S)

    async def List(self, request: Any, context: Any) -> Any:
        services = [EXT_PROC_SERVICE]
        if self.state.leader_election:
            services += [LIVENESS, READINESS]
        return health_pb2.HealthListResponse(
            statuses={s: health_pb2.HealthCheckResponse(status=self.state.status(s)) for s in services}
        )


class HealthServer:
    """The health service on its own plaintext gRPC port (probes do not speak TLS)."""

    def __init__(self, state: HealthState, host: str = "0.0.0.0", port: int = 9003) -> None:
        self.state = state
        self.host = host
        self.port = port
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(self.state), server)
        bound = server.add_insecure_port(f"{self.host}:{self.port}")
        if bound == 0:
            raise OSError(f"gRPC health server could not bind {self.host}:{self.port}")
        await server.start()
        self.port = bound
        self._server = server
        return bound

    async def stop(self, grace: float = 0.5) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
