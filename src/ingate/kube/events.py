"""Kubernetes Events about the objects the picker reads (`kubectl describe inferencepool` shows them).

Core v1 Events (what `kubectl describe` and most dashboards read). The same (object, reason, message)
is recorded once per `dedupe_s` so a flapping or repeatedly relisted bad object does not flood the API
server. Recording is best-effort: a failure is logged and never blocks the controller.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio import client

from ingate.kube.client import KubeAccessDenied, error_from

log = logging.getLogger("ingate.kube")


def object_ref(obj: dict[str, Any]) -> dict[str, Any]:
    """An ObjectReference to a raw API object."""
    meta = obj.get("metadata") or {}
    return {
        "apiVersion": obj.get("apiVersion", ""),
        "kind": obj.get("kind", ""),
        "name": meta.get("name", ""),
        "namespace": meta.get("namespace", ""),
        "uid": meta.get("uid", ""),
        "resourceVersion": meta.get("resourceVersion", ""),
    }


class EventRecorder:
    """Records Events in `namespace` as `component` (reportingController ingate)."""

    def __init__(
        self, api: client.ApiClient, namespace: str, component: str = "ingate", dedupe_s: float = 600.0
    ) -> None:
        self._core = client.CoreV1Api(api)
        self.namespace = namespace
        self.component = component
        self._dedupe_s = dedupe_s
        self._recent: dict[tuple[str, str, str], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.recorded = 0
        self.disabled = False
        """Set after a 403: the upstream charts grant `events: create` only with leader election."""

    def record(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Fire and forget (the controller's event handlers are synchronous)."""
        if self.disabled:
            return
        key = (str(involved.get("uid") or involved.get("name")), reason, message)
        now = time.monotonic()
        if now - self._recent.get(key, -1e18) < self._dedupe_s:
            return
        if len(self._recent) > 1000:  # forget what is past the dedupe window
            self._recent = {k: t for k, t in self._recent.items() if now - t < self._dedupe_s}
        self._recent[key] = now
        t = asyncio.get_running_loop().create_task(self._post(involved, type_, reason, message))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _post(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        name = f"{involved.get('name', 'ingate')}.{uuid.uuid4().hex[:16]}"
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": self.namespace},
            "involvedObject": involved,
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": self.component},
            "reportingComponent": self.component,
            "reportingInstance": self.component,
            "firstTimestamp": ts,
            "lastTimestamp": ts,
            "count": 1,
        }
        try:
            core: Any = self._core  # raw dict body and raw response (_preload_content=False)
            resp = await core.create_namespaced_event(
                self.namespace, body, _preload_content=False, _request_timeout=10
            )
            if resp.status not in (200, 201):
                raise await error_from(resp, "create event")
            resp.release()
            self.recorded += 1
        except KubeAccessDenied as e:
            if not self.disabled:
                log.warning("kube: %s; not recording Kubernetes Events (log lines only)", e)
            self.disabled = True
        except Exception as e:  # best effort: never let an Event break the controller
            log.warning("kube: could not record event %s %s: %s", reason, involved.get("name"), e)

    async def flush(self, within_s: float = 1.0) -> None:
        """Wait up to `within_s` for events in flight, then drop the rest (shutdown must not hang on an
        API server that is away)."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(list(self._tasks), timeout=within_s)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)
