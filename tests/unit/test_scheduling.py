"""Scheduling plugins on crafted endpoint states, and the profile mechanics."""

from __future__ import annotations

import random
from collections import Counter

import orjson
import pytest

from ingate.datastore import Datastore, Endpoint, EndpointMetrics
from ingate.errors import GatewayError
from ingate.lifecycle import CycleState, ResponseInfo, SchedulingResult
from ingate.request import COMPLETIONS, InferenceRequest, parse_request
from ingate.scheduling.config import PluginSpec, ProfileConfig, SchedulerConfig
from ingate.scheduling.plugins.load import KVCacheScorer, LeastInFlightScorer, LoadGuardFilter, QueueScorer
from ingate.scheduling.plugins.lora import LoraAffinityFilter, LoraAffinityScorer
from ingate.scheduling.plugins.pickers import MaxScorePicker, RoundRobinPicker, WeightedRandomPicker
from ingate.scheduling.plugins.prefix import (
    PrefixCacheScorer,
    PrefixHasher,
    PrefixIndex,
    prompt_block_hashes,
)
from ingate.scheduling.plugins.registry import PluginMetricsCollector
from ingate.scheduling.scheduler import Scheduler, build_scheduler


def ep(i: int, **m: object) -> Endpoint:
    e = Endpoint(name=f"e{i}", host="127.0.0.1", port=9000 + i)
    e.metrics = EndpointMetrics(**m)  # type: ignore[arg-type]
    return e


def decide(sched: Scheduler, r: InferenceRequest) -> tuple[SchedulingResult, CycleState]:
    """A decision as the director takes it: schedule, then the profile's post-schedule hooks."""
    result, ctx = sched.schedule(r)
    sched.hooks(result.profile).run_post_schedule(ctx, r, result)
    return result, ctx


def req(prompt: str = "hello", model: str = "m", adapter: str | None = None) -> InferenceRequest:
    r = parse_request(COMPLETIONS, {}, orjson.dumps({"model": model, "prompt": prompt}))
    r.target_model = adapter or model
    r.adapter = adapter
    return r


def test_queue_scorer_counts_dispatches_since_last_scrape() -> None:
    a, b = ep(0, waiting=2, running=4), ep(1, waiting=0, running=4)
    b.in_flight = 9  # 9 in flight, server only knows 4: 5 arrived since the scrape
    s = QueueScorer(scale=4).score(CycleState(), req(), [a, b])
    assert s[a] == pytest.approx(0.6) and s[b] == 0.0  # queues 2 vs 5 (0 + 5 unseen) over max(4, 5)


def test_kv_and_inflight_scorers() -> None:
    a, b = ep(0, kv_usage=0.9), ep(1, kv_usage=0.1)
    s = KVCacheScorer().score(CycleState(), req(), [a, b])
    assert s[b] > s[a] and s[a] == pytest.approx(0.1)
    a.in_flight, b.in_flight = 0, 4
    s = LeastInFlightScorer(scale=8).score(CycleState(), req(), [a, b])
    assert (s[a], s[b]) == (1.0, 0.5)


def test_load_guard_drops_overloaded_but_never_all() -> None:
    a, b, c = ep(0, waiting=0), ep(1, waiting=2), ep(2, waiting=10)
    g = LoadGuardFilter(queue_margin=3)
    assert g.filter(CycleState(), req(), [a, b, c]) == [a, b]
    hot = [ep(3, waiting=10, kv_usage=0.99), ep(4, waiting=10, kv_usage=0.95)]
    assert g.filter(CycleState(), req(), hot) == hot  # all loaded: keep all


def test_load_guard_margin_widens_once_every_replica_queues() -> None:
    g = LoadGuardFilter(queue_margin=8, margin_factor=4)
    fixed = LoadGuardFilter(queue_margin=8)
    # Some replica idle: the fixed margin spills off a replica 9 requests deeper (as without a factor).
    light = [ep(0, waiting=0), ep(1, waiting=9), ep(2, waiting=1), ep(3, waiting=2)]
    assert g.filter(CycleState(), req(), light) == fixed.filter(CycleState(), req(), light) == [
        light[0], light[2], light[3]
    ]  # fmt: skip
    # Every replica queueing: a replica 28 deeper than the least loaded stays a candidate (the
    # others' mean is 15, so its margin is 4 x 15 = 60): its cached prefix is worth the wait.
    busy = [ep(0, waiting=12), ep(1, waiting=40), ep(2, waiting=15), ep(3, waiting=18)]
    assert g.filter(CycleState(), req(), busy) == busy
    assert fixed.filter(CycleState(), req(), busy) == [busy[0], busy[2], busy[3]]  # 40 > 12 + 8
    # One replica that ran away while the others idle does not widen its own margin.
    runaway = [ep(0, waiting=0), ep(1, waiting=200), ep(2, waiting=1), ep(3, waiting=2)]
    assert g.filter(CycleState(), req(), runaway) == [runaway[0], runaway[2], runaway[3]]
    with pytest.raises(ValueError):
        LoadGuardFilter(margin_factor=-1)


