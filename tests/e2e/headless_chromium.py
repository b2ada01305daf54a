"""Open a local HTML file in Debian's headless chromium and report what a user would see: a screenshot,
console errors and uncaught exceptions, and the value of JavaScript expressions. A minimal Chrome
DevTools Protocol client over aiohttp's WebSocket (Playwright is not available here)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1400,1800",
]


def find_chromium() -> str | None:
    """The chromium binary (Debian's `chromium`), or None."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageReport:
    """What loading the page produced."""

    screenshot: bytes = b""
    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)


class _CDP:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.loaded = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = msg.json()
            if "id" in data:
                fut = self.pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
            else:
                self.events.append(data)
                if data.get("method") == "Page.loadEventFired":
                    self.loaded.set()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        i = next(self.ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[i] = fut
        await self.ws.send_json({"id": i, "method": method, "params": params})
        data = await asyncio.wait_for(fut, 30)
        if "error" in data:
            raise RuntimeError(f"{method}: {data['error']}")
        result: dict[str, Any] = data.get("result", {})
        return result


async def _drive(port: int, url: str, expressions: dict[str, str]) -> PageReport:
    rep = PageReport()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/json/list") as r:
            targets = await r.json()
        page = next(t for t in targets if t.get("type") == "page")
        async with s.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            cdp = _CDP(ws)
            for domain in ("Page", "Runtime", "Log"):
                await cdp.call(f"{domain}.enable")
            cdp.loaded.clear()
            await cdp.call("Page.navigate", url=url)
            await asyncio.wait_for(cdp.loaded.wait(), 30)
            await asyncio.sleep(0.3)  # let late console messages arrive
            for name, expr in expressions.items():
                res = await cdp.call("Runtime.evaluate", expression=expr, returnByValue=True)
                rep.values[name] = res.get("result", {}).get("value")
            shot = await cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            rep.screenshot = base64.b64decode(shot["data"])
            cdp.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cdp.reader
    for ev in cdp.events:
        m, p = ev.get("method"), ev.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            rep.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            rep.console_errors.append(str(p["entry"].get("text")))
        elif m == "Runtime.exceptionThrown":
            rep.exceptions.append(str(p.get("exceptionDetails", {}).get("text")))
    return rep


def open_page(path: Path, expressions: dict[str, str], timeout_s: float = 60.0) -> PageReport:
    """Load `path` in a fresh headless chromium (own profile directory), evaluate `expressions`, and take
    a full-page screenshot."""
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found")
    # Chromium's helper processes (renderer, crash handler) can still write into the profile after the
    # browser exits: the whole process group is stopped below, and a straggler's late file does not
    # fail the test at cleanup.
    with tempfile.TemporaryDirectory(prefix="ingate-chromium-", ignore_cleanup_errors=True) as prof:
        cmd = [exe, *FLAGS, f"--user-data-dir={prof}", "about:blank"]
        log = (Path(prof) / "chromium.log").open("wb")  # a file, not a pipe nobody drains
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=log, env=dict(os.environ), start_new_session=True
        )
        try:
            port_file = Path(prof) / "DevToolsActivePort"
            deadline = time.monotonic() + timeout_s
            while not (port_file.exists() and port_file.read_text().strip()):
                if proc.poll() is not None:
                    err = (Path(prof) / "chromium.log").read_text(errors="replace")
                    raise RuntimeError(f"chromium exited with {proc.returncode}: {err[-2000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError("chromium did not open its DevTools port")
                time.sleep(0.05)
            port = int(port_file.read_text().split()[0])
            return asyncio.run(
                asyncio.wait_for(_drive(port, path.resolve().as_uri(), expressions), timeout_s)
            )
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # helpers that outlived the browser
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            log.close()
