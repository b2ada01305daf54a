"""CRD models accept both API generations and name the bad field; pods -> endpoints follows readiness."""

from __future__ import annotations

from typing import Any

import pytest
from kubefixtures import objective_obj, pool_obj
from test_deploy_manifests import SCHEMAS, validate

from ingate.kube.endpoints import ENGINE_LABEL, LEGACY_ENGINE_LABEL, pod_endpoints, pod_is_ready
from ingate.kube.models import (
    InvalidObject,
    Pool,
    parse_objective,
    parse_pool,
    parse_rewrite,
    standalone_pool,
)
from ingate.kube.selectors import parse_selector, selector_matches


def pool_v1(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "selector": {"matchLabels": {"app": "vllm"}},
        "targetPorts": [{"number": 8000}],
        "endpointPickerRef": {"name": "epp", "port": {"number": 9002}, "failureMode": "FailOpen"},
    }
    base.update(spec)
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "pool", "namespace": "ns"},
        "spec": base,
    }


def test_pool_v1_parses() -> None:
    p = parse_pool(pool_v1(targetPorts=[{"number": 8000}, {"number": 8001}]))
    assert p.selector == {"app": "vllm"}
    assert p.target_ports == (8000, 8001)
    assert p.app_protocol == "http"
    assert p.picker_name == "epp" and p.failure_mode == "FailOpen"
    assert p.label_selector() == "app=vllm"


def test_pool_v1alpha2_parses() -> None:
    p = parse_pool(
        {
            "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
            "kind": "InferencePool",
            "metadata": {"name": "pool", "namespace": "ns"},
            "spec": {
                "selector": {"app": "vllm", "tier": "a"},
                "targetPortNumber": 8000,
                "extensionRef": {"name": "epp"},
            },
        }
    )
    assert p.target_ports == (8000,)
    assert p.selector == {"app": "vllm", "tier": "a"}
    assert p.label_selector() == "app=vllm,tier=a"
    assert p.failure_mode == "FailClose"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"targetPorts": [{"number": 70000}]}, "spec.targetPorts[0].number"),
        ({"targetPorts": []}, "spec.targetPorts"),
        ({"targetPorts": [{"number": p} for p in range(8000, 8009)]}, "spec.targetPorts"),
        ({"targetPorts": [{"number": 8000}, {"number": 8000}]}, "unique"),
        ({"selector": {"matchLabels": {}}}, "spec.selector.matchLabels"),
        ({"appProtocol": "grpc"}, "spec.appProtocol"),
        ({"endpointPickerRef": {"name": "e", "failureMode": "Maybe"}}, "spec.endpointPickerRef.failureMode"),
    ],
)
def test_invalid_pool_names_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidObject) as e:
        parse_pool(pool_v1(**spec))
    assert field in str(e.value)
    assert str(e.value).startswith("InferencePool ns/pool: ")


def test_pool_unknown_group_rejected() -> None:
    obj = pool_v1()
    obj["apiVersion"] = "example.com/v1"
    with pytest.raises(InvalidObject, match="apiVersion"):
        parse_pool(obj)


@pytest.mark.parametrize("api_version", ["llm-d.ai/v1alpha2", "inference.networking.x-k8s.io/v1alpha2"])
def test_objective_both_generations(api_version: str) -> None:
    o = parse_objective(
        {
            "apiVersion": api_version,
            "kind": "InferenceObjective",
            "metadata": {"name": "critical", "namespace": "ns"},
            "spec": {"priority": 10, "poolRef": {"name": "pool"}},
        }
    )
    assert (o.name, o.priority, o.pool_name) == ("critical", 10, "pool")
    assert o.group == api_version.split("/")[0]


def test_objective_priority_defaults_to_zero_and_bad_type_named() -> None:
    obj: dict[str, Any] = {
        "apiVersion": "llm-d.ai/v1alpha2",
        "metadata": {"name": "o", "namespace": "ns"},
        "spec": {"poolRef": {"name": "pool"}},
    }
    assert parse_objective(obj).priority == 0
    obj["spec"]["priority"] = "high"
    with pytest.raises(InvalidObject, match=r"spec\.priority"):
        parse_objective(obj)
    del obj["spec"]["poolRef"]
    with pytest.raises(InvalidObject, match=r"spec\.poolRef"):
        parse_objective(obj)


