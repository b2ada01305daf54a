"""A throwaway local ``redis-server`` (or a Redis Cluster of several) on loopback ports (tests,
benchmarks, demos).

Runs the Debian ``redis-server`` binary with persistence in a given directory (AOF, fsync every second)
bound to 127.0.0.1 only, protected mode on, and stops it on exit.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
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


def _free_cluster_port() -> int:
    """A free port P <= 55535 whose cluster bus port P + 10,000 is free too (Redis needs both)."""
    import random

    for _ in range(200):
        port = random.randint(20000, 55535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a Redis Cluster node")


@contextmanager
def local_redis(workdir: Path, *, timeout_s: float = 10.0, cluster: bool = False) -> Iterator[str]:
    """Start redis-server in ``workdir``; yields its URL (redis://127.0.0.1:PORT/0). With ``cluster``
    the server runs in cluster mode with no slots yet (see :func:`local_redis_cluster`)."""
    binary = redis_binary()
    if binary is None:
        raise FileNotFoundError("redis-server is not installed (Debian: apt-get install -y redis-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_cluster_port() if cluster else _free_port()
    cmd = [
        binary,
        "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
        "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no",
    ]  # fmt: skip
    if cluster:
        cmd += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
        cmd += ["--cluster-node-timeout", "2000", "--appendfilename", f"appendonly-{port}.aof"]
        cmd += ["--appenddirname", f"aof-{port}"]
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


@contextmanager
def local_redis_cluster(workdir: Path, *, primaries: int = 3, timeout_s: float = 20.0) -> Iterator[str]:
    """A Redis Cluster of ``primaries`` servers (no replicas) in ``workdir``, the 16,384 hash slots split
    evenly between them; yields ``redis://127.0.0.1:PORT/0?cluster=1`` naming the first node (the
    cluster client discovers the others)."""
    import redis

    with ExitStack() as stack:
        urls = [stack.enter_context(local_redis(workdir, cluster=True)) for _ in range(primaries)]
        ports = [int(u.rsplit(":", 1)[1].split("/")[0]) for u in urls]
        clients = [redis.Redis(host="127.0.0.1", port=p) for p in ports]
        try:
            per = 16384 // primaries
            for i, c in enumerate(clients):
                hi = 16383 if i == primaries - 1 else (i + 1) * per - 1
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, hi)
            for p in ports[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", p)
            deadline = time.monotonic() + timeout_s
            while True:
                infos = [c.execute_command("CLUSTER", "INFO") for c in clients]
                text = [i.decode() if isinstance(i, bytes) else str(i) for i in infos]
                if all("cluster_state:ok" in t and f"cluster_known_nodes:{primaries}" in t for t in text):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis cluster did not converge: {text}")
                time.sleep(0.05)
        finally:
            for c in clients:
                c.close()
        yield f"redis://127.0.0.1:{ports[0]}/0?cluster=1"
