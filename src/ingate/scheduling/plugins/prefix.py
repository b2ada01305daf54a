"""Approximate prefix-cache affinity.

The gateway remembers, per endpoint, the chained hashes of the prompt blocks it routed there (an approximate
LRU of bounded capacity, like the model server's own cache). A request scores each endpoint by the fraction of
its leading blocks that endpoint has seen. Blocks are `block_chars` characters (default 64, about 16
tokens at 4 characters per token); hash i covers block i and hash i-1, seeded with the target model, so
a match of block i implies the whole prefix up to it matches.

Cost per request: hashing O(prompt blocks) (capped at `max_blocks`, and reusing the hashes of a
recently seen prompt head), matching O(endpoints x log blocks) lookups, recording O(blocks) in C.

How much to remember per endpoint is learned from the servers' own reports (`adaptive`, on by
default). A response's `usage.prompt_tokens_details.cached_tokens` says how much of the prompt the
server really had cached when it admitted the request, to compare with what the index promised there:

- promised more: the server had evicted what the index still remembers, so the endpoint's memory
  shrinks (x0.8);
- the server had more: the index had forgotten too early, so it grows (x1.1);
- as promised, from the far end of the memory (blocks not used for at least a quarter of it): the
  oldest memories still hold, so it grows a little (x1.05), probing for a longer one.

The memory stays within `minScale`..`maxScale` of the size derived from the endpoint's KV cache. Without
such reports (a server that does not send them, streams without `include_usage`) nothing changes.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import xxhash
from prometheus_client.core import GaugeMetricFamily

from ingate.datastore import Datastore, Endpoint
from ingate.lifecycle import ResponseInfo
from ingate.request import InferenceRequest
from ingate.scheduling.framework import PREFIX_MATCH_KEY, CycleState, SchedulingResult
from ingate.scheduling.plugins.registry import register

_CTX_KEY = "prefix.hashes"
_OWNER_KEY = "prefix.scorer"
"""Which scorer instance matched this cycle (a scorer of weight 0 is not asked to score)."""
_OLD_KEY = "prefix.old"
_GROW = 1.1
_CONFIRM = 1.05
_SHRINK = 0.8
_h64 = xxhash.xxh64_intdigest


_SPLITTERS: dict[tuple[int, int], struct.Struct] = {}


def _splitter(block_chars: int, nblocks: int) -> struct.Struct:
    """A `struct` that cuts `nblocks` blocks of `block_chars` bytes out of a buffer in one C call.

    Compiled once per (block size, block count), never per request; the count is bounded by
    `max_blocks`, and so is the cache. Cheaper than a regex (which steps through every character) and
    than slicing in a Python loop.
    """
    st = _SPLITTERS.get((block_chars, nblocks))
    if st is None:
        st = _SPLITTERS[(block_chars, nblocks)] = struct.Struct(f"{block_chars}s" * nblocks)
    return st


def _chain(blocks: tuple[bytes, ...], h: int, out: list[int]) -> list[int]:
    append = out.append
    for b in blocks:
        h = _h64(b, h)
        append(h)
    return out


def prompt_block_hashes(text: str, model: str, block_chars: int, max_blocks: int) -> list[int]:
    """Chained xxhash64 of the full `block_chars` blocks of `text` (at most `max_blocks`).

    The reference implementation; `PrefixHasher.hashes` returns the same values faster.
    """
    data = text.encode()
    n = min(len(data) // block_chars, max_blocks)
    if n == 0:
        return []
    return _chain(_splitter(block_chars, n).unpack_from(data), _h64(model.encode()), [])


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
            _chain(_splitter(bc, nblocks - k).unpack_from(data, k * bc), h, out)
        # Remember the latest prompt, unless it is just a shorter head of the one remembered.
        if cached is None or not (k == len(out) < len(cached[1])):
            self._cache[key] = (data, out)
            if len(self._cache) > self.entries:
                self._cache.popitem(last=False)
        return out


class _Generations:
    """One endpoint's remembered blocks: a young and an old set, an approximate LRU.

    New and re-used blocks go into `young`; when it holds half the capacity, it becomes `old` and the
    previous old generation is dropped whole. So the endpoint remembers its most recent blocks, at
    least half the capacity and never much more than all of it, and every per-block operation is one
    C-level set insert or lookup: no per-block ordering to maintain, no per-block eviction.
    """

    __slots__ = ("old", "young")

    def __init__(self) -> None:
        self.young: set[int] = set()
        self.old: set[int] = set()

    def __contains__(self, h: int) -> bool:
        return h in self.young or h in self.old

    def __len__(self) -> int:
        return len(self.young) + len(self.old)


class PrefixIndex:
    """Which endpoint has seen which block hash: a generational approximate LRU per endpoint.

    `record` costs one C-level set update per request (O(blocks), no per-block Python work) and
    forgets in whole generations; `match` costs O(log blocks) lookups per endpoint, so a decision is
    O(endpoints x log blocks) in Python plus O(blocks) in C.
    """

    def __init__(self, capacity: int) -> None:
        self.default_capacity = capacity
        self._gens: dict[Endpoint, _Generations] = {}

    def capacity_of(self, ep: Endpoint, block_chars: int, chars_per_token: float = 4.0) -> int:
        """Blocks to remember for `ep`: sized from its KV cache when it reports cache_config_info."""
        m = ep.metrics
        if m.block_size and m.num_gpu_blocks:
            tokens = m.block_size * m.num_gpu_blocks
            return max(1, int(tokens * chars_per_token) // block_chars)
        return self.default_capacity

    def match(self, hashes: list[int], candidates: list[Endpoint]) -> dict[Endpoint, int]:
        """Leading blocks of `hashes` each candidate has seen.

        Hashes are chained and `record` always records a prefix from its first block, in one
        generation, so an endpoint holding block i holds blocks 0..i: its match length is found by
        binary search, O(log blocks) lookups per endpoint.
        """
        n = len(hashes)
        matched = dict.fromkeys(candidates, 0)
        if n == 0:
            return matched
        first, last = hashes[0], hashes[-1]
        gens = self._gens
        for ep in candidates:
            g = gens.get(ep)
            if g is None:
                continue
            young, old = g.young, g.old
            if first not in young and first not in old:
                continue
            if last in young or last in old:
                matched[ep] = n
                continue
            lo, hi = 0, n - 1  # block lo is held, block hi is not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                h = hashes[mid]
                if h in young or h in old:
                    lo = mid
                else:
                    hi = mid
            matched[ep] = hi
        return matched

    def record(self, ep: Endpoint, hashes: list[int], capacity: int) -> None:
        """Remember that `ep` now holds these blocks (most recently used), forgetting the oldest.

        Once the young generation holds half of `capacity` it retires to old and the previous old
        generation is dropped: the endpoint remembers at least its last `capacity / 2` distinct
        blocks and at most `capacity` plus one prompt's blocks.
        """
        g = self._gens.get(ep)
        if g is None:
            g = self._gens[ep] = _Generations()
        young = g.young
        young.update(hashes)
        if len(young) >= max(1, capacity // 2):
            g.old = young
            g.young = set()

    def far_end(self, ep: Endpoint, h: int, capacity: int) -> bool:
        """Whether `h` is among the oldest blocks `ep` remembers: only in the old generation while the
        young one is at least half full (so `h` was last used at least a quarter of the capacity ago,
        not just before the latest retirement)."""
        g = self._gens.get(ep)
        return g is not None and 4 * len(g.young) >= capacity and h not in g.young and h in g.old

    def remove_endpoint(self, ep: Endpoint) -> None:
        self._gens.pop(ep, None)

    def size(self, ep: Endpoint) -> int:
        """Blocks remembered for `ep` (a block in both generations counts twice)."""
        g = self._gens.get(ep)
        return len(g) if g else 0


@register("scorer", "prefix-cache")
@dataclass
class PrefixCacheScorer:
    """Score = matched leading blocks / prompt blocks; records the target's blocks after scheduling."""

    block_chars: int = 64
    max_blocks: int = 256
    capacity: int = 31_250
    chars_per_token: float = 4.0
    """Prompt characters per server token, to size the memory from a KV cache counted in tokens (4 is
    typical of English text with BPE tokenizers)."""
    adaptive: bool = True
    """Learn each endpoint's retention from the cached tokens its responses report (module docstring)."""
    min_scale: float = 0.25
    max_scale: float = 2.0
    name: str = "prefix-cache"
    index: PrefixIndex = field(init=False)
    hasher: PrefixHasher = field(init=False)
    scale: dict[Endpoint, float] = field(init=False, default_factory=dict)
    """adaptive: each endpoint's learned retention, as a multiple of its KV-sized capacity."""
    share: Callable[[Endpoint, list[int]], None] | None = field(init=False, default=None)
    """Told every (endpoint, hashes) this replica records, e.g. to send them to peer replicas
    (`ingate.prefixshare`); must not block."""

    def __post_init__(self) -> None:
        if self.block_chars < 1 or self.max_blocks < 1 or self.capacity < 1:
            raise ValueError("blockChars, maxBlocks and capacity must be positive")
        if not 0 < self.min_scale <= 1 <= self.max_scale:
            raise ValueError("minScale must be in (0, 1] and maxScale at least 1")
        if not 0.5 <= self.chars_per_token <= 32:
            raise ValueError("charsPerToken must be between 0.5 and 32")
        self.index = PrefixIndex(self.capacity)
        self.hasher = PrefixHasher(self.block_chars, self.max_blocks)

    def attach(self, datastore: Datastore) -> None:
        datastore.on_remove(self.index.remove_endpoint)
        datastore.on_remove(self._forget_scale)

    def _forget_scale(self, ep: Endpoint) -> None:
        self.scale.pop(ep, None)

    def collect_metrics(self, profile: str, endpoints: Sequence[Endpoint]) -> Iterator[GaugeMetricFamily]:
        """`ExposesMetrics`: the memory per endpoint, at scrape time: how many blocks the index
        remembers and the learned scale of its size (1 until learned, or when not adaptive)."""
        labels = ["profile", "endpoint"]
        blocks = GaugeMetricFamily(
            "ingate_prefix_memory_blocks",
            "Prompt blocks the prefix index remembers per endpoint.",
            labels=labels,
        )
        scale = GaugeMetricFamily(
            "ingate_prefix_memory_scale",
            "Learned size of the prefix index's memory per endpoint, as a multiple of its KV-derived size.",
            labels=labels,
        )
        for ep in endpoints:
            blocks.add_metric([profile, ep.address], self.index.size(ep))
            scale.add_metric([profile, ep.address], self.scale.get(ep, 1.0))
        yield blocks
        yield scale

    def prompt_hashes(self, ctx: CycleState, request: InferenceRequest) -> list[int]:
        """The request's chained block hashes (computed once per cycle, kept in `ctx`)."""
        return self._hashes(ctx, request)

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
        matched = self.index.match(hashes, endpoints)
        bc = self.block_chars
        ctx[PREFIX_MATCH_KEY] = {ep: k * bc for ep, k in matched.items() if k}
        ctx[_OWNER_KEY] = self
        return {ep: k / n for ep, k in matched.items()}

    def _capacity(self, ep: Endpoint) -> int:
        cap = self.index.capacity_of(ep, self.block_chars, self.chars_per_token)
        sc = self.scale.get(ep)
        return cap if sc is None else max(1, int(cap * sc))

    def learn(self, ep: Endpoint, hashes: list[int]) -> None:
        """Record blocks another replica routed to `ep` (active-active sharing): as if routed here."""
        if hashes:
            self.index.record(ep, hashes, self._capacity(ep))

    def post_schedule(self, ctx: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        hashes = self._hashes(ctx, request)
        if hashes:
            ep = result.target
            cap = self._capacity(ep)
            if self.share is not None:
                self.share(ep, hashes)
            if self.adaptive:
                k = ctx.get(PREFIX_MATCH_KEY, {}).get(ep, 0) // self.block_chars
                # A hit at the far end of the memory is what says whether the memory is long enough.
                ctx[_OLD_KEY] = k > 0 and self.index.far_end(ep, hashes[k - 1], cap)
            self.index.record(ep, hashes, cap)

    def post_response(
        self, ctx: CycleState, request: InferenceRequest, endpoint: Endpoint, info: ResponseInfo
    ) -> None:
        """adaptive: compare what the index promised on `endpoint` with what the server had cached."""
        if not self.adaptive or ctx.get(_OWNER_KEY) is not self:
            return
        cached, prompt = info.cached_tokens, info.prompt_tokens
        chars = len(request.prompt_text)
        if cached is None or not prompt or not chars or info.status != 200:
            return
        per_char = prompt / chars  # the server's tokens per prompt character
        promised = ctx.get(PREFIX_MATCH_KEY, {}).get(endpoint, 0) * per_char
        # The index only covers the first maxBlocks blocks: what the server had beyond is not its to know.
        cached = min(cached, len(ctx.get(_CTX_KEY) or ()) * self.block_chars * per_char)
        # Both sides count whole blocks (the server's of ~16 tokens, ours of blockChars): differences
        # within two blocks or 10% of the prompt are rounding, not evidence.
        slack = max(32.0, 0.1 * prompt)
        if promised > cached + slack:
            step = _SHRINK  # the index promised blocks the server had evicted
        elif cached > promised + slack:
            step = _GROW  # the server had blocks the index had forgotten
        elif promised and ctx.get(_OLD_KEY):
            step = _CONFIRM  # the oldest memories still hold: probe a longer memory
        else:
            return
        sc = self.scale.get(endpoint, 1.0) * step
        self.scale[endpoint] = min(self.max_scale, max(self.min_scale, sc))
