"""Added latency of the data planes, measured in one run against a trivial fast upstream.

Two row sets, each at several concurrency levels (closed loop), every data plane measured side by side:

- ``tiny``: small non-streaming completions (83-byte request, 180-byte JSON answer) against an
  upstream that answers at once. Each worker sends the next request as soon as the previous one is
  answered, so at 32 and 256 workers this measures the maximum request rate (CPU throughput of the
  whole chain on this machine) more than a data plane's own latency;
- ``stream``: streaming generations (SSE) from an upstream that emits tokens at a realistic pace
  (first token after ``--prefill-ms``, then one every ``--token-interval-ms``, ``--tokens`` tokens and
  a usage chunk). The added latency is the time to first token (TTFT) minus the direct TTFT at the
  same concurrency: what a user of a streaming API feels. Every token chunk passes through the data
  plane (and, with full ext_proc processing, through the picker).

Data planes:

- ``direct``: client -> upstream (the baseline every other row is measured against);
- ``envoy-rr``: client -> Envoy (plain round robin, no picker) -> upstream;
- ``envoy-extproc``: client -> Envoy -> ext_proc picker (separate process, default transport: the
  in-loop HTTP/2 server) -> upstream, default response processing ``observe`` (the response streams
  to the picker on an observability-mode filter that does not wait for it: TTFT, usage);
- ``envoy-extproc-full``: response processing ``full`` (the picker answers every response message:
  the default before ``observe``);
- ``envoy-extproc-req``: request-only processing ``none`` (responses bypass the picker);
- ``envoy-extproc-grpcio``: the default (``observe``) with the picker on grpcio
  (``picker_transport: grpcio``, the implementation before the in-loop server);
- ``envoy-extproc-null``: request-only processing with the real ext_proc servicer and transport over
  a null director that routes every request to the upstream without reading it (no parsing, flow
  control or scheduling): the floor of an ext_proc picker in Python on this machine, so the rest of
  ``envoy-extproc-req``'s added latency is ingate's own per-request work;
- ``envoy-extproc-{null,full}-{grpcio,grpclib,h2lib}``: the null-director and ``full`` planes with the
  picker on another gRPC transport (grpcio; `ingate.dataplane.grpclib_server`, grpclib in the picker's
  loop; `ingate.dataplane.h2_server`, the `h2` library plus thin gRPC framing in the picker's loop),
  to compare them with the default in-loop server side by side (``--only``; not run by default);
- ``builtin``: client -> ingate's built-in asyncio proxy -> upstream.

The upstream, the picker, the built-in proxy and the client each run in their own process (as in
production), with uvloop. The picker and the built-in proxy run the real gateway core (config, director,
scheduler, metrics scraper) over a one-endpoint pool, so each row is the data plane's cost plus the
real per-request decision, not a stub.

    python benchmarks/dataplane/overhead.py --duration 5 --concurrency 1,32,256 [--rounds 4]

With ``--rounds N`` each cell is measured in N turns of duration/N per data plane, taken in turn and
pooled, so that background load that comes and goes on a shared machine affects every data plane alike
(the comparison within the run stays fair even when the absolute numbers are inflated).

With ``--phases`` every Envoy writes its JSON access log (``EnvoySettings.access_log``) and each Envoy
row also gets ``envoy_phases_us``: p50/p99 of Envoy's own timings over the measured requests (the
picker's decision, its gRPC round trips, the upstream's first byte, the first byte to the client), so
the added latency can be split into where it goes. With ``--pin LOAD:PLANE`` (e.g. ``0:1``) the load
generator and the upstream run on CPUs LOAD and every data plane on CPUs PLANE, as if on separate
machines.

Writes a table to stdout and benchmarks/results/dataplane/overhead.json (or --out; with the machine named).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import orjson

from ingate.dataplane.envoy_bootstrap import EnvoySettings
from ingate.dataplane.envoy_process import EnvoyProcess
from ingate.dataplane.extproc import RESPONSE_MODES, ExtProcServicer, ResponseMode
from ingate.dataplane.extproc_server import TRANSPORTS, ExtProcServer, Transport
from ingate.serve import freeze_startup_heap

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "dataplane" / "overhead.json"
BODY = orjson.dumps({"model": "bench", "prompt": "Say hello in one word.", "max_tokens": 1})
STREAM_BODY = orjson.dumps(
    {
        "model": "bench",
        "prompt": "Say hello in a few words.",
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
)
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


def _sse_chunk(text: str) -> bytes:
    event = {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": text}]}
    return b"data: " + orjson.dumps(event) + b"\n\n"


async def _run_upstream(port: int, tokens: int, prefill_s: float, interval_s: float) -> None:
    from aiohttp import web

    token = _sse_chunk(" tok")
    usage = (
        b"data: "
        + orjson.dumps(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "choices": [],
                "usage": {"prompt_tokens": 6, "completion_tokens": tokens, "total_tokens": 6 + tokens},
            }
        )
        + b"\n\ndata: [DONE]\n\n"
    )

    async def completions(req: web.Request) -> web.StreamResponse:
        body = await req.read()
        if b'"stream":true' not in body:
            return web.Response(body=ANSWER, content_type="application/json")
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(req)
        await asyncio.sleep(prefill_s)
        for i in range(tokens):
            if i:
                await asyncio.sleep(interval_s)
            await resp.write(token)
        await resp.write(usage)
        await resp.write_eof()
        return resp

    async def metrics(req: web.Request) -> web.Response:
        return web.Response(body=METRICS, content_type="text/plain")

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    await asyncio.Event().wait()


class _NullDirector:
    """Routes every request to one address, unread: what the ext_proc exchange costs by itself."""

    def __init__(self, address: str) -> None:
        self.target = SimpleNamespace(address=address)
        # The body is not parsed, so nothing is known to stream: no per-chunk work (step timing) is
        # done for it, and that cost counts as ingate's own work in the comparison.
        self.request = SimpleNamespace(stream=False)

    async def handle(self, path: str, headers: Any, raw_body: bytes) -> Any:
        return SimpleNamespace(target=self.target, request=self.request, upstream_body=raw_body)

    def on_first_token(self, decision: Any) -> None:
        pass

    def finish(self, decision: Any, info: Any) -> None:
        pass


ALT_TRANSPORTS = ("grpclib", "h2lib")
"""Transports built here rather than by `ExtProcServer` (the candidates measured against `h2`)."""


def _alt_server(svc: ExtProcServicer, transport: str) -> Any:
    """The servicer's `Process` on one of `ALT_TRANSPORTS` (wired as `ExtProcServer` wires `h2`)."""
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from ingate.dataplane.extproc_server import PROCESS_METHOD
    from ingate.dataplane.grpc_h2_frames import StreamMethod

    methods = {
        PROCESS_METHOD: StreamMethod(
            decode=pb.ProcessingRequest.FromString,
            handler=lambda requests: svc.Process(requests, None),
            encode=pb.ProcessingResponse.SerializeToString,
        )
    }
    if transport == "grpclib":
        from ingate.dataplane.grpclib_server import GrpclibServer

        return GrpclibServer(methods)
    from ingate.dataplane.h2_server import H2Server

    return H2Server(methods)


