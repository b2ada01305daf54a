"""Queue-backend fixtures for the async processor tests: SQLite in tmp_path, and a real redis-server
started once per test module (a plain module, imported by name; see loopback_http.py for why)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from ingate.asyncproc.backends import open_backend
from ingate.asyncproc.backends.base import QueueBackend
from ingate.asyncproc.redislocal import local_redis, local_redis_cluster, redis_binary


def need_redis() -> None:
    """Skip (or fail in CI, where `make test` installs it) when redis-server is missing."""
    if redis_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing in CI: `make test` installs it (apt-get) when run as root")
        pytest.skip(
            "redis-server is not installed (apt-get install -y redis-server; `make test` does it as root)"
        )


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    need_redis()
    with local_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="module")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real three-primary Redis Cluster (``...?cluster=1``)."""
    need_redis()
    with local_redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as url:
        yield url


def fresh_queue_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh queue of the backend ``request.param`` names: a new SQLite file, a new stream or a new
    llm-d-async sorted-set layout on the module's Redis, or on the module's Redis Cluster."""
    if request.param == "sqlite":
        return str(tmp_path / "q.db")
    name = f"t-{uuid.uuid4().hex[:8]}"
    if request.param == "redis-cluster":
        return request.getfixturevalue("redis_cluster_url") + f"&stream={name}&group={name}"
    if request.param == "llmd-sortedset-cluster":
        cluster = request.getfixturevalue("redis_cluster_url").replace("redis://", "redis-sortedset://")
        return cluster + f"&queue={{{name}}}q&results={{{name}}}results&retry={{{name}}}retry"
    url: str = request.getfixturevalue("redis_url")
    if request.param == "llmd-sortedset":
        return (
            url.replace("redis://", "redis-sortedset://")
            + f"?queue={name}&results={name}-results&retry={name}-retry"
        )
    return f"{url}?stream={name}&group={name}"


BACKENDS = ["sqlite", "redis", "llmd-sortedset"]
CLUSTER_BACKENDS = ["redis-cluster", "llmd-sortedset-cluster"]


@pytest.fixture(params=BACKENDS)
def queue_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh queue of each backend (see :func:`fresh_queue_url`)."""
    return fresh_queue_url(request, tmp_path)


@pytest.fixture
async def open_queue(queue_url: str) -> AsyncIterator[Callable[[], QueueBackend]]:
    """Factory of backends on the test's queue (each a separate consumer); all closed at teardown."""
    made: list[QueueBackend] = []

    def make() -> QueueBackend:
        q = open_backend(queue_url)
        made.append(q)
        return q

    yield make
    for q in made:
        await q.close()
