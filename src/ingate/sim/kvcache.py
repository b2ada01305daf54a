"""KV-cache block manager with automatic prefix caching (vLLM-style).

Memory is `num_blocks` blocks of `block_size` tokens. Full prompt blocks, once computed, are registered
under their chained hash; a later request whose prompt starts with the same blocks references them
instead of recomputing. A registered block nobody references stays cached and is evicted in LRU order
only when memory is needed. Blocks private to one request (its partial last block, decode blocks, prompt
blocks not yet computed) are counted, not named: the simulator needs their number, not their content.

With `events` set to a list, the cache records vLLM KV-cache events as vLLM's block pool emits them:
`BlockStored` when full blocks become cached (one event per run of newly cached blocks, with their
parent hash and token ids), `BlockRemoved` per evicted block, `AllBlocksCleared` on a reset. Unlike vLLM,
a block computed by two requests at once is cached once (vLLM keeps both copies and reports both).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from ingate.metrics.kvevents import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


class KVCache:
    """Counts blocks; all operations are O(blocks touched)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref: dict[int, int] = {}  # registered (cached) block hash -> referencing requests
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered blocks with ref 0, LRU first
        self._private = 0  # blocks owned by single requests, not registered
        self.queries = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
        self.hits = 0  # prompt tokens found cached
        self.events: list[KVEvent] | None = None  # KV-event recording, off unless a list is set

    @property
    def used_blocks(self) -> int:
        """Blocks referenced by running requests (what vLLM reports as KV usage)."""
        return self._private + len(self._ref) - len(self._evictable)

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks

    @property
    def available(self) -> int:
        """Blocks that can be handed out now, evicting cached-but-unused blocks if needed."""
        return self.num_blocks - self._private - len(self._ref) + len(self._evictable)

    def match_prefix(self, hashes: list[int]) -> int:
        """Number of leading blocks of `hashes` already cached (no side effects)."""
        n = 0
        for h in hashes:
            if h not in self._ref:
                break
            n += 1
        return n

    def acquire_cached(self, hashes: list[int]) -> None:
        """Reference cached blocks (a prefix hit)."""
        for h in hashes:
            r = self._ref[h]
            if r == 0:
                del self._evictable[h]
            self._ref[h] = r + 1

    def allocate(self, n: int) -> bool:
        """Take `n` private blocks, evicting LRU cached blocks as needed; False if impossible."""
        if n <= 0:
            return True
        if n > self.available:
            return False
        free = self.num_blocks - self._private - len(self._ref)
        while free < n:
            h, _ = self._evictable.popitem(last=False)
            del self._ref[h]
            free += 1
            if self.events is not None:
                self.events.append(BlockRemoved([h]))
        self._private += n
        return True

    def register(
        self,
        hashes: list[int],
        parent: int | None = None,
        token_ids: Sequence[int] = (),
        lora_id: int | None = None,
        lora_name: str | None = None,
    ) -> list[int]:
        """Turn private blocks holding the computed blocks `hashes` into cached blocks.

        Returns the hashes now referenced by the caller (all of them). A block someone else registered
        meanwhile is shared and the caller's private copy freed. `parent` (the hash before the first of
        `hashes`), `token_ids` (the tokens of `hashes`' blocks, in order) and the LoRA fields only feed the
        recorded `BlockStored` events.
        """
        events = self.events
        run_start = -1  # start of the current run of newly cached blocks (for one BlockStored per run)
        for i, h in enumerate(hashes):
            r = self._ref.get(h)
            if r is None:
                self._ref[h] = 1
                if events is not None and run_start < 0:
                    run_start = i
            else:
                if run_start >= 0:
                    self._stored(hashes, run_start, i, parent, token_ids, lora_id, lora_name)
                    run_start = -1
                if r == 0:
                    del self._evictable[h]
                self._ref[h] = r + 1
            self._private -= 1
        if run_start >= 0:
            self._stored(hashes, run_start, len(hashes), parent, token_ids, lora_id, lora_name)
        return hashes

    def _stored(
        self,
        hashes: list[int],
        a: int,
        b: int,
        parent: int | None,
        token_ids: Sequence[int],
        lora_id: int | None,
        lora_name: str | None,
    ) -> None:
        assert self.events is not None
        bs = self.block_size
        self.events.append(
            BlockStored(
                block_hashes=hashes[a:b],
                parent_block_hash=hashes[a - 1] if a else parent,
                token_ids=list(token_ids[a * bs : b * bs]),
                block_size=bs,
                lora_id=lora_id,
                lora_name=lora_name,
            )
        )

    def release(self, hashes: list[int], private: int) -> None:
        """Drop a request's references; its cached blocks stay cached (most recently used)."""
        for h in hashes:
            r = self._ref[h] - 1
            self._ref[h] = r
            if r == 0:
                self._evictable[h] = None
        self._private -= private

    def record_lookup(self, query_tokens: int, hit_tokens: int) -> None:
        self.queries += query_tokens
        self.hits += hit_tokens

    def reset(self) -> None:
        """Forget all cached blocks (only valid when nothing is running)."""
        self._ref.clear()
        self._evictable.clear()
        self._private = 0
        if self.events is not None:
            self.events.append(AllBlocksCleared())

    def reset_prefix_cache(self) -> bool:
        """vLLM's prefix-cache reset: drop every cached block, only when no block is in use."""
        if self.used_blocks:
            return False
        self.reset()
        return True

    def cached_hashes(self) -> set[int]:
        """Hashes of every cached block (referenced or evictable): what a KV-event index should hold."""
        return set(self._ref)
