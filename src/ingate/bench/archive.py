"""Superseded benchmark runs, kept as a compact index instead of megabytes of request records.

`ingate bench archive FILE...` appends each run's summary (workload, seed set, time, machine, per
system and stage: offered rate, requests sent, within the SLO, goodput, TTFT and e2e percentiles,
cached share; for `ingate bench async` its parameters and per-scenario summary; for other result
kinds their top-level numbers) to
`benchmarks/results/archive.json` and deletes the file: the full file stays in git history (the
index records the commit to look in).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import orjson

from ingate.bench.stats import RESULTS_FORMAT, resummarize

KEEP = ("sent", "ok", "good", "goodput_rps", "slo_attainment", "ttft_p50", "ttft_p90", "ttft_p99", "e2e_p99",
        "cached_token_share")  # fmt: skip


def _git_head(repo: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def summary_of(path: Path) -> dict[str, Any]:
    """A compact record of one results file."""
    data = orjson.loads(path.read_bytes())
    entry: dict[str, Any] = {"file": path.name}
    if data.get("format") == RESULTS_FORMAT:
        resummarize(data)
        wl = data["workload"]
        entry.update(
            kind="bench",
            workload=wl["name"],
            seed=wl.get("seed"),
            seed_set=wl.get("seed_set", "tuning"),
            streams=wl.get("load", {}).get("streams", 1),
            started_utc=data.get("started_utc"),
            machine=data.get("machine"),
            systems=[
                {
                    "name": s["name"],
                    **({"unavailable": s["unavailable"]} if s.get("unavailable") else {}),
                    "stages": [
                        {"rate": st.get("rate"), **{k: st["summary"].get(k) for k in KEEP}}
                        for st in s.get("stages") or []
                    ],
                }
                for s in data["systems"]
            ],
        )
    elif "scenarios" in data and "params" in data:  # ingate bench async (docs/async.md)
        entry["file"] = f"{path.parent.name}/{path.name}"
        entry.update(
            kind="async",
            started_utc=data.get("started"),
            machine=data.get("machine"),
            params=data["params"],
            # Pooled summary of repeated runs (--runs), else the single run's scenarios; no raw TTFTs.
            scenarios={
                name: {k: v for k, v in sc.items() if not isinstance(v, list)}
                for name, sc in (data.get("summary") or data["scenarios"]).items()
            },
        )
    else:
        entry.update(
            kind=data.get("benchmark", "other"),
            **{k: v for k, v in data.items() if k in ("machine", "note", "rows", "duration_s", "target_met")},
        )
        if isinstance(entry.get("rows"), list):
            entry["rows"] = [
                {k: v for k, v in r.items() if not isinstance(v, list | dict)} for r in entry["rows"]
            ]
    return entry


def archive(paths: list[Path], index: Path, repo: Path) -> list[dict[str, Any]]:
    """Append summaries of `paths` to `index` and delete them (and the PNG and knee table,
    `<name>_knees.json` / `.md`, beside each: they describe a run no longer in the tree)."""
    existing: list[dict[str, Any]] = orjson.loads(index.read_bytes()) if index.exists() else []
    commit = _git_head(repo)
    added = []
    for p in paths:
        e = summary_of(p)
        e["git_commit"] = commit
        added.append(e)
    existing.extend(added)
    index.write_bytes(orjson.dumps(existing, option=orjson.OPT_INDENT_2))
    for p in paths:
        p.unlink()
        p.with_suffix(".png").unlink(missing_ok=True)
        for ext in (".json", ".md"):
            p.with_name(f"{p.stem}_knees{ext}").unlink(missing_ok=True)
    return added
