"""Predicted-latency scorer: estimates each endpoint's time to first token for this request.

The scraped gauges count requests, not work: one 6,000-token prompt and one 20-token prompt both add 1
to `num_requests_waiting`. What delays a new request's first token on a continuous-batching server is
(1) the prefill work queued ahead of it (the server prefills first-come first-served within a token
budget per step) and (2) whether its KV cache has room for the prompt: admission reserves the whole
prompt's blocks, so a request that does not fit waits until running requests finish and free theirs.

The gateway knows both for the requests it sent itself, in tokens, before any scrape shows them:

- pending prefill: uncached prompt tokens of requests sent to the endpoint that have not produced a
  first token yet (added after scheduling, removed on the first token or when the request ends);
- KV demand: prompt + expected output tokens of every request in flight there (removed when it ends).

Predicted cost (in prefill-token equivalents) of sending this request to endpoint e::

    cost = pending_prefill(e) + waiting(e) * queued_request_tokens + uncached(this request, e)
           + kv_weight * max(0, kv_demand(e) + need(this request) - kv_capacity(e))

`waiting(e)` is the scraped queue beyond what this gateway sent (other clients' requests), counted at
`queued_request_tokens` each; `kv_demand(e)` is at least the scraped KV usage times the capacity, so
load from other clients is never ignored. The KV term is zero while the request fits, and grows with
the tokens that must be freed first: a long prompt avoids a replica whose cache cannot hold it, a
short one still fits almost anywhere and goes where the least prefill is ahead of it.
`score = 1 - cost / max(scale, largest cost)`.

Token counts come from the prompt's length in characters divided by a characters-per-token ratio that
is learned from the `prompt_tokens` the servers report (`usage`), starting at 4.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ingate.datastore import Datastore, Endpoint
from ingate.lifecycle import ResponseInfo
from ingate.request import InferenceRequest
from ingate.scheduling.framework import PREFIX_MATCH_KEY, CycleState, SchedulingResult
from ingate.scheduling.plugins.registry import register


@dataclass(slots=True, eq=False)
class _Charge:
    """What one scheduled request added to its endpoint's counters (released exactly once each)."""

    endpoint: Endpoint
    prefill: int
    """Its uncached prompt tokens."""
    kv: int
    """Its KV demand: uncached prompt + expected output tokens."""
    prefill_open: bool = True
    kv_open: bool = True
    first_token_at: float = 0.0
    """When its first token came, on the predicted-ttft scorer's clock (0: not yet, or not timed)."""

    @property
    def output(self) -> int:
        """The output tokens it may decode (its max_tokens, or the scorer's default)."""
        return self.kv - self.prefill


@dataclass(slots=True)
class _Load:
    pending_prefill: int = 0
    kv_demand: int = 0
    requests: int = 0


_EMPTY = _Load()


