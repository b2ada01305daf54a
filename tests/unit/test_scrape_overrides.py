"""The upstream scrape-target and metric-name flags reach the scraper: `--model-server-metrics-port`,
`-path`, `-scheme`, `-https-insecure-skip-verify` pick the URL scraped, and the five `--*-metric` flags
pick the series each signal is read from (a model server on loopback serves both the engine's usual
names and the overriding ones, with different values, so the test sees which was read)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from ingate.dataplane.tls import CERT_FILE, KEY_FILE, self_signed
from ingate.epp_flags import EppOptions
from ingate.gateway import Gateway
from ingate.metrics.engines import ENGINES, parse_metrics, with_overrides
from ingate.serve import build_config

EXPOSITION = """\
# HELP vllm:num_requests_waiting x
vllm:num_requests_waiting{model_name="m"} 1
vllm:num_requests_running{model_name="m"} 2
vllm:kv_cache_usage_perc{model_name="m"} 0.1
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a1",waiting_lora_adapters=""} 100
vllm:cache_config_info{block_size="16",num_gpu_blocks="100"} 1
my_queue{kind="waiting"} 7
my_queue{kind="running"} 5
my_kv{pool="p"} 0.75
my_cache{page="64",pages="900"} 1
"""


@pytest.fixture
async def model_server(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """An HTTP and an HTTPS (self-signed) metrics server; the paths they were asked for."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(text=EXPOSITION if request.path == "/engine/stats" else "")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    plain = web.TCPSite(runner, "127.0.0.1", 0)
    await plain.start()
    cert, key = self_signed(["127.0.0.1"])
    (tmp_path / CERT_FILE).write_bytes(cert)
    (tmp_path / KEY_FILE).write_bytes(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / CERT_FILE, tmp_path / KEY_FILE)
    secure = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await secure.start()
    ports = [s._server.sockets[0].getsockname()[1] for s in (plain, secure)]  # type: ignore[union-attr]
    yield {"http": ports[0], "https": ports[1], "seen": seen}
    await runner.cleanup()


def _gateway(tmp_path: Path, *flags: str) -> Gateway:
    f = tmp_path / "gw.yaml"
    # the endpoint serves on port 9 (nothing there): only the metrics-port override reaches the server
    f.write_text(yaml.safe_dump({"pool": {"endpoints": [{"address": "127.0.0.1:9"}]}}))
    epp = EppOptions.from_args(["--metrics-endpoint-auth=false", *flags])
    return Gateway(build_config(str(f), epp))


async def test_metric_name_and_target_flags_are_what_the_scraper_reads(
    tmp_path: Path, model_server: dict[str, Any]
) -> None:
    gw = _gateway(
        tmp_path,
        f"--model-server-metrics-port={model_server['http']}",
        "--model-server-metrics-path=/engine/stats",
        "--total-queued-requests-metric=my_queue{kind=waiting}",
        "-totalRunningRequestsMetric",  # the older single-dash spelling
        'my_queue{kind="running"}',
        "--kv-cache-usage-percentage-metric=my_kv",
        "--lora-info-metric=",  # "": no LoRA signal
        "--cache-info-metric=my_cache",
    )
    m = gw.config.metrics
    assert (m.port, m.path, m.names.queued_requests, m.names.lora_info) == (
        model_server["http"],
        "/engine/stats",
        "my_queue{kind=waiting}",
        "",
    )
    await gw.scraper.start()
    try:
        (ep,) = gw.datastore.endpoints()
        assert await gw.scraper.scrape_once(ep), ep.metrics.scrape_error
        assert model_server["seen"][-1] == "/engine/stats"
        assert (ep.metrics.waiting, ep.metrics.running, ep.metrics.kv_usage) == (7, 5, 0.75)
        assert not ep.metrics.active_adapters  # vllm:lora_requests_info ignored
    finally:
        await gw.scraper.stop()


async def test_https_scrape_skips_verification_only_when_told(
    tmp_path: Path, model_server: dict[str, Any]
) -> None:
    common = (
        f"--model-server-metrics-port={model_server['https']}",
        "--model-server-metrics-path=/engine/stats",
        "--model-server-metrics-scheme=https",
    )
    gw = _gateway(tmp_path, *common)  # upstream's default: skip verification
    await gw.scraper.start()
    try:
        (ep,) = gw.datastore.endpoints()
        assert gw.scraper.target(ep) == f"https://127.0.0.1:{model_server['https']}/engine/stats"
        assert await gw.scraper.scrape_once(ep), ep.metrics.scrape_error
        assert ep.metrics.waiting == 1  # the engine's own names: no override given
    finally:
        await gw.scraper.stop()
    gw = _gateway(tmp_path, *common, "--model-server-metrics-https-insecure-skip-verify=false")
    await gw.scraper.start()
    try:
        (ep,) = gw.datastore.endpoints()
        assert not await gw.scraper.scrape_once(ep)  # a self-signed certificate is not trusted
        assert "certificate" in (ep.metrics.scrape_error or "").lower()
    finally:
        await gw.scraper.stop()


def test_overrides_keep_the_other_engines_names_and_label_selectors() -> None:
    names = with_overrides(ENGINES["triton-trtllm"], {"queued_requests": "my_queue{kind=waiting}"})
    text = (
        'my_queue{kind="waiting"} 3\nnv_trt_llm_request_metrics{request_type="waiting"} 9\n'
        'nv_trt_llm_request_metrics{request_type="scheduled"} 4\n'
    )
    m = parse_metrics(text, names, 0.0)
    assert (m.waiting, m.running) == (3, 4)  # running still selected by Triton's own label
