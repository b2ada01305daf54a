"""Director: model resolution, canary split, objectives, errors and exactly-once in-flight release."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from ingate.config import GatewayConfig, parse_config
from ingate.datastore import Datastore, Endpoint
from ingate.director import Director
from ingate.errors import GatewayError
from ingate.lifecycle import ResponseInfo
from ingate.request import InferenceRequest
from ingate.scheduling.scheduler import build_scheduler
from ingate.telemetry import Telemetry

BASE = "base-model"


def _cfg(**extra: Any) -> GatewayConfig:
    data: dict[str, Any] = {
        "pool": {"endpoints": [{"address": "127.0.0.1:9001"}, {"address": "127.0.0.1:9002"}]},
        "models": {
            "served": [BASE, "base-v2"],
            "adapters": ["sql-lora"],
            "rewrites": [
                {
                    "matches": [{"model": {"value": "canary"}}],
                    "targets": [
                        {"modelRewrite": BASE, "weight": 80},
                        {"modelRewrite": "base-v2", "weight": 20},
                    ],
                }
            ],
        },
        "objectives": [
            {"name": "critical", "priority": 10, "slo": {"ttftMs": 300}},
            {"name": "batch", "priority": -1},
        ],
        "defaultObjective": "batch",
        **extra,
    }
    return parse_config(data)


def _director(cfg: GatewayConfig | None = None, seed: int = 1) -> tuple[Director, Datastore]:
    cfg = cfg or _cfg()
    ds = Datastore([Endpoint(name=f"e{i}", host="127.0.0.1", port=9001 + i) for i in range(2)])
    sched = build_scheduler(cfg.scheduler, ds)
    return Director(cfg, ds, sched, Telemetry(ds, "p"), rng=random.Random(seed)), ds


def _body(model: str = BASE, **kw: Any) -> bytes:
    return json.dumps({"model": model, "prompt": "hello there", "max_tokens": 4, **kw}).encode()


async def test_in_flight_released_exactly_once() -> None:
    d, ds = _director()
    dec = await d.handle("/v1/completions", {}, _body())
    assert sum(ep.in_flight for ep in ds.endpoints()) == 1
    assert dec.target.in_flight == 1
    d.finish(dec, ResponseInfo(status=200))
    d.finish(dec, ResponseInfo(status=499))  # a second finish (e.g. disconnect after completion) is a no-op
    assert all(ep.in_flight == 0 for ep in ds.endpoints())


async def test_retarget_moves_in_flight_to_fallback() -> None:
    d, ds = _director()
    dec = await d.handle("/v1/completions", {}, _body())
    first = dec.target
    nxt = d.retarget(dec)
    assert nxt is not None and nxt is not first
    assert first.in_flight == 0 and nxt.in_flight == 1
    assert d.retarget(dec) is None  # two endpoints: nothing left after the fallback
    d.finish(dec, ResponseInfo(status=502))
    assert all(ep.in_flight == 0 for ep in ds.endpoints())
    assert d.retarget(dec) is None  # finished decisions never move


async def test_canary_split_ratio() -> None:
    d, _ = _director(seed=3)
    n = 4000
    v2 = 0
    for _ in range(n):
        dec = await d.handle("/v1/completions", {}, _body("canary"))
        v2 += dec.request.target_model == "base-v2"
        assert json.loads(dec.upstream_body)["model"] == dec.request.target_model
        d.finish(dec, ResponseInfo(status=200))
    assert abs(v2 / n - 0.20) < 0.03


async def test_rewrite_header_forces_target() -> None:
    d, _ = _director()
    for _ in range(50):
        dec = await d.handle("/v1/completions", {"x-gateway-model-name-rewrite": "base-v2"}, _body("canary"))
        assert dec.request.target_model == "base-v2"
        d.finish(dec, ResponseInfo(status=200))


async def test_adapter_detected() -> None:
    d, _ = _director()
    dec = await d.handle("/v1/completions", {}, _body("sql-lora"))
    assert dec.request.adapter == "sql-lora"
    d.finish(dec, ResponseInfo(status=200))
    dec = await d.handle("/v1/completions", {}, _body())
    assert dec.request.adapter is None
    d.finish(dec, ResponseInfo(status=200))


async def test_objective_by_header_else_default() -> None:
    d, _ = _director()
    dec = await d.handle("/v1/completions", {"x-gateway-inference-objective": "critical"}, _body())
    assert (dec.request.objective, dec.request.priority, dec.request.slo_ttft_ms) == ("critical", 10, 300)
    d.finish(dec, ResponseInfo(status=200))
    # An objective the config does not know falls back to the default objective (documented behaviour).
    dec = await d.handle("/v1/completions", {"x-gateway-inference-objective": "nope"}, _body())
    assert (dec.request.objective, dec.request.priority) == ("batch", -1)
    d.finish(dec, ResponseInfo(status=200))


def _openai_error(e: GatewayError) -> dict[str, Any]:
    body = json.loads(e.body())
    assert set(body["error"]) >= {"message", "type", "code"}
    return body["error"]


async def test_unknown_model_is_404() -> None:
    d, ds = _director()
    with pytest.raises(GatewayError) as ei:
        await d.handle("/v1/completions", {}, _body("gpt-nope"))
    assert ei.value.status == 404
    assert "gpt-nope" in _openai_error(ei.value)["message"]
    assert all(ep.in_flight == 0 for ep in ds.endpoints())


async def test_bad_body_is_400() -> None:
    d, _ = _director()
    with pytest.raises(GatewayError) as ei:
        await d.handle("/v1/completions", {}, b"{not json")
    assert ei.value.status == 400
    assert _openai_error(ei.value)["type"] == "invalid_request_error"


async def test_no_endpoint_is_503() -> None:
    d, ds = _director()
    for ep in ds.endpoints():
        ep.healthy = False
    with pytest.raises(GatewayError) as ei:
        await d.handle("/v1/completions", {}, _body())
    assert ei.value.status == 503
    _openai_error(ei.value)
    assert all(ep.in_flight == 0 for ep in ds.endpoints())


async def test_any_model_passes_when_none_listed() -> None:
    cfg = parse_config({"pool": {"endpoints": [{"address": "127.0.0.1:9001"}]}})
    d, _ = _director(cfg)
    dec = await d.handle("/v1/completions", {}, _body("whatever"))
    assert dec.request.target_model == "whatever"
    d.finish(dec, ResponseInfo(status=200))


class _Flow:
    def __init__(self) -> None:
        self.admitted: list[InferenceRequest] = []
        self.released: list[int] = []

    async def admit(self, request: InferenceRequest) -> Any:
        self.admitted.append(request)
        return len(self.admitted)

    def release(self, ticket: Any, info: ResponseInfo) -> None:
        self.released.append(ticket)


async def test_flow_control_seam_admits_and_releases_once() -> None:
    cfg = _cfg()
    ds = Datastore([Endpoint(name="e0", host="127.0.0.1", port=9001)])
    flow = _Flow()
    d = Director(cfg, ds, build_scheduler(cfg.scheduler, ds), Telemetry(ds, "p"), flow_control=flow)
    dec = await d.handle("/v1/completions", {}, _body())
    d.finish(dec, ResponseInfo(status=200))
    d.finish(dec, ResponseInfo(status=200))
    assert flow.released == [1]
    ds.endpoints()[0].healthy = False
    with pytest.raises(GatewayError):
        await d.handle("/v1/completions", {}, _body())
    assert flow.released == [1, 2]  # a ticket admitted but not scheduled is released too


@pytest.mark.parametrize(("mode", "sent"), [("vllm", -10), ("sglang", 10)])
async def test_objective_priority_reaches_the_model_server(mode: str, sent: int) -> None:
    cfg = _cfg(pool={"endpoints": [{"address": "127.0.0.1:9001"}], "modelServerPriority": mode})
    d, _ = _director(cfg)
    hdr = {"x-gateway-inference-objective": "critical"}
    dec = await d.handle("/v1/completions", hdr, _body())
    assert json.loads(dec.upstream_body)["priority"] == sent
    # A client's own priority is overwritten, also back to the objective's 0 (no self-promotion).
    d.config.default_objective = None
    d.objectives.default_name = None
    raw = _body(priority=-99)
    dec = await d.handle("/v1/completions", {}, raw)
    assert json.loads(dec.upstream_body)["priority"] == 0
    raw = _body()
    dec = await d.handle("/v1/completions", {}, raw)
    assert dec.upstream_body is dec.request.raw_body  # nothing to change: forwarded as-is


async def test_priority_not_forwarded_by_default() -> None:
    d, _ = _director()
    raw = _body(priority=-99)
    dec = await d.handle("/v1/completions", {"x-gateway-inference-objective": "critical"}, raw)
    assert dec.upstream_body is dec.request.raw_body


class _PreemptFlow(_Flow):
    async def admit(self, request: InferenceRequest) -> Any:
        from ingate.flowcontrol.controller import Ticket

        return Ticket("f", request.priority, 1, 0.0, 0.0, False, preempting=request.priority > 0)


async def test_preempting_request_goes_where_lower_priority_work_runs() -> None:
    cfg = _cfg(flowControl={"preemption": True})
    ds = Datastore([Endpoint(name=f"e{i}", host="127.0.0.1", port=9001 + i) for i in range(2)])
    d = Director(cfg, ds, build_scheduler(cfg.scheduler, ds), Telemetry(ds, "p"), flow_control=_PreemptFlow())
    crit = {"x-gateway-inference-objective": "critical"}
    # A batch (priority -1) request runs on one endpoint; critical ones follow it there (preempting).
    low = await d.handle("/v1/completions", {}, _body())
    busy = low.target
    lat = next(s for s, _ in d.scheduler.default.scorers if s.name == "predicted-latency")
    for _ in range(3):
        dec = await d.handle("/v1/completions", crit, _body(prompt="x" * 50))
        assert dec.ticket.preempting and dec.target is busy
        # The scheduler's own bookkeeping (post-schedule hooks) follows the moved target.
        assert {ep.name: ld.requests for ep, ld in lat._loads.items() if ld.requests} == {busy.name: 2}
        d.finish(dec, ResponseInfo(status=200))
    assert busy.in_flight_by_priority == {-1: 1}
    d.finish(low, ResponseInfo(status=200))
    assert busy.in_flight_by_priority == {} and busy.in_flight == 0


async def test_a_burst_of_preempting_requests_spreads_over_replicas_full_of_batch_work() -> None:
    cfg = _cfg(flowControl={"preemption": True})
    ds = Datastore([Endpoint(name=f"e{i}", host="127.0.0.1", port=9001 + i) for i in range(2)])
    d = Director(cfg, ds, build_scheduler(cfg.scheduler, ds), Telemetry(ds, "p"), flow_control=_PreemptFlow())
    crit = {"x-gateway-inference-objective": "critical"}
    # Both replicas run 4 batch requests each (their learned batch: 4 slots).
    lows = [await d.handle("/v1/completions", {}, _body()) for _ in range(8)]
    e0, e1 = ds.endpoints()
    # Displaced batch work waits on both; e1 looks far worse to the load scorers, so the scheduler
    # would send every critical request to e0.
    e0.metrics.running, e0.metrics.waiting, e0.metrics.kv_usage = 4, 1, 0.2
    e1.metrics.running, e1.metrics.waiting, e1.metrics.kv_usage = 4, 6, 0.9
    assert sorted(ep.in_flight_by_priority.get(-1, 0) for ep in ds.endpoints()) == [4, 4]
    # A burst of critical requests, none finished yet: they alternate instead of filling one replica.
    burst = [await d.handle("/v1/completions", crit, _body(prompt="x" * 50)) for _ in range(6)]
    assert sorted(ep.in_flight_by_priority.get(10, 0) for ep in ds.endpoints()) == [3, 3]
    for dec in burst + lows:
        d.finish(dec, ResponseInfo(status=200))


class _NoPreemptFlow(_Flow):
    async def admit(self, request: InferenceRequest) -> Any:
        from ingate.flowcontrol.controller import Ticket

        return Ticket("f", request.priority, 1, 0.0, 0.0, False)


async def test_request_avoids_a_replica_full_of_equal_priority_work() -> None:
    cfg = _cfg(flowControl={"preemption": True})
    ds = Datastore([Endpoint(name=f"e{i}", host="127.0.0.1", port=9001 + i) for i in range(2)])
    d = Director(
        cfg, ds, build_scheduler(cfg.scheduler, ds), Telemetry(ds, "p"), flow_control=_NoPreemptFlow()
    )
    crit = {"x-gateway-inference-objective": "critical"}
    e0, e1 = ds.endpoints()
    # e0 runs two critical requests of this gateway and its batch is 2 wide (as scraped); e1 runs one
    # batch request. Without the rule the next critical request goes to the less loaded e1 only by
    # chance of the scores; with it, it must never queue behind e0's.
    e0.in_flight, e0.in_flight_by_priority, e0.metrics.running = 2, {10: 2}, 2
    e1.in_flight, e1.in_flight_by_priority, e1.metrics.running = 1, {-1: 1}, 1
    e1.metrics.waiting = 3  # e1 even looks worse to the load scorers
    for _ in range(5):
        dec = await d.handle("/v1/completions", crit, _body())
        assert dec.target is e1
        d.finish(dec, ResponseInfo(status=200))
    e0.in_flight, e0.in_flight_by_priority = 1, {10: 1}  # a free slot on e0 again
    assert d.placement is not None
    assert d.placement.looks_full(e1, 10) and not d.placement.looks_full(e0, 10)


async def test_request_metrics_per_model_and_endpoint() -> None:
    """The gateway's own Prometheus series: counts, latencies and tokens per (model, target model),
    decisions per endpoint, errors by status."""
    from prometheus_client import generate_latest

    d, _ = _director()
    for model in (BASE, BASE, "canary"):
        dec = await d.handle("/v1/completions", {"x-gateway-model-name-rewrite": BASE}, _body(model))
        d.on_first_token(dec)
        d.finish(dec, ResponseInfo(status=200, prompt_tokens=7, completion_tokens=3))
    bad = await d.handle("/v1/completions", {}, _body(BASE))
    d.finish(bad, ResponseInfo(status=503))
    reg = d.telemetry.registry

    def value(name: str, **labels: str) -> float:
        v = reg.get_sample_value(name, labels)
        return 0.0 if v is None else v

    base = {"model_name": BASE, "target_model_name": BASE}
    canary = {"model_name": "canary", "target_model_name": BASE}
    assert value("inference_objective_request_total", **base) == 3
    assert value("inference_objective_request_total", **canary) == 1
    assert value("inference_objective_request_duration_seconds_count", **base) == 2  # the 503 is an error
    assert value("ingate_time_to_first_token_seconds_count", **base) == 2
    assert value("inference_objective_input_tokens_sum", **base) == 14
    assert value("inference_objective_output_tokens_sum", **canary) == 3
    assert value("inference_objective_request_error_total", **base, error_code="503") == 1
    profile = bad.result.profile
    per_endpoint = {
        ep.address: value("ingate_scheduler_decisions_total", endpoint=ep.address, profile=profile)
        for ep in d.datastore.endpoints()
    }
    assert sum(per_endpoint.values()) == 4
    assert per_endpoint[bad.target.address] >= 1
    assert b"inference_objective_request_total" in generate_latest(reg)


async def test_lifecycle_hooks_run_for_the_scheduling_profile_only() -> None:
    """The director runs post-schedule, first-token and post-response hooks of the plugins of the
    profile that scheduled the request, once each, and no other profile's (docs/scheduling.md)."""
    from dataclasses import dataclass, field

    from ingate.lifecycle import CycleState, SchedulingResult
    from ingate.scheduling.plugins.registry import register

    @register("scorer", "test-hook-recorder")
    @dataclass
    class Recorder:
        tag: str = ""
        name: str = "test-hook-recorder"
        calls: list[str] = field(default_factory=list)

        def score(self, ctx: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> dict:
            return dict.fromkeys(endpoints, 0.5)

        def post_schedule(self, ctx: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
            self.calls.append("post_schedule")

        def on_first_token(self, ctx: CycleState, request: InferenceRequest, endpoint: Endpoint) -> None:
            self.calls.append("first_token")

        def post_response(
            self, ctx: CycleState, request: InferenceRequest, endpoint: Endpoint, info: ResponseInfo
        ) -> None:
            self.calls.append("post_response")

    cfg = _cfg(
        scheduler={
            "defaultProfile": "a",
            "profiles": {
                p: {"scorers": [{"type": "test-hook-recorder", "parameters": {"tag": p}}]} for p in ("a", "b")
            },
        }
    )
    d, _ = _director(cfg)
    a = d.scheduler.profiles["a"].scorers[0][0]
    b = d.scheduler.profiles["b"].scorers[0][0]
    dec = await d.handle("/v1/completions", {}, _body())
    d.on_first_token(dec)
    d.on_first_token(dec)
    d.finish(dec, ResponseInfo(status=200))
    d.finish(dec, ResponseInfo(status=200))
    assert a.calls == ["post_schedule", "first_token", "post_response"]  # type: ignore[attr-defined]
    assert b.calls == []  # type: ignore[attr-defined]
    dec = await d.handle("/v1/completions", {}, _body(), profile="b")
    d.finish(dec, ResponseInfo(status=200))
    assert b.calls == ["post_schedule", "post_response"]  # type: ignore[attr-defined]
    assert len(a.calls) == 3  # type: ignore[attr-defined]


async def test_objectives_and_rewrites_changed_at_run_time_apply_to_the_next_request() -> None:
    """Discovery (InferenceObjective / InferenceModelRewrite resources) edits the objective store; the
    director reads it per request, so a priority change takes effect without a restart."""
    from ingate.objectives import ObjectiveSpec, RewriteRuleSpec, RewriteSpec

    d, _ = _director()
    hdr = {"x-llm-d-inference-objective": "live"}
    dec = await d.handle("/v1/completions", hdr, _body())
    assert dec.request.priority == -1  # unknown objective: the default (batch, -1)
    d.finish(dec, ResponseInfo(status=200))
    d.objectives.put(ObjectiveSpec("live", priority=5, slo_ttft_ms=250))
    dec = await d.handle("/v1/completions", hdr, _body())
    assert (dec.request.objective, dec.request.priority, dec.request.slo_ttft_ms) == ("live", 5, 250)
    d.finish(dec, ResponseInfo(status=200))
    d.objectives.put(ObjectiveSpec("live", priority=-3))
    dec = await d.handle("/v1/completions", hdr, _body())
    assert dec.request.priority == -3
    d.finish(dec, ResponseInfo(status=200))
    d.objectives.put_rewrite(RewriteSpec("rw", (RewriteRuleSpec(("alias",), (("base-v2", 1),)),)))
    dec = await d.handle("/v1/completions", {}, _body("alias"))
    assert dec.request.target_model == "base-v2"
    d.finish(dec, ResponseInfo(status=200))


async def test_a_request_cancelled_while_held_for_its_slo_gives_its_admission_back() -> None:
    """A client that goes away while the director holds its request (SloHold) must not leak the flow
    control ticket: the admission is released exactly once."""
    from ingate.errors import SloHold

    cfg = _cfg()
    ds = Datastore([Endpoint(name="e0", host="127.0.0.1", port=9001)])
    flow = _Flow()
    d = Director(cfg, ds, build_scheduler(cfg.scheduler, ds), Telemetry(ds, "p"), flow_control=flow)
    import time as _time

    def hold(*a: Any, **k: Any) -> Any:
        raise SloHold("held", poll_s=0.01, until=_time.monotonic() + 60)

    d.scheduler.schedule = hold  # type: ignore[method-assign]
    import asyncio

    task = asyncio.create_task(d.handle("/v1/completions", {}, _body()))
    await asyncio.sleep(0.05)
    assert not task.done() and flow.admitted and not flow.released
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert flow.released == [1]
