"""The custom resources the endpoint picker reads, in both API generations, as validated pydantic models.

Generations (see shared ECOSYSTEM.md and the CRDs vendored under deploy/crds/upstream):

- InferencePool: `inference.networking.k8s.io/v1` (selector.matchLabels, targetPorts[1..8], appProtocol,
  endpointPickerRef with failureMode) and the older `inference.networking.x-k8s.io/v1alpha2`
  (selector as a flat label map, targetPortNumber, extensionRef).
- InferenceObjective (priority, poolRef) and InferenceModelRewrite (poolRef, weighted rules):
  `llm-d.ai/v1alpha2` (current) and `inference.networking.x-k8s.io/v1alpha2` (older; same shape).

Each `parse_*` turns a raw API object (a dict, as the API server sends it) into one small frozen value
the rest of ingate uses, or raises `InvalidObject` whose message names the offending field
(`spec.targetPorts[0].number: ...`), so a bad object yields one clear log line and Kubernetes Event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ingate.kube.selectors import parse_selector, selector_matches

POOL_GROUP = "inference.networking.k8s.io"
X_GROUP = "inference.networking.x-k8s.io"
LLMD_GROUP = "llm-d.ai"


@dataclass(frozen=True, slots=True)
class ResourceKind:
    """One served (group, version, plural) of a custom resource."""

    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


POOL_V1 = ResourceKind(POOL_GROUP, "v1", "inferencepools", "InferencePool")
POOL_V1ALPHA2 = ResourceKind(X_GROUP, "v1alpha2", "inferencepools", "InferencePool")
OBJECTIVE_LLMD = ResourceKind(LLMD_GROUP, "v1alpha2", "inferenceobjectives", "InferenceObjective")
OBJECTIVE_X = ResourceKind(X_GROUP, "v1alpha2", "inferenceobjectives", "InferenceObjective")
REWRITE_LLMD = ResourceKind(LLMD_GROUP, "v1alpha2", "inferencemodelrewrites", "InferenceModelRewrite")
REWRITE_X = ResourceKind(X_GROUP, "v1alpha2", "inferencemodelrewrites", "InferenceModelRewrite")

POOL_KINDS = {POOL_GROUP: POOL_V1, X_GROUP: POOL_V1ALPHA2}
"""The pool generation by `--pool-group` (upstream flag; default inference.networking.k8s.io)."""


class InvalidObject(ValueError):
    """A custom resource that does not validate; the message names the object and the field."""

    def __init__(self, kind: str, namespace: str, name: str, detail: str) -> None:
        super().__init__(f"{kind} {namespace}/{name}: {detail}")
        self.kind, self.namespace, self.name, self.detail = kind, namespace, name, detail


class _Model(BaseModel):
    # The API server prunes unknown fields of structural CRDs, so extra fields only come from newer
    # CRD versions: tolerate them rather than refuse a pool we can serve.
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


# ---- InferencePool -------------------------------------------------------------------------------


class _Port(_Model):
    number: int = Field(ge=1, le=65535)


class _LabelSelector(_Model):
    match_labels: dict[str, str] = Field(alias="matchLabels", min_length=1)


class _EndpointPickerRef(_Model):
    group: str = ""
    kind: str = "Service"
    name: str = Field(min_length=1, max_length=253)
    port: _Port | None = None
    failure_mode: Literal["FailOpen", "FailClose"] = Field("FailClose", alias="failureMode")


class _PoolSpecV1(_Model):
    selector: _LabelSelector
    target_ports: list[_Port] = Field(alias="targetPorts", min_length=1, max_length=8)
    app_protocol: Literal["http", "kubernetes.io/h2c"] = Field("http", alias="appProtocol")
    endpoint_picker_ref: _EndpointPickerRef | None = Field(None, alias="endpointPickerRef")

    @model_validator(mode="after")
    def _unique_ports(self) -> _PoolSpecV1:
        nums = [p.number for p in self.target_ports]
        if len(set(nums)) != len(nums):
            raise ValueError(f"targetPorts must be unique, got {nums}")
        return self


class _ExtensionRef(_Model):
    group: str = ""
    kind: str = "Service"
    name: str = Field(min_length=1, max_length=253)
    port_number: int | None = Field(None, alias="portNumber", ge=1, le=65535)
    failure_mode: Literal["FailOpen", "FailClose"] = Field("FailClose", alias="failureMode")


class _PoolSpecV1Alpha2(_Model):
    selector: dict[str, str] = Field(min_length=1)
    target_port_number: int = Field(alias="targetPortNumber", ge=1, le=65535)
    extension_ref: _ExtensionRef | None = Field(None, alias="extensionRef")


@dataclass(frozen=True, slots=True)
class Pool:
    """An InferencePool, generation-neutral."""

    namespace: str
    name: str
    group: str
    selector: dict[str, str]
    target_ports: tuple[int, ...]
    app_protocol: str = "http"
    picker_name: str | None = None
    failure_mode: str = "FailClose"
    expression: str = ""
    """A label selector string instead of `selector` (upstream's `--endpoint-selector`, no pool)."""

    def label_selector(self) -> str:
        """The selector as a Kubernetes labelSelector query string (`k=v,k2=v2`)."""
        if self.expression:
            return self.expression
        return ",".join(f"{k}={v}" for k, v in sorted(self.selector.items()))

    def matches(self, labels: dict[str, str]) -> bool:
        if self.expression:
            return selector_matches(self.expression, labels)
        return all(labels.get(k) == v for k, v in self.selector.items())


# ---- InferenceObjective / InferenceModelRewrite --------------------------------------------------


class _PoolRef(_Model):
    group: str = ""
    kind: str = "InferencePool"
    name: str = Field(min_length=1, max_length=253)


class _ObjectiveSpec(_Model):
    pool_ref: _PoolRef = Field(alias="poolRef")
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)


