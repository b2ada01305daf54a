"""Lease leader election against the fake API server (real client, kubeconfig, RBAC of required_rules)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubefixtures import NS, until

from ingate.kube.controller import required_rules
from ingate.kube.fakeapi import FakeApiServer
from ingate.kube.leader import AlwaysLeader, LeaseElector, default_identity, make_elector

FAST: dict[str, Any] = {"lease_duration_s": 1.0, "renew_deadline_s": 0.6, "retry_period_s": 0.1}


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(required_rules(leader_election=True)) as s:
        yield s


def elector(server: FakeApiServer, tmp_path: Path, ident: str, **kw: Any) -> LeaseElector:
    kc = server.write_kubeconfig(tmp_path / f"kc-{ident}", NS)
    return LeaseElector(NS, "ingate-epp", ident, kubeconfig=str(kc), **{**FAST, **kw})


async def test_one_leader_and_graceful_handover(server: FakeApiServer, tmp_path: Path) -> None:
    a, b = elector(server, tmp_path, "a"), elector(server, tmp_path, "b")
    await a.start()
    await until(lambda: a.is_leader, what="a leads")
    await b.start()
    await asyncio.sleep(0.5)
    assert a.is_leader and not b.is_leader and b.leader_identity == "a"
    lease = server.get("coordination.k8s.io/v1", "Lease", NS, "ingate-epp")
    assert lease is not None and lease["spec"]["holderIdentity"] == "a"
    t0 = time.monotonic()
    await a.stop()  # releases the Lease
    await until(lambda: b.is_leader, what="b takes over")
    assert time.monotonic() - t0 < 0.5  # at once, not after a lease duration
    lease = server.get("coordination.k8s.io/v1", "Lease", NS, "ingate-epp")
    assert (
        lease is not None
        and lease["spec"]["holderIdentity"] == "b"
        and lease["spec"]["leaseTransitions"] == 1
    )
    await b.stop()


async def test_unreleased_lease_is_taken_after_its_duration(server: FakeApiServer, tmp_path: Path) -> None:
    a, b = elector(server, tmp_path, "a"), elector(server, tmp_path, "b")
    await a.start()
    await until(lambda: a.is_leader, what="a leads")
    await b.start()
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    await a.stop(release=False)  # renewals stop abruptly
    await until(lambda: b.is_leader, within_s=3, what="b takes over")
    took = time.monotonic() - t0
    assert 0.6 < took < FAST["lease_duration_s"] + 2 * FAST["retry_period_s"] + 0.3
    await b.stop()


async def test_racing_candidates_elect_exactly_one(server: FakeApiServer, tmp_path: Path) -> None:
    els = [elector(server, tmp_path, f"c{i}") for i in range(4)]
    await asyncio.gather(*(e.start() for e in els))
    await until(lambda: any(e.is_leader for e in els), what="a leader")
    for _ in range(20):
        assert sum(e.is_leader for e in els) == 1
        await asyncio.sleep(0.05)
    assert any(r.verb == "update" and r.resource == "leases" for r in server.requests)
    for e in els:
        await e.stop()


async def test_leader_steps_down_when_it_cannot_renew(server: FakeApiServer, tmp_path: Path) -> None:
    stopped: list[float] = []
    a = elector(server, tmp_path, "a", on_stopped_leading=lambda: stopped.append(time.monotonic()))
    await a.start()
    await until(lambda: a.is_leader, what="a leads")
    t0 = time.monotonic()
    await server.stop()  # the API server goes away
    await until(lambda: not a.is_leader, within_s=3, what="a steps down")
    assert stopped and FAST["renew_deadline_s"] - 0.2 < stopped[0] - t0 < FAST["lease_duration_s"]
    await server.start()
    await until(lambda: a.is_leader, within_s=3, what="a leads again")
    await a.stop()


async def test_active_active_mode_is_always_leader() -> None:
    started: list[bool] = []
    el = make_elector("active-active", NS, "x", on_started_leading=lambda: started.append(True))
    assert isinstance(el, AlwaysLeader)
    await el.start()
    assert el.is_leader and started == [True]
    await el.stop()
    assert not el.is_leader


def test_timings_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="renew deadline"):
        LeaseElector(NS, "x", "a", lease_duration_s=1, renew_deadline_s=2, retry_period_s=0.1)


def test_identity_is_the_pod_name_when_known(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "epp-7d9c-abcde")
    assert default_identity() == "epp-7d9c-abcde"
    monkeypatch.delenv("POD_NAME")
    monkeypatch.setenv("HOSTNAME", "host")
    a, b = default_identity(), default_identity()
    assert a.startswith("host_") and a != b


async def test_timing_flags_set_the_lease_and_the_takeover(server: FakeApiServer, tmp_path: Path) -> None:
    from ingate.epp_flags import EppOptions
    from ingate.kube.options import KubeOptions

    flags = [
        "--pool-name=pool",
        f"--pool-namespace={NS}",
        "--ha-enable-leader-election",
        "--ingate-leader-election-lease-duration=2s",
        "--ingate-leader-election-renew-deadline=1500ms",
        "--ingate-leader-election-retry-period=100ms",
    ]
    kc = str(server.write_kubeconfig(tmp_path / "kc", NS))
    opts = KubeOptions.from_epp(EppOptions.from_args(flags), kubeconfig=kc)
    assert (opts.lease_duration_s, opts.renew_deadline_s, opts.retry_period_s) == (2.0, 1.5, 0.1)
    defaults = KubeOptions.from_epp(EppOptions.from_args(["--pool-name=pool"]))
    assert (defaults.lease_duration_s, defaults.renew_deadline_s, defaults.retry_period_s) == (
        15.0,
        10.0,
        2.0,
    )
    a, b = opts.elector(identity="a"), opts.elector(identity="b")
    assert isinstance(a, LeaseElector) and isinstance(b, LeaseElector)
    await a.start()
    await until(lambda: a.is_leader, what="a leads")
    await b.start()
    lease = server.get("coordination.k8s.io/v1", "Lease", NS, "epp-ns-pool.llm-d.ai")
    assert lease is not None and lease["spec"]["leaseDurationSeconds"] == 2
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    await a.stop(release=False)
    await until(lambda: b.is_leader, within_s=4, what="b takes over")
    took = time.monotonic() - t0
    assert 1.4 < took < 2.0 + 2 * 0.1 + 0.4, took  # the 2 s lease, not the 15 s default
    await b.stop()
