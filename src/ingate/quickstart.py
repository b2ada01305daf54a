"""`ingate quickstart`: the gateway in front of a simulated fleet, against round robin, in one minute.

Starts a fleet of simulated H100 replicas (`ingate sim`, own process, KV cache reduced so that not
every system prompt fits everywhere), then for each routing profile (ingate's default, round robin) a
fresh fleet and a gateway, and replays the same seeded shared-prefix chat load (a few long system
prompts shared by many short questions, Poisson arrivals, streaming). Prints TTFT / e2e percentiles,
throughput and the fleet's prefix-cache hit rate side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import click
from rich.console import Console
from rich.table import Table

from ingate.bench.loadgen import send_one
from ingate.bench.stats import percentile
from ingate.bench.workload import BenchRequest
from ingate.config import parse_config
from ingate.dataplane.proxy import BuiltinProxy
from ingate.gateway import Gateway
from ingate.sim.process import launch_sim

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@dataclass
class LoadSpec:
    replicas: int = 4
    time_scale: float = 1.0
    """Simulator speed-up; 1.0 runs the modelled GPU timeline in real time."""
    num_gpu_blocks: int = 1200
    system_prompts: int = 24
    system_tokens: int = 2500
    question_tokens: int = 40
    output_tokens: int = 40
    rate: float = 40.0
    """Requests per second (wall clock). 40/s on 4 replicas is near round robin's knee for this load
    (each round-robin replica re-prefills most system prompts), where routing decides the tail."""
    duration_s: float = 12.0
    seed: int = 7


@dataclass
class RunResult:
    profile: str
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    errors: int = 0
    wall_s: float = 0.0
    hit_rate: float = 0.0
    output_tokens: int = 0


def _pct(xs: list[float], p: float) -> float:
    """The reports' nearest-rank percentile (``p`` in percent); NaN when there is nothing to rank."""
    v = percentile(xs, p / 100)
    return float("nan") if v is None else v


def _prompts(spec: LoadSpec) -> list[tuple[float, str]]:
    rng = random.Random(spec.seed)
    systems = [" ".join(f"s{k}w{i}" for i in range(spec.system_tokens)) for k in range(spec.system_prompts)]
    out = []
    t = 0.0
    while t < spec.duration_s:
        t += rng.expovariate(spec.rate)
        k = rng.randrange(spec.system_prompts)
        q = " ".join(f"q{rng.randrange(10**6)}" for _ in range(spec.question_tokens))
        out.append((t, systems[k] + " " + q))
    return out


async def _one(s: aiohttp.ClientSession, url: str, prompt: str, spec: LoadSpec, res: RunResult) -> None:
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": spec.output_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    rec = await send_one(s, url + "/v1/completions", BenchRequest(body, group=0), time.perf_counter(), 120.0)
    if not rec.ok or rec.ttft is None or rec.e2e is None:
        res.errors += 1
        return
    res.ttft.append(rec.ttft)
    res.e2e.append(rec.e2e)
    res.output_tokens += rec.completion_tokens


async def _hit_rate(addresses: list[str]) -> float:
    q = h = 0.0
    async with aiohttp.ClientSession() as s:
        for a in addresses:
            async with s.get(f"http://{a}/metrics") as r:
                text = await r.text()
            for line in text.splitlines():
                if line.startswith("vllm:prefix_cache_queries_total"):
                    q += float(line.rsplit(" ", 1)[1])
                elif line.startswith("vllm:prefix_cache_hits_total"):
                    h += float(line.rsplit(" ", 1)[1])
    return h / q if q else 0.0


async def run_profile(profile: str, spec: LoadSpec, workdir: Path) -> RunResult:
    """A fresh fleet + gateway with `profile`, the seeded load, and the results."""
    sim = launch_sim(
        spec.replicas,
        [
            "--time-scale",
            str(spec.time_scale),
            "--num-gpu-blocks",
            str(spec.num_gpu_blocks),
            "--seed",
            str(spec.seed),
        ],
        workdir,
    )
    addresses = sim.addresses
    res = RunResult(profile)
    try:
        cfg = parse_config({
            "listen": {"host": "127.0.0.1", "port": 0},
            "pool": {"name": "quickstart", "endpoints": [{"address": a} for a in addresses]},
            "scheduler": {"defaultProfile": profile},
            "dataplane": {"type": "builtin"},
        })  # fmt: skip
        gw = Gateway(cfg)
        await gw.start()
        proxy = BuiltinProxy.serving(gw)
        await proxy.start()
        try:
            for _ in range(500):  # the gateway needs one metrics scrape before it routes well
                if gw.ready():
                    break
                await asyncio.sleep(0.02)
            plan = _prompts(spec)
            async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=120), connector=aiohttp.TCPConnector(limit=0)
            ) as s:
                t0 = time.perf_counter()
                tasks = []
                for at, prompt in plan:
                    delay = at - (time.perf_counter() - t0)
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(_one(s, proxy.url, prompt, spec, res)))
                await asyncio.gather(*tasks)
                res.wall_s = time.perf_counter() - t0
            res.hit_rate = await _hit_rate(addresses)
        finally:
            await proxy.stop()
            await gw.stop()
    finally:
        sim.stop()
    return res


