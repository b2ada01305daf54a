"""`ingate serve`: the gateway from one YAML file, with Envoy (ext_proc) or the built-in proxy.

The data planes themselves live in `ingate.dataplane` (`make_dataplane` picks one)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal

import click

from ingate.config import ConfigError, GatewayConfig, load_config
from ingate.dataplane.factory import make_dataplane
from ingate.dataplane.services import PickerServices
from ingate.gateway import Gateway


def freeze_startup_heap() -> None:
    """Move everything allocated so far (modules, config, the started gateway) out of the cyclic GC's
    reach. A long-running gateway's full collections otherwise re-traverse these objects every time
    (about 25 ms per collection measured on the 2-core benchmark machine, a stall for every request in
    flight); what the serving path allocates later is still collected as usual."""
    gc.collect()
    gc.freeze()


async def run_gateway(cfg: GatewayConfig, kind: str, port: int | None, stop: asyncio.Event) -> None:
    """Run until `stop` is set."""
    gw = Gateway(cfg)
    dp = make_dataplane(gw, kind, port)  # config errors surface before anything starts
    services = PickerServices(gw, cfg.serving)
    await gw.start()
    try:
        await services.start()
        await dp.start()
        freeze_startup_heap()
        extra = services.describe()
        click.echo(
            f"ingate: {kind} data plane listening on {dp.url} for pool {cfg.pool.name!r} "
            f"({len(cfg.pool.endpoints)} endpoints){'; ' + extra if extra else ''}",
            err=True,
        )
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await dp.stop()
        with contextlib.suppress(Exception):
            await services.stop()
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
