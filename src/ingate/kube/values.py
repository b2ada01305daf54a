"""The values of the picker's manifests: defaults (`values.yaml` beside this module, of which the
Helm chart's values.yaml is a copy), Helm-style merging of `-f` files and `--set` expressions, and the
values' JSON schema (the chart's values.schema.json), derived from the defaults so typos fail."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

VALUES_FILE = Path(__file__).with_name("values.yaml")

# The picker's engine mapping for each upstream `modelServers.type`.
ENGINES = {
    "vllm": "vllm",
    "sglang": "sglang",
    "tgi": "tgi",
    "trtllm-serve": "trtllm",
    "triton-tensorrt-llm": "triton-trtllm",
}


class RenderError(ValueError):
    """Values that cannot produce valid manifests; the message names the value."""


def default_values() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(VALUES_FILE.read_text())
    return data


# Maps whose keys are the user's (labels, flags, ingate config, Kubernetes objects passed through).
FREE_FORM = {
    "router.epp.flags",
    "router.epp.config",
    "router.epp.pluginsCustomConfig",
    "router.epp.resources",
    "router.epp.affinity",
    "router.epp.podAnnotations",
    "router.modelServers.matchLabels",
    "router.monitoring.prometheus.extraLabels",
}
ENUMS: dict[str, list[Any]] = {
    "router.modelServers.type": sorted(ENGINES),
    "router.modelServers.protocol": ["http", "grpc"],
    "router.inferencePool.failureMode": ["FailOpen", "FailClose"],
    "router.inferenceObjectivesApiVersion": ["llm-d.ai/v1alpha2", "inference.networking.x-k8s.io/v1alpha2"],
    "router.epp.image.pullPolicy": ["Always", "IfNotPresent", "Never"],
    "provider.name": ["none", "istio", "gke"],
}
INT_OR_STRING = {"router.epp.pdb.maxUnavailable"}


def values_schema() -> dict[str, Any]:
    """JSON schema of the values, derived from the defaults: every key the defaults name (typos fail),
    their types, and the enums above. The chart's values.schema.json is this, checked by the tests."""

    def node(value: Any, path: str) -> dict[str, Any]:
        if path in ENUMS:
            return {"enum": ENUMS[path]}
        if path in INT_OR_STRING:
            return {"type": ["integer", "string"]}
        if isinstance(value, dict):
            if path in FREE_FORM:
                return {"type": "object"}
            props = {k: node(v, f"{path}.{k}" if path else k) for k, v in value.items()}
            return {"type": "object", "properties": props, "additionalProperties": False}
        if isinstance(value, bool):
            return {"type": "boolean"}
        if isinstance(value, int):
            return {"type": "integer"}
        if isinstance(value, list):
            return {"type": "array"}
        return {"type": "string"}

    schema = node(default_values(), "")
    return {"$schema": "https://json-schema.org/draft-07/schema#", **schema}


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "boolean": (bool,),
    "integer": (int,),
}


def check_values(values: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """What Helm's schema check would report for `values` (the subset values_schema uses)."""
    where = path or "values"
    if "enum" in schema:
        return [] if values in schema["enum"] else [f"{where}: {values!r} is not one of {schema['enum']}"]
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    ok = any(
        isinstance(values, _JSON_TYPES[t]) and not (t == "integer" and isinstance(values, bool))
        for t in types
    )
    if types and not ok:
        return [f"{where}: expected {' or '.join(types)}, got {values!r}"]
    errs: list[str] = []
    if isinstance(values, dict) and "properties" in schema:
        for k, v in values.items():
            sub = f"{path}.{k}" if path else k
            if k in schema["properties"]:
                errs += check_values(v, schema["properties"][k], sub)
            elif schema.get("additionalProperties") is False:
                errs.append(f"{sub}: unknown value (a typo?)")
    return errs


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's value merge: maps merge key by key, anything else replaces; a null override deletes."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def parse_set(expr: str) -> dict[str, Any]:
    """One Helm `--set a.b.c=value` as a nested dict (true/false/null/integers typed as Helm does)."""
    path, sep, raw = expr.partition("=")
    if not sep or not path:
        raise RenderError(f"--set {expr!r}: expected key.path=value")
    keys = path.split(".")
    for k in keys:
        if not _KEY.match(k):
            raise RenderError(f"--set {expr!r}: unsupported key {k!r} (lists and escapes: use -f FILE)")
    value: Any = raw
    if raw in ("true", "false"):
        value = raw == "true"
    elif raw == "null":
        value = None
    elif re.fullmatch(r"-?[0-9]+", raw) and (raw == "0" or not raw.lstrip("-").startswith("0")):
        value = int(raw)
    out: dict[str, Any] = {keys[-1]: value}
    for k in reversed(keys[:-1]):
        out = {k: out}
    return out


def load_overrides(files: tuple[str, ...], sets: tuple[str, ...]) -> dict[str, Any]:
    """-f files then --set expressions, merged in order (later wins), as Helm does."""
    out: dict[str, Any] = {}
    for f in files:
        try:
            data = yaml.safe_load(Path(f).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RenderError(f"{f}: {e}") from None
        if not isinstance(data, dict):
            raise RenderError(f"{f}: expected a mapping at the top level")
        out = _merge_keep_null(out, data)
    for s in sets:
        out = _merge_keep_null(out, parse_set(s))
    return out


def _merge_keep_null(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    # --set k=null must still delete the default later, so keep the None in the overrides.
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge_keep_null(out[k], v)
        else:
            out[k] = v
    return out