def render(results: list[RunResult], spec: LoadSpec, console: Console) -> None:
    t = Table(title=f"shared-prefix load: {spec.replicas} simulated H100 replicas, {spec.rate:g} req/s for {spec.duration_s:g} s "
                    f"(time scale {spec.time_scale:g}x; latencies in modelled seconds)")  # fmt: skip
    t.add_column("routing", no_wrap=True)
    for col in (
        "TTFT p50",
        "TTFT p90",
        "TTFT p99",
        "e2e p50",
        "e2e p99",
        "output tok/s",
        "cache hit",
        "errors",
    ):
        t.add_column(col, justify="right")
    k = spec.time_scale  # report modelled (GPU) time, not the accelerated wall clock
    for r in results:
        t.add_row(
            r.profile,
            *(f"{_pct(r.ttft, p) * k:.3f}" for p in (50, 90, 99)),
            *(f"{_pct(r.e2e, p) * k:.2f}" for p in (50, 99)),
            f"{r.output_tokens / (r.wall_s * k):.0f}" if r.wall_s else "-",
            f"{r.hit_rate:.0%}",
            str(r.errors),
        )
    console.print(t)
    if len(results) == 2 and results[0].ttft and results[1].ttft:
        a, b = _pct(results[0].ttft, 99), _pct(results[1].ttft, 99)
        console.print(f"p99 TTFT: {results[0].profile} is {1 - a / b:.0%} lower than {results[1].profile}." if a < b
                      else f"p99 TTFT: {results[0].profile} is not lower than {results[1].profile} on this run.")  # fmt: skip


@click.group("quickstart", invoke_without_command=True)
@click.option(
    "--rate", type=float, default=LoadSpec.rate, show_default=True, help="Requests per second (wall clock)."
)
@click.option(
    "--duration",
    type=float,
    default=LoadSpec.duration_s,
    show_default=True,
    help="Seconds of load per profile.",
)
@click.option("--replicas", type=int, default=LoadSpec.replicas, show_default=True)
@click.option(
    "--time-scale",
    type=float,
    default=LoadSpec.time_scale,
    show_default=True,
    help="Simulator speed-up (latencies are still reported in modelled seconds).",
)
@click.option(
    "--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the results as JSON."
)
@click.pass_context
def quickstart(
    ctx: click.Context, rate: float, duration: float, replicas: int, time_scale: float, json_out: str | None
) -> None:
    """Run a simulated fleet behind ingate and behind round robin, and compare latencies.

    The subcommands are the Inference Quickstart over the benchmark database: `curves` plots latency vs
    throughput per configuration, `recommend` picks the cheapest configuration that meets a target."""
    if ctx.invoked_subcommand is not None:
        return
    if rate <= 0 or duration <= 0 or replicas < 1 or time_scale <= 0:
        raise click.BadParameter("--rate, --duration, --replicas and --time-scale must be positive")
    spec = LoadSpec(rate=rate, duration_s=duration, replicas=replicas, time_scale=time_scale)
    console = Console(width=max(110, Console().width))
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()

    async def main() -> list[RunResult]:
        out = []
        with tempfile.TemporaryDirectory() as d:
            for profile in ("default", "round-robin"):
                console.print(f"[bold]running[/] {profile} profile ({spec.duration_s:g} s of load) ...")
                out.append(await run_profile(profile, spec, Path(d)))
        return out

    results = asyncio.run(main())
    render(results, spec, console)
    if json_out:
        Path(json_out).write_text(json.dumps([r.__dict__ for r in results]))


def _add_database_commands() -> None:
    from ingate.bench.quickstart_cli import curves_cmd, recommend_cmd

    quickstart.add_command(curves_cmd)
    quickstart.add_command(recommend_cmd)


_add_database_commands()
