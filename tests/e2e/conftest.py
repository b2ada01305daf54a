"""Shared e2e fixtures: a simulated fleet in its own process, and an in-process gateway."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from ingate.config import GatewayConfig, parse_config
from ingate.dataplane.proxy import BuiltinProxy
from ingate.gateway import Gateway

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


class SimProcess:
    """`ingate sim` running as a separate process, like a real fleet."""

    def __init__(self, proc: subprocess.Popen[bytes], addresses: list[str]) -> None:
        self.proc = proc
        self.addresses = addresses

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def sim_fleet(tmp_path: Path) -> Iterator[Callable[..., SimProcess]]:
    """Factory: `sim_fleet(replicas=4, "--time-scale", "10", ...)` -> running SimProcess."""
    started: list[SimProcess] = []

    def start(replicas: int = 4, *args: str) -> SimProcess:
        ready = tmp_path / f"ready-{len(started)}.json"
        cmd = [
            sys.executable,
            "-m",
            "ingate",
            "sim",
            "--replicas",
            str(replicas),
            "--base-port",
            "0",
            "--ready-file",
            str(ready),
            *args,
        ]
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + 30
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"ingate sim exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError("ingate sim did not become ready")
            time.sleep(0.05)
        sp = SimProcess(proc, [r["address"] for r in json.loads(ready.read_text())["replicas"]])
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
    proxy = BuiltinProxy(gw)
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
