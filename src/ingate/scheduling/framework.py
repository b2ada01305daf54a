"""Plugin protocols of the scheduler and the per-request cycle state.

A plugin is a small class with a `name`, typed parameters from config and one method of its protocol.
Plugins are pure and fast: no I/O, no awaits; everything they read comes from the request and the
endpoints' latest metrics in the datastore. Scores are in [0, 1]; profiles weight and sum them.

Plugins that learn from outcomes also implement the lifecycle hooks of `ingate.lifecycle`
(`PostSchedule`, `FirstToken`, `PostResponse`), which the director runs for the profile that scheduled
the request. `CycleState` and `SchedulingResult` live there too (they travel with the request) and are
re-exported here for plugin authors. Plugins register themselves by name in
`ingate.scheduling.plugins.registry`; one that keeps state worth watching can expose Prometheus
metrics through `ingate.scheduling.plugins.registry.ExposesMetrics`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ingate.datastore import Endpoint
from ingate.lifecycle import CycleState, SchedulingResult
from ingate.request import InferenceRequest

__all__ = [
    "PREFIX_MATCH_KEY",
    "PREFIX_MATCH_TOKENS_KEY",
    "CycleState",
    "Filter",
    "Picker",
    "SchedulingResult",
    "Scorer",
]

PREFIX_MATCH_KEY = "prefix.matched_chars"
"""CycleState key: {endpoint: leading prompt characters the prefix index matched there} (nonzero only)."""
PREFIX_MATCH_TOKENS_KEY = "prefix.matched_tokens"
"""CycleState key: {endpoint: leading prompt tokens the server holds in its KV cache} (nonzero only; set
by the precise-prefix scorer, which also converts them to characters under `PREFIX_MATCH_KEY`)."""


@runtime_checkable
class Filter(Protocol):
    name: str

    def filter(self, ctx: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        """Return the endpoints that may serve the request (a subset, order irrelevant)."""
        ...


@runtime_checkable
class Scorer(Protocol):
    name: str

    def score(
        self, ctx: CycleState, request: InferenceRequest, endpoints: list[Endpoint]
    ) -> dict[Endpoint, float]:
        """Score each endpoint in [0, 1] (higher is better); missing endpoints score 0."""
        ...


@runtime_checkable
class Picker(Protocol):
    name: str

    def pick(
        self, ctx: CycleState, request: InferenceRequest, scored: list[tuple[Endpoint, float]]
    ) -> list[Endpoint]:
        """Order candidates: the first is the target, the next few are fallbacks. Ties break randomly."""
        ...
