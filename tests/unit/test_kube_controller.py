"""KubeDiscovery against the fake API server, through kubernetes_asyncio and a kubeconfig file.

The fake server enforces exactly the Role `required_rules()` returns, so every test here also proves
the controller calls only granted verbs.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from kubefixtures import NS, POOL, objective_obj, pod_obj, pool_obj, until

from ingate.datastore import Datastore, Endpoint
from ingate.kube.client import api_client
from ingate.kube.controller import KubeAccessDenied, KubeDiscovery, required_rules
from ingate.kube.endpoints import ENGINE_LABEL
from ingate.kube.fakeapi import DEFAULT_RESOURCES, FakeApiServer
from ingate.kube.informer import Informer
from ingate.kube.models import X_GROUP
from ingate.objectives import ObjectiveStore


class Cluster:
    def __init__(self, server: FakeApiServer, kubeconfig: Path) -> None:
        self.server, self.kubeconfig = server, kubeconfig
        self.discoveries: list[KubeDiscovery] = []

    async def discovery(self, **kw: Any) -> tuple[KubeDiscovery, Datastore, ObjectiveStore]:
        ds, store = Datastore(), ObjectiveStore.create()
        d = KubeDiscovery(
            ds, store, POOL, NS, kubeconfig=str(self.kubeconfig), backoff_base_s=0.05, backoff_max_s=0.3, **kw
        )
        self.discoveries.append(d)
        await d.start()
        return d, ds, store

    def caught_up(self, d: KubeDiscovery) -> bool:
        """The pod watch has delivered every change the server made."""
        return d.pod_informer is not None and d.pod_informer.resource_version == str(self.server.rv)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    server = FakeApiServer(required_rules(), bookmark_interval=0.2)
    await server.start()
    c = Cluster(server, server.write_kubeconfig(tmp_path / "kubeconfig", NS))
    try:
        yield c
    finally:
        for d in c.discoveries:
            await d.stop()
        await server.stop()


def addrs(ds: Datastore) -> set[str]:
    return {e.address for e in ds.endpoints()}


async def test_pods_move_in_and_out_within_one_watch_event(cluster: Cluster) -> None:
    s = cluster.server
    s.apply(pool_obj())
    s.apply(pod_obj("a", "127.0.0.2"))
    s.apply(pod_obj("b", "127.0.0.3", ready=False))
    s.apply(pod_obj("c", "127.0.0.4", labels={"app": "other"}))
    d, ds, _ = await cluster.discovery()
    await d.wait_synced(5)
    assert addrs(ds) == {"127.0.0.2:8000"}

    async def step(obj: dict[str, Any] | None, delete: str | None = None) -> None:
        if delete:
            s.delete("v1", "Pod", NS, delete)
        else:
            assert obj is not None
            s.apply(obj)
        await until(lambda: cluster.caught_up(d), what="the pod event")

    await step(pod_obj("b", "127.0.0.3", labels={"app": "llm", ENGINE_LABEL: "sglang"}))  # turns ready
    assert addrs(ds) == {"127.0.0.2:8000", "127.0.0.3:8000"}
    assert ds.get("127.0.0.3:8000").engine == "sglang"  # type: ignore[union-attr]
    assert ds.get("127.0.0.2:8000").engine == "vllm"  # type: ignore[union-attr]
    await step(pod_obj("a", "127.0.0.2", ready=False))  # turns unready
    assert addrs(ds) == {"127.0.0.3:8000"}
    await step(pod_obj("b", "127.0.0.5"))  # new IP
    assert addrs(ds) == {"127.0.0.5:8000"}
    await step(pod_obj("b", "127.0.0.5", terminating=True))  # terminating
    assert addrs(ds) == set()
    await step(pod_obj("a", "127.0.0.2"))
    await step(None, delete="a")  # deleted
    assert addrs(ds) == set()
    await step(pod_obj("d", "127.0.0.6", labels={"app": "llm", "x": "y"}))
    await step(pod_obj("d", "127.0.0.6", labels={"app": "gone"}))  # leaves the selector
    assert addrs(ds) == set()
    assert d.pod_informer is not None and d.pod_informer.lists == 1  # all of it from the one watch


async def test_410_on_watch_relists_without_churn(cluster: Cluster) -> None:
    s = cluster.server
    s.apply(pool_obj())
    s.apply(pod_obj("a", "127.0.0.2"))
    s.apply(pod_obj("b", "127.0.0.3"))
    d, ds, _ = await cluster.discovery()
    await d.wait_synced(5)
    before = {e.address: e for e in ds.endpoints()}
    before["127.0.0.2:8000"].metrics.waiting = 7
    removed: list[Endpoint] = []
    ds.on_remove(removed.append)
    assert d.pod_informer is not None
    s.expire_watches()  # open watches get ERROR 410, history is compacted
    s.apply(pod_obj("c", "127.0.0.4"))  # a change the relist must catch
    await until(lambda: d.pod_informer is not None and d.pod_informer.lists == 2, what="the relist")
    await until(lambda: "127.0.0.4:8000" in addrs(ds), what="the new pod")
    assert removed == []
    assert ds.get("127.0.0.2:8000") is before["127.0.0.2:8000"]  # the same object: metrics kept
    assert before["127.0.0.2:8000"].metrics.waiting == 7


async def test_api_server_restart_resumes_watch_and_keeps_endpoints(cluster: Cluster) -> None:
    s = cluster.server
    s.apply(pool_obj())
    s.apply(pod_obj("a", "127.0.0.2"))
    s.apply(pod_obj("b", "127.0.0.3"))
    d, ds, _ = await cluster.discovery()
    await d.wait_synced(5)
    removed: list[Endpoint] = []
    ds.on_remove(removed.append)
    sizes: list[int] = []
    sampling = True

    async def sample() -> None:  # what a request scheduled during the outage would see
        while sampling:
            sizes.append(len(ds.endpoints()))
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    await s.stop()  # the API server goes away: watches are reset
    await asyncio.sleep(0.5)  # the controller retries meanwhile
    s.apply(pod_obj("c", "127.0.0.4"))  # changed while we could not watch
    await s.start()  # same port, same state
    await until(lambda: "127.0.0.4:8000" in addrs(ds), within_s=10, what="the change made during the outage")
    sampling = False
    await sampler
    assert min(sizes) == 2 and removed == []
    assert d.pod_informer is not None and d.pod_informer.lists == 1  # resumed from its resourceVersion
    assert d.pod_informer.watches >= 2


async def test_objective_priority_change_takes_effect(cluster: Cluster) -> None:
    s = cluster.server
    s.apply(pool_obj())
    s.apply(objective_obj("critical", 1))
    s.apply(objective_obj("critical", 9, group=X_GROUP))  # older group: llm-d.ai wins
    s.apply(objective_obj("elsewhere", 3, pool="another-pool"))
    d, _, store = await cluster.discovery()
    await d.wait_synced(5)
    assert store.get("critical") is not None and store.get("critical").priority == 1  # type: ignore[union-attr]
    assert store.get("elsewhere") is None
    changes: list[int] = []
    store.on_change(lambda: changes.append(store.version))
    s.apply(objective_obj("critical", 5))
    await until(lambda: (o := store.get("critical")) is not None and o.priority == 5, what="the new priority")
    s.apply(objective_obj("critical", "high"))  # invalid: keep 5, log + Event
    await until(
        lambda: any(e["reason"] == "InvalidObjective" for e in s.list("v1", "Event", NS)), what="the Event"
    )
    ev = next(e for e in s.list("v1", "Event", NS) if e["reason"] == "InvalidObjective")
    assert ev["type"] == "Warning" and "spec.priority" in ev["message"]
    assert ev["involvedObject"]["kind"] == "InferenceObjective" and ev["involvedObject"]["name"] == "critical"
    assert store.get("critical").priority == 5  # type: ignore[union-attr]
    s.delete("llm-d.ai/v1alpha2", "InferenceObjective", NS, "critical")  # the older group's one remains
    await until(lambda: store.get("critical").priority == 9, what="fallback to x-k8s")  # type: ignore[union-attr]
    s.delete(f"{X_GROUP}/v1alpha2", "InferenceObjective", NS, "critical")
    await until(lambda: store.get("critical") is None, what="removal")
    assert len(changes) == 3  # 5, fallback to 9, removed: the invalid object changed nothing


async def test_model_rewrite_from_crd(cluster: Cluster) -> None:
    s = cluster.server
    s.apply(pool_obj())
    s.apply(
        {
            "apiVersion": "llm-d.ai/v1alpha2",
            "kind": "InferenceModelRewrite",
            "metadata": {"name": "canary", "namespace": NS},
            "spec": {
                "poolRef": {"name": POOL},
                "rules": [
                    {
                        "matches": [{"model": {"value": "food-review"}}],
                        "targets": [
                            {"modelRewrite": "v1", "weight": 50},
                            {"modelRewrite": "v2", "weight": 50},
                        ],
                    }
                ],
            },
        }
    )
    d, _, store = await cluster.discovery()
    await d.wait_synced(5)
    assert (store.rewrite("food-review", 0.1), store.rewrite("food-review", 0.9)) == ("v1", "v2")
    s.delete("llm-d.ai/v1alpha2", "InferenceModelRewrite", NS, "canary")
    await until(lambda: store.rewrite("food-review", 0.1) is None, what="rewrite removal")


async def test_invalid_or_deleted_pool_keeps_last_good_endpoints(cluster: Cluster) -> None:
    s = cluster.server
    s.apply(pool_obj([8000]))
    s.apply(pod_obj("a", "127.0.0.2"))
    d, ds, _ = await cluster.discovery()
    await d.wait_synced(5)
    assert addrs(ds) == {"127.0.0.2:8000"}
    s.apply(pool_obj([8000, 8001]))  # a second rank port
    await until(lambda: addrs(ds) == {"127.0.0.2:8000", "127.0.0.2:8001"}, what="the second port")
    bad = pool_obj()
    bad["spec"]["targetPorts"] = [{"number": 0}]
    s.apply(bad)
    await until(
        lambda: any(e["reason"] == "InvalidPool" for e in s.list("v1", "Event", NS)), what="the Event"
    )
    ev = next(e for e in s.list("v1", "Event", NS) if e["reason"] == "InvalidPool")
    assert "spec.targetPorts[0].number" in ev["message"]
    assert addrs(ds) == {"127.0.0.2:8000", "127.0.0.2:8001"}
    s.delete("inference.networking.k8s.io/v1", "InferencePool", NS, POOL)
    await until(
        lambda: any(e["reason"] == "PoolDeleted" for e in s.list("v1", "Event", NS)), what="the Event"
    )
    s.apply(pod_obj("b", "127.0.0.3"))  # pods are still tracked with the last good selector
    await until(lambda: "127.0.0.3:8000" in addrs(ds), what="pod after pool deletion")
    assert {"127.0.0.2:8000", "127.0.0.2:8001"} <= addrs(ds)


async def test_older_pool_generation(cluster: Cluster) -> None:
    s = cluster.server
    s.apply(
        {
            "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
            "kind": "InferencePool",
            "metadata": {"name": POOL, "namespace": NS},
            "spec": {"selector": {"app": "llm"}, "targetPortNumber": 8000, "extensionRef": {"name": "epp"}},
        }
    )
    s.apply(pod_obj("a", "127.0.0.2"))
    s.rules = required_rules(pool_group=X_GROUP)
    d, ds, _ = await cluster.discovery(pool_group=X_GROUP)
    await d.wait_synced(5)
    assert addrs(ds) == {"127.0.0.2:8000"}


async def test_not_synced_until_the_pool_exists(cluster: Cluster) -> None:
    d, _, _ = await cluster.discovery()
    with pytest.raises(TimeoutError, match="pool=not found"):
        await d.wait_synced(0.5)
    cluster.server.apply(pool_obj())
    await d.wait_synced(5)


async def test_controller_uses_exactly_the_granted_verbs(cluster: Cluster) -> None:
    s = cluster.server
    s.apply(pool_obj())
    s.apply(pod_obj("a", "127.0.0.2"))
    s.apply(objective_obj("o", "bad"))  # makes the controller record an Event
    d, _, _ = await cluster.discovery()
    await d.wait_synced(5)
    await until(lambda: any(r.resource == "events" for r in s.requests), what="the Event request")
    used = {(r.verb, r.group, r.resource) for r in s.requests}
    assert all(r.allowed for r in s.requests)
    granted = {
        (v, g, r)
        for rule in required_rules()
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert used == granted  # every verb granted is needed, and nothing else is called


@pytest.mark.parametrize(
    ("drop_verb", "resource"),
    [("watch", "pods"), ("list", "pods"), ("list", "inferencepools"), ("watch", "inferencepools")],
)
async def test_role_missing_a_verb_fails_loudly(
    cluster: Cluster, drop_verb: str, resource: str, caplog: pytest.LogCaptureFixture
) -> None:
    rules = required_rules()
    for r in rules:
        if resource in r["resources"]:
            others = [x for x in r["resources"] if x != resource]
            if others:  # split the rule so only `resource` loses the verb
                rules.append({"apiGroups": r["apiGroups"], "resources": others, "verbs": list(r["verbs"])})
                r["resources"] = [resource]
            r["verbs"] = [v for v in r["verbs"] if v != drop_verb]
    cluster.server.rules = rules
    cluster.server.apply(pool_obj())
    cluster.server.apply(pod_obj("a", "127.0.0.2"))
    d, _, _ = await cluster.discovery()
    with pytest.raises(KubeAccessDenied) as e:
        await d.wait_synced(1.5)
    assert e.value.status == 403 and f"cannot {drop_verb}" in str(e.value) and resource in str(e.value)
    assert any(rec.levelname == "ERROR" and resource in rec.getMessage() for rec in caplog.records)


async def test_scale_from_zero_first_ready_pod_is_announced_once(cluster: Cluster) -> None:
    s = cluster.server
    s.apply(pool_obj())
    s.apply(pod_obj("a", "127.0.0.2", ready=False))  # scaled to zero / still loading the model
    d, ds, _ = await cluster.discovery()
    await d.wait_synced(5)
    assert ds.endpoints() == []
    added: list[str] = []
    ds.on_add(lambda ep: added.append(ep.address))  # what flow control's dispatcher will wake on
    s.apply(pod_obj("a", "127.0.0.2"))
    await until(lambda: cluster.caught_up(d), what="the pod event")
    assert added == ["127.0.0.2:8000"]
    s.apply(pod_obj("a", "127.0.0.2", labels={"app": "llm", "rev": "2"}))  # a label change: no churn
    await until(lambda: cluster.caught_up(d), what="the pod event")
    assert added == ["127.0.0.2:8000"]
    assert ds.get("127.0.0.2:8000").labels["rev"] == "2"  # type: ignore[union-attr]


async def test_malformed_object_does_not_stop_the_watch(cluster: Cluster) -> None:
    s = cluster.server
    s.apply(pool_obj())
    d, ds, store = await cluster.discovery()
    await d.wait_synced(5)
    broken = objective_obj("broken", 1)
    broken["spec"]["poolRef"] = "pool"  # not an object: the controller must shrug it off
    s.apply(broken)
    s.apply(objective_obj("fine", 2))
    await until(lambda: store.get("fine") is not None, what="the next objective")
    s.apply(pod_obj("a", "127.0.0.2"))
    await until(lambda: cluster.caught_up(d), what="the pod event")
    assert addrs(ds) == {"127.0.0.2:8000"}


async def test_standalone_endpoint_selector_mode(cluster: Cluster) -> None:
    s = cluster.server
    s.rules = required_rules(standalone=True)  # pods only: no CRDs, no Events
    s.apply(pod_obj("a", "127.0.0.2", labels={"app": "vllm"}))
    s.apply(pod_obj("b", "127.0.0.3", labels={"app": "sglang", ENGINE_LABEL: "sglang"}))
    s.apply(pod_obj("c", "127.0.0.4", labels={"app": "tgi"}))
    ds, store = Datastore(), ObjectiveStore.create()
    d = KubeDiscovery(
        ds,
        store,
        None,
        NS,
        endpoint_selector="app in (vllm,sglang)",
        target_ports=[8000],
        kubeconfig=str(cluster.kubeconfig),
    )
    cluster.discoveries.append(d)
    await d.start()
    await d.wait_synced(5)
    assert addrs(ds) == {"127.0.0.2:8000", "127.0.0.3:8000"}
    s.apply(pod_obj("c", "127.0.0.4", labels={"app": "vllm"}))
    await until(lambda: "127.0.0.4:8000" in addrs(ds), what="the pod joining the selector")
    assert {(r.verb, r.resource) for r in s.requests} == {("list", "pods"), ("watch", "pods")}
    assert all(r.allowed for r in s.requests)
    with pytest.raises(ValueError, match="either a pool name or an endpoint selector"):
        KubeDiscovery(ds, store, "pool", NS, endpoint_selector="app=x", target_ports=[1])


async def test_in_cluster_service_account_over_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a pod: https to KUBERNETES_SERVICE_HOST:PORT, the service account token and CA from files."""
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("sa-token")
    ca.cert_pem.write_to_path(str(sa / "ca.crt"))
    async with FakeApiServer(required_rules(), token="sa-token", ssl_context=ctx) as server:
        server.apply(pool_obj())
        server.apply(pod_obj("a", "127.0.0.2"))
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.port))
        api = await api_client(service_account_dir=str(sa))
        ds = Datastore()
        d = KubeDiscovery(ds, ObjectiveStore.create(), POOL, NS, api=api)
        await d.start()
        try:
            await d.wait_synced(5)
            assert addrs(ds) == {"127.0.0.2:8000"}
        finally:
            await d.stop()
            await api.close()
        assert server.url.startswith("https://")


