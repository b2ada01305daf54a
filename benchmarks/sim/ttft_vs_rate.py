"""TTFT and throughput of ONE simulated H100 replica against request rate (docs/simulator.md figure).

Poisson arrivals of 1000-token prompts (no shared prefix) asking for 200 tokens, at increasing rates;
latencies and rates are in modelled (GPU) time, run at --time-scale to finish in about a minute.
Stream writes are coalesced every 20 wall ms (the first token is written at once), so the client in
this process keeps up; client overhead is multiplied by the time scale, so low-rate TTFT is a bit high.
Writes benchmarks/results/sim_ttft_vs_rate.json and docs/img/sim_ttft_throughput.png.

    .venv/bin/python benchmarks/sim/ttft_vs_rate.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import aiohttp

from ingate.sim import SimFleetConfig, start_fleet
from ingate.sim.profiles import get_profile
from ingate.sim.server import ReplicaConfig

ROOT = Path(__file__).resolve().parents[2]
MODEL = "sim"
BODY = " ".join(f"w{i}" for i in range(999))


async def one(s: aiohttp.ClientSession, url: str, prompt: str, out_tokens: int, ttfts: list[float]) -> None:
    t0 = time.perf_counter()
    body = {"model": MODEL, "prompt": prompt, "max_tokens": out_tokens, "stream": True}
    async with s.post(url, json=body) as r:
        first = True
        async for _ in r.content.iter_any():
            if first:
                ttfts.append(time.perf_counter() - t0)
                first = False


async def run_rate(
    url: str, rate: float, scale: float, duration: float, rng: random.Random
) -> dict[str, float]:
    ttfts: list[float] = []
    tasks = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        t0 = time.perf_counter()
        t = 0.0
        n = 0
        while t < duration:
            t += rng.expovariate(rate * scale)  # wall-clock arrivals
            delay = t - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            prompt = f"p{rng.randrange(10**12)} " + BODY  # unique first token: no prefix-cache hits
            tasks.append(asyncio.create_task(one(s, url, prompt, 200, ttfts)))
            n += 1
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ttfts.sort()
    return {
        "rate": rate,
        "ttft_p50_s": ttfts[len(ttfts) // 2] * scale,
        "ttft_p90_s": ttfts[int(len(ttfts) * 0.9)] * scale,
        "output_tok_per_s": n * 200 / (wall * scale),
        "requests": n,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scale", type=float, default=5.0)
    ap.add_argument("--duration", type=float, default=4.0, help="wall seconds per rate")
    ap.add_argument("--rates", default="2,5,10,15,20,25,30,40")
    args = ap.parse_args()
    rng = random.Random(1)
    cfg = SimFleetConfig(
        replica=ReplicaConfig(
            profile=get_profile("h100"), model=MODEL, time_scale=args.scale, stream_interval_ms=20.0
        )
    )
    rows = []
    async with start_fleet(cfg) as fleet:
        url = f"http://{fleet.addresses[0]}/v1/completions"
        for rate in (float(r) for r in args.rates.split(",")):
            row = await run_rate(url, rate, args.scale, args.duration, rng)
            rows.append(row)
            print(
                f"rate {rate:5.1f} req/s  TTFT p50 {row['ttft_p50_s']:.3f} s  p90 {row['ttft_p90_s']:.3f} s  output {row['output_tok_per_s']:.0f} tok/s"
            )
    (ROOT / "benchmarks/results/sim_ttft_vs_rate.json").write_text(
        json.dumps(
            {"profile": "h100-llama3-8b", "prompt_tokens": 1000, "output_tokens": 200, "rows": rows}, indent=1
        )
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["rate"] for r in rows]
    ax[0].plot(x, [r["ttft_p50_s"] for r in rows], "o-", label="p50")
    ax[0].plot(x, [r["ttft_p90_s"] for r in rows], "s-", label="p90")
    ax[0].set(xlabel="request rate (req/s)", ylabel="TTFT (s)", title="TTFT", yscale="log")
    ax[0].legend()
    ax[1].plot(x, [r["output_tok_per_s"] for r in rows], "o-")
    ax[1].set(xlabel="request rate (req/s)", ylabel="output tokens/s", title="Throughput")
    fig.suptitle("one simulated H100 replica (Llama-3-8B profile), 1000-token prompts, 200 output tokens")
    fig.tight_layout()
    fig.savefig(ROOT / "docs/img/sim_ttft_throughput.png", dpi=110)


if __name__ == "__main__":
    asyncio.run(main())