class _ModelMatch(_Model):
    type: Literal["Exact"] = "Exact"
    value: str = Field(min_length=1)


class _Match(_Model):
    model: _ModelMatch


class _Target(_Model):
    model_rewrite: str = Field(alias="modelRewrite", min_length=1)
    weight: int | None = Field(None, ge=1, le=1_000_000)


class _Rule(_Model):
    matches: list[_Match] = []
    targets: list[_Target] = Field(min_length=1)

    @model_validator(mode="after")
    def _all_or_no_weights(self) -> _Rule:
        set_ = [t.weight is not None for t in self.targets]
        if any(set_) and not all(set_):
            raise ValueError("targets: set weight on all targets or on none")
        return self


class _RewriteSpec(_Model):
    pool_ref: _PoolRef = Field(alias="poolRef")
    rules: list[_Rule]


@dataclass(frozen=True, slots=True)
class Objective:
    """An InferenceObjective: requests naming it (x-gateway-inference-objective) get its priority."""

    namespace: str
    name: str
    priority: int
    pool_name: str
    group: str = LLMD_GROUP


@dataclass(frozen=True, slots=True)
class RewriteTarget:
    model: str
    weight: int


@dataclass(frozen=True, slots=True)
class RewriteRule:
    models: tuple[str, ...]
    """Exact model names this rule matches; empty = every model no other rule matches."""
    targets: tuple[RewriteTarget, ...]


@dataclass(frozen=True, slots=True)
class ModelRewrite:
    """An InferenceModelRewrite: model aliases and weighted traffic splits within one pool."""

    namespace: str
    name: str
    pool_name: str
    rules: tuple[RewriteRule, ...]
    created: str = ""
    """metadata.creationTimestamp (RFC 3339): upstream resolves conflicts oldest-first."""
    group: str = LLMD_GROUP


# ---- parsing -------------------------------------------------------------------------------------


def _field_errors(e: ValidationError, prefix: str) -> str:
    parts = []
    for err in e.errors():
        loc = prefix
        for p in err["loc"]:
            loc += f"[{p}]" if isinstance(p, int) else f".{p}"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def _meta(obj: dict[str, Any], kind: str) -> tuple[str, str, str, str]:
    meta = obj.get("metadata") or {}
    ns, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    api_version = str(obj.get("apiVersion", ""))
    if not name:
        raise InvalidObject(kind, ns, "?", "metadata.name: missing")
    group = api_version.split("/", 1)[0] if "/" in api_version else ""
    return ns, name, group, api_version


