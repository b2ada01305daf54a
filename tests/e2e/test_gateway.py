"""The gateway (built-in proxy) in front of 4 `ingate sim` replicas in a separate process."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
from conftest import MODEL, SimProcess, gateway_config

from ingate.config import GatewayConfig
from ingate.dataplane.proxy import BuiltinProxy
from ingate.gateway import Gateway
from ingate.scheduling.plugins.prefix import PrefixCacheScorer

GatewayCM = Callable[[GatewayConfig], AbstractAsyncContextManager[tuple[Gateway, BuiltinProxy]]]
SERVED = "x-gateway-destination-endpoint-served"


async def _post(
    s: aiohttp.ClientSession, url: str, body: dict[str, Any], path: str = "/v1/completions"
) -> tuple[int, str, dict[str, Any]]:
    async with s.post(url + path, json=body) as r:
        return r.status, r.headers.get(SERVED, ""), await r.json(content_type=None)


async def test_prefix_affinity_keeps_shared_prefix_on_one_replica(
    sim_fleet: Callable[..., SimProcess], gateway: GatewayCM
) -> None:
    sim = sim_fleet(4, "--time-scale", "20")
    async with gateway(gateway_config(sim.addresses)) as (_, proxy), aiohttp.ClientSession() as s:
        system = " ".join(f"policy{i}" for i in range(800))
        served = []
        cached = []
        for i in range(6):
            status, ep, body = await _post(
                s, proxy.url, {"model": MODEL, "prompt": f"{system} question {i}", "max_tokens": 2}
            )
            assert status == 200
            served.append(ep)
            cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
        assert len(set(served)) == 1, served
        assert cached[0] == 0 and all(c >= 784 for c in cached[1:]), cached
        hits = {a: await _prefix_hits(s, a) for a in sim.addresses}
        assert hits[served[0]] >= 5 * 784 and sum(hits.values()) == hits[served[0]], hits


async def _prefix_hits(s: aiohttp.ClientSession, address: str) -> float:
    """The replica's own vLLM prefix-cache hit counter (tokens)."""
    async with s.get(f"http://{address}/metrics") as r:
        text = await r.text()
    return sum(
        float(ln.rsplit(" ", 1)[1])
        for ln in text.splitlines()
        if ln.startswith("vllm:prefix_cache_hits_total")
    )


async def test_burst_of_unrelated_requests_spreads(
    sim_fleet: Callable[..., SimProcess], gateway: GatewayCM
) -> None:
    sim = sim_fleet(4, "--time-scale", "5")
    async with gateway(gateway_config(sim.addresses)) as (_, proxy), aiohttp.ClientSession() as s:
        bodies = [
            {"model": MODEL, "prompt": f"unrelated {i} " + "x " * 50, "max_tokens": 40} for i in range(40)
        ]
        results = await asyncio.gather(*(_post(s, proxy.url, b) for b in bodies))
        assert all(st == 200 for st, _, _ in results)
        counts = Counter(ep for _, ep, _ in results)
        assert len(counts) == 4 and max(counts.values()) <= 20, counts


async def test_lora_affinity(sim_fleet: Callable[..., SimProcess], gateway: GatewayCM) -> None:
    sim = sim_fleet(4, "--time-scale", "5", "--lora-adapters", "sql-lora,chat-lora", "--max-loras", "1")
    cfg = gateway_config(sim.addresses, models={"served": [MODEL], "adapters": ["sql-lora", "chat-lora"]})
    async with gateway(cfg) as (gw, proxy), aiohttp.ClientSession() as s:
        # Make sql-lora resident on one replica with a long request, then wait for a scrape to see it.
        first = asyncio.create_task(
            _post(s, proxy.url, {"model": "sql-lora", "prompt": "warm up", "max_tokens": 400})
        )
        for _ in range(200):
            await asyncio.sleep(0.02)
            holders = [
                ep.address for ep in gw.datastore.endpoints() if "sql-lora" in ep.metrics.active_adapters
            ]
            if holders:
                break
        assert holders
        for i in range(5):
            status, ep, _ = await _post(
                s, proxy.url, {"model": "sql-lora", "prompt": f"select {i}", "max_tokens": 2}
            )
            assert status == 200 and ep == holders[0]
        assert (await first)[0] == 200


