"""Pickers: order the scored candidates; the first is the target, the next are fallbacks."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ingate.datastore import Endpoint
from ingate.request import InferenceRequest
from ingate.scheduling.framework import CycleState
from ingate.scheduling.plugins.registry import register


@register("picker", "max-score")
@dataclass
class MaxScorePicker:
    """Highest total score first; equal scores are ordered randomly, never by list order."""

    name: str = "max-score"
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def pick(
        self, ctx: CycleState, request: InferenceRequest, scored: list[tuple[Endpoint, float]]
    ) -> list[Endpoint]:
        rnd = self.rng.random
        return [ep for ep, _ in sorted(scored, key=lambda es: (-round(es[1], 9), rnd()))]


@register("picker", "random")
@dataclass
class RandomPicker:
    name: str = "random"
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def pick(
        self, ctx: CycleState, request: InferenceRequest, scored: list[tuple[Endpoint, float]]
    ) -> list[Endpoint]:
        eps = [ep for ep, _ in scored]
        self.rng.shuffle(eps)
        return eps


@register("picker", "weighted-random")
@dataclass
class WeightedRandomPicker:
    """Target drawn with probability proportional to score (all-zero scores: uniform)."""

    name: str = "weighted-random"
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def pick(
        self, ctx: CycleState, request: InferenceRequest, scored: list[tuple[Endpoint, float]]
    ) -> list[Endpoint]:
        # Efraimidis-Spirakis: sort by u^(1/w) gives a weighted sample without replacement.
        rnd = self.rng.random
        keys = []
        for ep, s in scored:
            w = max(s, 1e-9)
            keys.append((rnd() ** (1.0 / w), ep))
        keys.sort(key=lambda k: -k[0])
        return [ep for _, ep in keys]


@register("picker", "round-robin")
@dataclass
class RoundRobinPicker:
    """Cycles through the candidates by address order (the baseline a Kubernetes Service gives)."""

    name: str = "round-robin"
    _next: int = 0

    def pick(
        self, ctx: CycleState, request: InferenceRequest, scored: list[tuple[Endpoint, float]]
    ) -> list[Endpoint]:
        eps = sorted((ep for ep, _ in scored), key=lambda ep: ep.address)
        i = self._next % len(eps)
        self._next += 1
        return eps[i:] + eps[:i]
