"""A throwaway local ``redis-server`` on a loopback port (tests, benchmarks, demos).

Runs the Debian ``redis-server`` binary with persistence in a given directory (AOF, fsync every second)
bound to 127.0.0.1 only, protected mode on, and stops it on exit.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ingate.procs import ChildProcess, spawn


def redis_binary() -> str | None:
    """Path of ``redis-server`` (PATH or /usr/bin), None when not installed."""
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def local_redis(workdir: Path, *, timeout_s: float = 10.0) -> Iterator[str]:
    """Start redis-server in ``workdir``; yields its URL (redis://127.0.0.1:PORT/0)."""
    binary = redis_binary()
    if binary is None:
        raise FileNotFoundError("redis-server is not installed (Debian: apt-get install -y redis-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    cmd = [
        binary,
        "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
        "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no",
    ]  # fmt: skip
    proc: ChildProcess = spawn(cmd, workdir / f"redis-{port}.log")
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {proc.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server did not answer PING: {proc.tail()}")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()