def test_lora_affinity_scores_and_filter() -> None:
    active = ep(0, active_adapters=frozenset({"x"}), max_loras=2)
    free = ep(1, active_adapters=frozenset({"y"}), max_loras=2)
    waiting = ep(2, active_adapters=frozenset({"y", "z"}), waiting_adapters=frozenset({"x"}), max_loras=2)
    full = ep(3, active_adapters=frozenset({"y", "z"}), max_loras=2)
    s = LoraAffinityScorer().score(CycleState(), req(adapter="x"), [active, free, waiting, full])
    assert [s[e] for e in (active, free, waiting, full)] == [1.0, 0.8, 0.6, 0.0]
    assert LoraAffinityFilter().filter(CycleState(), req(adapter="x"), [free, active, full]) == [active]
    assert LoraAffinityFilter().filter(CycleState(), req(), [free, full]) == [free, full]


def test_prefix_hashes_are_chained_and_model_seeded() -> None:
    text = "a" * 64 + "b" * 64 + "c" * 10
    h = prompt_block_hashes(text, "m", 64, 256)
    assert len(h) == 2  # partial last block is not hashed
    assert prompt_block_hashes("z" + text[1:], "m", 64, 256)[1] != h[1]  # chained
    assert prompt_block_hashes(text, "other", 64, 256) != h
    assert len(prompt_block_hashes("x" * 64 * 300, "m", 64, 256)) == 256


def test_prefix_hasher_reuses_heads_and_matches_reference() -> None:
    rnd = random.Random(5)
    system = "".join(rnd.choice("abcdef ") for _ in range(5000))
    hasher = PrefixHasher(64, 256)
    texts = [
        system + "question one",
        system + "question two, a bit longer than the first one",
        system[:3000],  # a shorter head of the same prompt
        system[:2500] + "X" + system[2501:],  # diverges mid-block
        "".join(rnd.choice("xyz ") for _ in range(20000)),  # longer than the hashed window
        system + "tail",
    ]
    for t in texts:
        for model in ("m", "other"):
            assert hasher.hashes(t, model) == prompt_block_hashes(t, model, 64, 256)
    assert hasher.reused_blocks > 100
    assert hasher.hashes("short", "m") == []


def test_prefix_scorer_prefers_endpoint_that_saw_the_prefix() -> None:
    a, b = ep(0), ep(1)
    sc = PrefixCacheScorer(block_chars=16)
    shared = "s" * 160
    ctx = CycleState()
    r1 = req(shared + "first question")
    sc.score(ctx, r1, [a, b])
    sc.post_schedule(ctx, r1, SchedulingResult([b], "p"))
    s = sc.score(CycleState(), req(shared + "another question"), [a, b])
    assert s[a] == 0.0 and s[b] == pytest.approx(10 / 11)


def test_prefix_index_forgets_oldest_generation_within_capacity() -> None:
    a = ep(0)
    idx = PrefixIndex(capacity=8)
    idx.record(a, [1, 2, 3], 8)
    idx.record(a, [4, 5], 8)  # young reaches half the capacity: it becomes the old generation
    assert idx.match([1, 2, 3], [a])[a] == 3 and idx.match([4, 5], [a])[a] == 2
    for k in range(10, 50, 4):  # keep recording new prompts: memory stays bounded
        idx.record(a, [k, k + 1, k + 2], 8)
        assert idx.size(a) <= 8 + 3
    assert idx.match([1, 2, 3], [a])[a] == 0  # the oldest blocks are forgotten ...
    assert idx.match([46, 47, 48], [a])[a] == 3  # ... the latest are remembered
    idx.remove_endpoint(a)
    assert idx.match([46], [a])[a] == 0 and idx.size(a) == 0


