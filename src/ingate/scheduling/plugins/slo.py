"""Predicted-TTFT scorer: ranks endpoints by the seconds an online model predicts, and admits by SLO.

The `predicted-latency` scorer (its parent class here) estimates a cost in token equivalents with
hand-set weights. This scorer keeps its accounting (prefill and KV demand this gateway has in flight
per endpoint) but turns it, with the scraped gauges, into the features of an online latency model
(`ingate.scheduling.predictor.LatencyPredictor`) that learns from every request it routed: TTFT and
TPOT in seconds, per endpoint, shrunk toward a pooled model. Slow and fast replicas of one pool are
told apart by their own outcomes; no per-class configuration.

Until the model has seen `warmup` responses it scores exactly as `predicted-latency` does (cold
start). Once warm, for each candidate:

- request without SLO: `score = (best + s0) / (predicted + s0)` (`s0 = scaleS`): 1 for the fastest
  predicted endpoint, falling with the ratio to it;
- request with a TTFT SLO (`x-llm-d-slo-ttft-ms` or its objective's `slo.ttftMs`), remaining budget
  `T` (the SLO minus the time the request already waited in the gateway): `0.5 + 0.5 (T - p) / T`
  while the prediction `p` meets it, `0.5 T / p` below; with a TPOT SLO as well, the smaller of the
  two such scores: the endpoint with the best predicted headroom wins.

Admission (`shedUnattainable`, on by default): when no candidate's predicted TTFT (times `shedMargin`)
meets a **sheddable** request's SLO (priority < 0), the request is answered `429 slo_unattainable`
with Retry-After, instead of taking capacity that requests which can still meet theirs need.
Other requests, with `holdS` > 0, are held by the director (`ingate.errors.SloHold`): re-scored every
`holdPollS` until an endpoint is predicted to meet what is left of their budget with a margin (the
prediction times `holdMargin` fits), or until `holdS`
after arrival, when they go to the endpoint with the best headroom. With `holdS` 0 they go there at
once.

Outcomes are learned from streamed responses: the TTFT at the first token (measured at the gateway,
from dispatch), the TPOT when the response ends; for a non-streamed response the first byte is the
whole answer, so it trains nothing. The error of each
prediction made by the warm model is kept (`ingate_latency_prediction_error_ratio`), and per endpoint
over its last `ENDPOINT_ERROR_WINDOW` predictions (`ingate_endpoint_latency_prediction_error_ratio`):
in a pool of mixed accelerators the operator sees which replicas the model mispredicts.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from ingate.datastore import Datastore, Endpoint
from ingate.errors import SLO_HOLD_EXPIRED, GatewayError, SloHold
from ingate.lifecycle import ResponseInfo
from ingate.request import InferenceRequest
from ingate.scheduling.framework import PREFIX_MATCH_KEY, CycleState, SchedulingResult
from ingate.scheduling.plugins.latency import _EMPTY, PredictedLatencyScorer, _Charge
from ingate.scheduling.plugins.registry import register
from ingate.scheduling.predictor import ErrorWindow, Features, LatencyPredictor

SLO_UNATTAINABLE = "slo_unattainable"
_KV_WAIT_CAP_S = 30.0
"""Cap of the KV-wait feature: beyond it the estimate says nothing the model could use."""
ENDPOINT_ERROR_WINDOW = 200
"""Predictions per endpoint (and kind) whose errors the per-endpoint quantiles cover. Kept small: a
scrape sorts every endpoint's windows on the event loop (1,000 endpoints with full windows: ~45 ms
at 200, ~90 ms at 500, on the 2-core dev machine)."""


@dataclass(slots=True)
class _Prediction:
    """What the scorer predicted for the request's target, kept until the response."""

    endpoint: Endpoint
    features: Features
    ttft_s: float
    tpot_s: float
    waited_s: float
    """Seconds the request spent in the gateway before dispatch (flow control), not the endpoint's."""
    warm: bool
    dispatched_at: float = 0.0
    """The scorer's clock when the request was dispatched (its TTFT is measured from here)."""
    ttft_learned: bool = False