async def test_bookmarks_keep_a_quiet_watch_resumable_after_compaction(cluster: Cluster) -> None:
    """Pods stay quiet while other objects change; bookmarks move the pod watch's resourceVersion
    along, so after compaction and an API server restart it resumes without a 410 relist."""
    s = cluster.server
    s.apply(pool_obj())
    s.apply(pod_obj("a", "127.0.0.2"))
    d, ds, _ = await cluster.discovery()
    await d.wait_synced(5)
    for i in range(5):
        s.apply(objective_obj(f"o{i}", i))
    await until(lambda: cluster.caught_up(d), what="a bookmark at the newest revision")
    s.compact()
    await s.stop()
    await s.start()
    s.apply(pod_obj("b", "127.0.0.3"))
    await until(lambda: "127.0.0.3:8000" in addrs(ds), within_s=10, what="the pod after the restart")
    assert d.pod_informer is not None and d.pod_informer.lists == 1


async def test_server_side_watch_timeout_resumes_without_relist(cluster: Cluster) -> None:
    s = cluster.server
    s.apply(pool_obj())
    d, ds, _ = await cluster.discovery(watch_timeout_s=1)
    await d.wait_synced(5)
    await until(lambda: d.pod_informer is not None and d.pod_informer.watches >= 2, what="a second watch")
    s.apply(pod_obj("a", "127.0.0.2"))
    await until(lambda: addrs(ds) == {"127.0.0.2:8000"}, what="the pod")
    assert d.pod_informer is not None and d.pod_informer.lists == 1