async def test_streaming_passes_through_incrementally(
    sim_fleet: Callable[..., SimProcess], gateway: GatewayCM
) -> None:
    sim = sim_fleet(2, "--time-scale", "1")
    async with gateway(gateway_config(sim.addresses)) as (_, proxy), aiohttp.ClientSession() as s:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 20,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        arrivals = []
        raw = b""
        loop = asyncio.get_running_loop()
        async with s.post(proxy.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
            async for chunk in r.content.iter_any():
                arrivals.append(loop.time())
                raw += chunk
        events = raw.decode().split("\n\n")
        assert events[-2] == "data: [DONE]"
        usage = json.loads(events[-3][6:])["usage"]
        assert usage["completion_tokens"] == 20
        # 20 decode steps of ~10 ms each: chunks must arrive spread over time, not in one buffered blob.
        assert len(arrivals) >= 5 and arrivals[-1] - arrivals[0] > 0.1


async def test_failover_when_a_replica_dies(sim_fleet: Callable[..., SimProcess], gateway: GatewayCM) -> None:
    good = sim_fleet(3, "--time-scale", "20")
    doomed = sim_fleet(1, "--time-scale", "20")
    async with (
        gateway(gateway_config(good.addresses + doomed.addresses)) as (gw, proxy),
        aiohttp.ClientSession() as s,
    ):
        doomed.stop()
        results = [
            await _post(s, proxy.url, {"model": MODEL, "prompt": f"p{i}", "max_tokens": 2}) for i in range(20)
        ]
        assert all(st == 200 for st, _, _ in results), [r[0] for r in results]
        assert all(ep in good.addresses for _, ep, _ in results)
        dead = gw.datastore.get(doomed.addresses[0])
        assert dead is not None and not dead.healthy


async def test_errors_pass_through_and_own_errors_are_openai_style(
    sim_fleet: Callable[..., SimProcess], gateway: GatewayCM
) -> None:
    sim = sim_fleet(1, "--time-scale", "20", "--error-rate", "1.0")
    cfg = gateway_config(sim.addresses, models={"served": [MODEL]})
    async with gateway(cfg) as (_, proxy), aiohttp.ClientSession() as s:
        status, _, body = await _post(s, proxy.url, {"model": MODEL, "prompt": "x"})
        assert status == 500 and body["error"]["code"] == "injected_error"  # the model server's own answer
        status, _, body = await _post(s, proxy.url, {"model": "unknown", "prompt": "x"})
        assert status == 404 and body["error"]["type"] == "not_found_error"
        async with s.post(proxy.url + "/v1/completions", data=b"{oops") as r:
            assert r.status == 400 and (await r.json())["error"]["message"]


async def test_client_disconnect_cancels_upstream(
    sim_fleet: Callable[..., SimProcess], gateway: GatewayCM
) -> None:
    sim = sim_fleet(1, "--time-scale", "1")
    async with gateway(gateway_config(sim.addresses)) as (gw, proxy):
        ep = gw.datastore.endpoints()[0]
        async with aiohttp.ClientSession() as s:
            r = await s.post(
                proxy.url + "/v1/completions",
                json={"model": MODEL, "prompt": "long", "max_tokens": 5000, "stream": True},
            )
            await r.content.readany()
            for _ in range(100):
                if ep.metrics.running == 1:
                    break
                await asyncio.sleep(0.02)
            assert ep.metrics.running == 1
            r.close()  # the client goes away mid-stream
        for _ in range(150):
            await asyncio.sleep(0.02)
            if ep.metrics.running == 0 and ep.in_flight == 0:
                break
        assert ep.metrics.running == 0 and ep.in_flight == 0


async def test_prefix_memory_grows_when_the_replica_kept_what_the_gateway_forgot(
    sim_fleet: Callable[..., SimProcess], gateway: GatewayCM
) -> None:
    """The learned memory length end to end: the replica's cached-token report reaches the prefix
    scorer through the data plane. One replica with 128 KV blocks (2048 tokens): the gateway sizes its
    memory of it from `cache_config_info` at 4 characters per token (128 blocks of 64 characters), so
    after about 8,000 characters of other prompts it has forgotten a document that the replica, at 5 to 7
    characters per token here, still holds."""
    sim = sim_fleet(1, "--time-scale", "20", "--num-gpu-blocks", "128")
    async with gateway(gateway_config(sim.addresses)) as (gw, proxy), aiohttp.ClientSession() as s:
        scorer = next(
            sc
            for sc, _ in gw.director.scheduler.profiles["default"].scorers
            if isinstance(sc, PrefixCacheScorer)
        )
        doc = " ".join(f"clause{i} text" for i in range(46))  # 633 characters (9 blocks), 92 tokens
        # 14 x 10 blocks: the young generation (half the memory, 64 blocks) retires twice, the replica
        # (128 blocks of 16 tokens) still has room for all of them (about 8 blocks each).
        fillers = [" ".join(f"filler{k}x{i} text" for i in range(45))[:640] for k in range(14)]
        for prompt in [doc, *fillers]:
            status, _, body = await _post(s, proxy.url, {"model": MODEL, "prompt": prompt, "max_tokens": 1})
            assert status == 200 and body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert scorer.scale == {}  # nothing promised, nothing cached: no evidence yet
        ep = gw.datastore.endpoints()[0]
        assert scorer.index.match(scorer.hasher.hashes(doc, MODEL), [ep])[ep] == 0  # forgotten here ...
        status, _, body = await _post(s, proxy.url, {"model": MODEL, "prompt": doc, "max_tokens": 1})
        assert (
            status == 200 and body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 48
        )  # ... not there
        assert scorer.scale == {ep: 1.1}
