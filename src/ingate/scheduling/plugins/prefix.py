"""Approximate prefix-cache affinity.

The gateway remembers, per endpoint, the chained hashes of the prompt blocks it routed there (an LRU of
bounded capacity, like the model server's own cache). A request scores each endpoint by the fraction of
its leading blocks that endpoint has seen. Blocks are `block_chars` characters (default 64, about 16
tokens at 4 characters per token); hash i covers block i and hash i-1, seeded with the target model, so
a match of block i implies the whole prefix up to it matches.

Cost per request: hashing O(prompt blocks) (capped at `max_blocks`, and reusing the hashes of a
recently seen prompt head), matching O(endpoints x log blocks) lookups, recording O(blocks) in C.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from itertools import islice

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
    """Which endpoint has seen which block hash: one LRU (an OrderedDict) of bounded capacity per endpoint.

    Every per-block operation runs in C (`map`, `islice`, dict updates); Python only loops over
    endpoints, so a decision costs O(endpoints x log blocks) lookups to match and O(blocks) C work to
    record, even in the steady state where every recorded block evicts an old one.
    """

    def __init__(self, capacity: int) -> None:
        self.default_capacity = capacity
        self._lru: dict[Endpoint, OrderedDict[int, None]] = {}

    def capacity_of(self, ep: Endpoint, block_chars: int) -> int:
        """Blocks to remember for `ep`: sized from its KV cache when it reports cache_config_info."""
        m = ep.metrics
        if m.block_size and m.num_gpu_blocks:
            tokens = m.block_size * m.num_gpu_blocks
            return max(1, tokens * 4 // block_chars)
        return self.default_capacity

    def match(self, hashes: list[int], candidates: list[Endpoint]) -> dict[Endpoint, int]:
        """Leading blocks of `hashes` each candidate has seen.

        Hashes are chained and `record` keeps a prefix's head more recently used than its tail, so an
        endpoint holding block i holds blocks 0..i (up to rare evictions): its match length is found
        by binary search, O(log blocks) lookups per endpoint.
        """
        n = len(hashes)
        matched = dict.fromkeys(candidates, 0)
        if n == 0:
            return matched
        first, last = hashes[0], hashes[-1]
        lrus = self._lru
        for ep in candidates:
            lru = lrus.get(ep)
            if not lru or first not in lru:
                continue
            if last in lru:
                matched[ep] = n
                continue
            lo, hi = 0, n - 1  # block lo is held, block hi is not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if hashes[mid] in lru:
                    lo = mid
                else:
                    hi = mid
            matched[ep] = hi
        return matched

    def record(self, ep: Endpoint, hashes: list[int], capacity: int) -> None:
        """Remember that `ep` now holds these blocks (most recently used), evicting the oldest."""
        lru = self._lru.get(ep)
        if lru is None:
            lru = self._lru[ep] = OrderedDict()
        # Insert the prefix backwards so its head ends up most recently used: eviction then trims a
        # prefix from its tail, like the model server's own cache, and never leaves a headless chain.
        rev = hashes[::-1]
        if all(map(lru.__contains__, rev)):
            deque(map(lru.move_to_end, rev), maxlen=0)  # repeat prefix: refresh recency only
            return
        held = [h for h in rev if h in lru]
        if held:
            deque(map(lru.pop, held), maxlen=0)
        lru.update(dict.fromkeys(rev))
        excess = len(lru) - capacity
        if excess > 0:
            deque(map(lru.pop, list(islice(lru, excess))), maxlen=0)

    def remove_endpoint(self, ep: Endpoint) -> None:
        self._lru.pop(ep, None)

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
