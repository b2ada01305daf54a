"""Run a workload against each system under test (fresh fleet per system) and write one JSON file."""

from __future__ import annotations

import asyncio
import platform
import random
import time
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ingate.bench import systems as sysmod
from ingate.bench.loadgen import RequestRecord, StageResult, make_session, run_concurrent, run_poisson
from ingate.bench.report import max_sustainable_rate, summarize
from ingate.bench.workload import RequestStream, Workload


async def _sweep(wl: Workload, base_url: str, progress: Progress, label: str) -> list[StageResult]:
    path = "/v1/chat/completions" if wl.api == "chat" else "/v1/completions"
    url = base_url + path
    load = wl.load
    stages: list[StageResult] = []
    points: list[float | int] = list(load.rates) if load.type == "poisson" else list(load.concurrency)
    async with make_session(load.max_inflight) as session:
        for i, point in enumerate(points):
            stream = RequestStream(wl, seed_offset=i)  # same requests for every system at this point
            rng = random.Random(wl.seed * 7919 + i)
            expected = int(point * load.duration_s) if load.type == "poisson" else None
            task_id = progress.add_task(f"{label} @ {point:g}", total=expected)

            def done(_: RequestRecord, tid: Any = task_id) -> None:
                progress.advance(tid)

            if load.type == "poisson":
                st = await run_poisson(session, url, stream.next, float(point), load, rng, done)
            else:
                st = await run_concurrent(session, url, stream.next, int(point), load, done)
            progress.update(task_id, total=len(st.records), completed=len(st.records))
            stages.append(st)
    return stages


def run_workload(wl: Workload, out_dir: Path, console: Console | None = None) -> Path:
    """Benchmark every system of `wl` in turn and write `<out_dir>/<name>_<utc>.json`; returns its path."""
    console = console or Console()
    workdir = sysmod.make_workdir()
    started = time.time()
    results: dict[str, Any] = {
        "format": "ingate-bench/1",
        "workload": wl.model_dump(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": _cpus()},
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "systems": [],
    }
    slo = wl.slo.model_dump()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        for name in wl.systems:
            entry: dict[str, Any] = {"name": name}
            fleet = sysmod.start_fleet(wl, workdir)  # fresh fleet: no cache carries over between systems
            try:
                try:
                    system = sysmod.start_system(name, wl, fleet, workdir)
                except sysmod.SystemUnavailable as e:
                    entry["unavailable"] = str(e)
                    results["systems"].append(entry)
                    continue
                try:
                    entry["info"] = system.info
                    stages = asyncio.run(_sweep(wl, system.url, progress, name))
                finally:
                    system.stop()
            finally:
                fleet.proc.stop()
            entry["stages"] = [
                {
                    "rate": st.rate,
                    "concurrency": st.concurrency,
                    "duration_s": st.duration_s,
                    "max_inflight_hit": st.max_inflight_hit,
                    "peak_inflight": st.peak_inflight,
                    "summary": summarize([r.to_json() for r in st.records], st.duration_s, slo),
                    "records": [r.to_json() for r in st.records],
                }
                for st in stages
            ]
            entry["max_sustainable_rate"] = max_sustainable_rate(entry["stages"])
            results["systems"].append(entry)
    results["wall_s"] = round(time.time() - started, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{wl.name}_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(started))}.json"
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return path


def _cpus() -> int:
    import os

    return os.cpu_count() or 0
