"""LoRA adapter residency: at most `max_loras` adapters loaded; idle ones are evicted LRU-first."""

from __future__ import annotations

from collections import OrderedDict


class LoraSlots:
    """Which adapters are resident and how many running requests use each."""

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self._resident: OrderedDict[str, int] = OrderedDict()  # adapter -> running requests, LRU first
        self.loads = 0

    @property
    def resident(self) -> list[str]:
        return list(self._resident)

    def running_adapters(self) -> list[str]:
        return [a for a, n in self._resident.items() if n > 0]

    def can_run(self, adapter: str) -> bool:
        """True if `adapter` is resident or can be loaded now (a free or idle slot)."""
        if adapter in self._resident:
            return True
        if len(self._resident) < self.max_loras:
            return True
        return any(n == 0 for n in self._resident.values())

    def acquire(self, adapter: str) -> bool:
        """Count a running request on `adapter`; returns True if it had to be loaded (costs time)."""
        n = self._resident.get(adapter)
        if n is not None:
            self._resident[adapter] = n + 1
            self._resident.move_to_end(adapter)
            return False
        if len(self._resident) >= self.max_loras:
            victim = next(a for a, k in self._resident.items() if k == 0)
            del self._resident[victim]
        self._resident[adapter] = 1
        self.loads += 1
        return True

    def release(self, adapter: str) -> None:
        self._resident[adapter] -= 1
