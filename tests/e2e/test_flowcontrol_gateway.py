"""e2e: the gateway with flow control in front of a small simulated fleet (built-in data plane)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
from conftest import MODEL, SimProcess, gateway_config

from ingate.config import GatewayConfig
from ingate.dataplane.proxy import BuiltinProxy
from ingate.flowcontrol.controller import FlowController
from ingate.gateway import Gateway

GatewayCM = Callable[[GatewayConfig], AbstractAsyncContextManager[tuple[Gateway, BuiltinProxy]]]

OBJECTIVES = [{"name": "critical", "priority": 10}, {"name": "batch", "priority": -1}]


async def _post(
    s: aiohttp.ClientSession, url: str, objective: str, max_tokens: int
) -> tuple[int, dict[str, Any]]:
    async with s.post(
        url + "/v1/completions",
        json={"model": MODEL, "prompt": "tell me a story", "max_tokens": max_tokens},
        headers={"x-gateway-inference-objective": objective, "x-gateway-inference-fairness-id": objective},
        timeout=aiohttp.ClientTimeout(total=60),
    ) as r:
        return r.status, await r.json(content_type=None)


async def test_sheddable_shed_while_saturated_critical_all_served(
    sim_fleet: Callable[..., SimProcess], gateway: GatewayCM
) -> None:
    # One replica that runs one sequence at a time: a burst of critical requests saturates it.
    sim = sim_fleet(1, "--max-num-seqs", "1")
    cfg = gateway_config(
        sim.addresses,
        objectives=OBJECTIVES,
        flowControl={"saturation": {"queueDepthThreshold": 2}, "pollIntervalS": 0.02},
    )
    async with gateway(cfg) as (gw, proxy), aiohttp.ClientSession() as s:
        fc = gw.flow_control  # built from the YAML `flowControl` section and started with the gateway
        assert isinstance(fc, FlowController)
        critical = [asyncio.create_task(_post(s, proxy.url, "critical", 40)) for _ in range(8)]
        # Wait until the gateway holds requests back (the replica is saturated).
        for _ in range(500):
            if fc.queued() > 0:
                break
            await asyncio.sleep(0.01)
        assert fc.queued() > 0, "flow control never queued: the replica did not saturate"
        status, body = await _post(s, proxy.url, "batch", 4)
        assert status == 429 and body["error"]["code"] == "shed", body
        results = await asyncio.wait_for(asyncio.gather(*critical), 60)
        assert [st for st, _ in results] == [200] * 8
        assert fc.in_flight == 0 and fc.queued() == 0
        # Once the burst is over the replica has room again: the sheddable objective is served.
        for _ in range(200):
            if not fc.detector.pool_saturated(gw.datastore.endpoints(), fc.clock()):
                break
            await asyncio.sleep(0.02)
        status, _ = await _post(s, proxy.url, "batch", 4)
        assert status == 200
        # The pool's metrics registry carries the flow-control series.
        async with s.get(proxy.url + "/metrics") as r:
            assert "inference_extension_flow_control_queue_size" in await r.text()
