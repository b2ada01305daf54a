"""Start `ingate sim` as a child process and wait until every replica listens (tests, demo, benchmarks)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ingate.procs import ChildProcess, spawn


@dataclass
class SimProcess(ChildProcess):
    """A running `ingate sim` child and its replicas' `host:port` addresses."""

    addresses: list[str] = field(default_factory=list)
    profiles: dict[str, str] = field(default_factory=dict)
    """Each replica's simulator profile name, by address."""


def launch_sim(
    replicas: int, args: Sequence[str], workdir: Path, *, timeout_s: float = 60.0, log: Path | None = None
) -> SimProcess:
    """Start `ingate sim --replicas N --base-port 0 ARGS...` and return once its ready file appears."""
    ready = workdir / f"sim-ready-{time.monotonic_ns()}.json"
    cmd = [
        sys.executable,
        "-m",
        "ingate",
        "sim",
        "--replicas",
        str(replicas),
        "--base-port",
        "0",
        "--ready-file",
        str(ready),
        *args,
    ]
    child = spawn(cmd, log)
    sp = SimProcess(child.proc, child.log)
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if sp.proc.poll() is not None:
            raise RuntimeError(f"ingate sim exited with {sp.proc.returncode}: {sp.tail()}")
        if time.monotonic() > deadline:
            sp.stop()
            raise TimeoutError("ingate sim did not become ready")
        time.sleep(0.05)
    info = json.loads(ready.read_text())["replicas"]
    sp.addresses = [r["address"] for r in info]
    sp.profiles = {r["address"]: r["profile"] for r in info}
    return sp
