"""Run a workload against each system under test (fresh fleet per system) and write one JSON file."""

from __future__ import annotations

import asyncio
import platform
import random
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ingate.bench import peers
from ingate.bench import systems as sysmod
from ingate.bench.loadgen import RequestRecord, StageResult, make_session, run_concurrent, run_poisson
from ingate.bench.stats import RESULTS_FORMAT, max_sustainable_rate, summarize, tenant_summaries
from ingate.bench.workload import BenchRequest, RequestStream, Tenant, Workload
from ingate.scheduling.plugins.slo import ENDPOINT_ERROR_WINDOW

STREAM_SHIFT = 100
"""Seed shift per request stream (the scheduler replay uses it too, so stream k is its stream k)."""


async def _sweep(
    wl: Workload, base_url: str, progress: Progress, label: str, stream_index: int = 0
) -> list[StageResult]:
    path = "/v1/chat/completions" if wl.api == "chat" else "/v1/completions"
    url = base_url + path
    load = wl.load
    shift = STREAM_SHIFT * stream_index
    stages: list[StageResult] = []
    points: list[float | int] = list(load.rates) if load.type == "poisson" else list(load.concurrency)
    async with make_session(load.max_inflight) as session:
        for i, point in enumerate(points):
            # Same requests for every system at this point of this stream.
            stream = RequestStream(wl, seed_offset=i + shift)
            rng = random.Random(wl.seed * 7919 + i + shift)
            expected = int(point * load.duration_s) if load.type == "poisson" else None
            task_id = progress.add_task(f"{label} @ {point:g}", total=expected)

            def done(_: RequestRecord, tid: Any = task_id) -> None:
                progress.advance(tid)

            if wl.tenants:
                st = await _run_tenants(session, url, wl, i, done, shift)
            elif load.type == "poisson":
                st = await run_poisson(session, url, stream.next, float(point), load, rng, done)
            else:
                st = await run_concurrent(session, url, stream.next, int(point), load, done)
            progress.update(task_id, total=len(st.records), completed=len(st.records))
            for r in st.records:
                r.stream = stream_index
            stages.append(st)
    return stages


async def _run_tenants(
    session: Any,
    url: str,
    wl: Workload,
    stage: int,
    done: Callable[[RequestRecord], None],
    shift: int = 0,
) -> StageResult:
    """Stage `stage` of a multi-tenant workload: one Poisson stream per tenant with a rate, side by side."""
    runs = []
    for j, t in enumerate(wl.tenants):
        if t.rates[stage] <= 0:
            continue
        # Arrivals depend on the tenant only (the same pattern in every stage at the same rate, so a
        # tenant alone and under load is offered exactly the same); prompts differ per stage so no
        # prefix cache carries over between stages.
        rng = random.Random(wl.seed * 7919 + 1000 * (j + 1) + shift)
        nxt = _tagged(RequestStream(wl, seed_offset=stage + 1000 * (j + 1) + shift), t)
        runs.append(run_poisson(session, url, nxt, t.rates[stage], wl.load, rng, done))
    parts = await asyncio.gather(*runs)
    out = StageResult(rate=wl.load.rates[stage], concurrency=None, duration_s=wl.load.duration_s)
    for p in parts:
        out.records.extend(p.records)
        out.max_inflight_hit += p.max_inflight_hit
        out.peak_inflight += p.peak_inflight
    out.records.sort(key=lambda r: r.send)
    return out


def _tagged(stream: RequestStream, tenant: Tenant) -> Callable[[], BenchRequest]:
    def nxt() -> BenchRequest:
        req = stream.next()
        req.tenant = tenant.name
        req.headers = tenant.headers
        return req

    return nxt


