"""The online latency predictor on synthetic data with a known truth, and the predicted-ttft scorer
(cold start, learning slow and fast replicas, SLO headroom, shedding, metrics)."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.core import Metric

from ingate.datastore import Datastore, Endpoint, EndpointMetrics, StepTiming
from ingate.errors import GatewayError
from ingate.lifecycle import CycleState, ResponseInfo, SchedulingResult
from ingate.request import COMPLETIONS, InferenceRequest, parse_request
from ingate.scheduling.config import SchedulerConfig
from ingate.scheduling.plugins.latency import PredictedLatencyScorer
from ingate.scheduling.plugins.registry import ExposesMetrics, plugins
from ingate.scheduling.plugins.slo import SLO_UNATTAINABLE, PredictedTTFTScorer
from ingate.scheduling.predictor import TTFT_FEATURES, Features, LatencyPredictor, OnlineLinear
from ingate.scheduling.scheduler import build_scheduler

FAST = [0.02, 0.05, 0.01, 0.04, 0.01, 0.002, 0.05, 0.1, 0.003, -0.05, 0.8]
"""True TTFT seconds per unit of each TTFT feature (bias, new ktokens, ...) of a 'fast' replica."""


def feats(rng: random.Random) -> Features:
    return Features(
        new_tokens=rng.uniform(10, 4000),
        pending_prefill=rng.uniform(0, 8000),
        waiting=rng.randint(0, 5),
        running=rng.randint(0, 20),
        kv_utilisation=rng.random(),
        kv_shortfall=rng.choice([0.0, 0.0, rng.uniform(0, 3000)]),
        decoding=rng.randint(0, 20),
        since_step=rng.uniform(0, 0.2),
        kv_wait=rng.choice([0.0, 0.0, rng.uniform(0, 3.0)]),
    )


def true_ttft(coef: list[float], f: Features) -> float:
    return sum(a * b for a, b in zip(coef, f.ttft(), strict=True))


def rel_errors(p: LatencyPredictor, truths: dict[str, list[float]], rng: random.Random) -> list[float]:
    errs = []
    for _ in range(500):
        name = rng.choice(sorted(truths))
        f = feats(rng)
        y = true_ttft(truths[name], f)
        errs.append(abs(p.predict_ttft(name, f) - y) / y)
    return sorted(errs)


def test_learns_a_known_linear_truth_per_endpoint_without_configuration() -> None:
    rng = random.Random(1)
    slow = [3 * c for c in FAST]  # a replica three times slower in every respect
    truths = {"fast": FAST, "slow": slow}
    p = LatencyPredictor()
    assert not p.warm
    for _ in range(2000):
        name = rng.choice(["fast", "slow"])
        f = feats(rng)
        p.observe(name, f, true_ttft(truths[name], f) * rng.lognormvariate(0, 0.05), None)
    assert p.warm and p.endpoints() == 2
    errs = rel_errors(p, truths, rng)
    assert errs[len(errs) // 2] < 0.05 and errs[int(0.9 * len(errs))] < 0.1
    # The pooled model alone cannot tell the classes apart: an unseen endpoint gets the pool's
    # prediction, between the two, while the known ones get their own.
    f = feats(rng)
    unseen = p.predict_ttft("new", f)
    assert p.predict_ttft("fast", f) < unseen < p.predict_ttft("slow", f)


def test_forgetting_follows_a_replica_that_slows_down() -> None:
    rng = random.Random(2)
    p = LatencyPredictor(forgetting=0.99)
    for _ in range(500):
        f = feats(rng)
        p.observe("e", f, true_ttft(FAST, f), None)
    slower = [2 * c for c in FAST]
    for _ in range(500):
        f = feats(rng)
        p.observe("e", f, true_ttft(slower, f), None)
    errs = rel_errors(p, {"e": slower}, rng)
    assert errs[len(errs) // 2] < 0.1


def test_memory_is_bounded_and_predictions_stay_finite_and_positive() -> None:
    rng = random.Random(3)
    p = LatencyPredictor(error_window=100)
    f0 = feats(rng)
    for _ in range(5000):  # a constant input: no excitation in most directions (RLS wind-up case)
        p.observe("e", f0, 0.2, 0.01)
        p.ttft_errors.add(0.2, 0.25)
    m = p._models["e"].ttft
    assert len(m.P) == len(TTFT_FEATURES) and len(p.ttft_errors.recent) == 100
    assert sum(m.P[i][i] for i in range(m.d)) <= m.max_trace * 1.01
    assert abs(p.predict_ttft("e", f0) - 0.2) < 1e-3
    assert all(0 < p.predict_ttft("e", feats(rng)) < 1e6 for _ in range(100))
    p.forget("e")
    assert p.endpoints() == 0 and p.samples("e") == 0
    assert p.ttft_errors.n == 5000 and sum(p.ttft_errors.counts) == 5000


def test_online_linear_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        OnlineLinear(3, 0.0, 1.0)
    with pytest.raises(ValueError):
        LatencyPredictor(warmup=0)


# -- the scorer ------------------------------------------------------------------------------------


def ep(i: int, **m: object) -> Endpoint:
    e = Endpoint(name=f"e{i}", host="127.0.0.1", port=9000 + i)
    e.metrics = EndpointMetrics(block_size=16, num_gpu_blocks=800, **m)  # type: ignore[arg-type]
    return e


def req(chars: int, headers: dict[str, str] | None = None, priority: int = 0) -> InferenceRequest:
    body = {"model": "m", "prompt": "abcd" * (chars // 4), "max_tokens": 16, "stream": True}
    r = parse_request(COMPLETIONS, headers or {}, orjson.dumps(body), now=100.0)
    r.target_model = "m"
    r.priority = priority
    return r


def serve(
    s: PredictedTTFTScorer,
    eps: list[Endpoint],
    speed: dict[Endpoint, float],
    rng: random.Random,
    backlog: list[tuple[CycleState, InferenceRequest, Endpoint, float]] | None = None,
) -> None:
    """Route one request through the scorer's hooks as the director would, with a TTFT that grows with
    the prefill queued there (its own included), `speed` times slower on slow endpoints. With a
    `backlog`, up to 3 earlier requests are still in prefill when the next one is routed."""
    s.clock = lambda: 100.0  # the requests' arrival: none waited in the gateway
    r = req(rng.randint(100, 8000))
    ctx = CycleState()
    scores = s.score(ctx, r, eps)
    target = max(eps, key=lambda e: (scores[e], rng.random())) if rng.random() < 0.7 else rng.choice(eps)
    s.post_schedule(ctx, r, SchedulingResult([target], "p"))
    ttft = speed[target] * (0.02 + 0.0001 * s.load(target).pending_prefill)
    pending = backlog if backlog is not None else []
    pending.append((ctx, r, target, ttft))
    while len(pending) > (rng.randint(0, 3) if backlog is not None else 0):
        c, rq, t, y = pending.pop(0)
        s.clock = lambda y=y: 100.0 + y  # the first token arrives y after dispatch: TTFT learned now
        s.on_first_token(c, rq, t)
        s.clock = lambda: 100.0
        s.post_response(c, rq, t, ResponseInfo(200, None, 16, 0, ttft_s=y, e2e_s=y + 15 * 0.01))


def test_scorer_falls_back_to_predicted_latency_before_warmup_then_learns_slow_replicas() -> None:
    a, b = ep(0), ep(1)
    s = PredictedTTFTScorer(warmup=30)
    base = PredictedLatencyScorer()
    r = req(2000)
    assert s.score(CycleState(), r, [a, b]) == base.score(CycleState(), r, [a, b])
    assert s.predictions == {"model": 0, "fallback": 1}
    # b is four times slower; the hand-tuned cost cannot know it, the model learns it.
    rng = random.Random(5)
    for _ in range(200):
        serve(s, [a, b], {a: 1.0, b: 4.0}, rng)
    assert s.predictor.warm and s.predictions["model"] > 0
    sc = s.score(CycleState(), req(2000), [a, b])
    assert sc[a] == 1.0 and sc[b] < 0.6
    assert s.predictor.ttft_errors.n > 0
    # All charges were released: the accounting the features read is back to idle.
    assert s.load(a).pending_prefill == s.load(b).pending_prefill == 0


def warm_scorer(**kw: object) -> tuple[PredictedTTFTScorer, Endpoint, Endpoint]:
    a, b = ep(0), ep(1)
    s = PredictedTTFTScorer(warmup=30, **kw)  # type: ignore[arg-type]
    rng = random.Random(6)
    for _ in range(300):
        serve(s, [a, b], {a: 1.0, b: 10.0}, rng)
    return s, a, b


def test_slo_headroom_and_shedding_of_sheddable_requests_only() -> None:
    s, a, b = warm_scorer()
    s.clock = lambda: 100.0  # the request has not waited in the gateway
    # A generous SLO: both meet it, the faster one has more headroom.
    sc = s.score(CycleState(), req(400, {"x-llm-d-slo-ttft-ms": "5000"}), [a, b])
    assert 0.5 < sc[b] < sc[a] <= 1.0
    # Only a meets 100 ms: b scores below 0.5.
    sc = s.score(CycleState(), req(400, {"x-llm-d-slo-ttft-ms": "100"}), [a, b])
    assert sc[a] > 0.5 > sc[b]
    # 1 ms is unattainable: a sheddable request is shed with 429 and Retry-After...
    with pytest.raises(GatewayError) as ei:
        s.score(CycleState(), req(400, {"x-llm-d-slo-ttft-ms": "1"}, priority=-1), [a, b])
    assert ei.value.status == 429 and ei.value.code == SLO_UNATTAINABLE and ei.value.retry_after == 1.0
    assert s.shed == 1
    # ...a standard one still goes to the endpoint closest to meeting it.
    sc = s.score(CycleState(), req(400, {"x-llm-d-slo-ttft-ms": "1"}), [a, b])
    assert sc[a] > sc[b]
    # Time already spent in the gateway counts against the budget.
    s.clock = lambda: 110.0
    with pytest.raises(GatewayError):
        s.score(CycleState(), req(400, {"x-llm-d-slo-ttft-ms": "5000"}, priority=-1), [a, b])
    s2, a2, b2 = warm_scorer(shed_unattainable=False)
    s2.clock = lambda: 100.0
    s2.score(CycleState(), req(400, {"x-llm-d-slo-ttft-ms": "1"}, priority=-1), [a2, b2])
    assert s2.shed == 0


def test_holds_need_a_margin_over_the_prediction_and_sheds_do_not() -> None:
    """A request whose best prediction uses most of its budget is held (predictions err; holding it
    keeps the capacity for requests that can still make theirs); shedding, which cannot be undone,
    needs the prediction itself to exceed the budget."""
    from ingate.errors import SloHold

    s, a, b = warm_scorer(hold_s=10.0)
    s.clock = lambda: 100.0
    predicted = {a: 1.5, b: 4.0}
    s.predictor.predict_ttft = lambda e, f: predicted[e]  # type: ignore[method-assign]
    hdr = {"x-llm-d-slo-ttft-ms": "2000"}
    with pytest.raises(SloHold) as hold:  # 1.5 s x holdMargin 1.5 > 2 s
        s.score(CycleState(), req(400, hdr), [a, b])
    assert hold.value.until == 110.0 and s.held == 1
    predicted[a] = 1.3  # 1.3 x 1.5 < 2: dispatched to the endpoint with the most headroom
    sc = s.score(CycleState(), req(400, hdr), [a, b])
    assert sc[a] > 0.5 > sc[b]
    # Sheddable: never held; shed only when even the prediction misses the budget.
    predicted[a] = 1.5
    sc = s.score(CycleState(), req(400, hdr, priority=-1), [a, b])
    assert sc[a] > 0.5 and s.shed == 0
    predicted[a] = 2.5
    with pytest.raises(GatewayError):
        s.score(CycleState(), req(400, hdr, priority=-1), [a, b])
    # holdMargin 1: held only when the prediction itself misses.
    s1, a1, b1 = warm_scorer(hold_s=10.0, hold_margin=1.0)
    s1.clock = lambda: 100.0
    s1.predictor.predict_ttft = lambda e, f: {a1: 1.5, b1: 4.0}[e]  # type: ignore[method-assign]
    assert s1.score(CycleState(), req(400, hdr), [a1, b1])[a1] > 0.5 and s1.held == 0
    with pytest.raises(ValueError):
        PredictedTTFTScorer(hold_margin=0)


def test_tpot_slo_counts_when_given() -> None:
    s, a, b = warm_scorer()
    s.clock = lambda: 100.0
    hdr = {"x-llm-d-slo-ttft-ms": "5000", "x-llm-d-slo-tpot-ms": "0.001"}
    sc = s.score(CycleState(), req(400, hdr), [a, b])
    assert max(sc.values()) < 0.5  # nobody makes 1 us per token


def test_non_streamed_and_failed_responses_train_nothing() -> None:
    a = ep(0)
    s = PredictedTTFTScorer()
    s.clock = lambda: 100.0
    body = {"model": "m", "prompt": "x" * 400, "max_tokens": 16}
    r = parse_request(COMPLETIONS, {}, orjson.dumps(body), now=100.0)
    for status, rq in ((200, r), (500, req(400)), (200, req(400))):
        ctx = CycleState()
        s.score(ctx, rq, [a])
        s.post_schedule(ctx, rq, SchedulingResult([a], "p"))
        s.post_response(ctx, rq, a, ResponseInfo(status, ttft_s=0.1, e2e_s=0.2, completion_tokens=16))
    assert s.predictor.samples() == 1  # the streamed success only


def test_slo_aware_profile_is_built_in_and_exports_prediction_metrics() -> None:
    assert "predicted-ttft" in plugins("scorer")
    eps = [ep(0), ep(1)]
    sched = build_scheduler(SchedulerConfig(), Datastore(eps))
    prof = sched.profiles["slo-aware"]
    scorer = next(s for s, _ in prof.scorers if isinstance(s, PredictedTTFTScorer))
    assert sched.profiles["default"].scorers[0][0].name == "prefix-cache"  # default unchanged
    rng = random.Random(7)
    for _ in range(120):
        serve(scorer, eps, {eps[0]: 1.0, eps[1]: 2.0}, rng)
    assert isinstance(scorer, ExposesMetrics)
    fams: dict[str, Metric] = {m.name: m for m in scorer.collect_metrics("slo-aware", eps)}
    hist = fams["ingate_latency_prediction_error_ratio"]
    count = [x for x in hist.samples if x.name.endswith("_count") and x.labels["kind"] == "ttft"]
    assert count and count[0].value == scorer.predictor.ttft_errors.n > 0
    q = {
        (x.labels["kind"], x.labels["quantile"])
        for x in fams["ingate_latency_prediction_error_ratio_quantile"].samples
    }
    assert ("ttft", "0.5") in q and ("ttft", "0.9") in q
    src = {x.labels["source"]: x.value for x in fams["ingate_latency_predictions"].samples}
    assert src["fallback"] == 50 and src["model"] == 70
    # Per endpoint: the errors of the predictions made for each replica, which add up to the pool's.
    per_ep = {
        (x.labels["endpoint"], x.labels["kind"]): x.value
        for x in fams["ingate_endpoint_latency_prediction_errors"].samples
    }
    ttft_n = [per_ep.get((e.address, "ttft"), 0) for e in eps]
    assert sum(ttft_n) == scorer.predictor.ttft_errors.n and all(n > 0 for n in ttft_n)
    quant = {
        (x.labels["endpoint"], x.labels["kind"], x.labels["quantile"])
        for x in fams["ingate_endpoint_latency_prediction_error_ratio_quantile"].samples
    }
    assert {(e.address, "ttft", q) for e in eps for q in ("0.5", "0.9")} <= quant


def test_per_endpoint_errors_tell_a_mispredicted_replica_apart_and_leave_with_it() -> None:
    """An operator reading the per-endpoint error quantiles sees which replica the model gets wrong;
    a replica that leaves the pool takes its windows with it (bounded state)."""
    eps = [ep(0), ep(1)]
    ds = Datastore(eps)
    s = PredictedTTFTScorer()
    s.attach(ds)
    # The same request on both: e0 always answers in 0.22 s, e1 swings between 0.3x and 3x that.
    for i in range(600):
        s.clock = lambda: 100.0
        r = req(2000)
        for target, y in ((eps[0], 0.22), (eps[1], 0.22 * (0.3 if i % 2 else 3.0))):
            ctx = CycleState()
            s.score(ctx, r, eps)
            s.post_schedule(ctx, r, SchedulingResult([target], "p"))
            s.clock = lambda y=y: 100.0 + y
            s.on_first_token(ctx, r, target)
            s.post_response(ctx, r, target, ResponseInfo(200, ttft_s=y, e2e_s=y + 0.1, completion_tokens=16))
            s.clock = lambda: 100.0

    def p90(e: Endpoint) -> float:
        fams = {m.name: m for m in s.collect_metrics("p", eps)}
        got = {
            x.labels["endpoint"]: x.value
            for x in fams["ingate_endpoint_latency_prediction_error_ratio_quantile"].samples
            if x.labels["kind"] == "ttft" and x.labels["quantile"] == "0.9"
        }
        return got[e.address]

    assert p90(eps[1]) > 0.6 and p90(eps[0]) < 0.2
    ds.remove(eps[1].address)
    fams = {m.name: m for m in s.collect_metrics("p", [eps[0]])}
    assert {x.labels["endpoint"] for x in fams["ingate_endpoint_latency_prediction_errors"].samples} == {
        eps[0].address
    }
    assert eps[1] not in s._ep_errors


async def test_bench_reads_the_prediction_errors_a_gateway_exports() -> None:
    """`ingate bench run` scrapes ingate_latency_prediction_error_ratio* from a gateway's /metrics
    (real HTTP on loopback) to print the latency model's error."""
    import asyncio

    from aiohttp import web
    from prometheus_client import CollectorRegistry, generate_latest

    from ingate.bench.runner import latency_model_errors, latency_model_errors_by_class
    from ingate.scheduling.plugins.registry import PluginMetricsCollector

    eps = [ep(0), ep(1)]
    ds = Datastore(eps)
    sched = build_scheduler(SchedulerConfig(), ds)
    scorer = next(s for s, _ in sched.profiles["slo-aware"].scorers if isinstance(s, PredictedTTFTScorer))
    rng = random.Random(8)
    for _ in range(120):
        serve(scorer, eps, {eps[0]: 1.0, eps[1]: 2.0}, rng)
    reg = CollectorRegistry()
    reg.register(PluginMetricsCollector(sched.plugins(), ds))
    body = generate_latest(reg)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/plain")

    async def garbage(_: web.Request) -> web.Response:
        return web.Response(text="<html>not metrics {{{</html>\n", content_type="text/html")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/peer/metrics", garbage)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        got = await asyncio.to_thread(latency_model_errors, f"http://127.0.0.1:{port}")
        by_class = await asyncio.to_thread(
            latency_model_errors_by_class,
            f"http://127.0.0.1:{port}",
            {eps[0].address: "fast", eps[1].address: "slow", "127.0.0.1:1": "gone"},
        )
        # A peer router's page that is not Prometheus text, or none at all: nothing, no error.
        assert await asyncio.to_thread(latency_model_errors, f"http://127.0.0.1:{port}/peer") == {}
        assert await asyncio.to_thread(latency_model_errors, f"http://127.0.0.1:{port}/none") == {}
    finally:
        await runner.cleanup()
    win = scorer.predictor.ttft_errors
    assert got["slo-aware/ttft"]["n"] == win.n > 0
    # By accelerator class (what the report prints for a mixed fleet): e0 and e1 are one class each.
    assert by_class["slo-aware/ttft"].keys() == {"fast", "slow"}
    fast = scorer._ep_errors[eps[0]][0]
    assert by_class["slo-aware/ttft"]["fast"]["n"] == fast.n > 0
    assert by_class["slo-aware/ttft"]["fast"]["0.9"] == round(fast.quantile(0.9) or -1, 4)
    assert by_class["slo-aware/ttft"]["fast"]["endpoints"] == 1
    assert sum(c["n"] for c in by_class["slo-aware/ttft"].values()) == win.n
    assert got["slo-aware/ttft"]["0.5"] == round(win.quantile(0.5) or -1, 4)
    assert "default/ttft" not in got  # the default profile has no latency model
    assert await asyncio.to_thread(latency_model_errors, "http://127.0.0.1:1") == {}


