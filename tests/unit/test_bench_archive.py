"""`ingate bench archive`: superseded runs become compact summaries, the files go away."""

from __future__ import annotations

from pathlib import Path

import orjson

from ingate.bench.archive import archive


def test_archive_keeps_a_compact_summary_and_removes_the_files(tmp_path: Path) -> None:
    recs = [
        {"send": 0.1 * i, "status": 200, "error": "", "ttft": 0.5 * i, "e2e": 1.0, "itl_mean": None,
         "completion_tokens": 2, "prompt_tokens": 10, "stream": 0}
        for i in range(1, 5)
    ]  # fmt: skip
    run = {
        "format": "ingate-bench/1",
        "workload": {"name": "w", "seed": 3, "slo": {"ttft_s": 1.0, "e2e_s": None}, "load": {"streams": 1}},
        "started_utc": "2026-12-01T00:00:00Z",
        "systems": [
            {"name": "ingate", "stages": [{"rate": 2, "duration_s": 2.0, "summary": {}, "records": recs}]},
            {"name": "peer", "unavailable": "not installed"},
        ],
    }
    f = tmp_path / "w_20261201T000000Z.json"
    f.write_bytes(orjson.dumps(run))
    f.with_suffix(".png").write_bytes(b"png")
    knees = [f.with_name(f.stem + "_knees.json"), f.with_name(f.stem + "_knees.md")]
    for k in knees:
        k.write_text("knee table")
    other = tmp_path / "dataplane_overhead_run1.json"
    other.write_bytes(
        orjson.dumps({"benchmark": "dataplane", "rows": [{"plane": "envoy", "p50_ms": 0.5, "raw": [1, 2]}]})
    )
    (tmp_path / "async-x").mkdir()
    asy = tmp_path / "async-x" / "results.json"
    asy.write_bytes(
        orjson.dumps(
            {
                "params": {"runs": 3, "seed_set": "eval"},
                "started": "2026-12-04T00:00:00Z",
                "scenarios": {"ingate": {"rt_ttfts_s": [0.1, 0.2], "rt_ttft_p99_s": 0.2}},
                "summary": {"ingate": {"rt_pooled_p99_vs_alone": 1.1, "idle_capacity_used": {"mean": 0.9}}},
            }
        )
    )
    index = tmp_path / "archive.json"
    archive([f, other, asy], index, tmp_path)
    assert not asy.exists()
    assert not f.exists() and not f.with_suffix(".png").exists() and not other.exists()
    assert not any(k.exists() for k in knees)  # its knee table describes a run no longer there
    entries = orjson.loads(index.read_bytes())
    bench, dp, asum = entries
    assert asum["kind"] == "async" and asum["file"] == "async-x/results.json"
    assert asum["params"]["seed_set"] == "eval"  # the pooled summary, never the raw TTFT lists
    assert asum["scenarios"] == {
        "ingate": {"rt_pooled_p99_vs_alone": 1.1, "idle_capacity_used": {"mean": 0.9}}
    }
    assert bench["workload"] == "w" and bench["seed_set"] == "tuning"
    (stage,) = bench["systems"][0]["stages"]
    assert stage["good"] == 2 and stage["sent"] == 4 and stage["goodput_rps"] == 1.0  # ttft <= 1 s: 2 of 4
    assert bench["systems"][1]["unavailable"] == "not installed"
    assert dp["kind"] == "dataplane" and dp["rows"] == [{"plane": "envoy", "p50_ms": 0.5}]
    archive([], index, tmp_path)
    assert len(orjson.loads(index.read_bytes())) == 3  # appends, never rewrites what is there