def test_prefix_index_counts_leading_blocks_per_endpoint() -> None:
    a, b, c = ep(0), ep(1), ep(2)
    idx = PrefixIndex(capacity=100)
    idx.record(a, [1, 2, 3, 4], 100)
    idx.record(b, [1, 2], 100)
    idx.record(c, [2, 3, 4], 100)  # holds later blocks but not the first: no leading match
    assert idx.match([1, 2, 3, 4, 5], [a, b, c]) == {a: 4, b: 2, c: 0}
    assert idx.match([1, 2, 3, 4], [a]) == {a: 4}


def test_prefix_index_repeat_record_refreshes_recency() -> None:
    a = ep(0)
    idx = PrefixIndex(capacity=8)
    idx.record(a, [1, 2], 8)
    idx.record(a, [3, 4], 8)  # generation full: {1, 2, 3, 4} is now the old one
    idx.record(a, [1, 2], 8)  # re-used: 1 and 2 are young again
    idx.record(a, [5, 6], 8)  # the young generation retires, {3, 4} is forgotten with the old one
    assert idx.match([1, 2], [a])[a] == 2
    assert idx.match([3, 4], [a])[a] == 0
    assert idx.match([5, 6], [a])[a] == 2


def test_prefix_index_shorter_record_keeps_head_matchable() -> None:
    a = ep(0)
    idx = PrefixIndex(capacity=10)
    idx.record(a, [1, 2, 3, 4], 10)
    idx.record(a, [1, 2, 9], 10)  # a sibling prompt with the same head, recorded last
    for k in (20, 30):  # two generations of other prompts: both are forgotten
        idx.record(a, [k, k + 1, k + 2, k + 3, k + 4], 10)
    assert idx.match([1, 2, 3, 4], [a])[a] == 0
    idx.record(a, [1, 2, 9], 10)
    assert idx.match([1, 2, 3, 4], [a])[a] == 2  # head held, tail forgotten: a prefix, never a gap