def _slo_director(hold_s: float) -> tuple[Any, PredictedTTFTScorer, list[Endpoint]]:
    from ingate.config import parse_config
    from ingate.director import Director
    from ingate.telemetry import Telemetry

    cfg = parse_config(
        {
            "pool": {"endpoints": [{"address": "127.0.0.1:9001"}, {"address": "127.0.0.1:9002"}]},
            "objectives": [{"name": "batch", "priority": -1, "slo": {"ttftMs": 1}}],
            "scheduler": {
                "defaultProfile": "slo",
                "profiles": {
                    "slo": {
                        "scorers": [
                            {
                                "type": "predicted-ttft",
                                "parameters": {"warmup": 30, "holdS": hold_s, "holdPollS": 0.02},
                            }
                        ]
                    }
                },
            },
        }
    )
    ds = Datastore([Endpoint(name=f"e{i}", host="127.0.0.1", port=9001 + i) for i in range(2)])
    d = Director(cfg, ds, build_scheduler(cfg.scheduler, ds), Telemetry(ds, "p"), rng=random.Random(1))
    scorer = d.scheduler.profiles["slo"].scorers[0][0]
    assert isinstance(scorer, PredictedTTFTScorer)
    eps = ds.endpoints()
    rng = random.Random(9)
    backlog: list[tuple[CycleState, InferenceRequest, Endpoint, float]] = []
    for _ in range(400):
        serve(scorer, eps, {eps[0]: 1.0, eps[1]: 10.0}, rng, backlog)
    while backlog:
        c, rq, t, y = backlog.pop()
        scorer.post_response(c, rq, t, ResponseInfo(200, None, 16, 0, ttft_s=y, e2e_s=y + 0.15))
    scorer.clock = time.monotonic  # as in production: the requests' arrival clock
    return d, scorer, eps


