"""`ingate bench knees`: knees, 'past the knee', and the verdict against the best peer."""

from __future__ import annotations

from typing import Any

from ingate.bench.knees import markdown, system_knees, verdict


def system(name: str, good_by_rate: dict[float, int], sent: int = 100) -> dict[str, Any]:
    stages = []
    for rate, good in good_by_rate.items():
        summary = {"sent": sent, "good": good, "slo_attainment": good / sent, "offered_s": 20.0}
        summary |= {"ttft_p90": rate / 10, "ttft_p99": rate / 5}
        stages.append({"rate": rate, "summary": summary})
    return {"name": name, "stages": stages}


RES = {
    "workload": {"name": "b2b"},
    "systems": [
        system("ingate", {8: 100, 12: 99, 16: 95, 20: 70}),
        system("sglang-router", {8: 100, 12: 95, 16: 60, 20: 40}),
        system("vllm-router", {8: 98, 12: 80, 16: 50, 20: 30}),
        system("round-robin", {8: 50, 12: 30, 16: 20, 20: 10}),
        {"name": "broken", "unavailable": "could not install"},
    ],
}


def test_knees_and_first_rate_past_them() -> None:
    k = {row["system"]: row for row in system_knees(RES)}
    assert (k["ingate"]["knee"], k["ingate"]["past_knee_at"]) == (16, 20)
    assert (k["sglang-router"]["knee"], k["sglang-router"]["past_knee_at"]) == (12, 16)
    assert k["round-robin"]["knee"] is None and k["round-robin"]["past_knee_at"] == 8
    assert k["ingate"]["goodput_rps"] == 95 / 20 and "broken" not in k


def test_verdict_at_the_best_peers_saturation_load() -> None:
    v = verdict(RES)
    assert v["best_peer"] == "sglang-router" and v["rate"] == 16
    assert v["good"] == [95, 60] and v["status"] == "met"
    assert "1.58x" in markdown(RES)
    # A best peer never pushed past its knee: no verdict, and it says why.
    short = {**RES, "systems": [system("ingate", {8: 100}), system("sglang-router", {8: 100})]}
    assert verdict(short)["status"].startswith("not reached")
    # Two peers with the same knee: the one serving more past it is the one to beat.
    tie = {**RES, "systems": [*RES["systems"][:2], system("vllm-router", {8: 100, 12: 95, 16: 85})]}
    v = verdict(tie)
    assert v["best_peer"] == "vllm-router" and v["good"] == [95, 85] and v["status"] == "NOT met"


def test_tables_show_what_arrived_not_only_the_nominal_rate() -> None:
    # 100 requests over 20 offered seconds is 5 req/s arrived, whatever the stage was called.
    k = {row["system"]: row for row in system_knees(RES)}
    assert k["ingate"]["arrived_rps"] == 5.0
    assert verdict(RES)["arrived_rps"] == 5.0
    assert "at 16 req/s (5.0 arrived)" in markdown(RES)
