"""The request-level `llm_d_epp_*` series (cached tokens, normalised time per output token, streaming
TPOT and inter-token latency, request/response sizes, running requests) carry what real requests
through the built-in proxy to an `ingate sim` replica measured: the values are checked against the
usage the model server reported and the bytes the client sent and received."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import MODEL, gateway_config
from prometheus_client.parser import text_string_to_metric_families

from ingate.dataplane.proxy import BuiltinProxy
from ingate.gateway import Gateway
from ingate.sim.process import SimProcess

pytestmark = [pytest.mark.e2e]
GatewayCM = Callable[..., AbstractAsyncContextManager[tuple[Gateway, BuiltinProxy]]]
LABELS = {"model_name": MODEL, "target_model_name": MODEL}


async def _samples(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, tuple[Any, ...]], float]:
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _get(samples: dict[tuple[str, tuple[Any, ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_request_series_carry_what_real_requests_measured(
    sim_fleet: Callable[..., SimProcess], gateway: GatewayCM
) -> None:
    sim = sim_fleet(1, "--time-scale", "2")
    prompt = "You are a careful assistant. " * 40
    sent_bytes = received_bytes = 0
    usages: list[dict[str, Any]] = []
    async with gateway(gateway_config(sim.addresses)) as (_, proxy), aiohttp.ClientSession() as http:
        for i in range(2):  # the second one reuses the first one's prefix: cached tokens
            body = orjson.dumps({"model": MODEL, "prompt": prompt + f"q{i}", "max_tokens": 8})
            t0 = time.monotonic()
            async with http.post(
                proxy.url + "/v1/completions", data=body, headers={"content-type": "application/json"}
            ) as r:
                raw = await r.read()
                assert r.status == 200, raw
            usages.append(orjson.loads(raw)["usage"] | {"latency": time.monotonic() - t0})
            sent_bytes += len(body)
            received_bytes += len(raw)
        assert usages[1]["prompt_tokens_details"]["cached_tokens"] > 0

        body = orjson.dumps(
            {
                "model": MODEL,
                "prompt": prompt + "stream",
                "max_tokens": 24,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        t0 = time.monotonic()
        async with http.post(
            proxy.url + "/v1/completions", data=body, headers={"content-type": "application/json"}
        ) as r:
            assert r.status == 200
            first = await r.content.readany()
            mid = await _samples(http, proxy.url)  # while the stream is open
            rest = await r.read()
        stream_latency = time.monotonic() - t0
        raw = first + rest
        sent_bytes += len(body)
        received_bytes += len(raw)
        events = [e for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
        usage = orjson.loads(events[-1][6:])["usage"]
        usages.append(usage | {"latency": stream_latency})
        await asyncio.sleep(0.05)  # `finish` runs right after the last byte
        after = await _samples(http, proxy.url)

    assert _get(mid, "llm_d_epp_request_running", model_name=MODEL) == 1
    assert _get(mid, "inference_objective_running_requests", model_name=MODEL) == 1
    assert _get(after, "llm_d_epp_request_running", model_name=MODEL) == 0

    cached = [u.get("prompt_tokens_details", {}).get("cached_tokens", 0) for u in usages]
    assert _get(after, "llm_d_epp_request_cached_tokens_count", **LABELS) == 3
    assert _get(after, "llm_d_epp_request_cached_tokens_sum", **LABELS) == sum(cached)
    assert _get(after, "inference_objective_prompt_cached_tokens_sum", **LABELS) == sum(cached)

    # end-to-end latency / output tokens, per request: below what the client measured end to end
    ntpot_sum = _get(after, "llm_d_epp_request_ntpot_seconds_sum", **LABELS)
    assert _get(after, "llm_d_epp_request_ntpot_seconds_count", **LABELS) == 3
    upper = sum(u["latency"] / u["completion_tokens"] for u in usages)
    assert 0 < ntpot_sum <= upper

    assert _get(after, "llm_d_epp_request_size_bytes_sum", **LABELS) == sent_bytes
    assert _get(after, "llm_d_epp_request_size_bytes_count", **LABELS) == 3
    assert _get(after, "llm_d_epp_response_size_bytes_sum", **LABELS) == received_bytes

    # streaming only: one TPOT sample, and one ITL sample per gap between the chunks the proxy relayed
    assert _get(after, "llm_d_epp_request_streaming_tpot_seconds_count", **LABELS) == 1
    tpot = _get(after, "llm_d_epp_request_streaming_tpot_seconds_sum", **LABELS)
    assert 0 < tpot < stream_latency / (usage["completion_tokens"] - 1)
    itl_count = _get(after, "llm_d_epp_request_streaming_itl_seconds_count", **LABELS)
    itl_sum = _get(after, "llm_d_epp_request_streaming_itl_seconds_sum", **LABELS)
    # the sim writes one event per token (plus the usage event and [DONE]); a loaded host may coalesce
    # some into one chunk, so: several gaps (per chunk, not per request), at most one per event
    assert 3 <= itl_count <= len(events) + 1, (itl_count, len(events))
    assert 0 < itl_sum < stream_latency
    assert ("llm_d_epp_average_running_requests", (("name", "test-pool"),)) in after
    assert ("llm_d_epp_std_dev_kv_cache_utilization", (("name", "test-pool"),)) in after
