"""The gateway routes by the servers' own KV-cache events (precise-prefix scorer), end to end.

Simulated replicas on their own loopback addresses (like pods) publish vLLM-format KV events; the
in-process gateway subscribes to them once its precise profile schedules a request, and must send a
prompt to the replica that already holds its prefix, even when the gateway never routed that prefix
itself (the approximate index cannot know), and again after a replica restarts.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace

import aiohttp
import pytest
import zmq
from conftest import MODEL, gateway_config

from ingate.dataplane.proxy import BuiltinProxy
from ingate.gateway import Gateway
from ingate.metrics.kvevents import block_hashes, none_hash
from ingate.scheduling.plugins.precise_prefix import PrecisePrefixScorer
from ingate.sim import SimFleetConfig, start_fleet
from ingate.sim.profiles import get_profile
from ingate.sim.server import Replica, ReplicaConfig
from ingate.sim.tokenizer import token_ids, tokenize

pytestmark = pytest.mark.e2e
HOSTS = ["127.0.0.2", "127.0.0.3"]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _prompt(tag: str, n: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


async def _complete(s: aiohttp.ClientSession, base: str, prompt: str) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    async with s.post(f"{base}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()


async def _until(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _restart(r: Replica) -> Replica:
    """A new replica on `r`'s addresses (ZMQ releases a closed socket's port in its I/O thread, soon)."""
    for _ in range(50):
        new = Replica(replace(r.cfg))
        try:
            await new.start()
            return new
        except zmq.ZMQError:
            await asyncio.sleep(0.1)
    raise AssertionError("the KV event ports were never released")


def _holds(sc: PrecisePrefixScorer, r: Replica, prompt: str) -> int:
    hashes = block_hashes(token_ids(tokenize(prompt)), 16, none_hash("0"))
    return sc.index.prefix_blocks(r.address, hashes)


async def test_requests_go_to_the_replica_holding_their_prefix_and_after_a_restart(
    session: aiohttp.ClientSession,
    gateway: Callable[..., AbstractAsyncContextManager[tuple[Gateway, BuiltinProxy]]],
) -> None:
    http_port = _free_port(HOSTS[0])
    kv_port, replay_port = _free_port(HOSTS[0]), _free_port(HOSTS[0])
    replica = ReplicaConfig(
        profile=get_profile("h100"),
        model=MODEL,
        time_scale=20.0,
        kv_events_port=kv_port,
        kv_events_replay_port=replay_port,
    )
    fleet_cfg = SimFleetConfig(
        replicas=2, base_port=http_port, hosts=HOSTS, profiles=["h100"], replica=replica
    )
    params = {"eventsPort": kv_port, "replayPort": replay_port}
    cfg = gateway_config(
        [f"{h}:{http_port}" for h in HOSTS],
        scheduler={
            "defaultProfile": "precise",
            # Only the precise scorer: the replica holding the prefix must win on its score alone.
            "profiles": {"precise": {"scorers": [{"type": "precise-prefix", "parameters": params}]}},
        },
    )
    async with start_fleet(fleet_cfg) as fleet, gateway(cfg) as (gw, proxy):
        base = f"http://127.0.0.1:{proxy.port}"
        sc = gw.scheduler.profiles["precise"].scorers[0][0]
        assert isinstance(sc, PrecisePrefixScorer)
        r0, r1 = fleet.replicas
        await _complete(session, base, _prompt("hello", 8))  # the first decision starts the subscriptions
        await _until(
            lambda: sc.subscriptions is not None and len(sc.subscriptions.subscribers) == 2, "subscribe"
        )
        await asyncio.sleep(0.3)  # let the SUB connections settle (the replay covers what they miss)
        # Each replica gets a long shared head directly, behind the gateway's back.
        heads = {r0: _prompt("alpha", 320), r1: _prompt("beta", 320)}  # 20 blocks each
        for r, head in heads.items():
            await _complete(session, f"http://{r.address}", head + " " + _prompt("warm", 16))
        for r, head in heads.items():
            await _until(lambda r=r, head=head: _holds(sc, r, head) == 20, f"{r.address}'s events")
        # Requests sharing a head go to the replica that holds it.
        for round_ in range(3):
            for r, head in heads.items():
                before = r.requests_seen
                await _complete(session, base, head + " " + _prompt(f"q{round_}", 24))
                assert r.requests_seen == before + 1, f"request with {r.address}'s prefix went elsewhere"
        stats = sc.subscriptions.subscribers[r0.address].stats  # type: ignore[union-attr]
        assert stats.lost == 0 and stats.decode_errors == 0

        # r0 restarts (a new process on the same address): empty cache, event sequence from 0.
        await r0.crash()
        new = await _restart(r0)
        fleet.replicas[0] = new
        await _until(
            lambda: gw.ready() and new.address in {e.address for e in gw.datastore.endpoints()}, "ready"
        )
        await _complete(session, f"http://{new.address}", _prompt("gamma", 160))
        sub = sc.subscriptions.subscribers[new.address]  # type: ignore[union-attr]
        # Batches published before the SUB socket reconnected are lost on the live stream; the next one
        # that arrives (its sequence number went back) reveals the restart, and the replay fills in
        # from 0.
        for i in range(50):
            if sub.stats.restarts:
                break
            await asyncio.sleep(0.1)
            await _complete(session, f"http://{new.address}", _prompt(f"poke{i}", 32))
        await _until(
            lambda: sub.stats.restarts == 1 and _holds(sc, new, _prompt("gamma", 160)) == 10, "restart"
        )
        # The index no longer claims what the old process held, and matches the new one's cache (once
        # every batch published so far is applied: the last pokes' may still be on the way).
        assert new.kv_publisher is not None
        await sub.wait_for_seq(new.kv_publisher.next_seq - 1, timeout_s=10)
        assert _holds(sc, new, heads[r0]) == 0
        assert sc.index.hashes(new.address) == new.engine.kv.cached_hashes()
        # The gateway schedules only endpoints it considers healthy: the restarted one is, from its
        # first successful metrics scrape on (the crash made the scraper see refused connections).
        ep_new = gw.datastore.get(new.address)
        assert ep_new is not None
        await _until(lambda: ep_new.healthy, "the restarted replica healthy again")
        before = new.requests_seen
        await _complete(session, base, _prompt("gamma", 160) + " tail")
        where = {e.address: (e.healthy, sc.index.tracks(e.address)) for e in gw.datastore.endpoints()}
        assert new.requests_seen == before + 1, f"went elsewhere; (healthy, tracked) per endpoint: {where}"
