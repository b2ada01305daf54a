"""KV-cache block manager with automatic prefix caching (vLLM-style).

Memory is `num_blocks` blocks of `block_size` tokens. Full prompt blocks, once computed, are registered
under their chained hash; a later request whose prompt starts with the same blocks references them
instead of recomputing. A registered block nobody references stays cached and is evicted in LRU order
only when memory is needed. Blocks private to one request (its partial last block, decode blocks, prompt
blocks not yet computed) are counted, not named: the simulator needs their number, not their content.
"""

from __future__ import annotations

from collections import OrderedDict


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
        self._private += n
        return True

    def register(self, hashes: list[int]) -> list[int]:
        """Turn private blocks holding the computed blocks `hashes` into cached blocks.

        Returns the hashes now referenced by the caller (all of them). A block someone else registered
        meanwhile is shared and the caller's private copy freed.
        """
        for h in hashes:
            r = self._ref.get(h)
            if r is None:
                self._ref[h] = 1
            else:
                if r == 0:
                    del self._evictable[h]
                self._ref[h] = r + 1
            self._private -= 1
        return hashes

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
