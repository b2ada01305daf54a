"""Opt-in: ingate against real vLLM on CPU (``make e2e-vllm``; skipped unless INGATE_VLLM_BIN is set).

Starts ``vllm serve`` on the tiny random Llama of ``make_tiny_llama.py`` with prefix caching, prompt token
details and KV-cache events, and an in-process gateway whose default profile is precise-prefix with the
model's own tokenizer.json. Checks what the simulator stands in for everywhere else:

- the scraper reads vLLM's real metrics (queue gauges, KV usage, ``cache_config_info`` block size);
- responses report ``usage.prompt_tokens_details.cached_tokens``, through the gateway;
- the KV events arrive and the index holds exactly the blocks the gateway computes from the server's
  ``/tokenize`` ids (same hash algorithm and seed), and the gateway's tokenizer gives the same ids;
- a repeated prompt scores 1.0 precisely on that endpoint.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from ingate.config import parse_config
from ingate.dataplane.proxy import BuiltinProxy
from ingate.gateway import Gateway
from ingate.metrics.kvevents import block_hashes, none_hash
from ingate.request import COMPLETIONS, parse_request
from ingate.scheduling.framework import CycleState
from ingate.scheduling.plugins.precise_prefix import PrecisePrefixScorer

VLLM_BIN = os.environ.get("INGATE_VLLM_BIN", "")
MODEL_DIR = Path(os.environ.get("INGATE_VLLM_MODEL", ".vllm-tiny-llama")).resolve()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not VLLM_BIN, reason="opt-in: make e2e-vllm (sets INGATE_VLLM_BIN)"),
]
SEED = "0"
ALGO = "sha256_cbor"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int, int]]:
    """`vllm serve` on loopback: (address, KV events port, replay port)."""
    port, kv, replay = _free_port(), _free_port(), _free_port()
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    kv_cfg = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        # vLLM binds wildcard endpoints and connects to the others (then it would be the client).
        "endpoint": f"tcp://*:{kv}",
        "replay_endpoint": f"tcp://*:{replay}",
    }
    cmd = [
        VLLM_BIN, "serve", str(MODEL_DIR), "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", "tiny", "--max-model-len", "2048", "--enable-prefix-caching",
        "--prefix-caching-hash-algo", ALGO, "--enable-prompt-tokens-details",
        "--kv-events-config", json.dumps(kv_cfg),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": SEED, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu"}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"vllm exited: {log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"vllm not ready in 300 s: {log.read_text()[-4000:]}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
                out_ = subprocess.run(
                    ["curl", "-sf", f"http://127.0.0.1:{port}/health"], capture_output=True, timeout=5
                )
                if out_.returncode == 0:
                    break
            except OSError:
                pass
            time.sleep(1)
        yield f"127.0.0.1:{port}", kv, replay
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        yield s


async def test_metrics_usage_and_kv_events_of_real_vllm(
    vllm: tuple[str, int, int], session: aiohttp.ClientSession
) -> None:
    address, kv, replay = vllm
    params = {
        "eventsPort": kv,
        "replayPort": replay,
        "hashSeed": SEED,
        "hashAlgo": ALGO,
        "tokenizer": "huggingface",
        "tokenizerPath": str(MODEL_DIR / "tokenizer.json"),
    }
    cfg = parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "pool": {"name": "vllm", "endpoints": [{"address": address}]},
            "metrics": {"intervalMs": 100},
            "dataplane": {"type": "builtin"},
            "scheduler": {
                "defaultProfile": "p",
                "profiles": {"p": {"scorers": [{"type": "precise-prefix", "parameters": params}]}},
            },
        }
    )
    gw = Gateway(cfg)
    await gw.start()
    proxy = BuiltinProxy.serving(gw)
    await proxy.start()
    try:
        ep = gw.datastore.endpoints()[0]
        deadline = time.monotonic() + 30
        while not gw.ready():
            assert time.monotonic() < deadline, "never scraped vLLM's metrics"
            await asyncio.sleep(0.1)
        # Metrics: cache_config_info gives the block size (128 on CPU) and the number of blocks.
        assert ep.metrics.block_size and ep.metrics.num_gpu_blocks, ep.metrics
        bs = ep.metrics.block_size
        sc = gw.scheduler.profiles["p"].scorers[0][0]
        assert isinstance(sc, PrecisePrefixScorer)
        prompt = " ".join(f"w{i % 900}" for i in range(3 * bs + 10))  # 3 full blocks and a bit
        base = f"http://127.0.0.1:{proxy.port}"
        # The first decision starts the subscriptions; give the SUB socket time to connect (batches it
        # misses are replayed only when a later one arrives).
        warm = {"model": "tiny", "prompt": "w1 w2 w3", "max_tokens": 1}
        async with session.post(f"{base}/v1/completions", json=warm) as resp:
            assert resp.status == 200, await resp.text()
        await asyncio.sleep(1.0)
        usages = []
        for _ in range(2):
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 4}
            async with session.post(f"{base}/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                usages.append((await resp.json())["usage"])
            await asyncio.sleep(0.5)
        # cached_tokens: 0 the first time, the 3 full blocks the second.
        assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
        assert usages[1]["prompt_tokens_details"]["cached_tokens"] == 3 * bs
        # The server's token ids, and ours from tokenizer.json, agree.
        async with session.post(f"http://{address}/tokenize", json={"model": "tiny", "prompt": prompt}) as r:
            server_ids = (await r.json())["tokens"]
        req = parse_request(COMPLETIONS, {}, json.dumps({"model": "tiny", "prompt": prompt}).encode())
        assert sc.token_ids(CycleState(), req) == server_ids
        # KV events: the index holds exactly the blocks vLLM's hash chain gives for these ids.
        hashes = block_hashes(server_ids, bs, none_hash(SEED, ALGO), algo=ALGO)
        deadline = time.monotonic() + 10
        while sc.index.prefix_blocks(address, hashes) < len(hashes):
            subs = sc.subscriptions.subscribers if sc.subscriptions else {}
            assert time.monotonic() < deadline, (
                f"index holds {sc.index.size(address)} blocks; {subs}: "
                + str([(s.endpoint, s.last_seq, s.stats) for s in subs.values()])
            )
            await asyncio.sleep(0.1)
        # Nothing else was cached (the warm-up prompt is shorter than a block): the index is exactly these.
        assert sc.index.hashes(address) == set(hashes)
        print(f"vLLM block size {bs}, {ep.metrics.num_gpu_blocks} blocks; indexed {len(hashes)} blocks")
        assert sc.score(CycleState(), req, [ep]) == {ep: 1.0}
        stats = sc.subscriptions.subscribers[address].stats  # type: ignore[union-attr]
        assert stats.decode_errors == 0 and stats.lost == 0
    finally:
        await proxy.stop()
        await gw.stop()
