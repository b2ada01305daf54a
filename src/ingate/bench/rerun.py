"""Rerun a committed benchmark exactly as it was run (`ingate bench rerun`).

A results file of `ingate bench run` stores the whole workload it ran (seeds already resolved to
the tuning or evaluation set, rates, streams, fleet, gateway overrides) and the systems in the order
they ran, so it is its own recipe. Rerunning from it needs no memory of which flags made it: that is
what keeps the published tables reproducible, and what makes a change of the default profile a
matter of rerunning the files the docs cite (`--cited`), not of rebuilding command lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from ingate.bench.stats import RESULTS_FORMAT
from ingate.bench.workload import Workload

_RESULT_NAME = re.compile(r"[\w.-]+_\d{8}T\d{6}Z\.json")
"""How `ingate bench run` names its files (`<workload>_<UTC time>.json`)."""
_RESULT_DIR = re.compile(r"results/((?:[\w.-]+/)+)(?![\w.-])")
"""A folder of results a doc cites as a whole (`[results/heldout/](results/heldout/)`)."""


class RerunError(ValueError):
    """A file that cannot be rerun, with the reason."""


@dataclass(frozen=True, slots=True)
class Rerun:
    """One results file and what rerunning it runs."""

    source: Path
    workload: Workload
    previous_wall_s: float | None

    @property
    def systems(self) -> list[str]:
        return list(self.workload.systems)


def plan(path: Path) -> Rerun:
    """The rerun of one `ingate bench run` results file: its stored workload, with the systems the
    file holds (in the order they ran). Raises `RerunError` for other files (async, data-plane and
    replay results have their own commands) and for workloads this version no longer accepts."""
    res, wl = read_results(path)
    names = [s["name"] for s in res.get("systems") or [] if isinstance(s, dict) and s.get("name")]
    if names:
        wl.systems = names
    wall = res.get("wall_s")
    return Rerun(path, wl, float(wall) if isinstance(wall, int | float) else None)


def read_results(path: Path) -> tuple[dict[str, Any], Workload]:
    """An `ingate bench run` results file and its stored workload; `RerunError` saying why for any
    other file or a workload this version no longer accepts (shared by rerun and merge)."""
    try:
        res = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as e:
        raise RerunError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(res, dict) or res.get("format") != RESULTS_FORMAT or "workload" not in res:
        raise RerunError(
            f"{path}: not an `ingate bench run` results file (format {RESULTS_FORMAT!r}); async, "
            "data-plane and replay results are rerun by their own commands (docs/benchmarks.md)"
        )
    try:
        wl = Workload.model_validate(res["workload"])
    except ValidationError as e:
        raise RerunError(f"{path}: its workload is not valid for this version of ingate: {e}") from None
    return res, wl


def cited(doc: Path, results_root: Path) -> list[Path]:
    """The results files under `results_root` that the markdown file `doc` names (by file name, as
    links or in backticks), or holds in a results folder it cites as a whole (`results/heldout/`:
    the `ingate bench run` files directly in it), in the order it first cites them. Names not found
    are skipped: a doc may cite archived runs, whose summaries live in the archive index."""
    files: dict[str, Path] = {}
    for p in sorted(results_root.rglob("*.json")):
        files.setdefault(p.name, p)
    text = doc.read_text()
    hits: list[tuple[int, list[Path]]] = []
    for m in _RESULT_NAME.finditer(text):
        found = files.get(m.group(0))
        if found is not None:
            hits.append((m.start(), [found]))
    for m in _RESULT_DIR.finditer(text):
        folder = results_root / m.group(1)
        if folder.is_dir():
            hits.append(
                (m.start(), sorted(p for p in folder.glob("*.json") if _RESULT_NAME.fullmatch(p.name)))
            )
    out: list[Path] = []
    for _, paths in sorted(hits, key=lambda h: h[0]):
        out += [p for p in paths if p not in out]
    return out
