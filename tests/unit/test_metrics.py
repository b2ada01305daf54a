"""Model-server metric parsing per engine, and the scraper against real HTTP servers."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from aiohttp import web
from loopback_http import start_app

from ingate.datastore import Datastore, Endpoint
from ingate.metrics.engines import ENGINES, parse_metrics
from ingate.metrics.scraper import MetricsScraper

VLLM = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.42
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.99
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",num_gpu_blocks="27925"} 1.0
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters=""} 1.7e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="c",waiting_lora_adapters="d"} 1.8e+09
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 10.0
"""


def test_vllm_parse_takes_newest_lora_series_and_current_kv_name() -> None:
    m = parse_metrics(VLLM, ENGINES["vllm"], now=5.0)
    assert (m.running, m.waiting, m.kv_usage) == (3, 7, 0.42)
    assert (m.block_size, m.num_gpu_blocks) == (16, 27925)
    assert m.active_adapters == {"c"} and m.waiting_adapters == {"d"} and m.max_loras == 2
    assert m.updated_at == 5.0


def test_other_engines() -> None:
    sg = 'sglang:num_queue_reqs{model_name="m"} 4\nsglang:num_running_reqs{model_name="m"} 2\nsglang:token_usage{model_name="m"} 0.5\n'
    m = parse_metrics(sg, ENGINES["sglang"], 0.0)
    assert (m.waiting, m.running, m.kv_usage) == (4, 2, 0.5)
    tgi = "tgi_queue_size 5\ntgi_batch_current_size 9\n"
    m = parse_metrics(tgi, ENGINES["tgi"], 0.0)
    assert (m.waiting, m.running, m.kv_usage) == (5, 9, 0.0)
    triton = (
        'nv_trt_llm_request_metrics{model="m",request_type="waiting",version="1"} 6\n'
        'nv_trt_llm_request_metrics{model="m",request_type="scheduled",version="1"} 3\n'
        'nv_trt_llm_request_metrics{model="m",request_type="max",version="1"} 512\n'
        'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="m",version="1"} 0.25\n'
        'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="m",version="1"} 100\n'
    )
    m = parse_metrics(triton, ENGINES["triton-trtllm"], 0.0)
    assert (m.waiting, m.running, m.kv_usage) == (6, 3, 0.25)


def test_parser_agrees_with_prometheus_client_on_sim_output() -> None:
    from prometheus_client import generate_latest

    from ingate.sim.engine import Engine, EngineConfig
    from ingate.sim.metrics import SimMetrics
    from ingate.sim.profiles import NULL_PROFILE

    e = Engine(EngineConfig(NULL_PROFILE, max_loras=3))
    text = generate_latest(SimMetrics(e, "m", 3).registry).decode()
    m = parse_metrics(text, ENGINES["vllm"], 1.0)
    assert (m.waiting, m.running, m.kv_usage, m.max_loras) == (0, 0, 0.0, 3)
    assert m.num_gpu_blocks == NULL_PROFILE.num_gpu_blocks


async def test_scraper_updates_and_marks_stale_when_endpoint_dies() -> None:
    body = {"text": VLLM}

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=body["text"])

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner, port = await start_app(app)
    ep = Endpoint(name="a", host="127.0.0.1", port=port)
    ds = Datastore([ep])
    scraper = MetricsScraper(ds, interval_s=0.02, stale_after_s=0.1)
    async with scraper:
        deadline = time.monotonic() + 5
        while ep.metrics.waiting != 7:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert scraper.is_fresh(ep) and ep.healthy
        body["text"] = VLLM.replace("} 7.0", "} 1.0")
        while ep.metrics.waiting != 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await runner.cleanup()  # the endpoint dies
        while ep.healthy:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.15)
        assert not scraper.is_fresh(ep)
        assert ep.metrics.waiting == 1  # last values kept, but visibly stale
        assert ep.metrics.scrape_error


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_every_engine_mapping_handles_empty_text(engine: str) -> None:
    m = parse_metrics("", ENGINES[engine], 0.0)
    assert (m.waiting, m.running) == (0, 0)


