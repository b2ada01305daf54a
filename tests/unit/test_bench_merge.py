"""`ingate bench merge`: runs of one workload over streams 0-1 and 2 make one three-stream results file."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingate.bench.loadgen import RequestRecord, StageResult
from ingate.bench.merge import MergeError, merge, write_merged
from ingate.bench.rerun import plan
from ingate.bench.runner import _stage_entry, results_json
from ingate.bench.stats import RESULTS_FORMAT, summarize
from ingate.bench.workload import Workload, load_workload, with_seed_set

ROOT = Path(__file__).resolve().parents[2]
SYSTEMS = ["ingate", "ingate:slo-aware"]


def _workload(first: int, streams: int, rates: list[float] | None = None) -> Workload:
    wl = with_seed_set(load_workload(ROOT / "benchmarks/configs/quick.yaml"), "eval")
    wl.systems = list(SYSTEMS)
    wl.load.rates = rates or [2.0, 4.0]
    wl.load.duration_s = 5.0
    wl.load.first_stream, wl.load.streams = first, streams
    return Workload.model_validate(wl.model_dump())


def _errors(p90: float) -> dict[str, dict[str, float]]:
    return {"slo-aware/ttft": {"0.5": 0.1, "0.9": p90, "0.99": 0.9, "n": 100.0}}


def _run(tmp: Path, name: str, first: int, streams: int, rates: list[float] | None = None) -> Path:
    """A results file as `ingate bench run` writes it, with made-up records for streams first.."""
    wl = _workload(first, streams, rates)
    rng = random.Random(first)
    systems: list[dict[str, Any]] = []
    for sys_name in SYSTEMS:
        stages = []
        for rate in wl.load.rates:
            st = StageResult(rate=rate, concurrency=None, duration_s=wl.load.duration_s)
            for k in range(first, first + streams):
                for i in range(int(rate * wl.load.duration_s)):
                    ttft = rng.uniform(0.05, 3.0)
                    st.records.append(
                        RequestRecord(send=i / rate, group=0, status=200, ttft=ttft, e2e=ttft + 1.0,
                                      prompt_tokens=100, completion_tokens=10, stream=k)
                    )  # fmt: skip
            st.peak_inflight = 3 + first
            stages.append(_stage_entry(st, wl, wl.slo.model_dump()))
        info: dict[str, Any] = {"kind": "ingate"}
        if sys_name == "ingate:slo-aware":
            per = [_errors(0.3 + 0.1 * k) for k in range(first, first + streams)]
            info["latency_prediction_error"] = per[0]
            if streams > 1:
                info["latency_prediction_error_streams"] = per
        systems.append({"name": sys_name, "info": info, "stages": stages, "max_sustainable_rate": None})
    res = {"format": RESULTS_FORMAT, "workload": wl.model_dump(), "started_utc": f"2026-12-04T0{first}:00:00Z",
           "systems": systems, "wall_s": 60.0 * streams}  # fmt: skip
    path = tmp / name
    path.write_bytes(results_json(res))
    return path


def test_merge_pools_streams_as_if_they_had_run_at_once(tmp_path: Path) -> None:
    a = _run(tmp_path, "quick_20261204T000000Z.json", 0, 2)
    b = _run(tmp_path, "quick_20261204T010000Z.json", 2, 1)
    merged = merge([b, a])  # any order: sorted by first stream
    ra, rb = orjson.loads(a.read_bytes()), orjson.loads(b.read_bytes())
    assert merged["workload"]["load"]["streams"] == 3 and merged["workload"]["load"]["first_stream"] == 0
    assert [m["file"] for m in merged["merged_from"]] == [a.name, b.name]
    assert merged["wall_s"] == 180.0
    slo = merged["workload"]["slo"]
    for i, name in enumerate(SYSTEMS):
        entry = merged["systems"][i]
        assert entry["name"] == name
        for j, st in enumerate(entry["stages"]):
            recs = ra["systems"][i]["stages"][j]["records"] + rb["systems"][i]["stages"][j]["records"]
            assert st["records"] == recs
            assert st["summary"] == summarize(recs, st["duration_s"], slo)
            assert st["summary"]["streams"] == 3
            assert st["summary"]["good"] == (
                ra["systems"][i]["stages"][j]["summary"]["good"]
                + rb["systems"][i]["stages"][j]["summary"]["good"]
            )
            assert st["peak_inflight"] == 5
    errs = merged["systems"][1]["info"]
    assert len(errs["latency_prediction_error_streams"]) == 3
    pooled = errs["latency_prediction_error"]["slo-aware/ttft"]
    assert pooled["streams"] == 3 and pooled["0.9"] == pytest.approx(0.4) and pooled["n"] == 300
    assert "latency_prediction_error" not in merged["systems"][0]["info"]


def test_merged_file_is_a_rerunnable_recipe_even_past_nine_streams(tmp_path: Path) -> None:
    a = _run(tmp_path, "quick_20261204T000000Z.json", 0, 6)
    b = _run(tmp_path, "quick_20261204T010000Z.json", 6, 6)
    out = write_merged([a, b], tmp_path / "merged")
    assert out.name.startswith("quick_") and out.suffix == ".json"
    again = plan(out)  # what `ingate bench rerun` would run: all twelve streams at once
    assert again.workload.load.streams == 12 and again.workload.load.first_stream == 0
    assert again.systems == SYSTEMS and again.workload.seed_set == "eval"


def test_merge_refuses_what_does_not_join_up(tmp_path: Path) -> None:
    a = _run(tmp_path, "quick_20261204T000000Z.json", 0, 2)
    overlap = _run(tmp_path, "quick_20261204T010000Z.json", 1, 1)
    gap = _run(tmp_path, "quick_20261204T020000Z.json", 3, 1)
    other = _run(tmp_path, "quick_20261204T030000Z.json", 2, 1, rates=[2.0, 5.0])
    with pytest.raises(MergeError, match="join up"):
        merge([a, overlap])
    with pytest.raises(MergeError, match="join up"):
        merge([a, gap])
    with pytest.raises(MergeError, match="another workload"):
        merge([a, other])
    with pytest.raises(MergeError, match="at least two"):
        merge([a])
    res = orjson.loads(gap.read_bytes())
    res["systems"] = res["systems"][:1]
    res["workload"]["load"]["first_stream"] = 2
    fewer = tmp_path / "quick_20261204T040000Z.json"
    fewer.write_bytes(results_json(res))
    with pytest.raises(MergeError, match="other systems"):
        merge([a, fewer])


def test_stream_indexes_keep_seeds_distinct() -> None:
    wl = _workload(0, 1)
    assert Workload.model_validate({**wl.model_dump(), "load": {**wl.load.model_dump(), "first_stream": 90,
                                                                 "streams": 10}})  # fmt: skip
    with pytest.raises(ValueError, match=r"streams 0\.\.99"):
        Workload.model_validate(
            {**wl.model_dump(), "load": {**wl.load.model_dump(), "first_stream": 95, "streams": 6}}
        )
    tenants = load_workload(ROOT / "benchmarks/workloads/flowcontrol.yaml")
    d = tenants.model_dump()
    d["load"]["first_stream"], d["load"]["streams"] = 8, 2
    Workload.model_validate(d)
    d["load"]["first_stream"] = 9  # stream 10 would replay the second tenant's stream 0
    with pytest.raises(ValueError, match="multi-tenant"):
        Workload.model_validate(d)


def _with_scheduler(path: Path, scheduler: dict[str, Any]) -> Path:
    res = orjson.loads(path.read_bytes())
    res["workload"]["gateway"] = {"scheduler": scheduler}
    path.write_bytes(results_json(res))
    return path


def test_merge_compares_profiles_as_the_gateway_resolves_them(tmp_path: Path) -> None:
    """A run whose workload spells out the built-in precise profile and a later one that `extends` it
    to the same plugins are one workload; a changed weight is another."""
    from ingate.scheduling.config import default_profiles

    spelled = default_profiles()["precise-prefix"].model_dump(exclude_defaults=True)
    spelled["scorers"][0]["parameters"] = {"eventsPortOffset": 1000}
    a = _with_scheduler(_run(tmp_path, "quick_20261204T000000Z.json", 0, 2), {"profiles": {"p": spelled}})
    ext = {"extends": "precise-prefix", "parameters": {"precise-prefix": {"eventsPortOffset": 1000}}}
    b = _with_scheduler(_run(tmp_path, "quick_20261204T010000Z.json", 2, 1), {"profiles": {"p": ext}})
    assert merge([a, b])["workload"]["load"]["streams"] == 3
    heavier = {**ext, "weights": {"predicted-latency": 5}}
    c = _with_scheduler(_run(tmp_path, "quick_20261204T020000Z.json", 2, 1), {"profiles": {"p": heavier}})
    with pytest.raises(MergeError, match="another workload"):
        merge([a, c])
