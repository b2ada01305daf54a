"""The objective store: static config + a dynamic layer, change listeners, rewrite precedence."""

from __future__ import annotations

from collections import Counter

from ingate.config import GatewayConfig
from ingate.objectives import ObjectiveSpec, ObjectiveStore, RewriteRuleSpec, RewriteSpec


def test_static_from_config_and_dynamic_override() -> None:
    cfg = GatewayConfig.model_validate(
        {
            "pool": {"endpoints": [{"address": "127.0.0.1:8000"}]},
            "objectives": [{"name": "batch", "priority": -1, "models": ["m"], "slo": {"ttftMs": 500}}],
            "models": {
                "rewrites": [{"matches": [{"model": {"value": "a"}}], "targets": [{"modelRewrite": "a-v1"}]}]
            },
        }
    )
    s = ObjectiveStore.from_config(cfg)
    assert s.get("batch") == ObjectiveSpec("batch", -1, 500, None, ("m",))
    assert s.for_model("m") is s.get("batch")
    assert s.rewrite("a", 0.5) == "a-v1" and s.rewrite("b", 0.5) is None
    changes: list[int] = []
    s.on_change(lambda: changes.append(s.version))
    assert s.put(ObjectiveSpec("batch", 5))
    assert s.get("batch") is not None and s.get("batch").priority == 5  # type: ignore[union-attr]
    assert not s.put(ObjectiveSpec("batch", 5))  # unchanged: no notification
    assert s.delete("batch")
    assert s.get("batch") is not None and s.get("batch").priority == -1  # type: ignore[union-attr]
    assert changes == [1, 2]


def test_replace_is_quiet_when_nothing_changed() -> None:
    s = ObjectiveStore.create()
    calls: list[None] = []
    s.on_change(lambda: calls.append(None))
    objs = [ObjectiveSpec("a", 1), ObjectiveSpec("b", 2)]
    assert s.replace(objs)
    assert not s.replace(list(reversed(objs)))
    assert s.replace([ObjectiveSpec("a", 1)])
    assert s.get("b") is None
    assert len(calls) == 2
    assert dict(s.objectives()) == {"a": ObjectiveSpec("a", 1)}


def test_rewrite_precedence_exact_over_catch_all_and_oldest_first() -> None:
    s = ObjectiveStore.create()
    s.put_rewrite(RewriteSpec("ns/new", (RewriteRuleSpec(("m",), (("new", 1),)),), ("2026-02-01T00:00:00Z",)))
    s.put_rewrite(
        RewriteSpec(
            "ns/old",
            (RewriteRuleSpec(("m",), (("old", 1),)), RewriteRuleSpec((), (("default", 1),))),
            ("2026-01-01T00:00:00Z",),
        )
    )
    assert s.rewrite("m", 0.1) == "old"
    assert s.rewrite("anything", 0.1) == "default"
    s.delete_rewrite("ns/old")
    assert s.rewrite("m", 0.1) == "new" and s.rewrite("anything", 0.1) is None


def test_weighted_split_follows_weights() -> None:
    s = ObjectiveStore.create(
        rewrites=[RewriteSpec("c", (RewriteRuleSpec(("m",), (("v1", 90), ("v2", 10))),))]
    )
    picks = Counter(s.rewrite("m", i / 1000) for i in range(1000))
    assert picks == {"v1": 900, "v2": 100}


def test_resolve_named_then_model_then_default() -> None:
    cfg = GatewayConfig.model_validate(
        {
            "pool": {"endpoints": [{"address": "127.0.0.1:8000"}]},
            "objectives": [{"name": "std", "priority": 0}, {"name": "chat", "priority": 2, "models": ["m"]}],
            "defaultObjective": "std",
        }
    )
    s = ObjectiveStore.from_config(cfg)
    s.put(ObjectiveSpec("critical", 10))  # e.g. from an InferenceObjective
    assert s.resolve("critical", "m") == ObjectiveSpec("critical", 10)
    assert s.resolve("unknown", "m") is s.get("chat")
    assert s.resolve(None, "other") is s.get("std")
    assert ObjectiveStore.create().resolve(None, "m") is None
