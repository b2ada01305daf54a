"""Upstream picker flags for TLS, metrics TLS and gRPC message sizes: each is parsed into the config
AND takes effect on a real server (a TLS 1.3-only picker refuses a TLS 1.2 client, a client without a
certificate cannot scrape, an oversized message fails the stream); bad values stop the start naming
the flag."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from click.testing import CliRunner
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client import CollectorRegistry
from test_extproc import BODY, _Director, _servicer, req_body, req_headers

from ingate.cli import main as cli_main
from ingate.config import GatewayConfig
from ingate.dataplane.extproc_server import ExtProcOnly, ExtProcServer
from ingate.dataplane.factory import make_dataplane
from ingate.dataplane.services import PickerServices
from ingate.dataplane.tls import CERT_FILE, KEY_FILE, self_signed
from ingate.epp_flags import EppOptions, FlagError, parse_size
from ingate.gateway import Gateway
from ingate.serve import build_config


def _config(tmp_path: Path, *flags: str) -> GatewayConfig:
    """The gateway config `ingate serve --config F FLAGS...` builds (one static endpoint)."""
    f = tmp_path / "gw.yaml"
    f.write_text(yaml.safe_dump({"pool": {"endpoints": [{"address": "127.0.0.1:9"}]}}))
    epp = EppOptions.from_args(
        ["--metrics-endpoint-auth=false", "--grpc-port=0", "--metrics-port=0", "--grpc-health-port=0", *flags]
    )
    return build_config(str(f), epp)


REFUSED = (ssl.SSLError, ConnectionError)
"""A refused handshake: an alert (SSLError) or the server closing the connection."""


async def _handshake(port: int, ctx: ssl.SSLContext) -> str:
    """TLS handshake to the port; the negotiated cipher's name (ssl.SSLError when refused)."""
    _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 5)
    try:
        obj = writer.get_extra_info("ssl_object")
        return str(obj.cipher()[0])
    finally:
        writer.close()


def _client(max_version: ssl.TLSVersion | None = None, ciphers: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    if max_version is not None:
        ctx.maximum_version = max_version
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    return ctx


async def _picker(cfg: GatewayConfig) -> ExtProcOnly:
    dp = make_dataplane(Gateway(cfg), "extproc")
    assert isinstance(dp, ExtProcOnly)
    await dp.start()
    return dp


async def test_tls_min_version_13_refuses_a_tls_12_client(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "--tls-min-version", "VersionTLS13")
    assert cfg.serving.tls_min_version == "VersionTLS13"
    dp = await _picker(cfg)
    try:
        port = dp.server.port
        with pytest.raises(REFUSED):
            await _handshake(port, _client(max_version=ssl.TLSVersion.TLSv1_2))
        assert (await _handshake(port, _client())).startswith("TLS_")  # a TLS 1.3 suite
    finally:
        await dp.stop()
    # the default (VersionTLS12) still lets a TLS 1.2 client in
    dp = await _picker(_config(tmp_path))
    try:
        assert await _handshake(dp.server.port, _client(max_version=ssl.TLSVersion.TLSv1_2))
    finally:
        await dp.stop()


async def test_tls_cipher_suites_restrict_tls_12(tmp_path: Path) -> None:
    # the self-signed certificate is ECDSA: offer one ECDSA suite (and a TLS 1.3 name, accepted, no effect)
    cfg = _config(
        tmp_path, "--tls-cipher-suites=TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,TLS_AES_128_GCM_SHA256"
    )
    assert cfg.serving.tls_cipher_suites == [
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "TLS_AES_128_GCM_SHA256",
    ]
    dp = await _picker(cfg)
    try:
        port = dp.server.port
        tls12 = ssl.TLSVersion.TLSv1_2
        with pytest.raises(REFUSED):
            await _handshake(port, _client(tls12, "ECDHE-ECDSA-AES128-GCM-SHA256"))
        got = await _handshake(
            port, _client(tls12, "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384")
        )
        assert got == "ECDHE-ECDSA-AES256-GCM-SHA384"
    finally:
        await dp.stop()


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4194304", 4194304),
        ("10MiB", 10 * 2**20),
        ("10Mi", 10 * 2**20),
        ("25MB", 25_000_000),
        ("1e3", 1000),
        ("2k", 2000),
    ],
)
def test_message_sizes_read_like_kubernetes_quantities(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("transport", ["h2", "grpcio"])
async def test_grpc_max_recv_msg_size_fails_a_larger_message(tmp_path: Path, transport: Any) -> None:
    cfg = _config(tmp_path, "--grpc-max-recv-msg-size", "1KiB")
    assert cfg.serving.grpc_max_recv_msg_bytes == 1024
    dp = make_dataplane(Gateway(cfg), "extproc")
    assert isinstance(dp, ExtProcOnly) and dp.server.max_recv_msg_bytes == 1024  # what serve runs
    server = ExtProcServer(_servicer(_Director()), transport=transport, max_recv_msg_bytes=1024)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            ok = pb_grpc.ExternalProcessorStub(ch).Process()
            await ok.write(req_headers(len(BODY)))
            await ok.write(req_body(BODY, True))
            assert await asyncio.wait_for(ok.read(), 5) is not None  # small messages are served
            ok.cancel()
            big = b'{"prompt": "' + b"x" * 2048 + b'"}'
            call = pb_grpc.ExternalProcessorStub(ch).Process()
            await call.write(req_headers(len(big)))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.write(req_body(big, True))
                await asyncio.wait_for(call.read(), 5)
            # h2 sends RESOURCE_EXHAUSTED trailers then resets the stream; the client may see either
            assert err.value.code().name in (
                ("RESOURCE_EXHAUSTED",) if transport == "grpcio" else ("RESOURCE_EXHAUSTED", "CANCELLED")
            )
    finally:
        await server.stop(0)


@pytest.mark.parametrize(("transport", "code"), [("h2", "INTERNAL"), ("grpcio", "RESOURCE_EXHAUSTED")])
async def test_grpc_max_send_msg_size_fails_a_larger_answer(
    tmp_path: Path, transport: Any, code: str
) -> None:
    cfg = _config(tmp_path, "--grpc-max-send-msg-size=16B")
    assert cfg.serving.grpc_max_send_msg_bytes == 16
    server = ExtProcServer(
        _servicer(_Director()), transport=transport, max_send_msg_bytes=cfg.serving.grpc_max_send_msg_bytes
    )
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = pb_grpc.ExternalProcessorStub(ch).Process()
            await call.write(req_headers(len(BODY)))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.write(req_body(BODY, True))  # the answer sets a destination header: > 16 B
                await asyncio.wait_for(call.read(), 5)
            assert err.value.code().name == code
    finally:
        await server.stop(0)


def _write_pair(d: Path, host: str) -> tuple[bytes, bytes]:
    d.mkdir(parents=True, exist_ok=True)
    cert, key = self_signed([host])
    (d / CERT_FILE).write_bytes(cert)
    (d / KEY_FILE).write_bytes(key)
    return cert, key


async def test_metrics_cert_dir_and_client_ca_require_a_client_certificate(tmp_path: Path) -> None:
    _write_pair(tmp_path / "server", "127.0.0.1")
    _write_pair(tmp_path / "client", "prometheus")  # self-signed: its own CA
    cfg = _config(
        tmp_path,
        f"--metrics-cert-dir={tmp_path / 'server'}",
        f"--metrics-client-ca-file={tmp_path / 'client' / CERT_FILE}",
    )
    assert cfg.serving.metrics_cert_dir == str(tmp_path / "server")
    services = PickerServices(_Core(), cfg.serving)
    await services.start()
    assert services.admin is not None
    url = f"https://127.0.0.1:{services.admin.port}/metrics"
    try:
        anon = ssl.create_default_context(cafile=str(tmp_path / "server" / CERT_FILE))
        anon.check_hostname = False
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientError):  # no client certificate: the handshake fails
                async with http.get(url, ssl=anon) as r:
                    await r.read()
            with pytest.raises(aiohttp.ClientError):  # plaintext is not served
                async with http.get(url.replace("https", "http")) as r:
                    await r.read()
            mtls = ssl.create_default_context(cafile=str(tmp_path / "server" / CERT_FILE))
            mtls.check_hostname = False
            mtls.load_cert_chain(tmp_path / "client" / CERT_FILE, tmp_path / "client" / KEY_FILE)
            async with http.get(url, ssl=mtls) as r:
                assert r.status == 200
        # a rotated pair (a renewed Secret) serves new connections, as upstream's certificate watcher
        assert services.metrics_tls is not None and services.metrics_tls.reload
        client = _client()
        client.load_cert_chain(tmp_path / "client" / CERT_FILE, tmp_path / "client" / KEY_FILE)
        assert await _peer_cn(services.admin.port, client) == "127.0.0.1"
        _write_pair(tmp_path / "server", "rotated.example")
        os.utime(tmp_path / "server" / CERT_FILE, (1e9, 2e9))  # a visibly new mtime on coarse clocks
        assert services.metrics_tls.check_reload()
        assert await _peer_cn(services.admin.port, client) == "rotated.example"
    finally:
        await services.stop()


