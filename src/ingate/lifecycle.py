"""A request's life in the endpoint picker, and the one seam between the director and every data plane.

    data plane --handle(path, headers, body)--> director --> Decision (target, body to forward)
    data plane --retarget(decision)-----------> director     (connection refused: next fallback)
    data plane --on_first_token(decision)-----> director --> FirstToken hooks
    data plane --finish(decision, ResponseInfo)-> director --> PostResponse hooks (exactly once)

The director runs the lifecycle hooks of the plugins of the **profile that scheduled the request, and
only those**: a learning plugin (prefix index, latency model) sees the outcomes of the decisions it
took part in. (Before, every profile's hooks saw every request; plugins of other profiles had to
recognise and skip requests they had not scored, and a profile that no request selects still paid for
every response.)

Everything here is plain data and protocols: it imports nothing of scheduling, flow control or the data
planes, so all of them can depend on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ingate.datastore import Endpoint
from ingate.request import InferenceRequest


class CycleState(dict[str, Any]):
    """Scratch space shared by the plugins of one scheduling cycle (one request), kept on the decision
    until the request ends, so the lifecycle hooks see what the scorers computed.

    E.g. the prefix scorer stores the request's block hashes here so its post-schedule hook does not
    hash the prompt twice.
    """


@dataclass(slots=True)
class SchedulingResult:
    """The decision: `endpoints[0]` is the target, the rest are fallbacks in order."""

    endpoints: list[Endpoint]
    profile: str
    scores: dict[Endpoint, float] = field(default_factory=dict)

    @property
    def target(self) -> Endpoint:
        return self.endpoints[0]


@dataclass(slots=True)
class ResponseInfo:
    """What the data plane learned from the model server's answer, fed back to learning plugins."""

    status: int
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    response_bytes: int | None = None
    """Response body bytes the client was sent."""
    chunk_gaps: list[float] | None = None
    """Seconds between consecutive response body chunks (inter-token latency of a streamed answer)."""


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


@dataclass(frozen=True, slots=True)
class Hooks:
    """The lifecycle hooks of one scheduling profile's plugins, in plugin order."""

    post_schedule: tuple[PostSchedule, ...] = ()
    first_token: tuple[FirstToken, ...] = ()
    post_response: tuple[PostResponse, ...] = ()

    @classmethod
    def of(cls, plugins: Iterable[object]) -> Hooks:
        """Collect the hooks the given plugins implement."""
        ps = tuple(plugins)
        return cls(
            tuple(p for p in ps if isinstance(p, PostSchedule)),
            tuple(p for p in ps if isinstance(p, FirstToken)),
            tuple(p for p in ps if isinstance(p, PostResponse)),
        )

    def run_post_schedule(self, ctx: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        for h in self.post_schedule:
            h.post_schedule(ctx, request, result)

    def run_first_token(self, ctx: CycleState, request: InferenceRequest, endpoint: Endpoint) -> None:
        for h in self.first_token:
            h.on_first_token(ctx, request, endpoint)

    def run_post_response(
        self, ctx: CycleState, request: InferenceRequest, endpoint: Endpoint, info: ResponseInfo
    ) -> None:
        for h in self.post_response:
            h.post_response(ctx, request, endpoint, info)


NO_HOOKS = Hooks()


@dataclass(eq=False, slots=True)
class Decision:
    """One request's routing decision and its bookkeeping, from `handle` until `finish`."""

    request: InferenceRequest
    result: SchedulingResult
    ctx: CycleState
    upstream_body: bytes
    """The body to forward: the raw one, or rewritten when the model or priority changed."""
    started: float
    """time.monotonic() when the director received the request."""
    series: Any
    """The request's metric children (`ingate.telemetry.ModelSeries`), looked up once."""
    hooks: Hooks = NO_HOOKS
    """The scheduling profile's lifecycle hooks (the only ones this request runs)."""
    target_index: int = 0
    first_token_at: float | None = None
    ticket: Any = None
    """Flow control's admission ticket, handed back once at `finish`."""
    finished: bool = False

    @property
    def target(self) -> Endpoint:
        return self.result.endpoints[self.target_index]

    def fallbacks(self) -> list[Endpoint]:
        return self.result.endpoints[self.target_index + 1 :]


class DirectorLike(Protocol):
    """What a data plane needs from the director (`ingate.director.Director`): the typed seam every
    data plane (Envoy ext_proc, built-in proxy, or a new one) is written against."""

    async def handle(self, path: str, headers: Mapping[str, str], raw_body: bytes) -> Decision:
        """Parse, resolve, admit and schedule one request; raises `ingate.errors.GatewayError`."""
        ...

    def retarget(self, decision: Decision) -> Endpoint | None:
        """Move the request to its next fallback after a connection failure; None when none is left."""
        ...

    def on_first_token(self, decision: Decision) -> None:
        """The first response byte arrived (TTFT bookkeeping; at most once per decision)."""
        ...

    def finish(self, decision: Decision, info: ResponseInfo) -> None:
        """The request ended (completed, failed or cut off); idempotent."""
        ...
