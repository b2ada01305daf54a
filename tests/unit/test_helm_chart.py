"""The Helm chart deploy/helm/ingate: `helm lint` clean and `helm template` equal, object for object,
to `ingate k8s render` for every value set of test_k8s_render (so everything validated there holds
for the chart too), with Helm's own engine: PyPI helm-python-sdk embeds Helm v4's Go SDK (no helm
binary is installable from the registries reachable here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from k8s_schemas import validation_errors
from test_k8s_render import CASES, POOL, case_values

from ingate.kube.render import app_version, render
from ingate.kube.values import RenderError, values_schema

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "ingate"


def helm_template(values: dict[str, Any], release: str, namespace: str) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values, name=release, namespace=namespace, is_install=True)
    docs = []
    for path, text in sorted(files.items()):
        if path.endswith(".txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def _key(d: dict[str, Any]) -> tuple[str, str, str, str]:
    m = d["metadata"]
    return (d["apiVersion"], d["kind"], m.get("namespace", ""), m["name"])


def _normalise(docs: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    out = {}
    for d in docs:
        if d["kind"] == "ConfigMap":  # compare the config as data, not as YAML text
            d = {**d, "data": {k: yaml.safe_load(v) for k, v in d["data"].items()}}
        out[_key(d)] = d
    return out


def test_chart_metadata_matches_the_package() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["name"] == "ingate"
    assert meta["appVersion"] == app_version()


@pytest.mark.parametrize("case", sorted(CASES))
def test_helm_template_equals_ingate_k8s_render(case: str) -> None:
    values = case_values(case)
    from_helm = helm_template(values, "vllm-llama3-8b", "inference")
    from_python = render(values, "vllm-llama3-8b", "inference")
    h, p = _normalise(from_helm), _normalise(from_python)
    assert sorted(h) == sorted(p)
    for key in p:
        assert h[key] == p[key], key
    for d in from_helm:
        assert validation_errors(d) == [], f"{d['kind']}/{d['metadata']['name']}"


@pytest.mark.parametrize("case", ["defaults", "ha", "monitoring", "istio", "gke"])
def test_helm_lint_is_clean(case: str) -> None:
    res = helm.lint(str(CHART), case_values(case), strict=True, namespace="inference")
    assert res["errors"] == []
    assert [m for m in res["messages"] if m["severity"] >= 2] == []  # no warnings or errors


BAD_VALUES = [
    ({}, "router.modelServers.matchLabels"),
    ({**POOL, "provider": {"name": "aws"}}, "provider.name"),
    (
        {"router": {"modelServers": {"matchLabels": {"a": "b"}, "type": "llamacpp"}}},
        "router.modelServers.type",
    ),
    ({"router": {**POOL["router"], "epp": {"replica": 2}}}, "replica"),  # a typo
    ({"router": {**POOL["router"], "inferencePool": {"failureMode": "Sometimes"}}}, "failureMode"),
    ({"router": {**POOL["router"], "epp": {"replicas": "two"}}}, "replicas"),
    # Prefix sharing under leader election (the default with replicas > 1): only active-active.
    (
        {"router": {**POOL["router"], "epp": {"replicas": 2, "prefixSharing": {"enabled": True}}}},
        "prefixSharing",
    ),
]


@pytest.mark.parametrize(("values", "where"), BAD_VALUES)
def test_bad_values_fail_in_helm_and_in_render_naming_the_value(values: dict[str, Any], where: str) -> None:
    pattern = where.replace(".", "[./]")  # Helm's schema errors spell paths /a/b
    with pytest.raises(helm.HelmError, match=pattern):
        helm_template(values, "p", "ns")
    with pytest.raises(RenderError, match=pattern):
        render(values, "p", "ns")


def test_chart_schema_is_derived_from_the_values() -> None:
    committed = json.loads((CHART / "values.schema.json").read_text())
    assert committed == values_schema()  # regenerate: ingate k8s values --schema > .../values.schema.json
    epp = committed["properties"]["router"]["properties"]["epp"]
    assert epp["additionalProperties"] is False and epp["properties"]["flags"] == {"type": "object"}
