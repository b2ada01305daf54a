"""KubeOptions: upstream's flags -> controller, elector and Role."""

from __future__ import annotations

import pytest

from ingate.datastore import Datastore
from ingate.epp_flags import EppOptions
from ingate.kube.leader import AlwaysLeader, LeaseElector
from ingate.kube.options import KubeOptions, lease_name
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