def _slo_body() -> bytes:
    return orjson.dumps({"model": "m", "prompt": "abcd" * 100, "max_tokens": 16, "stream": True})


async def test_director_holds_a_request_until_an_endpoint_is_predicted_to_meet_its_slo() -> None:
    import asyncio

    d, scorer, (fast, slow) = _slo_director(hold_s=2.0)
    # Long prefills queued on both endpoints: ~0.8 s predicted on the fast one, ~8 s on the slow one.
    big = req(32_000)
    ctx = CycleState()
    scorer.post_schedule(ctx, big, SchedulingResult([fast], "slo"))
    scorer.post_schedule(CycleState(), req(32_000), SchedulingResult([slow], "slo"))
    hdr = {"x-llm-d-slo-ttft-ms": "500"}
    task = asyncio.create_task(d.handle("/v1/completions", hdr, _slo_body()))
    await asyncio.sleep(0.15)
    assert not task.done() and scorer.held > 0  # held: nobody meets 100 ms now
    scorer.on_first_token(ctx, big, fast)  # the prefill ahead is done
    t0 = time.monotonic()
    dec = await asyncio.wait_for(task, 1.0)
    # Dispatched at the next poll (its remaining budget, ~0.35 s, fits the fast endpoint's ~0.03 s),
    # long before the 2 s hold ends.
    assert time.monotonic() - t0 < 0.5
    assert dec.target is fast
    d.finish(dec, ResponseInfo(200))