async def test_pool_selector_change_moves_the_endpoints(cluster: Cluster) -> None:
    s = cluster.server
    s.apply(pool_obj(selector={"app": "llm", "track": "blue"}))
    s.apply(pod_obj("blue", "127.0.0.2", labels={"app": "llm", "track": "blue"}))
    s.apply(pod_obj("green", "127.0.0.3", labels={"app": "llm", "track": "green"}))
    s.apply(pod_obj("both", "127.0.0.4", labels={"app": "llm"}))
    d, ds, _ = await cluster.discovery()
    await d.wait_synced(5)
    assert addrs(ds) == {"127.0.0.2:8000"}
    s.apply(pool_obj(selector={"app": "llm", "track": "green"}))
    await until(lambda: addrs(ds) == {"127.0.0.3:8000"}, what="the green pods")
    s.apply(pool_obj(selector={"app": "llm"}))
    await until(lambda: addrs(ds) == {"127.0.0.2:8000", "127.0.0.3:8000", "127.0.0.4:8000"}, what="all pods")


async def test_cluster_with_only_the_older_crds(tmp_path: Path) -> None:
    """A cluster that has no llm-d.ai CRDs: those watches are skipped, the x-k8s objectives work."""
    resources = {k: v for k, v in DEFAULT_RESOURCES.items() if k[0] != "llm-d.ai"}
    async with FakeApiServer(required_rules(), resources=resources) as server:
        server.apply(pool_obj())
        server.apply(objective_obj("critical", 4, group=X_GROUP))
        c = Cluster(server, server.write_kubeconfig(tmp_path / "kubeconfig", NS))
        d, _, store = await c.discovery()
        try:
            await d.wait_synced(5)
            assert store.get("critical") is not None and store.get("critical").priority == 4  # type: ignore[union-attr]
            assert sorted(i.what for i in d.crd_informers if i.absent) == [
                "inferencemodelrewrites.llm-d.ai",
                "inferenceobjectives.llm-d.ai",
            ]
        finally:
            await d.stop()


