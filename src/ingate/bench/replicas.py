"""Active-active pickers under test: `ingate-replicasN` and `ingate-replicasN+shared`.

N `ingate serve` gateways (built-in proxy, the workload's scheduler config) in front of the same fleet,
behind one Envoy that spreads requests over them round-robin, as a Gateway spreads ext_proc streams
over several picker pods. Each replica learns its own prefix index; `+shared` turns on prefix sharing
between them (`ingate.prefixshare`, UDP on loopback). `ingate-replicas1` is the same path with one
replica: the baseline that isolates what splitting the traffic costs.
"""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import yaml

from ingate.bench.systems import (
    Fleet,
    RunningSystem,
    SystemUnavailable,
    _find_envoy,
    _wait_http,
    envoy_bootstrap,
    free_port,
    ingate_config,
)
from ingate.bench.workload import Workload
from ingate.procs import spawn

NAME = re.compile(r"ingate-replicas(\d)(\+shared)?")


def is_replicas(name: str) -> bool:
    return NAME.fullmatch(name) is not None


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_replicas(name: str, wl: Workload, fleet: Fleet, workdir: Path) -> RunningSystem:
    """Start N gateways and the round-robin Envoy in front of them (see the module docstring)."""
    m = NAME.fullmatch(name)
    if m is None or not 1 <= int(m[1]) <= 8:
        raise SystemUnavailable(f"{name!r}: use ingate-replicasN or ingate-replicasN+shared, N in 1-8")
    n, shared = int(m[1]), m[2] is not None
    envoy = _find_envoy()
    ports = [free_port() for _ in range(n)]
    udp = [_free_udp_port() for _ in range(n)]
    tag = name.replace("+", "-")
    sysm = RunningSystem(
        name, "", [], {"dataplane": "builtin", "replicas": str(n), "prefix_sharing": str(shared)}
    )
    try:
        for i, port in enumerate(ports):
            cfg = ingate_config(wl, fleet.addresses, port)
            if shared:
                cfg["prefixSharing"] = {
                    "listen": f"127.0.0.1:{udp[i]}",
                    "peers": [f"127.0.0.1:{u}" for j, u in enumerate(udp) if j != i],
                }
            path = workdir / f"{tag}-{i}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            cmd = [sys.executable, "-m", "ingate", "serve", "--config", str(path), "--log-level", "warning"]
            proc = spawn(cmd, workdir / f"{tag}-{i}.log")
            sysm.procs.append(proc)
            _wait_http(f"http://127.0.0.1:{port}/ready", proc, 60)
        port, admin = free_port(), free_port()
        boot = workdir / f"envoy-{tag}.yaml"
        boot.write_text(
            yaml.safe_dump(envoy_bootstrap([f"127.0.0.1:{p}" for p in ports], port, admin, "ROUND_ROBIN"))
        )
        cmd = [envoy, "-c", str(boot), "--log-level", "warning", "--concurrency", "1", "--base-id", str(port)]
        proc = spawn(cmd, workdir / f"envoy-{tag}.log")
        sysm.procs.append(proc)
        sysm.url = f"http://127.0.0.1:{port}"
        _wait_http(f"http://127.0.0.1:{admin}/ready", proc, 60)
    except SystemUnavailable:
        sysm.stop()
        raise
    return sysm
