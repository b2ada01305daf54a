"""The rendered Deployment's probes against ingate's real gRPC health service (loopback): the service
names the chart asks for get the answers Kubernetes needs — a synced single picker is live and
ready; under leader election the leader is ready, a standby is live (never restarted) but not ready
(kept out of the Service), exactly the upstream chart's contract."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ingate.dataplane.health import HealthServer, HealthState
from ingate.kube.render import render

POOL = {"router": {"modelServers": {"matchLabels": {"app": "vllm"}}}}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def picker(values: dict[str, Any]) -> dict[str, Any]:
    dep = next(d for d in render(values, "p", "ns") if d["kind"] == "Deployment")
    c: dict[str, Any] = dep["spec"]["template"]["spec"]["containers"][0]
    return c


async def probe_answers(c: dict[str, Any], *, synced: bool, leader: bool) -> tuple[int, int]:
    """(liveness, readiness) as the kubelet's gRPC probes would get them from a picker started with
    the container's args."""
    state = HealthState(
        synced=lambda: synced,
        leader=lambda: leader,
        leader_election="--ha-enable-leader-election" in c["args"],
    )
    server = HealthServer(state, host="127.0.0.1", port=0)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            out = []
            for probe in ("livenessProbe", "readinessProbe"):
                service = c[probe]["grpc"]["service"]
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                out.append(resp.status)
            return out[0], out[1]
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("synced", "expected"), [(True, (SERVING, SERVING)), (False, (NOT_SERVING, NOT_SERVING))]
)
async def test_single_picker_probes(synced: bool, expected: tuple[int, int]) -> None:
    c = picker(POOL)
    assert await probe_answers(c, synced=synced, leader=True) == expected


async def test_leader_election_probes_keep_standbys_alive_but_unready() -> None:
    c = picker({**POOL, "router": {**POOL["router"], "epp": {"replicas": 3}}})
    assert await probe_answers(c, synced=True, leader=True) == (SERVING, SERVING)
    assert await probe_answers(c, synced=True, leader=False) == (SERVING, NOT_SERVING)
    assert await probe_answers(c, synced=False, leader=True) == (SERVING, NOT_SERVING)


async def test_active_active_probes_behave_like_single() -> None:
    values = {
        **POOL,
        "router": {**POOL["router"], "epp": {"replicas": 2, "flags": {"ha-enable-leader-election": False}}},
    }
    c = picker(values)
    assert await probe_answers(c, synced=True, leader=False) == (SERVING, SERVING)


async def test_service_monitor_scrapes_the_admin_port_with_its_token() -> None:
    """The ServiceMonitor's path and bearer credentials against ingate's real metrics server."""
    import aiohttp

    from ingate.config import parse_config
    from ingate.dataplane.admin import AdminServer
    from ingate.gateway import Gateway

    values = {**POOL, "router": {**POOL["router"], "monitoring": {"prometheus": {"enabled": True}}}}
    sm = next(d for d in render(values, "p", "ns") if d["kind"] == "ServiceMonitor")
    endpoint = sm["spec"]["endpoints"][0]
    assert endpoint["authorization"]["credentials"]["key"] == "token"
    gw = Gateway(parse_config({"pool": {"name": "p", "endpoints": [{"address": "127.0.0.1:9"}]}}))
    admin = AdminServer(gw.telemetry.registry, gw.ready, "127.0.0.1", 0, bearer_token="s3cret")
    port = await admin.start()
    try:
        url = f"http://127.0.0.1:{port}{endpoint['path']}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            async with http.get(url) as r:
                assert r.status == 401  # no token: refused
            async with http.get(url, headers={"Authorization": "Bearer s3cret"}) as r:
                assert r.status == 200
                text = await r.text()
    finally:
        await admin.stop()
    assert 'inference_pool_ready_pods{name="p"}' in text and "llm_d_epp_ready_endpoints" in text
