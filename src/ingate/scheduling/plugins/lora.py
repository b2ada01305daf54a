"""LoRA affinity: prefer endpoints where the request's adapter is already loaded."""

from __future__ import annotations

from dataclasses import dataclass

from ingate.datastore import Endpoint
from ingate.request import InferenceRequest
from ingate.scheduling.framework import CycleState
from ingate.scheduling.plugins.registry import register

ACTIVE, FREE_SLOT, WAITING = 1.0, 0.8, 0.6


def lora_affinity(ep: Endpoint, adapter: str) -> float:
    """1.0 adapter running there, 0.8 a free adapter slot, 0.6 adapter already waiting there, else 0."""
    m = ep.metrics
    if adapter in m.active_adapters:
        return ACTIVE
    if m.max_loras and len(m.active_adapters) < m.max_loras:
        return FREE_SLOT
    if adapter in m.waiting_adapters:
        return WAITING
    return 0.0


@register("scorer", "lora-affinity")
@dataclass
class LoraAffinityScorer:
    name: str = "lora-affinity"

    def score(
        self, ctx: CycleState, request: InferenceRequest, endpoints: list[Endpoint]
    ) -> dict[Endpoint, float]:
        adapter = request.adapter
        if adapter is None:
            return dict.fromkeys(endpoints, 1.0)
        return {ep: lora_affinity(ep, adapter) for ep in endpoints}


@register("filter", "lora-affinity")
@dataclass
class LoraAffinityFilter:
    """Keep the endpoints with the best affinity class (resident > free slot > waiting); all if none."""

    name: str = "lora-affinity"

    def filter(self, ctx: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        adapter = request.adapter
        if adapter is None:
            return endpoints
        best = 0.0
        scored = []
        for ep in endpoints:
            s = lora_affinity(ep, adapter)
            scored.append((ep, s))
            best = max(best, s)
        if best == 0.0:
            return endpoints
        return [ep for ep, s in scored if s == best]
