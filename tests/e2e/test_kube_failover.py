"""High availability as a cluster runs it: two full `ingate` picker processes (upstream flags,
Kubernetes mode through a kubeconfig to the fake API server, leader election on a 2 s lease), two
model-server pods (`ingate sim` on 127.0.0.2 and 127.0.0.3), and a real Envoy in front configured
the upstream way: one ext_proc cluster holding both pickers, gRPC health checks on each picker's
health port, so only the SERVING picker (the leader) gets streams.

Under steady traffic the leader is killed with SIGKILL. The standby must report SERVING within the
lease duration plus one retry period, and traffic must continue: every request started once Envoy
has seen the new leader succeeds through the picker. The requests that fail in between are counted
and printed (docs/kubernetes.md, "High availability", quotes them).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_epp_drop_in import _free_ports
from test_kube_gateway import IPS, free_port_on_all, pod

from ingate.dataplane.envoy_bootstrap import EnvoySettings
from ingate.dataplane.envoy_process import EnvoyProcess
from ingate.kube.controller import required_rules
from ingate.kube.fakeapi import FakeApiServer
from ingate.procs import ChildProcess, spawn
from ingate.sim.process import SimProcess, launch_sim

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
LEASE_S, RENEW_S, RETRY_S = 2.0, 1.5, 0.2
HEALTH_INTERVAL_S = 0.5
"""How often Envoy health-checks each picker (also the check's timeout): it sees the new leader within
about one interval. Shorter intervals make checks time out on a loaded 2-core machine."""
SERVING = health_pb2.HealthCheckResponse.SERVING


async def _ready(port: int) -> bool:
    """The picker's `readiness` service answers SERVING (only the leader does)."""
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            r = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="readiness"), timeout=1
            )
            return r.status == SERVING
    except grpc.aio.AioRpcError:
        return False


@dataclass
class Picker:
    name: str
    grpc_port: int
    health_port: int
    metrics_port: int
    child: ChildProcess


def _start_picker(name: str, kubeconfig: Path, tmp_path: Path) -> Picker:
    grpc_port, health_port, metrics_port = _free_ports(3)
    args = [
        "--pool-name", "pool", "--pool-namespace", "ns", "--ha-enable-leader-election",
        "--ingate-leader-election-lease-duration", f"{LEASE_S}s",
        "--ingate-leader-election-renew-deadline", f"{RENEW_S}s",
        "--ingate-leader-election-retry-period", f"{int(RETRY_S * 1000)}ms",
        "--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port),
        f"--metrics-port={metrics_port}", "--metrics-endpoint-auth=false",
        "--tracing=false", "--drain-timeout=0s",
    ]  # fmt: skip
    child = spawn(
        [sys.executable, "-m", "ingate", *args],
        tmp_path / f"{name}.log",
        env={**os.environ, "KUBECONFIG": str(kubeconfig), "POD_NAME": name},
    )
    return Picker(name, grpc_port, health_port, metrics_port, child)


@dataclass
class Result:
    started: float
    ended: float
    status: int
    via_picker: bool
    """The picker chose the endpoint (Envoy echoed its `x-gateway-destination-endpoint-served`)."""


