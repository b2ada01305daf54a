"""Envoy as ingate's data plane: `EnvoyDataPlane` runs the picker's ext_proc server and a supervised
Envoy together against a director, keeps Envoy's pool equal to the gateway's, and is what
`ingate serve --proxy envoy` starts.

The pieces: `ingate.dataplane.envoy_bootstrap` (what Envoy is told: listener, filters, routes,
clusters), `ingate.dataplane.envoy_process` (running and supervising the binary),
`ingate.dataplane.extproc` (the picker's side of the ext_proc protocol).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from ingate.dataplane.envoy_bootstrap import EnvoySettings
from ingate.dataplane.envoy_process import EnvoyProcess
from ingate.dataplane.extproc import ExtProcServicer
from ingate.dataplane.extproc_outcome import InfoFactory, to_response_info
from ingate.dataplane.extproc_server import ExtProcServer, first_of
from ingate.dataplane.extproc_timing import ExtProcTimings
from ingate.lifecycle import DirectorLike

log = logging.getLogger(__name__)


class EnvoyDataPlane:
    """The ext_proc server and a supervised Envoy, serving one director.

    `start()` binds the picker's gRPC server first (so Envoy's cluster points at a live port), then
    starts Envoy; `stop()` stops Envoy first (no new streams), then the gRPC server.
    """

    def __init__(
        self,
        director: DirectorLike,
        settings: EnvoySettings,
        *,
        info_factory: InfoFactory = to_response_info,
        pool_addresses: Callable[[], Sequence[str]] | None = None,
        fallbacks: int = 0,
        binary: str | None = None,
        timings: ExtProcTimings | None = None,
    ) -> None:
        self.settings = settings
        if pool_addresses is None:
            fixed = list(settings.pool)

            def pool_addresses() -> Sequence[str]:
                return fixed

        self.servicer = ExtProcServicer(
            director,
            info_factory=info_factory,
            max_body_bytes=settings.max_body_bytes,
            any_endpoint=first_of(pool_addresses),
            fallbacks=fallbacks,
            report_served=False,  # the bootstrap's picked route adds it (see render_bootstrap)
            responses=settings.response_processing,
            timings=timings,
        )
        self.grpc = ExtProcServer(
            self.servicer,
            host=settings.picker_host,
            port=settings.picker_port,
            transport=settings.picker_transport,
        )
        self._binary = binary
        self._pool_addresses = pool_addresses
        self._pool_watch: asyncio.Task[None] | None = None
        self.envoy: EnvoyProcess | None = None

    @property
    def url(self) -> str:
        """Base URL of the gateway (the Envoy listener)."""
        assert self.envoy is not None, "start() first"
        return self.envoy.url

    async def start(self) -> None:
        """Start the ext_proc server, then Envoy; returns when Envoy is ready."""
        self.settings.picker_port = await self.grpc.start()
        self.envoy = EnvoyProcess(self.settings, binary=self._binary)
        try:
            await self.envoy.start()
        except BaseException:
            await self.grpc.stop(0)
            raise
        if self.settings.pool_refresh_s > 0:
            self._pool_watch = asyncio.create_task(self._watch_pool(), name="envoy-pool-watch")

    async def _watch_pool(self) -> None:
        """Keep Envoy's FailOpen round-robin pool equal to the current pool (discovery may change it)."""
        while True:
            await asyncio.sleep(self.settings.pool_refresh_s)
            envoy = self.envoy
            if envoy is None:
                return
            try:
                if envoy.update_pool(self._pool_addresses()):
                    log.info("envoy pool updated: %d endpoints", len(envoy.settings.pool))
            except (OSError, ValueError) as e:
                log.error("envoy pool update failed: %s", e)

    async def stop(self) -> None:
        """Stop Envoy, then the ext_proc server (bounded)."""
        if self._pool_watch is not None:
            self._pool_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pool_watch
            self._pool_watch = None
        if self.envoy is not None:
            await self.envoy.stop()
        await self.grpc.stop(1.0)
