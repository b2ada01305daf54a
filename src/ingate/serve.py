"""`ingate serve`: the gateway from one YAML file, with Envoy (ext_proc) or the built-in proxy."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import signal
from dataclasses import fields
from typing import Any, Protocol

import click

from ingate.config import ConfigError, GatewayConfig, load_config
from ingate.gateway import Gateway


class DataPlane(Protocol):
    @property
    def url(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def freeze_startup_heap() -> None:
    """Move everything allocated so far (modules, config, the started gateway) out of the cyclic GC's
    reach. A long-running gateway's full collections otherwise re-traverse these objects every time
    (about 25 ms per collection measured on the 2-core benchmark machine, a stall for every request in
    flight); what the serving path allocates later is still collected as usual."""
    gc.collect()
    gc.freeze()


def make_dataplane(gateway: Gateway, kind: str, port: int | None = None) -> DataPlane:
    """Build the data plane `kind` ("envoy", "builtin" or "extproc") around a gateway's director."""
    cfg = gateway.config
    listen_port = cfg.listen.port if port is None else port
    if kind == "builtin":
        from ingate.dataplane.proxy import BuiltinProxy

        return BuiltinProxy(gateway, cfg.listen.host, listen_port)
    if kind == "extproc":
        return ExtProcOnly(gateway, cfg.listen.host, listen_port)
    from ingate.dataplane.envoy import EnvoyDataPlane, EnvoySettings

    allowed = {f.name for f in fields(EnvoySettings)}
    opts: dict[str, Any] = {}
    for k, v in cfg.dataplane.options.items():
        key = _CAMEL.sub("_", k).lower()
        if key not in allowed:
            raise ConfigError(
                f"dataplane.options.{k}: unknown Envoy setting (known: {', '.join(sorted(allowed))})"
            )
        opts[key] = v
    settings = EnvoySettings(
        **{
            "listen_host": cfg.listen.host,
            "listen_port": listen_port,
            "failure_mode": cfg.dataplane.failure_mode,
            "pool": [ep.address for ep in gateway.datastore.endpoints()],
            "max_body_bytes": cfg.proxy.max_body_bytes,
            "connect_timeout_s": cfg.proxy.connect_timeout_s,
            **opts,
        }
    )
    return EnvoyDataPlane(
        gateway.director,
        settings,
        pool_addresses=lambda: [ep.address for ep in gateway.datastore.endpoints()],
        fallbacks=0,  # ORIGINAL_DST takes one address; fallbacks need a subset-aware LB (see docs/envoy.md)
    )


class ExtProcOnly:
    """The picker alone as an ext_proc gRPC server, for an Envoy run by someone else.

    This is how ingate runs in a cluster: Envoy Gateway, Istio, kgateway or GKE own the proxy and call
    the picker named by the InferencePool's endpointPickerRef.
    """

    def __init__(self, gateway: Gateway, host: str, port: int) -> None:
        from ingate.dataplane.extproc import ExtProcServer, ExtProcServicer, first_of

        svc = ExtProcServicer(
            gateway.director,
            max_body_bytes=gateway.config.proxy.max_body_bytes,
            any_endpoint=first_of(lambda: [ep.address for ep in gateway.datastore.endpoints()]),
        )
        self.server = ExtProcServer(svc, host=host, port=port)

    @property
    def url(self) -> str:
        return f"grpc://{self.server.host}:{self.server.port}"

    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(1.0)


async def run_gateway(cfg: GatewayConfig, kind: str, port: int | None, stop: asyncio.Event) -> None:
    """Run until `stop` is set."""
    gw = Gateway(cfg)
    await gw.start()
    dp = make_dataplane(gw, kind, port)
    try:
        await dp.start()
        freeze_startup_heap()
        click.echo(
            f"ingate: {kind} data plane listening on {dp.url} for pool {cfg.pool.name!r} ({len(cfg.pool.endpoints)} endpoints)",
            err=True,
        )
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await dp.stop()
        await gw.stop()


@click.command("serve")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Gateway YAML file.",
)
@click.option(
    "--proxy",
    type=click.Choice(["envoy", "builtin", "extproc"]),
    default=None,
    help="Data plane (default: the config's dataplane.type, envoy).",
)
@click.option("--port", type=int, default=None, help="Override listen.port.")
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
def serve(config_path: str, proxy: str | None, port: int | None, log_level: str) -> None:
    """Run the gateway: endpoint picker + data plane in front of the pool in CONFIG."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    kind = proxy or cfg.dataplane.type
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_gateway(cfg, kind, port, stop)

    try:
        asyncio.run(main())
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
