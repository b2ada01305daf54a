"""Peer routers in the bench harness: command lines, policy names, and the 'cannot run' path."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ingate.bench import peers, systems
from ingate.bench.workload import Workload


def test_sglang_command_binds_router_and_metrics_to_loopback() -> None:
    spec, policy = peers.resolve("sglang-router")
    assert policy == "cache_aware"
    cmd = peers.peer_command(spec, policy, "/x/sglang-router", ["127.0.0.1:9001", "127.0.0.1:9002"], 30, 31)
    assert cmd[:2] == ["/x/sglang-router", "launch"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--prometheus-host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "30"
    assert cmd[cmd.index("--prometheus-port") + 1] == "31"
    i = cmd.index("--worker-urls")
    assert cmd[i + 1 : i + 3] == ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
    assert cmd[cmd.index("--policy") + 1] == "cache_aware"


def test_vllm_router_default_and_explicit_policy() -> None:
    spec, policy = peers.resolve("vllm-router")
    assert policy == "cache_aware"  # as its docs recommend; it gets token ids from render
    assert "render" in spec.note("cache_aware")
    _, policy = peers.resolve("vllm-router:power_of_two")
    assert policy == "power_of_two"
    cmd = peers.peer_command(spec, policy, "vr", ["127.0.0.1:1"], 2, 3)
    assert cmd[0] == "vr" and cmd[1] == "--host"  # no subcommand
    with pytest.raises(peers.PeerUnavailable, match="unknown policy"):
        peers.resolve("vllm-router:nope")


def test_split_and_is_peer() -> None:
    assert peers.split_name("sglang-router:round_robin") == ("sglang-router", "round_robin")
    assert peers.is_peer("vllm-router:random") and not peers.is_peer("round-robin")


def _wl() -> Workload:
    return Workload.model_validate({"name": "t", "data": {"type": "random"}})


def test_missing_peer_without_install_is_unavailable_with_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INGATE_PEERS_VENV", str(tmp_path / "no-venv"))
    monkeypatch.setenv("INGATE_BENCH_NO_INSTALL", "1")
    fleet = systems.Fleet(proc=None, addresses=["127.0.0.1:1"])  # type: ignore[arg-type]
    with pytest.raises(systems.SystemUnavailable, match="not installed") as e:
        systems.start_system("sglang-router", _wl(), fleet, tmp_path)
    assert "install-peers" in str(e.value)


def test_failed_install_is_unavailable_with_pip_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake_py = venv / "bin" / "python"  # a "python" whose pip always fails
    fake_py.write_text("#!/bin/sh\necho 'ERROR: No matching distribution found' >&2\nexit 1\n")
    fake_py.chmod(fake_py.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("INGATE_PEERS_VENV", str(venv))
    monkeypatch.delenv("INGATE_BENCH_NO_INSTALL", raising=False)
    fleet = systems.Fleet(proc=None, addresses=["127.0.0.1:1"])  # type: ignore[arg-type]
    with pytest.raises(systems.SystemUnavailable, match="No matching distribution"):
        systems.start_system("vllm-router", _wl(), fleet, tmp_path)


def test_peer_that_exits_at_start_is_unavailable_with_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    exe = venv / "bin" / "vllm-router"
    exe.write_text("#!/bin/sh\necho 'router: cannot bind' >&2\nexit 3\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("INGATE_PEERS_VENV", str(venv))
    fleet = systems.Fleet(proc=None, addresses=["127.0.0.1:1"])  # type: ignore[arg-type]
    with pytest.raises(systems.SystemUnavailable, match="cannot bind") as e:
        systems.start_system("vllm-router", _wl(), fleet, tmp_path)
    assert "vllm-router==0.1.17 (cache_aware)" in str(e.value)
    assert os.path.exists(tmp_path / "vllm-router.log")


def test_router_proof_keeps_the_policy_counters_and_sums_workers() -> None:
    from ingate.bench.peers import router_proof

    text = """# TYPE vllm_router_policy_decisions_total counter
vllm_router_policy_decisions_total{policy="cache_aware",worker="http://a"} 4
vllm_router_policy_decisions_total{policy="cache_aware",worker="http://b"} 2
# TYPE vllm_router_kv_routing_inputs_total counter
vllm_router_kv_routing_inputs_total{transport="http",result="render"} 12
# TYPE smg_router_requests_total counter
smg_router_requests_total{model="m"} 6
"""
    assert router_proof(text) == {
        'vllm_router_policy_decisions_total{policy="cache_aware"}': 6.0,
        'vllm_router_kv_routing_inputs_total{result="render",transport="http"}': 12.0,
    }
