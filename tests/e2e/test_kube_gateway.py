"""The Kubernetes controller feeding a real gateway: simulated pods are `ingate sim` replicas bound to
127.0.0.2, 127.0.0.3, 127.0.0.4 on one port (like pod IPs with one targetPort). Requests flow through
the built-in data plane the whole time while pods come and go, the API server is killed and restarted,
and a watch gets 410 Gone: no request fails."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import MODEL, gateway_config

from ingate.dataplane.proxy import BuiltinProxy
from ingate.gateway import Gateway
from ingate.kube.controller import KubeDiscovery, required_rules
from ingate.kube.fakeapi import FakeApiServer
from ingate.objectives import ObjectiveStore
from ingate.sim.process import SimProcess, launch_sim

IPS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def free_port_on_all(ips: list[str]) -> int:
    for _ in range(20):
        with socket.socket() as s:
            s.bind((ips[0], 0))
            port = s.getsockname()[1]
        ok = True
        for ip in ips:
            with socket.socket() as s:
                try:
                    s.bind((ip, port))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no common free port")


def pod(name: str, ip: str, ready: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "ns", "labels": {"app": "llm"}},
        "spec": {"containers": [{"name": "vllm", "image": "vllm"}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


async def served(session: aiohttp.ClientSession, ip: str, port: int) -> float:
    """Requests a replica finished, from its own /metrics."""
    async with session.get(f"http://{ip}:{port}/metrics") as r:
        text = await r.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total")
    )


@pytest.mark.e2e
@pytest.mark.slow
async def test_requests_never_fail_through_pod_churn_api_restart_and_410(tmp_path: Path) -> None:
    port = free_port_on_all(IPS)
    args = ("--time-scale", "20", "--base-port", str(port))
    sims: list[SimProcess] = list(
        await asyncio.gather(
            *(
                asyncio.to_thread(
                    launch_sim, 1, (*args, "--host", ip), tmp_path, timeout_s=60, log=tmp_path / f"{ip}.log"
                )
                for ip in IPS
            )
        )
    )
    server = FakeApiServer(required_rules(), bookmark_interval=0.2)
    await server.start()
    server.apply(
        {
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": {"name": "pool", "namespace": "ns"},
            "spec": {"selector": {"matchLabels": {"app": "llm"}}, "targetPorts": [{"number": port}]},
        }
    )
    server.apply(pod("a", IPS[0]))
    server.apply(pod("b", IPS[1]))
    server.apply(pod("c", IPS[2], ready=False))

    # The static config needs one endpoint today; in Kubernetes mode serve will start empty.
    gw = Gateway(gateway_config([f"{IPS[0]}:{port}"], metrics={"intervalMs": 20}))
    gw.datastore.remove(f"{IPS[0]}:{port}")
    disc = KubeDiscovery(
        gw.datastore,
        ObjectiveStore.create(),
        "pool",
        "ns",
        kubeconfig=str(server.write_kubeconfig(tmp_path / "kubeconfig", "ns")),
        backoff_base_s=0.05,
        backoff_max_s=0.5,
    )
    await gw.start()
    await disc.start()
    proxy = BuiltinProxy.serving(gw)
    await proxy.start()
    statuses: list[int] = []
    running = True

    async def client(s: aiohttp.ClientSession, i: int) -> None:
        n = 0
        while running:
            n += 1
            body = {"model": MODEL, "prompt": f"client {i} request {n}", "max_tokens": 3}
            async with s.post(f"{proxy.url}/v1/completions", json=body) as r:
                await r.read()
                statuses.append(r.status)

    try:
        await disc.wait_synced(10)
        deadline = time.monotonic() + 10
        while not gw.ready():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert {e.host for e in gw.datastore.endpoints()} == set(IPS[:2])
        async with aiohttp.ClientSession() as s:
            clients = [asyncio.create_task(client(s, i)) for i in range(4)]
            await asyncio.sleep(0.5)

            server.apply(pod("c", IPS[2]))  # turns ready: gets traffic
            before_c = await served(s, IPS[2], port)
            deadline = time.monotonic() + 10
            while await served(s, IPS[2], port) <= before_c:
                assert time.monotonic() < deadline, "pod c never got traffic"
                await asyncio.sleep(0.05)

            await server.stop()  # API server killed
            await asyncio.sleep(1.0)
            await server.start()  # and back
            await asyncio.sleep(0.5)

            server.expire_watches()  # 410 on every watch: relist
            assert disc.pod_informer is not None
            deadline = time.monotonic() + 10
            while disc.pod_informer.lists < 2:
                assert time.monotonic() < deadline, "no relist after 410"
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)

            server.apply(pod("a", IPS[0], ready=False))  # turns unready: no new traffic
            deadline = time.monotonic() + 5
            while any(e.host == IPS[0] for e in gw.datastore.endpoints()):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            a_after = await served(s, IPS[0], port)
            await asyncio.sleep(0.5)
            running = False
            await asyncio.gather(*clients)
            # at most the requests in flight when it left finish there
            assert await served(s, IPS[0], port) - a_after <= 4
    finally:
        running = False
        await proxy.stop()
        await disc.stop()
        await gw.stop()
        with contextlib.suppress(Exception):
            await server.stop()
        for sp in sims:
            sp.stop()
    print(f"{len(statuses)} requests through the churn, statuses {sorted(set(statuses))}")
    assert len(statuses) > 50
    assert set(statuses) == {200}, {c: statuses.count(c) for c in set(statuses)}


@pytest.mark.e2e
async def test_scale_from_zero_request_waits_for_the_first_ready_pod(tmp_path: Path) -> None:
    port = free_port_on_all(IPS[:1])
    sim = await asyncio.to_thread(
        launch_sim,
        1,
        ("--time-scale", "20", "--base-port", str(port), "--host", IPS[0]),
        tmp_path,
        timeout_s=60,
        log=tmp_path / "sim.log",
    )
    server = FakeApiServer(required_rules(), bookmark_interval=0.2)
    await server.start()
    server.apply(
        {
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": {"name": "pool", "namespace": "ns"},
            "spec": {"selector": {"matchLabels": {"app": "llm"}}, "targetPorts": [{"number": port}]},
        }
    )
    server.apply(pod("a", IPS[0], ready=False))  # scaled to zero: the pod is still loading
    ttl = 1.5
    gw = Gateway(
        gateway_config([f"{IPS[0]}:{port}"], metrics={"intervalMs": 20}, flowControl={"noEndpointTtlS": ttl})
    )
    gw.datastore.remove(f"{IPS[0]}:{port}")
    disc = KubeDiscovery(
        gw.datastore,
        ObjectiveStore.create(),
        "pool",
        "ns",
        kubeconfig=str(server.write_kubeconfig(tmp_path / "kubeconfig", "ns")),
    )
    await gw.start()
    await disc.start()
    proxy = BuiltinProxy.serving(gw)
    await proxy.start()
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 3}
    try:
        await disc.wait_synced(10)
        assert gw.datastore.endpoints() == []
        async with aiohttp.ClientSession() as s:

            async def post() -> tuple[int, dict[str, str]]:
                async with s.post(f"{proxy.url}/v1/completions", json=body) as r:
                    await r.read()
                    return r.status, dict(r.headers)

            waiting = asyncio.create_task(post())
            await asyncio.sleep(0.5)
            assert not waiting.done()  # held while no pod is ready
            server.apply(pod("a", IPS[0]))  # the pod turns ready
            ready_at = time.monotonic()
            status, _ = await asyncio.wait_for(waiting, 10)
            took = time.monotonic() - ready_at
            print(f"held request answered {took:.3f}s after the pod turned ready")
            assert status == 200
            # one watch event, the new endpoint's first scrape, one flow-control poll, a short request
            assert took < 0.4, took

            server.apply(pod("a", IPS[0], ready=False))  # back to zero
            deadline = time.monotonic() + 5
            while gw.datastore.endpoints():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            t0 = time.monotonic()
            status, headers = await post()  # nobody turns ready: 503 after the TTL
            assert status == 503 and time.monotonic() - t0 >= ttl - 0.1
            assert headers.get("x-llm-d-request-dropped-reason") and headers.get("Retry-After")
    finally:
        await proxy.stop()
        await disc.stop()
        await gw.stop()
        await server.stop()
        sim.stop()