@dataclass(slots=True, eq=False)
class _Occupancy:
    """An endpoint's in-flight requests (the predicted-latency charges of those this gateway sent):
    running sums (whether a prompt fits is O(1)) and, built when needed and kept until the requests or
    the engine's step change, their end times in order."""

    members: dict[_Charge, None] = field(default_factory=dict)
    prompts: int = 0
    """Sum of their uncached prompts."""
    decoding: int = 0
    """How many have their first token."""
    decoding_first_at: float = 0.0
    """Sum of the decoding ones' first-token times."""
    decoding_output: int = 0
    """Sum of the decoding ones' max_tokens."""
    version: int = 0
    """Bumped on every change of the members (the order below is then rebuilt)."""
    _built: tuple[int, float] = (-1, 0.0)
    _ends: list[float] = field(default_factory=list)
    """Decoding members' end times (first token + max_tokens steps), ascending."""
    _ends_kv: list[int] = field(default_factory=list)
    """The KV tokens each of them frees (prompt + max_tokens), aligned with `_ends`."""
    _ends_suffix: list[float] = field(default_factory=list)
    """`_ends_suffix[i]` = sum of `_ends[i:]`."""
    _waits: list[float] = field(default_factory=list)
    """Members without a first token: their decode time (max_tokens steps), ascending."""
    _waits_kv: list[int] = field(default_factory=list)

    def add(self, o: _Charge) -> None:
        self.members[o] = None
        self.prompts += o.prefill
        self.version += 1

    def first_token(self, o: _Charge, now: float) -> None:
        if o.first_token_at or o not in self.members:
            return
        o.first_token_at = now
        self.decoding += 1
        self.decoding_first_at += now
        self.decoding_output += o.output
        self.version += 1

    def remove(self, o: _Charge) -> None:
        if o not in self.members:
            return
        del self.members[o]
        self.version += 1
        self.prompts -= o.prefill
        if o.first_token_at:
            self.decoding -= 1
            self.decoding_first_at -= o.first_token_at
            self.decoding_output -= o.output
            if not self.decoding:
                self.decoding_first_at = 0.0  # no rounding left over from long sums

    def _build(self, step: float) -> None:
        dec = sorted((o.first_token_at + o.output * step, o.kv) for o in self.members if o.first_token_at)
        waits = sorted((o.output * step, o.kv) for o in self.members if not o.first_token_at)
        self._ends = [e for e, _ in dec]
        self._ends_kv = [kv for _, kv in dec]
        suffix = [0.0] * (len(dec) + 1)
        for i in range(len(dec) - 1, -1, -1):
            suffix[i] = suffix[i + 1] + dec[i][0]
        self._ends_suffix = suffix
        self._waits = [r for r, _ in waits]
        self._waits_kv = [kv for _, kv in waits]
        self._built = (self.version, step)

    def wait_for_room(self, new: int, capacity: int, used: float, now: float, step: float) -> float:
        """Seconds until `new` more tokens fit in `capacity` beside what the members hold (at least
        `used`); 0 when they fit now (see `PredictedTTFTScorer._kv_wait`)."""
        # A bound first, O(1) from the running sums: every prompt plus one token per step since each
        # decoding member's first token, capped by their max_tokens summed (at least the exact count
        # below). When even that fits, the prompt fits.
        bound = float(self.prompts)
        if self.decoding:
            decoded = (self.decoding * now - self.decoding_first_at) / step
            bound += decoded if decoded < self.decoding_output else self.decoding_output
        if (bound if bound > used else used) + new <= capacity:
            return 0.0
        # Exactly: O(log n) to know what is held, then as many members as must end.
        if self._built != (self.version, step):
            self._build(step)
        ends = self._ends
        # Held: every prompt, plus per decoding member its tokens so far (one per step since its first
        # token, at most its max_tokens) = its max_tokens minus the steps it has left.
        i = bisect_right(ends, now)
        left = (self._ends_suffix[i] - (len(ends) - i) * now) / step
        held = self.prompts + self.decoding_output - left
        shortfall = (held if held > used else used) + new - capacity
        if shortfall <= 0:
            return 0.0
        # Members in order of ending (decoding ones after their remaining steps, the rest after all
        # of theirs), until they have freed the shortfall.
        kv_d, waits, kv_w = self._ends_kv, self._waits, self._waits_kv
        a = b = 0
        freed = 0
        r = 0.0
        while a < len(ends) or b < len(waits):
            rd = ends[a] - now if a < len(ends) else math.inf
            if rd < 0.0:
                rd = 0.0
            if b < len(waits) and waits[b] < rd:
                r = waits[b]
                freed += kv_w[b]
                b += 1
            else:
                r = rd
                freed += kv_d[a]
                a += 1
            if freed >= shortfall:
                return r
        return r  # all of them, if even that is not enough (others' requests hold the rest)


