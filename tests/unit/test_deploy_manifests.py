"""Every example manifest under deploy/ validates against the published CRD schemas.

The schemas are the upstream CRDs vendored under deploy/crds/upstream (InferencePool,
InferenceObjective, Gateway, HTTPRoute). The validator covers the OpenAPI v3 subset those CRDs use
(types, required, enum, bounds, lengths, patterns, items, additionalProperties) and, stricter than the
API server (which prunes), rejects unknown fields so typos in the examples fail here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CORE_KINDS = {("v1", "ServiceAccount"), ("v1", "ConfigMap"), ("v1", "Service"), ("apps/v1", "Deployment")}


def _schemas() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for f in sorted((DEPLOY / "crds" / "upstream").glob("*.yaml")):
        crd = yaml.safe_load(f.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            if v.get("served"):
                out[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    return out


SCHEMAS = _schemas()
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool}


def validate(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Errors of `value` against an OpenAPI v3 (structural) schema; [] when valid."""
    errs: list[str] = []
    t = schema.get("type")
    if schema.get("x-kubernetes-int-or-string"):
        if not isinstance(value, int | str) or isinstance(value, bool):
            return [f"{path}: expected int or string"]
    elif t == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{path}: expected integer, got {value!r}"]
    elif t == "number":
        if not isinstance(value, int | float) or isinstance(value, bool):
            return [f"{path}: expected number"]
    elif t in _TYPES and not isinstance(value, _TYPES[t]):
        return [f"{path}: expected {t}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errs.append(f"{path}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errs.append(f"{path}: {value} > maximum {schema['maximum']}")
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errs.append(f"{path}: longer than {schema['maxLength']}")
        if "minLength" in schema and len(value) < schema["minLength"]:
            errs.append(f"{path}: shorter than {schema['minLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errs.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errs.append(f"{path}: more than {schema['maxItems']} items")
        if "minItems" in schema and len(value) < schema["minItems"]:
            errs.append(f"{path}: fewer than {schema['minItems']} items")
        for i, item in enumerate(value):
            errs += validate(item, schema.get("items", {}), f"{path}[{i}]")
    if isinstance(value, dict):
        for req in schema.get("required", []):
            if req not in value:
                errs.append(f"{path}: missing required field {req!r}")
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            errs.append(f"{path}: more than {schema['maxProperties']} properties")
        if "minProperties" in schema and len(value) < schema["minProperties"]:
            errs.append(f"{path}: fewer than {schema['minProperties']} properties")
        for k, v in value.items():
            sub = f"{path}.{k}"
            if props is not None and k in props:
                errs += validate(v, props[k], sub)
            elif isinstance(extra, dict):
                errs += validate(v, extra, sub)
            elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                errs.append(f"{sub}: unknown field")
    return errs


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for f in sorted((DEPLOY / "examples").glob("*.yaml")):
        for i, d in enumerate(yaml.safe_load_all(f.read_text())):
            if d is not None:
                docs.append((f"{f.name}#{i}", d))
    return docs


DOCS = _documents()


def test_upstream_schemas_are_present() -> None:
    assert ("inference.networking.k8s.io/v1", "InferencePool") in SCHEMAS
    assert ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective") in SCHEMAS
    assert ("gateway.networking.k8s.io/v1", "HTTPRoute") in SCHEMAS
    assert ("gateway.networking.k8s.io/v1", "Gateway") in SCHEMAS


@pytest.mark.parametrize(("name", "doc"), DOCS, ids=[n for n, _ in DOCS])
def test_example_manifest_is_valid(name: str, doc: dict[str, Any]) -> None:
    key = (doc.get("apiVersion"), doc.get("kind"))
    assert doc.get("metadata", {}).get("name"), f"{name}: metadata.name is required"
    if key in CORE_KINDS:
        from k8s_schemas import validation_errors  # the Kubernetes OpenAPI schemas (kubernetes-validate)

        assert validation_errors(doc) == []
        return
    assert key in SCHEMAS, f"{name}: no schema for {key}"
    body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
    assert validate(body, SCHEMAS[key]) == []


def test_validator_rejects_what_the_api_server_would() -> None:
    pool = SCHEMAS[("inference.networking.k8s.io/v1", "InferencePool")]
    good = {"spec": {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": [{"number": 8000}]}}
    assert validate(good, pool) == []
    bad_mode = {"spec": {**good["spec"], "endpointPickerRef": {"name": "p", "failureMode": "Maybe"}}}
    assert any("not in" in e for e in validate(bad_mode, pool))
    nine_ports = {"spec": {**good["spec"], "targetPorts": [{"number": 8000 + i} for i in range(9)]}}
    assert any("more than 8" in e for e in validate(nine_ports, pool))
    assert any("missing required" in e for e in validate({"spec": {"targetPorts": [{"number": 1}]}}, pool))
    assert any("unknown field" in e for e in validate({"spec": {**good["spec"], "selecter": {}}}, pool))


def test_routes_point_at_the_pool_and_the_pool_at_the_picker_service() -> None:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for _, d in DOCS:
        by_kind.setdefault(d["kind"], []).append(d)
    pools = {p["metadata"]["name"]: p for p in by_kind["InferencePool"]}
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    deployments = {d["metadata"]["name"]: d for d in by_kind["Deployment"]}
    assert len(by_kind["HTTPRoute"]) == 3  # Envoy Gateway, Istio, kgateway
    for route in by_kind["HTTPRoute"]:
        for rule in route["spec"]["rules"]:
            for ref in rule["backendRefs"]:
                assert ref["group"] == "inference.networking.k8s.io" and ref["kind"] == "InferencePool"
                assert ref["name"] in pools
    for pool in pools.values():
        epp = pool["spec"]["endpointPickerRef"]
        svc = services[epp["name"]]
        port = next(p for p in svc["spec"]["ports"] if p["port"] == epp["port"]["number"])
        assert port["appProtocol"] == "http2"  # ext_proc is gRPC
        dep = deployments[epp["name"]]
        assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        container_ports = {
            p["containerPort"] for c in dep["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        }
        assert port["targetPort"] in container_ports
    for obj in by_kind["InferenceObjective"]:
        assert obj["spec"]["poolRef"]["name"] in pools


def test_picker_configmap_is_a_valid_gateway_config() -> None:
    import yaml

    from ingate.config import parse_config

    docs = list(
        yaml.safe_load_all((Path(__file__).resolve().parents[2] / "deploy/examples/picker.yaml").read_text())
    )
    cm = next(d for d in docs if d and d.get("kind") == "ConfigMap")
    cfg = parse_config(yaml.safe_load(cm["data"]["config.yaml"]), "picker ConfigMap")
    assert cfg.dataplane.type == "extproc" and cfg.listen.port == 9002