def _served(sc: PrefixCacheScorer, prompt: str, eps: list[Endpoint], to: Endpoint, cached: int) -> None:
    """One request through the scorer: matched, routed to `to`, answered with `cached` tokens cached
    (at the scorer's 4 characters per token)."""
    ctx, r = CycleState(), req(prompt)
    sc.score(ctx, r, eps)
    sc.post_schedule(ctx, r, SchedulingResult([to], "p"))
    sc.post_response(
        ctx, r, to, ResponseInfo(status=200, prompt_tokens=len(prompt) // 4, cached_tokens=cached)
    )


def test_prefix_memory_shrinks_where_the_server_had_evicted_what_it_promised() -> None:
    a, b = ep(0, block_size=16, num_gpu_blocks=64), ep(1)  # a: 1024 tokens of KV, 64 blocks of 64 chars
    sc = PrefixCacheScorer()
    doc = "d" * 2048  # 32 blocks, 512 tokens
    _served(sc, doc + "q1", [a, b], a, cached=0)  # first time: nothing promised, nothing cached
    assert a not in sc.scale
    _served(sc, doc + "q2", [a, b], a, cached=0)  # promised 512 tokens, the server had none
    assert sc.scale[a] == pytest.approx(0.8)
    for _ in range(20):
        _served(sc, doc + "q3", [a, b], a, cached=0)
    assert sc.scale[a] == pytest.approx(sc.min_scale)  # bounded
    # The memory is what the scale says: a quarter of 64 blocks retires every 8 blocks recorded.
    for k in range(3):
        _served(sc, chr(ord("k") + k) * 640 + "x", [a, b], a, cached=0)
    assert sc.index.match(sc.hasher.hashes(doc, "m"), [a])[a] == 0
    assert b not in sc.scale  # other endpoints keep their own memory


def test_prefix_memory_grows_where_the_server_kept_what_it_forgot_or_its_oldest_still_hold() -> None:
    a, b = ep(0, block_size=16, num_gpu_blocks=64), ep(1, block_size=16, num_gpu_blocks=64)
    sc = PrefixCacheScorer()
    _served(sc, "e" * 2048, [a, b], a, cached=500)  # nothing promised, but the server had 500 tokens
    assert sc.scale[a] == pytest.approx(1.1)
    for k in range(20):  # new prompts each time, all of which the server turns out to hold
        _served(sc, f"{k:04d}" * 512, [a, b], a, cached=500)
    assert sc.scale[a] == pytest.approx(sc.max_scale)
    # As promised: no evidence either way while the hit is recent ...
    doc = "g" * 1024  # 16 blocks
    _served(sc, doc + "1", [a, b], b, cached=0)
    _served(sc, doc + "2", [a, b], b, cached=256)
    assert b not in sc.scale
    # ... but a hit from the far end of the memory (older than a quarter of it) probes a longer one.
    # b remembers 64 blocks; its young generation retires at 32. Another 16-block prompt retires the
    # doc's generation, the next one half fills the new young generation: the doc is now the oldest.
    _served(sc, "p" * 1024 + "x", [a, b], b, cached=0)
    _served(sc, "q" * 1024 + "x", [a, b], b, cached=0)
    _served(sc, doc + "3", [a, b], b, cached=256)
    assert sc.scale[b] == pytest.approx(1.05)


def test_prefix_memory_is_fixed_when_not_adaptive_or_without_cached_tokens() -> None:
    a = ep(0, block_size=16, num_gpu_blocks=64)
    fixed = PrefixCacheScorer(adaptive=False)
    learning = PrefixCacheScorer()
    doc = "h" * 2048
    for sc in (fixed, learning):
        _served(sc, doc + "1", [a], a, cached=0)
    _served(fixed, doc + "2", [a], a, cached=0)
    ctx, r = CycleState(), req(doc + "3")  # a response without usage details
    learning.score(ctx, r, [a])
    learning.post_schedule(ctx, r, SchedulingResult([a], "p"))
    learning.post_response(ctx, r, a, ResponseInfo(status=200, prompt_tokens=512))
    learning.post_response(ctx, r, a, ResponseInfo(status=503, prompt_tokens=512, cached_tokens=0))
    assert fixed.scale == {} and learning.scale == {}


def test_prefix_memory_gauges_show_each_profiles_memory_per_endpoint() -> None:
    a, b = ep(0, block_size=16, num_gpu_blocks=64), ep(1)
    sc = PrefixCacheScorer()
    _served(sc, "j" * 2048, [a, b], a, cached=500)  # 32 blocks remembered on a, which grows its memory
    samples = {
        (m.name, s.labels["profile"], s.labels["endpoint"]): s.value
        for m in PluginMetricsCollector([("p", sc)], Datastore([a, b])).collect()
        for s in m.samples
    }
    assert samples == {
        ("ingate_prefix_memory_blocks", "p", a.address): 32,
        ("ingate_prefix_memory_blocks", "p", b.address): 0,
        ("ingate_prefix_memory_scale", "p", a.address): pytest.approx(1.1),
        ("ingate_prefix_memory_scale", "p", b.address): 1.0,
    }


def test_prefix_memory_learns_only_from_its_own_decisions() -> None:
    """Two profiles, each with a prefix scorer: the response is judged by the one that routed it."""
    cfg = SchedulerConfig.model_validate(
        {
            "defaultProfile": "p",
            "profiles": {
                "p": {"scorers": [{"type": "prefix-cache", "weight": 1}]},
                "q": {"scorers": [{"type": "prefix-cache", "weight": 1, "parameters": {"maxScale": 3}}]},
            },
        }
    )
    a = ep(0, block_size=16, num_gpu_blocks=64)
    sched = build_scheduler(cfg, Datastore([a]))
    mine = sched.profiles["p"].scorers[0][0]
    other = sched.profiles["q"].scorers[0][0]
    r = req("i" * 2048)
    result, ctx = decide(sched, r)
    sched.hooks(result.profile).run_post_response(
        ctx, r, result.target, ResponseInfo(status=200, prompt_tokens=512, cached_tokens=500)
    )
    assert mine.scale == {a: pytest.approx(1.1)} and other.scale == {}  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="maxScale"):
        build_scheduler(
            SchedulerConfig.model_validate(
                {"profiles": {"p": {"scorers": [{"type": "prefix-cache", "parameters": {"maxScale": 0.5}}]}}}
            ),
            Datastore([a]),
        )