async def test_held_request_is_dispatched_when_its_hold_ends_and_sheddable_ones_are_shed() -> None:
    d, scorer, (fast, _slow) = _slo_director(hold_s=0.2)
    t0 = time.monotonic()
    dec = await d.handle("/v1/completions", {"x-llm-d-slo-ttft-ms": "1"}, _slo_body())
    assert 0.15 <= time.monotonic() - t0 < 1.0  # waited out its hold, then went to the best endpoint
    assert dec.target is fast and scorer.held > 0
    d.finish(dec, ResponseInfo(200))
    # Without hold (holdS 0) the same request is dispatched at once.
    d0, scorer0, (fast0, _) = _slo_director(hold_s=0.0)
    t0 = time.monotonic()
    dec0 = await d0.handle("/v1/completions", {"x-llm-d-slo-ttft-ms": "1"}, _slo_body())
    assert time.monotonic() - t0 < 0.1 and dec0.target is fast0 and scorer0.held == 0
    # A sheddable request (objective priority < 0, its SLO from the objective) is never held: 429.
    with pytest.raises(GatewayError) as ei:
        await d.handle("/v1/completions", {"x-llm-d-inference-objective": "batch"}, _slo_body())
    assert ei.value.status == 429 and ei.value.code == SLO_UNATTAINABLE
    assert ei.value.headers()["retry-after"] == "1"
    assert ei.value.headers()["x-llm-d-request-dropped-reason"] == SLO_UNATTAINABLE
    assert fast.in_flight == 0  # the shed request took nothing


