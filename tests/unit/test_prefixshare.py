"""Active-active prefix sharing: the datagram format (round trip, size cap, hostile input) and two
real replicas on loopback UDP learning each other's routing decisions; loss, a dead peer, unknown
endpoints and a full queue never fail or block a request."""

from __future__ import annotations

import asyncio
import socket

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from ingate.config import PrefixSharingConfig
from ingate.datastore import Datastore, Endpoint
from ingate.lifecycle import CycleState, SchedulingResult
from ingate.prefixshare import PrefixSharing, decode, encode
from ingate.request import COMPLETIONS, parse_request
from ingate.scheduling.plugins.prefix import PrefixCacheScorer


def _req(prompt: str):  # type: ignore[no-untyped-def]
    r = parse_request(COMPLETIONS, {}, orjson.dumps({"model": "m", "prompt": prompt}))
    r.target_model = "m"
    return r


def test_round_trip_and_datagram_size_cap() -> None:
    rec = [("default", "prefix-cache", f"10.0.0.{i}:8000", bytes(range(8)) * 40) for i in range(50)]
    grams = encode(b"12345678", rec, max_bytes=2048)
    assert len(grams) > 1 and all(len(g) <= 2048 for g in grams)
    got = [r for g in grams for r in decode(g)[1]]
    assert [r[2] for r in got] == [r[2] for r in rec]
    assert got[0][3] == [int.from_bytes(bytes(range(8)), "little")] * 40
    # A record larger than a datagram keeps its leading hashes: still a valid (shorter) chain.
    (big,) = encode(b"12345678", [("p", "s", "a:1", b"\x01" * 8 * 1000)], max_bytes=1024)
    (only,) = decode(big)[1]
    assert 0 < len(only[3]) < 1000 and len(big) <= 1024


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_hostile_datagrams_are_rejected_with_value_error_only(data: bytes) -> None:
    try:
        decode(data)
    except ValueError:
        pass


def test_wrong_version_and_bad_hash_bytes_are_rejected() -> None:
    import msgpack

    with pytest.raises(ValueError):
        decode(msgpack.packb([2, b"x" * 8, []]))
    with pytest.raises(ValueError):
        decode(msgpack.packb([1, b"x" * 8, [["p", "s", "a:1", b"\x00" * 7]]]))


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Replica:
    def __init__(self, port: int, peers: list[str], eps: list[Endpoint]) -> None:
        self.ds = Datastore(Endpoint(name=e.name, host=e.host, port=e.port) for e in eps)
        self.scorer = PrefixCacheScorer(block_chars=16)
        self.registry = CollectorRegistry()
        cfg = PrefixSharingConfig(
            listen=f"127.0.0.1:{port}", peers=peers, flush_interval_ms=5, queue_limit=50
        )
        self.sharing = PrefixSharing(cfg, [("default", self.scorer)], self.ds, self.registry)

    def route(self, prompt: str, to: int) -> None:
        eps = self.ds.endpoints()
        ctx, r = CycleState(), _req(prompt)
        self.scorer.score(ctx, r, eps)
        self.scorer.post_schedule(ctx, r, SchedulingResult([eps[to]], "default"))

    def score(self, prompt: str) -> list[float]:
        eps = self.ds.endpoints()
        s = self.scorer.score(CycleState(), _req(prompt), eps)
        return [s[e] for e in eps]

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


async def test_two_replicas_learn_each_others_prefixes_over_udp() -> None:
    eps = [Endpoint(name=f"p{i}", host=f"127.0.0.{i + 2}", port=8000) for i in range(3)]
    pa, pb, dead = _free_udp_port(), _free_udp_port(), _free_udp_port()
    # Each lists both replicas (as a headless Service would) and a peer that is down.
    peers = [f"127.0.0.1:{pa}", f"127.0.0.1:{pb}", f"127.0.0.1:{dead}"]
    a, b = Replica(pa, peers, eps), Replica(pb, peers, eps)
    await a.sharing.start()
    await b.sharing.start()
    try:
        doc = "system prompt " * 20
        assert b.score(doc + "q1") == [0.0, 0.0, 0.0]
        a.route(doc + "q1", to=1)
        b.route("another document entirely " * 10, to=2)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if b.metric("ingate_prefix_sharing_records_total", direction="received") >= 1:
                break
        sb = b.score(doc + "q2")  # B never routed this prefix; it learned A's decision
        assert sb[1] > 0.8 and sb[0] == sb[2] == 0.0
        assert a.score("another document entirely " * 10)[2] == 1.0
        assert a.metric("ingate_prefix_sharing_peers") == 3
        # Own datagrams (this replica is among its peers) are ignored: A applied only B's record.
        assert a.metric("ingate_prefix_sharing_records_total", direction="received") == 1
    finally:
        await a.sharing.stop()
        await b.sharing.stop()


async def test_unknown_endpoints_bad_datagrams_and_a_full_queue_are_counted_not_fatal() -> None:
    eps = [Endpoint(name="p0", host="127.0.0.2", port=8000)]
    pa, pb = _free_udp_port(), _free_udp_port()
    a = Replica(pa, [f"127.0.0.1:{pb}"], eps)
    b = Replica(pb, [f"127.0.0.1:{pa}"], [Endpoint(name="x", host="127.0.0.9", port=8000)])
    await a.sharing.start()
    await b.sharing.start()
    try:
        a.route("x" * 64, to=0)  # an endpoint B's pool does not have (yet)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"\xc1garbage", ("127.0.0.1", pb))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if b.metric("ingate_prefix_sharing_dropped_total", reason="unknown_endpoint") >= 1:
                break
        assert b.metric("ingate_prefix_sharing_dropped_total", reason="unknown_endpoint") == 1
        for _ in range(100):
            await asyncio.sleep(0.01)
            if b.metric("ingate_prefix_sharing_dropped_total", reason="bad_datagram") >= 1:
                break
        assert b.metric("ingate_prefix_sharing_dropped_total", reason="bad_datagram") == 1
        # Routing faster than the flush with a queue of 50: the surplus is dropped, routing goes on.
        await a.sharing.stop()
        for i in range(80):
            a.route(f"{i}" * 40, to=0)
        assert a.metric("ingate_prefix_sharing_dropped_total", reason="queue_full") == 30
    finally:
        await b.sharing.stop()


def test_config_keys_and_bad_peers() -> None:
    import yaml

    from ingate.config import ConfigError, parse_config

    cfg = parse_config(
        yaml.safe_load(
            "pool: {endpoints: [{address: '127.0.0.2:8000'}]}\n"
            "prefixSharing: {listen: '0.0.0.0:9005', peers: ['ingate-epp-peers.ns.svc:9005'], flushIntervalMs: 10}\n"
        )
    )
    assert cfg.prefix_sharing is not None and cfg.prefix_sharing.flush_interval_ms == 10
    with pytest.raises(ConfigError, match=r"prefixSharing\.peers"):
        parse_config({"prefixSharing": {"peers": ["no-port"]}})
