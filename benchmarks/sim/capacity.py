"""Can one simulator process host 8 replicas x 64 concurrent streams on this machine? (docs/simulator.md)

The simulator runs in a child process (uvloop, real time, H100 profile); this process drives closed-loop
streaming clients (every replica always has `--streams` requests in flight: 500-token prompts, 128
output tokens). The child reports its own CPU time (getrusage) and engine step lag: how much later than
modelled each step ended. Lag near zero means the simulator keeps its modelled timing.
Writes benchmarks/results/sim_capacity.json.

    .venv/bin/python benchmarks/sim/capacity.py [--replicas 8 --streams 64 --duration 12 --stream-interval-ms 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
MODEL = "sim"


def _write(path: str, text: str) -> None:
    Path(path).write_text(text)


def _read(path: str) -> str:
    return Path(path).read_text()


def _ready(path: str) -> bool:
    return os.path.exists(path) and os.path.getsize(path) > 0


async def child(args: argparse.Namespace) -> None:
    """The simulator side: run the fleet for warmup + duration, then report CPU and step lag."""
    from ingate.sim import SimFleetConfig, start_fleet
    from ingate.sim.profiles import get_profile
    from ingate.sim.server import ReplicaConfig

    cfg = SimFleetConfig(
        replicas=args.replicas,
        replica=ReplicaConfig(
            profile=get_profile("h100"), model=MODEL, stream_interval_ms=args.stream_interval_ms
        ),
    )
    async with start_fleet(cfg) as fleet:
        _write(args.ready, json.dumps(fleet.addresses))
        await asyncio.sleep(args.warmup)
        engines = [r.engine for r in fleet.replicas]
        for e in engines:
            e.lag_s, e.max_lag_s, e.steps, e.busy_s = 0.0, 0.0, 0, 0.0
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        await asyncio.sleep(args.duration)
        wall = time.monotonic() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        steps = sum(e.steps for e in engines)
        stats = {
            "wall_s": wall,
            "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
            "steps": steps,
            "steps_per_s_per_replica": steps / wall / len(engines),
            "mean_step_lag_ms": 1000 * sum(e.lag_s for e in engines) / max(steps, 1),
            "max_step_lag_ms": 1000 * max(e.max_lag_s for e in engines),
            "busy_fraction": sum(e.busy_s for e in engines) / wall / len(engines),
        }
        _write(args.stats, json.dumps(stats))


async def client(s: aiohttp.ClientSession, url: str, stop: float, counts: list[int]) -> None:
    prompt = " ".join(f"w{i}" for i in range(500))
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 128, "stream": True, "ignore_eos": True}
    while time.monotonic() < stop:
        try:
            async with s.post(url, json=body) as r:
                async for _ in r.content.iter_any():
                    pass
        except aiohttp.ClientError:
            # The simulator exits when its measuring window ends; requests still open then are cut.
            if time.monotonic() < stop - 1.5:
                raise
            return
        counts[0] += 1


async def parent(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ready, stats = os.path.join(tmp, "ready"), os.path.join(tmp, "stats")
        cmd = [sys.executable, __file__, "--child", "--ready", ready, "--stats", stats]
        cmd += ["--replicas", str(args.replicas), "--duration", str(args.duration)]
        cmd += ["--warmup", str(args.warmup), "--stream-interval-ms", str(args.stream_interval_ms)]
        proc = await asyncio.create_subprocess_exec(*cmd)
        try:
            for _ in range(300):
                if _ready(ready):
                    break
                await asyncio.sleep(0.05)
            addrs = json.loads(_read(ready))
            counts = [0]
            stop = time.monotonic() + args.warmup + args.duration + 1.0
            conn = aiohttp.TCPConnector(limit=0)
            timeout = aiohttp.ClientTimeout(total=120)
            async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
                await asyncio.gather(
                    *(
                        client(s, f"http://{a}/v1/completions", stop, counts)
                        for a in addrs
                        for _ in range(args.streams)
                    )
                )
            await asyncio.wait_for(proc.wait(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
        res = json.loads(_read(stats))
    res.update(
        replicas=args.replicas,
        streams_per_replica=args.streams,
        stream_interval_ms=args.stream_interval_ms,
        cpu_percent_of_one_core=100 * res["cpu_s"] / res["wall_s"],
        cpu_cores=os.cpu_count(),
        requests_completed=counts[0],
        machine=os.uname().machine + " " + os.uname().nodename.split(".")[0],
        # The machine is shared: a load average above the core count means the simulator had to wait for
        # a CPU, which shows up as step lag that is not the simulator's own cost.
        loadavg_1m_after=os.getloadavg()[0],
    )
    print("| replicas x streams | CPU (% of one core) | steps/s per replica | mean step lag | max step lag |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| {args.replicas} x {args.streams} | {res['cpu_percent_of_one_core']:.0f}% | "
        f"{res['steps_per_s_per_replica']:.1f} | {res['mean_step_lag_ms']:.2f} ms | {res['max_step_lag_ms']:.1f} ms |"
    )
    out = ROOT / args.out
    out.write_text(json.dumps(res, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--stream-interval-ms", type=float, default=0.0)
    ap.add_argument(
        "--out", default="benchmarks/results/sim_capacity.json", help="result JSON (repo-relative)"
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ready", help=argparse.SUPPRESS)
    ap.add_argument("--stats", help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(child(args) if args.child else parent(args))


if __name__ == "__main__":
    main()
