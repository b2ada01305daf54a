"""Turn benchmark outputs into database rows: `ingate bench` results JSON and inference-perf reports.

`ingate bench` files carry everything the curve key needs (the workload, its fleet arguments, the
systems). inference-perf reports carry the measurements but not the deployment (model server, hardware,
replicas, gateway): the caller supplies those (`ingate db import --model ... --accelerator ...`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import yaml

from ingate.bench.db import CurveKey, Point, RunInfo
from ingate.bench.stats import RESULTS_FORMAT, resummarize
from ingate.sim.profiles import get_profile

Triple = tuple[CurveKey, RunInfo, list[Point]]

SPEC_KEYS = ("name", "api", "model", "data", "lora", "slo", "seed", "seed_set", "tenants", "gateway")
"""The keys of an `ingate bench` workload that shape its requests (not its load, fleet or systems)."""

SIM_SERVER = "ingate-sim"
"""The model server of simulated curves (`ingate sim`, vLLM-compatible)."""


class ImportError_(ValueError):
    """The file is not in a format we can import; the message says what was expected."""


def fleet_settings(args: Sequence[str]) -> tuple[str, float, tuple[str, ...]]:
    """(profile, time scale, remaining arguments) of an `ingate sim` argument list. The time scale is
    kept apart: a slowed-down run of the same configuration is the same curve (see `Series.normalised`)."""
    profile, scale, rest = "h100-llama3-8b", 1.0, []
    it = iter(args)
    for a in it:
        if a == "--profile":
            profile = next(it, profile)
        elif a == "--time-scale":
            scale = float(next(it, "1"))
        else:
            rest.append(a)
    return profile, scale, tuple(["--profile", profile, *rest])


def sim_hardware(profile: str) -> tuple[str, int, str, bool]:
    """(accelerator, per replica, calibration line, estimated) of a simulator profile or a comma list
    of them (a heterogeneous fleet: accelerator `mixed`, estimated if any member is)."""
    names = [p.strip() for p in profile.split(",") if p.strip()]
    profs = [get_profile(n) for n in names]
    if len({(p.accelerator, p.accelerators) for p in profs}) == 1:
        acc, per = profs[0].accelerator, profs[0].accelerators
    else:
        acc, per = "mixed", 1
    calibration = "; ".join(sorted({f"{p.name}: {p.source}" for p in profs}))
    return acc, per, calibration, any(p.estimated for p in profs)


def _scheduler_profile(system: str, info: dict[str, Any]) -> str:
    if "profile" in info:
        return str(info["profile"])
    if system.startswith("ingate"):
        return "default"
    return str(info.get("policy") or info.get("lb_policy") or "-")


def _bench_point(stage: dict[str, Any], slo: dict[str, Any]) -> Point:
    s = stage["summary"]
    records = stage.get("records") or []
    ok = [r for r in records if r.get("status") == 200 and not r.get("error")]
    out_tokens = sum(r.get("completion_tokens", 0) for r in ok)
    in_tokens = sum(r.get("prompt_tokens", 0) for r in ok)
    # The summary has output tokens/s; input tokens/s over the same span is the token ratio times it.
    input_tok_s = (
        s["output_tok_s"] * in_tokens / out_tokens
        if out_tokens and s.get("output_tok_s") is not None
        else None
    )
    return Point(
        rate=stage.get("rate"),
        concurrency=stage.get("concurrency"),
        duration_s=stage.get("duration_s"),
        sent=int(s.get("sent", 0)),
        ok=int(s.get("ok", 0)),
        errors=int(s.get("errors", 0)),
        throughput_rps=s.get("throughput_rps"),
        input_tok_s=input_tok_s,
        output_tok_s=s.get("output_tok_s"),
        ttft_p50=s.get("ttft_p50"),
        ttft_p90=s.get("ttft_p90"),
        ttft_p99=s.get("ttft_p99"),
        # `ingate bench`'s "itl" is each request's mean gap between streamed tokens, i.e. its time per
        # output token (TPOT); the per-token ITL distribution is not in its summary.
        tpot_p50=s.get("itl_p50"),
        tpot_p90=s.get("itl_p90"),
        tpot_p99=s.get("itl_p99"),
        e2e_p50=s.get("e2e_p50"),
        e2e_p90=s.get("e2e_p90"),
        e2e_p99=s.get("e2e_p99"),
        goodput_rps=s.get("goodput_rps"),
        slo_ttft_s=slo.get("ttft_s"),
        slo_e2e_s=slo.get("e2e_s"),
        slo_attainment=s.get("slo_attainment"),
        cache_hit_rate=s.get("cached_token_share"),
    )


def from_bench_results(res: dict[str, Any], source: str) -> list[Triple]:
    """One curve per system of an `ingate bench` results document (format `ingate-bench/1`). Stage
    summaries are recomputed from the stored request records with today's definitions, as
    `ingate bench report` does (`resummarize`), so files from older harness versions agree."""
    if res.get("format") != RESULTS_FORMAT or "workload" not in res:
        raise ImportError_(f"{source}: not an `ingate bench` results file (format ingate-bench/1)")
    res = resummarize(res)
    wl = res["workload"]
    fleet = wl.get("fleet") or {}
    profile, scale, server_args = fleet_settings(fleet.get("args") or [])
    acc, per, calibration, estimated = sim_hardware(profile)
    machine = res.get("machine") or {}
    machine_s = f"{machine.get('platform', '')}, {machine.get('cpus', '?')} CPUs".strip(", ")
    run = RunInfo(
        tool="ingate-bench",
        kind="simulated",
        calibration=calibration,
        estimated=estimated,
        source=source,
        machine=machine_s,
        recorded_utc=str(res.get("started_utc") or ""),
        time_scale=scale,
        workload_spec=json.dumps({k: wl[k] for k in SPEC_KEYS if wl.get(k) not in (None, [], {})}),
    )
    load = wl.get("load") or {}
    seeds = f"seed={wl.get('seed', 0)} streams={load.get('streams', 1)}"
    if wl.get("seed_set", "tuning") != "tuning":
        seeds += f" set={wl['seed_set']}"
    slo = wl.get("slo") or {}
    out: list[Triple] = []
    for system in res.get("systems") or []:
        if not system.get("stages"):
            continue  # unavailable on that machine: nothing measured
        info = system.get("info") or {}
        key = CurveKey(
            model=str(wl.get("model", "")),
            accelerator=acc,
            accelerators_per_replica=per,
            accelerator_profile=profile,
            model_server=SIM_SERVER,
            server_args=server_args,
            replicas=int(fleet.get("replicas", 1)),
            gateway=str(system["name"]),
            scheduler_profile=_scheduler_profile(str(system["name"]), info),
            workload=str(wl.get("name", "")),
            seeds=seeds,
        )
        out.append((key, run, [_bench_point(st, slo) for st in system["stages"]]))
    return out


def load_bench_file(path: str | Path) -> list[Triple]:
    """Read an `ingate bench` results JSON file."""
    p = Path(path)
    try:
        res = orjson.loads(p.read_bytes())
    except orjson.JSONDecodeError as e:
        raise ImportError_(f"{p}: not JSON ({e})") from None
    if not isinstance(res, dict):
        raise ImportError_(f"{p}: not an `ingate bench` results file (format ingate-bench/1)")
    return from_bench_results(res, p.name)


# inference-perf (0.7.0) lifecycle report (`ResponsesSummary`): successes.latency.<metric> = {mean, min,
# max, median, p90, p99, ...} (its percentile keys: "median" for 50, "p<q>" otherwise),
# successes.throughput.{requests_per_sec, input_tokens_per_sec, output_tokens_per_sec},
# successes.prompt_tokens.{total, cached}, successes.goodput_metrics.{request_goodput, goodput_percentage}
# (when goodput constraints are configured), load_summary.{count, requested_rate, achieved_rate},
# failures.count, benchmark_time_seconds.
_IPERF_LATENCY = {
    "ttft": "time_to_first_token",
    "tpot": "time_per_output_token",
    "itl": "inter_token_latency",
    "e2e": "request_latency",
}


def _pct(dist: Any, q: int) -> float | None:
    if not isinstance(dist, dict):
        return None
    v = dist.get("median" if q == 50 else f"p{q}")
    return None if v is None else float(v)


def iperf_point(report: dict[str, Any], goodput: dict[str, float] | None = None) -> Point:
    """One point from an inference-perf stage (or summary) lifecycle report."""
    load = report.get("load_summary") or {}
    succ = report.get("successes") or {}
    fail = report.get("failures") or {}
    lat = succ.get("latency") or {}
    thr = succ.get("throughput") or {}
    ok = int(succ.get("count") or 0)
    errors = int(fail.get("count") or 0)
    p = Point(
        rate=load.get("requested_rate"),
        concurrency=load.get("concurrency"),
        duration_s=report.get("benchmark_time_seconds"),
        sent=int(load.get("count") or ok + errors),
        ok=ok,
        errors=errors,
        throughput_rps=thr.get("requests_per_sec"),
        input_tok_s=thr.get("input_tokens_per_sec"),
        output_tok_s=thr.get("output_tokens_per_sec"),
    )
    for ours, theirs in _IPERF_LATENCY.items():
        dist = lat.get(theirs)
        if ours == "tpot" and dist is None:  # non-streaming runs: only the normalised TPOT exists
            dist = lat.get("normalized_time_per_output_token")
        for q in (50, 90, 99):
            setattr(p, f"{ours}_p{q}", _pct(dist, q))
    prompt = succ.get("prompt_tokens") or {}
    if prompt.get("total"):
        p.cache_hit_rate = float(prompt.get("cached") or 0.0) / float(prompt["total"])
    gm = succ.get("goodput_metrics")
    if isinstance(gm, dict):
        if gm.get("request_goodput") is not None:
            p.goodput_rps = float(gm["request_goodput"])
        if gm.get("goodput_percentage") is not None:
            p.slo_attainment = float(gm["goodput_percentage"]) / 100.0
    if goodput:
        p.slo_ttft_s = goodput.get("ttft")
        p.slo_tpot_s = goodput.get("tpot")
        p.slo_e2e_s = goodput.get("request_latency")
    return p


def load_inference_perf(
    path: str | Path,
    *,
    model: str,
    accelerator: str,
    accelerators_per_replica: int = 1,
    accelerator_profile: str = "",
    model_server: str = "vllm",
    server_args: Sequence[str] = (),
    replicas: int = 1,
    gateway: str = "ingate",
    scheduler_profile: str = "default",
    workload: str = "",
    seeds: str = "",
    kind: str = "measured",
    calibration: str = "",
    goodput: dict[str, float] | None = None,
) -> list[Triple]:
    """An inference-perf report directory (its `stage_N_lifecycle_metrics.json` files; the summary
    alone if there are no stage files) or one lifecycle JSON file, as one curve. inference-perf does
    not record the deployment, so the key comes from the arguments."""
    p = Path(path)
    files = sorted(p.glob("stage_*_lifecycle_metrics.json"), key=_stage_no) if p.is_dir() else [p]
    if p.is_dir() and not files:
        files = [p / "summary_lifecycle_metrics.json"]
    points = []
    for f in files:
        if not f.exists():
            raise ImportError_(f"{p}: no inference-perf lifecycle reports (stage_N_lifecycle_metrics.json)")
        try:
            doc = orjson.loads(f.read_bytes())
        except orjson.JSONDecodeError as e:
            raise ImportError_(f"{f}: not JSON ({e})") from None
        if not isinstance(doc, dict) or "successes" not in doc:
            raise ImportError_(f"{f}: not an inference-perf lifecycle report (no `successes`)")
        points.append(iperf_point(doc, goodput or _goodput_from_config(p)))
    if kind not in ("simulated", "measured"):
        raise ImportError_(f"kind: {kind!r} is neither simulated nor measured")
    run = RunInfo(
        tool="inference-perf",
        kind=kind,  # type: ignore[arg-type]
        calibration=calibration,
        estimated=False,
        source=p.name,
        recorded_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(files[0].stat().st_mtime)),
    )
    key = CurveKey(
        model=model,
        accelerator=accelerator,
        accelerators_per_replica=accelerators_per_replica,
        accelerator_profile=accelerator_profile or accelerator,
        model_server=model_server,
        server_args=tuple(server_args),
        replicas=replicas,
        gateway=gateway,
        scheduler_profile=scheduler_profile,
        workload=workload or p.name,
        seeds=seeds,
    )
    return [(key, run, points)]


def _stage_no(f: Path) -> int:
    try:
        return int(f.name.split("_")[1])
    except (IndexError, ValueError):
        return 1 << 30


def _goodput_from_config(p: Path) -> dict[str, float] | None:
    """The goodput constraints from a `config.yaml` next to the reports, if one was saved there."""
    cfg = (p if p.is_dir() else p.parent) / "config.yaml"
    if not cfg.exists():
        return None
    try:
        doc = yaml.safe_load(cfg.read_text()) or {}
        c = doc["report"]["goodput"]["constraints"]
        return {k: float(v) for k, v in c.items()}
    except (KeyError, TypeError, ValueError, yaml.YAMLError):
        return None
