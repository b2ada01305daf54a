"""The director: the endpoint picker's one entry point, shared by every data plane.

A data plane (built-in proxy, Envoy ext_proc) hands the director the request's path, headers and body;
the director parses it (once), resolves model rewrite and objective, passes flow control (when
configured), runs the scheduler and returns a `Decision`. The data plane then sends the request to
`decision.target` (moving to `director.retarget(decision)` after a connection failure, before any byte
reached the client), reports the first token with `on_first_token`, and calls `finish` exactly once
(also on errors and disconnects; further calls are no-ops).

    decision = await director.handle(path, headers, raw_body)      # raises GatewayError (4xx/5xx)
    decision.target          -> Endpoint                            # where to send
    decision.upstream_body   -> bytes                               # raw body, or rewritten if the model changed
    decision.request         -> InferenceRequest
    director.retarget(decision) -> Endpoint | None                  # next fallback after a connect failure
    director.on_first_token(decision)                               # TTFT bookkeeping
    director.finish(decision, info: ResponseInfo)                   # idempotent; releases in-flight once

`Decision`, `ResponseInfo` and the data planes' view of this class (`DirectorLike`) live in
`ingate.lifecycle`. The director drives the lifecycle hooks of the profile that scheduled the request
(post-schedule after the decision, first token, post-response at `finish`) and nothing else's.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from typing import Any, Protocol

from ingate.config import GatewayConfig
from ingate.datastore import Datastore, Endpoint
from ingate.errors import SLO_HOLD_EXPIRED, GatewayError, SloHold
from ingate.flowcontrol.preemption import PriorityPlacement
from ingate.lifecycle import CycleState, Decision, ResponseInfo, SchedulingResult
from ingate.objectives import ObjectiveStore
from ingate.request import InferenceRequest, parse_request
from ingate.scheduling.scheduler import Scheduler
from ingate.telemetry import Telemetry, get_logger, kv

log = get_logger("ingate.director")


class FlowControl(Protocol):
    """The seam for flow control (ingate.flowcontrol): admit may wait, or raise GatewayError 429/503."""

    async def admit(self, request: InferenceRequest) -> Any: ...

    def release(self, ticket: Any, info: ResponseInfo) -> None: ...


class Director:
    """Parses, resolves, admits and schedules requests for any data plane."""

    def __init__(
        self,
        config: GatewayConfig,
        datastore: Datastore,
        scheduler: Scheduler,
        telemetry: Telemetry,
        flow_control: FlowControl | None = None,
        rng: random.Random | None = None,
        objectives: ObjectiveStore | None = None,
    ) -> None:
        self.config = config
        self.datastore = datastore
        self.scheduler = scheduler
        self.telemetry = telemetry
        self.flow_control = flow_control
        self.rng = rng or random.Random()
        m = config.models
        self._adapters = frozenset(m.adapters)
        self._served = frozenset(m.served) | self._adapters if m.served else frozenset()
        self.objectives = objectives if objectives is not None else ObjectiveStore.from_config(config)
        """Objectives and model rewrites: the config's, plus what discovery (InferenceObjective and
        InferenceModelRewrite resources) adds and changes while the gateway runs."""
        self._max_body = config.proxy.max_body_bytes
        # The priority field the model servers read: vLLM serves lower values first, SGLang higher.
        self._priority_sign = {"none": None, "vllm": -1, "sglang": 1}[config.pool.model_server_priority]
        fc = config.flow_control
        self.placement = PriorityPlacement() if fc is not None and fc.enabled and fc.preemption else None
        """flowControl.preemption: per-priority in-flight accounting and the preemption preference."""
        if self.placement is not None:
            placement = self.placement
            datastore.on_remove(lambda ep: placement.forget(ep.address))

    def models(self) -> list[dict[str, Any]]:
        """The OpenAI `/v1/models` entries of this pool: served models, adapters (with their parent)
        and the model names that rewrite rules accept."""
        m = self.config.models
        created = int(time.time())
        data: list[dict[str, Any]] = [
            {"id": n, "object": "model", "created": created, "owned_by": "ingate"} for n in m.served
        ]
        data += [
            {
                "id": a,
                "object": "model",
                "created": created,
                "owned_by": "ingate",
                "parent": m.served[0] if m.served else None,
            }
            for a in m.adapters
        ]
        data += [
            {"id": r.matches[0].model.value, "object": "model", "created": created, "owned_by": "ingate"}
            for r in m.rewrites
        ]
        return data

    def resolve(self, req: InferenceRequest) -> None:
        """Apply model rewrite / traffic split, adapter detection and the objective (priority, SLOs)."""
        store = self.objectives
        if req.target_model == req.model:  # no model-name-rewrite header
            rewritten = store.rewrite(req.model, self.rng.random)
            if rewritten is not None:
                req.target_model = rewritten
        target = req.target_model
        if self._served and target not in self._served:
            raise GatewayError(404, f"The model `{target}` does not exist in this pool.", "model_not_found")
        if target in self._adapters:
            req.adapter = target
        if req.objective is not None and store.get(req.objective) is None:
            log.debug(kv(event="unknown_objective", objective=req.objective, request_id=req.request_id))
        obj = store.resolve(req.objective, req.model)
        if obj is not None:
            req.objective = obj.name
            req.priority = obj.priority
            if req.slo_ttft_ms is None:
                req.slo_ttft_ms = obj.slo_ttft_ms
            if req.slo_tpot_ms is None:
                req.slo_tpot_ms = obj.slo_tpot_ms

    async def handle(
        self, path: str, headers: Mapping[str, str], raw_body: bytes, profile: str | None = None
    ) -> Decision:
        """Parse, resolve, admit and schedule one request (raises GatewayError)."""
        now = time.monotonic()
        tel = self.telemetry
        try:
            req = parse_request(path, headers, raw_body, max_body_bytes=self._max_body, now=now)
        except GatewayError as e:
            tel.errors.labels("", "", str(e.status)).inc()
            raise
        try:
            self.resolve(req)
            ticket = None
            if self.flow_control is not None:
                ticket = await self.flow_control.admit(req)
            t0 = time.perf_counter()
            try:
                try:
                    result, ctx = self.scheduler.schedule(req, profile=profile)
                except SloHold:
                    result, ctx = await self._hold(req, profile)
                    t0 = time.perf_counter()  # the scheduling histogram times the final decision
            except (GatewayError, asyncio.CancelledError):
                # Also a client gone while the request was held for its SLO: the admission goes back.
                if ticket is not None and self.flow_control is not None:
                    self.flow_control.release(ticket, ResponseInfo(status=503))
                raise
            placement = self.placement
            if placement is not None:
                placement.place(result, ticket, req.priority)
            hooks = self.scheduler.hooks(result.profile)
            hooks.run_post_schedule(ctx, req, result)
            tel.scheduling.observe(time.perf_counter() - t0)
        except GatewayError as e:
            tel.errors.labels(req.model, req.target_model, str(e.status)).inc()
            raise
        sign = self._priority_sign
        body = req.body_for_upstream(None if sign is None else sign * req.priority)
        series = tel.series(req.model, req.target_model)
        d = Decision(req, result, ctx, body, now, series, hooks, ticket=ticket)
        ep = d.target
        if placement is not None:
            placement.count(ep, req.priority, 1)
        ep.in_flight += 1
        series.requests.inc()
        series.request_bytes.observe(len(req.raw_body))
        tel.running[req.model] = tel.running.get(req.model, 0) + 1
        tel.decision(ep.address, result.profile).inc()
        if log.isEnabledFor(10):
            log.debug(
                kv(
                    event="scheduled",
                    request_id=req.request_id,
                    model=req.target_model,
                    endpoint=ep.address,
                    profile=result.profile,
                )
            )
        return d

    async def _hold(self, req: InferenceRequest, profile: str | None) -> tuple[SchedulingResult, CycleState]:
        """Hold a request no endpoint is predicted to serve within its SLO (`SloHold` from a plugin,
        e.g. the predicted-ttft scorer) rather than add it to an overloaded endpoint now: schedule it
        again every `poll_s` until a decision succeeds or the hold is over, then once without hold."""
        while True:
            try:
                return self.scheduler.schedule(req, profile=profile)
            except SloHold as h:
                if time.monotonic() + h.poll_s >= h.until:
                    req.extra[SLO_HOLD_EXPIRED] = True
                    return self.scheduler.schedule(req, profile=profile)
                await asyncio.sleep(h.poll_s)

    def retarget(self, d: Decision) -> Endpoint | None:
        """Move the request to its next fallback (after a connection failure); None when none is left."""
        if d.finished or d.target_index + 1 >= len(d.result.endpoints):
            return None
        old = d.target
        old.in_flight -= 1
        d.target_index += 1
        new = d.target
        new.in_flight += 1
        if self.placement is not None:
            self.placement.count(old, d.request.priority, -1)
            self.placement.count(new, d.request.priority, 1)
        self.telemetry.retries.inc()
        return new

    def on_first_token(self, d: Decision) -> None:
        if d.first_token_at is None:
            d.first_token_at = time.monotonic()
            req = d.request
            d.series.ttft.observe(d.first_token_at - d.started)
            d.hooks.run_first_token(d.ctx, req, d.target)

    @staticmethod
    def _observe_success(d: Decision, info: ResponseInfo) -> None:
        """The request-level series of a successful response (upstream's llm_d_epp_request_*)."""
        series = d.series
        e2e = info.e2e_s or 0.0
        series.duration.observe(e2e)
        if info.prompt_tokens is not None:
            series.input_tokens.observe(info.prompt_tokens)
        if info.cached_tokens is not None:
            series.cached_tokens.observe(info.cached_tokens)
        out = info.completion_tokens
        if out is not None:
            series.output_tokens.observe(out)
            if out > 0:
                series.ntpot.observe(e2e / out)
        if info.response_bytes is not None:
            series.response_bytes.observe(info.response_bytes)
        if d.request.stream:
            if out is not None and out > 1 and info.ttft_s is not None:
                series.streaming_tpot.observe((e2e - info.ttft_s) / (out - 1))
            for gap in info.chunk_gaps or ():
                series.itl.observe(gap)

    def finish(self, d: Decision, info: ResponseInfo) -> None:
        """Release in-flight accounting and feed the outcome back; runs once per decision."""
        if d.finished:
            return
        d.finished = True
        ep = d.target
        req = d.request
        ep.in_flight -= 1
        if self.placement is not None:
            self.placement.count(ep, req.priority, -1)
        tel = self.telemetry
        now = time.monotonic()
        if info.e2e_s is None:
            info.e2e_s = now - d.started
        if info.ttft_s is None and d.first_token_at is not None:
            info.ttft_s = d.first_token_at - d.started
        tel.running[req.model] -= 1
        if info.status >= 400 or info.status == 0:
            tel.errors.labels(req.model, req.target_model, str(info.status)).inc()
        else:
            self._observe_success(d, info)
        if self.flow_control is not None and d.ticket is not None:
            self.flow_control.release(d.ticket, info)
        d.hooks.run_post_response(d.ctx, req, ep, info)
        if log.isEnabledFor(10):
            log.debug(
                kv(
                    event="finished",
                    request_id=req.request_id,
                    endpoint=ep.address,
                    status=info.status,
                    e2e_s=round(info.e2e_s, 4),
                )
            )