async def _traffic(url: str, stop: asyncio.Event, out: list[Result], worker: int) -> None:
    """One client: a small completion, a short pause, again, until `stop`."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        i = 0
        while not stop.is_set():
            i += 1
            t0 = time.monotonic()
            body = {"model": MODEL, "prompt": f"worker {worker} question {i}", "max_tokens": 4}
            try:
                async with http.post(url + "/v1/completions", json=body) as r:
                    await r.read()
                    served = "x-gateway-destination-endpoint-served" in r.headers
                    out.append(Result(t0, time.monotonic(), r.status, served))
            except (aiohttp.ClientError, TimeoutError):
                out.append(Result(t0, time.monotonic(), 0, False))
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("failure_mode", ["FailClose", "FailOpen"])
async def test_kill_9_the_leader_picker_under_traffic(tmp_path: Path, failure_mode: str) -> None:
    ips = IPS[:2]
    port = free_port_on_all(ips)
    sims: list[SimProcess] = list(
        await asyncio.gather(
            *(
                asyncio.to_thread(
                    launch_sim,
                    1,
                    ("--time-scale", "20", "--base-port", str(port), "--host", ip),
                    tmp_path,
                    timeout_s=60,
                    log=tmp_path / f"{ip}.log",
                )
                for ip in ips
            )
        )
    )
    server = FakeApiServer(required_rules(leader_election=True), bookmark_interval=0.5)
    await server.start()
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig", "ns")
    server.apply(
        {
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": {"name": "pool", "namespace": "ns"},
            "spec": {"selector": {"matchLabels": {"app": "llm"}}, "targetPorts": [{"number": port}]},
        }
    )
    for name, ip in zip("ab", ips, strict=True):
        server.apply(pod(name, ip))
    pickers = [_start_picker(n, kubeconfig, tmp_path) for n in ("picker-1", "picker-2")]
    envoy: EnvoyProcess | None = None
    stop = asyncio.Event()
    results: list[Result] = []
    workers: list[asyncio.Task[None]] = []
    try:
        deadline = time.monotonic() + 60
        while True:  # one leader, ready; the other a live standby
            ready = [await _ready(p.health_port) for p in pickers]
            if sum(ready) == 1:
                break
            for p in pickers:
                assert p.child.proc.poll() is None, p.child.tail()
            assert time.monotonic() < deadline, [p.child.tail() for p in pickers]
            await asyncio.sleep(0.1)
        leader, standby = (pickers[0], pickers[1]) if ready[0] else (pickers[1], pickers[0])
        envoy = EnvoyProcess(
            EnvoySettings(
                picker_port=pickers[0].grpc_port,
                picker_health_port=pickers[0].health_port,
                picker_replicas=[(pickers[1].grpc_port, pickers[1].health_port)],
                picker_tls=True,
                picker_health_interval_s=HEALTH_INTERVAL_S,
                failure_mode=failure_mode,  # type: ignore[arg-type]
                pool=[f"{ip}:{port}" for ip in ips],
                response_processing="full",
            )
        )
        await envoy.start()
        async with aiohttp.ClientSession() as http:  # Envoy has health-checked the pickers
            while True:
                body = {"model": MODEL, "prompt": "warm up", "max_tokens": 2}
                async with http.post(envoy.url + "/v1/completions", json=body) as r:
                    if r.status == 200 and "x-gateway-destination-endpoint-served" in r.headers:
                        break
                assert time.monotonic() < deadline, leader.child.tail()
                await asyncio.sleep(0.1)
        workers = [asyncio.create_task(_traffic(envoy.url, stop, results, w)) for w in range(3)]
        await asyncio.sleep(1.5)
        os.kill(leader.child.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        while not await _ready(standby.health_port):
            assert time.monotonic() - killed < 4 * LEASE_S, (
                "the standby never became ready: " + standby.child.tail()
            )
            await asyncio.sleep(0.02)
        took = time.monotonic() - killed
        await asyncio.sleep(3.0)  # traffic through the new leader
        stop.set()
        await asyncio.gather(*workers)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{standby.metrics_port}/metrics") as r:
                text = await r.text()
        standby_requests = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("llm_d_epp_request_total{")
        )
    finally:
        stop.set()
        for w in workers:
            w.cancel()
        if envoy is not None:
            await envoy.stop()
        for p in pickers:
            p.child.stop()
        await server.stop()
        for s in sims:
            s.stop()

    before = [r for r in results if r.ended < killed]
    failed = [r for r in results if r.status != 200]
    settled = killed + took + 2 * HEALTH_INTERVAL_S + 0.5  # Envoy has health-checked the new leader
    after = [r for r in results if r.started > settled]
    fail_open = [r for r in results if r.status == 200 and not r.via_picker and r.started >= killed]
    window = (max(r.ended for r in failed) - killed) if failed else 0.0
    print(
        f"\n{failure_mode}: standby SERVING {took:.2f}s after kill -9 (lease {LEASE_S}s, retry {RETRY_S}s); "
        f"{len(results)} requests, {len(failed)} failed (last failure {window:.2f}s after the kill), "
        f"{len(fail_open)} served without the picker (FailOpen), {len(after)} after failover; "
        f"the new leader routed {standby_requests:.0f}; failures (start, end) after the kill: "
        f"{[(round(r.started - killed, 2), round(r.ended - killed, 2)) for r in failed][-12:]}"
    )
    assert before and all(r.status == 200 and r.via_picker for r in before), "errors before the kill"
    # the standby waits out the lease from the last renewal it saw (<= the kill), then takes it on its
    # next try (retry period + 20% jitter); 0.3 s for a loaded 2-core machine
    assert took <= LEASE_S + 1.2 * RETRY_S + 0.3, took
    assert len(after) >= 10 and all(r.status == 200 and r.via_picker for r in after), [
        (round(r.started - killed, 2), r.status, r.via_picker)
        for r in after
        if r.status != 200 or not r.via_picker
    ]
    assert standby_requests >= len(after)  # the new leader routed them
    # failures only in the failover window, never after Envoy saw the new leader
    assert all(killed - 1.0 <= r.started <= settled for r in failed), [
        round(r.started - killed, 2) for r in failed
    ]
    if failure_mode == "FailOpen":
        # Envoy fails open once its health check has marked the dead picker down (one interval): only
        # requests that reached the dead picker before that fail (with FULL_DUPLEX_STREAMED bodies a
        # stream whose picker is gone cannot be let through)
        marked_down = killed + 2 * HEALTH_INTERVAL_S + 0.5
        assert all(r.started <= marked_down for r in failed), [round(r.started - killed, 2) for r in failed]