async def _run_picker(
    port: int, upstream: str, transport: str, responses: ResponseMode, null: bool = False
) -> None:
    director: Any
    if null:
        director = _NullDirector(upstream)
    else:
        gw = _gateway(upstream)
        await gw.start()
        director = gw.director
    # As EnvoyDataPlane builds it: Envoy adds the served-endpoint header itself.
    svc = ExtProcServicer(director, report_served=False, responses=responses)
    server: Any  # held to the end: a grpc.aio server that is garbage-collected stops serving
    if transport in ALT_TRANSPORTS:
        server = _alt_server(svc, transport)
        await server.start("127.0.0.1", port)
    else:
        server = ExtProcServer(svc, port=port, transport=cast(Transport, transport))
        await server.start()
    freeze_startup_heap()  # as `ingate serve` does
    await asyncio.Event().wait()
    await server.stop(0)


async def _run_builtin(port: int, upstream: str) -> None:
    from ingate.dataplane.proxy import BuiltinProxy

    gw = _gateway(upstream)
    await gw.start()
    await BuiltinProxy.serving(gw, "127.0.0.1", port).start()
    freeze_startup_heap()  # as `ingate serve` does
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


def _pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))] * 1000


class Samples:
    """What one or more load runs against one data plane measured (pooled over rounds)."""

    def __init__(self) -> None:
        self.lat: list[float] = []
        self.ttfts: list[float] = []
        self.errors = 0
        self.duration = 0.0
        self.count = 0
        """Requests sent, warm-up included."""
        self.windows: list[tuple[float, float]] = []
        """Wall-clock (epoch seconds) spans measured, warm-up excluded: which access-log lines count."""

    def summary(self, stream: bool) -> dict[str, float]:
        lat = sorted(self.lat)
        ttfts = sorted(self.ttfts)
        n = len(lat)
        if n == 0:
            nan = float("nan")
            return {"requests": 0, "errors": self.errors, "rps": 0.0, "p50_ms": nan, "p99_ms": nan}
        out = {
            "requests": n,
            "errors": self.errors,
            "rps": n / self.duration,
            "p50_ms": _pct(lat, 0.5),
            "p99_ms": _pct(lat, 0.99),
        }
        if stream:
            out["ttft_p50_ms"] = _pct(ttfts, 0.5)
            out["ttft_p99_ms"] = _pct(ttfts, 0.99)
        return out


