"""The rendered Envoy bootstrap: Envoy itself accepts it, and it encodes the routing the docs promise."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingate.dataplane.envoy_bootstrap import (
    ACCESS_LOG_FORMAT,
    CLUSTER_PICKED,
    CLUSTER_POOL,
    OBSERVER_FILTER,
    EnvoySettings,
    pool_assignment,
    render_bootstrap,
)
from ingate.dataplane.envoy_process import find_envoy


def _hcm(b: dict[str, Any]) -> Any:
    return b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def _assert_envoy_accepts(tmp_path: Path, bootstrap: dict[str, Any]) -> None:
    """Envoy's own `--mode validate` accepts the bootstrap."""
    cfg = tmp_path / "envoy.json"
    cfg.write_bytes(orjson.dumps(bootstrap))
    r = subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(cfg), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def _ext_proc(b: dict[str, Any]) -> Any:
    return _hcm(b)["http_filters"][0]["typed_config"]


@pytest.mark.parametrize("responses", ["observe", "full", "none"])
@pytest.mark.parametrize("pool_from_file", [False, True])
@pytest.mark.parametrize("mode", ["FailOpen", "FailClose"])
def test_envoy_validates_the_bootstrap(
    tmp_path: Path, mode: str, pool_from_file: bool, responses: str
) -> None:
    settings = EnvoySettings(
        picker_port=9002,
        pool=["127.0.0.1:8001", "127.0.0.1:8002"],
        failure_mode=mode,  # type: ignore[arg-type]
        response_processing=responses,  # type: ignore[arg-type]
    )
    pool_file = None
    if pool_from_file:  # the FailOpen pool as a watched EDS file (what EnvoyProcess renders)
        pool_file = tmp_path / "pool" / "pool.json"
        pool_file.parent.mkdir()
        pool_file.write_bytes(orjson.dumps(pool_assignment(settings.pool, 1)))
    b = render_bootstrap(settings, pool_file)
    _assert_envoy_accepts(tmp_path, b)


def test_access_log_is_off_by_default_and_a_json_file_log_envoy_accepts(tmp_path: Path) -> None:
    assert "access_log" not in _hcm(render_bootstrap(EnvoySettings(picker_port=9002)))
    log = tmp_path / "access.jsonl"
    b = render_bootstrap(EnvoySettings(picker_port=9002, pool=["127.0.0.1:8001"], access_log=str(log)))
    (al,) = _hcm(b)["access_log"]
    assert al["typed_config"]["path"] == str(log)
    fmt = al["typed_config"]["log_format"]["json_format"]
    assert fmt == ACCESS_LOG_FORMAT
    # The picked endpoint comes from the picker's envoy.lb metadata; the decision phase is the time
    # between the request's end and the upstream request's start.
    assert fmt["endpoint"] == "%DYNAMIC_METADATA(envoy.lb:x-gateway-destination-endpoint)%"
    assert fmt["decision_us"] == "%COMMON_DURATION(DS_RX_END:US_TX_BEG:us)%"
    _assert_envoy_accepts(tmp_path, b)


def test_full_processing_modes_and_metadata_namespace() -> None:
    b = render_bootstrap(EnvoySettings(picker_port=1, response_processing="full"))
    ep = _ext_proc(b)
    assert ep["processing_mode"] == {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "request_body_mode": "FULL_DUPLEX_STREAMED",
        "response_body_mode": "FULL_DUPLEX_STREAMED",
        "request_trailer_mode": "SEND",
        "response_trailer_mode": "SEND",
    }
    assert ep["metadata_options"]["receiving_namespaces"]["untyped"] == ["envoy.lb"]
    assert [f["name"] for f in _hcm(b)["http_filters"]] == [
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.router",
    ]


def test_observe_mode_streams_responses_to_an_observability_filter() -> None:
    """Opt-in: the request filter does not wait on responses (except trailers, which keep its stream
    open to the end of the HTTP stream); a second filter in observability mode streams them to the
    picker with the request key's namespace, and never fails a response."""
    b = render_bootstrap(
        EnvoySettings(picker_port=1, failure_mode="FailClose", response_processing="observe")
    )
    filters = _hcm(b)["http_filters"]
    assert [f["name"] for f in filters] == [
        "envoy.filters.http.ext_proc",
        OBSERVER_FILTER,
        "envoy.filters.http.router",
    ]
    req = filters[0]["typed_config"]
    assert req["processing_mode"] == {
        "request_header_mode": "SEND",
        "response_header_mode": "SKIP",
        "request_body_mode": "FULL_DUPLEX_STREAMED",
        "response_body_mode": "NONE",
        "request_trailer_mode": "SEND",
        "response_trailer_mode": "SEND",
    }
    assert req["metadata_options"]["receiving_namespaces"]["untyped"] == ["envoy.lb", "ingate"]
    assert req["failure_mode_allow"] is False
    obs = filters[1]["typed_config"]
    assert obs["observability_mode"] is True and obs["failure_mode_allow"] is True
    assert obs["grpc_service"] == req["grpc_service"]
    assert obs["processing_mode"]["response_body_mode"] == "STREAMED"  # the only body mode it supports
    assert obs["processing_mode"]["request_header_mode"] == "SKIP"
    assert obs["metadata_options"]["forwarding_namespaces"]["untyped"] == ["ingate"]


