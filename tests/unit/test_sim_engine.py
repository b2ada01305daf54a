"""The simulator's engine and KV manager without HTTP."""

import asyncio

import pytest

from ingate.metrics import kvevents
from ingate.sim.engine import Engine, EngineConfig
from ingate.sim.kvcache import KVCache
from ingate.sim.lora import LoraSlots
from ingate.sim.profiles import H100_LLAMA3_8B, NULL_PROFILE
from ingate.sim.tokenizer import count_tokens, output_text, token_ids, tokenize

ROOT = kvevents.none_hash("0")


def block_hashes(tokens: list[str], block_size: int, adapter: str | None = None) -> list[int]:
    return kvevents.block_hashes(token_ids(tokens), block_size, ROOT, adapter)


def test_tokenizer_rule_and_output_retokenises() -> None:
    assert tokenize("hello   wonderful-world") == ["hello", "wonderfu", "l-world"]
    assert count_tokens("hello   wonderful-world") == 3
    text = output_text(0, 37)
    assert count_tokens(text) == 37 and len(tokenize(text)) == 37


def test_block_hashes_are_chained_and_seeded() -> None:
    a = tokenize(" ".join(f"w{i}" for i in range(40)))
    b = list(a)
    b[0] = "different"
    ha, hb = block_hashes(a, 16), block_hashes(b, 16)
    assert len(ha) == 2  # 40 tokens -> 2 full blocks of 16
    assert ha[0] != hb[0] and ha[1] != hb[1]  # a change in block 0 changes every later hash
    assert block_hashes(a, 16, "adapter-x") != ha  # caches of different models/adapters never mix


def test_kvcache_prefix_reuse_and_lru_eviction() -> None:
    kv = KVCache(num_blocks=4, block_size=16)
    assert kv.allocate(2)
    refs = kv.register([1, 2])
    kv.release(refs, 0)  # blocks 1, 2 stay cached but evictable
    assert kv.used_blocks == 0 and kv.available == 4
    assert kv.match_prefix([1, 2, 3]) == 2
    kv.acquire_cached([1])
    assert kv.used_blocks == 1
    assert kv.allocate(3)  # needs one eviction: block 2 (unreferenced) goes, block 1 stays
    assert kv.match_prefix([1, 2]) == 1
    assert not kv.allocate(1)


def test_lora_slots_limit_and_idle_eviction() -> None:
    s = LoraSlots(max_loras=2)
    assert s.acquire("a") and s.acquire("b")
    assert not s.can_run("c")  # both busy
    s.release("a")
    assert s.can_run("c")
    assert s.acquire("c")  # evicts idle "a"
    assert sorted(s.resident) == ["b", "c"]


def test_step_time_matches_calibration_formulas() -> None:
    p = H100_LLAMA3_8B
    # decode B=64, ctx 2048 each; README fit: 9.83 + 0.01111*64 + 4.307e-5*64*2048
    assert p.step_ms(0, 0, 64, 64 * 2048) == pytest.approx(9.83 + 0.01111 * 64 + 4.307e-5 * 64 * 2048)
    # prefill of one 4096-token prompt: 2.905 + 0.02777*4096 + 5.39e-7*4096^2 (measured 125.8 ms)
    assert p.step_ms(4096, 4096.0**2, 0, 0) == pytest.approx(125.8, rel=0.05)
    assert p.step_ms(64, 64.0**2, 0, 0) == pytest.approx(9.8)  # short prefill costs the floor


async def _run(engine: Engine, reqs: list, limit_s: float = 5.0) -> None:
    async def wait(r: object) -> None:
        while not r.done:  # type: ignore[attr-defined]
            await r.event.wait()  # type: ignore[attr-defined]
            r.event.clear()  # type: ignore[attr-defined]

    await asyncio.wait_for(asyncio.gather(*(wait(r) for r in reqs)), limit_s)


async def test_engine_prefix_hit_skips_prefill() -> None:
    e = Engine(EngineConfig(H100_LLAMA3_8B, time_scale=5))
    e.start()
    toks = [f"t{i}" for i in range(2000)]
    h = block_hashes(toks, 16)
    r1 = e.submit("1", len(toks), h, 2, None)
    await _run(e, [r1])
    r2 = e.submit("2", len(toks), h, 2, None)
    await _run(e, [r2])
    await e.stop()
    assert r1.num_cached == 0 and r2.num_cached == 1984  # all full blocks but the last token's
    assert e.kv.hits == 1984 and e.kv.queries == 4000
    ttft1 = r1.first_token_at - r1.arrival  # type: ignore[operator]
    ttft2 = r2.first_token_at - r2.arrival  # type: ignore[operator]
    assert ttft2 < ttft1 / 2


async def test_a_prefix_hit_that_needs_eviction_keeps_its_matched_blocks() -> None:
    # The second prompt shares the first 5 blocks of a finished one and needs 12 more, 2 more than are
    # free: the cache must evict 2 unreferenced blocks, and in LRU order those are the very blocks it
    # matched (the oldest of the first prompt). Admission must pin them first, not crash or lose them.
    p = NULL_PROFILE.with_overrides(num_gpu_blocks=20, step_floor=0.2, decode_base=0.2)
    e = Engine(EngineConfig(p, time_scale=1))
    e.start()
    a = [f"a{i}" for i in range(160)]
    r1 = e.submit("1", len(a), block_hashes(a, 16), 1, None)
    await _run(e, [r1])
    b = a[:80] + [f"b{i}" for i in range(190)]
    r2 = e.submit("2", len(b), block_hashes(b, 16), 1, None)
    await _run(e, [r2])
    await e.stop()
    assert r2.state == "finished" and r2.num_cached == 80
    assert e.kv.used_blocks == 0 and e.kv.match_prefix(block_hashes(b, 16)) == 16


