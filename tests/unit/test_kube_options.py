"""KubeOptions: upstream's flags -> controller, elector and Role."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubefixtures import NS, POOL, pod_obj, pool_obj, until

from ingate.datastore import Datastore
from ingate.epp_flags import EppOptions
from ingate.kube.controller import required_rules
from ingate.kube.fakeapi import FakeApiServer
from ingate.kube.leader import AlwaysLeader, LeaseElector
from ingate.kube.metrics_auth import RULES
from ingate.kube.options import KubeOptions, lease_name
from ingate.kube.runtime import KubeRuntime
from ingate.objectives import ObjectiveStore


def test_namespace_defaults_to_the_downward_api_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAMESPACE", "inference")
    assert KubeOptions(pool_name="p").pool_namespace == "inference"
    monkeypatch.delenv("NAMESPACE")
    assert KubeOptions(pool_name="p").pool_namespace == "default"


@pytest.mark.parametrize(
    ("opts", "flag"),
    [
        (KubeOptions(), "--pool-name or --endpoint-selector"),
        (KubeOptions(pool_name="p", endpoint_selector="a=b"), "--pool-name or --endpoint-selector"),
        (KubeOptions(pool_name="p", pool_group="example.com"), "--pool-group"),
        (KubeOptions(endpoint_selector="app in x", endpoint_target_ports=[8000]), "--endpoint-selector"),
        (KubeOptions(endpoint_selector="app=x", endpoint_target_ports=[]), "--endpoint-target-ports"),
    ],
)
def test_bad_flags_name_the_flag(opts: KubeOptions, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        opts.validate()


def test_builds_discovery_elector_and_rules() -> None:
    o = KubeOptions(pool_name="pool", pool_namespace="ns", leader_election=True)
    d = o.discovery(Datastore(), ObjectiveStore.create())
    assert (d.pool_name, d.namespace) == ("pool", "ns")
    el = o.elector(identity="me")
    assert isinstance(el, LeaseElector) and el.name == lease_name("ns", "pool") == "epp-ns-pool.llm-d.ai"
    assert any("leases" in r["resources"] for r in o.rules())
    assert isinstance(KubeOptions(pool_name="pool").elector(), AlwaysLeader)
    s1 = KubeOptions(endpoint_selector="app=x", endpoint_target_ports=[8000], leader_election=True)
    s2 = KubeOptions(endpoint_selector="app=x", endpoint_target_ports=[8000], leader_election=True)
    e1, e2 = s1.elector(), s2.elector()
    assert isinstance(e1, LeaseElector) and isinstance(e2, LeaseElector) and e1.name == e2.name
    assert [r["resources"] for r in s1.rules()] == [["pods"], ["leases"]]


def test_from_the_upstream_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAMESPACE", "llm")
    o = KubeOptions.from_epp(EppOptions.from_args(["--pool-name", "qwen", "--ha-enable-leader-election"]))
    assert (o.pool_name, o.pool_namespace, o.pool_group, o.leader_election) == (
        "qwen",
        "llm",
        "inference.networking.k8s.io",
        True,
    )
    o.validate()
    o = KubeOptions.from_epp(
        EppOptions.from_args(["-endpointSelector", "app in (a,b)", "-endpointTargetPorts", "8000,8001"])
    )
    assert (o.pool_name, o.endpoint_selector, tuple(o.endpoint_target_ports)) == (
        None,
        "app in (a,b)",
        (8000, 8001),
    )
    o.validate()


async def test_one_shared_client_for_controller_and_elector(tmp_path: Path) -> None:
    async with FakeApiServer(required_rules(leader_election=True)) as server:
        server.apply(pool_obj())
        server.apply(pod_obj("a", "127.0.0.2"))
        o = KubeOptions(
            pool_name=POOL,
            pool_namespace=NS,
            leader_election=True,
            kubeconfig=str(server.write_kubeconfig(tmp_path / "kc", NS)),
        )
        api = await o.connect()
        ds = Datastore()
        d = o.discovery(ds, ObjectiveStore.create(), api=api)
        el = o.elector(identity="epp-0", api=api)
        await d.start()
        await el.start()
        try:
            await d.wait_synced(5)
            await until(lambda: el.is_leader, what="leadership")
            assert [e.address for e in ds.endpoints()] == ["127.0.0.2:8000"]
            lease = server.get("coordination.k8s.io/v1", "Lease", NS, lease_name(NS, POOL))
            assert lease is not None and lease["spec"]["holderIdentity"] == "epp-0"
        finally:
            await el.stop()
            await d.stop()
            await api.close()
        lease = server.get("coordination.k8s.io/v1", "Lease", NS, lease_name(NS, POOL))
        assert lease is not None and lease["spec"]["holderIdentity"] == ""  # released at stop


async def test_runtime_starts_and_stops_in_order(tmp_path: Path) -> None:
    async with FakeApiServer(required_rules(leader_election=True) + RULES) as server:
        server.apply(pool_obj())
        server.apply(pod_obj("a", "127.0.0.2"))
        server.add_user("prom", "prometheus")
        server.grant_nonresource("prometheus")
        o = KubeOptions(
            pool_name=POOL,
            pool_namespace=NS,
            leader_election=True,
            kubeconfig=str(server.write_kubeconfig(tmp_path / "kc", NS)),
        )
        ds = Datastore()
        rt = await KubeRuntime.start(o, ds, ObjectiveStore.create(), metrics_auth=True, identity="epp-0")
        try:
            await until(lambda: rt.synced() and rt.leader(), what="synced and leading")
            assert rt.metrics_auth is not None
            assert (await rt.metrics_auth.check("Bearer prom")).status == 200
        finally:
            await rt.stop()
        lease = server.get("coordination.k8s.io/v1", "Lease", NS, lease_name(NS, POOL))
        assert lease is not None and lease["spec"]["holderIdentity"] == ""
        assert [e.address for e in ds.endpoints()] == ["127.0.0.2:8000"]  # stopping keeps endpoints
        with pytest.raises(ValueError, match="--pool-name"):
            await KubeRuntime.start(KubeOptions(), ds, ObjectiveStore.create())
