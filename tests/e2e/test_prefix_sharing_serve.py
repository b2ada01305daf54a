"""Two active-active `ingate serve` processes sharing their prefix indexes over UDP (prefixSharing):
a prefix routed through one replica is known to the other, which sends the next request with that
prefix to the same model server; without sharing the second replica has not seen it."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aiohttp
from conftest import MODEL, SimProcess
from prometheus_client.parser import text_string_to_metric_families
from test_flowcontrol_serve import serve

SERVED = "x-gateway-destination-endpoint-served"


def udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def samples(url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        tuple(sorted(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name
    }


async def complete(session: aiohttp.ClientSession, url: str, prompt: str) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4}
    async with session.post(url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        await r.read()
        return r.headers[SERVED]


async def test_a_prefix_routed_by_one_replica_is_known_to_the_other(
    sim_fleet: Callable[..., SimProcess], tmp_path: Path
) -> None:
    sim = sim_fleet(4, "--time-scale", "20")
    ua, ub = udp_port(), udp_port()
    share_a = {"listen": f"127.0.0.1:{ua}", "peers": [f"127.0.0.1:{ub}"], "flushIntervalMs": 10}
    share_b = {"listen": f"127.0.0.1:{ub}", "peers": [f"127.0.0.1:{ua}"], "flushIntervalMs": 10}
    document = "A long shared system prompt about the quarterly report. " * 60
    with (
        serve(tmp_path, sim.addresses, prefixSharing=share_a) as a,
        serve(tmp_path, sim.addresses, prefixSharing=share_b) as b,
        serve(tmp_path, sim.addresses) as lone,
    ):
        async with aiohttp.ClientSession() as s:
            first = await complete(s, a, document + "Question one?")
            deadline = time.monotonic() + 10
            while True:
                got = samples(b, "ingate_prefix_sharing_records_total")
                if got.get((("direction", "received"),), 0) >= 1:
                    break
                assert time.monotonic() < deadline, got
                await asyncio.sleep(0.05)
            # B never routed this prefix, yet remembers it on A's endpoint and goes there too.
            blocks = samples(b, "ingate_prefix_memory_blocks")
            assert any(v > 0 and dict(k)["endpoint"] == first for k, v in blocks.items()), blocks
            for i in range(3):
                assert await complete(s, b, document + f"Question {i + 2}?") == first
            # A replica outside the sharing group has learned nothing.
            assert all(v == 0 for v in samples(lone, "ingate_prefix_memory_blocks").values())
