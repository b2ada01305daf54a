"""A fleet of simulated replicas in one process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

from ingate.sim.profiles import SimProfile, get_profile
from ingate.sim.server import Replica, ReplicaConfig


@dataclass(slots=True)
class SimFleetConfig:
    """A fleet: `replicas` copies of one replica config; `profiles` may give each its own profile."""

    replicas: int = 1
    base_port: int = 0
    """First port; replica i listens on base_port + i. 0 = ephemeral ports."""
    profiles: list[str] = field(default_factory=lambda: ["h100-llama3-8b"])
    """One name for all replicas, or one per replica (cycled)."""
    overrides: dict[str, int | float | None] = field(default_factory=dict)
    """Profile fields to override (num_gpu_blocks, block_size, max_num_seqs, max_num_batched_tokens)."""
    replica: ReplicaConfig | None = None
    """Template for the rest (model, time scale, LoRA, faults); its profile is replaced per replica."""
    hosts: list[str] = field(default_factory=list)
    """Bind addresses cycled over replicas (default: the template's host). Replicas on different
    addresses share port numbers, like pods on their own IPs: replica i binds hosts[i % H] and takes
    port slot i // H (HTTP port base_port + slot, KV-event ports likewise)."""

    def replica_configs(self) -> list[ReplicaConfig]:
        if self.replicas < 1:
            raise ValueError("replicas must be at least 1")
        base = self.replica or ReplicaConfig(profile=get_profile(self.profiles[0]))
        hosts = self.hosts or [base.host]
        out = []
        for i in range(self.replicas):
            prof: SimProfile = get_profile(self.profiles[i % len(self.profiles)]).with_overrides(
                **self.overrides
            )
            slot = i // len(hosts)
            out.append(
                replace(
                    base,
                    profile=prof,
                    index=i,
                    host=hosts[i % len(hosts)],
                    port=_nth_port(self.base_port, slot) or 0,
                    lora_adapters=list(base.lora_adapters),
                    # Like the HTTP port: the given port + slot (0 stays ephemeral).
                    kv_events_port=_nth_port(base.kv_events_port, slot),
                    kv_events_replay_port=_nth_port(base.kv_events_replay_port, slot),
                )
            )
        return out


def _nth_port(port: int | None, i: int) -> int | None:
    return port + i if port else port


class SimFleet:
    """Running replicas; `addresses` are host:port strings in replica order."""

    def __init__(self, cfg: SimFleetConfig) -> None:
        self.replicas = [Replica(rc) for rc in cfg.replica_configs()]

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self.replicas]

    async def start(self) -> None:
        try:
            for r in self.replicas:
                await r.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for r in self.replicas:
            await r.stop()


@asynccontextmanager
async def start_fleet(cfg: SimFleetConfig) -> AsyncIterator[SimFleet]:
    """Start a fleet for the duration of the block."""
    fleet = SimFleet(cfg)
    await fleet.start()
    try:
        yield fleet
    finally:
        await fleet.stop()