# The namespaced Roles the upstream charts grant (facts from their rbac templates): the picker must
# run under them unchanged. Neither grants Events without leader election; the older GIE chart does
# not know the llm-d.ai group.
READ = ["get", "watch", "list"]
LLMD_ROUTER_CHART_ROLE = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": READ},
    {
        "apiGroups": ["inference.networking.x-k8s.io"],
        "resources": ["inferenceobjectives", "inferencemodelrewrites"],
        "verbs": READ,
    },
    {
        "apiGroups": ["llm-d.ai"],
        "resources": ["inferenceobjectives", "inferencemodelrewrites"],
        "verbs": READ,
    },
    {"apiGroups": ["inference.networking.k8s.io"], "resources": ["inferencepools"], "verbs": READ},
]
GIE_CHART_ROLE = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": READ},
    {
        "apiGroups": ["inference.networking.x-k8s.io"],
        "resources": ["inferenceobjectives", "inferencemodelrewrites"],
        "verbs": READ,
    },
    {"apiGroups": ["inference.networking.k8s.io"], "resources": ["inferencepools"], "verbs": READ},
]


@pytest.mark.parametrize("role", [LLMD_ROUTER_CHART_ROLE, GIE_CHART_ROLE], ids=["llm-d-router", "gie"])
async def test_runs_under_the_upstream_charts_roles(
    cluster: Cluster, role: list[dict[str, list[str]]], caplog: pytest.LogCaptureFixture
) -> None:
    s = cluster.server
    s.rules = role
    s.apply(pool_obj())
    s.apply(pod_obj("a", "127.0.0.2"))
    s.apply(objective_obj("critical", 7, group=X_GROUP))
    d, ds, store = await cluster.discovery()
    await d.wait_synced(5)
    assert addrs(ds) == {"127.0.0.2:8000"}
    assert store.get("critical") is not None and store.get("critical").priority == 7  # type: ignore[union-attr]
    s.apply(objective_obj("critical", "high", group=X_GROUP))  # invalid: an Event it may not create
    s.apply(objective_obj("other", "bad", group=X_GROUP))
    await until(lambda: d.events is not None and d.events.disabled, what="events disabled")
    assert store.get("critical").priority == 7  # type: ignore[union-attr]
    assert sum("not recording Kubernetes Events" in r.getMessage() for r in caplog.records) == 1
    assert not any(r.verb == "create" and r.resource == "events" and r.allowed for r in s.requests)
    if role is GIE_CHART_ROLE:
        assert sorted(i.what for i in d.crd_informers if i.absent) == [
            "inferencemodelrewrites.llm-d.ai",
            "inferenceobjectives.llm-d.ai",
        ]
        assert any("going on without inferenceobjectives.llm-d.ai" in r.getMessage() for r in caplog.records)


