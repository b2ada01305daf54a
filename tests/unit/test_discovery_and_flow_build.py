"""The static endpoint source, building flow control from YAML, and the saturation detector."""

from __future__ import annotations

import math
import time

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from ingate.config import parse_config
from ingate.datastore import Datastore, Endpoint, EndpointMetrics
from ingate.discovery import endpoints_from_config
from ingate.flowcontrol.build import build_flow_controller
from ingate.flowcontrol.config import SaturationConfig
from ingate.flowcontrol.saturation import SaturationDetector


def test_static_endpoints_take_names_engines_labels_and_weights_from_yaml() -> None:
    cfg = parse_config(
        {
            "pool": {
                "name": "p",
                "engine": "sglang",
                "endpoints": [
                    {"address": "10.0.0.1:8000", "name": "gpu-a", "labels": {"zone": "a"}, "weight": 2},
                    {"address": "[::1]:8001", "engine": "vllm"},
                ],
            }
        }
    )
    a, b = endpoints_from_config(cfg)
    assert (a.name, a.host, a.port, a.engine, a.labels, a.weight) == (
        "gpu-a",
        "10.0.0.1",
        8000,
        "sglang",
        {"zone": "a"},
        2,
    )
    assert (b.name, b.host, b.port, b.engine) == ("p-1", "::1", 8001, "vllm")  # IPv6 brackets stripped
    assert b.address == "::1:8001" and a.labels is not cfg.pool.endpoints[0].labels


def test_build_flow_controller_from_yaml_mapping() -> None:
    ds = Datastore([Endpoint(name="e", host="127.0.0.1", port=1)])
    assert build_flow_controller(None, ds) is None
    assert build_flow_controller({"enabled": False}, ds) is None
    reg = CollectorRegistry()
    fc = build_flow_controller({"queueTtlS": 5, "bands": [{"priority": 1, "maxRequests": 3}]}, ds, reg)
    assert fc is not None and fc.config.queue_ttl_s == 5 and fc.config.bands[0].max_requests == 3
    assert "inference_extension_flow_control_queue_size" in {m.name for m in reg.collect()}
    fc.detector._seen["127.0.0.1:1"] = (1.0, 0)
    ds.remove("127.0.0.1:1")  # an endpoint that leaves the pool is forgotten by the detector
    assert fc.detector._seen == {}
    with pytest.raises(ValidationError):
        build_flow_controller({"bands": [{"priority": 1, "maxRequests": 0}]}, ds)


def _ep(waiting: int = 0, running: int = 0, kv: float = 0.0, age_s: float = 0.0) -> Endpoint:
    ep = Endpoint(name="e", host="127.0.0.1", port=1)
    ep.metrics = EndpointMetrics(waiting=waiting, running=running, kv_usage=kv)
    ep.metrics.updated_at = time.monotonic() - age_s
    return ep


def test_saturation_is_the_worse_of_queue_and_kv_and_stale_is_saturated() -> None:
    det = SaturationDetector(SaturationConfig(queue_depth_threshold=4, kv_utilization_threshold=0.8))
    now = time.monotonic()
    assert det.saturation(_ep(waiting=2, kv=0.2), now) == pytest.approx(0.5)
    assert det.saturation(_ep(waiting=1, kv=0.6), now) == pytest.approx(0.75)
    assert det.headroom(_ep(waiting=1, kv=0.1), now) == 3
    assert det.headroom(_ep(waiting=4), now) == 0
    assert math.isinf(det.saturation(_ep(age_s=5.0), now))  # stale metrics: we cannot tell
    sick = _ep()
    sick.healthy = False
    assert math.isinf(det.saturation(sick, now))
    assert det.pool_saturated([_ep(waiting=9), _ep(kv=0.9)], now)
    assert not det.pool_saturated([_ep(waiting=9), _ep(kv=0.1)], now)


def test_requests_sent_since_the_scrape_count_as_waiting() -> None:
    det = SaturationDetector(SaturationConfig(queue_depth_threshold=4))
    ep = _ep(waiting=1, running=2)
    now = time.monotonic()
    ep.in_flight = 3  # the scrape saw these three (1 waiting + 2 running)
    assert det.saturation(ep, now) == pytest.approx(0.25)
    ep.in_flight = 5  # two more sent since the scrape
    assert det.recent(ep) == 2 and det.saturation(ep, now) == pytest.approx(0.75)
    ep.metrics.updated_at = time.monotonic()  # a new scrape resets the count from its numbers
    assert det.recent(ep) == 2  # still beyond what the (unchanged) scrape counted
    det.forget(ep.address)
    assert det._seen == {}
