"""`ingate bench rerun`: a results file is its own recipe; rerunning it sends the same requests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ingate", "bench", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=110, cwd=ROOT)


def _requests(res: dict) -> list[list[tuple[int, int]]]:
    """Per stage, the requests in arrival order as (stream, prompt tokens)."""
    (system,) = res["systems"]
    return [
        [
            (r["stream"], r["prompt_tokens"])
            for r in sorted(st["records"], key=lambda r: (r["stream"], r["send"]))
        ]
        for st in system["stages"]
    ]


def test_rerun_repeats_the_stored_run_with_its_seeds_rates_and_systems(tmp_path: Path) -> None:
    first, again = tmp_path / "first", tmp_path / "again"
    proc = _bench(
        "run", "benchmarks/configs/quick.yaml", "--eval", "--systems", "ingate", "--rates", "5",
        "--streams", "2", "--duration", "2", "--out", str(first), "--no-report", "--no-db",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (src,) = first.glob("quick_*.json")

    dry = _bench("rerun", str(src), "--dry-run")
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-2000:]
    assert "eval seeds (seed 10001)" in dry.stdout and "rates 5 x 2 s, 2 stream(s)" in dry.stdout
    assert not list(first.glob("quick_*.json"))[1:]  # a dry run runs nothing

    assert _bench("knees", str(src)).returncode == 0  # the original has a knee table ...
    proc = _bench("rerun", str(src), "--out", str(again))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (out,) = again.glob("quick_*Z.json")
    a, b = json.loads(src.read_text()), json.loads(out.read_text())
    # Same workload (evaluation seeds not shifted a second time), same systems, same requests.
    assert b["workload"] == a["workload"] and b["workload"]["seed_set"] == "eval"
    assert [s["name"] for s in b["systems"]] == ["ingate"]
    assert _requests(b) == _requests(a) and sum(map(len, _requests(a))) > 0
    assert out.with_suffix(".png").exists()
    assert out.with_name(out.stem + "_knees.md").exists()  # ... so the rerun gets one too

    # A later run can add streams: --first-stream 1 sends exactly what stream 1 sent above.
    more = tmp_path / "more"
    proc = _bench(
        "run", "benchmarks/configs/quick.yaml", "--eval", "--systems", "ingate", "--rates", "5",
        "--streams", "1", "--first-stream", "1", "--duration", "2", "--out", str(more), "--no-report",
        "--no-db",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (third,) = more.glob("quick_*.json")
    c = json.loads(third.read_text())
    assert c["workload"]["load"]["first_stream"] == 1
    stream1 = [[r for r in stage if r[0] == 1] for stage in _requests(a)]
    assert _requests(c) == stream1 and all(stream1)
    dry = _bench("rerun", str(third), "--dry-run")
    assert "1 stream(s) from stream 1" in dry.stdout, dry.stdout
    clash = _bench("merge", str(src), str(third), "--out", str(more))
    assert clash.returncode != 0 and "join up" in clash.stderr  # stream 1 is in both


def test_rerun_refuses_what_it_cannot_repeat(tmp_path: Path) -> None:
    other = tmp_path / "results.json"
    other.write_text(json.dumps({"format": "ingate-async/1"}))
    proc = _bench("rerun", str(other))
    assert proc.returncode != 0 and "not an `ingate bench run` results file" in proc.stderr
    bad = tmp_path / "quick_20260101T000000Z.json"
    bad.write_text(json.dumps({"format": "ingate-bench/1", "workload": {"name": "x", "bogus": 1}}))
    proc = _bench("rerun", str(bad))
    assert proc.returncode != 0 and "not valid for this version" in proc.stderr
    assert _bench("rerun").returncode != 0  # nothing to rerun is an error, not a silent success
