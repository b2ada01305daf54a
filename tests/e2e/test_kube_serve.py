"""`ingate` started exactly as an upstream picker Deployment starts it (upstream flags, no config
file, no subcommand) against a Kubernetes API server (the in-process fake speaking the real wire
protocol, reached through a kubeconfig): it discovers the InferencePool's pods (`ingate sim` replicas
on 127.0.0.2 and 127.0.0.3 sharing one port), reports SERVING only once synced, authenticates metrics
scrapes with TokenReview + SubjectAccessReview, and a real Envoy (gRPC health checks, TLS to the
picker) routes through it; a pod deleted leaves the rotation within a watch event."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

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
from ingate.kube.metrics_auth import RULES as METRICS_AUTH_RULES
from ingate.procs import spawn
from ingate.sim.process import SimProcess, launch_sim

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


async def _status(port: int) -> int | None:
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            r = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1
            )
            return int(r.status)
    except grpc.aio.AioRpcError:
        return None


async def test_upstream_deployment_args_discover_the_pool_and_serve_through_envoy(tmp_path: Path) -> None:
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
    server = FakeApiServer([*required_rules(), *METRICS_AUTH_RULES], bookmark_interval=0.2)
    await server.start()
    server.add_user("prom-token", "system:serviceaccount:monitoring:prometheus")
    server.grant_nonresource("system:serviceaccount:monitoring:prometheus")
    server.add_user("nobody-token", "system:serviceaccount:default:nobody")
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig", "ns")
    grpc_port, health_port, metrics_port = _free_ports(3)
    args = [
        "--pool-name", "pool", "--pool-namespace", "ns", "--zap-encoder", "json",
        "--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port),
        f"--metrics-port={metrics_port}", "--tracing=false", "--drain-timeout=0s",
    ]  # fmt: skip
    picker = spawn(
        [sys.executable, "-m", "ingate", *args],
        tmp_path / "picker.log",
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
    )
    envoy = None
    try:
        # No pool yet: the picker runs but is not ready.
        deadline = time.monotonic() + 30
        while await _status(health_port) is None:
            assert picker.proc.poll() is None, picker.tail()
            assert time.monotonic() < deadline, picker.tail()
            await asyncio.sleep(0.1)
        assert await _status(health_port) == health_pb2.HealthCheckResponse.NOT_SERVING
        server.apply(
            {
                "apiVersion": "inference.networking.k8s.io/v1",
                "kind": "InferencePool",
                "metadata": {"name": "pool", "namespace": "ns"},
                "spec": {"selector": {"matchLabels": {"app": "llm"}}, "targetPorts": [{"number": port}]},
            }
        )
        server.apply(pod("a", ips[0]))
        server.apply(pod("b", ips[1]))
        while await _status(health_port) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, picker.tail()
            await asyncio.sleep(0.1)
        envoy = EnvoyProcess(
            EnvoySettings(
                picker_port=grpc_port,
                picker_tls=True,
                picker_health_port=health_port,
                pool=[],
                response_processing="full",
            )
        )
        await envoy.start()

        async def send(http: aiohttp.ClientSession, i: int) -> Any:
            for _ in range(60):
                async with http.post(
                    envoy.url + "/v1/completions",  # type: ignore[union-attr]
                    json={"model": MODEL, "prompt": f"question {i} " * 3, "max_tokens": 2},
                ) as r:
                    if r.status == 200:
                        return r.headers["x-gateway-destination-endpoint-served"]
                    assert r.status == 503, await r.text()  # Envoy's first health check not in yet
                await asyncio.sleep(0.1)
            raise AssertionError("no answer: " + picker.tail())

        async with aiohttp.ClientSession() as http:
            served = {await send(http, i) for i in range(12)}
            assert served <= {f"{ip}:{port}" for ip in ips} and served
            server.delete("v1", "Pod", "ns", "a")
            await asyncio.sleep(0.5)  # one watch event
            after = {await send(http, 100 + i) for i in range(8)}
            assert after == {f"{ips[1]}:{port}"}
            metrics = f"http://127.0.0.1:{metrics_port}/metrics"
            async with http.get(metrics) as r:
                assert r.status == 401
            async with http.get(metrics, headers={"Authorization": "Bearer nobody-token"}) as r:
                assert r.status == 403
            async with http.get(metrics, headers={"Authorization": "Bearer prom-token"}) as r:
                text = await r.text()
                assert r.status == 200 and "llm_d_epp_request_total" in text
                assert 'inference_pool_ready_pods{name="pool"} 1.0' in text
    finally:
        if envoy is not None:
            await envoy.stop()
        picker.stop()
        await server.stop()
        for s in sims:
            s.stop()
    assert picker.proc.returncode == 0, picker.tail()
