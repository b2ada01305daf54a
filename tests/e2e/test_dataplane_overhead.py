"""The data-plane overhead benchmark end to end, at toy durations: real Envoy, pickers, upstream and
client processes on loopback. It checks the harness (every plane measured, no errors, the CPU split and
Envoy's phases recorded), not the numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "dataplane" / "overhead.py"


def test_overhead_benchmark_measures_each_plane_and_splits_the_picker_cpu(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--duration",
            "1",
            "--stream-duration",
            "1.5",
            "--concurrency",
            "2",
            "--tokens",
            "4",
            "--phases",
            "--only",
            "envoy-rr,envoy-extproc-req,envoy-extproc-null",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = orjson.loads(out.read_bytes())
    rows = {(r["set"], r["dataplane"]): r for r in doc["rows"]}
    planes = ("direct", "envoy-rr", "envoy-extproc-req", "envoy-extproc-null")
    assert set(rows) == {(s, p) for s in ("tiny", "stream") for p in planes}
    for r in rows.values():
        assert r["requests"] > 0 and r["errors"] == 0, r
    for s in ("tiny", "stream"):
        # The streams' first tokens came through every plane, and the direct row is the baseline.
        assert rows[(s, "direct")]["added_p50_ms"] == 0.0
        assert rows[(s, "envoy-extproc-null")]["p50_ms"] > 0
        for plane in ("envoy-extproc-req", "envoy-extproc-null"):
            r = rows[(s, plane)]
            # The picker is one of the plane's processes: its share is positive and below the whole.
            assert 0 < r["picker_cpu_us_per_request"] < r["dataplane_cpu_us_per_request"], r
            assert r["envoy_phases_us"]["decision_us"]["p50"] > 0, r
        assert "picker_cpu_us_per_request" not in rows[(s, "envoy-rr")]
    assert rows[("stream", "envoy-extproc-null")]["ttft_p50_ms"] > 0