@register("scorer", "predicted-ttft")
@dataclass
class PredictedTTFTScorer(PredictedLatencyScorer):
    """Scores endpoints by an online model's predicted TTFT (and SLO headroom); sheds unattainable
    sheddable requests."""

    warmup: int = 50
    """Responses learned before the model scores (before: the predicted-latency cost)."""
    forgetting: float = 0.998
    """Forgetting factor of the online models (effective memory about 1 / (1 - f) responses)."""
    shrink: float = 20.0
    """Sample count damping of an endpoint's own model against the pooled one (see the predictor)."""
    scale_s: float = 0.05
    """Seconds added to both sides of the no-SLO ratio: differences well under it barely count."""
    shed_unattainable: bool = True
    """Answer 429 slo_unattainable to sheddable requests no endpoint is predicted to serve in time."""
    shed_margin: float = 1.0
    """Shed when every candidate's predicted TTFT x shedMargin exceeds the remaining SLO budget."""
    retry_after_s: float = 1.0
    hold_s: float = 0.0
    """Non-sheddable requests no endpoint is predicted to serve in time wait in the gateway up to
    this long after arrival (re-scored every holdPollS) instead of loading an endpoint now, then go
    to the best one; 0 = dispatch at once."""
    hold_poll_s: float = 0.05
    hold_margin: float = 1.5
    """Hold while every candidate's predicted TTFT x holdMargin exceeds the remaining budget. Above 1
    because predictions err (p90 near 50% under load): about half the requests predicted at 1.5 s of
    a 2 s budget miss it, and holding them keeps the capacity for requests that can still make theirs
    (1.5 chosen on the replay's tuning seeds, docs/scheduling.md). Shedding, which cannot be undone,
    keeps its own `shedMargin`."""
    kv_wait: bool = True
    """Estimate each candidate's wait for KV-cache room (a model feature). Where the prompt may not fit,
    the estimate goes through the endpoint's in-flight requests: with hundreds of endpoints all
    saturated that is most of the decision's cost (docs/scheduling.md, "Decision latency"); false
    leaves the feature at 0."""
    name: str = "predicted-ttft"
    predictor: LatencyPredictor = field(init=False, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, init=False, repr=False)
    """Same clock as `InferenceRequest.arrival` (the director's time.monotonic; the replay's virtual)."""
    predictions: dict[str, int] = field(init=False, repr=False)
    shed: int = field(default=0, init=False, repr=False)
    held: int = field(default=0, init=False, repr=False)
    _pred_key: str = field(default="", init=False, repr=False)
    _feat_key: str = field(default="", init=False, repr=False)
    _occupants: dict[Endpoint, _Occupancy] = field(default_factory=dict, init=False, repr=False)
    _ep_errors: dict[Endpoint, tuple[ErrorWindow, ErrorWindow]] = field(
        default_factory=dict, init=False, repr=False
    )
    """Per endpoint: TTFT and TPOT error windows (`ENDPOINT_ERROR_WINDOW` each)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale_s <= 0 or self.shed_margin <= 0 or self.hold_poll_s <= 0 or self.hold_margin <= 0:
            raise ValueError("scaleS, shedMargin, holdMargin and holdPollS must be positive")
        if self.retry_after_s < 0 or self.hold_s < 0:
            raise ValueError("retryAfterS and holdS must not be negative")
        self.predictor = LatencyPredictor(forgetting=self.forgetting, warmup=self.warmup, shrink=self.shrink)
        self.predictions = {"model": 0, "fallback": 0}
        self._pred_key = f"slo.prediction.{id(self)}"
        self._feat_key = f"slo.features.{id(self)}"

    def attach(self, datastore: Datastore) -> None:
        super().attach(datastore)
        datastore.on_remove(self.predictor.forget)
        datastore.on_remove(self._forget_endpoint)

    def _forget_endpoint(self, ep: Endpoint) -> None:
        self._occupants.pop(ep, None)
        self._ep_errors.pop(ep, None)

    def _errors_of(self, ep: Endpoint) -> tuple[ErrorWindow, ErrorWindow]:
        w = self._ep_errors.get(ep)
        if w is None:
            w = self._ep_errors[ep] = (ErrorWindow(ENDPOINT_ERROR_WINDOW), ErrorWindow(ENDPOINT_ERROR_WINDOW))
        return w

    # -- features -----------------------------------------------------------------------------------
    def features(self, ep: Endpoint, prompt: int, cached: int, output: int, now: float) -> Features:
        """The model's inputs for this request on `ep` at `now` (the scorer's clock), from this
        gateway's accounting, the scrape and the step timing seen in the streamed responses."""
        ld = self._loads.get(ep, _EMPTY)
        m = ep.metrics
        new = prompt - cached
        shortfall = 0.0
        bs, nb = m.block_size, m.num_gpu_blocks
        if bs and nb:
            capacity = bs * nb
            used = m.kv_usage * capacity
            demand = ld.kv_demand if ld.kv_demand > used else used
            s = demand + new + output - capacity
            if s > 0:
                shortfall = s
        decoding = ep.in_flight - ld.requests
        return Features(
            float(new),
            float(ld.pending_prefill),
            float(m.waiting),
            float(m.running),
            m.kv_usage,
            shortfall,
            float(decoding if decoding > 0 else 0),
            ep.steps.since(now),
            self._kv_wait(ep, new, now) if self.kv_wait else 0.0,
        )

    def _kv_wait(self, ep: Endpoint, new: int, now: float) -> float:
        """Seconds until this request's uncached prompt (`new` tokens) fits in `ep`'s KV cache, from the
        requests this gateway has in flight there.

        As vLLM allocates: a request admitted holds its prompt's blocks and one more token's worth per
        decoded token; it frees them all when it ends. Each one decoding is taken to produce a token per
        engine step (the step timing seen in the streamed chunks) up to its max_tokens, so it holds
        prompt + tokens so far and ends after the rest. Requests still waiting for a first token are
        counted as holding their prompt. Held tokens are at least the scraped KV usage (other clients'
        requests are not tracked, only counted). The wait is the remaining decode time of the in-flight
        requests, in order of ending, until enough is freed; 0 when the prompt fits now.
        """
        step = ep.steps.step_s
        occ = self._occupants.get(ep)
        m = ep.metrics
        if step <= 0.0 or occ is None or not occ.members or not (m.block_size and m.num_gpu_blocks):
            return 0.0
        capacity = m.block_size * m.num_gpu_blocks
        wait = occ.wait_for_room(new, capacity, m.kv_usage * capacity, now, step)
        return wait if wait < _KV_WAIT_CAP_S else _KV_WAIT_CAP_S

    def _cached(self, ctx: CycleState, ep: Endpoint, prompt: int) -> int:
        matched: dict[Endpoint, int] | None = ctx.get(PREFIX_MATCH_KEY)
        if matched and matched.get(ep):
            return min(prompt, self.tokens(matched[ep]))
        return 0

    # -- scoring ------------------------------------------------------------------------------------
    def score(
        self, ctx: CycleState, request: InferenceRequest, endpoints: list[Endpoint]
    ) -> dict[Endpoint, float]:
        pred = self.predictor
        if not pred.warm:
            self.predictions["fallback"] += 1
            return super().score(ctx, request, endpoints)
        self.predictions["model"] += 1
        prompt, out = self._request_tokens(request)
        now = self.clock()
        feats = {ep: self.features(ep, prompt, self._cached(ctx, ep, prompt), out, now) for ep in endpoints}
        ctx[self._feat_key] = feats  # the target's are what post_schedule records (computed once)
        ttft = {ep: pred.predict_ttft(ep, f) for ep, f in feats.items()}
        slo_ttft = request.slo_ttft_ms
        if slo_ttft is None:
            best = min(ttft.values()) + self.scale_s
            return {ep: best / (p + self.scale_s) for ep, p in ttft.items()}
        budget = slo_ttft / 1000.0 - max(0.0, now - request.arrival)
        fastest = min(ttft.values())
        if (
            self.hold_s > 0
            and (budget <= 0 or fastest * self.hold_margin > budget)
            and request.priority >= 0
            and not request.extra.get(SLO_HOLD_EXPIRED)
        ):
            self.held += 1
            raise SloHold(
                f"no endpoint is predicted to meet the request's TTFT SLO of {slo_ttft:g} ms",
                self.hold_poll_s,
                request.arrival + self.hold_s,
            )
        if request.priority < 0 and self.shed_unattainable:
            if budget <= 0 or fastest * self.shed_margin > budget:
                self.shed += 1
                raise GatewayError(
                    429,
                    "request shed: its objective is sheddable and no endpoint is predicted to meet its "
                    f"TTFT SLO of {slo_ttft:g} ms",
                    SLO_UNATTAINABLE,
                    retry_after=self.retry_after_s,
                )
        scores = {ep: _headroom(budget, p) for ep, p in ttft.items()}
        slo_tpot = request.slo_tpot_ms
        if slo_tpot is not None:
            t = slo_tpot / 1000.0
            for ep in endpoints:
                f = feats[ep]
                s = _headroom(t, pred.predict_tpot(ep, f))
                if s < scores[ep]:
                    scores[ep] = s
        return scores

    # -- lifecycle ----------------------------------------------------------------------------------
    def post_schedule(self, ctx: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        ep = result.target
        prompt, out = self._request_tokens(request)
        now = self.clock()
        # Before this request's charge: as scored, or (cold model, or a target it did not score) now.
        scored: dict[Endpoint, Features] | None = ctx.pop(self._feat_key, None)  # not kept per request
        f = scored.get(ep) if scored else None
        if f is None:
            f = self.features(ep, prompt, self._cached(ctx, ep, prompt), out, now)
        pred = self.predictor
        ctx[self._pred_key] = _Prediction(
            ep,
            f,
            pred.predict_ttft(ep, f),
            pred.predict_tpot(ep, f),
            max(0.0, now - request.arrival),
            pred.warm,
            now,
        )
        super().post_schedule(ctx, request, result)
        charge: _Charge | None = ctx.get(self._ctx_key)
        if self.kv_wait and charge is not None:  # in flight there until its response, for the KV wait
            occ = self._occupants.get(ep)
            if occ is None:
                occ = self._occupants[ep] = _Occupancy()
            occ.add(charge)

    def on_first_token(self, ctx: CycleState, request: InferenceRequest, endpoint: Endpoint) -> None:
        """Learn the TTFT as soon as it is known. Why not at the end of the response: that delays what
        the model knows by the whole decode (seconds), so decisions use a model that has not seen the
        current load; learning here cut the replay's p90 TTFT error on heterogeneous from 52% to 41%
        at 8 req/s and from 65% to 43% at 4 (tuning seeds; docs/scheduling.md)."""
        super().on_first_token(ctx, request, endpoint)
        charge: _Charge | None = ctx.get(self._ctx_key)
        if charge is not None:
            occ = self._occupants.get(charge.endpoint)
            if occ is not None:
                occ.first_token(charge, self.clock())  # once: it ignores a charge that already has one
        p: _Prediction | None = ctx.get(self._pred_key)
        if p is None or p.ttft_learned or p.endpoint is not endpoint or not request.stream:
            return
        self._learn_ttft(p, endpoint, self.clock() - p.dispatched_at)

    def _learn_ttft(self, p: _Prediction, endpoint: Endpoint, ttft: float) -> None:
        p.ttft_learned = True
        if ttft <= 0:
            return
        own = self._tracked(endpoint)  # else it left: the pooled model learns it only
        if p.warm:
            self.predictor.ttft_errors.add(p.ttft_s, ttft)
            if own:
                self._errors_of(endpoint)[0].add(p.ttft_s, ttft)
        self.predictor.observe(endpoint, p.features, ttft, None, own)

    def post_response(
        self, ctx: CycleState, request: InferenceRequest, endpoint: Endpoint, info: ResponseInfo
    ) -> None:
        p: _Prediction | None = ctx.get(self._pred_key)
        ok = p is not None and p.endpoint is endpoint and request.stream and info.status == 200
        if p is not None:
            if ok and not p.ttft_learned and info.ttft_s is not None:
                # The data plane reported no first token: learn it from the response's own timing.
                self._learn_ttft(p, endpoint, info.ttft_s - p.waited_s)
            # Nothing learns a TTFT for it from here on (the parent's post_response calls
            # on_first_token, which would take the end of the response for its first token).
            p.ttft_learned = True
        super().post_response(ctx, request, endpoint, info)
        charge: _Charge | None = ctx.get(self._ctx_key)
        if charge is not None:
            occ = self._occupants.get(charge.endpoint)
            if occ is not None:
                occ.remove(charge)
        if p is None or not ok or info.ttft_s is None:
            return
        n = info.completion_tokens
        if n is not None and n >= 2 and info.e2e_s is not None and info.e2e_s > info.ttft_s:
            tpot = (info.e2e_s - info.ttft_s) / (n - 1)
            own = self._tracked(endpoint)  # else it left: the pooled model learns it only
            if p.warm:
                self.predictor.tpot_errors.add(p.tpot_s, tpot)
                if own:
                    self._errors_of(endpoint)[1].add(p.tpot_s, tpot)
            self.predictor.observe(endpoint, p.features, None, tpot, own)

    # -- metrics ------------------------------------------------------------------------------------
    def collect_metrics(self, profile: str, endpoints: Sequence[Endpoint]) -> Iterable[Metric]:
        pred = self.predictor
        hist = HistogramMetricFamily(
            "ingate_latency_prediction_error_ratio",
            "Absolute relative error |predicted - actual| / actual of the latency model's predictions "
            "for the endpoints it chose (after warm-up), by kind (ttft, tpot).",
            labels=["profile", "kind"],
        )
        quant = GaugeMetricFamily(
            "ingate_latency_prediction_error_ratio_quantile",
            "Quantiles of the absolute relative prediction error over the last predictions (window).",
            labels=["profile", "kind", "quantile"],
        )
        for kind, win in (("ttft", pred.ttft_errors), ("tpot", pred.tpot_errors)):
            hist.add_metric([profile, kind], _buckets(win), win.total)
            for q, v in zip((0.5, 0.9, 0.99), win.quantiles((0.5, 0.9, 0.99)), strict=False):
                quant.add_metric([profile, kind, str(q)], v)
        count = CounterMetricFamily(
            "ingate_latency_predictions",
            "Scoring decisions of the predicted-ttft scorer, by source: model (warm) or fallback "
            "(the predicted-latency cost, before warm-up).",
            labels=["profile", "source"],
        )
        for source, n in self.predictions.items():
            count.add_metric([profile, source], n)
        samples = GaugeMetricFamily(
            "ingate_latency_model_samples",
            "Responses the pooled latency model has learned from.",
            labels=["profile"],
        )
        samples.add_metric([profile], pred.samples())
        shed = CounterMetricFamily(
            "ingate_slo_unattainable_shed",
            "Sheddable requests answered 429 slo_unattainable: no endpoint was predicted to meet their SLO.",
            labels=["profile"],
        )
        shed.add_metric([profile], self.shed)
        held = CounterMetricFamily(
            "ingate_slo_unattainable_holds",
            "Times a non-sheddable request was held because no endpoint was predicted to meet its SLO "
            "(one per re-scoring while held).",
            labels=["profile"],
        )
        held.add_metric([profile], self.held)
        ep_quant = GaugeMetricFamily(
            "ingate_endpoint_latency_prediction_error_ratio_quantile",
            "Per endpoint: quantiles of the absolute relative prediction error over its last "
            f"{ENDPOINT_ERROR_WINDOW} predictions (after warm-up), by kind (ttft, tpot).",
            labels=["profile", "endpoint", "kind", "quantile"],
        )
        ep_count = CounterMetricFamily(
            "ingate_endpoint_latency_prediction_errors",
            "Per endpoint: predictions (after warm-up) whose error was measured, by kind.",
            labels=["profile", "endpoint", "kind"],
        )
        for ep in endpoints:
            wins = self._ep_errors.get(ep)
            if wins is None:
                continue
            for kind, win in zip(("ttft", "tpot"), wins, strict=True):
                if not win.n:
                    continue
                ep_count.add_metric([profile, ep.address, kind], win.n)
                for q, v in zip((0.5, 0.9), win.quantiles((0.5, 0.9)), strict=False):
                    ep_quant.add_metric([profile, ep.address, kind, str(q)], v)
        return [hist, quant, count, samples, shed, held, ep_quant, ep_count]


def _headroom(budget: float, predicted: float) -> float:
    """Score in (0, 1] of a prediction against a budget: above 0.5 (by the share of the budget left)
    when it is met, 0.5 * budget / predicted below (a spent budget counts as 1 ms: the faster endpoint
    still wins)."""
    if budget < 0.001:
        budget = 0.001
    if predicted <= budget:
        return 0.5 + 0.5 * (budget - predicted) / budget
    return 0.5 * budget / predicted


def _buckets(win: ErrorWindow) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    acc = 0
    for b, c in zip(ErrorWindow.BUCKETS, win.counts, strict=False):
        acc += c
        out.append((repr(b), float(acc)))
    out.append(("+Inf", float(win.n)))
    return out
