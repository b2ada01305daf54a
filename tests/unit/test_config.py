"""Gateway YAML configuration: defaults, and errors that name the offending field."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingate.config import ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pool.yaml"


def _base(**extra: object) -> dict[str, object]:
    return {"pool": {"endpoints": [{"address": "127.0.0.1:8100"}]}, **extra}


def test_example_config_loads() -> None:
    cfg = load_config(EXAMPLE)
    assert len(cfg.pool.endpoints) == 4
    assert [e.split() for e in cfg.pool.endpoints] == [("127.0.0.1", 8100 + i) for i in range(4)]


def test_defaults() -> None:
    cfg = parse_config(_base())
    assert cfg.pool.engine == "vllm"
    assert cfg.metrics.interval_ms == 50
    assert cfg.metrics.stale_after_ms == 200
    assert cfg.proxy.retries == 1
    assert cfg.flow_control is None


def test_bad_address_names_the_field() -> None:
    data = {"pool": {"endpoints": [{"address": "a:1"}, {"address": "b:2"}, {"address": "nohost"}]}}
    with pytest.raises(ConfigError, match=r"pool\.endpoints\.2\.address"):
        parse_config(data)


def test_unknown_key_rejected_with_its_path() -> None:
    with pytest.raises(ConfigError, match=r"proxy\.retrys"):
        parse_config(_base(proxy={"retrys": 2}))


def test_duplicate_endpoint_rejected() -> None:
    data = {"pool": {"endpoints": [{"address": "a:1"}, {"address": "a:1"}]}}
    with pytest.raises(ConfigError, match="listed twice"):
        parse_config(data)


def test_default_objective_must_exist() -> None:
    with pytest.raises(ConfigError, match="defaultObjective"):
        parse_config(_base(objectives=[{"name": "chat", "priority": 1}], defaultObjective="batch"))


def test_rewrite_weights_must_sum_positive() -> None:
    rule = {"matches": [{"model": {"value": "m"}}], "targets": [{"modelRewrite": "m-v1", "weight": 0}]}
    with pytest.raises(ConfigError, match=r"models\.rewrites\.0"):
        parse_config(_base(models={"rewrites": [rule]}))


def test_camel_and_snake_case_accepted() -> None:
    a = parse_config(_base(metrics={"intervalMs": 20}))
    b = parse_config(_base(metrics={"interval_ms": 20}))
    assert a.metrics.interval_ms == b.metrics.interval_ms == 20


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pool: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top)


def test_flow_control_section_validated_at_parse_time() -> None:
    cfg = parse_config(_base(flowControl={"queueTtlS": 5}))
    assert cfg.flow_control is not None and cfg.flow_control.queue_ttl_s == 5
    with pytest.raises(ConfigError, match=r"flowControl\.queueTtlz|flow_control\.queueTtlz"):
        parse_config(_base(flowControl={"queueTtlz": 5}))
