"""Pods -> endpoints: which pods of an InferencePool receive traffic, and on which ports.

A pod is an endpoint when it matches the pool's selector, is not terminating (no deletionTimestamp), is
not finished (phase Succeeded/Failed), has an IP, and is Ready, with every readiness gate's condition
True as well (the kubelet folds gates into Ready, but a pod status written by another controller may
not have yet). Each ready pod gives one endpoint per targetPort, like upstream (a pod serving several
data-parallel ranks on several ports). The engine comes from the pod label `llm-d.ai/engine-type`
(upstream's name), so vLLM and SGLang pods can share a pool and each gets its own metric names.
Pure functions, no I/O: the controller feeds them what the API server sends.
"""

from __future__ import annotations

from typing import Any

from ingate.datastore import Endpoint
from ingate.kube.models import Pool

ENGINE_LABEL = "llm-d.ai/engine-type"
LEGACY_ENGINE_LABEL = "inference.networking.k8s.io/engine-type"
"""The older Gateway API Inference Extension label, still honoured upstream (deprecated)."""


def _condition_true(conditions: list[dict[str, Any]], ctype: str) -> bool:
    return any(c.get("type") == ctype and c.get("status") == "True" for c in conditions)


def pod_is_ready(pod: dict[str, Any]) -> bool:
    """Ready, not terminating, not finished, with an IP, and every readiness gate satisfied."""
    meta = pod.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return False
    if not pod_ip(pod):
        return False
    conditions = status.get("conditions") or []
    if not _condition_true(conditions, "Ready"):
        return False
    gates = (pod.get("spec") or {}).get("readinessGates") or []
    return all(_condition_true(conditions, g.get("conditionType", "")) for g in gates)


def pod_ip(pod: dict[str, Any]) -> str | None:
    status = pod.get("status") or {}
    ip = status.get("podIP")
    if not ip:
        ips = status.get("podIPs") or []
        ip = ips[0].get("ip") if ips else None
    return str(ip) if ip else None


def pod_engine(labels: dict[str, str], default: str) -> str:
    """The pod's engine from its `llm-d.ai/engine-type` label (or the legacy
    `inference.networking.k8s.io/engine-type`), lower-cased, else the pool default."""
    v = (labels.get(ENGINE_LABEL) or labels.get(LEGACY_ENGINE_LABEL) or "").strip().lower()
    return v or default


def pod_endpoints(pod: dict[str, Any], pool: Pool, default_engine: str = "vllm") -> list[Endpoint]:
    """The endpoints one pod contributes to `pool` (empty when it is not a ready member)."""
    meta = pod.get("metadata") or {}
    labels = dict(meta.get("labels") or {})
    if not pool.matches(labels) or not pod_is_ready(pod):
        return []
    ip = pod_ip(pod)
    assert ip is not None  # pod_is_ready checked it
    name = str(meta.get("name", ip))
    engine = pod_engine(labels, default_engine)
    multi = len(pool.target_ports) > 1
    return [
        Endpoint(
            name=f"{name}-rank-{i}" if multi else name,
            host=ip,
            port=port,
            engine=engine,
            labels=labels,
        )
        for i, port in enumerate(pool.target_ports)
    ]