async def _load_into(
    acc: Samples, url: str, concurrency: int, duration: float, stream: bool = False, stagger_s: float = 0.0
) -> None:
    """Closed loop: `concurrency` workers, each sending its next request when the last one ended.

    Non-streaming: latency = whole request. Streaming: TTFT = until the first body bytes (the first
    SSE event), and the request must end with `data: [DONE]`. Workers start at random offsets within
    `stagger_s` (seeded, so every data plane sees the same offsets): generations of equal length
    would otherwise stay in lockstep, every stream's token arriving in the same instant.
    """
    rng = random.Random(concurrency)
    offsets = [rng.uniform(0, stagger_s) for _ in range(concurrency)]
    lat = acc.lat
    ttfts = acc.ttfts
    body = STREAM_BODY if stream else BODY
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as http:
        # Warm-up: open the connections, let Envoy/gRPC settle.
        warm_end = time.monotonic() + min(1.0, duration / 3)
        stop = warm_end + duration
        wall = time.time() + (warm_end - time.monotonic())
        acc.windows.append((wall, wall + duration))

        async def worker(offset: float) -> None:
            await asyncio.sleep(offset)
            while True:
                t0 = time.perf_counter()
                now = time.monotonic()
                if now >= stop:
                    return
                ttft = 0.0
                try:
                    async with http.post(url, data=body, headers=headers) as r:
                        if stream:
                            first = await r.content.readany()
                            ttft = time.perf_counter() - t0
                            rest = await r.read()
                            ok = r.status == 200 and first.startswith(b"data: ")
                            ok = ok and (first + rest).endswith(b"data: [DONE]\n\n")
                        else:
                            await r.read()
                            ok = r.status == 200
                except aiohttp.ClientError:
                    ok = False
                dt = time.perf_counter() - t0
                acc.count += 1
                if now >= warm_end:
                    if ok:
                        lat.append(dt)
                        ttfts.append(ttft)
                    else:
                        acc.errors += 1

        await asyncio.gather(*(worker(o) for o in offsets))
    acc.duration += duration


def _cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) a process has used so far; None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_total(pids: list[int]) -> float | None:
    total = 0.0
    for pid in pids:
        c = _cpu_s(pid)
        if c is None:
            return None
        total += c
    return total


