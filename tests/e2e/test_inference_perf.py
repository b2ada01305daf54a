"""inference-perf (PyPI 0.7.0) against ingate, offline, through benchmarks/inference-perf/run.sh.

Opt-in (INGATE_TEST_INFERENCE_PERF=1): it needs the separate `.venv-iperf` (Python 3.12; run.sh creates
it from PyPI on first use, which takes minutes), so it is not part of the default CI run.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.skipif(
    os.environ.get("INGATE_TEST_INFERENCE_PERF") != "1", reason="opt-in: INGATE_TEST_INFERENCE_PERF=1"
)
def test_inference_perf_shared_prefix_against_ingate(tmp_path: Path) -> None:
    cfg = yaml.safe_load((ROOT / "benchmarks/inference-perf/shared-prefix.yaml").read_text())
    cfg["load"]["stages"] = [{"rate": 2, "duration": 6}]  # the shipped config, one short stage
    cfg["storage"]["local_storage"]["path"] = str(tmp_path / "out")
    cfg["tokenizer"]["pretrained_model_name_or_path"] = str(tmp_path / "tok")
    path = tmp_path / "iperf.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "TOKENIZER_DIR": str(tmp_path / "tok")}
    script = ROOT / "benchmarks/inference-perf/run.sh"
    proc = subprocess.run([str(script), str(path)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary_lifecycle_metrics.json").read_text())
    assert summary["failures"]["count"] == 0
    ok = summary["successes"]
    assert ok["count"] >= 5
    assert ok["output_len"]["min"] == ok["output_len"]["max"] == 32  # re-tokenised text = usage
    assert ok["prompt_tokens"]["mean"] == pytest.approx(3300, abs=1)  # 3000 system + 300 question
    assert ok["goodput_metrics"]["total_requests"] == ok["count"]
