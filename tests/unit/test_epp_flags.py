"""The upstream picker's flags (both spellings) and its EndpointPickerConfig, read by ingate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ingate.config import ConfigError
from ingate.epp_config import scheduler_from_epp
from ingate.epp_flags import (
    EppOptions,
    FlagError,
    canonical,
    looks_like_epp_args,
    parse_duration,
    parse_flags,
)
from ingate.serve import build_config


def test_both_spellings_and_value_forms() -> None:
    got = parse_flags(
        ["-poolName", "p", "--pool-namespace=ns", "-grpcPort", "9100", "--secure-serving=false",
         "--enable-cert-reload", "-v", "4", "--refresh-metrics-interval", "100ms", "--poolGroup=x.io",
         "-DestinationEndpointHintKey", "x-gateway-destination-endpoint"]
    )  # fmt: skip
    assert got == {
        "pool-name": "p",
        "pool-namespace": "ns",
        "grpc-port": 9100,
        "secure-serving": False,
        "enable-cert-reload": True,
        "v": 4,
        "refresh-metrics-interval": pytest.approx(0.1),
        "pool-group": "x.io",
        "destination-endpoint-hint-key": "x-gateway-destination-endpoint",
    }
    assert canonical("-grpcHealthPort") == "grpc-health-port" == canonical("--grpc-health-port")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("50ms", 0.05), ("2s", 2.0), ("1m30s", 90.0), ("1h", 3600.0), ("0", 0.0), ("1.5s", 1.5)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nope"], "unknown flag --nope"),
        (["--grpc-port"], "needs a value"),
        (["--grpc-port", "abc"], "flag --grpc-port"),
        (["--tracing=perhaps"], "not a boolean"),
        (["--drain-timeout", "10"], "not a duration"),
        (["positional"], "unexpected argument"),
    ],
)
def test_bad_flags_name_themselves(argv: list[str], message: str) -> None:
    with pytest.raises(FlagError, match=message):
        parse_flags(argv)


def test_options_validate_like_upstream() -> None:
    with pytest.raises(FlagError, match="mutually exclusive"):
        EppOptions.from_args(
            ["--pool-name", "p", "--endpoint-selector", "app=x", "--endpoint-target-ports", "8000"]
        )
    with pytest.raises(FlagError, match="needs --endpoint-target-ports"):
        EppOptions.from_args(["--endpoint-selector", "app=x"])
    with pytest.raises(FlagError, match="only the default"):
        EppOptions.from_args(["--destination-endpoint-hint-key", "x-other"])
    # below upstream's 50 ms minimum: clamped (upstream logs a warning and carries on)
    assert (
        EppOptions.from_args(["--refresh-metrics-interval", "10ms"]).get("refresh-metrics-interval") == 0.05
    )
    with pytest.raises(FlagError, match="cannot both be set"):
        EppOptions.from_args(["--config-file", "a.yaml", "--config-text", "{}"])
    for flag in ("--metrics-staleness-threshold=0s", "--plugin-state-staleness-threshold=0s"):
        with pytest.raises(FlagError, match="must be positive"):
            EppOptions.from_args([flag])
    with pytest.raises(FlagError, match="non-negative"):
        EppOptions.from_args(["--fairness-id-metric-label-limit=-1"])
    with pytest.raises(FlagError, match="--zap-time-encoding"):
        EppOptions.from_args(["--zap-time-encoding=weekday"])
    zap = EppOptions.from_args(
        ["--zap-devel=false", "--zap-stacktrace-level=error", "--zap-time-encoding=iso8601"]
    )
    assert zap.noops() == ["zap-devel", "zap-stacktrace-level", "zap-time-encoding"]
    opts = EppOptions.from_args(["--pool-name", "p", "--tracing=false", "--enable-pprof", "--v=1"])
    assert opts.kubernetes and opts.noops() == ["enable-pprof", "tracing"] and opts.log_level == "debug"
    assert looks_like_epp_args(["-poolName", "p"]) and not looks_like_epp_args(["serve"])
    assert not looks_like_epp_args(["--help"]) and not looks_like_epp_args([])


def test_flags_override_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump({"pool": {"endpoints": [{"address": "10.0.0.1:8000"}]}, "listen": {"port": 1}})
    )
    opts = EppOptions.from_args(
        ["--config-file", str(cfg), "--grpc-port", "9002", "--metrics-staleness-threshold", "500ms",
         "--cert-path", "/certs"]
    )  # fmt: skip
    c = build_config(None, opts)
    assert (c.listen.host, c.listen.port, c.dataplane.type) == ("0.0.0.0", 9002, "extproc")
    assert (c.serving.health_port, c.serving.metrics_port, c.serving.secure_serving) == (9003, 9090, True)
    assert c.serving.cert_path == "/certs" and c.metrics.stale_after_ms == pytest.approx(500)
    assert c.metrics.interval_ms == pytest.approx(50)
    with pytest.raises(ConfigError, match="list at least one endpoint"):
        build_config(None, EppOptions.from_args(["--grpc-port", "9002"]))
    kube = build_config(None, EppOptions.from_args(["--pool-name", "llama"]))  # endpoints come from the pool
    assert kube.pool.name == "llama" and kube.pool.endpoints == []
    monkeypatch.setenv("NAMESPACE", "team-a")
    assert EppOptions.from_args(["--pool-name", "p"]).namespace == "team-a"


EPC = {
    "apiVersion": "llm-d.ai/v1alpha1",
    "kind": "EndpointPickerConfig",
    "plugins": [
        {"type": "queue-scorer"},
        {"type": "kv-cache-utilization-scorer"},
        {"type": "prefix-cache-scorer", "parameters": {"hashBlockSize": 32, "maxPrefixBlocksToMatch": 128}},
        {"type": "max-score-picker"},
        {"type": "single-profile-handler"},
    ],
    "schedulingProfiles": [
        {
            "name": "default",
            "plugins": [
                {"pluginRef": "queue-scorer", "weight": 2},
                {"pluginRef": "kv-cache-utilization-scorer", "weight": 2},
                {"pluginRef": "prefix-cache-scorer", "weight": 3},
                {"pluginRef": "max-score-picker"},
            ],
        }
    ],
}


def test_endpoint_picker_config_maps_onto_profiles(tmp_path: Path) -> None:
    sched = scheduler_from_epp(EPC)
    prof = sched["profiles"]["default"]
    assert [(s["type"], s["weight"]) for s in prof["scorers"]] == [
        ("queue", 2),
        ("kv-cache", 2),
        ("prefix-cache", 3),
    ]
    assert prof["scorers"][2]["parameters"] == {"blockChars": 32, "maxBlocks": 128}
    assert prof["picker"]["type"] == "max-score" and sched["defaultProfile"] == "default"
    f = tmp_path / "epc.yaml"
    f.write_text(yaml.safe_dump(EPC))
    cfg = build_config(str(f), EppOptions.from_args(["--pool-name", "p"]))
    assert cfg.scheduler.default_profile == "default"
    assert [s.type for s in cfg.scheduler.profiles["default"].scorers] == [
        "queue",
        "kv-cache",
        "prefix-cache",
    ]


def test_endpoint_picker_config_rejects_plugins_without_an_equivalent() -> None:
    doc = {**EPC, "plugins": [*EPC["plugins"], {"type": "pd-profile-handler", "name": "pd"}]}
    with pytest.raises(
        ConfigError, match='plugin type "pd-profile-handler" \\(name "pd"\\) has no ingate equivalent'
    ):
        scheduler_from_epp(doc)
    bad = {**EPC, "plugins": [{"type": "queue-scorer", "parameters": {"x": 1}}]}
    with pytest.raises(ConfigError, match="parameter 'x' has no ingate equivalent"):
        scheduler_from_epp(bad)


def test_zap_encoder_json_writes_one_json_object_per_log_line(capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import logging

    from ingate.telemetry import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("info", "json")
        logging.getLogger("ingate.test").info("picker ready on %s", "0.0.0.0:9002")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("ingate.test").exception("failed")
        logging.getLogger("ingate.test").debug("not at info")
        lines = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    assert [(x["level"], x["logger"], x["msg"]) for x in lines] == [
        ("info", "ingate.test", "picker ready on 0.0.0.0:9002"),
        ("error", "ingate.test", "failed"),
    ]
    assert "ValueError: boom" in lines[1]["error"] and isinstance(lines[0]["ts"], float)
