"""`ingate bench async`: does async work fill idle capacity without hurting real-time latency?

One run, on a simulated fleet behind the built-in gateway (flow control on, the async objective
sheddable), in this order, each scenario on a fresh fleet, gateway and queue:

1. capacity: a closed loop of non-streaming requests at twice the pool's batch slots -> the pool's
   throughput C (completion tokens/s) and request rate;
2. realtime-alone: bursty open-loop real-time load (Poisson, on/off bursts) at ``rt_load`` x capacity;
3. one scenario per async gate, the same real-time load (same seed) plus a backlog of ``backlog``
   async messages drained by ``ingate async run``: ``ingate`` (window + capacity signal),
   ``ingate-window-only`` (no signal: 429 feedback only), and llm-d-async's ``prometheus-saturation`` and
   ``prometheus-budget`` gates reproduced (``--gate``).

Reported per scenario: real-time TTFT p50/p99 (and p99 relative to alone), busy fraction (share of
replica samples with a request running), batch-slot utilisation, async completions/s, and the share of
idle capacity used: async tokens/s / (C - real-time tokens/s alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import platform
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from ingate.asyncproc.backends.sqlite import SqliteBackend
from ingate.bench.asyncruns import aggregate, run_seed
from ingate.bench.loadgen import RequestRecord, make_session, run_poisson
from ingate.bench.stats import percentile
from ingate.bench.systems import free_port
from ingate.bench.workload import SEED_SETS, BenchRequest, Load
from ingate.procs import ChildProcess, spawn
from ingate.sim.process import launch_sim

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
GATES = ("ingate", "ingate-window-only", "prometheus-saturation", "prometheus-budget")
_WORDS = "the a of to and in is it you that he was for on are with as his they be at one have this".split()


@dataclass
class Params:
    replicas: int = 2
    max_num_seqs: int = 8
    time_scale: float = 1.0
    duration_s: float = 60.0
    rt_load: float = 0.35
    """Mean real-time request rate as a fraction of the measured capacity (req/s)."""
    burst_on_s: float = 5.0
    burst_off_s: float = 5.0
    backlog: int = 10_000
    prompt_words: int = 40
    max_tokens: int = 64
    seed: int = 7
    capacity_s: float = 20.0
    gates: tuple[str, ...] = GATES
    reserve_slots: int = 0
    """Passed to the ingate gate (``--reserve-slots``): free batch slots left to real-time arrivals."""
    runs: int = 1
    """Independent repetitions (run k shifts every seed by 100 k); summarised in ``summary``."""
    seed_set: str = "tuning"
    """``tuning`` or ``eval`` (docs/benchmarks.md): eval shifts the seeds by 10,000."""
    first_run: int = 0
    """Index of the first run (its seeds shift by 100 x first_run): runs added to an earlier result."""
    preemption: bool = False
    """Replicas schedule by priority and preempt lower-priority work (sim --scheduling-policy priority
    --priority-preemption); the gateway sends priorities (modelServerPriority) with flowControl.preemption."""


@dataclass
class Scenario:
    name: str
    rt_records: list[RequestRecord] = field(default_factory=list)
    samples: list[tuple[float, list[int], list[int]]] = field(default_factory=list)
    async_done: int = 0
    async_shed: int = 0
    duration_s: float = 0.0
    server: dict[str, Any] = field(default_factory=dict)
    """Server-side view from the simulator's request log (``_server_side``)."""


def _prompt(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(_WORDS, k=n))


def _request_log(work: Path, tag: str) -> Path:
    return work / f"sim-requests-{tag}.jsonl"


def _server_side(path: Path) -> dict[str, Any]:
    """What the model servers alone did (the simulator's request log): real-time TTFT from arrival at
    the replica (so gateway and client time are excluded) and how often async work was preempted.
    Async requests carry their message id (``a`` + digits) as x-request-id; everything else is real-time."""
    rt: list[float] = []
    preempted = async_n = 0
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return {}
    for line in lines:
        with contextlib.suppress(orjson.JSONDecodeError):
            rec = orjson.loads(line)
            rid = str(rec.get("id", ""))
            if rid[:1] == "a" and rid[1:].isdigit() and len(rid) < 32:  # real-time ids are 32-hex uuids
                async_n += 1
                preempted += int(rec.get("preemptions") or 0)
            elif rec.get("ttft_s") is not None:
                rt.append(float(rec["ttft_s"]))
    return {
        "rt_server_ttft_p50_s": percentile(rt, 0.5),
        "rt_server_ttft_p99_s": percentile(rt, 0.99),
        "rt_server_ttfts_s": [round(t, 4) for t in rt],
        "async_preemptions": preempted,
        "async_finished_on_servers": async_n,
    }


