"""`extends`: a profile that changes a few weights or plugin parameters of another without copying it."""

from __future__ import annotations

import pytest

from ingate.datastore import Datastore, Endpoint
from ingate.scheduling.config import SchedulerConfig, default_profiles
from ingate.scheduling.plugins.latency import PredictedLatencyScorer
from ingate.scheduling.plugins.precise_prefix import PrecisePrefixScorer
from ingate.scheduling.scheduler import build_scheduler


def _cfg(profiles: dict[str, object], default: str = "default") -> SchedulerConfig:
    return SchedulerConfig.model_validate({"defaultProfile": default, "profiles": profiles})


def test_extending_its_own_name_changes_the_builtin_profile_only_where_named() -> None:
    cfg = _cfg(
        {
            "precise-prefix": {
                "extends": "precise-prefix",
                "parameters": {"precise-prefix": {"eventsPort": 5600}, "load-guard": {"queueMargin": 4}},
                "weights": {"predicted-latency": 5},
            }
        }
    )
    got, builtin = cfg.profiles["precise-prefix"], default_profiles()["precise-prefix"]
    assert [s.type for s in got.scorers] == [s.type for s in builtin.scorers]
    for new, old in zip(got.scorers, builtin.scorers, strict=True):
        assert new.weight == (5 if new.type == "predicted-latency" else old.weight)
        assert new.parameters == ({"eventsPort": 5600} if new.type == "precise-prefix" else old.parameters)
    guard = next(f for f in got.filters if f.type == "load-guard")
    # merged over the built-in parameters, not replacing them
    assert guard.parameters == {"queueMargin": 4, "kvThreshold": 1.0, "marginFactor": 8}
    assert got.picker == builtin.picker and got.extends is None
    # the built-in profiles themselves are untouched
    assert default_profiles()["precise-prefix"] == builtin


def test_extended_plugins_are_built_with_the_new_parameters_and_weights() -> None:
    cfg = _cfg(
        {
            "mine": {
                "extends": "precise-prefix",
                "parameters": {"precise-prefix": {"eventsPort": 5600}, "predicted-latency": {"kvWeight": 3}},
                "weights": {"kv-cache": 0},
            }
        },
        default="mine",
    )
    sched = build_scheduler(cfg, Datastore([Endpoint(name="e", host="127.0.0.1", port=8000)]))
    scorers = {type(s): w for s, w in sched.profiles["mine"].scorers}
    precise = next(s for s, _ in sched.profiles["mine"].scorers if isinstance(s, PrecisePrefixScorer))
    latency = next(s for s, _ in sched.profiles["mine"].scorers if isinstance(s, PredictedLatencyScorer))
    assert precise.events_port == 5600 and latency.kv_weight == 3
    assert scorers[PredictedLatencyScorer] == 3
    assert [w for s, w in sched.profiles["mine"].scorers if s.name == "kv-cache"] == [0]
    # the built-in precise-prefix profile is still there, unchanged
    assert cfg.profiles["precise-prefix"] == default_profiles()["precise-prefix"]


def test_a_profile_can_extend_one_defined_beside_it_in_any_order() -> None:
    cfg = _cfg(
        {
            "b": {"extends": "a", "weights": {"kv-cache": 2}},
            "a": {"extends": "default", "weights": {"size-band": 0}},
        }
    )
    weights = {s.type: s.weight for s in cfg.profiles["b"].scorers}
    assert weights["size-band"] == 0 and weights["kv-cache"] == 2
    assert {s.type: s.weight for s in cfg.profiles["a"].scorers}["kv-cache"] == 0.5


@pytest.mark.parametrize(
    ("profiles", "message"),
    [
        ({"p": {"extends": "nope"}}, "extends 'nope', which is not a profile"),
        ({"p": {"extends": "p"}}, "there is no built-in 'p'"),
        ({"a": {"extends": "b"}, "b": {"extends": "a"}}, "cycle: a -> b -> a"),
        ({"p": {"extends": "default", "weights": {"precise-prefix": 1}}}, "no precise-prefix scorer"),
        ({"p": {"extends": "default", "parameters": {"queue": {"x": 1}}}}, "no queue plugin"),
        ({"p": {"extends": "default", "scorers": [{"type": "queue"}]}}, "not scorers"),
        ({"p": {"weights": {"kv-cache": 1}}}, "need extends"),
        ({"p": {"extends": "default", "weights": {"kv-cache": -1}}}, "greater than or equal to 0"),
    ],
)
def test_bad_extends_is_a_clear_config_error(profiles: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _cfg(profiles)


def test_unknown_parameter_in_an_override_names_the_plugin() -> None:
    cfg = _cfg({"p": {"extends": "default", "parameters": {"prefix-cache": {"blokChars": 4}}}})
    with pytest.raises(ValueError, match=r"scheduler.profiles.p.scorers\[0\]: unknown parameter"):
        build_scheduler(cfg, Datastore())
