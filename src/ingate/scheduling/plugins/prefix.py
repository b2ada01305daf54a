"""Approximate prefix-cache affinity.

The gateway remembers, per endpoint, the chained hashes of the prompt blocks it routed there (an LRU of
bounded capacity, like the model server's own cache). A request scores each endpoint by the fraction of
its leading blocks that endpoint has seen. Blocks are `block_chars` characters (default 64, about 16
tokens at 4 characters per token); hash i covers block i and hash i-1, seeded with the target model, so
a match of block i implies the whole prefix up to it matches.

Cost per request is O(prompt blocks) for hashing (capped at `max_blocks`) plus O(sum over blocks of the
endpoints holding that block) for matching: never O(endpoints x blocks) when prefixes don't overlap.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import xxhash

from ingate.datastore import Datastore, Endpoint
from ingate.request import InferenceRequest
from ingate.scheduling.framework import CycleState, SchedulingResult

_CTX_KEY = "prefix.hashes"
_h64 = xxhash.xxh64_intdigest


_SPLITTERS: dict[int, re.Pattern[bytes]] = {}


def _splitter(block_chars: int) -> re.Pattern[bytes]:
    pat = _SPLITTERS.get(block_chars)
    if pat is None:  # compiled once per block size, never per request
        pat = _SPLITTERS[block_chars] = re.compile(b".{%d}" % block_chars, re.S)
    return pat


def prompt_block_hashes(text: str, model: str, block_chars: int, max_blocks: int) -> list[int]:
    """Chained xxhash64 of the full `block_chars` blocks of `text` (at most `max_blocks`).

    The regex cuts the prompt into blocks in one C call, cheaper than slicing in a Python loop (slicing
    was over half the hashing cost on 32 KB prompts).
    """
    blocks = _splitter(block_chars).findall(text.encode(), 0, block_chars * max_blocks)
    h = _h64(model.encode())
    out: list[int] = []
    append = out.append
    for b in blocks:
        h = _h64(b, h)
        append(h)
    return out


class PrefixHasher:
    """`prompt_block_hashes` that reuses the hashes of a prompt head seen recently.

    Most traffic that benefits from prefix affinity shares long heads (system prompts, documents,
    conversation history), so re-hashing them block by block is the bulk of the decision's CPU. The
    hasher remembers, per (model, first block), the bytes and hashes of the latest prompt; a new prompt
    with the same first block reuses the hashes of the longest common run of whole blocks, found by
    comparing memoryviews (C memcmp, binary search), and hashes only the rest. Results are identical to
    `prompt_block_hashes`.
    """

    def __init__(self, block_chars: int, max_blocks: int, entries: int = 1024) -> None:
        self.block_chars = block_chars
        self.max_blocks = max_blocks
        self.entries = entries
        self._cache: OrderedDict[tuple[str, bytes], tuple[bytes, list[int]]] = OrderedDict()
        self.reused_blocks = 0

    def hashes(self, text: str, model: str) -> list[int]:
        bc = self.block_chars
        data = text.encode()[: bc * self.max_blocks]
        nblocks = len(data) // bc
        if nblocks == 0:
            return []
        key = (model, data[:bc])
        cached = self._cache.get(key)
        k = 0
        if cached is not None:
            old, old_hashes = cached
            hi = min(nblocks, len(old_hashes))
            mv, mo = memoryview(data), memoryview(old)
            if mv[: hi * bc] == mo[: hi * bc]:
                k = hi
            else:  # invariant: the first lo blocks match, the first hi do not
                lo = 1
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if mv[: mid * bc] == mo[: mid * bc]:
                        lo = mid
                    else:
                        hi = mid
                k = lo
            self._cache.move_to_end(key)
        if k:
            out = old_hashes[:k]
            h = out[-1]
            self.reused_blocks += k
        else:
            out = []
            h = _h64(model.encode())
        if k < nblocks:
            append = out.append
            for b in _splitter(bc).findall(data, k * bc, nblocks * bc):
                h = _h64(b, h)
                append(h)
        # Remember the latest prompt, unless it is just a shorter head of the one remembered.
        if cached is None or not (k == len(out) < len(cached[1])):
            self._cache[key] = (data, out)
            if len(self._cache) > self.entries:
                self._cache.popitem(last=False)
        return out


class PrefixIndex:
    """Which endpoint has seen which block hash, with one LRU of bounded capacity per endpoint."""

    def __init__(self, capacity: int) -> None:
        self.default_capacity = capacity
        self._lru: dict[Endpoint, OrderedDict[int, None]] = {}
        self._owners: dict[int, set[Endpoint]] = {}

    def capacity_of(self, ep: Endpoint, block_chars: int) -> int:
        """Blocks to remember for `ep`: sized from its KV cache when it reports cache_config_info."""
        m = ep.metrics
        if m.block_size and m.num_gpu_blocks:
            tokens = m.block_size * m.num_gpu_blocks
            return max(1, tokens * 4 // block_chars)
        return self.default_capacity

    def match(self, hashes: list[int], candidates: list[Endpoint]) -> dict[Endpoint, int]:
        """Leading blocks of `hashes` each candidate has seen.

        Because hashes are chained and `record` evicts the tail of a prefix before its head, the
        endpoints holding block i+1 are (up to rare evictions) a subset of those holding block i. So the
        block where each candidate drops out is found by binary search: O(drop-out points x log blocks)
        set checks instead of one per block.
        """
        matched = dict.fromkeys(candidates, 0)
        holders_of = list(map(self._owners.get, hashes))
        try:
            n = holders_of.index(None)
        except ValueError:
            n = len(hashes)
        if n == 0:
            return matched
        active = set(candidates).intersection(holders_of[0])  # type: ignore[arg-type]
        lo = 0  # every active candidate holds blocks 0..lo
        while active:
            if active.issubset(holders_of[n - 1]):  # type: ignore[arg-type]
                for ep in active:
                    matched[ep] = n
                break
            hi = n - 1  # some active candidate lacks block hi
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if active.issubset(holders_of[mid]):  # type: ignore[arg-type]
                    lo = mid
                else:
                    hi = mid
            still = active.intersection(holders_of[hi])  # type: ignore[arg-type]
            for ep in active - still:
                matched[ep] = hi
            active = still
            lo = hi
        return matched

    def record(self, ep: Endpoint, hashes: list[int], capacity: int) -> None:
        """Remember that `ep` now holds these blocks (most recently used)."""
        lru = self._lru.get(ep)
        if lru is None:
            lru = self._lru[ep] = OrderedDict()
        # Walk the prefix backwards so its head ends up most recently used: eviction then trims a
        # prefix from its tail, like the model server's own cache, and never leaves a headless chain.
        rev = hashes[::-1]
        if all(map(lru.__contains__, rev)):
            # Repeat prefix (the common case): refresh recency in C, nothing new to own.
            deque(map(lru.move_to_end, rev), maxlen=0)
            return
        owners = self._owners
        for h in rev:
            if h in lru:
                lru.move_to_end(h)
                continue
            lru[h] = None
            s = owners.get(h)
            if s is None:
                owners[h] = {ep}
            else:
                s.add(ep)
        while len(lru) > capacity:
            old, _ = lru.popitem(last=False)
            self._drop_owner(old, ep)

    def _drop_owner(self, h: int, ep: Endpoint) -> None:
        s = self._owners.get(h)
        if s is not None:
            s.discard(ep)
            if not s:
                del self._owners[h]

    def remove_endpoint(self, ep: Endpoint) -> None:
        lru = self._lru.pop(ep, None)
        if lru:
            for h in lru:
                self._drop_owner(h, ep)

    def size(self, ep: Endpoint) -> int:
        lru = self._lru.get(ep)
        return len(lru) if lru else 0


@dataclass
class PrefixCacheScorer:
    """Score = matched leading blocks / prompt blocks; records the target's blocks after scheduling."""

    block_chars: int = 64
    max_blocks: int = 256
    capacity: int = 31_250
    name: str = "prefix-cache"
    index: PrefixIndex = field(init=False)
    hasher: PrefixHasher = field(init=False)

    def __post_init__(self) -> None:
        if self.block_chars < 1 or self.max_blocks < 1 or self.capacity < 1:
            raise ValueError("blockChars, maxBlocks and capacity must be positive")
        self.index = PrefixIndex(self.capacity)
        self.hasher = PrefixHasher(self.block_chars, self.max_blocks)

    def attach(self, datastore: Datastore) -> None:
        datastore.on_remove(self.index.remove_endpoint)

    def _hashes(self, ctx: CycleState, request: InferenceRequest) -> list[int]:
        hashes: list[int] | None = ctx.get(_CTX_KEY)
        if hashes is None:
            hashes = self.hasher.hashes(request.prompt_text, request.target_model or request.model)
            ctx[_CTX_KEY] = hashes
        return hashes

    def score(
        self, ctx: CycleState, request: InferenceRequest, endpoints: list[Endpoint]
    ) -> dict[Endpoint, float]:
        hashes = self._hashes(ctx, request)
        if not hashes:
            return dict.fromkeys(endpoints, 0.0)
        n = len(hashes)
        return {ep: k / n for ep, k in self.index.match(hashes, endpoints).items()}

    def post_schedule(self, ctx: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        hashes = self._hashes(ctx, request)
        if hashes:
            ep = result.target
            self.index.record(ep, hashes, self.index.capacity_of(ep, self.block_chars))