def test_max_score_picker_breaks_ties_randomly() -> None:
    eps = [ep(i) for i in range(4)]
    p = MaxScorePicker(rng=random.Random(1))
    firsts = Counter(p.pick(CycleState(), req(), [(e, 1.0) for e in eps])[0].name for _ in range(400))
    assert set(firsts) == {"e0", "e1", "e2", "e3"} and min(firsts.values()) > 60
    assert p.pick(CycleState(), req(), [(eps[0], 0.2), (eps[1], 0.9)])[0] is eps[1]


def test_weighted_random_and_round_robin() -> None:
    a, b = ep(0), ep(1)
    p = WeightedRandomPicker(rng=random.Random(2))
    wins = Counter(p.pick(CycleState(), req(), [(a, 3.0), (b, 1.0)])[0] is a for _ in range(2000))
    assert 0.68 < wins[True] / 2000 < 0.82
    rr = RoundRobinPicker()
    order = [rr.pick(CycleState(), req(), [(b, 0.0), (a, 0.0)])[0] for _ in range(4)]
    assert order == [a, b, a, b]


def test_default_profile_sticks_to_prefix_until_loaded() -> None:
    ds = Datastore([ep(i) for i in range(4)])
    sched = build_scheduler(SchedulerConfig(), ds)
    shared = "system prompt " * 100
    first, _ = decide(sched, req(shared + "q0"))
    target = first.target
    for i in range(1, 5):
        res, _ = decide(sched, req(shared + f"q{i}"))
        assert res.target is target
        target.in_flight += 1  # still within the load guard's margin for the first few
    target.metrics.waiting = 20  # now the affine replica is overloaded: spill over
    res, _ = decide(sched, req(shared + "q9"))
    assert res.target is not target
    assert len(res.endpoints) == 3  # target + 2 fallbacks


def test_unhealthy_and_filtered_out_give_503() -> None:
    ds = Datastore([ep(0)])
    ds.endpoints()[0].healthy = False
    sched = build_scheduler(SchedulerConfig(), ds)
    with pytest.raises(GatewayError) as ei:
        sched.schedule(req())
    assert ei.value.status == 503


def test_config_errors_name_the_field() -> None:
    bad = SchedulerConfig(profiles={"p": ProfileConfig(scorers=[PluginSpec(type="nope")])})
    with pytest.raises(ValueError, match=r"scheduler.profiles.p.scorers\[0\]: unknown scorer type 'nope'"):
        build_scheduler(bad, Datastore())
    bad = SchedulerConfig(
        profiles={"p": ProfileConfig(scorers=[PluginSpec(type="prefix-cache", parameters={"blokChars": 4})])}
    )
    with pytest.raises(ValueError, match="unknown parameter"):
        build_scheduler(bad, Datastore())
    with pytest.raises(ValueError, match="defaultProfile"):
        SchedulerConfig(defaultProfile="missing")


def test_yaml_parameters_reach_plugins() -> None:
    cfg = SchedulerConfig.model_validate(
        {
            "defaultProfile": "p",
            "profiles": {
                "p": {"scorers": [{"type": "prefix-cache", "weight": 3, "parameters": {"blockChars": 32}}]}
            },
        }
    )
    sched = build_scheduler(cfg, Datastore([ep(0)]))
    scorer, weight = sched.profiles["p"].scorers[0]
    assert weight == 3 and scorer.block_chars == 32  # type: ignore[attr-defined]


def test_registry_lists_builtin_plugins_and_rejects_duplicates() -> None:
    from ingate.scheduling.plugins.registry import plugins, register

    assert {"queue", "kv-cache", "prefix-cache", "predicted-latency", "size-band"} <= set(plugins("scorer"))
    assert {"load-guard", "lora-affinity"} <= set(plugins("filter"))
    assert {"max-score", "random", "round-robin", "weighted-random"} <= set(plugins("picker"))
    assert plugins("scorer")["prefix-cache"] is PrefixCacheScorer

    class Other:
        pass

    with pytest.raises(ValueError, match="registered twice"):
        register("scorer", "prefix-cache")(Other)
    with pytest.raises(ValueError, match="unknown scorer type 'nope'"):
        build_scheduler(
            SchedulerConfig.model_validate({"profiles": {"p": {"scorers": [{"type": "nope"}]}}}),
            Datastore([]),
        )


