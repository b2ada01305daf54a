"""Shared helpers for the Kubernetes controller tests: objects, a fake cluster, polling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

NS = "ns"
POOL = "pool"


def pool_obj(ports: list[int] | None = None, selector: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": POOL, "namespace": NS},
        "spec": {
            "selector": {"matchLabels": selector or {"app": "llm"}},
            "targetPorts": [{"number": p} for p in (ports or [8000])],
            "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
        },
    }


def pod_obj(
    name: str,
    ip: str | None,
    ready: bool = True,
    labels: dict[str, str] | None = None,
    terminating: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NS, "labels": labels or {"app": "llm"}}
    if terminating:
        meta["deletionTimestamp"] = "2026-12-03T00:00:00Z"
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip:
        status["podIP"] = ip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": [{"name": "engine", "image": "vllm"}]},
        "status": status,
    }


def objective_obj(name: str, priority: Any, group: str = "llm-d.ai", pool: str = POOL) -> dict[str, Any]:
    return {
        "apiVersion": f"{group}/v1alpha2",
        "kind": "InferenceObjective",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"priority": priority, "poolRef": {"name": pool}},
    }


async def until(cond: Callable[[], bool], within_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what}")
        await asyncio.sleep(0.005)