async def test_an_ip_taken_over_by_another_pod_stays(cluster: Cluster) -> None:
    s = cluster.server
    s.apply(pool_obj())
    s.apply(pod_obj("old", "127.0.0.2"))
    d, ds, _ = await cluster.discovery()
    await d.wait_synced(5)
    s.apply(pod_obj("new", "127.0.0.2"))  # the IP is reused before the old pod's deletion is seen
    await until(lambda: cluster.caught_up(d), what="the new pod")
    ep = ds.get("127.0.0.2:8000")
    assert ep is not None and ep.name == "new"
    s.delete("v1", "Pod", NS, "old")
    await until(lambda: cluster.caught_up(d), what="the deletion")
    assert ds.get("127.0.0.2:8000") is ep  # still served: the new pod owns it


async def test_stop_does_not_hang_on_an_unresponsive_api_server(cluster: Cluster) -> None:
    s = cluster.server
    s.apply(pool_obj())
    d, _, _ = await cluster.discovery()
    await d.wait_synced(5)
    await s.stop()
    conns: list[asyncio.StreamWriter] = []

    async def black_hole(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append(w)  # accept, never answer (a hung API server)

    hole = await asyncio.start_server(black_hole, s.host, s.port)
    try:
        bad = pool_obj()
        bad["spec"]["targetPorts"] = []
        d._pool_event("MODIFIED", bad)  # an Event to post to the hung server
        await until(lambda: bool(conns), what="the Event request to arrive")
        t0 = asyncio.get_running_loop().time()
        await d.stop()
        assert asyncio.get_running_loop().time() - t0 < 3
        cluster.discoveries.remove(d)
    finally:
        for w in conns:
            w.close()
        hole.close()
        await hole.wait_closed()


def test_reconnect_backoff_is_full_jitter_capped() -> None:
    inf = Informer(
        "x",
        None,
        lambda items: None,
        lambda t, o: None,
        backoff_base_s=0.2,
        backoff_max_s=10,
        rng=random.Random(1),
    )  # type: ignore[arg-type]
    for attempt, cap in [(0, 0.2), (1, 0.4), (3, 1.6), (10, 10.0), (60, 10.0)]:
        delays = [inf._delay(attempt) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > 0.8 * cap and min(delays) < 0.2 * cap  # spread over the whole range