@register("scorer", "predicted-latency")
@dataclass
class PredictedLatencyScorer:
    """Scores endpoints by predicted prefill work ahead of the request plus its KV-cache shortfall."""

    scale: float = 2048.0
    """Cost floor in tokens: differences well under it cost little next to other scorers."""
    kv_weight: float = 2.0
    """Cost of one token of KV shortfall, in prefill tokens (a shortfall means waiting for finishes)."""
    queued_request_tokens: float = 512.0
    """Assumed prompt tokens of a queued request this gateway did not send (scraped, not tracked)."""
    default_output_tokens: int = 128
    """Output tokens assumed for a request without max_tokens."""
    chars_per_token: float = 4.0
    """Initial characters-per-token ratio; updated from reported prompt_tokens."""
    name: str = "predicted-latency"
    _loads: dict[Endpoint, _Load] = field(default_factory=dict, init=False, repr=False)
    _ctx_key: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        if self.scale <= 0 or self.chars_per_token <= 0:
            raise ValueError("scale and charsPerToken must be positive")
        if self.kv_weight < 0 or self.queued_request_tokens < 0 or self.default_output_tokens < 0:
            raise ValueError("kvWeight, queuedRequestTokens and defaultOutputTokens must not be negative")
        # Per instance: every profile's hooks see every request's CycleState.
        self._ctx_key = f"latency.charge.{id(self)}"

    def attach(self, datastore: Datastore) -> None:
        datastore.on_remove(self._forget)

    def _forget(self, ep: Endpoint) -> None:
        self._loads.pop(ep, None)

    def _tracked(self, ep: Endpoint) -> bool:
        """Whether `ep` still has counters here: every request's target gets them when it is scheduled
        and they go when the endpoint leaves the pool, so a response that ends after its endpoint left
        finds none and must re-create no per-endpoint state (nothing would free it again)."""
        return ep in self._loads

    # -- estimates ----------------------------------------------------------------------------------
    def tokens(self, chars: int) -> int:
        """Estimated tokens of `chars` prompt characters."""
        return max(1, round(chars / self.chars_per_token))

    def load(self, ep: Endpoint) -> _Load:
        ld = self._loads.get(ep)
        if ld is None:
            ld = self._loads[ep] = _Load()
        return ld

    def cost(self, ep: Endpoint, prompt_tokens: int, cached_tokens: int, output_tokens: int) -> float:
        """Predicted cost, in prefill-token equivalents, of sending this request to `ep`."""
        ld = self._loads.get(ep, _EMPTY)
        m = ep.metrics
        new = prompt_tokens - cached_tokens
        cost: float = ld.pending_prefill + new
        foreign_waiting = m.waiting - ld.requests
        if foreign_waiting > 0:
            cost += foreign_waiting * self.queued_request_tokens
        bs, nb = m.block_size, m.num_gpu_blocks
        if bs and nb:
            capacity = bs * nb
            used = m.kv_usage * capacity
            demand = ld.kv_demand if ld.kv_demand > used else used
            shortfall = demand + new + output_tokens - capacity
            if shortfall > 0:
                cost += self.kv_weight * shortfall
        # weight: relative capacity (pool.endpoints[].weight); a faster replica works its queue faster.
        return cost if ep.weight == 1.0 else cost / ep.weight

    # -- plugin hooks -------------------------------------------------------------------------------
    def _request_tokens(self, request: InferenceRequest) -> tuple[int, int]:
        prompt = self.tokens(len(request.prompt_text))
        out = request.max_tokens if request.max_tokens is not None else self.default_output_tokens
        return prompt, out

    def score(
        self, ctx: CycleState, request: InferenceRequest, endpoints: list[Endpoint]
    ) -> dict[Endpoint, float]:
        prompt, out = self._request_tokens(request)
        matched: dict[Endpoint, int] | None = ctx.get(PREFIX_MATCH_KEY)
        cost = self.cost
        if matched:
            costs = {
                ep: cost(ep, prompt, min(prompt, self.tokens(matched[ep])) if ep in matched else 0, out)
                for ep in endpoints
            }
        else:
            costs = {ep: cost(ep, prompt, 0, out) for ep in endpoints}
        top = max(self.scale, max(costs.values()))
        return {ep: 1.0 - c / top for ep, c in costs.items()}

    def post_schedule(self, ctx: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        ep = result.target
        prompt, out = self._request_tokens(request)
        matched: dict[Endpoint, int] = ctx.get(PREFIX_MATCH_KEY) or {}
        cached = min(prompt, self.tokens(matched[ep])) if matched.get(ep) else 0
        # Cached prefix blocks are shared with the requests that hold them: only the rest is new KV.
        charge = _Charge(ep, prompt - cached, prompt - cached + out)
        ld = self.load(ep)
        ld.pending_prefill += charge.prefill
        ld.kv_demand += charge.kv
        ld.requests += 1
        ctx[self._ctx_key] = charge

    def on_first_token(self, ctx: CycleState, request: InferenceRequest, endpoint: Endpoint) -> None:
        charge: _Charge | None = ctx.get(self._ctx_key)
        if charge is None or not charge.prefill_open:
            return
        charge.prefill_open = False
        ld = self._loads.get(charge.endpoint)  # None: the endpoint left the pool (`_tracked`)
        if ld is not None:
            ld.pending_prefill -= charge.prefill
            ld.requests -= 1

    def post_response(
        self, ctx: CycleState, request: InferenceRequest, endpoint: Endpoint, info: ResponseInfo
    ) -> None:
        self.on_first_token(ctx, request, endpoint)
        charge: _Charge | None = ctx.get(self._ctx_key)
        if charge is not None and charge.kv_open:
            charge.kv_open = False
            ld = self._loads.get(charge.endpoint)
            if ld is not None:
                ld.kv_demand -= charge.kv
        if info.prompt_tokens and info.prompt_tokens > 0 and request.prompt_text:
            ratio = len(request.prompt_text) / info.prompt_tokens
            self.chars_per_token += 0.05 * (ratio - self.chars_per_token)