def run_workload(wl: Workload, out_dir: Path, console: Console | None = None) -> Path:
    """Benchmark every system of `wl` in turn and write `<out_dir>/<name>_<utc>.json`; returns its path."""
    console = console or Console()
    workdir = sysmod.make_workdir()
    started = time.time()
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
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
            stages: list[StageResult] = []
            errors: list[dict[str, dict[str, float]]] = []
            by_class: list[dict[str, dict[str, dict[str, float]]]] = []
            first = wl.load.first_stream
            for k in range(first, first + wl.load.streams):
                label = name if wl.load.streams == 1 and first == 0 else f"{name} [stream {k}]"
                try:
                    entry["info"], part = _run_stream(wl, name, workdir, progress, label, k)
                except sysmod.SystemUnavailable as e:
                    entry["unavailable"] = str(e)
                    break
                if "latency_prediction_error" in entry["info"]:
                    errors.append(entry["info"]["latency_prediction_error"])
                if "latency_prediction_error_by_class" in entry["info"]:
                    by_class.append(entry["info"]["latency_prediction_error_by_class"])
                stages = part if not stages else [_pool(a, b) for a, b in zip(stages, part, strict=True)]
            if len(errors) > 1:  # each stream's gateway has a model of its own: report them all
                entry["info"]["latency_prediction_error_streams"] = errors
                entry["info"]["latency_prediction_error"] = pool_prediction_errors(errors)
            if len(by_class) > 1:
                entry["info"]["latency_prediction_error_by_class_streams"] = by_class
                entry["info"]["latency_prediction_error_by_class"] = {
                    key: pool_prediction_errors([s[key] for s in by_class if key in s])
                    for key in sorted({k for s in by_class for k in s})
                }
            if "unavailable" in entry:
                results["systems"].append(entry)
                continue
            entry["stages"] = [_stage_entry(st, wl, slo) for st in stages]
            entry["max_sustainable_rate"] = max_sustainable_rate(entry["stages"])
            results["systems"].append(entry)
    results["wall_s"] = round(time.time() - started, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{wl.name}_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(started))}.json"
    path.write_bytes(results_json(results))
    return path


def _stage_entry(st: StageResult, wl: Workload, slo: dict[str, Any]) -> dict[str, Any]:
    # Summaries come from the records as stored (times to the microsecond), so a reader recomputing
    # them from the file (`ingate bench report`, the benchmark database) gets exactly these numbers.
    recs = [_rounded(r.to_json()) for r in st.records]
    return stage_entry(
        st.rate, st.concurrency, st.duration_s, st.max_inflight_hit, st.peak_inflight, recs, wl, slo
    )


def stage_entry(
    rate: float | None,
    concurrency: int | None,
    duration_s: float,
    max_inflight_hit: int,
    peak_inflight: int,
    recs: list[dict[str, Any]],
    wl: Workload,
    slo: dict[str, Any],
) -> dict[str, Any]:
    """One point of a results file from its stored records (summaries computed from them), as
    `ingate bench run` and `ingate bench merge` write it."""
    return {
        "rate": rate,
        "concurrency": concurrency,
        "duration_s": duration_s,
        "max_inflight_hit": max_inflight_hit,
        "peak_inflight": peak_inflight,
        "summary": summarize(recs, duration_s, slo),
        **({"tenants": tenant_summaries(recs, duration_s, slo)} if wl.tenants else {}),
        "records": recs,
    }


def _rounded(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in rec.items()}


def results_json(results: dict[str, Any]) -> bytes:
    """A results file's bytes: indented JSON, except that each request record is one line with its
    times in whole microseconds. Per-request records are most of a multi-stream run's file; this
    keeps the summaries readable and diffs one line per request at under half the indented size.
    Still plain JSON: every reader takes it as before."""
    blocks: list[bytes] = []
    mark = uuid.uuid4().hex  # a placeholder no prompt or name can contain by accident
    shallow = {**results, "systems": []}
    for sysres in results.get("systems") or []:
        stages = []
        for st in sysres.get("stages") or []:
            recs = st.get("records")
            if isinstance(recs, list) and recs:
                rows = b",\n".join(b"        " + orjson.dumps(_rounded(r)) for r in recs)
                blocks.append(b"[\n" + rows + b"\n      ]")
                st = {**st, "records": f"@@{mark}-{len(blocks) - 1}@@"}
            stages.append(st)
        shallow["systems"].append({**sysres, "stages": stages} if "stages" in sysres else sysres)
    out = orjson.dumps(shallow, option=orjson.OPT_INDENT_2)
    for i, block in enumerate(blocks):
        out = out.replace(f'"@@{mark}-{i}@@"'.encode(), block, 1)
    return out


