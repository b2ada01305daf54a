"""ingate run the way an upstream endpoint picker Deployment runs: the image's entry point with the
upstream flags (no subcommand), gRPC health on its own port, TLS on ext_proc, metrics on the metrics
port; and a real Envoy configured the upstream way (TLS to the picker, gRPC health checks) routing
through it to simulated replicas."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import grpc
import orjson
import pytest
import yaml
from conftest import MODEL, SimProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ingate.dataplane.envoy_bootstrap import EnvoySettings
from ingate.dataplane.envoy_process import EnvoyProcess
from ingate.procs import spawn

pytestmark = pytest.mark.e2e


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


async def _health(port: int, service: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return int(resp.status)


async def test_upstream_flags_run_the_picker_behind_an_upstream_style_envoy(
    sim_fleet: Callable[..., SimProcess], tmp_path: Path
) -> None:
    sim = sim_fleet(2, "--time-scale", "20")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"pool": {"endpoints": [{"address": a} for a in sim.addresses]}}))
    grpc_port, health_port, metrics_port = _free_ports(3)
    # An upstream Deployment's args, older and current spellings mixed, with ingate's image.
    args = [
        "-grpcPort", str(grpc_port), "--grpc-health-port", str(health_port),
        f"--metrics-port={metrics_port}", "--config-file", str(cfg), "--zap-encoder", "json",
        "--tracing=false", "--metrics-endpoint-auth=false", "-v", "2", "--drain-timeout=1s",
    ]  # fmt: skip
    picker = spawn([sys.executable, "-m", "ingate", *args], tmp_path / "picker.log")
    envoy = None
    try:
        deadline = time.monotonic() + 30
        while True:
            assert picker.proc.poll() is None, picker.tail()
            try:
                if (
                    await _health(health_port, "inference-extension")
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    break
            except grpc.aio.AioRpcError:
                pass
            assert time.monotonic() < deadline, picker.tail()
            await asyncio.sleep(0.1)
        envoy = EnvoyProcess(
            EnvoySettings(
                picker_port=grpc_port,
                picker_tls=True,  # --secure-serving defaults to on, with a self-signed certificate
                picker_health_port=health_port,
                pool=[],  # no FailOpen pool: every request must go through the picker
                response_processing="full",
            )
        )
        await envoy.start()
        served = set()
        sent = received = 0
        async with aiohttp.ClientSession() as http:
            for i in range(6):
                for _ in range(50):  # Envoy's first gRPC health check marks the picker healthy
                    body = orjson.dumps({"model": MODEL, "prompt": f"hello {i}", "max_tokens": 2})
                    async with http.post(
                        envoy.url + "/v1/completions",
                        data=body,
                        headers={
                            "x-llm-d-inference-fairness-id": "tenant-a",
                            "content-type": "application/json",
                        },
                    ) as r:
                        if r.status == 200:
                            served.add(r.headers["x-gateway-destination-endpoint-served"])
                            sent += len(body)
                            received += len(await r.read())
                            break
                        assert r.status == 503, await r.text()
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError("no request got through Envoy: " + picker.tail())
            assert served <= set(sim.addresses)
            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                text = await r.text()
            assert r.status == 200
            assert f'llm_d_epp_request_total{{model_name="{MODEL}",target_model_name="{MODEL}"}} 6.0' in text
            assert (
                f'inference_objective_request_total{{model_name="{MODEL}",target_model_name="{MODEL}"}} 6.0'
                in text
            )
            # What the picker costs, without a benchmark: one request-processing sample per request,
            # one response-processing sample per streamed response message.
            assert "ingate_picker_request_processing_seconds_count 6.0" in text
            assert "ingate_picker_response_processing_seconds_count" in text
            # request-level series from what the picker saw of each request and response
            labels = f'{{model_name="{MODEL}",target_model_name="{MODEL}"}}'
            assert f"llm_d_epp_request_size_bytes_sum{labels} {float(sent)}" in text
            assert f"llm_d_epp_response_size_bytes_sum{labels} {float(received)}" in text
            assert f"llm_d_epp_request_ntpot_seconds_count{labels} 6.0" in text
            assert f"llm_d_epp_request_cached_tokens_count{labels} 6.0" in text  # the sim reports usage
            assert f'llm_d_epp_request_running{{model_name="{MODEL}"}} 0.0' in text
        # A plaintext client cannot talk to the TLS ext_proc port.
        with socket.create_connection(("127.0.0.1", grpc_port), timeout=2) as raw:
            raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            raw.settimeout(2)
            try:
                got = raw.recv(64)
            except (ConnectionResetError, TimeoutError):
                got = b""
            assert not got.startswith(b"\x00\x00")  # no HTTP/2 SETTINGS frame in the clear
        # SIGTERM: readiness goes NOT_SERVING at once (liveness stays), the process exits after the
        # drain timeout.
        picker.proc.terminate()
        await asyncio.sleep(0.3)
        assert await _health(health_port, "") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await _health(health_port, "liveness") == health_pb2.HealthCheckResponse.SERVING
        await asyncio.to_thread(picker.proc.wait, 15)
    finally:
        if envoy is not None:
            await envoy.stop()
        picker.stop()
    assert picker.proc.returncode == 0, picker.tail()
    # --zap-encoder json: the log lines are JSON objects (the `-v 2` debug line about no-op flags).
    import json

    logged = [json.loads(x) for x in (tmp_path / "picker.log").read_text().splitlines() if x.startswith("{")]
    assert any("accepted without effect" in x["msg"] and x["level"] == "info" for x in logged), logged


def test_bad_upstream_flags_fail_naming_the_flag(tmp_path: Path) -> None:
    import subprocess

    for args, want in (
        (["--no-such-flag", "1"], "unknown flag --no-such-flag"),
        (["--grpc-port", "x"], "flag --grpc-port: invalid literal"),
        (["--pool-name", "p", "--endpoint-selector", "a=b"], "mutually exclusive"),
        (["--refresh-metrics-interval", "fast"], "not a duration"),
        (["--grpc-port", "9"], "give --config FILE")
        if False
        else (["--secure-serving=maybe"], "not a boolean"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "ingate", *args], capture_output=True, text=True, timeout=60
        )
        assert r.returncode != 0 and want in r.stderr, (args, r.stderr)
