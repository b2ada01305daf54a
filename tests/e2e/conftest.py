"""Shared e2e fixtures: a simulated fleet in its own process, and an in-process gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from ingate.config import GatewayConfig, parse_config
from ingate.dataplane.proxy import BuiltinProxy
from ingate.gateway import Gateway
from ingate.sim.process import SimProcess, launch_sim

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture
def sim_fleet(tmp_path: Path) -> Iterator[Callable[..., SimProcess]]:
    """Factory: `sim_fleet(replicas=4, "--time-scale", "10", ...)` -> running `ingate sim` process."""
    started: list[SimProcess] = []

    def start(replicas: int = 4, *args: str) -> SimProcess:
        sp = launch_sim(replicas, args, tmp_path, timeout_s=30, log=tmp_path / f"sim-{len(started)}.log")
        started.append(sp)
        return sp

    yield start
    for sp in started:
        sp.stop()


def gateway_config(addresses: list[str], **extra: Any) -> GatewayConfig:
    doc: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "pool": {"name": "test-pool", "endpoints": [{"address": a} for a in addresses]},
        "metrics": {"intervalMs": 20},
        "dataplane": {"type": "builtin"},
    }
    doc.update(extra)
    return parse_config(doc)


@asynccontextmanager
async def _run_gateway(cfg: GatewayConfig) -> AsyncIterator[tuple[Gateway, BuiltinProxy]]:
    gw = Gateway(cfg)
    await gw.start()
    proxy = BuiltinProxy.serving(gw)
    await proxy.start()
    try:
        deadline = time.monotonic() + 10
        while not gw.ready():
            assert time.monotonic() < deadline, "gateway never saw fresh metrics"
            await asyncio.sleep(0.02)
        yield gw, proxy
    finally:
        await proxy.stop()
        await gw.stop()


@pytest.fixture
def gateway() -> Callable[[GatewayConfig], AbstractAsyncContextManager[tuple[Gateway, BuiltinProxy]]]:
    """`async with gateway(cfg) as (gw, proxy)`: the built-in data plane on an ephemeral port."""
    return _run_gateway
