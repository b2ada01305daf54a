"""The benchmark database: `ingate bench` results and a real inference-perf report round-trip every metric."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ingate.bench.db import BenchDB, CurveKey, Point, RunInfo, Series, series_from_json, series_to_json
from ingate.bench.dbcli import db_group
from ingate.bench.importers import ImportError_, load_bench_file, load_inference_perf
from ingate.bench.stats import resummarize
from ingate.cli import main

ROOT = Path(__file__).resolve().parents[2]
# A committed `ingate bench` results file (the newest mixed-workload run: several systems and rates).
BENCH_FILE = sorted((ROOT / "benchmarks/results/eval").glob("mixed_*.json"))[-1]
IPERF = ROOT / "tests/fixtures/inference-perf/report"

# `ingate bench` summary key -> database column ("itl" there is each request's mean inter-token gap:
# its time per output token).
BENCH_MAP = {
    "sent": "sent",
    "ok": "ok",
    "errors": "errors",
    "throughput_rps": "throughput_rps",
    "output_tok_s": "output_tok_s",
    "goodput_rps": "goodput_rps",
    "slo_attainment": "slo_attainment",
    "cached_token_share": "cache_hit_rate",
    **{f"{m}_p{q}": f"{m}_p{q}" for m in ("ttft", "e2e") for q in (50, 90, 99)},
    **{f"itl_p{q}": f"tpot_p{q}" for q in (50, 90, 99)},
}


def _db(tmp_path: Path) -> BenchDB:
    return BenchDB(tmp_path / "bench.db")


def test_bench_results_round_trip_every_metric(tmp_path: Path) -> None:
    # The summaries `ingate bench report` shows: recomputed from the records with today's definitions.
    res = resummarize(json.loads(BENCH_FILE.read_text()))
    db = _db(tmp_path)
    for key, run, points in load_bench_file(BENCH_FILE):
        db.record(key, run, points)
    db.close()
    db = _db(tmp_path)  # reopened from the file
    got = {s.key.gateway: s for s in db.series()}
    systems = [s for s in res["systems"] if s.get("stages")]
    assert sorted(got) == sorted(s["name"] for s in systems)
    wl = res["workload"]
    for system in systems:
        s = got[system["name"]]
        assert s.key.model == wl["model"] and s.key.workload == "mixed"
        assert s.key.replicas == wl["fleet"]["replicas"]
        assert s.key.accelerator == "h100" and s.key.accelerator_profile == "h100-llama3-8b"
        args = wl["fleet"]["args"]
        i = args.index("--time-scale")
        assert s.key.server_args == ("--profile", "h100-llama3-8b", *args[:i], *args[i + 2 :])
        assert s.run.time_scale == float(args[i + 1])
        assert s.key.seeds.startswith(f"seed={wl['seed']} streams={wl['load']['streams']}")
        assert s.run.kind == "simulated" and not s.run.estimated
        assert s.run.calibration.startswith("h100-llama3-8b: measured")
        assert len(s.points) == len(system["stages"])
        for p, st in zip(s.points, system["stages"], strict=True):
            assert p.rate == st["rate"] and p.duration_s == st["duration_s"]
            for theirs, ours in BENCH_MAP.items():
                assert getattr(p, ours) == st["summary"][theirs], (system["name"], theirs)
            assert p.slo_ttft_s == wl["slo"]["ttft_s"] and p.slo_e2e_s == wl["slo"]["e2e_s"]
            ok = [r for r in st["records"] if r["status"] == 200 and not r["error"]]
            ratio = sum(r["prompt_tokens"] for r in ok) / sum(r["completion_tokens"] for r in ok)
            assert p.input_tok_s == pytest.approx(st["summary"]["output_tok_s"] * ratio)
    db.close()


def _iperf_pct(dist: dict[str, float], q: int) -> float:
    return dist["median"] if q == 50 else dist[f"p{q}"]


def test_inference_perf_report_round_trips_every_metric(tmp_path: Path) -> None:
    triples = load_inference_perf(
        IPERF,
        model="meta-llama/Llama-3.1-8B-Instruct",
        accelerator="h100",
        model_server="ingate-sim",
        replicas=2,
        workload="shared-prefix-small",
        kind="simulated",
    )
    db = _db(tmp_path)
    for key, run, points in triples:
        db.record(key, run, points)
    (s,) = db.series(model="META-LLAMA/Llama-3.1-8B-Instruct")  # case-insensitive filters
    db.close()
    assert s.run.tool == "inference-perf" and s.run.kind == "simulated"
    stages = sorted(IPERF.glob("stage_*_lifecycle_metrics.json"))
    assert len(s.points) == len(stages) == 2
    names = {"ttft": "time_to_first_token", "tpot": "time_per_output_token"}
    names |= {"itl": "inter_token_latency", "e2e": "request_latency"}
    for p, f in zip(s.points, stages, strict=True):
        doc = json.loads(f.read_text())
        succ = doc["successes"]
        assert p.rate == doc["load_summary"]["requested_rate"]
        assert (p.sent, p.ok, p.errors) == (
            doc["load_summary"]["count"],
            succ["count"],
            doc["failures"]["count"],
        )
        assert p.duration_s == doc["benchmark_time_seconds"]
        assert p.throughput_rps == succ["throughput"]["requests_per_sec"]
        assert p.input_tok_s == succ["throughput"]["input_tokens_per_sec"]
        assert p.output_tok_s == succ["throughput"]["output_tokens_per_sec"]
        for ours, theirs in names.items():
            for q in (50, 90, 99):
                assert getattr(p, f"{ours}_p{q}") == _iperf_pct(succ["latency"][theirs], q), (ours, q)
        gm = succ["goodput_metrics"]
        assert p.goodput_rps == gm["request_goodput"]
        assert p.slo_attainment == pytest.approx(gm["goodput_percentage"] / 100)
        assert (p.slo_ttft_s, p.slo_tpot_s) == (0.1, 0.02)  # from the config.yaml saved beside it
        assert p.cache_hit_rate == succ["prompt_tokens"]["cached"] / succ["prompt_tokens"]["total"]
        assert p.ttft_p90 is not None and 0 < p.ttft_p90 < 10


def test_db_import_cli_takes_both_formats_and_asks_for_the_deployment(tmp_path: Path) -> None:
    db = str(tmp_path / "cli.db")
    r = CliRunner().invoke(main, ["db", "import", str(IPERF), "--db", db])
    assert r.exit_code != 0 and "needs --model and --accelerator" in r.output
    args = ["db", "import", str(IPERF), str(BENCH_FILE), "--db", db, "--model", "m", "--accelerator", "h100"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(db_group, ["list", "--db", db])
    assert r.exit_code == 0 and "inference-perf" in r.output and "ingate-bench" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    r = CliRunner().invoke(db_group, ["import", str(bad), "--db", db])
    assert r.exit_code != 0 and "not an `ingate bench` results file" in r.output


def test_not_a_report_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImportError_, match="no inference-perf lifecycle reports"):
        load_inference_perf(tmp_path, model="m", accelerator="h100")
    (tmp_path / "stage_0_lifecycle_metrics.json").write_text("[]")
    with pytest.raises(ImportError_, match="not an inference-perf lifecycle report"):
        load_inference_perf(tmp_path, model="m", accelerator="h100")


def _series(time_scale: float) -> Series:
    key = CurveKey(
        "m", "h100", 1, "h100-llama3-8b", "ingate-sim", (), 2, "ingate", "default", "chat", "seed=0"
    )
    run = RunInfo("ingate-bench", "simulated", "cal", False, "x", time_scale=time_scale)
    return Series(1, 1, key, run, [Point(rate=1.0, ttft_p90=2.0, output_tok_s=100.0, sent=10, ok=10)])


def test_normalised_series_is_in_hardware_time() -> None:
    # Slowed down 10x: latencies were 10x the modelled ones and rates a tenth.
    n = _series(0.1).normalised()
    (p,) = n.points
    assert p.rate == pytest.approx(10.0) and p.ttft_p90 == pytest.approx(0.2)
    assert p.output_tok_s == pytest.approx(1000.0) and p.sent == 10 and n.run.time_scale == 1.0
    s = _series(1.0)
    assert s.normalised() is s


def test_json_export_round_trips(tmp_path: Path) -> None:
    triples = load_bench_file(BENCH_FILE)
    db = _db(tmp_path)
    for t in triples:
        db.record(*t)
    first = series_to_json(db.series())
    db2 = BenchDB(":memory:")
    for t in series_from_json(json.loads(json.dumps(first))):
        db2.record(*t)
    second = series_to_json(db2.series())
    assert _strip_nan(first) == _strip_nan(second)
    db.close()
    db2.close()


def _strip_nan(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _strip_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_strip_nan(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return x


def test_latest_run_of_a_curve_wins(tmp_path: Path) -> None:
    db = _db(tmp_path)
    s = _series(1.0)
    db.record(s.key, s.run, s.points)
    db.record(s.key, s.run, [Point(rate=2.0, ttft_p90=3.0)])
    (got,) = db.series()
    assert [p.rate for p in got.points] == [2.0]
    assert len(db.series(latest_only=False)) == 2
    assert db.distinct("model") == ["m"]
    db.close()


def test_db_seed_loads_the_committed_curves(tmp_path: Path) -> None:
    db = str(tmp_path / "seed.db")
    r = CliRunner().invoke(db_group, ["seed", "--db", db])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(db_group, ["list", "--db", db, "--workload", "rag"])
    assert r.exit_code == 0 and "estimated" in r.output and "ingate-replay" in r.output
    got = BenchDB(db)
    assert {s.key.workload for s in got.series()} == {"chat", "rag", "batch"}
    got.close()


def test_a_sqlalchemy_url_works_like_a_path(tmp_path: Path) -> None:
    s = _series(1.0)
    url = f"sqlite:///{tmp_path / 'by-url.db'}"
    db = BenchDB(url)
    db.record(s.key, s.run, s.points)
    db.close()
    (got,) = BenchDB(tmp_path / "by-url.db").series()  # the same file, opened by path
    assert got.key == s.key and got.points == s.points


def test_another_schema_version_is_refused(tmp_path: Path) -> None:
    import sqlalchemy as sa

    BenchDB(tmp_path / "v.db").close()
    eng = sa.create_engine(f"sqlite:///{tmp_path / 'v.db'}")
    with eng.begin() as conn:
        conn.execute(sa.text("UPDATE meta SET value = '99' WHERE key = 'schema_version'"))
    eng.dispose()
    with pytest.raises(ValueError, match="schema version 99"):
        BenchDB(tmp_path / "v.db")


def test_an_unusable_database_url_is_a_clear_cli_error(tmp_path: Path) -> None:
    r = CliRunner().invoke(db_group, ["list", "--db", "nosuchdialect://x/y"])
    assert r.exit_code != 0 and "cannot open the benchmark database" in r.output
    args = ["quickstart", "recommend", "--db", "nosuchdialect://x/y", "--model", "m", "--rps", "1"]
    r = CliRunner().invoke(main, [*args, "--ttft-p90", "1"])
    assert r.exit_code != 0 and "cannot open the benchmark database" in r.output
