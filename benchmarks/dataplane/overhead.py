"""Added latency of the data planes, measured in one run against a trivial fast upstream.

Compares, for small completions requests at several concurrency levels (closed loop):

- ``direct``: client -> upstream (the baseline every other row is measured against);
- ``envoy-rr``: client -> Envoy (plain round robin, no picker) -> upstream;
- ``envoy-extproc``: client -> Envoy -> ext_proc picker (separate process) -> upstream, with
  response processing (TTFT, usage, served header);
- ``envoy-extproc-req``: the same with request-only processing (responses bypass the picker);
- ``builtin``: client -> ingate's built-in asyncio proxy -> upstream.

The upstream, the picker, the built-in proxy and the client each run in their own process (as in
production), with uvloop. The picker and the built-in proxy run the real gateway core (config, director,
scheduler, metrics scraper) over a one-endpoint pool, so each row is the data plane's cost plus the
real per-request decision, not a stub.

    python benchmarks/dataplane/overhead.py --duration 5 --concurrency 1,32,256

Writes a table to stdout and benchmarks/results/dataplane_overhead.json (with the machine named).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from ingate.dataplane.envoy import EnvoyProcess, EnvoySettings
from ingate.dataplane.extproc import TRANSPORTS, ExtProcServer, ExtProcServicer, Transport

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "dataplane_overhead.json"
BODY = orjson.dumps({"model": "bench", "prompt": "Say hello in one word.", "max_tokens": 1})
ANSWER = orjson.dumps(
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "choices": [{"index": 0, "text": "Hello", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 6, "completion_tokens": 1, "total_tokens": 7},
    }
)


METRICS = (
    b'vllm:num_requests_waiting{model_name="bench"} 0\n'
    b'vllm:num_requests_running{model_name="bench"} 0\n'
    b'vllm:kv_cache_usage_perc{model_name="bench"} 0.0\n'
)


def _gateway(upstream: str) -> Any:
    """The real gateway core (director, scheduler, metrics scraper) over the one upstream."""
    from ingate.config import GatewayConfig
    from ingate.gateway import Gateway

    cfg = GatewayConfig.model_validate(
        {"listen": {"host": "127.0.0.1", "port": 0}, "pool": {"endpoints": [{"address": upstream}]}}
    )
    return Gateway(cfg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- roles run in child processes ---------------------------------------------------------------


async def _run_upstream(port: int) -> None:
    from aiohttp import web

    async def completions(req: web.Request) -> web.Response:
        await req.read()
        return web.Response(body=ANSWER, content_type="application/json")

    async def metrics(req: web.Request) -> web.Response:
        return web.Response(body=METRICS, content_type="text/plain")

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    await asyncio.Event().wait()


async def _run_picker(port: int, upstream: str, transport: Transport) -> None:
    gw = _gateway(upstream)
    await gw.start()
    server = ExtProcServer(ExtProcServicer(gw.director), port=port, transport=transport)
    await server.start()
    await asyncio.Event().wait()


async def _run_builtin(port: int, upstream: str) -> None:
    from ingate.dataplane.proxy import BuiltinProxy

    gw = _gateway(upstream)
    await gw.start()
    await BuiltinProxy(gw, "127.0.0.1", port).start()
    await asyncio.Event().wait()


# --- the measuring parent -----------------------------------------------------------------------


def _spawn(role: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", role, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _wait_port(port: int, within_s: float = 15.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


async def _load(url: str, concurrency: int, duration: float) -> dict[str, float]:
    lat: list[float] = []
    errors = 0
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as http:
        # Warm-up: open the connections, let Envoy/gRPC settle.
        warm_end = time.monotonic() + min(1.0, duration / 3)
        stop = warm_end + duration

        async def worker() -> None:
            nonlocal errors
            while True:
                t0 = time.perf_counter()
                now = time.monotonic()
                if now >= stop:
                    return
                try:
                    async with http.post(url, data=BODY, headers=headers) as r:
                        await r.read()
                        ok = r.status == 200
                except aiohttp.ClientError:
                    ok = False
                dt = time.perf_counter() - t0
                if now >= warm_end:
                    if ok:
                        lat.append(dt)
                    else:
                        errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    lat.sort()
    n = len(lat)
    if n == 0:
        return {"requests": 0, "errors": errors, "rps": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan")}
    return {
        "requests": n,
        "errors": errors,
        "rps": n / duration,
        "p50_ms": lat[n // 2] * 1000,
        "p99_ms": lat[min(n - 1, int(n * 0.99))] * 1000,
    }


async def _main(args: argparse.Namespace) -> None:
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    up_port = _free_port()
    procs = [_spawn("upstream", "--port", str(up_port))]
    upstream = f"127.0.0.1:{up_port}"
    envoys: list[EnvoyProcess] = []
    targets: dict[str, str] = {}
    try:
        await _wait_port(up_port)
        targets["direct"] = f"http://{upstream}"
        rr = EnvoyProcess(EnvoySettings(pool=[upstream], ext_proc=False, concurrency=args.envoy_workers))
        await rr.start()
        envoys.append(rr)
        targets["envoy-rr"] = rr.url
        picker_port = _free_port()
        procs.append(_spawn("picker", "--port", str(picker_port), "--upstream", upstream))
        await _wait_port(picker_port)
        # Full processing (responses too: TTFT, usage, served header) and request-only processing.
        for name, responses in (("envoy-extproc", True), ("envoy-extproc-req", False)):
            ep = EnvoyProcess(
                EnvoySettings(
                    pool=[upstream],
                    picker_port=picker_port,
                    failure_mode="FailClose",
                    concurrency=args.envoy_workers,
                    response_processing=responses,
                )
            )
            await ep.start()
            envoys.append(ep)
            targets[name] = ep.url
        bport = _free_port()
        procs.append(_spawn("builtin", "--port", str(bport), "--upstream", upstream))
        await _wait_port(bport)
        targets["builtin"] = f"http://127.0.0.1:{bport}"

        rows: list[dict[str, Any]] = []
        for c in concurrencies:
            base: dict[str, float] | None = None
            for name, url in targets.items():
                r = await _load(url + "/v1/completions", c, args.duration)
                if name == "direct":
                    base = r
                assert base is not None
                row = {
                    "dataplane": name,
                    "concurrency": c,
                    **r,
                    "added_p50_ms": r["p50_ms"] - base["p50_ms"],
                    "added_p99_ms": r["p99_ms"] - base["p99_ms"],
                }
                rows.append(row)
                print(
                    f"c={c:<4} {name:<14} rps={r['rps']:8.0f}  p50={r['p50_ms']:7.2f} ms  "
                    f"p99={r['p99_ms']:7.2f} ms  added p50={row['added_p50_ms']:6.2f} ms  "
                    f"added p99={row['added_p99_ms']:6.2f} ms  errors={r['errors']}",
                    flush=True,
                )
        out = {
            "benchmark": "dataplane_overhead",
            "machine": {
                "cpu": _cpu_name(),
                "cores": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "duration_s": args.duration,
            "envoy_workers": args.envoy_workers,
            "request_bytes": len(BODY),
            "response_bytes": len(ANSWER),
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
        print(f"wrote {args.out}")
    finally:
        for e in envoys:
            await e.stop()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    """Command-line entry: measure, or run one child role."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=["bench", "upstream", "picker", "builtin"], default="bench")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--upstream", default="")
    ap.add_argument("--transport", choices=TRANSPORTS, default="h2", help="picker role: ext_proc gRPC server")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell")
    ap.add_argument("--concurrency", default="1,32,256")
    ap.add_argument("--envoy-workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not (args.role == "picker" and os.environ.get("INGATE_PICKER_LOOP") == "asyncio"):
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
    if args.role == "upstream":
        asyncio.run(_run_upstream(args.port))
    elif args.role == "picker":
        asyncio.run(_run_picker(args.port, args.upstream, args.transport))
    elif args.role == "builtin":
        asyncio.run(_run_builtin(args.port, args.upstream))
    else:
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