async def test_slow_scrape_makes_metrics_stale_but_keeps_endpoint_schedulable() -> None:
    release = asyncio.Event()

    async def slow_metrics(request: web.Request) -> web.Response:
        await release.wait()  # answers only after the scraper has timed out
        return web.Response(text=VLLM)

    app = web.Application()
    app.router.add_get("/metrics", slow_metrics)
    runner, port = await start_app(app)
    ep = Endpoint(name="slow", host="127.0.0.1", port=port)
    refused = Endpoint(name="gone", host="127.0.0.1", port=_closed_port())
    scraper = MetricsScraper(Datastore([ep, refused]), interval_s=0.02, timeout_s=0.1)
    try:
        await scraper.start()
        assert not await scraper.scrape_once(ep)
        assert ep.healthy and "Timeout" in (ep.metrics.scrape_error or "")
        assert not scraper.is_fresh(ep)
        assert not await scraper.scrape_once(refused)
        assert not refused.healthy  # a refused connection does take it out of scheduling
    finally:
        release.set()
        await scraper.stop()
        await runner.cleanup()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_stop_returns_even_if_a_cancellation_comes_back_as_a_timeout() -> None:
    ep = Endpoint(name="a", host="127.0.0.1", port=_closed_port())
    scraper = MetricsScraper(Datastore([ep]), interval_s=0.01, timeout_s=0.05)
    calls = swallowed = 0

    async def racy_scrape(_: Endpoint) -> bool:
        # What aiohttp can do when a cancel lands as its own timeout fires: the caller sees a
        # timeout (a failed scrape), not the cancellation.
        nonlocal calls, swallowed
        calls += 1
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            swallowed += 1
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        return False

    scraper.scrape_once = racy_scrape  # type: ignore[method-assign]
    await scraper.start()
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await asyncio.wait_for(scraper.stop(), 5)  # used to wait forever on the loop task
    assert time.monotonic() - t0 < 1.0
    assert swallowed == 1
    await asyncio.sleep(0.1)
    assert calls == 1  # the loop ended instead of scraping on


def test_gateway_metrics_carry_upstream_llm_d_names_beside_the_older_ones() -> None:
    """Every family in telemetry.LLM_D_NAMES is exported under both names with the same samples."""
    from prometheus_client import CollectorRegistry

    from ingate.datastore import Datastore
    from ingate.flowcontrol.metrics import FlowControlMetrics
    from ingate.telemetry import LLM_D_NAMES, Telemetry

    t = Telemetry(Datastore([]), "pool")
    fcm = FlowControlMetrics(t.registry)
    fcm.queue_size.labels("f", "0").set(3)
    fcm.queue_bytes.labels("f", "0").set(300)
    fcm.wait.labels("f", "0", "dispatched").observe(0.01)
    s = t.series("m", "m2")
    s.requests.inc()
    s.duration.observe(0.3)
    t.errors.labels("m", "m2", "503").inc()
    t.scheduling.observe(1e-4)
    t.running["m"] = 1
    from ingate.flowcontrol.capacity import CapacityCollector

    t.registry.register(CapacityCollector(Datastore([]), None, pool="pool"))
    reg: CollectorRegistry = t.registry
    for old, new in LLM_D_NAMES.items():
        olds = {
            (x.name[len(old) :], tuple(sorted(x.labels.items())), x.value)
            for f in reg.collect()
            if f.name == old
            for x in f.samples
            if not x.name.endswith("_created")
        }
        news = {
            (x.name[len(new) :], tuple(sorted(x.labels.items())), x.value)
            for f in reg.collect()
            if f.name == new
            for x in f.samples
            if not x.name.endswith("_created")
        }
        if old == "inference_extension_plugin_duration_seconds":
            continue  # the scheduler's collector (registered by the gateway): tests/unit/test_scheduling.py
        assert olds and olds == news, old
    assert (
        reg.get_sample_value("llm_d_epp_request_total", {"model_name": "m", "target_model_name": "m2"}) == 1
    )
