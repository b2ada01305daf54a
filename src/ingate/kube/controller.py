"""The Kubernetes discovery source: one InferencePool, its pods and the objectives/rewrites naming it.

`KubeDiscovery` watches (list + watch, see informer.py)
- the InferencePool it serves (by name, `--pool-group` picks the generation),
- the pods its selector matches -> endpoints (endpoints.py) written into the same `Datastore` the
  static config feeds: `upsert` for new/changed endpoints (an existing one keeps its metrics), `remove`
  for ones that left; a relist after 410 changes nothing that did not change,
- InferenceObjectives and InferenceModelRewrites of both generations (llm-d.ai/v1alpha2 and
  inference.networking.x-k8s.io/v1alpha2) whose poolRef names the pool -> the `ObjectiveStore`
  (llm-d.ai wins over the older group for the same name).

A pool or objective that fails validation, or a deleted pool: one clear log line and a Kubernetes Event,
and the picker keeps the last good state (a bad or deleted pool never empties the datastore). A deleted
objective or rewrite is removed (requests naming it get the default priority), with a log line and an
Event on the pool. Readiness: `synced` is set once the pool was read and is valid and every resource was
listed once (resources whose CRD is not installed count as listed).

RBAC: `required_rules()` is the exact Role the controller needs (tests run the fake API server with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from kubernetes_asyncio import client

from ingate.datastore import Datastore, Endpoint
from ingate.kube.client import KubeAccessDenied, KubeApiError, api_client
from ingate.kube.endpoints import pod_endpoints
from ingate.kube.events import EventRecorder, object_ref
from ingate.kube.informer import Informer
from ingate.kube.models import (
    LLMD_GROUP,
    OBJECTIVE_LLMD,
    OBJECTIVE_X,
    POOL_GROUP,
    POOL_KINDS,
    REWRITE_LLMD,
    REWRITE_X,
    X_GROUP,
    InvalidObject,
    ModelRewrite,
    Objective,
    Pool,
    ResourceKind,
    parse_objective,
    parse_pool,
    parse_rewrite,
    standalone_pool,
)
from ingate.objectives import ObjectiveSpec, ObjectiveStore, RewriteRuleSpec, RewriteSpec

log = logging.getLogger("ingate.kube")

OBJECTIVE_KINDS = (OBJECTIVE_X, OBJECTIVE_LLMD)
"""In precedence order: a later group's object overrides an earlier one's of the same name."""
REWRITE_KINDS = (REWRITE_X, REWRITE_LLMD)


def required_rules(
    pool_group: str = POOL_GROUP, leader_election: bool = False, standalone: bool = False
) -> list[dict[str, list[str]]]:
    """The namespaced Role rules the controller uses, exactly (Helm chart / `ingate k8s render`).
    Pods and the pool are required; objectives, rewrites and Events are used when granted (the
    upstream charts' Roles lack some of them). `standalone`: an endpoint selector instead of an
    InferencePool (pods only, no CRDs, no Events)."""
    rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}]
    if not standalone:
        pool = POOL_KINDS[pool_group]
        rules += [
            {"apiGroups": [pool.group], "resources": [pool.plural], "verbs": ["list", "watch"]},
            {
                "apiGroups": sorted({LLMD_GROUP, X_GROUP}),
                "resources": ["inferenceobjectives", "inferencemodelrewrites"],
                "verbs": ["list", "watch"],
            },
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        ]
    if leader_election:
        rules.append(
            {
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                "verbs": ["get", "create", "update"],
            }
        )
    return rules


@dataclass(frozen=True)
class _Key:
    group: str
    name: str


class KubeDiscovery:
    """See the module docstring. `start()` returns at once; await `synced` (or `wait_synced`) for
    readiness; `stop()` cancels the watches (endpoints stay as they are).

    Standalone mode (upstream `--endpoint-selector` + `--endpoint-target-ports`): `pool_name=None`
    with `endpoint_selector` and `target_ports`: pods only, no InferencePool and no objectives."""

    def __init__(
        self,
        datastore: Datastore,
        objectives: ObjectiveStore,
        pool_name: str | None,
        namespace: str,
        *,
        endpoint_selector: str | None = None,
        target_ports: Sequence[int] = (),
        pool_group: str = POOL_GROUP,
        kubeconfig: str | None = None,
        default_engine: str = "vllm",
        api: client.ApiClient | None = None,
        backoff_base_s: float = 0.2,
        backoff_max_s: float = 10.0,
        watch_timeout_s: int = 300,
        rng: random.Random | None = None,
    ) -> None:
        if pool_group not in POOL_KINDS:
            raise ValueError(f"pool group {pool_group!r}: expected one of {sorted(POOL_KINDS)}")
        if (pool_name is None) == (endpoint_selector is None):
            raise ValueError("give either a pool name or an endpoint selector (with target ports)")
        self._standalone = (
            standalone_pool(namespace, endpoint_selector, tuple(target_ports)) if endpoint_selector else None
        )
        self.datastore = datastore
        self.objectives = objectives
        self.pool_name, self.namespace = pool_name or "", namespace
        self.pool_kind = POOL_KINDS[pool_group]
        self.kubeconfig = kubeconfig
        self.default_engine = default_engine
        self._api = api
        self._own_api = api is None
        self._informer_opts: dict[str, Any] = {
            "backoff_base_s": backoff_base_s,
            "backoff_max_s": backoff_max_s,
            "watch_timeout_s": watch_timeout_s,
            "rng": rng,
        }
        self.pool: Pool | None = None
        """The last valid pool (kept when the pool turns invalid or is deleted)."""
        self._pool_obj: dict[str, Any] | None = None
        self.synced = asyncio.Event()
        self.events: EventRecorder | None = None
        self.pool_informer: Informer | None = None
        self.pod_informer: Informer | None = None
        self.crd_informers: list[Informer] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._pods: dict[str, dict[str, Any]] = {}
        self._pod_addrs: dict[str, set[str]] = {}
        self._objs: dict[_Key, Objective] = {}
        self._rewrites: dict[_Key, ModelRewrite] = {}

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._api is None:
            self._api = await api_client(self.kubeconfig)
        api = self._api
        self.events = EventRecorder(api, self.namespace)
        if self._standalone is not None:
            self.pool = self._standalone
            self._start_pod_informer(self.pool)
            log.info("kube: watching pods %r in %s (no InferencePool)", self.pool.expression, self.namespace)
            return
        custom = client.CustomObjectsApi(api)
        pk = self.pool_kind
        self.pool_informer = Informer(
            f"{pk.plural}.{pk.group}/{self.pool_name}",
            partial(custom.list_namespaced_custom_object, pk.group, pk.version, self.namespace, pk.plural),
            self._pool_list,
            self._pool_event,
            field_selector=f"metadata.name={self.pool_name}",
            **self._informer_opts,
        )
        self._spawn("pool", self.pool_informer)
        for kind in OBJECTIVE_KINDS:
            self._crd_informer(
                custom, kind, self._objective_list(kind.group), self._objective_event(kind.group)
            )
        for kind in REWRITE_KINDS:
            self._crd_informer(custom, kind, self._rewrite_list(kind.group), self._rewrite_event(kind.group))
        log.info("kube: watching %s %s/%s", pk.api_version, self.namespace, self.pool_name)

    def _crd_informer(
        self,
        custom: client.CustomObjectsApi,
        kind: ResourceKind,
        on_list: Callable[[list[dict[str, Any]]], None],
        on_event: Callable[[str, dict[str, Any]], None],
    ) -> None:
        inf = Informer(
            f"{kind.plural}.{kind.group}",
            partial(
                custom.list_namespaced_custom_object, kind.group, kind.version, self.namespace, kind.plural
            ),
            on_list,
            on_event,
            optional=True,
            **self._informer_opts,
        )
        self.crd_informers.append(inf)
        self._spawn(f"{kind.plural}.{kind.group}", inf)

    def _spawn(self, name: str, inf: Informer) -> None:
        loop = asyncio.get_running_loop()
        for n in (name, f"{name}:synced"):
            old = self._tasks.pop(n, None)
            if old is not None:
                old.cancel()
        self._tasks[name] = loop.create_task(inf.run(), name=f"kube-{name}")
        self._tasks[f"{name}:synced"] = loop.create_task(self._watch_synced(inf))

    async def _watch_synced(self, inf: Informer) -> None:
        await inf.synced.wait()
        self._check_synced()

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self.events is not None:
            await self.events.flush()
        if self._own_api and self._api is not None:
            await self._api.close()
            self._api = None

    async def wait_synced(self, within_s: float) -> None:
        """Wait for `synced`; raises the informers' access error (RBAC) or TimeoutError naming the cause."""
        try:
            await asyncio.wait_for(self.synced.wait(), within_s)
        except TimeoutError:
            err = self.access_error()
            if err is not None:
                raise err from None
            raise TimeoutError(f"kube discovery not synced after {within_s}s: {self.sync_status()}") from None
        err = self.access_error()
        if err is not None:
            raise err

    def access_error(self) -> KubeAccessDenied | None:
        """The first RBAC/auth error a required watch (pool, pods) currently has (None when allowed)."""
        for inf in self._informers():
            if not inf.optional and isinstance(inf.error, KubeAccessDenied):
                return inf.error
        return None

    def sync_status(self) -> str:
        parts = []
        for inf in self._informers():
            st = "absent" if inf.absent else "synced" if inf.synced.is_set() else "waiting"
            parts.append(f"{inf.what}={st}" + (f" ({inf.error})" if inf.error else ""))
        if self.pool is None:
            parts.append("pool=not found or invalid")
        return ", ".join(parts)

    def _informers(self) -> list[Informer]:
        infs = [self.pool_informer, self.pod_informer, *self.crd_informers]
        return [i for i in infs if i is not None]

    def _check_synced(self) -> None:
        if self.synced.is_set() or self.pool is None or self.pod_informer is None:
            return
        if all(i.synced.is_set() for i in self._informers()):
            self.synced.set()
            log.info(
                "kube: synced: %d endpoints, %d objectives", len(self.datastore.endpoints()), len(self._objs)
            )

    # ---- pool ------------------------------------------------------------------------------------

    def _pool_list(self, items: list[dict[str, Any]]) -> None:
        mine = [o for o in items if (o.get("metadata") or {}).get("name") == self.pool_name]
        if mine:
            self._pool_event("ADDED", mine[0])
        elif self.pool is not None:
            self._pool_event("DELETED", self._pool_obj or {})
        else:
            log.warning("kube: InferencePool %s/%s not found; waiting for it", self.namespace, self.pool_name)

    def _pool_event(self, typ: str, obj: dict[str, Any]) -> None:
        if (obj.get("metadata") or {}).get("name") != self.pool_name:
            return
        if typ == "DELETED":
            log.warning(
                "kube: InferencePool %s/%s was deleted; keeping the last %d endpoints",
                self.namespace,
                self.pool_name,
                sum(len(a) for a in self._pod_addrs.values()),
            )
            self._record(
                obj, "Warning", "PoolDeleted", "InferencePool deleted; the picker keeps its last endpoints"
            )
            return
        try:
            pool = parse_pool(obj)
        except InvalidObject as e:
            log.error("kube: invalid %s; keeping the last good pool", e)
            self._record(obj, "Warning", "InvalidPool", f"{e.detail}; the picker keeps the last good pool")
            return
        self._pool_obj = obj
        old, self.pool = self.pool, pool
        if old == pool:
            return
        log.info(
            "kube: pool %s/%s selector=%s targetPorts=%s",
            pool.namespace,
            pool.name,
            pool.selector,
            pool.target_ports,
        )
        if old is None or old.selector != pool.selector:
            self._start_pod_informer(pool)
        else:  # same pods, other ports: recompute every pod's endpoints
            for name, pod in list(self._pods.items()):
                self._apply_pod(name, pod)
        self._check_synced()

    # ---- pods ------------------------------------------------------------------------------------

    def _start_pod_informer(self, pool: Pool) -> None:
        assert self._api is not None
        core = client.CoreV1Api(self._api)
        self.pod_informer = Informer(
            f"pods[{pool.label_selector()}]",
            partial(core.list_namespaced_pod, self.namespace),
            self._pod_list,
            self._pod_event,
            label_selector=pool.label_selector(),
            **self._informer_opts,
        )
        self._spawn("pods", self.pod_informer)

    def _pod_list(self, items: list[dict[str, Any]]) -> None:
        new = {str(p["metadata"]["name"]): p for p in items}
        for name in list(self._pods):
            if name not in new:
                self._apply_pod(name, None)
        for name, pod in new.items():
            self._apply_pod(name, pod)

    def _pod_event(self, typ: str, pod: dict[str, Any]) -> None:
        name = str(pod["metadata"]["name"])
        self._apply_pod(name, None if typ == "DELETED" else pod)

    def _apply_pod(self, name: str, pod: dict[str, Any] | None) -> None:
        """Make the datastore hold exactly this pod's current endpoints (no-op when unchanged)."""
        pool = self.pool
        if pod is None:
            self._pods.pop(name, None)
        else:
            self._pods[name] = pod
        eps: list[Endpoint] = (
            pod_endpoints(pod, pool, self.default_engine) if pod is not None and pool else []
        )
        old = self._pod_addrs.pop(name, set())
        new = {e.address for e in eps}
        for ep in eps:
            if ep.address not in old:
                log.info("kube: endpoint %s (%s, %s) joined", ep.address, ep.name, ep.engine)
            self.datastore.upsert(ep)  # in place for a known address: metrics and in-flight counts kept
        if new:
            self._pod_addrs[name] = new
        owned = set().union(*self._pod_addrs.values()) if self._pod_addrs else set()
        for addr in old - new:
            if addr not in owned:  # another pod may have taken the IP meanwhile
                log.info("kube: endpoint %s (%s) left", addr, name)
                self.datastore.remove(addr)

    # ---- objectives and rewrites -----------------------------------------------------------------

    def _refs_pool(self, obj: dict[str, Any]) -> bool:
        ref = (obj.get("spec") or {}).get("poolRef") or {}
        return isinstance(ref, dict) and ref.get("name") == self.pool_name

    def _objective_list(self, group: str) -> Callable[[list[dict[str, Any]]], None]:
        def on_list(items: list[dict[str, Any]]) -> None:
            names = {str(o["metadata"]["name"]) for o in items if self._refs_pool(o)}
            for key in [k for k in self._objs if k.group == group and k.name not in names]:
                self._objective_gone(key, None)
            for o in items:
                self._objective(group, "ADDED", o)
            self._publish_objectives()

        return on_list

    def _objective_event(self, group: str) -> Callable[[str, dict[str, Any]], None]:
        def on_event(typ: str, obj: dict[str, Any]) -> None:
            self._objective(group, typ, obj)
            self._publish_objectives()

        return on_event

    def _objective(self, group: str, typ: str, obj: dict[str, Any]) -> None:
        key = _Key(group, str(obj["metadata"]["name"]))
        if typ == "DELETED" or not self._refs_pool(obj):
            if key in self._objs:
                self._objective_gone(key, obj if typ == "DELETED" else None)
            return
        try:
            o = parse_objective(obj)
        except InvalidObject as e:
            log.error("kube: invalid %s; keeping its last good version", e)
            self._record(
                obj, "Warning", "InvalidObjective", f"{e.detail}; the picker keeps the last good version"
            )
            return
        if self._objs.get(key) != o:
            log.info("kube: objective %s priority=%d (%s)", o.name, o.priority, group)
        self._objs[key] = o

    def _objective_gone(self, key: _Key, obj: dict[str, Any] | None) -> None:
        self._objs.pop(key, None)
        log.info("kube: objective %s (%s) removed from pool %s", key.name, key.group, self.pool_name)
        if self._pool_obj is not None:
            self._record(
                self._pool_obj,
                "Normal",
                "ObjectiveRemoved",
                f"InferenceObjective {key.name} ({key.group}) removed",
            )

    def _publish_objectives(self) -> None:
        merged: dict[str, ObjectiveSpec] = {}
        for kind in OBJECTIVE_KINDS:  # precedence order
            for key, o in self._objs.items():
                if key.group == kind.group:
                    merged[o.name] = ObjectiveSpec(o.name, o.priority)
        self.objectives.replace(merged.values())

    def _rewrite_list(self, group: str) -> Callable[[list[dict[str, Any]]], None]:
        def on_list(items: list[dict[str, Any]]) -> None:
            names = {str(o["metadata"]["name"]) for o in items if self._refs_pool(o)}
            for key in [k for k in self._rewrites if k.group == group and k.name not in names]:
                self._rewrites.pop(key, None)
            for o in items:
                self._rewrite(group, "ADDED", o)
            self._publish_rewrites()

        return on_list

    def _rewrite_event(self, group: str) -> Callable[[str, dict[str, Any]], None]:
        def on_event(typ: str, obj: dict[str, Any]) -> None:
            self._rewrite(group, typ, obj)
            self._publish_rewrites()

        return on_event

    def _rewrite(self, group: str, typ: str, obj: dict[str, Any]) -> None:
        key = _Key(group, str(obj["metadata"]["name"]))
        if typ == "DELETED" or not self._refs_pool(obj):
            if self._rewrites.pop(key, None) is not None:
                log.info("kube: model rewrite %s (%s) removed", key.name, group)
            return
        try:
            rw = parse_rewrite(obj)
        except InvalidObject as e:
            log.error("kube: invalid %s; keeping its last good version", e)
            self._record(
                obj, "Warning", "InvalidModelRewrite", f"{e.detail}; the picker keeps the last good version"
            )
            return
        self._rewrites[key] = rw

    def _publish_rewrites(self) -> None:
        self.objectives.replace_rewrites(
            RewriteSpec(
                f"{key.group}:{rw.namespace}/{rw.name}",
                tuple(
                    RewriteRuleSpec(r.models, tuple((t.model, t.weight) for t in r.targets)) for r in rw.rules
                ),
                (rw.created, rw.name),
            )
            for key, rw in self._rewrites.items()
        )

    # ---- events ----------------------------------------------------------------------------------

    def _record(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        if self.events is not None and obj:
            self.events.record(object_ref(obj), type_, reason, message)


__all__ = ["KubeAccessDenied", "KubeApiError", "KubeDiscovery", "required_rules"]
