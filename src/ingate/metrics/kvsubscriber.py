"""Subscribing to model servers' vLLM KV-cache events and indexing which blocks each one holds.

`KVEventSubscriber` follows one server's ZMQ publisher (SUB socket, asyncio) and applies every batch to
a shared `BlockIndex` in sequence order. A gap in the sequence numbers (messages dropped by ZMQ or missed
while reconnecting) is filled from the server's replay socket; what the replay can no longer provide
(its buffer moved on) makes the subscriber clear that server's entries, so the index may miss blocks
but never claims a block the server has evicted. A server restart (the sequence goes back) clears them too.

The index is exact while a server caches no more than ``max_blocks_per_endpoint`` blocks (size it at
least to the server's ``num_gpu_blocks``); beyond that the oldest stored entries are dropped. Only
GPU-resident blocks are indexed (events whose medium is another tier, e.g. CPU offload, are ignored).
Hashes are the 64-bit event form (`ingate.metrics.kvevents`); the precise prefix scorer computes the
same hashes from a request's token ids and asks `prefix_blocks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import zmq
import zmq.asyncio

from ingate.metrics.kvevents import (
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEventDecodeError,
    decode_batch,
    parse_seq,
    seq_bytes,
)

log = logging.getLogger(__name__)


class BlockIndex:
    """Which KV blocks each endpoint holds, kept from its events (see module docstring)."""

    def __init__(self, max_blocks_per_endpoint: int = 1_000_000) -> None:
        if max_blocks_per_endpoint < 1:
            raise ValueError("max_blocks_per_endpoint must be positive")
        self.max_blocks = max_blocks_per_endpoint
        # endpoint -> block hash -> copies stored (vLLM may cache one hash in two blocks), oldest first
        self._blocks: dict[str, OrderedDict[int, int]] = {}
        self.trimmed = 0  # entries dropped because an endpoint exceeded max_blocks
        self.unknown_removals = 0  # BlockRemoved for a hash the index did not hold

    def apply(self, endpoint: str, batch: EventBatch) -> None:
        """Apply one batch's events in order."""
        blocks = self._blocks.setdefault(endpoint, OrderedDict())
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                if ev.medium not in (None, MEDIUM_GPU):
                    continue
                for h in ev.block_hashes:
                    n = blocks.get(h)
                    if n is None:
                        blocks[h] = 1
                    else:
                        blocks[h] = n + 1
                        blocks.move_to_end(h)
                while len(blocks) > self.max_blocks:
                    blocks.popitem(last=False)
                    self.trimmed += 1
            elif isinstance(ev, BlockRemoved):
                if ev.medium not in (None, MEDIUM_GPU):
                    continue
                for h in ev.block_hashes:
                    n = blocks.get(h)
                    if n is None:
                        self.unknown_removals += 1
                    elif n == 1:
                        del blocks[h]
                    else:
                        blocks[h] = n - 1
            elif isinstance(ev, AllBlocksCleared):
                blocks.clear()

    def clear(self, endpoint: str) -> None:
        """Forget what `endpoint` holds (it restarted, or its event stream lost batches)."""
        self._blocks.pop(endpoint, None)

    def tracks(self, endpoint: str) -> bool:
        """Whether `endpoint`'s events are being indexed: a batch was applied since it was last cleared."""
        return endpoint in self._blocks

    def blocks_of(self, endpoint: str) -> Mapping[int, int] | None:
        """`endpoint`'s hashes (to copies held), read-only, for lookups on the hot path (None: not tracked)."""
        return self._blocks.get(endpoint)

    def contains(self, endpoint: str, block_hash: int) -> bool:
        blocks = self._blocks.get(endpoint)
        return blocks is not None and block_hash in blocks

    def prefix_blocks(self, endpoint: str, hashes: Sequence[int]) -> int:
        """How many leading blocks of a prompt (its chained hashes) `endpoint` holds."""
        blocks = self._blocks.get(endpoint)
        if not blocks:
            return 0
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def hashes(self, endpoint: str) -> set[int]:
        """A copy of the hashes `endpoint` holds."""
        return set(self._blocks.get(endpoint, ()))

    def size(self, endpoint: str) -> int:
        return len(self._blocks.get(endpoint, ()))

    @property
    def endpoints(self) -> list[str]:
        return list(self._blocks)


@dataclass(slots=True)
class SubscriberStats:
    """Counters of one subscription (what a metrics exporter would publish)."""

    batches: int = 0  # batches applied (live and replayed)
    replayed: int = 0  # of which came from the replay socket
    gaps: int = 0  # sequence gaps seen
    lost: int = 0  # batches neither received nor replayable (each loss clears the endpoint)
    restarts: int = 0  # publisher sequence went back to 0
    decode_errors: int = 0


