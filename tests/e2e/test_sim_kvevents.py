"""Simulated replicas publish vLLM KV-cache events over ZMQ; a subscriber's index tracks their caches."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from ingate.metrics.kvevents import block_hashes, none_hash
from ingate.metrics.kvsubscriber import BlockIndex, EventSource, KVEventSubscriber, KVEventSubscriptions
from ingate.sim import SimFleetConfig, start_fleet
from ingate.sim.profiles import get_profile
from ingate.sim.server import Replica, ReplicaConfig
from ingate.sim.tokenizer import token_ids, tokenize

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def _cfg(replicas: int = 1, num_gpu_blocks: int = 40, **kw: object) -> SimFleetConfig:
    replica = ReplicaConfig(
        profile=get_profile("h100"),
        model=MODEL,
        time_scale=20.0,
        kv_events_port=0,
        kv_events_replay_port=0,
        **kw,  # type: ignore[arg-type]
    )
    return SimFleetConfig(
        replicas=replicas, profiles=["h100"], replica=replica, overrides={"num_gpu_blocks": num_gpu_blocks}
    )


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


def _subscriber(r: Replica, index: BlockIndex) -> KVEventSubscriber:
    pub = r.kv_publisher
    assert pub is not None and pub.replay_endpoint is not None
    sub = KVEventSubscriber(r.address, pub.endpoint, index, pub.replay_endpoint, topic=pub.topic.decode())
    sub.start()
    return sub


async def _complete(s: aiohttp.ClientSession, addr: str, prompt: str, **extra: object) -> dict[str, object]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, **extra}
    async with s.post(f"http://{addr}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        out: dict[str, object] = await resp.json()
        return out


async def _synced(sub: KVEventSubscriber, r: Replica) -> None:
    assert r.kv_publisher is not None
    await sub.wait_for_seq(r.kv_publisher.next_seq - 1, timeout_s=10)


async def _nudged_until_synced(session: aiohttp.ClientSession, sub: KVEventSubscriber, r: Replica) -> None:
    """Like `_synced`, for a subscriber that may have joined after the replica's only batch went out:
    ZMQ PUB drops what a SUB socket still connecting misses (its "slow joiner"), and the subscriber
    learns of the gap, and replays it, from the next live batch. Up to 3 more requests send one."""
    assert r.kv_publisher is not None
    for attempt in range(4):
        try:
            await sub.wait_for_seq(r.kv_publisher.next_seq - 1, timeout_s=3)
            return
        except TimeoutError:
            if attempt == 3:
                raise
            await _complete(session, r.address, _prompt(f"nudge{attempt}", 16))


def _prompt(tag: str, n: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


@pytest.mark.parametrize("layout", ["map", "array"])
async def test_index_matches_each_replicas_cache_through_stores_and_evictions(
    session: aiohttp.ClientSession, layout: str
) -> None:
    async with start_fleet(_cfg(replicas=2, kv_events_layout=layout)) as fleet:
        r0, r1 = fleet.replicas
        assert r0.kv_publisher and r1.kv_publisher
        assert r0.kv_publisher.topic == f"kv@{r0.address}@{MODEL}".encode()
        index = BlockIndex()
        subs = [_subscriber(r, index) for r in fleet.replicas]
        try:
            shared = _prompt("sys", 160)  # 10 blocks
            first = shared + " " + _prompt("a", 96)
            await _complete(session, r0.address, first)
            await _complete(session, r0.address, shared + " " + _prompt("b", 96))  # shares 10 blocks
            await _complete(session, r1.address, _prompt("other", 64))
            for sub, r in zip(subs, fleet.replicas, strict=True):
                await _nudged_until_synced(session, sub, r)  # r1 sent one batch: the SUB may have missed it
                assert index.hashes(r.address) == r.engine.kv.cached_hashes() != set()
            # What a scorer computes from the prompt's token ids is what the index holds.
            hashes = block_hashes(token_ids(tokenize(first)), 16, none_hash("0"))
            assert (
                index.prefix_blocks(r0.address, hashes) == 16 and index.prefix_blocks(r1.address, hashes) == 0
            )
            # 40 blocks of KV: three more distinct 16-block prompts evict older blocks (BlockRemoved).
            for tag in ("c", "d", "e"):
                await _complete(session, r0.address, _prompt(tag, 256))
            await _synced(subs[0], r0)
            assert index.hashes(r0.address) == r0.engine.kv.cached_hashes()
            assert index.prefix_blocks(r0.address, hashes) < 16
            assert subs[0].stats.gaps == 0 and subs[0].stats.lost == 0
            # A reset clears the whole cache (AllBlocksCleared).
            async with session.post(f"http://{r0.address}/reset_prefix_cache") as resp:
                assert resp.status == 200
            await _synced(subs[0], r0)
            assert index.size(r0.address) == 0 and index.size(r1.address) > 0
        finally:
            for sub in subs:
                await sub.stop()


async def test_a_gap_is_filled_from_the_replay_socket(session: aiohttp.ClientSession) -> None:
    async with start_fleet(_cfg()) as fleet:
        r = fleet.replicas[0]
        index = BlockIndex()
        sub = _subscriber(r, index)
        try:
            await _complete(session, r.address, _prompt("x", 64))
            await _nudged_until_synced(session, sub, r)
            # Disconnect: batches published meanwhile never reach this subscriber's SUB socket.
            await sub.stop()
            for tag in ("y", "z", "w"):
                await _complete(session, r.address, _prompt(tag, 200))  # stores and evictions
            sub.start()
            await asyncio.sleep(0.2)  # let the SUB connection settle before the next batch
            await _complete(session, r.address, _prompt("v", 48))
            await _synced(sub, r)
            assert sub.stats.gaps == 1 and sub.stats.replayed >= 3 and sub.stats.lost == 0
            assert index.hashes(r.address) == r.engine.kv.cached_hashes()
        finally:
            await sub.stop()


async def test_batches_gone_from_the_replay_buffer_clear_the_endpoint(session: aiohttp.ClientSession) -> None:
    async with start_fleet(_cfg(kv_events_buffer_steps=1)) as fleet:
        r = fleet.replicas[0]
        index = BlockIndex()
        sub = _subscriber(r, index)
        try:
            await _complete(session, r.address, _prompt("x", 64))
            await _nudged_until_synced(session, sub, r)
            await sub.stop()
            for tag in ("y", "z", "w"):
                await _complete(session, r.address, _prompt(tag, 200))
            sub.start()
            await asyncio.sleep(0.2)
            await _complete(session, r.address, _prompt("v", 48))
            await _synced(sub, r)
            # Removals were lost with the batches: the index drops what it knew rather than claim
            # evicted blocks, and keeps only what it saw since.
            assert sub.stats.lost >= 1
            assert index.hashes(r.address) <= r.engine.kv.cached_hashes()
            assert index.size(r.address) > 0
        finally:
            await sub.stop()


async def test_lora_and_cache_salt_blocks_are_keyed_apart(session: aiohttp.ClientSession) -> None:
    async with start_fleet(_cfg(max_loras=2, lora_adapters=["ad1", "ad2"], num_gpu_blocks=200)) as fleet:
        r = fleet.replicas[0]
        index = BlockIndex()
        sub = _subscriber(r, index)
        try:
            text = _prompt("q", 64)
            ids = token_ids(tokenize(text))
            root = none_hash("0")
            u1 = await _complete(session, r.address, text, model="ad2")
            u2 = await _complete(session, r.address, text)  # base model: no hit on the adapter's blocks
            u3 = await _complete(session, r.address, text, cache_salt="tenant-1")
            for u in (u1, u2, u3):
                assert u["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # type: ignore[index]
            await _synced(sub, r)
            for kw in ({"lora_name": "ad2"}, {}, {"cache_salt": "tenant-1"}):
                assert index.prefix_blocks(r.address, block_hashes(ids, 16, root, **kw)) == 4  # type: ignore[arg-type]
            assert index.hashes(r.address) == r.engine.kv.cached_hashes()
        finally:
            await sub.stop()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


async def test_replicas_on_their_own_addresses_share_port_numbers(session: aiohttp.ClientSession) -> None:
    # Like pods on their own IPs: 127.0.0.2 and 127.0.0.3 both serve HTTP and KV events on one port each.
    http_port, kv_port = _free_port("127.0.0.2"), _free_port("127.0.0.2")
    cfg = _cfg(replicas=2)
    cfg.base_port = http_port
    cfg.hosts = ["127.0.0.2", "127.0.0.3"]
    assert cfg.replica is not None
    cfg.replica.kv_events_port, cfg.replica.kv_events_replay_port = kv_port, None
    async with start_fleet(cfg) as fleet:
        assert fleet.addresses == [f"127.0.0.2:{http_port}", f"127.0.0.3:{http_port}"]
        index = BlockIndex()
        subs = []
        for r in fleet.replicas:
            assert r.kv_publisher is not None and r.kv_publisher.endpoint.endswith(f":{kv_port}")
            sub = KVEventSubscriber(r.address, r.kv_publisher.endpoint, index)
            sub.start()
            subs.append(sub)
        try:
            await asyncio.sleep(0.3)  # no replay socket here: let the SUB connections settle first
            for r, tag in zip(fleet.replicas, ("p", "q"), strict=True):
                await _complete(session, r.address, _prompt(tag, 64))
            for sub, r in zip(subs, fleet.replicas, strict=True):
                await _synced(sub, r)
                assert index.hashes(r.address) == r.engine.kv.cached_hashes() != set()
        finally:
            for sub in subs:
                await sub.stop()


async def test_subscriptions_follow_the_pool(session: aiohttp.ClientSession) -> None:
    async with start_fleet(_cfg(replicas=2)) as fleet:
        index = BlockIndex()
        subs = KVEventSubscriptions(index)
        sources = {
            r.address: EventSource(r.kv_publisher.endpoint, r.kv_publisher.replay_endpoint)  # type: ignore[union-attr]
            for r in fleet.replicas
        }
        try:
            await subs.sync(sources)
            for r, tag in zip(fleet.replicas, ("a", "b"), strict=True):
                await _complete(session, r.address, _prompt(tag, 64))
            for r in fleet.replicas:
                await _nudged_until_synced(session, subs.subscribers[r.address], r)
                assert index.hashes(r.address) == r.engine.kv.cached_hashes() != set()
            gone = fleet.replicas[1].address
            await subs.sync({k: v for k, v in sources.items() if k != gone})
            assert list(subs.subscribers) == [fleet.replicas[0].address] and index.size(gone) == 0
        finally:
            await subs.close()
        assert not subs.subscribers and index.endpoints == []
