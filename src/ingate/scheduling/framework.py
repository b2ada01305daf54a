"""Plugin protocols of the scheduler and the per-request cycle state.

A plugin is a small class with a `name`, typed parameters from config and one method of its protocol.
Plugins are pure and fast: no I/O, no awaits; everything they read comes from the request and the
endpoints' latest metrics in the datastore. Scores are in [0, 1]; profiles weight and sum them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ingate.datastore import Endpoint
from ingate.request import InferenceRequest

PREFIX_MATCH_KEY = "prefix.matched_chars"
"""CycleState key: {endpoint: leading prompt characters the prefix index matched there} (nonzero only)."""


class CycleState(dict[str, Any]):
    """Scratch space shared by the plugins of one scheduling cycle (one request).

    E.g. the prefix scorer stores the request's block hashes here so its post-schedule hook does not
    hash the prompt twice.
    """


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


@dataclass(slots=True)
class SchedulingResult:
    """The decision: `endpoints[0]` is the target, the rest are fallbacks in order."""

    endpoints: list[Endpoint]
    profile: str
    scores: dict[Endpoint, float] = field(default_factory=dict)

    @property
    def target(self) -> Endpoint:
        return self.endpoints[0]


@runtime_checkable
class Picker(Protocol):
    name: str

    def pick(
        self, ctx: CycleState, request: InferenceRequest, scored: list[tuple[Endpoint, float]]
    ) -> list[Endpoint]:
        """Order candidates: the first is the target, the next few are fallbacks. Ties break randomly."""
        ...


@dataclass(slots=True)
class ResponseInfo:
    """What the data plane learned from the model server's answer, fed back to learning plugins."""

    status: int
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None


@runtime_checkable
class PostSchedule(Protocol):
    """Runs after the decision (e.g. the prefix index records where the prompt's blocks went)."""

    def post_schedule(self, ctx: CycleState, request: InferenceRequest, result: SchedulingResult) -> None: ...


@runtime_checkable
class FirstToken(Protocol):
    """Runs when the request's first token reached the gateway (at most once per request)."""

    def on_first_token(self, ctx: CycleState, request: InferenceRequest, endpoint: Endpoint) -> None: ...


@runtime_checkable
class PostResponse(Protocol):
    """Runs once the response is complete (or failed)."""

    def post_response(
        self, ctx: CycleState, request: InferenceRequest, endpoint: Endpoint, info: ResponseInfo
    ) -> None: ...
