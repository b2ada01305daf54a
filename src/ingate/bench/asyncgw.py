"""The gateway for the async benchmark: `ingate serve --proxy builtin` plus ``GET /v1/capacity`` on a second
port, served from the same process and the same datastore/flow controller.

Until the gateway mounts the capacity document itself (``ingate.flowcontrol.capacity.capacity_handler``),
this is how the benchmark gives ``ingate async --capacity-url`` a real signal. Run:
``python -m ingate.bench.asyncgw --config gateway.yaml --capacity-port 9401``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import click
from aiohttp import web

from ingate.config import load_config
from ingate.flowcontrol.capacity import capacity_handler
from ingate.flowcontrol.controller import FlowController
from ingate.gateway import Gateway
from ingate.serve import make_dataplane


async def _run(config: str, capacity_port: int) -> None:
    cfg = load_config(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    gw = Gateway(cfg)
    await gw.start()
    dp = make_dataplane(gw, "builtin")
    fc = gw.flow_control if isinstance(gw.flow_control, FlowController) else None
    priorities = sorted({o.priority for o in cfg.objectives} | {0})
    app = web.Application()
    app.router.add_get("/v1/capacity", capacity_handler(gw.datastore, fc, priorities=priorities))
    runner = web.AppRunner(app, access_log=None)
    try:
        await dp.start()
        await runner.setup()
        await web.TCPSite(runner, cfg.listen.host, capacity_port).start()
        await stop.wait()
    finally:
        await runner.cleanup()
        with contextlib.suppress(Exception):
            await dp.stop()
        await gw.stop()


@click.command()
@click.option("--config", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--capacity-port", required=True, type=int)
def main(config: str, capacity_port: int) -> None:
    """Run the builtin gateway of CONFIG with GET /v1/capacity on CAPACITY_PORT."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(_run(config, capacity_port))


if __name__ == "__main__":
    main()
