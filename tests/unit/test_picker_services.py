"""The picker's production ports: gRPC health (upstream semantics), TLS on ext_proc (self-signed and
from files, with reload) and the admin HTTP port (metrics with optional bearer auth, readiness)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter
from test_extproc import BODY, _Director, _servicer, _set_headers, req_body, req_headers

from ingate.dataplane.admin import AdminServer
from ingate.dataplane.extproc_server import ExtProcServer
from ingate.dataplane.health import HealthServer, HealthState
from ingate.dataplane.tls import CERT_FILE, KEY_FILE, ServerTLS, self_signed

S = health_pb2.HealthCheckResponse


async def _check(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service))
        return int(resp.status)


async def test_health_without_leader_election_follows_the_pool_sync() -> None:
    synced = [False]
    server = HealthServer(HealthState(synced=lambda: synced[0]), "127.0.0.1", 0)
    port = await server.start()
    try:
        for svc in ("", "inference-extension", "liveness", "readiness", "anything"):
            assert await _check(port, svc) == S.NOT_SERVING
        synced[0] = True
        for svc in ("", "inference-extension", "envoy.service.ext_proc.v3.ExternalProcessor"):
            assert await _check(port, svc) == S.SERVING
    finally:
        await server.stop()


async def test_health_with_leader_election_serves_readiness_on_the_leader_only() -> None:
    leader = [False]
    state = HealthState(synced=lambda: True, leader=lambda: leader[0], leader_election=True)
    server = HealthServer(state, "127.0.0.1", 0)
    port = await server.start()
    try:
        assert await _check(port, "liveness") == S.SERVING  # a standby is alive
        assert await _check(port, "readiness") == S.NOT_SERVING
        assert await _check(port, "") == S.NOT_SERVING
        assert await _check(port, "unknown-service") == S.SERVICE_UNKNOWN
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service="readiness"))
            assert (await watch.read()).status == S.NOT_SERVING
            leader[0] = True  # this replica won the lease
            got = await asyncio.wait_for(watch.read(), 5)
            assert got.status == S.SERVING
            watch.cancel()
        assert await _check(port, "readiness") == S.SERVING
        assert await _check(port, "envoy.service.ext_proc.v3.ExternalProcessor") == S.SERVING
    finally:
        await server.stop()


def _peer_cert(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        assert tls.selected_alpn_protocol() == "h2"
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


@pytest.mark.parametrize("transport", ["h2", "grpcio"])
async def test_ext_proc_over_tls_with_a_self_signed_certificate(transport: str) -> None:
    tls = ServerTLS(None, hosts=["localhost", "127.0.0.1"])
    d = _Director()
    server = ExtProcServer(_servicer(d), port=0, transport=transport, tls=tls)  # type: ignore[arg-type]
    port = await server.start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=tls.cert_file.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as ch:
            call = pb_grpc.ExternalProcessorStub(ch).Process()
            await call.write(req_headers(len(BODY)))
            await call.write(req_body(BODY, True))
            first = await call.read()
            assert _set_headers(first) == {"x-gateway-destination-endpoint": "10.0.0.7:8000"}
            call.cancel()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:  # plaintext is refused
            call = pb_grpc.ExternalProcessorStub(plain).Process()
            with pytest.raises(grpc.aio.AioRpcError):
                await call.write(req_headers(len(BODY)))
                await asyncio.wait_for(call.read(), 5)
    finally:
        await server.stop(0)
        await tls.stop()


async def test_certificate_files_are_reloaded_for_new_connections(tmp_path: Path) -> None:
    def write(host: str) -> bytes:
        cert, key = self_signed([host])
        (tmp_path / CERT_FILE).write_bytes(cert)
        (tmp_path / KEY_FILE).write_bytes(key)
        return cert

    write("first.example")
    tls = ServerTLS(str(tmp_path), reload=True)
    server = ExtProcServer(_servicer(_Director()), port=0, tls=tls)
    port = await server.start()
    try:
        from cryptography import x509

        def peer_cn() -> str:
            cert = x509.load_der_x509_certificate(_peer_cert(port))
            return str(cert.subject.rfc4514_string())

        assert "first.example" in await asyncio.to_thread(peer_cn)
        assert not tls.check_reload()  # unchanged files: nothing to do
        await asyncio.sleep(0.01)
        write("second.example")
        import os

        os.utime(tmp_path / CERT_FILE, (1e9, 2e9))  # a visibly new mtime even on coarse clocks
        assert tls.check_reload() and tls.loads == 2
        assert "second.example" in await asyncio.to_thread(peer_cn)
        (tmp_path / KEY_FILE).write_text("not a key")  # a broken pair keeps the current one
        os.utime(tmp_path / KEY_FILE, (1e9, 3e9))
        assert not tls.check_reload()
        assert "second.example" in await asyncio.to_thread(peer_cn)
    finally:
        await server.stop(0)
        await tls.stop()


async def test_admin_port_serves_metrics_with_optional_bearer_auth_and_readiness() -> None:
    reg = CollectorRegistry()
    Counter("inference_objective_request", "x", registry=reg).inc()
    ready = [False]
    admin = AdminServer(reg, lambda: ready[0], "127.0.0.1", 0, bearer_token="s3cret")
    port = await admin.start()
    try:
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{port}"
            async with http.get(base + "/metrics") as r:
                assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"
            async with http.get(base + "/metrics", headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401
            async with http.get(base + "/metrics", headers={"Authorization": "Bearer s3cret"}) as r:
                assert r.status == 200 and "inference_objective_request_total 1.0" in await r.text()
            async with http.get(base + "/health") as r:
                assert r.status == 200
            async with http.get(base + "/ready") as r:
                assert r.status == 503 and (await r.json())["error"]["code"] == "not_ready"
            ready[0] = True
            async with http.get(base + "/ready") as r:
                assert r.status == 200
    finally:
        await admin.stop()
