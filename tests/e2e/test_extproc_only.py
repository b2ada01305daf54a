"""`dataplane.type: extproc`: the picker alone, called by an Envoy that ingate does not supervise."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
from conftest import MODEL, SimProcess, gateway_config

from ingate.dataplane.envoy_bootstrap import EnvoySettings
from ingate.dataplane.envoy_process import EnvoyProcess
from ingate.dataplane.extproc_server import ExtProcOnly
from ingate.dataplane.factory import make_dataplane
from ingate.gateway import Gateway


async def test_external_envoy_routes_through_extproc_only_picker(
    sim_fleet: Callable[..., SimProcess],
) -> None:
    sim = sim_fleet(3, "--time-scale", "20")
    gw = Gateway(gateway_config(sim.addresses, dataplane={"type": "extproc"}))
    await gw.start()
    picker = make_dataplane(gw, "extproc", 0)
    assert isinstance(picker, ExtProcOnly)
    await picker.start()
    assert picker.url.startswith("grpc://127.0.0.1:")
    # An Envoy configured the way a Gateway API implementation would: one ext_proc filter, full
    # processing (the picker answers the response's messages too) -> our picker.
    envoy = EnvoyProcess(
        EnvoySettings(picker_port=picker.server.port, pool=sim.addresses, response_processing="full")
    )
    try:
        await envoy.start()
        system = " ".join(f"rule{i}" for i in range(600))
        served = set()
        async with aiohttp.ClientSession() as s:
            for i in range(4):
                async with s.post(
                    envoy.url + "/v1/completions",
                    json={"model": MODEL, "prompt": f"{system} q{i}", "max_tokens": 2},
                ) as r:
                    assert r.status == 200
                    served.add(r.headers["x-gateway-destination-endpoint-served"])
        assert len(served) == 1 and served <= set(sim.addresses)
        assert sum(ep.in_flight for ep in gw.datastore.endpoints()) == 0
    finally:
        await envoy.stop()
        await picker.stop()
        await gw.stop()
