"""The README's main command, shortened: both profiles run against a fresh fleet and are reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_quickstart_runs_both_profiles(tmp_path: Path) -> None:
    out = tmp_path / "qs.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ingate",
            "quickstart",
            "--duration",
            "2",
            "--replicas",
            "2",
            "--rate",
            "15",
            "--json-out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "round-robin" in proc.stdout and "TTFT p99" in proc.stdout
    results = {r["profile"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"default", "round-robin"}
    for r in results.values():
        assert r["errors"] == 0 and len(r["ttft"]) > 10 and r["output_tokens"] > 0
        assert 0.0 < r["hit_rate"] <= 1.0
