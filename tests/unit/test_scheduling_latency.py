"""Predicted-latency and size-band scorers on crafted endpoint states (deterministic)."""

from __future__ import annotations

import random

import orjson
import pytest

from ingate.datastore import Datastore, Endpoint, EndpointMetrics
from ingate.lifecycle import CycleState, ResponseInfo, SchedulingResult
from ingate.request import COMPLETIONS, InferenceRequest, parse_request
from ingate.scheduling.config import PluginSpec, ProfileConfig, SchedulerConfig
from ingate.scheduling.framework import PREFIX_MATCH_KEY
from ingate.scheduling.plugins.latency import PredictedLatencyScorer
from ingate.scheduling.plugins.sizeband import SizeBandScorer
from ingate.scheduling.scheduler import build_scheduler

BLOCKS = 800  # x 16 tokens = 12,800 tokens of KV cache per endpoint, as in the benchmarks


def ep(i: int, **m: object) -> Endpoint:
    e = Endpoint(name=f"e{i}", host="127.0.0.1", port=9000 + i)
    e.metrics = EndpointMetrics(block_size=16, num_gpu_blocks=BLOCKS, **m)  # type: ignore[arg-type]
    return e


def req(chars: int, max_tokens: int = 32, prefix: str = "") -> InferenceRequest:
    """A completion request whose prompt is `chars` characters long (4 characters per token)."""
    prompt = (prefix + "abcd" * (chars // 4 + 1))[:chars]
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens}
    r = parse_request(COMPLETIONS, {}, orjson.dumps(body))
    r.target_model = "m"
    return r


def schedule_to(s: PredictedLatencyScorer, r: InferenceRequest, target: Endpoint) -> CycleState:
    ctx = CycleState()
    s.score(ctx, r, [target])
    s.post_schedule(ctx, r, SchedulingResult([target], "p"))
    return ctx


def test_pending_prefill_steers_away_until_first_token() -> None:
    a, b = ep(0), ep(1)
    s = PredictedLatencyScorer()
    long_ctx = schedule_to(s, req(24_000), a)  # 6,000 tokens of prefill now queued on a
    short = req(400)
    sc = s.score(CycleState(), short, [a, b])
    assert sc[b] > sc[a]
    assert s.cost(a, 100, 0, 32) - s.cost(b, 100, 0, 32) == 6_000
    s.on_first_token(long_ctx, req(24_000), a)  # prefill done: only its KV stays charged
    assert s.cost(a, 100, 0, 32) == s.cost(b, 100, 0, 32)
    s.on_first_token(long_ctx, req(24_000), a)  # idempotent
    assert s.load(a).pending_prefill == 0


def test_kv_shortfall_counts_only_for_requests_that_do_not_fit() -> None:
    full, roomy = ep(0, kv_usage=0.9), ep(1, kv_usage=0.5)  # 1,280 vs 6,400 tokens free
    s = PredictedLatencyScorer(kv_weight=2.0)
    small = req(400, max_tokens=32)  # 100 + 32 tokens: fits on both
    sc = s.score(CycleState(), small, [full, roomy])
    assert sc[full] == sc[roomy]
    big = req(16_000, max_tokens=32)  # 4,000 + 32 tokens: 2,752 short on `full`
    assert s.cost(full, 4_000, 0, 32) - s.cost(roomy, 4_000, 0, 32) == pytest.approx(2.0 * 2_752)
    sc = s.score(CycleState(), big, [full, roomy])
    assert sc[roomy] > sc[full]


def test_gateway_kv_demand_counts_before_the_scrape_shows_it() -> None:
    a, b = ep(0), ep(1)  # both scraped empty
    s = PredictedLatencyScorer()
    ctx = schedule_to(s, req(40_000, max_tokens=256), a)  # 10,000 + 256 tokens in flight on a
    s.on_first_token(ctx, req(40_000), a)
    assert s.cost(a, 4_000, 0, 32) > s.cost(b, 4_000, 0, 32)  # 14,288 > 12,800 on a
    s.post_response(ctx, req(40_000), a, ResponseInfo(status=200))
    assert s.load(a).kv_demand == 0
    assert s.cost(a, 4_000, 0, 32) == s.cost(b, 4_000, 0, 32)


def test_prefix_hit_lowers_cost_and_kv_need() -> None:
    a, b = ep(0), ep(1)
    s = PredictedLatencyScorer()
    r = req(12_000)  # 3,000 tokens
    ctx = CycleState({PREFIX_MATCH_KEY: {a: 10_000}})  # 2,500 tokens of it cached on a
    sc = s.score(ctx, r, [a, b])
    assert sc[a] > sc[b]
    s.post_schedule(ctx, r, SchedulingResult([a], "p"))
    assert s.load(a).pending_prefill == 500
    assert s.load(a).kv_demand == 500 + 32  # shared blocks are not charged again


def test_foreign_queue_counts_and_learns_chars_per_token() -> None:
    a, b = ep(0, waiting=3), ep(1)
    s = PredictedLatencyScorer(queued_request_tokens=512)
    assert s.cost(a, 100, 0, 32) - s.cost(b, 100, 0, 32) == 3 * 512
    r = req(600)
    ctx = schedule_to(s, r, a)
    assert s.load(a).requests == 1
    assert s.cost(a, 100, 0, 32) - s.cost(b, 100, 0, 32) == 2 * 512 + 150  # ours is one of the 3
    for _ in range(200):
        s.post_response(CycleState(), r, a, ResponseInfo(status=200, prompt_tokens=100))  # 6 chars/token
    assert s.chars_per_token == pytest.approx(6.0, abs=0.01)
    s.post_response(ctx, r, a, ResponseInfo(status=200))
    assert (s.load(a).pending_prefill, s.load(a).kv_demand, s.load(a).requests) == (0, 0, 0)


def test_bad_parameters_are_rejected() -> None:
    with pytest.raises(ValueError):
        PredictedLatencyScorer(scale=0)
    with pytest.raises(ValueError):
        PredictedLatencyScorer(kv_weight=-1)
    with pytest.raises(ValueError):
        SizeBandScorer(long_fraction=1.0)
    with pytest.raises(ValueError):
        SizeBandScorer(min_spread=0.5)


def test_scheduler_releases_charges_through_its_hooks_once_per_profile() -> None:
    """Two profiles with their own scorer: each releases only what it charged itself."""
    eps = [ep(i) for i in range(2)]
    ds = Datastore(eps)
    pl = ProfileConfig(scorers=[PluginSpec(type="predicted-latency")])
    sched = build_scheduler(SchedulerConfig(profiles={"a": pl, "b": pl}), ds)
    sa = sched.profiles["a"].scorers[0][0]
    sb = sched.profiles["b"].scorers[0][0]
    assert isinstance(sa, PredictedLatencyScorer) and isinstance(sb, PredictedLatencyScorer)
    r = req(8_000)
    res, ctx = sched.schedule(r, profile="a")
    hooks = sched.hooks(res.profile)
    hooks.run_post_schedule(ctx, r, res)
    assert sa.load(res.target).pending_prefill == 2_000 and sb.load(res.target).pending_prefill == 0
    hooks.run_first_token(ctx, r, res.target)
    hooks.run_post_response(ctx, r, res.target, ResponseInfo(status=200))
    for s in (sa, sb):
        ld = s.load(res.target)
        assert (ld.pending_prefill, ld.kv_demand, ld.requests) == (0, 0, 0)


def heavy_tailed_sizes(n: int, seed: int = 3) -> list[int]:
    rng = random.Random(seed)
    return [min(24_000, max(64, int(rng.lognormvariate(7.4, 1.0)))) for _ in range(n)]


def test_size_band_is_neutral_until_enough_samples() -> None:
    eps = [ep(i) for i in range(4)]
    s = SizeBandScorer(min_samples=50)
    for size in heavy_tailed_sizes(49):
        assert set(s.score(CycleState(), req(size), eps).values()) == {1.0}
    assert s.cutoff is None


def test_size_band_separates_long_and_short_prompts() -> None:
    eps = [ep(i) for i in range(4)]
    ds = Datastore(eps)
    s = SizeBandScorer(long_fraction=0.25, token_share=0.5, refresh=1)
    s.attach(ds)
    sizes = heavy_tailed_sizes(600)
    for size in sizes:
        s.observe(size)
    cutoff = s.cutoff
    assert cutoff is not None
    ordered = sorted(sizes)
    assert sum(x for x in ordered if x >= cutoff) >= 0.5 * sum(ordered)  # long ones carry half
    assert sum(1 for x in ordered if x >= cutoff) < 0.25 * len(ordered)  # ... and are few
    long_sc = s.score(CycleState(), req(int(cutoff) + 100), eps)
    short_sc = s.score(CycleState(), req(200), eps)
    assert [long_sc[e] for e in eps] == [0.0, 0.0, 0.0, 1.0]  # the last endpoint by address
    assert [short_sc[e] for e in eps] == [1.0, 1.0, 1.0, 0.0]
    assert s.long_band(eps[:2]) == {eps[3]}  # bands follow the whole pool, not the candidates


def test_size_band_leaves_similar_lengths_alone_and_uses_prefix_hits() -> None:
    eps = [ep(i) for i in range(4)]
    s = SizeBandScorer(refresh=1)
    rng = random.Random(5)
    for _ in range(300):
        s.observe(int(rng.gauss(1200, 240)))  # one shared shape: no heavy tail
    assert s.cutoff is None
    assert set(s.score(CycleState(), req(5_000), eps).values()) == {1.0}
    ctx = CycleState({PREFIX_MATCH_KEY: {eps[1]: 12_000, eps[2]: 4_000}})
    assert s.size(ctx, req(13_000)) == 1_000  # uncached part after the best match