def test_a_slower_replica_gets_its_own_model_within_a_few_dozen_outcomes() -> None:
    """The own-vs-pooled blend follows which model has predicted the endpoint better: a replica three
    times slower than the rest moves to its own coefficients quickly; an endpoint with no scored
    outcome gets the pool's prediction."""
    rng = random.Random(11)
    p = LatencyPredictor()
    slow = [3 * c for c in FAST]
    for i in range(600):
        name = "slow" if i % 10 == 0 else f"fast{i % 3}"  # the slow one gets 1 in 10 outcomes
        f = feats(rng)
        p.observe(name, f, true_ttft(slow if name == "slow" else FAST, f), None)
    assert p.samples("slow") == 60
    errs = rel_errors(p, {"slow": slow}, rng)
    pooled = sorted(
        abs(p._pooled.ttft.predict(f.ttft()) - true_ttft(slow, f)) / true_ttft(slow, f)
        for f in (feats(rng) for _ in range(200))
    )
    assert errs[len(errs) // 2] < 0.25 and pooled[len(pooled) // 2] > 0.5
    f = feats(rng)
    assert p.predict_ttft("never-seen", f) == p._pooled.ttft.predict(f.ttft())


def test_ttft_is_learned_at_the_first_token_not_at_the_end_of_the_response() -> None:
    a = ep(0)
    s = PredictedTTFTScorer()
    s.clock = lambda: 100.0
    r = req(400)
    ctx = CycleState()
    s.score(ctx, r, [a])
    s.post_schedule(ctx, r, SchedulingResult([a], "p"))
    s.clock = lambda: 100.25  # first token 0.25 s after dispatch
    s.on_first_token(ctx, r, a)
    assert s.predictor.samples() == 1  # known now: decisions from here on use it
    s.clock = lambda: 103.0
    s.post_response(ctx, r, a, ResponseInfo(200, ttft_s=0.25, e2e_s=3.0, completion_tokens=16))
    assert s.predictor.samples() == 1  # not learned twice
    assert s.predictor._pooled.tpot.n == 1  # the TPOT at the end


def test_step_timing_reads_the_engine_step_from_bursts_of_streamed_chunks() -> None:
    """The data plane times every streamed chunk on its endpoint; a step's tokens arrive as one burst,
    so the time between bursts is the engine's step and the time since the last burst its phase."""
    timing = StepTiming()
    assert timing.since(5.0) == 0.0  # never streamed: no phase known, the feature is neutral
    t = 100.0
    for _ in range(40):  # 40 steps of 100 ms, each a burst of 8 chunks 0.3 ms apart
        for k in range(8):
            timing.chunk(t + 0.0003 * k)
        t += 0.1
    assert abs(timing.step_s - 0.1) < 0.005
    last = timing.last_chunk_at
    assert abs(timing.since(last + 0.03) - 0.03) < 1e-9
    assert timing.since(last + 5.0) == pytest.approx(2 * timing.step_s)  # idle: capped at two steps
    assert timing.since(last - 1.0) == 0.0  # a clock read before the chunk (another task's): no phase
    # An idle engine between two bursts is not a step; a burst split by a late chunk moves the
    # estimate by at most 5%.
    step = timing.step_s
    timing.chunk(last + 5.0)
    assert timing.step_s == step
    timing.chunk(last + 5.1)
    timing.chunk(last + 5.106)
    assert timing.step_s >= 0.95 * step


async def test_the_builtin_proxy_times_each_endpoints_streamed_chunks() -> None:
    """Real HTTP on loopback: chunks 50 ms apart through the built-in proxy set the endpoint's step
    (streamed requests only: a non-streamed answer's chunks are one body, not steps)."""
    import asyncio

    import aiohttp
    from aiohttp import web
    from loopback_http import start_app

    from ingate.config import parse_config
    from ingate.dataplane.proxy import BuiltinProxy
    from ingate.gateway import Gateway

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(8):
            await resp.write(b'data: {"choices":[{"text":"a"}]}\n\n')
            await asyncio.sleep(0.05)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", sse)
    runner, port = await start_app(app)
    cfg = parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "pool": {"endpoints": [{"address": f"127.0.0.1:{port}"}]},
            "models": {"served": ["m"]},
            "dataplane": {"type": "builtin"},
        }
    )
    gw = Gateway(cfg)
    proxy = BuiltinProxy.serving(gw)
    await proxy.start()
    try:
        steps = gw.datastore.endpoints()[0].steps
        async with aiohttp.ClientSession() as s:
            body = {"model": "m", "prompt": "hi", "max_tokens": 8, "stream": False}
            async with s.post(proxy.url + "/v1/completions", json=body) as r:
                assert r.status == 200
                await r.read()
            assert steps.last_chunk_at == 0  # a request that did not ask to stream times no steps
            async with s.post(proxy.url + "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status == 200
                await r.read()
        assert steps.last_chunk_at > 0
        assert 0.03 < steps.step_s < 0.2  # 50 ms between chunks, on a shared loaded machine
    finally:
        await proxy.stop()
        await runner.cleanup()


def test_the_model_learns_to_wait_out_the_step_in_progress() -> None:
    """Two equal replicas in steps of 200 ms: a request waits for the step in progress, then 50 ms of
    its own. Learned from outcomes, the model predicts that wait from the step phase the data plane
    saw, and the scorer sends a request to the replica whose step is about to end."""
    rng = random.Random(5)
    a, b = ep(0), ep(1)
    s = PredictedTTFTScorer(warmup=30)
    now = 100.0
    s.clock = lambda: now
    for e in (a, b):
        e.steps.step_s = 0.2
    for _ in range(300):
        phase = {a: rng.uniform(0, 0.2), b: rng.uniform(0, 0.2)}
        for e in (a, b):
            e.steps.last_chunk_at = now - phase[e]
        r = req(400)
        ctx = CycleState()
        s.score(ctx, r, [a, b])
        target = rng.choice([a, b])
        s.post_schedule(ctx, r, SchedulingResult([target], "p"))
        y = 0.05 + (0.2 - phase[target]) * rng.uniform(0.95, 1.05)
        s._learn_ttft(ctx[s._pred_key], target, y)
        s.load(target).pending_prefill = 0  # nothing queued: only the step phase differs
        s.load(target).requests = 0
    a.steps.last_chunk_at = now - 0.19  # a's step is about to end; b's has just begun
    b.steps.last_chunk_at = now - 0.01
    r = req(400)
    ctx = CycleState()
    scores = s.score(ctx, r, [a, b])
    assert scores[a] > scores[b]
    fa = s.features(a, 100, 0, 16, now)
    fb = s.features(b, 100, 0, 16, now)
    assert s.predictor.predict_ttft(a, fa) == pytest.approx(0.06, rel=0.3)
    assert s.predictor.predict_ttft(b, fb) == pytest.approx(0.24, rel=0.2)


def test_bench_pools_the_prediction_errors_of_several_streams() -> None:
    """Each stream of `ingate bench run --streams N` runs its own gateway and model: the report pools
    their windows (quantiles weighted by window size) instead of keeping only the last stream's."""
    from ingate.bench.runner import pool_prediction_errors

    a = {"p/ttft": {"0.5": 0.10, "0.9": 0.40, "n": 1000.0}, "p/tpot": {"0.5": 0.2, "n": 500.0}}
    b = {"p/ttft": {"0.5": 0.20, "0.9": 0.70, "n": 5000.0}}  # its window holds the last 2,000
    got = pool_prediction_errors([a, b])
    assert got["p/ttft"]["n"] == 6000 and got["p/ttft"]["streams"] == 2
    assert got["p/ttft"]["0.5"] == pytest.approx((0.1 * 1000 + 0.2 * 2000) / 3000, abs=1e-4)
    assert got["p/ttft"]["0.9"] == pytest.approx((0.4 * 1000 + 0.7 * 2000) / 3000, abs=1e-4)
    assert got["p/tpot"] == {"n": 500.0, "streams": 1.0, "0.5": 0.2}


def test_bench_report_prints_the_prediction_error_by_accelerator_class(tmp_path: Path) -> None:
    """On a mixed fleet the report breaks the latency model's error down by simulator profile, pooled
    over the streams' per-endpoint windows."""
    from rich.console import Console

    from ingate.bench.cli import _print_prediction_errors
    from ingate.bench.runner import pool_prediction_errors

    s0 = {"l4": {"0.5": 0.2, "0.9": 0.6, "n": 800.0, "window": 800.0, "endpoints": 2.0}}
    s1 = {"l4": {"0.5": 0.4, "0.9": 0.8, "n": 900.0, "window": 400.0, "endpoints": 2.0}}
    pooled = pool_prediction_errors([s0, s1])
    assert pooled["l4"]["0.9"] == pytest.approx((0.6 * 800 + 0.8 * 400) / 1200, abs=1e-4)
    assert pooled["l4"]["window"] == 1200 and pooled["l4"]["endpoints"] == 2
    info = {
        "latency_prediction_error": {"slo-aware/ttft": {"0.5": 0.15, "0.9": 0.5, "n": 3000.0}},
        "latency_prediction_error_by_class": {
            "slo-aware/ttft": {
                "l4": pooled["l4"],
                "h100": {"0.5": 0.1, "0.9": 0.3, "n": 900.0, "window": 900.0},
            }
        },
    }
    path = tmp_path / "r.json"
    path.write_bytes(orjson.dumps({"systems": [{"name": "ingate:slo-aware", "info": info}]}))
    console = Console(record=True, width=200)
    _print_prediction_errors(path, console)
    text = console.export_text()
    assert "median 15%, p90 50%" in text
    assert (
        "on h100" in text
        and "on l4 (2 endpoint(s) per stream, last 1200 predictions): median 27%, p90 67%" in text
    )


@settings(max_examples=200, deadline=None)
@given(
    period=st.floats(0.01, 0.5),
    jitter=st.floats(0.0, 0.3),
    chunks=st.integers(1, 32),
    noise=st.lists(st.floats(0.0, 1.0), min_size=80, max_size=80),
)
def test_step_timing_finds_the_step_under_jitter_and_stays_bounded(
    period: float, jitter: float, chunks: int, noise: list[float]
) -> None:
    """Whatever the step (10-500 ms), its jitter (up to +-30%) and the streams per step, the estimate
    settles near the mean step, never exceeds the longest gap between bursts, and the phase it
    reports stays within [0, 2 steps]: the runaway growth a scale-free burst test once had cannot
    come back."""
    s = StepTiming()
    t = 50.0
    gaps = []
    for u in noise:
        for k in range(chunks):  # one step's tokens, 0.1 ms apart
            s.chunk(t + 0.0001 * k)
        gap = period * (1 + jitter * (2 * u - 1))
        gaps.append(gap)
        t += gap
    assert 0 < s.step_s <= max(gaps) + 0.0001 * chunks
    assert abs(s.step_s - period) <= 0.35 * period
    for dt in (0.0, 0.5 * period, 10 * period):
        assert 0.0 <= s.since(s.last_chunk_at + dt) <= 2 * s.step_s


def _occupy(
    s: PredictedTTFTScorer, e: Endpoint, n: int, chars: int, max_tokens: int, first_token_at: float
) -> list[tuple[CycleState, InferenceRequest]]:
    """Route `n` requests to `e` that got their first token at `first_token_at` (scorer clock)."""
    held = []
    for _ in range(n):
        body = {"model": "m", "prompt": "abcd" * (chars // 4), "max_tokens": max_tokens, "stream": True}
        r = parse_request(COMPLETIONS, {}, orjson.dumps(body), now=100.0)
        ctx = CycleState()
        s.clock = lambda: first_token_at - 0.1
        s.post_schedule(ctx, r, SchedulingResult([e], "p"))
        s.clock = lambda: first_token_at
        s.on_first_token(ctx, r, e)
        held.append((ctx, r))
    return held


def test_kv_wait_is_the_time_until_decoding_requests_free_room_for_the_prompt() -> None:
    """Two replicas with full KV caches (12,800 tokens each, 100 ms steps): on `a` the requests are
    near their max_tokens, on `b` they have just begun. A 4,000-token prompt waits for room: about
    the time the first of `a`'s requests need to finish, far longer on `b`; a short prompt that fits
    waits for nothing."""
    a, b = ep(0), ep(1)
    s = PredictedTTFTScorer()
    for e in (a, b):
        e.steps.step_s = 0.1
    now = 200.0
    # 5 requests of 2,000 prompt tokens and max_tokens 200 per replica: a holds 5 x 2,190 tokens
    # (190 of 200 decoded: 1 s left), b 5 x 2,010 (10 decoded: 19 s left).
    held_a = _occupy(s, a, 5, 8000, 200, first_token_at=now - 19.0)
    _occupy(s, b, 5, 8000, 200, first_token_at=now - 1.0)
    s.clock = lambda: now
    fa, fb = s.features(a, 4000, 0, 16, now), s.features(b, 4000, 0, 16, now)
    assert fa.kv_wait == pytest.approx(1.0, abs=0.01)
    assert fb.kv_wait == pytest.approx(19.0, abs=0.01)
    assert s.features(a, 100, 0, 16, now).kv_wait == 0.0  # 100 tokens fit in the 1,850 free
    # A scraped usage above the gateway's own accounting (other clients) counts too.
    a.metrics.kv_usage = 1.0
    assert s.features(a, 100, 0, 16, now).kv_wait > 0.0
    # Ended requests give their room back and leave no trace.
    for ctx, r in held_a:
        s.post_response(ctx, r, a, ResponseInfo(200, ttft_s=0.1, e2e_s=19.0, completion_tokens=200))
    a.metrics.kv_usage = 0.0
    assert s.features(a, 4000, 0, 16, now).kv_wait == 0.0
    occ = s._occupants[a]
    assert not occ.members and occ.prompts == occ.decoding == occ.decoding_output == 0


def test_kv_wait_without_step_timing_or_requests_is_zero() -> None:
    a = ep(0)
    s = PredictedTTFTScorer()
    assert s.features(a, 20000, 0, 16, 100.0).kv_wait == 0.0  # nothing in flight, nothing streamed
    _occupy(s, a, 5, 8000, 200, first_token_at=99.0)
    assert a.steps.step_s == 0.0
    assert s.features(a, 4000, 0, 16, 100.0).kv_wait == 0.0  # no step seen: no estimate


def test_a_long_prompt_goes_where_kv_room_frees_first() -> None:
    """Once the model has learned that prompts wait for KV room (TTFT = 50 ms + the wait), a long prompt
    goes to the replica whose decoding requests end soonest, though both caches are equally full."""
    rng = random.Random(9)
    a, b = ep(0), ep(1)
    s = PredictedTTFTScorer(warmup=30)
    for _ in range(400):
        e = rng.choice([a, b])
        w = rng.choice([0.0, rng.uniform(0.0, 20.0)])
        f = Features(
            new_tokens=rng.uniform(100, 4000),
            pending_prefill=0.0,
            waiting=0.0,
            running=rng.randint(0, 8),
            kv_utilisation=rng.random(),
            kv_shortfall=0.0,
            decoding=0.0,
            since_step=0.0,
            kv_wait=w,
        )
        s.predictor.observe(e, f, 0.05 + w, None)
    now = 200.0
    for e in (a, b):
        e.steps.step_s = 0.1
        e.steps.last_chunk_at = now
    _occupy(s, a, 5, 8000, 200, first_token_at=now - 19.0)  # ends in 1 s
    _occupy(s, b, 5, 8000, 200, first_token_at=now - 1.0)  # ends in 19 s
    s.clock = lambda: now
    assert s.predictor.warm
    long_scores = s.score(CycleState(), req(16000), [a, b])
    assert long_scores[a] > 2 * long_scores[b]
    short_scores = s.score(CycleState(), req(400), [a, b])  # fits on both: nothing to tell them apart
    assert short_scores[a] == pytest.approx(short_scores[b], rel=0.05)


def test_kv_wait_can_be_turned_off_per_profile() -> None:
    cfg = SchedulerConfig.model_validate(
        {
            "profiles": {
                "big-pool": {
                    "scorers": [{"type": "predicted-ttft", "parameters": {"kvWait": False}}],
                }
            }
        }
    )
    sched = build_scheduler(cfg, Datastore([ep(0)]))
    s = next(sc for sc, _ in sched.profiles["big-pool"].scorers if isinstance(sc, PredictedTTFTScorer))
    assert s.kv_wait is False
    a = ep(1)
    a.steps.step_s = 0.1
    _occupy(s, a, 5, 8000, 200, first_token_at=199.0)
    a.metrics.kv_usage = 1.0
    assert s.features(a, 4000, 0, 16, 200.0).kv_wait == 0.0


def _kv_wait_by_definition(
    members: list[tuple[int, int, float]], used: float, new: int, cap: int, now: float, step: float
) -> float:
    """The KV-wait estimate as the docstring defines it, per request: (prompt, max_tokens, first token
    time or 0) of each request in flight."""
    held = 0.0
    ends = []
    for prompt, out, first in members:
        done = min((now - first) / step, out) if first else 0.0
        held += prompt + done
        ends.append(((out - done) * step, prompt + out))
    shortfall = max(held, used) + new - cap
    if shortfall <= 0:
        return 0.0
    freed = 0
    for r, kv in sorted(ends):
        freed += kv
        if freed >= shortfall:
            return min(r, 30.0)
    return min(max(r for r, _ in ends), 30.0)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 4000), st.integers(1, 600), st.booleans(), st.floats(0.0, 80.0)),
        min_size=1,
        max_size=40,
    ),
    st.floats(0.0, 1.0),
    st.integers(1, 20000),
    st.sampled_from([0.02, 0.1, 0.25]),
)
def test_kv_wait_matches_its_definition(
    reqs: list[tuple[int, int, bool, float]], usage: float, new: int, step: float
) -> None:
    """The scorer's incremental estimate (running sums, a cached order of end times) equals the
    per-request definition, as requests start decoding and end in any order."""
    s = PredictedTTFTScorer()
    a = ep(0)
    a.steps.step_s = step
    a.metrics.kv_usage = usage
    now = 100.0
    held: list[tuple[CycleState, InferenceRequest, list[int | float]]] = []
    for prompt, out, decoding, age in reqs:
        body = {"model": "m", "prompt": "abcd" * prompt, "max_tokens": out, "stream": True}
        r = parse_request(COMPLETIONS, {}, orjson.dumps(body), now=now)
        ctx = CycleState()
        s.clock = lambda: now
        s.post_schedule(ctx, r, SchedulingResult([a], "p"))
        rec: list[int | float] = [prompt, out, 0.0]
        if decoding:
            s.clock = lambda age=age: now - age
            s.on_first_token(ctx, r, a)
            rec[2] = now - age
        held.append((ctx, r, rec))
    for k in range(len(held) + 1):
        members = [(int(p), int(o), float(f)) for _, _, (p, o, f) in held[k:]]
        got = s.features(a, new, 0, 16, now).kv_wait
        want = _kv_wait_by_definition(members, usage * 12800, new, 12800, now, step) if members else 0.0
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
        if k < len(held):  # the next one ends
            ctx, r, _ = held[k]
            s.post_response(ctx, r, a, ResponseInfo(200, ttft_s=0.1, e2e_s=1.0, completion_tokens=1))