def _run_stream(
    wl: Workload, name: str, workdir: Path, progress: Progress, label: str, k: int
) -> tuple[dict[str, Any], list[StageResult]]:
    """One request stream's sweep against `name` on a fresh fleet (no cache carries over): the
    system's info and its stages."""
    fleet = sysmod.start_fleet(wl, workdir)
    try:
        system = sysmod.start_system(name, wl, fleet, workdir)
        try:
            stages = asyncio.run(_sweep(wl, system.url, progress, label, k))
            info: dict[str, Any] = dict(system.info)
            if system.metrics_url is not None:
                info["router_metrics"] = router_metrics(system.metrics_url)
            fams = _metric_families(system.url)  # one scrape serves both reads below
            errors = latency_model_errors(system.url, fams) if fams is not None else {}
            if errors:
                info["latency_prediction_error"] = errors
                if len(set(fleet.profiles.values())) > 1:  # a mixed pool: which classes it mispredicts
                    by_class = latency_model_errors_by_class(system.url, fleet.profiles, fams)
                    if by_class:
                        info["latency_prediction_error_by_class"] = by_class
            return info, stages
        finally:
            system.stop()
    finally:
        fleet.proc.stop()


def router_metrics(url: str) -> dict[str, float]:
    """A peer router's proof counters after a run (`peers.router_proof`); {} if unreadable."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return peers.router_proof(r.read().decode())
    except (OSError, ValueError):
        return {}


def _metric_families(url: str) -> list[Any] | None:
    """A gateway's `/metrics`, parsed; None if unreadable or not Prometheus text (a peer's own page)."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except (OSError, ValueError):
        return None
    try:
        return list(text_string_to_metric_families(text))
    except (ValueError, KeyError):
        return None


def latency_model_errors(url: str, families: list[Any] | None = None) -> dict[str, dict[str, float]]:
    """The gateway's latency-model prediction errors at the end of a stream, scraped from its
    `/metrics` (`ingate_latency_prediction_error_ratio_quantile`: |predicted - actual| / actual over its
    last predictions after warm-up, by profile/kind), e.g. {"slo-aware/ttft": {"0.5": 0.12, ...,
    "n": 812}}; empty for a system that exports none (peers, profiles without a latency model).
    `families`: the page already scraped and parsed, if the caller has it."""
    fams = families if families is not None else _metric_families(url)
    if fams is None:
        return {}
    out: dict[str, dict[str, float]] = {}
    try:
        for fam in fams:
            if fam.name == "ingate_latency_prediction_error_ratio_quantile":
                for smp in fam.samples:
                    key = f"{smp.labels['profile']}/{smp.labels['kind']}"
                    out.setdefault(key, {})[smp.labels["quantile"]] = round(smp.value, 4)
            elif fam.name == "ingate_latency_prediction_error_ratio":
                for smp in fam.samples:
                    if smp.name.endswith("_count"):
                        key = f"{smp.labels['profile']}/{smp.labels['kind']}"
                        out.setdefault(key, {})["n"] = smp.value
    except KeyError:
        return {}
    return {k: v for k, v in out.items() if v.get("n")}


