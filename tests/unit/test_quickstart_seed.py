"""The committed seed curves: compact, labelled (H100 calibrated, the rest estimated), and reproducible."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from ingate.bench.dbcli import SEED_FILE, load_seed

ROOT = Path(__file__).resolve().parents[2]


def _seed_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("quickstart_seed", ROOT / "benchmarks/quickstart/seed.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quickstart_seed"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_seed_file_is_compact_and_labelled() -> None:
    assert SEED_FILE.stat().st_size < 200_000
    triples = load_seed()
    models = {k.model for k, _, _ in triples}
    assert {"meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-70B-Instruct"} <= models
    for key, run, points in triples:
        assert run.kind == "simulated" and run.tool == "ingate-replay"
        # Only the H100 8B profile is fitted to measurements; every other profile is an estimate.
        assert run.estimated == (key.accelerator_profile != "h100-llama3-8b"), key
        assert run.calibration.startswith(
            f"{key.accelerator_profile}: {'estimate' if run.estimated else 'measured'}"
        )
        assert len(points) >= 5 and all(p.errors == 0 and p.ttft_p90 and p.tpot_p90 for p in points)
    for model in models:
        assert {k.workload for k, _, _ in triples if k.model == model} == {"chat", "rag", "batch"}


def test_seed_curve_regenerates_identically() -> None:
    # The cheapest configuration to regenerate (about a second): the same numbers as committed.
    seed = _seed_module()
    ((key, run, points),) = seed.generate("l4-llama3-8b:chat")
    committed = {(k.accelerator_profile, k.workload): (k, r, p) for k, r, p in load_seed()}
    ck, cr, cp = committed[("l4-llama3-8b", "chat")]
    assert (key, run) == (ck, cr)
    assert points == cp
