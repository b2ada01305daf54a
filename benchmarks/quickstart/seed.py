"""Generate the Inference Quickstart's seed curves (src/ingate/bench/seed_curves.json), reproducibly.

    python benchmarks/quickstart/seed.py            # or: make quickstart-seed

For each (model, simulator accelerator profile) in SEED_CONFIGS and each workload in
benchmarks/quickstart/workloads/ (chat, rag = long shared prefix, batch), sweeps Poisson rates over
2 replicas behind ingate's default scheduler, in virtual time: the scheduling replay
(benchmarks/scheduling/replay.py) drives the simulator's engine model (`ingate.sim.engine`, the same
step-time, batching and KV-cache model as `ingate sim`) through ingate's real Scheduler, with no HTTP and
no wall clock, so the whole sweep takes minutes on a laptop and gives the same numbers every time. The
points are summarised exactly as `ingate bench` summarises its records and stored with tool
`ingate-replay`, kind `simulated`, and the profile's calibration line: the H100 8B profile is fitted
to measurements (calibration/), the others are estimates and are labelled so.

Not a replacement for `ingate bench` (which measures the real gateway, HTTP and processes):
docs/quickstart-db.md checks a recommendation made from these curves with `ingate bench`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import orjson
import yaml

from ingate.bench.db import Point, Series, series_to_json
from ingate.bench.dbcli import SEED_FILE
from ingate.bench.importers import Triple, from_bench_results
from ingate.bench.stats import summarize
from ingate.bench.workload import Workload
from ingate.scheduling.config import SchedulerConfig

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
REPLICAS = 2
DURATION_S = 120.0

# (model, simulator profile, per-replica rates (req/s) per workload). Rates span light load to past
# each configuration's knee (found with --pilot), so the recommender can interpolate between them.
SEED_CONFIGS: list[tuple[str, str, dict[str, list[float]]]] = [
    (
        "meta-llama/Llama-3.1-8B-Instruct",
        "h100-llama3-8b",
        {
            "chat": [5, 10, 15, 20, 25, 30, 35, 40],
            "rag": [4, 8, 16, 24, 32, 40, 48],
            "batch": [1, 2, 4, 6, 8, 10, 12, 14],
        },
    ),
    (
        "meta-llama/Llama-3.1-8B-Instruct",
        "l4-llama3-8b",
        {
            "chat": [0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2],
            "rag": [0.25, 0.5, 0.75, 1, 1.25, 1.5, 2],
            "batch": [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4],
        },
    ),
    (
        "meta-llama/Llama-3.1-8B-Instruct",
        "tpu-v6e-llama3-8b",
        {
            "chat": [2, 4, 6, 8, 10, 12, 14, 16, 18, 20],
            "rag": [2, 4, 8, 12, 16, 20, 24, 28],
            "batch": [0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 5],
        },
    ),
    (
        "meta-llama/Llama-3.1-70B-Instruct",
        "h100x4-llama3-70b",
        {
            "chat": [2, 4, 6, 8, 10, 12, 14, 16, 18, 20],
            "rag": [1, 2, 4, 8, 12, 16, 20, 24, 28, 32],
            "batch": [0.5, 1, 2, 3, 4, 5, 6, 7, 8],
        },
    ),
]


def _replay() -> Any:
    spec = importlib.util.spec_from_file_location("replay", ROOT / "benchmarks/scheduling/replay.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["replay"] = mod
    spec.loader.exec_module(mod)
    return mod


def workload(name: str, model: str, profile: str, rates: list[float]) -> Workload:
    """The workload file `workloads/<name>.yaml` for this model, profile and fleet-wide rates."""
    raw = yaml.safe_load((HERE / "workloads" / f"{name}.yaml").read_text())
    raw["model"] = model
    raw["load"] = {"type": "poisson", "rates": rates, "duration_s": DURATION_S, "timeout_s": 600}
    raw["fleet"] = {"replicas": REPLICAS, "args": ["--profile", profile]}
    raw["systems"] = ["ingate"]
    return Workload.model_validate(raw)


def sweep(replay: Any, wl: Workload) -> dict[str, Any]:
    """One curve: every rate of `wl` in turn on one fleet (as `ingate bench` runs its stages), as an
    `ingate bench` results document."""
    fleet = replay.Fleet(wl, SchedulerConfig(), None, seed=1234)
    stages = []
    for i, rate in enumerate(wl.load.rates):
        recs = replay.run_stage(fleet, wl, float(rate), i, 0)
        records = []
        for r in recs:
            out = int(r.get("completion_tokens") or 0)
            itl = (r["e2e"] - r["ttft"]) / (out - 1) if out > 1 and r["ttft"] is not None else None
            records.append(
                {
                    "send": r["send"],
                    "status": 200,
                    "error": "",
                    "ttft": r["ttft"],
                    "e2e": r["e2e"],
                    "itl_mean": itl,
                    "prompt_tokens": r["prompt_tokens"],
                    "completion_tokens": out,
                    "cached_tokens": r.get("cached_tokens"),
                    "stream": 0,
                }
            )
        summary = summarize(records, wl.load.duration_s, wl.slo.model_dump())
        stages.append({"rate": float(rate), "concurrency": None, "duration_s": wl.load.duration_s,
                       "summary": summary, "records": records})  # fmt: skip
    return {
        "format": "ingate-bench/1",
        "workload": wl.model_dump(),
        "machine": {"platform": "virtual time (scheduling replay)", "cpus": 0},
        "started_utc": "",
        "systems": [{"name": "ingate", "info": {}, "stages": stages}],
    }


def generate(only: str | None = None, verbose: bool = False) -> list[Triple]:
    """The seed curves (or only those of `profile[:workload]`) as (key, run, points) triples."""
    replay = _replay()
    import ingate.sim.engine as sim_engine

    saved = sim_engine.time
    sim_engine.time = replay.CLOCK  # the engine stamps arrivals with the replay's virtual clock
    out: list[Triple] = []
    try:
        for model, profile, per_workload in SEED_CONFIGS:
            for name, per_replica in per_workload.items():
                if only and only not in (profile, f"{profile}:{name}"):
                    continue
                t0 = time.monotonic()
                wl = workload(name, model, profile, [r * REPLICAS for r in per_replica])
                ((key, run, points),) = from_bench_results(sweep(replay, wl), "benchmarks/quickstart/seed.py")
                run = replace(
                    run,
                    tool="ingate-replay",
                    source="benchmarks/quickstart/seed.py (virtual-time replay of the simulator engine)",
                    machine="virtual time",
                    recorded_utc="",
                    time_scale=1.0,
                )
                out.append((key, run, [_compact(p) for p in points]))
                if verbose:
                    line = ", ".join(
                        f"{p.rate / REPLICAS:g}: ttft90 {p.ttft_p90:.3f} tpot90 {p.tpot_p90 or 0:.4f} "
                        f"thr {(p.throughput_rps or 0) / REPLICAS:.2f}"
                        for p in points
                        if p.rate is not None and p.ttft_p90 is not None
                    )
                    print(f"{model} {profile} {name} ({time.monotonic() - t0:.0f} s): {line}", flush=True)
    finally:
        sim_engine.time = saved
    return out


def _compact(p: Point) -> Point:
    """6 significant digits: a compact file, far below the run-to-run differences that matter."""
    d = asdict(p)
    return Point(**{k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in d.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=SEED_FILE)
    ap.add_argument("--only", default=None, help="profile[:workload] to run alone (pilot); prints, no file")
    args = ap.parse_args()
    triples = generate(args.only, verbose=True)
    if args.only:
        return
    items = series_to_json(Series(i, i, k, r, p) for i, (k, r, p) in enumerate(triples))
    doc = {
        "format": "ingate-curves/1",
        "generated_by": "python benchmarks/quickstart/seed.py",
        "replicas": REPLICAS,
        "duration_s": DURATION_S,
        "series": items,
    }
    args.out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {len(items)} curves)")


if __name__ == "__main__":
    main()