async def _peer_cn(port: int, ctx: ssl.SSLContext) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 5)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


class _Core:
    registry = CollectorRegistry()

    def ready(self) -> bool:
        return True

    def capacity(self, priorities: Any = ()) -> dict[str, Any]:
        return {}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls-min-version", "VersionTLS14"], "--tls-min-version: unknown TLS version 'VersionTLS14'"),
        (["--tls-min-version=TLS1.3"], "--tls-min-version: unknown TLS version"),
        (["--tls-cipher-suites", "TLS_FOO_BAR"], "--tls-cipher-suites: unknown cipher suite 'TLS_FOO_BAR'"),
        (["--tls-cipher-suites", "TLS_RSA_WITH_RC4_128_SHA"], "RC4"),
        (["--grpc-max-recv-msg-size", "10XB"], "--grpc-max-recv-msg-size: not a size"),
        (["--grpc-max-send-msg-size", "1.5"], "--grpc-max-send-msg-size: not a whole number"),
        (["--metrics-client-ca-file", "/ca.pem"], "--metrics-client-ca-file requires --metrics-cert-dir"),
        (["--metrics-cert-dir", "/x", "--metrics-endpoint-auth=false"], "without authentication"),
        (
            ["--metrics-cert-dir", "/nonexistent", "--metrics-endpoint-auth"],
            "cannot read /nonexistent/tls.crt",
        ),
        (["--total-queued-requests-metric", "q{a}"], "--total-queued-requests-metric: metric spec 'q{a}'"),
        (["--kv-cache-usage-percentage-metric", "9bad"], "not a Prometheus metric name"),
        (["--model-server-metrics-scheme", "ftp"], "--model-server-metrics-scheme: http or https"),
        (["--ingate-leader-election-lease-duration", "1s"], "lease-duration > "),
    ],
)
def test_bad_values_stop_the_start_naming_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(FlagError, match=None) as err:
        EppOptions.from_args(argv)
    assert message in str(err.value)


def test_ingate_serve_reports_a_bad_tls_version_before_starting() -> None:
    res = CliRunner().invoke(cli_main, ["serve", "--pool-name", "p", "--tls-min-version", "VersionSSL3"])
    assert res.exit_code != 0 and "--tls-min-version: unknown TLS version 'VersionSSL3'" in res.output