async def _start_targets(
    args: argparse.Namespace,
    upstream: str,
    procs: list[subprocess.Popen[bytes]],
    envoys: list[EnvoyProcess],
    pids: dict[str, list[int]] | None = None,
) -> dict[str, str]:
    """Start every data plane in front of `upstream`; {name: base URL}. `pids` gets, per data plane,
    the processes that are that data plane (Envoy, its picker, the built-in proxy) for CPU accounting."""
    pids = {} if pids is None else pids
    targets = {"direct": f"http://{upstream}"}
    pids["direct"] = []
    logs: dict[str, Path] = args.access_logs

    def log_for(name: str) -> str:
        if args.log_dir is None:
            return ""
        logs[name] = args.log_dir / f"{name}.jsonl"
        return str(logs[name])

    rr = EnvoyProcess(
        EnvoySettings(
            pool=[upstream], ext_proc=False, concurrency=args.envoy_workers, access_log=log_for("envoy-rr")
        )
    )
    await rr.start()
    envoys.append(rr)
    targets["envoy-rr"] = rr.url
    pids["envoy-rr"] = [rr.proc.pid] if rr.proc is not None else []
    # One picker process per Envoy: the picker's response mode must match its Envoy's.
    planes: tuple[tuple[str, str, ResponseMode], ...] = (
        ("envoy-extproc", "h2", "observe"),
        ("envoy-extproc-full", "h2", "full"),
        ("envoy-extproc-req", "h2", "none"),
        ("envoy-extproc-grpcio", "grpcio", "observe"),
        ("envoy-extproc-null", "h2", "none"),
    )
    # The transport comparison (docs/envoy.md "The gRPC transport"): only with --only.
    compare = tuple(
        (f"envoy-extproc-{mode}-{t}", t, cast(ResponseMode, "none" if mode == "null" else mode))
        for mode in ("null", "full")
        for t in ("grpcio", *ALT_TRANSPORTS)
    )
    only = [t for t in args.only.split(",") if t]
    for name, transport, responses in planes + compare:
        if (only and name not in only) or (not only and (name, transport, responses) in compare):
            continue
        port = _free_port()
        extra = ["--null-director"] if name.startswith("envoy-extproc-null") else []
        procs.append(
            _spawn(
                "picker",
                "--port",
                str(port),
                "--upstream",
                upstream,
                "--transport",
                transport,
                "--responses",
                responses,
                *extra,
            )
        )
        await _wait_port(port)
        ep = EnvoyProcess(
            EnvoySettings(
                pool=[upstream],
                picker_port=port,
                failure_mode="FailClose",
                concurrency=args.envoy_workers,
                response_processing=responses,
                access_log=log_for(name),
            )
        )
        await ep.start()
        envoys.append(ep)
        targets[name] = ep.url
        pids[name] = [procs[-1].pid] + ([ep.proc.pid] if ep.proc is not None else [])
    bport = _free_port()
    procs.append(_spawn("builtin", "--port", str(bport), "--upstream", upstream))
    await _wait_port(bport)
    targets["builtin"] = f"http://127.0.0.1:{bport}"
    pids["builtin"] = [procs[-1].pid]
    return {k: v for k, v in targets.items() if k == "direct" or not only or k in only}


def _row(rset: str, name: str, c: int, r: dict[str, float], base: dict[str, float]) -> dict[str, Any]:
    row: dict[str, Any] = {"set": rset, "dataplane": name, "concurrency": c, **r}
    row["added_p50_ms"] = r["p50_ms"] - base["p50_ms"]
    row["added_p99_ms"] = r["p99_ms"] - base["p99_ms"]
    if rset == "stream":
        row["added_ttft_p50_ms"] = r["ttft_p50_ms"] - base["ttft_p50_ms"]
        row["added_ttft_p99_ms"] = r["ttft_p99_ms"] - base["ttft_p99_ms"]
    return row


def _print_row(row: dict[str, Any]) -> None:
    head = f"{row['set']:<6} c={row['concurrency']:<4} {row['dataplane']:<28} rps={row['rps']:7.0f}"
    cpu = row.get("dataplane_cpu_us_per_request")
    if cpu is not None:
        head += f" cpu/req={cpu:6.0f}us"
    pcpu = row.get("picker_cpu_us_per_request")
    if pcpu is not None:
        head += f" (picker {pcpu:5.0f}us)"
    if row["set"] == "stream":
        print(
            f"{head}  ttft p50={row['ttft_p50_ms']:7.2f} p99={row['ttft_p99_ms']:7.2f} ms  "
            f"added ttft p50={row['added_ttft_p50_ms']:6.2f} p99={row['added_ttft_p99_ms']:6.2f} ms  "
            f"errors={row['errors']}",
            flush=True,
        )
    else:
        print(
            f"{head}  p50={row['p50_ms']:7.2f} p99={row['p99_ms']:7.2f} ms  "
            f"added p50={row['added_p50_ms']:6.2f} p99={row['added_p99_ms']:6.2f} ms  errors={row['errors']}",
            flush=True,
        )


PHASES = (
    "request_receive_us",
    "decision_us",
    "picker_headers_us",
    "picker_body_us",
    "upstream_first_byte_us",
    "first_byte_us",
)
"""Envoy access-log timings reported per row with `--phases` (see `ACCESS_LOG_FORMAT`)."""


