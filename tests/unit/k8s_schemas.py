"""Validation of Kubernetes manifests for the packaging tests.

Core kinds against the Kubernetes OpenAPI schemas bundled in kubernetes-validate (strict: unknown
fields fail); custom resources against the openAPIV3Schema of the CRDs vendored under
deploy/crds/upstream, made strict the same way (an object schema with `properties` and no
`x-kubernetes-preserve-unknown-fields` rejects fields it does not name), which catches typos the API
server would silently prune.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "deploy" / "crds" / "upstream"
# Oldest and newest Kubernetes minors checked: gRPC probes and policy/v1 need >= 1.27.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# Kinds whose CRD is not published in a form we can vendor (GKE's controller CRDs): checked by shape.
NO_SCHEMA = {("networking.gke.io/v1", "HealthCheckPolicy"), ("networking.gke.io/v1", "GCPBackendPolicy")}


def _strict(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for f in sorted(CRDS.glob("*.yaml")):
        for crd in yaml.safe_load_all(f.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                if v.get("served"):
                    schema = _strict(v["schema"]["openAPIV3Schema"])
                    # metadata is checked by the API server's ObjectMeta, not by the CRD schema.
                    props = schema.setdefault("properties", {})
                    props["metadata"] = {"type": "object"}
                    props.setdefault("apiVersion", {"type": "string"})
                    props.setdefault("kind", {"type": "string"})
                    out[(f"{group}/{v['name']}", kind)] = schema
    return out


CRD_SCHEMAS = crd_schemas()


def validation_errors(doc: dict[str, Any]) -> list[str]:
    """Problems with one manifest; [] when every applicable schema accepts it."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if not doc.get("metadata", {}).get("name"):
        return [f"{key}: metadata.name missing"]
    if key in CRD_SCHEMAS:
        v = jsonschema.Draft7Validator(CRD_SCHEMAS[key])
        return [f"{key} {'.'.join(map(str, e.path))}: {e.message}" for e in v.iter_errors(doc)]
    if key in NO_SCHEMA:
        return []
    errs = []
    for ver in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, ver, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            return [f"{key}: no schema (neither a core kind nor a vendored CRD)"]
        except kubernetes_validate.ValidationError as e:
            errs.append(f"{key} (Kubernetes {ver}): {e.message}")
    return errs
