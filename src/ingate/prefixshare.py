"""Active-active pickers share what their approximate prefix indexes learn, over batched UDP.

With several picker replicas serving at once, each routes only the requests its Gateway sends it, so
each approximate prefix index (``prefix-cache`` scorer) learns only its share of the traffic: a
prompt whose prefix another replica sent to pod A looks new here and may go to pod B, a cache miss.
Sharing closes that gap cheaply: every routing decision's (endpoint, prompt-block hashes) is appended
to a bounded queue (no I/O on the request path); every ``flushIntervalMs`` the queue is packed into
datagrams and sent to each peer, which records the blocks as if it had routed them itself.

Why UDP: the state is a cache hint. A lost datagram costs some affinity, never a request; there is no
connection to set up, no head-of-line blocking and no backpressure on the picker. Each datagram is
self-contained (``msgpack``: version, sender id, records of profile, scorer, endpoint address and the
hashes as little-endian uint64 bytes), so a bad or truncated one is dropped alone. Replicas must run
the same scheduler config (the hashes are seeded with the model name and cut at the same block size).
Peers are ``HOST:PORT`` entries; a host name resolves to all its addresses, so a headless Service's
name reaches every replica (the sender's own datagrams are recognised by id and ignored).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections import deque
from collections.abc import Iterable
from typing import Any

import msgpack
from prometheus_client import CollectorRegistry, Counter, Gauge

from ingate.config import PrefixSharingConfig
from ingate.datastore import Datastore, Endpoint
from ingate.scheduling.plugins.prefix import PrefixCacheScorer

log = logging.getLogger(__name__)
VERSION = 1
Record = tuple[str, str, str, bytes]
"""(profile, scorer name, endpoint address, hashes as little-endian uint64 bytes)."""


def _hash_bytes(hashes: list[int]) -> bytes:
    import array

    a = array.array("Q", hashes)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def _hashes(raw: bytes) -> list[int]:
    import array

    if len(raw) % 8:
        raise ValueError("hash bytes not a multiple of 8")
    a = array.array("Q")
    a.frombytes(raw)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tolist()


def encode(sender: bytes, records: Iterable[Record], max_bytes: int) -> list[bytes]:
    """Pack records into datagrams of at most ``max_bytes``. A record too large on its own keeps its
    leading hashes (a prefix of a chain is itself a valid chain)."""
    out: list[bytes] = []
    batch: list[Record] = []
    size = 16 + len(sender)
    for prof, scorer, addr, raw in records:
        overhead = len(prof) + len(scorer) + len(addr) + 24
        if overhead + len(raw) > max_bytes - 32:
            raw = raw[: max(0, (max_bytes - 32 - overhead) // 8 * 8)]
        if batch and size + overhead + len(raw) > max_bytes:
            out.append(msgpack.packb([VERSION, sender, batch]))
            batch, size = [], 16 + len(sender)
        batch.append((prof, scorer, addr, raw))
        size += overhead + len(raw)
    if batch:
        out.append(msgpack.packb([VERSION, sender, batch]))
    return out


def decode(data: bytes) -> tuple[bytes, list[tuple[str, str, str, list[int]]]]:
    """(sender, records) of a datagram; ValueError if it is not one."""
    try:
        doc = msgpack.unpackb(data)
    except Exception as e:  # msgpack raises several types for bad input
        raise ValueError(f"not msgpack: {e}") from None
    if not (isinstance(doc, list) and len(doc) == 3 and doc[0] == VERSION and isinstance(doc[1], bytes)):
        raise ValueError("not a prefix-sharing datagram")
    records = []
    for r in doc[2] if isinstance(doc[2], list) else ():
        if not (isinstance(r, list) and len(r) == 4 and all(isinstance(x, str) for x in r[:3])):
            raise ValueError("bad record")
        if not isinstance(r[3], bytes):
            raise ValueError("bad record")
        records.append((r[0], r[1], r[2], _hashes(r[3])))
    return doc[1], records


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.records = Counter(
            "ingate_prefix_sharing_records",
            "Prefix-index records sent to peers (direction=sent, once per record) and applied from them.",
            ["direction"],
            registry=registry,
        )
        self.datagrams = Counter(
            "ingate_prefix_sharing_datagrams", "Prefix-sharing datagrams sent and received.", ["direction"],
            registry=registry,
        )  # fmt: skip
        self.dropped = Counter(
            "ingate_prefix_sharing_dropped",
            "Prefix-sharing records or datagrams dropped, by reason (queue_full, bad_datagram, "
            "unknown_endpoint, unknown_scorer, send_error).",
            ["reason"],
            registry=registry,
        )
        self.peers = Gauge(
            "ingate_prefix_sharing_peers", "Peer addresses datagrams are sent to.", registry=registry
        )


class PrefixSharing(asyncio.DatagramProtocol):
    """Sends this replica's prefix-index records to its peers and applies theirs (module docstring)."""

    def __init__(
        self,
        cfg: PrefixSharingConfig,
        scorers: Iterable[tuple[str, PrefixCacheScorer]],
        datastore: Datastore,
        registry: CollectorRegistry,
    ) -> None:
        self.cfg = cfg
        self.datastore = datastore
        self.sender = os.urandom(8)
        self.metrics = _Metrics(registry)
        self._queue: deque[Record] = deque()
        self._scorers: dict[tuple[str, str], PrefixCacheScorer] = {}
        for profile, sc in scorers:
            self._scorers[(profile, sc.name)] = sc
            sc.share = self._sink(profile, sc.name)
        self._peers: list[tuple[str, int]] = []
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def for_scheduler(
        cls, cfg: PrefixSharingConfig, plugins: Iterable[tuple[str, object]], datastore: Datastore,
        registry: CollectorRegistry,
    ) -> PrefixSharing:  # fmt: skip
        """Share every ``prefix-cache`` scorer of every profile."""
        scorers = [(prof, p) for prof, p in plugins if isinstance(p, PrefixCacheScorer)]
        return cls(cfg, scorers, datastore, registry)

    def _sink(self, profile: str, scorer: str) -> Any:
        q, limit, dropped = self._queue, self.cfg.queue_limit, self.metrics.dropped.labels("queue_full")

        def share(ep: Endpoint, hashes: list[int]) -> None:
            if len(q) >= limit:
                dropped.inc()
                return
            q.append((profile, scorer, ep.address, _hash_bytes(hashes)))

        return share

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        host, _, port = self.cfg.listen.rpartition(":")
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=(host.strip("[]"), int(port)), family=family
        )
        self._transport = transport
        await self._resolve()
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="prefix-sharing-flush"),
            asyncio.create_task(self._resolve_loop(), name="prefix-sharing-resolve"),
        ]

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port) (the config may ask for port 0)."""
        assert self._transport is not None
        host, port = self._transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.flush()  # what is queued still goes out
        if self._transport is not None:
            self._transport.close()

    # -- sending -------------------------------------------------------------------------------------

    async def _resolve(self) -> None:
        loop = asyncio.get_running_loop()
        found: set[tuple[str, int]] = set()
        for entry in self.cfg.peers:
            host, _, port = entry.rpartition(":")
            try:
                infos = await loop.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_DGRAM)
            except OSError as e:
                log.warning("prefix sharing: cannot resolve peer %s: %s", entry, e)
                continue
            found.update((str(i[4][0]), int(i[4][1])) for i in infos)
        self._peers = sorted(found)
        self.metrics.peers.set(len(self._peers))

    async def _resolve_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.resolve_interval_s)
            await self._resolve()

    async def _flush_loop(self) -> None:
        interval = self.cfg.flush_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            self.flush()

    def flush(self) -> None:
        """Send what is queued to every peer now."""
        if not self._queue or self._transport is None:
            return
        records = list(self._queue)
        self._queue.clear()
        self.metrics.records.labels("sent").inc(len(records))
        datagrams = encode(self.sender, records, self.cfg.max_datagram_bytes)
        for peer in self._peers:
            for d in datagrams:
                try:
                    self._transport.sendto(d, peer)
                except OSError:
                    self.metrics.dropped.labels("send_error").inc()
                    continue
                self.metrics.datagrams.labels("sent").inc()

    # -- receiving (asyncio.DatagramProtocol) ----------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            sender, records = decode(data)
        except ValueError:
            self.metrics.dropped.labels("bad_datagram").inc()
            return
        if sender == self.sender:
            return  # our own, through a peer name that includes this replica
        self.metrics.datagrams.labels("received").inc()
        applied = 0
        for profile, scorer, address, hashes in records:
            sc = self._scorers.get((profile, scorer))
            if sc is None:
                self.metrics.dropped.labels("unknown_scorer").inc()
                continue
            ep = self.datastore.get(address)
            if ep is None:  # not (yet) in this replica's pool
                self.metrics.dropped.labels("unknown_endpoint").inc()
                continue
            sc.learn(ep, hashes)
            applied += 1
        self.metrics.records.labels("received").inc(applied)

    def error_received(self, exc: Exception) -> None:
        # e.g. ICMP port unreachable from a peer that is down: loss, nothing to do.
        self.metrics.dropped.labels("send_error").inc()