def test_plugin_metrics_of_several_profiles_share_one_family() -> None:
    """Two profiles with a prefix scorer each: one family per metric name, a sample per profile."""
    a = ep(0, block_size=16, num_gpu_blocks=64)
    cfg = SchedulerConfig.model_validate(
        {"profiles": {p: {"scorers": [{"type": "prefix-cache"}]} for p in ("p", "q")}}
    )
    sched = build_scheduler(cfg, Datastore([a]))
    fams = list(PluginMetricsCollector(sched.plugins(), Datastore([a])).collect())
    names = [f.name for f in fams]
    assert len(names) == len(set(names))
    # (the built-in slo-aware profile's latency model exports ingate_latency_* families too)
    assert sorted(n for n in names if n.startswith("ingate_prefix")) == [
        "ingate_prefix_memory_blocks",
        "ingate_prefix_memory_scale",
    ]
    blocks = next(f for f in fams if f.name == "ingate_prefix_memory_blocks")
    profiles = {s.labels["profile"] for s in blocks.samples}
    assert {"p", "q", "default"} <= profiles  # the built-in default profile has one too


def test_plugin_durations_are_exported_per_extension_point_and_plugin() -> None:
    """inference_extension_plugin_duration_seconds: one series per plugin that ran, cumulative buckets."""
    from ingate.scheduling.timing import BUCKETS, NAME

    ds = Datastore([ep(0), ep(1)])
    sched = build_scheduler(SchedulerConfig(), ds)
    for i in range(3):
        decide(sched, req(f"prompt {i}"))
    (fam,) = list(sched.timings().collect())
    assert fam.name == NAME
    counts = {
        (s.labels["extension_point"], s.labels["plugin_name"]): s.value
        for s in fam.samples
        if s.name.endswith("_count")
    }
    assert counts[("Filter", "default/load-guard")] == 3
    assert counts[("Scorer", "default/prefix-cache")] == 3
    assert counts[("Picker", "default/max-score")] == 3
    assert not any(name.startswith("round-robin/") for _, name in counts)  # never ran: no series
    buckets = [
        s.value
        for s in fam.samples
        if s.name.endswith("_bucket") and s.labels["plugin_name"] == "default/max-score"
    ]
    assert len(buckets) == len(BUCKETS) + 1 and buckets == sorted(buckets) and buckets[-1] == 3


def test_endpoint_weight_is_a_capacity_hint_for_load_scorers() -> None:
    """Weight 2 = twice the capacity: the same load counts half (queue, in-flight, predicted latency)."""
    from ingate.scheduling.plugins.latency import PredictedLatencyScorer

    small, big = ep(0, waiting=4), ep(1, waiting=4)
    big.weight = 2.0
    small.in_flight = big.in_flight = 6
    q = QueueScorer(scale=1).score(CycleState(), req(), [small, big])
    assert q[big] > q[small]
    lif = LeastInFlightScorer(scale=1).score(CycleState(), req(), [small, big])
    assert lif[big] > lif[small]
    lat = PredictedLatencyScorer()
    assert lat.cost(big, 1000, 0, 10) == pytest.approx(lat.cost(small, 1000, 0, 10) / 2)
    equal = ep(2, waiting=4)
    equal.in_flight = 6
    assert QueueScorer(scale=1).score(CycleState(), req(), [small, equal]) == {small: 0.0, equal: 0.0}


def test_label_selector_filter_serves_a_profile_from_part_of_the_pool() -> None:
    a, b, c = ep(0), ep(1), ep(2)
    a.labels, b.labels, c.labels = {"accelerator": "h100"}, {"accelerator": "l4"}, {}
    cfg = SchedulerConfig.model_validate(
        {
            "defaultProfile": "fast",
            "profiles": {
                "fast": {
                    "filters": [
                        {"type": "label-selector", "parameters": {"matchLabels": {"accelerator": "h100"}}}
                    ],
                    "scorers": [{"type": "least-in-flight"}],
                }
            },
        }
    )
    sched = build_scheduler(cfg, Datastore([a, b, c]))
    assert {decide(sched, req(f"q{i}"))[0].target for i in range(10)} == {a}
    a.healthy = False
    with pytest.raises(GatewayError, match="label-selector"):
        sched.schedule(req())
    with pytest.raises(ValueError, match="matchLabels"):
        build_scheduler(
            SchedulerConfig.model_validate({"profiles": {"p": {"filters": [{"type": "label-selector"}]}}}),
            Datastore([a]),
        )