def _epoch(ts: str) -> float:
    """Envoy's %START_TIME% (`2026-12-01T13:08:29.162Z`) as epoch seconds."""
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def _phases(log: Path, windows: list[tuple[float, float]]) -> dict[str, dict[str, float]]:
    """p50/p99 of each Envoy timing over the access-log lines whose request started in `windows`."""
    values: dict[str, list[float]] = {k: [] for k in PHASES}
    with contextlib.suppress(OSError), log.open("rb") as f:
        for line in f:
            try:
                rec = orjson.loads(line)
                t = _epoch(rec["start_time"])
            except (ValueError, KeyError):
                continue
            if not any(a <= t < b for a, b in windows):
                continue
            for k in PHASES:
                v = rec.get(k)
                if v is not None and v != "-":
                    values[k].append(float(v))
    out: dict[str, dict[str, float]] = {}
    for k, vs in values.items():
        if vs:
            vs.sort()
            out[k] = {"p50": vs[len(vs) // 2], "p99": vs[min(len(vs) - 1, int(len(vs) * 0.99))], "n": len(vs)}
    return out


def _print_phases(row: dict[str, Any]) -> None:
    ph = row.get("envoy_phases_us")
    if not ph:
        return
    cells = "  ".join(
        f"{k.removesuffix('_us')}={ph[k]['p50']:.0f}/{ph[k]['p99']:.0f}" for k in PHASES if k in ph
    )
    print(f"  phases {row['set']:<6} c={row['concurrency']:<4} {row['dataplane']:<28} p50/p99 us: {cells}")


def _cpus(spec: str) -> set[int]:
    """CPU list `0,2-3` -> {0, 2, 3}."""
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


async def _main(args: argparse.Namespace) -> None:
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    sets = [x for x in args.sets.split(",") if x]
    load_cpus: set[int] | None = None
    plane_cpus: set[int] | None = None
    if args.pin:
        load_spec, _, plane_spec = args.pin.partition(":")
        load_cpus, plane_cpus = _cpus(load_spec), _cpus(plane_spec)
        # Children inherit the affinity they are spawned with: the upstream gets the load generator's
        # CPUs, every data plane (Envoy with its threads, pickers, built-in proxy) the others.
        os.sched_setaffinity(0, load_cpus)
    up_port = _free_port()
    procs = [
        _spawn(
            "upstream",
            "--port",
            str(up_port),
            "--tokens",
            str(args.tokens),
            "--prefill-ms",
            str(args.prefill_ms),
            "--token-interval-ms",
            str(args.token_interval_ms),
        )
    ]
    upstream = f"127.0.0.1:{up_port}"
    envoys: list[EnvoyProcess] = []
    try:
        await _wait_port(up_port)
        pids: dict[str, list[int]] = {}
        if plane_cpus is not None:
            os.sched_setaffinity(0, plane_cpus)
        targets = await _start_targets(args, upstream, procs, envoys, pids)
        if load_cpus is not None:
            os.sched_setaffinity(0, load_cpus)
        rows: list[dict[str, Any]] = []
        measured: list[tuple[dict[str, Any], Samples]] = []
        for rset in sets:
            stream = rset == "stream"
            duration = args.stream_duration if stream else args.duration
            # Stream workers start spread over one generation (see `_load`).
            stagger = (args.prefill_ms + args.tokens * args.token_interval_ms) / 1000 if stream else 0.0
            for c in concurrencies:
                # Rounds: every data plane runs duration/rounds at a time, in turn, samples pooled, so a
                # change in the machine's background load hits all of them alike.
                acc = {name: Samples() for name in targets}
                cpu = dict.fromkeys(targets, 0.0)
                picker_cpu = dict.fromkeys(targets, 0.0)
                for _ in range(args.rounds):
                    for name, url in targets.items():
                        # An ext_proc plane's first process is its picker (see `_start_targets`).
                        picker = pids[name][:1] if name.startswith("envoy-extproc") else []
                        before = _cpu_total(pids[name])
                        p_before = _cpu_total(picker)
                        await _load_into(
                            acc[name], url + "/v1/completions", c, duration / args.rounds, stream, stagger
                        )
                        after = _cpu_total(pids[name])
                        p_after = _cpu_total(picker)
                        if before is not None and after is not None:
                            cpu[name] += after - before
                        if picker and p_before is not None and p_after is not None:
                            picker_cpu[name] += p_after - p_before
                base = acc["direct"].summary(stream)
                for name in targets:
                    row = _row(rset, name, c, acc[name].summary(stream), base)
                    row["rounds"] = args.rounds
                    sent = acc[name].count
                    if pids[name] and sent:
                        # The data plane's own processes (Envoy + picker, or the built-in proxy), warm-up
                        # included, per request sent: what one request costs the machine's CPUs.
                        row["dataplane_cpu_us_per_request"] = cpu[name] / sent * 1e6
                        if picker_cpu[name]:
                            # Of which the picker process (the rest is Envoy's).
                            row["picker_cpu_us_per_request"] = picker_cpu[name] / sent * 1e6
                    rows.append(row)
                    measured.append((row, acc[name]))
                    _print_row(row)
        if args.access_logs:
            await asyncio.sleep(2.5)  # Envoy flushes its access logs about once a second
            print("Envoy timing phases (access log; see docs/envoy.md):")
            for row, samples in measured:
                log = args.access_logs.get(row["dataplane"])
                if log is not None:
                    row["envoy_phases_us"] = _phases(log, samples.windows)
                    _print_phases(row)
        out = {
            "benchmark": "dataplane_overhead",
            "machine": {
                "cpu": _cpu_name(),
                "cores": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
                "load_avg_at_end": os.getloadavg(),
            },
            "commit": _commit(),
            "duration_s": args.duration,
            "stream_duration_s": args.stream_duration,
            "envoy_workers": args.envoy_workers,
            "pin": args.pin or None,
            "phases": bool(args.access_logs),
            "request_bytes": len(BODY),
            "response_bytes": len(ANSWER),
            "stream": {
                "request_bytes": len(STREAM_BODY),
                "tokens": args.tokens,
                "prefill_ms": args.prefill_ms,
                "token_interval_ms": args.token_interval_ms,
            },
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


def _commit() -> str:
    """The checkout's commit (with "+dirty" when files differ from it), so results name their code."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src", "benchmarks/dataplane"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    return "unknown"


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
    ap.add_argument(
        "--transport",
        choices=(*TRANSPORTS, *ALT_TRANSPORTS),
        default="h2",
        help="picker role: ext_proc gRPC server",
    )
    ap.add_argument(
        "--responses", choices=RESPONSE_MODES, default="observe", help="picker role: response mode"
    )
    ap.add_argument(
        "--null-director", action="store_true", help="picker role: route unread (envoy-extproc-null)"
    )
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per tiny-request cell")
    ap.add_argument("--stream-duration", type=float, default=8.0, help="measured seconds per stream cell")
    ap.add_argument("--concurrency", default="1,32,256")
    ap.add_argument("--sets", default="tiny,stream", help="row sets: tiny (max rps), stream (TTFT)")
    ap.add_argument("--only", default="", help="comma-separated data planes (direct is always run)")
    ap.add_argument("--tokens", type=int, default=16, help="stream set: tokens per generation")
    ap.add_argument("--prefill-ms", type=float, default=10.0, help="stream set: upstream time to first token")
    ap.add_argument("--token-interval-ms", type=float, default=20.0, help="stream set: time between tokens")
    ap.add_argument("--envoy-workers", type=int, default=2)
    ap.add_argument(
        "--phases",
        action="store_true",
        help="give every Envoy a JSON access log and report, per row, where Envoy's time went "
        "(decision, picker round trips, upstream first byte) as p50/p99",
    )
    ap.add_argument(
        "--pin",
        default="",
        metavar="LOAD:PLANE",
        help="CPU affinity, e.g. 0:1: the load generator and the upstream on CPUs LOAD, every data plane "
        "(Envoy, pickers, built-in proxy) on CPUs PLANE, as on separate machines in production",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="split each cell into this many turns per data plane, interleaved (robust to load drift)",
    )
    ap.add_argument(
        "--prompt-bytes",
        type=int,
        default=0,
        help="tiny set: send a prompt of this many bytes instead of 22 (large-body runs: 32768, 225280, 1048576)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.prompt_bytes > 0:
        global BODY
        unit = "lorem ipsum dolor sit amet consectetur adipiscing elit "
        words = unit * (args.prompt_bytes // len(unit) + 1)
        BODY = orjson.dumps({"model": "bench", "prompt": words[: args.prompt_bytes], "max_tokens": 1})
    if not (args.role == "picker" and os.environ.get("INGATE_PICKER_LOOP") == "asyncio"):
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
    if args.role == "upstream":
        asyncio.run(
            _run_upstream(args.port, args.tokens, args.prefill_ms / 1000, args.token_interval_ms / 1000)
        )
    elif args.role == "picker":
        asyncio.run(_run_picker(args.port, args.upstream, args.transport, args.responses, args.null_director))
    elif args.role == "builtin":
        asyncio.run(_run_builtin(args.port, args.upstream))
    else:
        args.access_logs = {}
        with tempfile.TemporaryDirectory(prefix="ingate-overhead-") as tmp:
            args.log_dir = Path(tmp) if args.phases else None
            asyncio.run(_main(args))


if __name__ == "__main__":
    main()
