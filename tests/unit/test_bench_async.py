"""`ingate bench async` arithmetic: per-scenario summary and the derived ratios."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingate.bench.asyncbench import Params, Scenario, _summary, derive, table
from ingate.bench.loadgen import RequestRecord


def rec(ttft: float, tokens: int = 64, status: int = 200) -> RequestRecord:
    return RequestRecord(send=0.0, group=0, status=status, ttft=ttft, e2e=1.0, completion_tokens=tokens)


def test_summary_and_idle_capacity_share() -> None:
    p = Params(max_num_seqs=4)
    alone = Scenario("realtime-alone", duration_s=10.0)
    alone.rt_records = [rec(0.1 * (i + 1)) for i in range(10)] + [rec(0.1, status=429)]
    # Two replicas sampled twice: one busy sample of four, two slots of eight in use on average.
    alone.samples = [(0.0, [2, 0], [0, 0]), (0.1, [0, 0], [1, 0])]
    with_async = Scenario("ingate", duration_s=10.0, async_done=50)
    with_async.rt_records = [rec(0.1 * (i + 1) * 1.05) for i in range(10)]
    with_async.samples = [(0.0, [4, 4], [0, 0])]
    scen = {"realtime-alone": _summary(alone, p), "ingate": _summary(with_async, p)}
    a = scen["realtime-alone"]
    assert (a["rt_requests"], a["rt_ok"]) == (11, 10)
    assert a["rt_ttft_p99_s"] == pytest.approx(1.0) and a["rt_tokens_per_s"] == pytest.approx(64.0)
    assert a["busy_fraction"] == pytest.approx(0.25) and a["slot_utilisation"] == pytest.approx(0.125)
    assert scen["ingate"]["async_tokens_per_s"] == pytest.approx(320.0)  # 50 x 64 tokens / 10 s
    derive(scen, capacity_tokens_per_s=464.0)  # idle when alone: 464 - 64 = 400 tokens/s
    assert scen["ingate"]["idle_capacity_used"] == pytest.approx(0.8)
    assert scen["ingate"]["rt_p99_vs_alone"] == pytest.approx(1.05)
    rows = table({"scenarios": scen})
    assert rows[1][0] == "ingate" and rows[1][3] == "1.05x" and rows[1][-1] == "80%"


def test_repeated_runs_pool_ttfts_and_spread_ratios() -> None:
    from ingate.bench.asyncruns import aggregate, run_seed
    from ingate.bench.asyncruns import table as runs_table

    def run(alone: list[float], gate: list[float], used: float) -> dict[str, object]:
        def s(ttfts: list[float], idle: float) -> dict[str, object]:
            return {
                "rt_ttfts_s": ttfts, "rt_ttft_p50_s": None, "rt_ttft_p99_s": max(ttfts),
                "rt_p99_vs_alone": None, "busy_fraction": 0.5, "async_per_s": 2.0,
                "idle_capacity_used": idle, "rt_ok": len(ttfts), "rt_requests": len(ttfts),
                "async_completed": 10,
            }  # fmt: skip

        return {"scenarios": {"realtime-alone": s(alone, 0.0), "ingate": s(gate, used)}}

    # 100 TTFTs per run; run 2's tail is slower, so the pooled p99 (index round(0.99 x 199) = 197 of 200) sits in it.
    runs = [
        run([0.01 * i for i in range(100)], [0.011 * i for i in range(100)], 0.8),
        run([0.02 * i for i in range(100)], [0.02 * i for i in range(100)], 0.6),
    ]
    summ = aggregate(runs)
    g = summ["ingate"]
    assert g["rt_pooled_n"] == 200 and g["async_completed"] == 20
    assert g["idle_capacity_used"] == pytest.approx({"mean": 0.7, "min": 0.6, "max": 0.8})
    assert summ["realtime-alone"]["rt_pooled_p99_s"] == pytest.approx(1.94)
    assert g["rt_pooled_p99_vs_alone"] == pytest.approx(1.0)
    row = runs_table(summ)[1]
    assert row[0] == "ingate" and row[3] == "1.00x" and row[-1] == "70% (60-80%)"
    assert [run_seed(7, 10_000, k) for k in range(3)] == [10_007, 10_107, 10_207]


def test_added_runs_continue_the_seeds_and_pool_with_the_earlier_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ingate.bench import asyncbench

    seeds: list[int] = []

    def fake_run(p: Params, log: object) -> dict[str, object]:
        seeds.append(p.seed)
        scen = {
            n: {"rt_ttfts_s": [0.1, 0.2], "rt_ttft_p50_s": 0.1, "rt_ttft_p99_s": 0.2, "rt_ok": 2,
                "rt_requests": 2, "async_completed": 0, "rt_p99_vs_alone": 1.0}
            for n in ("realtime-alone", "ingate")
        }  # fmt: skip
        return {"seed": p.seed, "capacity": {}, "rt_rate": 1.0, "scenarios": scen}

    monkeypatch.setattr(asyncbench, "_run_once", fake_run)
    monkeypatch.setattr(asyncbench, "_plot", lambda results, png: None)
    out = tmp_path
    p = Params(gates=("ingate",), runs=2, seed_set="eval")
    first = asyncbench.run_bench(p, out, log=lambda s: None)
    both = asyncbench.run_bench(p, out, log=lambda s: None, add_to=first)
    assert seeds == [10007, 10107, 10207, 10307]  # the added runs never repeat a seed
    assert both["params"]["runs"] == 4 and both["summary"]["ingate"]["rt_pooled_n"] == 8
    with pytest.raises(ValueError, match="duration_s"):
        asyncbench.run_bench(Params(gates=("ingate",), seed_set="eval", duration_s=5), out, add_to=both)


def test_server_side_view_separates_real_time_from_async(tmp_path: Path) -> None:
    from ingate.bench.asyncbench import _server_side

    log = tmp_path / "sim-requests.jsonl"
    lines = [
        '{"id": "a00001", "ttft_s": 0.5, "preemptions": 2}',
        '{"id": "a00002", "ttft_s": 0.4, "preemptions": 0}',
        '{"id": "3f2a9c0d1e", "ttft_s": 0.02, "preemptions": 0}',
        '{"id": "9b8e7d6c5f", "ttft_s": 0.04, "preemptions": 1}',
        "not json",
    ]
    log.write_text("\n".join(lines) + "\n")
    s = _server_side(log)
    assert s["rt_server_ttfts_s"] == [0.02, 0.04] and s["rt_server_ttft_p99_s"] == 0.04
    assert (s["async_preemptions"], s["async_finished_on_servers"]) == (2, 2)
    assert _server_side(tmp_path / "missing.jsonl") == {}