def test_a_request_keeps_only_its_targets_prediction_not_every_candidates_features() -> None:
    """The cycle state lives as long as the request: the features scored for every candidate are
    dropped once the target's are recorded (with 256 endpoints they would be 256 objects a request)."""
    s, a, b = warm_scorer()
    s.clock = lambda: 100.0
    r = req(400)
    ctx = CycleState()
    s.score(ctx, r, [a, b])
    assert any(k.startswith("slo.features.") for k in ctx)
    s.post_schedule(ctx, r, SchedulingResult([a], "p"))
    assert not any(k.startswith("slo.features.") for k in ctx)
    assert ctx[s._pred_key].features.new_tokens == 100


def test_responses_that_end_after_their_endpoint_left_recreate_no_state_for_it() -> None:
    """A pod removed mid-request (rollout, scale-down): its requests still finish and teach the pooled
    model, but nothing per endpoint comes back for it (that state would never be freed again)."""
    eps = [ep(0), ep(1)]
    ds = Datastore(eps)
    s = PredictedTTFTScorer()
    s.attach(ds)
    rng = random.Random(5)
    for _ in range(80):  # warm
        serve(s, eps, {eps[0]: 1.0, eps[1]: 1.0}, rng)
    s.clock = lambda: 100.0
    r = req(2000)
    ctx = CycleState()
    s.score(ctx, r, eps)
    s.post_schedule(ctx, r, SchedulingResult([eps[1]], "p"))
    assert s.load(eps[1]).requests == 1
    ds.remove(eps[1].address)
    pooled = s.predictor.samples()
    s.clock = lambda: 100.3
    s.on_first_token(ctx, r, eps[1])
    s.post_response(ctx, r, eps[1], ResponseInfo(200, ttft_s=0.3, e2e_s=0.9, completion_tokens=16))
    assert s.predictor.samples() == pooled + 1  # the pooled model learned it
    assert s.predictor.samples(eps[1]) == 0 and s.predictor.endpoints() == 1
    assert eps[1] not in s._ep_errors and eps[1] not in s._loads and eps[1] not in s._occupants
    assert s.predictor.ttft_errors.n > 0  # the pool-wide error window still counts the prediction
