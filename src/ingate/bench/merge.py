"""Merge results files of one workload run over different request streams (`ingate bench merge`).

`ingate bench run --first-stream K` adds streams (new seeds) to a measurement made earlier. Merging
the two files gives one results file as if all the streams had run at once: the same workload with
the streams of both, each point's records pooled and its summary recomputed from them, the latency
model's errors pooled over every stream's window. The streams must join up (0-5 and 6-11, not 0-5 and
8-11), so the merged file is a recipe `ingate bench rerun` can repeat exactly.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ingate.bench.rerun import RerunError, read_results
from ingate.bench.runner import pool_prediction_errors, results_json, stage_entry
from ingate.bench.stats import RESULTS_FORMAT, max_sustainable_rate
from ingate.bench.workload import Workload
from ingate.scheduling.config import SchedulerConfig


class MergeError(ValueError):
    """Files that cannot be merged, with the reason."""


def _load(path: Path) -> tuple[dict[str, Any], Workload]:
    try:
        return read_results(path)
    except RerunError as e:
        raise MergeError(str(e)) from None


def _without_streams(wl: Workload) -> dict[str, Any]:
    d = wl.model_dump()
    d["load"].pop("streams")
    d["load"].pop("first_stream")
    sched = (d.get("gateway") or {}).get("scheduler")
    if isinstance(sched, dict):
        # The profiles as the gateway resolves them: a profile spelled out and one that `extends` a
        # built-in to the same plugins are the same workload.
        try:
            d["gateway"]["scheduler"] = SchedulerConfig.model_validate(sched).model_dump()
        except ValueError:
            pass  # compared as written; the run itself reported the error
    return d


def _errors(info: dict[str, Any], key: str) -> list[Any]:
    """Per-stream latency-model errors of one system in one file (`key`: the overall errors or the
    by-class ones), as the list `ingate bench run` pools."""
    many = info.get(f"{key}_streams")
    if many:
        return list(many)
    one = info.get(key)
    return [one] if one else []


def merge(paths: list[Path]) -> dict[str, Any]:
    """The results of `paths` (two or more files of one workload and systems, streams that join up)
    as one results dict, ready for `results_json`. Raises `MergeError` saying what does not match."""
    if len(paths) < 2:
        raise MergeError("give at least two results files to merge")
    loaded = [(p, *_load(p)) for p in paths]
    loaded.sort(key=lambda t: t[2].load.first_stream)
    p0, res0, wl0 = loaded[0]
    names0 = [s.get("name") for s in res0.get("systems") or []]
    nxt = wl0.load.first_stream
    for p, res, wl in loaded:
        if _without_streams(wl) != _without_streams(wl0):
            raise MergeError(f"{p}: another workload than {p0} (only the streams may differ)")
        if [s.get("name") for s in res.get("systems") or []] != names0:
            raise MergeError(f"{p}: other systems than {p0} ({', '.join(map(str, names0))})")
        if wl.load.first_stream != nxt:
            raise MergeError(
                f"{p}: starts at stream {wl.load.first_stream}, the files before end at stream {nxt - 1}: "
                "the streams must join up without overlap (run the missing ones with --first-stream)"
            )
        nxt = wl.load.first_stream + wl.load.streams
    merged_wl = wl0.model_dump()
    merged_wl["load"]["streams"] = nxt - wl0.load.first_stream
    try:
        wl = Workload.model_validate(merged_wl)
    except ValidationError as e:
        raise MergeError(f"the merged streams are not valid together: {e}") from None
    slo = wl.slo.model_dump()
    systems: list[dict[str, Any]] = []
    for i, name in enumerate(names0):
        parts = [res["systems"][i] for _, res, _ in loaded]
        entry: dict[str, Any] = {"name": name, "info": dict(parts[-1].get("info") or {})}
        unavailable = [s["unavailable"] for s in parts if "unavailable" in s]
        for key in ("latency_prediction_error", "latency_prediction_error_by_class"):
            entry["info"].pop(f"{key}_streams", None)
            entry["info"].pop(key, None)
            per_stream = [e for s in parts for e in _errors(s.get("info") or {}, key)]
            if not per_stream:
                continue
            if len(per_stream) > 1:
                entry["info"][f"{key}_streams"] = per_stream
            if key == "latency_prediction_error":
                entry["info"][key] = pool_prediction_errors(per_stream)
            else:
                entry["info"][key] = {
                    c: pool_prediction_errors([s[c] for s in per_stream if c in s])
                    for c in sorted({c for s in per_stream for c in s})
                }
        if unavailable:
            entry["unavailable"] = unavailable[0]
            systems.append(entry)
            continue
        stages: list[dict[str, Any]] = []
        for j, st in enumerate(parts[0]["stages"]):
            sts = [s["stages"][j] for s in parts]
            recs = [r for s in sts for r in s["records"]]
            hit, peak = sum(s["max_inflight_hit"] for s in sts), max(s["peak_inflight"] for s in sts)
            stages.append(
                stage_entry(st["rate"], st["concurrency"], st["duration_s"], hit, peak, recs, wl, slo)
            )
        entry["stages"] = stages
        entry["max_sustainable_rate"] = max_sustainable_rate(stages)
        systems.append(entry)
    walls = [w for _, res, _ in loaded if isinstance(w := res.get("wall_s"), int | float)]
    return {
        "format": RESULTS_FORMAT,
        "workload": wl.model_dump(),
        "machine": res0.get("machine"),
        "started_utc": res0.get("started_utc"),
        "merged_from": [
            {
                "file": p.name,
                "first_stream": w.load.first_stream,
                "streams": w.load.streams,
                "started_utc": r.get("started_utc"),
            }
            for p, r, w in loaded
        ],
        "systems": systems,
        **({"wall_s": round(sum(walls), 1)} if len(walls) == len(loaded) else {}),
    }


def write_merged(paths: list[Path], out_dir: Path) -> Path:
    """Merge `paths` and write `<out_dir>/<workload>_<UTC now>.json` (named as `ingate bench run`
    names its files, so docs can cite it and `ingate bench rerun` can repeat it); returns its path."""
    merged = merge(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{merged['workload']['name']}_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    if path.exists() or path in paths:
        raise MergeError(f"{path} exists: merge again in a second")
    path.write_bytes(results_json(merged))
    return path