def test_rewrite_rules_and_weights() -> None:
    r = parse_rewrite(
        {
            "apiVersion": "llm-d.ai/v1alpha2",
            "metadata": {"name": "canary", "namespace": "ns", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {
                "poolRef": {"name": "pool"},
                "rules": [
                    {
                        "matches": [{"model": {"value": "food-review"}}],
                        "targets": [
                            {"modelRewrite": "food-review-v1", "weight": 90},
                            {"modelRewrite": "food-review-v2", "weight": 10},
                        ],
                    },
                    {"targets": [{"modelRewrite": "base"}]},
                ],
            },
        }
    )
    assert r.rules[0].models == ("food-review",)
    assert [(t.model, t.weight) for t in r.rules[0].targets] == [
        ("food-review-v1", 90),
        ("food-review-v2", 10),
    ]
    assert r.rules[1].models == () and r.rules[1].targets[0].weight == 1


def test_rewrite_partial_weights_rejected() -> None:
    with pytest.raises(InvalidObject, match="weight"):
        parse_rewrite(
            {
                "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
                "metadata": {"name": "bad", "namespace": "ns"},
                "spec": {
                    "poolRef": {"name": "pool"},
                    "rules": [{"targets": [{"modelRewrite": "a", "weight": 1}, {"modelRewrite": "b"}]}],
                },
            }
        )


# ---- endpoints -----------------------------------------------------------------------------------

POOL = Pool("ns", "pool", "inference.networking.k8s.io", {"app": "vllm"}, (8000,))


def pod(
    name: str = "p1",
    ip: str | None = "10.0.0.1",
    ready: bool = True,
    labels: dict[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip:
        status["podIP"] = ip
    p: dict[str, Any] = {
        "metadata": {"name": name, "namespace": "ns", "labels": labels or {"app": "vllm"}},
        "spec": {},
        "status": status,
    }
    for k, v in extra.items():
        p[k].update(v)
    return p


def test_ready_pod_is_one_endpoint_per_target_port() -> None:
    assert [(e.host, e.port, e.name) for e in pod_endpoints(pod(), POOL)] == [("10.0.0.1", 8000, "p1")]
    two = Pool("ns", "pool", "g", {"app": "vllm"}, (8000, 8001))
    eps = pod_endpoints(pod(), two)
    assert [(e.address, e.name) for e in eps] == [
        ("10.0.0.1:8000", "p1-rank-0"),
        ("10.0.0.1:8001", "p1-rank-1"),
    ]


@pytest.mark.parametrize(
    "p",
    [
        pod(ready=False),
        pod(ip=None),
        pod(metadata={"deletionTimestamp": "2026-01-01T00:00:00Z"}),
        pod(status={"phase": "Succeeded"}),
        pod(labels={"app": "other"}),
        pod(spec={"readinessGates": [{"conditionType": "example.com/warm"}]}),
    ],
    ids=["unready", "no-ip", "terminating", "finished", "not-selected", "gate-unset"],
)
def test_pods_that_are_not_endpoints(p: dict[str, Any]) -> None:
    assert pod_endpoints(p, POOL) == []


def test_readiness_gate_true_and_podips_fallback() -> None:
    p = pod(ip=None, spec={"readinessGates": [{"conditionType": "example.com/warm"}]})
    p["status"]["podIPs"] = [{"ip": "10.0.0.9"}]
    p["status"]["conditions"].append({"type": "example.com/warm", "status": "True"})
    assert pod_is_ready(p)
    assert [e.address for e in pod_endpoints(p, POOL)] == ["10.0.0.9:8000"]


def test_engine_from_pod_label_else_default() -> None:
    sg = pod(labels={"app": "vllm", ENGINE_LABEL: "SGLang"})
    assert pod_endpoints(sg, POOL)[0].engine == "sglang"
    assert pod_endpoints(pod(), POOL, default_engine="tgi")[0].engine == "tgi"
    assert pod_endpoints(sg, POOL)[0].labels[ENGINE_LABEL] == "SGLang"


# ---- agreement with the published CRD schemas (deploy/crds/upstream) -----------------------------


V1ALPHA2_POOL = {
    "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
    "kind": "InferencePool",
    "metadata": {"name": "pool", "namespace": "ns"},
    "spec": {"selector": {"app": "vllm"}, "targetPortNumber": 8000, "extensionRef": {"name": "epp"}},
}


def rewrite_obj(api_version: str) -> dict[str, Any]:
    return {
        "apiVersion": api_version,
        "kind": "InferenceModelRewrite",
        "metadata": {"name": "r", "namespace": "ns"},
        "spec": {
            "poolRef": {"name": "pool"},
            "rules": [
                {"matches": [{"model": {"value": "a"}}], "targets": [{"modelRewrite": "b", "weight": 1}]}
            ],
        },
    }


@pytest.mark.parametrize(
    "obj",
    [
        pool_v1(),
        pool_obj([8000, 8001]),
        V1ALPHA2_POOL,
        objective_obj("o", 3),
        objective_obj("o", -1, group="inference.networking.x-k8s.io"),
        rewrite_obj("llm-d.ai/v1alpha2"),
        rewrite_obj("inference.networking.x-k8s.io/v1alpha2"),
    ],
    ids=["pool-v1", "pool-v1-2ports", "pool-v1alpha2", "obj-llmd", "obj-x", "rw-llmd", "rw-x"],
)
def test_objects_the_tests_use_are_valid_for_the_real_crds(obj: dict[str, Any]) -> None:
    schema = SCHEMAS[(obj["apiVersion"], obj["kind"])]
    body = {k: v for k, v in obj.items() if k != "metadata"}
    assert validate(body, schema) == []
    parse = {"InferencePool": parse_pool, "InferenceObjective": parse_objective}.get(
        obj["kind"], parse_rewrite
    )
    parse(obj)  # and the controller accepts them


@pytest.mark.parametrize(
    "spec",
    [
        {"targetPorts": [{"number": 70000}]},
        {"targetPorts": []},
        {"targetPorts": [{"number": p} for p in range(8000, 8009)]},
        {"appProtocol": "grpc"},
        {"endpointPickerRef": {"name": "e", "failureMode": "Maybe"}},
    ],
)
def test_what_the_crd_rejects_the_controller_rejects(spec: dict[str, Any]) -> None:
    obj = pool_v1(**spec)
    assert validate(
        {k: v for k, v in obj.items() if k != "metadata"}, SCHEMAS[(obj["apiVersion"], obj["kind"])]
    )
    with pytest.raises(InvalidObject):
        parse_pool(obj)


# ---- label selectors and standalone mode ---------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "labels", "ok"),
    [
        ("app=vllm", {"app": "vllm"}, True),
        ("app==vllm,tier!=gpu-a", {"app": "vllm", "tier": "gpu-b"}, True),
        ("app=vllm,tier!=gpu-a", {"app": "vllm", "tier": "gpu-a"}, False),
        ("env in (prod, staging),!canary", {"env": "staging"}, True),
        ("env in (prod,staging),!canary", {"env": "staging", "canary": "1"}, False),
        ("env notin (dev)", {}, True),
        ("gpu", {"gpu": ""}, True),
        ("gpu", {}, False),
    ],
)
def test_label_selector_syntax(selector: str, labels: dict[str, str], ok: bool) -> None:
    assert selector_matches(selector, labels) is ok


def test_bad_selector_and_ports_are_rejected() -> None:
    with pytest.raises(ValueError, match="cannot parse"):
        parse_selector("app in vllm")
    with pytest.raises(ValueError, match="target ports"):
        standalone_pool("ns", "app=vllm", [])
    p = standalone_pool("ns", "app in (vllm,sglang)", [8000, 8001])
    assert p.label_selector() == "app in (vllm,sglang)"
    assert [e.address for e in pod_endpoints(pod(labels={"app": "sglang"}), p)] == [
        "10.0.0.1:8000",
        "10.0.0.1:8001",
    ]
    assert pod_endpoints(pod(labels={"app": "tgi"}), p) == []


def test_legacy_engine_label() -> None:
    p = pod(labels={"app": "vllm", LEGACY_ENGINE_LABEL: "sglang"})
    assert pod_endpoints(p, POOL)[0].engine == "sglang"