def latency_model_errors_by_class(
    url: str, classes: dict[str, str], families: list[Any] | None = None
) -> dict[str, dict[str, dict[str, float]]]:
    """The per-endpoint prediction errors a gateway exports
    (`ingate_endpoint_latency_prediction_error_ratio_quantile`, each endpoint's last predictions),
    grouped by the class of each endpoint (`classes`: address -> e.g. the simulator profile), e.g.
    {"slo-aware/ttft": {"l4-llama3-8b": {"0.5": 0.2, "0.9": 0.6, "n": 900, "endpoints": 2}}}. A class's
    quantile is the mean of its endpoints' quantiles weighted by their window sizes (the windows
    themselves are not exported); `window` is the predictions those windows hold. `families`: as for
    `latency_model_errors`."""
    fams = families if families is not None else _metric_families(url)
    if fams is None:
        return {}
    per_ep: dict[tuple[str, str], dict[str, float]] = {}
    try:
        for fam in fams:
            if fam.name == "ingate_endpoint_latency_prediction_error_ratio_quantile":
                for smp in fam.samples:
                    at = (f"{smp.labels['profile']}/{smp.labels['kind']}", smp.labels["endpoint"])
                    per_ep.setdefault(at, {})[smp.labels["quantile"]] = smp.value
            elif fam.name == "ingate_endpoint_latency_prediction_errors":
                for smp in fam.samples:
                    if smp.name.endswith("_total"):
                        at = (f"{smp.labels['profile']}/{smp.labels['kind']}", smp.labels["endpoint"])
                        per_ep.setdefault(at, {})["n"] = smp.value
    except KeyError:
        return {}
    grouped: dict[str, dict[str, list[dict[str, float]]]] = {}
    for (key, address), v in per_ep.items():
        if v.get("n") and address in classes:
            v["window"] = min(v["n"], float(ENDPOINT_ERROR_WINDOW))
            grouped.setdefault(key, {}).setdefault(classes[address], []).append(v)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, by_class in grouped.items():
        for cls, parts in by_class.items():
            pooled = _weighted_quantiles(parts)
            if pooled:
                pooled["endpoints"] = float(len(parts))
                out.setdefault(key, {})[cls] = pooled
    return out


def _weighted_quantiles(parts: list[dict[str, float]], cap: float = 2000.0) -> dict[str, float]:
    """Several windows' quantiles pooled: each quantile the mean of the windows' weighted by their
    sizes (`window` where given, else `n` capped at `cap`); `n` and `window` are summed."""
    weights = [p["window"] if "window" in p else min(p.get("n", 0.0), cap) for p in parts]
    total = sum(weights)
    if total <= 0:
        return {}
    pooled: dict[str, float] = {"n": sum(p.get("n", 0.0) for p in parts)}
    if any("window" in p for p in parts):
        pooled["window"] = total
    if any("endpoints" in p for p in parts):
        pooled["endpoints"] = max(p.get("endpoints", 0.0) for p in parts)
    for q in ("0.5", "0.9", "0.99"):
        have = [(p[q], w) for p, w in zip(parts, weights, strict=True) if q in p]
        if have and sum(w for _, w in have) > 0:
            pooled[q] = round(sum(v * w for v, w in have) / sum(w for _, w in have), 4)
    return pooled


def pool_prediction_errors(streams: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Prediction errors over several streams (one gateway, one model each): per profile/kind, each
    quantile is the mean of the streams' quantiles weighted by the predictions in their windows
    (`n` capped at the 2,000 the window holds, or `window` where given); `n` is the total and `streams`
    how many were pooled. An approximation of the pooled quantile (the windows themselves are not
    exported)."""
    out: dict[str, dict[str, float]] = {}
    for key in sorted({k for s in streams for k in s}):
        parts = [s[key] for s in streams if key in s]
        pooled = _weighted_quantiles(parts)
        if pooled:
            pooled["streams"] = float(len(parts))
            out[key] = pooled
    return out


def _pool(a: StageResult, b: StageResult) -> StageResult:
    """One point's results over two request streams (records tagged with their stream)."""
    out = StageResult(rate=a.rate, concurrency=a.concurrency, duration_s=a.duration_s)
    out.records = a.records + b.records
    out.max_inflight_hit = a.max_inflight_hit + b.max_inflight_hit
    out.peak_inflight = max(a.peak_inflight, b.peak_inflight)
    return out


def _cpus() -> int:
    import os

    return os.cpu_count() or 0
