"""`--metrics-endpoint-auth`: TokenReview + SubjectAccessReview through the real client, cached."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kubernetes_asyncio import client, config

from ingate.kube.fakeapi import FakeApiServer
from ingate.kube.metrics_auth import RULES, MetricsAuth


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(RULES) as s:
        s.add_user("prom-token", "system:serviceaccount:monitoring:prometheus", ["system:serviceaccounts"])
        s.add_user("other-token", "system:serviceaccount:default:nosy")
        s.grant_nonresource("system:serviceaccount:monitoring:prometheus")
        yield s


async def api(server: FakeApiServer, tmp_path: Path) -> client.ApiClient:
    cfg = client.Configuration()
    kc = server.write_kubeconfig(tmp_path / "kubeconfig")
    await config.load_kube_config(config_file=str(kc), client_configuration=cfg)
    return client.ApiClient(cfg)


async def test_decisions(server: FakeApiServer, tmp_path: Path) -> None:
    async with await api(server, tmp_path) as a:
        auth = MetricsAuth(a)
        assert (await auth.check("Bearer prom-token")).status == 200
        denied = await auth.check("Bearer other-token")
        assert denied.status == 403 and "nosy" in denied.message
        assert (await auth.check("Bearer nope")).status == 401
        assert (await auth.check(None)).status == 401
        assert (await auth.check("Basic dXNlcjpwdw==")).status == 401
        assert (await auth.check("Bearer prom-token", path="/debug/pprof")).status == 403
    used = {(r.verb, r.group, r.resource) for r in server.requests}
    assert used == {
        (v, g, r)
        for rule in RULES
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert all(r.allowed for r in server.requests)


async def test_cached_within_ttls_and_through_an_api_outage(server: FakeApiServer, tmp_path: Path) -> None:
    clock = Clock()
    async with await api(server, tmp_path) as a:
        auth = MetricsAuth(a, clock=clock)
        assert (await auth.check("Bearer prom-token")).status == 200
        assert (await auth.check("Bearer other-token")).status == 403
        calls = len(server.requests)
        for _ in range(10):
            assert (await auth.check("Bearer prom-token")).status == 200
            assert (await auth.check("Bearer other-token")).status == 403
        assert len(server.requests) == calls  # every answer from the cache
        await server.stop()
        clock.t += 20  # within all TTLs: scraping goes on while the API server is away
        assert (await auth.check("Bearer prom-token")).status == 200
        assert (await auth.check("Bearer new-token")).status == 401  # unknown and unverifiable
        await server.start()
        server.grant_nonresource("system:serviceaccount:default:nosy")
        clock.t += 20  # deny TTL (30 s) passed, token TTL (60 s) not: one access review
        assert (await auth.check("Bearer other-token")).status == 200
        assert [r.resource for r in server.requests[calls:]] == ["subjectaccessreviews"]


async def test_picker_without_the_cluster_role_answers_401(tmp_path: Path) -> None:
    async with FakeApiServer([]) as s:
        s.add_user("prom-token", "prometheus")
        async with await api(s, tmp_path) as a:
            d = await MetricsAuth(a).check("Bearer prom-token")
        assert d.status == 401 and d.message == "Authentication failed"
