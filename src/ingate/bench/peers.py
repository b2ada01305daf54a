"""Peer routers from PyPI (`sglang-router`, `vllm-router`) as systems under test.

They are installed into their own virtual environment (default `.venv-peers`, override with
`INGATE_PEERS_VENV`), never into ingate's: `ingate bench install-peers` (= `make peers`) creates it, and
the harness creates it on first use unless `INGATE_BENCH_NO_INSTALL=1`. A peer that cannot be installed
or started becomes `SystemUnavailable` with the reason, which lands in the results and the table.

A system name may carry a policy: `sglang-router:round_robin`, `vllm-router:cache_aware`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


class PeerUnavailable(RuntimeError):
    """The peer cannot be installed or run here (the message says why)."""


@dataclass(frozen=True)
class PeerSpec:
    """How to install and launch one peer router."""

    name: str
    requirement: str  # exact pin installed into the peers venv
    executable: str  # console script in the venv's bin/
    subcommand: tuple[str, ...]
    policies: tuple[str, ...]
    default_policy: str
    notes: dict[str, str] = field(default_factory=dict)  # policy -> what it does against the simulator
    extra_args: tuple[str, ...] = ()

    def note(self, policy: str) -> str:
        """What `policy` does here (for the results file)."""
        return self.notes.get(policy, policy)


PEERS: dict[str, PeerSpec] = {
    "sglang-router": PeerSpec(
        name="sglang-router",
        requirement="sglang-router==0.3.2",
        executable="sglang-router",
        subcommand=("launch",),
        policies=("random", "round_robin", "cache_aware", "power_of_two"),
        default_policy="cache_aware",
        notes={
            "cache_aware": "approximate radix tree over the raw prompt text per worker, switching to "
            "least-load when the load imbalance passes its thresholds",
        },
        # Stop within a second instead of waiting up to 180 s for in-flight requests.
        extra_args=("--shutdown-grace-period-secs", "1", "--log-level", "warn"),
    ),
    "vllm-router": PeerSpec(
        name="vllm-router",
        requirement="vllm-router==0.1.17",
        executable="vllm-router",
        subcommand=(),
        policies=(
            "random",
            "round_robin",
            "cache_aware",
            "kv_aware",
            "power_of_two",
            "consistent_hash",
            "sticky_least_loaded",
        ),
        default_policy="cache_aware",
        notes={
            "power_of_two": "two random workers, the less loaded one (the router's own in-flight counts)",
            "cache_aware": "radix tree over token ids it gets from the workers' POST "
            "/v1/completions/render (real vLLM with --enable-scale-out; the simulator serves it), "
            "switching to least-load past its imbalance thresholds",
        },
        extra_args=("--log-level", "warning"),
    ),
}


# The routers' own counters that show the policy at work (recorded per run as `info.router_metrics`):
# sglang-router counts selections per policy; vllm-router its prefix decisions (hit/miss), where its
# token ids came from (`result="render"`: the backends' render endpoint) and selections per policy.
PROOF_FAMILIES = (
    "smg_worker_selection_total",
    "vllm_router_prefix_routing_decisions_total",
    "vllm_router_kv_routing_inputs_total",
    "vllm_router_policy_decisions_total",
)


def router_proof(metrics_text: str) -> dict[str, float]:
    """The PROOF_FAMILIES series of a router's /metrics (label sets kept; per-worker series summed)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(metrics_text):
        for smp in fam.samples:
            if smp.name not in PROOF_FAMILIES:
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(smp.labels.items()) if k != "worker")
            key = f"{smp.name}{{{labels}}}"
            out[key] = out.get(key, 0.0) + smp.value
    return out


def split_name(system: str) -> tuple[str, str | None]:
    """`'vllm-router:cache_aware'` -> `('vllm-router', 'cache_aware')`; no suffix -> policy None."""
    base, _, policy = system.partition(":")
    return base, (policy or None)


def is_peer(system: str) -> bool:
    """True when `system` names a peer router (with or without a policy suffix)."""
    return split_name(system)[0] in PEERS


def resolve(system: str) -> tuple[PeerSpec, str]:
    """The peer spec and the policy to run for system name `system`."""
    base, policy = split_name(system)
    spec = PEERS[base]
    policy = policy or spec.default_policy
    if policy not in spec.policies:
        raise PeerUnavailable(f"{base}: unknown policy {policy!r} (known: {', '.join(spec.policies)})")
    return spec, policy


def peers_venv() -> Path:
    """The virtual environment holding the peers."""
    return Path(os.environ.get("INGATE_PEERS_VENV", ".venv-peers")).resolve()


def peer_command(
    spec: PeerSpec, policy: str, exe: str, addresses: list[str], port: int, metrics_port: int
) -> list[str]:
    """The command line that starts `spec` on loopback (router and Prometheus listener) over `addresses`."""
    return [
        exe,
        *spec.subcommand,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(metrics_port),
        "--worker-urls",
        *(f"http://{a}" for a in addresses),
        "--policy",
        policy,
        *spec.extra_args,
    ]


def ensure_installed(spec: PeerSpec, install: bool | None = None, timeout_s: float = 600.0) -> str:
    """Path of the peer's executable, installing it into the peers venv first if needed and allowed."""
    venv = peers_venv()
    exe = venv / "bin" / spec.executable
    if exe.exists():
        return str(exe)
    if install is None:
        install = os.environ.get("INGATE_BENCH_NO_INSTALL", "") not in ("1", "true", "yes")
    if not install:
        raise PeerUnavailable(
            f"{spec.name} not installed in {venv} (run `ingate bench install-peers` or `make peers`)"
        )
    install_peers([spec], timeout_s=timeout_s)
    if not exe.exists():
        raise PeerUnavailable(f"{spec.name}: installed, but {exe} is missing")
    return str(exe)


def install_peers(specs: list[PeerSpec] | None = None, timeout_s: float = 600.0) -> Path:
    """Create the peers venv (if absent) and pip-install the pinned peers into it; returns the venv."""
    specs = list(PEERS.values()) if specs is None else specs
    venv = peers_venv()
    py = venv / "bin" / "python"
    try:
        if not py.exists():
            _run([sys.executable, "-m", "venv", str(venv)], timeout_s)
        _run([str(py), "-m", "pip", "install", "-q", *(s.requirement for s in specs)], timeout_s)
    except PeerUnavailable as e:
        names = ", ".join(s.name for s in specs)
        raise PeerUnavailable(f"could not install {names} into {venv}: {e}") from None
    return venv


def _run(cmd: list[str], timeout_s: float) -> None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PeerUnavailable(f"{cmd[0]}: {e}") from None
    if p.returncode != 0:
        raise PeerUnavailable(
            f"`{' '.join(cmd[:4])} ...` exited {p.returncode}: {(p.stderr or p.stdout)[-400:]}"
        )
