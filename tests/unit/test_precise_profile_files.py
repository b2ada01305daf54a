"""The benchmark files that give the built-in precise-prefix profile the harness's event ports must
keep its weights (they extend it, or, for files kept for reruns, spell it out): the published
precise-vs-approximate numbers are read as the built-in profile's, and an edit to one place only would
silently measure something else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ingate.scheduling.config import ProfileConfig, SchedulerConfig, default_profiles

ROOT = Path(__file__).resolve().parents[2]


def _shape(profile: ProfileConfig) -> tuple[Any, ...]:
    """Filters, scorer types and weights, picker: everything but the precise scorer's parameters
    (where the events come from, whether it speculates), which the files set on purpose."""
    scorers = [
        (s.type, s.weight, None if s.type == "precise-prefix" else s.parameters) for s in profile.scorers
    ]
    filters = [(f.type, f.parameters) for f in profile.filters]
    return (filters, scorers, profile.picker.type)


def _profile(path: str) -> ProfileConfig:
    doc = yaml.safe_load((ROOT / path).read_text())
    sched = doc["gateway"]["scheduler"] if "gateway" in doc else doc["scheduler"]
    profiles = sched["profiles"]
    name = "precise-prefix" if "precise-prefix" in profiles else sched["defaultProfile"]
    return SchedulerConfig.model_validate({"profiles": profiles}).profiles[name]


@pytest.mark.parametrize(
    "path",
    [
        "benchmarks/workloads/b2b-kv-events.yaml",
        "benchmarks/workloads/shared-prefix-kv-events.yaml",
        "benchmarks/scheduling/profiles/precise-prefix-no-speculation.yaml",
        "benchmarks/scheduling/profiles/precise-prefix-balanced.yaml",
    ],
)
def test_file_keeps_the_builtin_precise_profile(path: str) -> None:
    assert _shape(_profile(path)) == _shape(default_profiles()["precise-prefix"])


def test_no_speculation_ablation_differs_only_in_speculation() -> None:
    prof = _profile("benchmarks/scheduling/profiles/precise-prefix-no-speculation.yaml")
    precise = next(s for s in prof.scorers if s.type == "precise-prefix")
    assert precise.parameters == {"eventsPortOffset": 1000, "replayPortOffset": 2000, "speculative": False}


@pytest.mark.parametrize(
    "path", ["benchmarks/workloads/b2b-kv-events.yaml", "benchmarks/workloads/shared-prefix-kv-events.yaml"]
)
def test_kv_event_workloads_point_precise_routing_at_the_harness_ports(path: str) -> None:
    precise = next(s for s in _profile(path).scorers if s.type == "precise-prefix")
    assert precise.parameters == {"eventsPortOffset": 1000, "replayPortOffset": 2000}


def test_harness_config_of_the_ablation_system_resolves_to_the_builtin_profile_without_speculation() -> None:
    """What `ingate bench run b2b-kv-events.yaml` gives the gateway for the no-speculation system: the
    file's profile joins the workload's and extends the precise profile there."""
    from ingate.bench.systems import ingate_config
    from ingate.bench.workload import load_workload
    from ingate.config import parse_config

    wl = load_workload(ROOT / "benchmarks/workloads/b2b-kv-events.yaml")
    profile = str(ROOT / "benchmarks/scheduling/profiles/precise-prefix-no-speculation.yaml")
    cfg = parse_config(ingate_config(wl, ["127.0.0.1:1"], 9, profile=profile))
    prof = cfg.scheduler.profiles[cfg.scheduler.default_profile]
    assert _shape(prof) == _shape(default_profiles()["precise-prefix"])
    precise = next(s for s in prof.scorers if s.type == "precise-prefix")
    assert precise.parameters == {"eventsPortOffset": 1000, "replayPortOffset": 2000, "speculative": False}
