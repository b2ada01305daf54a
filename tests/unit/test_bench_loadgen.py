"""Load generator and workload generation against a tiny OpenAI-like streaming server."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web
from loopback_http import completions_server, stream_completion

from ingate.bench.loadgen import make_session, run_concurrent, run_poisson, send_one
from ingate.bench.stats import max_sustainable_rate, summarize
from ingate.bench.tables import HEADERS, markdown_table, rows
from ingate.bench.workload import Load, RequestStream, Workload
from ingate.sim.tokenizer import count_tokens


async def _completions(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    if body.get("model") != "m":
        return web.json_response({"error": {"message": "unknown model"}}, status=404)
    n = int(body["max_tokens"])
    usage: dict[str, object] = {"prompt_tokens": count_tokens(body["prompt"]), "completion_tokens": n}
    if "cached" in body:  # a server that reports its prefix-cache hits, as vLLM does
        usage["prompt_tokens_details"] = {"cached_tokens": body["cached"]}
    return await stream_completion(request, n, usage, 0.002)


@pytest.fixture
async def server() -> AsyncIterator[str]:
    async with completions_server(_completions) as url:
        yield url


def _wl(**kw: object) -> Workload:
    base: dict[str, object] = {
        "name": "t",
        "model": "m",
        "data": {
            "type": "shared_prefix",
            "groups": 2,
            "prompts_per_group": 3,
            "system_tokens": 50,
            "question": {"kind": "fixed", "mean": 10},
            "output": {"kind": "fixed", "mean": 5},
        },
    }
    base.update(kw)
    return Workload.model_validate(base)


def test_prompts_are_deterministic_and_token_exact() -> None:
    wl = _wl()
    a = [RequestStream(wl).next().body for _ in range(1)] + [r.body for r in _take(RequestStream(wl), 5)]
    b = [RequestStream(wl).next().body for _ in range(1)] + [r.body for r in _take(RequestStream(wl), 5)]
    assert a == b
    for body in a:
        # system prompt (50) + "user <conv>" (2) + question (10) under the simulator's rule
        assert count_tokens(body["prompt"]) == 62
        assert body["stream_options"] == {"include_usage": True}


def _take(stream: RequestStream, n: int) -> list:  # type: ignore[type-arg]
    return [stream.next() for _ in range(n)]


def test_shared_prefix_groups_share_system_prompt() -> None:
    reqs = _take(RequestStream(_wl()), 30)
    by_group: dict[int, set[str]] = {}
    for r in reqs:
        by_group.setdefault(r.group, set()).add(r.body["prompt"].split("\n")[0])
    assert set(by_group) == {0, 1}
    assert all(len(v) == 1 for v in by_group.values())
    assert by_group[0] != by_group[1]


def test_lora_mix_follows_weights() -> None:
    wl = _wl(lora={"adapters": ["a", "b"], "weights": [9, 1]})
    models = [r.body["model"] for r in _take(RequestStream(wl), 2000)]
    assert 0.85 < models.count("a") / len(models) < 0.95


async def test_send_one_records_ttft_itl_and_usage(server: str) -> None:
    req = RequestStream(_wl()).next()
    async with make_session(4) as s:
        rec = await send_one(s, server, req, 0.0, 10)
    assert rec.ok and rec.status == 200
    assert rec.completion_tokens == 5 and rec.prompt_tokens == 62
    assert rec.cached_tokens is None  # not reported by this server: unknown, not zero
    req.body["cached"] = 48
    async with make_session(2) as s:
        rec = await send_one(s, server, req, 0.0, 10)
    assert rec.ok and rec.cached_tokens == 48
    assert rec.chunks == 5
    assert rec.ttft is not None and rec.e2e is not None and rec.ttft <= rec.e2e
    assert rec.itl_mean is not None and rec.itl_mean > 0


async def test_send_one_reports_http_errors(server: str) -> None:
    req = RequestStream(_wl(model="other")).next()
    async with make_session(4) as s:
        rec = await send_one(s, server, req, 0.0, 10)
    assert not rec.ok and rec.status == 404 and "unknown model" in rec.error


async def test_poisson_is_open_loop_and_counts_cap(server: str) -> None:
    stream = RequestStream(_wl())
    load = Load(rates=[200], duration_s=0.5, max_inflight=3)
    async with make_session(8) as s:
        st = await run_poisson(s, server, stream.next, 200, load, random.Random(0))
    # ~100 arrivals expected; with a cap of 3 outstanding the cap must have been hit and reported.
    assert len(st.records) > 40
    assert st.max_inflight_hit > 0 and st.peak_inflight <= 3
    assert all(r.ok for r in st.records)


async def test_concurrent_mode(server: str) -> None:
    stream = RequestStream(_wl())
    load = Load(type="concurrent", concurrency=[2], duration_s=0.3)
    async with make_session(4) as s:
        st = await run_concurrent(s, server, stream.next, 2, load)
    assert len(st.records) >= 2 and all(r.ok for r in st.records)


def test_summary_goodput_and_max_rate() -> None:
    def rec(ttft: float) -> dict[str, object]:
        return {
            "send": 0.0,
            "status": 200,
            "error": "",
            "ttft": ttft,
            "e2e": ttft + 1,
            "itl_mean": 0.01,
            "completion_tokens": 10,
        }

    s = summarize(
        [rec(0.1), rec(0.2), rec(5.0), {**rec(0.1), "status": 500, "error": "x"}],
        10.0,
        {"ttft_s": 1.0, "e2e_s": None},
    )
    assert s["ok"] == 3 and s["errors"] == 1
    assert s["goodput_rps"] == pytest.approx(0.2)
    assert s["slo_attainment"] == pytest.approx(0.5)
    assert s["cached_token_share"] is None
    hits = [{**rec(0.1), "prompt_tokens": 100, "cached_tokens": c} for c in (80, 0, 40)]
    s = summarize([*hits, {**rec(0.1), "prompt_tokens": 100}], 10.0, {"ttft_s": 1.0, "e2e_s": None})
    assert s["cached_token_share"] == pytest.approx(0.4)  # the record without a report is left out
    res = {"workload": {"name": "w"}, "systems": [{"name": "x", "stages": [{"rate": 1.0, "summary": s}]}]}
    (row,) = rows([res])
    assert row[HEADERS.index("cached")] == "40%"
    stages = [
        {"rate": 1.0, "summary": {"slo_attainment": 0.95}},
        {"rate": 2.0, "summary": {"slo_attainment": 0.5}},
    ]
    assert max_sustainable_rate(stages) == 1.0
    res = [{"workload": {"name": "w"}, "systems": [{"name": "peer", "unavailable": "no wheel"}]}]
    assert "unavailable: no wheel" in markdown_table(res)


def test_pooled_streams_sum_their_spans() -> None:
    # Two streams of one stage, each from its own start: achieved throughput is completions over both
    # spans (13 s + 12 s), not over the longest one; goodput is the good requests, counted, per offered
    # second (10 s offered per stream: never a span that includes the drain); the tail is the pooled
    # requests' tail.
    def rec(stream: int, send: float, ttft: float, e2e: float) -> dict[str, object]:
        return {
            "send": send,
            "status": 200,
            "error": "",
            "ttft": ttft,
            "e2e": e2e,
            "itl_mean": 0.01,
            "completion_tokens": 4,
            "stream": stream,
        }

    recs = [rec(0, 1.0, 0.5, 2.0), rec(0, 9.0, 3.0, 4.0), rec(1, 0.5, 0.2, 1.0), rec(1, 8.0, 0.4, 4.0)]
    s = summarize(recs, 10.0, {"ttft_s": 1.0, "e2e_s": None})
    assert s["streams"] == 2 and s["sent"] == 4
    assert s["throughput_rps"] == pytest.approx(4 / (13.0 + 12.0))
    assert s["good"] == 3 and s["offered_s"] == 20.0 and s["goodput_rps"] == pytest.approx(3 / 20.0)
    assert s["ttft_p99"] == 3.0
    one = summarize(recs[:2], 10.0, {"ttft_s": 1.0, "e2e_s": None})
    assert one["streams"] == 1 and one["goodput_rps"] == pytest.approx(1 / 10.0)
    assert one["throughput_rps"] == pytest.approx(2 / 13.0)


def test_reports_recompute_summaries_from_records() -> None:
    """A results file written with older definitions is summarised anew from its records."""
    from ingate.bench.stats import percentile, resummarize

    recs = [
        {"send": 0.1 * i, "status": 200, "error": "", "ttft": 0.1 * i, "e2e": 0.2 * i + 0.1, "itl_mean": None,
         "completion_tokens": 1, "prompt_tokens": 10, "stream": 0}
        for i in range(1, 31)
    ]  # fmt: skip
    res = {
        "workload": {"slo": {"ttft_s": 1.0, "e2e_s": None}},
        "systems": [
            {
                "name": "x",
                "stages": [{"rate": 3, "duration_s": 10.0, "summary": {"goodput_rps": 99}, "records": recs}],
            }
        ],
    }
    s = resummarize(res)["systems"][0]["stages"][0]["summary"]
    assert s["good"] == 10 and s["goodput_rps"] == pytest.approx(1.0)  # ttft <= 1.0 s: 10 of 30
    assert s["ttft_p50"] == percentile([r["ttft"] for r in recs], 0.5) == pytest.approx(1.5)
    assert res["systems"][0]["max_sustainable_rate"] is None  # 33% within the SLO


def test_tuning_and_evaluation_seeds_are_disjoint_and_the_replay_refuses_eval() -> None:
    import subprocess
    import sys
    from pathlib import Path

    from ingate.bench.workload import load_workload, with_seed_set

    root = Path(__file__).resolve().parents[2]
    wl = load_workload(root / "benchmarks/workloads/shared-prefix.yaml")
    ev = with_seed_set(wl, "eval")
    assert (ev.seed, ev.seed_set) == (wl.seed + 10_000, "eval") and ev.data == wl.data
    tune = [RequestStream(wl, seed_offset=k).next().body["prompt"] for k in range(3)]
    held = [RequestStream(ev, seed_offset=k).next().body["prompt"] for k in range(3)]
    assert not set(tune) & set(held)  # other system prompts and questions altogether
    with pytest.raises(ValueError, match="unknown seed set"):
        with_seed_set(wl, "test")
    target = "benchmarks/workloads/eval/b2b-large-groups.yaml"
    for script in ("replay.py", "error_breakdown.py"):
        r = subprocess.run(
            [sys.executable, f"benchmarks/scheduling/{script}", target, "--streams", "1"],
            cwd=root, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode != 0 and "held-out evaluation workload" in r.stderr


def test_error_breakdown_marks_requests_a_later_dispatch_joined() -> None:
    """The replay's error breakdown calls a request joined when one dispatched after it to the same
    endpoint got its first token no later (same step, or overtaking it)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks/scheduling/error_breakdown.py"
    spec = importlib.util.spec_from_file_location("error_breakdown", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # (dispatched, first token, predicted, actual), in no particular order
    recs = [
        (0.0, 1.0, 0.5, 1.0),  # joined: dispatched at 0.2, first token at 1.0 too
        (0.2, 1.0, 0.5, 0.8),  # nothing after it came first
        (0.3, 2.0, 1.0, 1.7),  # overtaken by the one dispatched at 0.4
        (0.4, 1.5, 1.0, 1.1),
    ]
    assert mod.joined(recs) == [True, False, True, False]
    assert mod.joined(list(reversed(recs))) == [False, True, False, True]


def test_committed_workloads_parse_and_generate() -> None:
    from pathlib import Path

    from ingate.bench.peers import is_peer
    from ingate.bench.systems import SYSTEMS
    from ingate.bench.workload import load_workload

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    paths = sorted((root / "workloads").glob("*.yaml")) + sorted((root / "configs").glob("*.yaml"))
    assert len(paths) >= 9
    for p in paths:
        wl = load_workload(p)
        assert all(s in SYSTEMS or is_peer(s) or s.startswith("ingate:") for s in wl.systems), p
        bodies = [RequestStream(wl).next().body for _ in range(3)]
        assert all(b["max_tokens"] >= 1 for b in bodies), p


def test_headline_compares_at_round_robin_saturation() -> None:
    from ingate.bench.stats import headline
    from ingate.bench.tables import headline_markdown

    def stage(rate: float, att: float, p99: float, good: float) -> dict[str, object]:
        summary = {"slo_attainment": att, "ttft_p99": p99, "goodput_rps": good, "sent": 10}
        return {"rate": rate, "summary": summary}

    res = {
        "workload": {"name": "w"},
        "systems": [
            {
                "name": "ingate",
                "stages": [stage(1, 1.0, 0.2, 1.0), stage(2, 1.0, 0.3, 2.0), stage(3, 0.9, 1, 2.5)],
            },
            {
                "name": "round-robin",
                "stages": [stage(1, 1.0, 0.5, 1.0), stage(2, 0.5, 3.0, 1.0), stage(3, 0.1, 9, 0.2)],
            },
            {"name": "vllm-router", "unavailable": "cannot install:\n| pip said no"},
            {
                "name": "sglang-router",
                "stages": [stage(1, 1.0, 0.2, 1.0), stage(2, 1.0, 0.25, 2.0), stage(3, 1.0, 0.5, 3.0)],
            },
        ],
    }
    h = headline(res)
    assert h is not None and h["rate"] == 2
    assert h["ttft_p99_reduction"] == pytest.approx(0.9)
    assert h["goodput_gain"] == pytest.approx(1.0)
    md = headline_markdown([res])
    assert "| w | 2 | ingate | round-robin | 0.30 / 3.00 | 90% | 2.00 / 1.00 | +100% | 3 / 1 |" in md
    # the reason stays in one table cell
    assert "| w | - | ingate | vllm-router | unavailable: cannot install: / pip said no | | | | |" in md
    verdict = md.split("\n\n", 1)[1]
    assert "p99 TTFT 90% lower than round robin (met); goodput +100% (met)" in verdict
    # same goodput as the best peer but a higher p99 TTFT: not "at least as good"
    assert (
        "vs best peer sglang-router: goodput 2.00 / 2.00 req/s (10 / 10 requests within the SLO), " in verdict
    )
    assert "p99 TTFT 0.30 / 0.25 s (NOT met)" in verdict
    # as many requests within the SLO (goodput differing only by drain time) and a lower p99: met
    res["systems"][0]["stages"][1] = stage(2, 1.0, 0.2, 1.99)
    assert "(10 / 10 requests within the SLO), p99 TTFT 0.20 / 0.25 s (at least as good: met)" in (
        headline_markdown([res])
    )


async def _chat_with_role_chunk(request: web.Request) -> web.StreamResponse:
    # As vLLM's chat stream: an empty role delta at once, the first token 0.3 s later.
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n')
    await asyncio.sleep(0.3)
    for _ in range(3):
        await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"the "}}]}\n\n')
        await asyncio.sleep(0.01)
    usage = {"prompt_tokens": 4, "completion_tokens": 3}
    await resp.write(b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    return resp


async def test_chat_role_chunk_is_not_the_first_token() -> None:
    async with completions_server(_chat_with_role_chunk) as url, make_session(4) as s:
        req = RequestStream(_wl(api="chat")).next()
        rec = await send_one(s, url, req, 0.0, 10)
    assert rec.ok and rec.chunks == 3 and rec.completion_tokens == 3
    assert rec.ttft is not None and rec.ttft >= 0.3