class KVEventSubscriber:
    """Follows one publisher; `name` is the endpoint key in the index (e.g. the server's host:port)."""

    def __init__(
        self,
        name: str,
        endpoint: str,
        index: BlockIndex,
        replay_endpoint: str | None = None,
        topic: str = "",
        replay_timeout_s: float = 1.0,
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self.index = index
        self.replay_timeout_s = replay_timeout_s
        self.last_seq: int | None = None
        self.stats = SubscriberStats()
        self._ctx = zmq.asyncio.Context.instance()
        self._sub: zmq.asyncio.Socket | None = None
        self._dealer: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._progress = asyncio.Condition()

    def start(self) -> None:
        """Connect and follow the stream in a background task."""
        if self._task is not None:
            return
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
        sub.connect(self.endpoint)
        self._sub = sub
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kv-events-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for s in (self._sub, self._dealer):
            if s is not None:
                s.close(linger=0)
        self._sub = self._dealer = None

    async def wait_for_seq(self, seq: int, timeout_s: float) -> None:
        """Wait until every batch up to `seq` has been applied (TimeoutError otherwise)."""
        async with asyncio.timeout(timeout_s), self._progress:
            await self._progress.wait_for(lambda: self.last_seq is not None and self.last_seq >= seq)

    async def _run(self) -> None:
        assert self._sub is not None
        while True:
            frames = await self._sub.recv_multipart()
            try:
                if len(frames) != 3:
                    raise KVEventDecodeError(f"message has {len(frames)} frames, not 3")
                seq = parse_seq(frames[1])
                batch = decode_batch(frames[2])
            except KVEventDecodeError as e:
                self.stats.decode_errors += 1
                log.warning("KV events from %s: %s", self.name, e)
                continue
            await self._on_batch(seq, batch)

    async def _on_batch(self, seq: int, batch: EventBatch) -> None:
        last = self.last_seq
        if last is not None and seq <= last:
            # Live batches arrive in order and a replay stops below the live batch that asked for it,
            # so a sequence number that does not advance means the publisher restarted (its cache
            # starts empty). Its first batches, if missed while the SUB socket reconnected, are
            # replayed from 0 below (what its buffer no longer has stays unknown: under-reported).
            self.stats.restarts += 1
            self.index.clear(self.name)
            last = None
        expected = 0 if last is None else last + 1
        if seq > expected:
            # A gap; on the first message, the history before we connected (what replay still has).
            if last is not None:
                self.stats.gaps += 1
            await self._replay(expected, seq, first=last is None)
        self._apply(seq, batch)
        async with self._progress:
            self._progress.notify_all()

    def _apply(self, seq: int, batch: EventBatch) -> None:
        self.index.apply(self.name, batch)
        self.last_seq = seq
        self.stats.batches += 1

    async def _replay(self, start: int, until: int, first: bool) -> None:
        """Apply batches [start, until) from the replay socket; clear the endpoint if some are gone."""
        got: list[tuple[int, EventBatch]] = []
        if self.replay_endpoint is not None:
            got = await self._fetch(start, until)
        have = start
        for seq, _ in got:
            if seq != have:
                break
            have += 1
        missing = until - have
        if missing <= 0:
            for seq, batch in got[: until - start]:
                self._apply(seq, batch)
                self.stats.replayed += 1
            return
        if first:
            # Connected late and the oldest history is gone: index what replay still has (blocks stored
            # before it stay unknown; the index can only under-report them).
            tail = [(s, b) for s, b in got if s < until]
            if tail and tail[-1][0] == until - 1 and self._contiguous(tail):
                for seq, batch in tail:
                    self._apply(seq, batch)
                    self.stats.replayed += 1
            return
        self.stats.lost += missing
        log.warning("KV events from %s: %d batches lost; clearing its index entries", self.name, missing)
        self.index.clear(self.name)

    @staticmethod
    def _contiguous(items: list[tuple[int, EventBatch]]) -> bool:
        return all(b[0] == a[0] + 1 for a, b in itertools.pairwise(items))

    async def _fetch(self, start: int, until: int) -> list[tuple[int, EventBatch]]:
        """Ask the replay socket for everything from `start`; stops at the end marker or `until`."""
        if self._dealer is None:
            d = self._ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            assert self.replay_endpoint is not None
            d.connect(self.replay_endpoint)
            self._dealer = d
        dealer = self._dealer
        out: list[tuple[int, EventBatch]] = []
        try:
            async with asyncio.timeout(self.replay_timeout_s):
                await dealer.send_multipart((b"", seq_bytes(start)))
                while True:
                    frames = await dealer.recv_multipart()
                    if len(frames) != 3:
                        raise KVEventDecodeError(f"replay reply has {len(frames)} frames, not 3")
                    seq = parse_seq(frames[1])
                    if seq < 0:
                        break
                    if seq < until:
                        out.append((seq, decode_batch(frames[2])))
        except (TimeoutError, KVEventDecodeError, zmq.ZMQError) as e:
            # Drop the socket so a late answer to this request cannot be read as the next one's.
            log.warning("KV event replay from %s failed: %s", self.name, e or "timeout")
            dealer.close(linger=0)
            self._dealer = None
        return out


@dataclass(frozen=True, slots=True)
class EventSource:
    """Where one server publishes its KV events."""

    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""


class KVEventSubscriptions:
    """One `KVEventSubscriber` per server, kept in step with the pool (call `sync` when it changes).

    A server that leaves the pool is unsubscribed and its index entries dropped; one whose source
    changes (a restarted pod on a new address) is resubscribed from scratch.
    """

    def __init__(self, index: BlockIndex, replay_timeout_s: float = 1.0) -> None:
        self.index = index
        self.replay_timeout_s = replay_timeout_s
        self._subs: dict[str, tuple[EventSource, KVEventSubscriber]] = {}

    @property
    def subscribers(self) -> dict[str, KVEventSubscriber]:
        return {name: sub for name, (_, sub) in self._subs.items()}

    async def sync(self, sources: dict[str, EventSource]) -> None:
        """Subscribe to every server in `sources` (name -> source) and to no other."""
        for name in list(self._subs):
            src, sub = self._subs[name]
            if sources.get(name) != src:
                del self._subs[name]
                await sub.stop()
                self.index.clear(name)
        for name, src in sources.items():
            if name not in self._subs:
                sub = KVEventSubscriber(
                    name, src.endpoint, self.index, src.replay_endpoint, src.topic, self.replay_timeout_s
                )
                sub.start()
                self._subs[name] = (src, sub)

    async def close(self) -> None:
        await self.sync({})