async def test_engine_kv_exhaustion_queues_requests() -> None:
    p = NULL_PROFILE.with_overrides(num_gpu_blocks=20, step_floor=1.0, decode_base=1.0)
    e = Engine(EngineConfig(p, time_scale=1))
    reqs = [e.submit(str(i), 100, [], 50, None) for i in range(6)]  # ~10 blocks each: 2 fit at once
    e.start()
    await asyncio.sleep(0.02)
    assert len(e.running) <= 2 and len(e.waiting) >= 4
    await _run(e, reqs)
    await e.stop()
    assert all(r.state == "finished" and r.generated == 50 for r in reqs)
    assert e.kv.used_blocks == 0


async def test_engine_preempts_when_decode_runs_out_of_blocks() -> None:
    p = NULL_PROFILE.with_overrides(num_gpu_blocks=12, step_floor=0.2, decode_base=0.2)
    e = Engine(EngineConfig(p, time_scale=1))
    # Two prompts of 5 blocks each fit; decoding 64 tokens each needs 4 more blocks each: preemption.
    reqs = [e.submit(str(i), 80, [], 64, None) for i in range(2)]
    e.start()
    await _run(e, reqs)
    await e.stop()
    assert e.preemptions >= 1
    assert all(r.generated == 64 for r in reqs)


async def test_engine_lora_requests_wait_for_a_slot() -> None:
    p = NULL_PROFILE.with_overrides(step_floor=1.0, decode_base=1.0)
    e = Engine(EngineConfig(p, time_scale=1, max_loras=2, lora_load_ms=0))
    reqs = [e.submit(str(i), 10, [], 30, a) for i, a in enumerate(["a", "b", "c"])]
    e.start()
    await asyncio.sleep(0.01)
    assert sorted(e.lora.resident) == ["a", "b"] and [r.adapter for r in e.waiting] == ["c"]
    await _run(e, reqs)
    await e.stop()
    assert reqs[2].scheduled_at is not None and reqs[2].scheduled_at >= reqs[0].finished_at  # type: ignore[operator]


async def test_abort_frees_blocks() -> None:
    p = NULL_PROFILE.with_overrides(step_floor=5.0, decode_base=5.0)
    e = Engine(EngineConfig(p, time_scale=1))
    e.start()
    r = e.submit("x", 100, [], 1000, None)
    await asyncio.sleep(0.02)
    assert e.kv.used_blocks > 0
    e.abort(r)
    assert e.kv.used_blocks == 0 and r.done
    await e.stop()


def test_fcfs_engine_rejects_a_priority_like_vllm() -> None:
    e = Engine(EngineConfig(NULL_PROFILE))
    with pytest.raises(ValueError, match="Priority scheduling is not enabled"):
        e.submit("x", 10, [], 1, None, priority=3)
    with pytest.raises(ValueError, match="scheduling_policy"):
        Engine(EngineConfig(NULL_PROFILE, scheduling_policy="lifo"))


async def test_priority_policy_serves_lower_values_first_without_preempting() -> None:
    p = NULL_PROFILE.with_overrides(max_num_seqs=1, step_floor=0.5, decode_base=0.5)
    e = Engine(EngineConfig(p, scheduling_policy="priority"))
    first = e.submit("first", 10, [], 20, None, priority=5)
    e.start()
    await asyncio.sleep(0.003)  # `first` holds the only batch slot
    late_low = e.submit("late-low", 10, [], 5, None, priority=9)
    high = e.submit("high", 10, [], 5, None, priority=0)
    await _run(e, [first, late_low, high])
    await e.stop()
    assert e.preemptions == 0 and first.preemptions == 0  # vLLM V1: no preemption for a batch slot
    assert high.first_token_at > first.finished_at  # type: ignore[operator]
    assert late_low.first_token_at > high.finished_at  # type: ignore[operator]


async def test_priority_preemption_takes_the_slot_of_lower_priority_work() -> None:
    p = NULL_PROFILE.with_overrides(max_num_seqs=2, step_floor=0.5, decode_base=0.5)
    e = Engine(EngineConfig(p, scheduling_policy="priority", priority_preemption=True))
    low = e.submit("low", 10, [], 40, None, priority=5)
    mid = e.submit("mid", 10, [], 40, None, priority=1)
    e.start()
    await asyncio.sleep(0.004)
    assert len(e.running) == 2
    high = e.submit("high", 10, [], 4, None, priority=0)
    same = e.submit("same", 10, [], 4, None, priority=5)  # equal priority never preempts
    await _run(e, [low, mid, high, same])
    await e.stop()
    assert low.preemptions == 1 and mid.preemptions == 0  # the lowest-priority request made room
    assert high.first_token_at < mid.finished_at  # type: ignore[operator]
    assert all(r.generated == r.max_tokens for r in (low, mid, high, same))  # the victim resumed
    assert e.kv.used_blocks == 0 and not e.running and not len(e.waiting)


async def test_priority_policy_picks_the_lowest_priority_victim_on_kv_shortage() -> None:
    p = NULL_PROFILE.with_overrides(num_gpu_blocks=12, step_floor=0.2, decode_base=0.2)
    e = Engine(EngineConfig(p, scheduling_policy="priority"))
    # As the FCFS test above: two prompts of 5 blocks, decoding needs more blocks than are left. FCFS
    # preempts the newest request; the priority policy preempts the lower-priority one (the older here).
    low = e.submit("low", 80, [], 64, None, priority=7)
    high = e.submit("high", 80, [], 64, None, priority=0)
    e.start()
    await _run(e, [low, high])
    await e.stop()
    assert low.preemptions >= 1 and high.preemptions == 0
