"""Child processes started by ingate's tools (simulated fleets, gateways and Envoy in benchmarks)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ChildProcess:
    """A supervised child process and the file its output goes to (if any)."""

    proc: subprocess.Popen[bytes]
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


def spawn(cmd: Sequence[str], log: Path | None = None, env: Mapping[str, str] | None = None) -> ChildProcess:
    """Start `cmd` with unbuffered output into `log` (or nowhere).

    Where `setpriv --pdeathsig` exists the child is killed with its parent, so a crashed harness never
    leaves a fleet or an Envoy behind.
    """
    setpriv = shutil.which("setpriv")
    full = [setpriv, "--pdeathsig", "KILL", "--", *cmd] if setpriv else list(cmd)
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    if log is None:
        return ChildProcess(
            subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        )
    with log.open("wb") as fh:
        return ChildProcess(subprocess.Popen(full, stdout=fh, stderr=subprocess.STDOUT, env=env), log)