@asynccontextmanager
async def _environment(p: Params, work: Path, tag: str) -> AsyncIterator[tuple[str, str, list[str]]]:
    """A fresh fleet and gateway (with the capacity endpoint); yields (gateway URL, capacity URL, replicas)."""
    sim_args = [
        "--time-scale",
        str(p.time_scale),
        "--max-num-seqs",
        str(p.max_num_seqs),
        "--seed",
        str(p.seed),
    ]
    if p.preemption:
        sim_args += ["--scheduling-policy", "priority", "--priority-preemption"]
    sim_args += ["--request-log", str(_request_log(work, tag))]
    sim = await asyncio.to_thread(
        launch_sim, p.replicas, sim_args, work, timeout_s=60, log=work / f"sim-{tag}.log"
    )
    port = free_port()
    pool: dict[str, Any] = {"name": "async-bench", "endpoints": [{"address": a} for a in sim.addresses]}
    if p.preemption:
        pool["modelServerPriority"] = "vllm"
    doc = {
        "listen": {"host": "127.0.0.1", "port": port},
        "pool": pool,
        "dataplane": {"type": "builtin"},
        "objectives": [{"name": "async", "priority": -1}],
        "flowControl": {"preemption": True} if p.preemption else {},
    }
    cfg = work / f"gateway-{tag}.yaml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    cmd = [sys.executable, "-m", "ingate", "serve", "--config", str(cfg)]
    gw = spawn(cmd, work / f"gateway-{tag}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as s:
            while True:
                if gw.proc.poll() is not None:
                    raise RuntimeError(f"gateway exited: {gw.tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gateway not ready: {gw.tail()}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with s.get(url + "/ready", timeout=aiohttp.ClientTimeout(total=1)) as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.1)
        yield url, f"{url}/v1/capacity", sim.addresses
    finally:
        gw.stop()
        sim.stop()


async def _sample(
    addresses: list[str], out: list[tuple[float, list[int], list[int]]], stop: asyncio.Event
) -> None:
    """Every 0.1 s: each replica's running and waiting requests (its vLLM metrics)."""

    async def one(s: aiohttp.ClientSession, a: str) -> tuple[int, int]:
        running = waiting = 0
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with s.get(f"http://{a}/metrics", timeout=aiohttp.ClientTimeout(total=1)) as r:
                for line in (await r.text()).splitlines():
                    if line.startswith("vllm:num_requests_running"):
                        running = int(float(line.rsplit(" ", 1)[1]))
                    elif line.startswith("vllm:num_requests_waiting"):
                        waiting = int(float(line.rsplit(" ", 1)[1]))
        return running, waiting

    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            got = await asyncio.gather(*(one(s, a) for a in addresses))
            out.append((time.perf_counter() - t0, [g[0] for g in got], [g[1] for g in got]))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await stop.wait()


async def _capacity(p: Params, work: Path) -> dict[str, float]:
    """Closed loop, non-streaming, at twice the pool's batch slots: completion tokens/s and req/s."""
    rng = random.Random(p.seed)
    conc = 2 * p.replicas * p.max_num_seqs
    async with _environment(p, work, "capacity") as (url, _cap, _addrs):
        done: list[tuple[float, int]] = []
        t_end = time.perf_counter() + 3 + p.capacity_s
        t_start = time.perf_counter() + 3  # the first 3 s warm the fleet up

        async def client(s: aiohttp.ClientSession) -> None:
            while time.perf_counter() < t_end:
                body = {"model": MODEL, "prompt": _prompt(rng, p.prompt_words), "max_tokens": p.max_tokens}
                body["ignore_eos"] = True
                async with s.post(url + "/v1/completions", json=body) as r:
                    data = await r.json(content_type=None)
                now = time.perf_counter()
                if r.status == 200 and t_start <= now <= t_end:
                    done.append((now, int(data["usage"]["completion_tokens"])))

        async with make_session(conc) as s:
            await asyncio.gather(*(client(s) for _ in range(conc)))
    return {
        "concurrency": conc,
        "req_per_s": len(done) / p.capacity_s,
        "tokens_per_s": sum(t for _, t in done) / p.capacity_s,
    }


def _fill_queue(path: Path, p: Params) -> None:
    rng = random.Random(p.seed + 1)
    now = time.time()

    async def go() -> None:
        q = SqliteBackend(path)
        try:
            msgs = []
            for i in range(p.backlog):
                payload = {"model": MODEL, "prompt": _prompt(rng, p.prompt_words), "max_tokens": p.max_tokens}
                payload["ignore_eos"] = True
                msgs.append(
                    orjson.dumps(
                        {
                            "id": f"a{i:05d}",
                            "created": int(now),
                            "deadline": int(now + 7200),
                            "payload": payload,
                        }
                    )
                )
            await q.submit(msgs)
        finally:
            await q.close()

    asyncio.run(go())


def _async_done(path: Path, t0: float, t1: float) -> int:
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as db:
        row = db.execute(
            "SELECT COUNT(*) FROM results WHERE status_code = 200 AND completed_at BETWEEN ? AND ?", (t0, t1)
        ).fetchone()
    return int(row[0])


async def _scenario(p: Params, work: Path, name: str, rt_rate: float) -> Scenario:
    sc = Scenario(name)
    queue = work / f"queue-{name}.db"
    async with _environment(p, work, name) as (url, cap_url, addrs):
        proc: ChildProcess | None = None
        if name != "realtime-alone":
            await asyncio.to_thread(_fill_queue, queue, p)
            cmd = [
                sys.executable, "-m", "ingate", "async", "run", "--queue", str(queue), "--gateway", url,
                "--objective", "async", "--max-concurrency", "64", "--grace", "1", "--poll-interval", "0.05",
                "--log-level", "warning",
            ]  # fmt: skip
            if name in ("ingate", "prometheus-saturation", "prometheus-budget"):
                cmd += ["--capacity-url", cap_url]
            if name == "ingate":
                cmd += ["--reserve-slots", str(p.reserve_slots)]
            if name.startswith("prometheus"):
                cmd += ["--gate", name]
            proc = spawn(cmd, work / f"async-{name}.log")
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample(addrs, sc.samples, stop))
        rng = random.Random(p.seed + 2)

        def next_request() -> BenchRequest:
            body = {
                "model": MODEL,
                "prompt": _prompt(rng, p.prompt_words),
                "max_tokens": p.max_tokens,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            return BenchRequest(body=body, group=0)

        load = Load(
            rates=[rt_rate],
            duration_s=p.duration_s,
            burst_on_s=p.burst_on_s,
            burst_off_s=p.burst_off_s,
            timeout_s=120,
        )
        t0_wall = time.time()
        try:
            async with make_session(1000) as s:
                stage = await run_poisson(
                    s, url + "/v1/completions", next_request, rt_rate, load, random.Random(p.seed)
                )
            # The window is the whole duration (arrivals stop at the last burst; the idle tail counts too).
            await asyncio.sleep(max(0.0, t0_wall + p.duration_s - time.time()))
        finally:
            t1_wall = time.time()
            stop.set()
            await sampler
            if proc is not None:
                proc.stop()
        sc.rt_records = stage.records
        sc.duration_s = t1_wall - t0_wall
        if proc is not None:
            sc.async_done = _async_done(queue, t0_wall, t1_wall)
    sc.server = _server_side(_request_log(work, name))
    return sc


def _summary(sc: Scenario, p: Params) -> dict[str, Any]:
    ok = [r for r in sc.rt_records if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    slots = [x for _, run, _ in sc.samples for x in run]
    busy = [1.0 if x > 0 else 0.0 for x in slots]
    waiting = [x for _, _, w in sc.samples for x in w]
    d = max(sc.duration_s, 1e-9)
    return {
        "rt_requests": len(sc.rt_records),
        "rt_ok": len(ok),
        "rt_ttft_p50_s": percentile(ttfts, 0.5),
        "rt_ttft_p99_s": percentile(ttfts, 0.99),
        # Raw TTFTs (ms precision) so repeated runs can pool them (asyncruns.aggregate).
        "rt_ttfts_s": [round(t, 4) for t in ttfts],
        "rt_tokens_per_s": sum(r.completion_tokens for r in ok) / d,
        "async_completed": sc.async_done,
        "async_per_s": sc.async_done / d,
        "async_tokens_per_s": sc.async_done * p.max_tokens / d,
        "busy_fraction": sum(busy) / len(busy) if busy else 0.0,
        "slot_utilisation": (sum(slots) / len(slots) / p.max_num_seqs) if slots else 0.0,
        "mean_waiting": sum(waiting) / len(waiting) if waiting else 0.0,
        "duration_s": sc.duration_s,
        **sc.server,
        "utilisation_series": [
            [round(t, 2), sum(run) / (p.max_num_seqs * len(run))] for t, run, _ in sc.samples
        ],
    }


def derive(scen: dict[str, dict[str, Any]], capacity_tokens_per_s: float) -> None:
    """Add ``rt_p99_vs_alone`` and ``idle_capacity_used`` (async tokens/s over the capacity the
    real-time load left idle when alone) to every scenario summary."""
    alone = scen["realtime-alone"]
    idle = max(1e-9, capacity_tokens_per_s - alone["rt_tokens_per_s"])
    for s in scen.values():
        base, p99 = alone["rt_ttft_p99_s"], s["rt_ttft_p99_s"]
        s["rt_p99_vs_alone"] = p99 / base if p99 and base else None
        s["idle_capacity_used"] = s["async_tokens_per_s"] / idle


def _run_once(p: Params, log: Callable[[str], None]) -> dict[str, Any]:
    """Capacity measurement and every scenario on fresh fleets, with ``p.seed``."""
    with tempfile.TemporaryDirectory(prefix="ingate-async-bench-") as tmp:
        work = Path(tmp)
        cap = asyncio.run(_capacity(p, work))
        rt_rate = p.rt_load * cap["req_per_s"]
        log(
            f"capacity {cap['req_per_s']:.1f} req/s, {cap['tokens_per_s']:.0f} tok/s; real-time {rt_rate:.1f} req/s"
        )
        scen: dict[str, Any] = {}
        for name in ("realtime-alone", *p.gates):
            sc = asyncio.run(_scenario(p, work, name, rt_rate))
            scen[name] = _summary(sc, p)
            s = scen[name]
            log(
                f"{name}: rt p99 TTFT {s['rt_ttft_p99_s']}, async {s['async_per_s']:.1f}/s, busy {s['busy_fraction']:.2f}"
            )
    derive(scen, cap["tokens_per_s"])
    return {"seed": p.seed, "capacity": cap, "rt_rate": rt_rate, "scenarios": scen}


# Parameters that must match for runs to be pooled with an earlier result (``add_to``).
_SAME = ("replicas", "max_num_seqs", "time_scale", "duration_s", "rt_load", "burst_on_s", "burst_off_s",
         "backlog", "prompt_words", "max_tokens", "seed", "capacity_s", "gates", "reserve_slots",
         "seed_set", "preemption")  # fmt: skip


def run_bench(
    p: Params,
    out_dir: Path,
    log: Callable[[str], None] = print,
    add_to: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every scenario ``p.runs`` times; write results.json and async.png under ``out_dir``.

    The first run's results stay at the top level (``capacity``, ``rt_rate``, ``scenarios``); every
    run is under ``runs`` and their aggregate (pooled percentiles, mean/min/max) under ``summary``.
    With ``add_to`` (an earlier result of the same parameters) the new runs continue its numbering
    (fresh seeds) and are pooled with its runs; ``started`` lists when each batch of runs began."""
    if p.seed_set not in SEED_SETS:
        raise ValueError(f"unknown seed set {p.seed_set!r} (known: {', '.join(SEED_SETS)})")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    earlier: list[dict[str, Any]] = []
    if add_to is not None:
        # Both as JSON stores them (tuples as lists): the earlier result may come from a file or not.
        old = json.loads(json.dumps(add_to.get("params", {})))
        mine = json.loads(json.dumps(asdict(p)))
        diff = [k for k in _SAME if k in old and old[k] != mine[k]]
        if diff:
            raise ValueError(f"cannot pool with the earlier result: {', '.join(diff)} differ")
        earlier = list(add_to.get("runs") or [])
        p = replace(p, first_run=len(earlier))
        started = f"{add_to.get('started')}, {started}"
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "params": asdict(p),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "started": started,
    }
    runs = earlier
    for k in range(p.first_run, p.first_run + max(1, p.runs)):
        pk = replace(p, seed=run_seed(p.seed, SEED_SETS[p.seed_set], k))
        log(f"run {k + 1} of {p.first_run + max(1, p.runs)} ({p.seed_set} seed {pk.seed})")
        runs.append(_run_once(pk, log))
    results["params"]["runs"] = len(runs)
    results.update(capacity=runs[0]["capacity"], rt_rate=runs[0]["rt_rate"], scenarios=runs[0]["scenarios"])
    results["runs"] = runs
    results["summary"] = aggregate(runs)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    _plot(results, out_dir / "async.png")
    return results


def _plot(results: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scen = results["scenarios"]
    names = list(scen)
    summ = results.get("summary") or {n: None for n in names}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))

    def p99_of(n: str) -> float:
        s = summ.get(n)
        return float((s["rt_pooled_p99_s"] if s else scen[n]["rt_ttft_p99_s"]) or 0) * 1000

    axes[0].bar(names, [p99_of(n) for n in names], color=["#888"] + ["#2a7"] * (len(names) - 1))
    axes[0].axhline(p99_of("realtime-alone") * 1.1, ls="--", c="k", lw=1, label="alone + 10%")
    axes[0].set_ylabel("real-time TTFT p99 (ms, runs pooled)")
    axes[0].legend()
    used, err_lo, err_hi = [], [], []
    for n in names:
        s = summ.get(n)
        a = s["idle_capacity_used"] if s else None
        m = a["mean"] if a else scen[n]["idle_capacity_used"]
        used.append(m * 100)
        err_lo.append((m - a["min"]) * 100 if a else 0.0)
        err_hi.append((a["max"] - m) * 100 if a else 0.0)
    axes[1].bar(names, used, color="#27a", yerr=[err_lo, err_hi], capsize=3)
    axes[1].axhline(70, ls="--", c="k", lw=1, label="target 70%")
    axes[1].set_ylabel("idle capacity used by async (%)")
    axes[1].legend()
    for n in names:
        series = scen[n]["utilisation_series"]
        # 1-second moving average for readability.
        ys = [u for _, u in series]
        k = 10
        smooth = [
            sum(ys[max(0, i - k + 1) : i + 1]) / len(ys[max(0, i - k + 1) : i + 1]) for i in range(len(ys))
        ]
        axes[2].plot([t for t, _ in series], smooth, label=n, lw=1)
    axes[2].set_xlabel("time (s)")
    axes[2].set_ylabel("batch-slot utilisation")
    axes[2].legend(fontsize=7)
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    p = results["params"]
    fig.suptitle(
        f"ingate async: {p['replicas']} sim replicas x {p['max_num_seqs']} seqs, real-time {results['rt_rate']:.1f} req/s "
        f"bursty ({p['burst_on_s']:g} s on / {p['burst_off_s']:g} s off), async backlog {p['backlog']}, "
        f"{p.get('runs', 1)} run(s), {p.get('seed_set', 'tuning')} seeds"
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def table(results: dict[str, Any]) -> list[list[str]]:
    """Rows for a printed table."""

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    rows = []
    for name, s in results["scenarios"].items():
        ratio = s["rt_p99_vs_alone"]
        rows.append(
            [
                name,
                ms(s["rt_ttft_p50_s"]),
                ms(s["rt_ttft_p99_s"]),
                "-" if ratio is None else f"{ratio:.2f}x",
                f"{s['rt_ok']}/{s['rt_requests']}",
                f"{s['busy_fraction']:.2f}",
                f"{s['slot_utilisation']:.2f}",
                f"{s['async_per_s']:.1f}",
                f"{s['idle_capacity_used'] * 100:.0f}%",
            ]
        )
    return rows


HEADER = [
    "scenario",
    "rt TTFT p50 ms",
    "rt TTFT p99 ms",
    "p99 vs alone",
    "rt ok",
    "busy",
    "slot util",
    "async req/s",
    "idle used",
]
