"""The fake API server speaks the wire protocol the real client library expects (kubernetes_asyncio).

Everything here goes through the real client and a real kubeconfig file, so a field or status code the
client would not accept from a real API server fails these tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from ingate.kube.fakeapi import FakeApiServer, role_rules


def pod(name: str, ip: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "ns", "labels": labels or {"app": "vllm"}},
        "spec": {"containers": [{"name": "c", "image": "vllm"}]},
        "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(bookmark_interval=0.2) as s:
        yield s


async def api_client(server: FakeApiServer, tmp_path: Path) -> client.ApiClient:
    cfg = client.Configuration()
    await config.load_kube_config(
        config_file=str(server.write_kubeconfig(tmp_path / "kubeconfig", "ns")), client_configuration=cfg
    )
    return client.ApiClient(cfg)


async def test_list_with_label_selector_and_resource_version(server: FakeApiServer, tmp_path: Path) -> None:
    server.apply(pod("a", "10.0.0.1"))
    server.apply(pod("b", "10.0.0.2", {"app": "other"}))
    async with await api_client(server, tmp_path) as api:
        pods = await client.CoreV1Api(api).list_namespaced_pod("ns", label_selector="app=vllm")
        assert [p.metadata.name for p in pods.items] == ["a"]
        assert pods.items[0].status.pod_ip == "10.0.0.1"
        assert int(pods.metadata.resource_version) >= int(pods.items[0].metadata.resource_version)
        server.compact()
        with pytest.raises(ApiException) as e:
            await client.CoreV1Api(api).list_namespaced_pod("ns", resource_version="1")
        assert e.value.status == 410


async def test_watch_streams_events_bookmarks_and_410(server: FakeApiServer, tmp_path: Path) -> None:
    server.apply(pod("a", "10.0.0.1"))
    async with await api_client(server, tmp_path) as api:
        core = client.CoreV1Api(api)
        rv = (await core.list_namespaced_pod("ns")).metadata.resource_version
        seen: list[tuple[str, str]] = []

        async def consume() -> None:
            w = watch.Watch()
            async for ev in w.stream(
                core.list_namespaced_pod,
                "ns",
                label_selector="app=vllm",
                resource_version=rv,
                allow_watch_bookmarks=True,
                timeout_seconds=5,
            ):
                name = ev["raw_object"]["metadata"].get("name", "")
                seen.append((ev["type"], name))
                if ev["type"] == "DELETED":
                    w.stop()

        task = asyncio.create_task(consume())
        for _ in range(50):
            if server.watch_count():
                break
            await asyncio.sleep(0.02)
        server.apply(pod("b", "10.0.0.2"))
        server.apply(pod("a", "10.0.0.3"))
        server.apply(pod("b", "10.0.0.2", {"app": "other"}))  # leaves the selector: DELETED
        await asyncio.sleep(0.5)
        await asyncio.wait_for(task, 5)
        events = [e for e in seen if e[0] != "BOOKMARK"]
        assert events == [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]

        # a watch from a compacted revision gets an ERROR event with a 410 Status
        server.compact()
        w = watch.Watch()
        with pytest.raises(ApiException) as e:
            async for _ in w.stream(core.list_namespaced_pod, "ns", resource_version=rv, timeout_seconds=2):
                pass
        assert e.value.status == 410


async def test_bookmarks_carry_the_current_revision(server: FakeApiServer, tmp_path: Path) -> None:
    async with await api_client(server, tmp_path) as api:
        core = client.CoreV1Api(api)
        rv = (await core.list_namespaced_pod("ns")).metadata.resource_version
        server.apply(pod("other-ns-irrelevant", "10.0.0.9", {"app": "x"}))
        w = watch.Watch()
        async for ev in w.stream(
            core.list_namespaced_pod,
            "ns",
            label_selector="app=vllm",
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=3,
        ):
            assert ev["type"] == "BOOKMARK"
            assert int(ev["raw_object"]["metadata"]["resourceVersion"]) > int(rv)
            w.stop()
            break


async def test_optimistic_concurrency_on_update(server: FakeApiServer, tmp_path: Path) -> None:
    async with await api_client(server, tmp_path) as api:
        coord = client.CoordinationV1Api(api)
        lease = client.V1Lease(
            metadata=client.V1ObjectMeta(name="l", namespace="ns"),
            spec=client.V1LeaseSpec(holder_identity="a", lease_duration_seconds=15),
        )
        created = await coord.create_namespaced_lease("ns", lease)
        with pytest.raises(ApiException) as e:
            await coord.create_namespaced_lease("ns", lease)
        assert e.value.status == 409
        created.spec.holder_identity = "b"
        updated = await coord.replace_namespaced_lease("l", "ns", created)
        assert updated.spec.holder_identity == "b"
        assert int(updated.metadata.resource_version) > int(created.metadata.resource_version)
        created.spec.holder_identity = "c"  # stale resourceVersion
        with pytest.raises(ApiException) as e:
            await coord.replace_namespaced_lease("l", "ns", created)
        assert e.value.status == 409 and "modified" in e.value.body
        with pytest.raises(ApiException) as e:
            await coord.read_namespaced_lease("nope", "ns")
        assert e.value.status == 404


async def test_custom_objects_both_generations(server: FakeApiServer, tmp_path: Path) -> None:
    async with await api_client(server, tmp_path) as api:
        co = client.CustomObjectsApi(api)
        for group in ("llm-d.ai", "inference.networking.x-k8s.io"):
            await co.create_namespaced_custom_object(
                group,
                "v1alpha2",
                "ns",
                "inferenceobjectives",
                {
                    "apiVersion": f"{group}/v1alpha2",
                    "kind": "InferenceObjective",
                    "metadata": {"name": "critical"},
                    "spec": {"priority": 5, "poolRef": {"name": "pool"}},
                },
            )
            got = await co.list_namespaced_custom_object(group, "v1alpha2", "ns", "inferenceobjectives")
            assert [o["spec"]["priority"] for o in got["items"]] == [5]
            assert got["items"][0]["apiVersion"] == f"{group}/v1alpha2"
        with pytest.raises(ApiException) as e:  # a group/version the server does not serve
            await co.list_namespaced_custom_object("example.com", "v1", "ns", "things")
        assert e.value.status == 404


async def test_rbac_forbids_what_the_role_does_not_grant(tmp_path: Path) -> None:
    rules = role_rules([("", "pods", ["get", "list", "watch"])])
    async with FakeApiServer(rules) as server:
        async with await api_client(server, tmp_path) as api:
            core = client.CoreV1Api(api)
            await core.list_namespaced_pod("ns")
            with pytest.raises(ApiException) as e:
                await core.create_namespaced_event(
                    "ns", client.CoreV1Event(metadata=client.V1ObjectMeta(name="e"), involved_object={})
                )
            assert e.value.status == 403 and "cannot create" in e.value.body
        assert [(r.verb, r.resource, r.allowed) for r in server.requests] == [
            ("list", "pods", True),
            ("create", "events", False),
        ]


async def test_wrong_token_is_unauthorized(server: FakeApiServer, tmp_path: Path) -> None:
    api = await api_client(server, tmp_path)
    server.token = "another"
    async with api:
        with pytest.raises(ApiException) as e:
            await client.CoreV1Api(api).list_namespaced_pod("ns")
        assert e.value.status == 401


async def test_restart_on_same_port_keeps_state(server: FakeApiServer, tmp_path: Path) -> None:
    server.apply(pod("a", "10.0.0.1"))
    port = server.port
    await server.stop()
    await server.start()
    assert server.port == port
    async with await api_client(server, tmp_path) as api:
        pods = await client.CoreV1Api(api).list_namespaced_pod("ns")
        assert [p.metadata.name for p in pods.items] == ["a"]
