"""Start `ingate sim` as a child process and wait until every replica listens (tests, demo, benchmarks)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class SimProcess:
    """A running `ingate sim` child and its replicas' `host:port` addresses."""

    proc: subprocess.Popen[bytes]
    addresses: list[str]
    log: Path | None = None

    def stop(self) -> None:
        """Terminate, then kill if it does not exit within 10 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def tail(self) -> str:
        """The end of the child's log (for error messages)."""
        try:
            return self.log.read_text(errors="replace")[-800:] if self.log else ""
        except OSError:
            return ""


def launch_sim(
    replicas: int, args: Sequence[str], workdir: Path, *, timeout_s: float = 60.0, log: Path | None = None
) -> SimProcess:
    """Start `ingate sim --replicas N --base-port 0 ARGS...` and return once its ready file appears.

    The child is killed with its parent where `setpriv --pdeathsig` exists, so a crashed harness never
    leaves a fleet behind.
    """
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
    setpriv = shutil.which("setpriv")
    if setpriv:
        cmd = [setpriv, "--pdeathsig", "KILL", "--", *cmd]
    out = log.open("wb") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    sp = SimProcess(proc, [], log)
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"ingate sim exited with {proc.returncode}: {sp.tail()}")
        if time.monotonic() > deadline:
            sp.stop()
            raise TimeoutError("ingate sim did not become ready")
        time.sleep(0.05)
    sp.addresses = [r["address"] for r in json.loads(ready.read_text())["replicas"]]
    return sp