def _spec(obj: dict[str, Any], kind: str, ns: str, name: str) -> dict[str, Any]:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise InvalidObject(kind, ns, name, "spec: missing or not an object")
    return spec


def parse_pool(obj: dict[str, Any]) -> Pool:
    """An InferencePool of either generation (by apiVersion) -> `Pool`, or `InvalidObject`."""
    ns, name, group, api_version = _meta(obj, "InferencePool")
    spec = _spec(obj, "InferencePool", ns, name)
    try:
        if group == X_GROUP:
            s2 = _PoolSpecV1Alpha2.model_validate(spec)
            ext = s2.extension_ref
            return Pool(
                ns,
                name,
                group,
                dict(s2.selector),
                (s2.target_port_number,),
                picker_name=ext.name if ext else None,
                failure_mode=ext.failure_mode if ext else "FailClose",
            )
        if group != POOL_GROUP:
            raise InvalidObject("InferencePool", ns, name, f"apiVersion: unsupported {api_version!r}")
        s1 = _PoolSpecV1.model_validate(spec)
    except ValidationError as e:
        raise InvalidObject("InferencePool", ns, name, _field_errors(e, "spec")) from None
    ref = s1.endpoint_picker_ref
    return Pool(
        ns,
        name,
        group,
        dict(s1.selector.match_labels),
        tuple(p.number for p in s1.target_ports),
        s1.app_protocol,
        picker_name=ref.name if ref else None,
        failure_mode=ref.failure_mode if ref else "FailClose",
    )


def _check_pool_ref(ref: _PoolRef, kind: str, ns: str, name: str) -> None:
    if ref.kind != "InferencePool":
        raise InvalidObject(kind, ns, name, f"spec.poolRef.kind: must be InferencePool, got {ref.kind!r}")


def parse_objective(obj: dict[str, Any]) -> Objective:
    """An InferenceObjective (llm-d.ai or inference.networking.x-k8s.io) -> `Objective`."""
    ns, name, group, _ = _meta(obj, "InferenceObjective")
    spec = _spec(obj, "InferenceObjective", ns, name)
    try:
        s = _ObjectiveSpec.model_validate(spec)
    except ValidationError as e:
        raise InvalidObject("InferenceObjective", ns, name, _field_errors(e, "spec")) from None
    _check_pool_ref(s.pool_ref, "InferenceObjective", ns, name)
    return Objective(ns, name, s.priority, s.pool_ref.name, group)


def parse_rewrite(obj: dict[str, Any]) -> ModelRewrite:
    """An InferenceModelRewrite (llm-d.ai or inference.networking.x-k8s.io) -> `ModelRewrite`."""
    ns, name, group, _ = _meta(obj, "InferenceModelRewrite")
    spec = _spec(obj, "InferenceModelRewrite", ns, name)
    try:
        s = _RewriteSpec.model_validate(spec)
    except ValidationError as e:
        raise InvalidObject("InferenceModelRewrite", ns, name, _field_errors(e, "spec")) from None
    _check_pool_ref(s.pool_ref, "InferenceModelRewrite", ns, name)
    rules = tuple(
        RewriteRule(
            tuple(m.model.value for m in r.matches),
            # weights are all set or all unset: unset means equal shares
            tuple(RewriteTarget(t.model_rewrite, t.weight or 1) for t in r.targets),
        )
        for r in s.rules
    )
    created = str((obj.get("metadata") or {}).get("creationTimestamp", ""))
    return ModelRewrite(ns, name, s.pool_ref.name, rules, created, group)


def standalone_pool(namespace: str, selector: str, target_ports: list[int] | tuple[int, ...]) -> Pool:
    """A pool from a label selector and ports, without an InferencePool (upstream `--endpoint-selector`
    and `--endpoint-target-ports`); raises ValueError naming the bad flag value."""
    if not selector.strip():
        raise ValueError("endpoint selector: empty")
    parse_selector(selector)
    ports = tuple(target_ports)
    if not 1 <= len(ports) <= 8 or any(not 1 <= p <= 65535 for p in ports) or len(set(ports)) != len(ports):
        raise ValueError(f"endpoint target ports: 1 to 8 distinct ports in 1-65535, got {list(ports)}")
    return Pool(namespace, "", "", {}, ports, expression=selector)