def test_response_processing_accepts_the_old_booleans_and_refuses_unknown_modes() -> None:
    assert EnvoySettings(response_processing=True).response_processing == "full"  # type: ignore[arg-type]
    assert EnvoySettings(response_processing=False).response_processing == "none"  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown mode"):
        EnvoySettings(response_processing="sometimes")  # type: ignore[arg-type]


def test_envoy_adds_the_served_header_on_the_picked_route_only() -> None:
    for responses in ("observe", "full", "none"):
        b = render_bootstrap(EnvoySettings(pool=["10.1.0.1:8000"], response_processing=responses))  # type: ignore[arg-type]
        picked, pool = _hcm(b)["route_config"]["virtual_hosts"][0]["routes"]
        (add,) = picked["response_headers_to_add"]
        assert add["header"] == {
            "key": "x-gateway-destination-endpoint-served",
            "value": "%DYNAMIC_METADATA(envoy.lb:x-gateway-destination-endpoint)%",
        }
        assert "response_headers_to_add" not in pool  # fail-open round robin: no picker, no header


def test_failure_mode_maps_to_failure_mode_allow() -> None:
    assert _ext_proc(render_bootstrap(EnvoySettings(failure_mode="FailOpen")))["failure_mode_allow"] is True
    assert _ext_proc(render_bootstrap(EnvoySettings(failure_mode="FailClose")))["failure_mode_allow"] is False


def test_picked_route_needs_picker_metadata_and_pool_route_is_the_fallback() -> None:
    b = render_bootstrap(EnvoySettings(pool=["10.1.0.1:8000"]))
    routes = _hcm(b)["route_config"]["virtual_hosts"][0]["routes"]
    assert routes[0]["route"]["cluster"] == CLUSTER_PICKED
    # Matched on dynamic metadata only the picker can set, never on a client-supplied header.
    md = routes[0]["match"]["dynamic_metadata"][0]
    assert md["filter"] == "envoy.lb" and md["path"] == [{"key": "x-gateway-destination-endpoint"}]
    assert "headers" not in routes[0]["match"]
    assert routes[1]["route"]["cluster"] == CLUSTER_POOL
    clusters = {c["name"]: c for c in b["static_resources"]["clusters"]}
    picked = clusters[CLUSTER_PICKED]
    assert picked["type"] == "ORIGINAL_DST" and picked["lb_policy"] == "CLUSTER_PROVIDED"
    assert picked["original_dst_lb_config"] == {
        "use_http_header": True,
        "http_header_name": "x-gateway-destination-endpoint",
    }


def test_without_a_pool_unpicked_requests_get_a_json_503() -> None:
    routes = _hcm(render_bootstrap(EnvoySettings()))["route_config"]["virtual_hosts"][0]["routes"]
    assert routes[1]["direct_response"]["status"] == 503
    assert (
        orjson.loads(routes[1]["direct_response"]["body"]["inline_string"])["error"]["code"] == "no_endpoint"
    )


def test_request_only_processing_skips_response_phases() -> None:
    b = render_bootstrap(EnvoySettings(response_processing="none"))
    assert OBSERVER_FILTER not in [f["name"] for f in _hcm(b)["http_filters"]]
    mode = _ext_proc(b)["processing_mode"]
    assert mode["request_body_mode"] == "FULL_DUPLEX_STREAMED"
    assert (mode["response_header_mode"], mode["response_body_mode"], mode["response_trailer_mode"]) == (
        "SKIP",
        "NONE",
        "SKIP",
    )


def test_plain_round_robin_baseline_has_no_ext_proc_filter() -> None:
    b = render_bootstrap(EnvoySettings(pool=["10.1.0.1:8000"], ext_proc=False))
    assert [f["name"] for f in _hcm(b)["http_filters"]] == ["envoy.filters.http.router"]
    assert "ingate_extproc" not in {c["name"] for c in b["static_resources"]["clusters"]}


def test_fail_open_health_checks_the_picker_without_panic_routing() -> None:
    clusters = {
        c["name"]: c
        for c in render_bootstrap(EnvoySettings(failure_mode="FailOpen"))["static_resources"]["clusters"]
    }
    picker = clusters["ingate_extproc"]
    assert picker["health_checks"][0]["unhealthy_threshold"] == 1
    assert picker["common_lb_config"]["healthy_panic_threshold"]["value"] == 0.0
