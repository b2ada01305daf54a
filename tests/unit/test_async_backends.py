"""Queue backends (SQLite file, real Redis Streams and sorted sets, on one server and on a Redis
Cluster): leases, redelivery, one outcome per id, delayed
retries, dead letters, several consumers on one queue. Every test runs against each backend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import async_backends
import orjson
import pytest

from ingate.asyncproc.backends.base import QueueBackend
from ingate.asyncproc.backends.sqlite import SqliteBackend
from ingate.asyncproc.models import AsyncResult

Open = Callable[[], QueueBackend]
# The shared fixtures: every test here runs on SQLite, on a real redis-server and on a real
# three-primary Redis Cluster.
redis_url, redis_cluster_url, open_queue = (
    async_backends.redis_url,
    async_backends.redis_cluster_url,
    async_backends.open_queue,
)


@pytest.fixture(params=async_backends.BACKENDS + async_backends.CLUSTER_BACKENDS)
def queue_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return async_backends.fresh_queue_url(request, tmp_path)


def msg(i: str, deadline: float = 4_102_444_800.0) -> bytes:
    return orjson.dumps({"id": i, "deadline": deadline, "payload": {"prompt": i}})


def ids(ds: list) -> list[str]:  # type: ignore[type-arg]
    return sorted(orjson.loads(d.body)["id"] for d in ds)


async def test_claim_hides_expired_lease_redelivers_and_counts_an_attempt(
    open_queue: Open, queue_url: str
) -> None:
    dead, live = open_queue(), open_queue()  # two consumers; "dead" stops renewing
    assert await dead.submit([msg("a"), msg("b")]) == 2
    got = await dead.claim(5, lease_s=0.4)
    assert ids(got) == ["a", "b"] and all(d.attempts == 0 for d in got)
    assert await live.claim(5, lease_s=0.4) == []
    assert await live.backlog() == 2
    # The llm-d-async layout keeps no id -> member index, so claimed messages report "queued" there.
    assert await live.status("a") in (("queued",) if "sortedset" in queue_url else ("in_progress",))
    a = next(d for d in got if orjson.loads(d.body)["id"] == "a")
    await asyncio.sleep(0.25)
    assert await dead.extend(a.key, 0.4)  # "a" renewed, "b" not
    await asyncio.sleep(0.25)
    (b,) = await live.claim(5, lease_s=0.4)
    assert orjson.loads(b.body)["id"] == "b" and b.attempts == 1  # the abandoned delivery counted
    assert not await dead.extend(b.key, 5)  # the old owner lost it
    # Both consumers finish "b": one result only, the first.
    assert await live.complete(b.key, AsyncResult.http("b", 200, b"first"))
    old_b = next(d for d in got if orjson.loads(d.body)["id"] == "b")
    assert not await dead.complete(old_b.key, AsyncResult.http("b", 200, b"second"))
    r = await live.get_result("b")
    assert r is not None and r.payload == "first"
    assert await live.status("b") == "completed"
    assert await dead.complete(a.key, AsyncResult.http("a", 200, b"ok"))
    assert sorted([x.id async for x in live.results()]) == ["a", "b"]
    assert await live.backlog() == 0


async def test_delayed_retry_attempts_and_dead_letter_is_final(open_queue: Open) -> None:
    q = open_queue()
    await q.submit([msg("a")])
    (d,) = await q.claim(1, 30)
    await q.retry(d.key, 0.3, count_attempt=False, error="shed")
    assert await q.claim(1, 30) == []
    assert await q.status("a") == "queued" and await q.backlog() == 1
    await asyncio.sleep(0.35)
    (d,) = await q.claim(1, 30)
    assert d.attempts == 0  # a shed is not a failure
    await q.retry(d.key, 0.0, count_attempt=True, error="500 boom")
    (d,) = await q.claim(1, 30)
    assert d.attempts == 1
    await q.dead_letter(d.key, "a", "after 2 attempts: 500 boom")
    (dl,) = await q.dead_letters()
    assert (dl.id, dl.attempts, dl.error) == ("a", 2, "after 2 attempts: 500 boom")
    assert orjson.loads(dl.body)["id"] == "a"
    assert await q.status("a") == "dead_lettered" and await q.has_result("a")
    # A late duplicate of the same id cannot add a result next to the dead letter.
    await q.submit([msg("a")])
    (d,) = await q.claim(1, 30)
    assert not await q.complete(d.key, AsyncResult.http("a", 200, b"late"))
    assert await q.get_result("a") is None and await q.backlog() == 0


async def test_cancel_ack_and_unknown_ids(open_queue: Open) -> None:
    q = open_queue()
    assert await q.status("nope") is None
    assert not await q.is_cancelled("x")
    await q.cancel("x")
    await q.cancel("x")
    assert await q.is_cancelled("x")
    await q.submit([msg("dup")])
    (d,) = await q.claim(1, 30)
    await q.ack(d.key)
    assert await q.backlog() == 0 and await q.get_result("dup") is None


async def test_concurrent_consumers_never_share_a_claim(open_queue: Open) -> None:
    n = 300
    await open_queue().submit([msg(f"m{i}") for i in range(n)])
    consumers = [open_queue() for _ in range(3)]
    claimed: list[list[str]] = [[] for _ in consumers]

    async def drain(i: int) -> None:
        q = consumers[i]
        while True:
            got = await q.claim(7, lease_s=60)
            if not got:
                return
            for d in got:
                rid = orjson.loads(d.body)["id"]
                claimed[i].append(rid)
                assert await q.complete(d.key, AsyncResult.http(rid, 200, b"ok"))

    await asyncio.gather(*(drain(i) for i in range(3)))
    everything = [x for c in claimed for x in c]
    assert sorted(everything) == sorted(f"m{i}" for i in range(n))  # each exactly once
    assert len([r async for r in consumers[0].results()]) == n
    assert await consumers[1].backlog() == 0


async def test_sqlite_claims_earliest_deadline_first(tmp_path: Path) -> None:
    q = SqliteBackend(tmp_path / "q.db")
    try:
        await q.submit([msg("late", 3e9), msg("soon", 1.5e9), b"garbage", msg("mid", 2e9)])
        got = await q.claim(3, lease_s=10)
        # Malformed messages sort first (deadline 0) so they are answered at once.
        assert [d.body if d.body == b"garbage" else orjson.loads(d.body)["id"] for d in got] == [
            b"garbage",
            "soon",
            "mid",
        ]
        assert all(abs(d.enqueued_at - time.time()) < 60 for d in got)
    finally:
        await q.close()


async def test_llmd_sortedset_reads_upstream_members_and_writes_upstream_results(redis_url: str) -> None:
    """Members as llm-d-async's producer writes them; results and retries where its consumers look."""
    import redis.asyncio as aioredis

    from ingate.asyncproc.backends import open_backend

    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    q = open_backend(redis_url.replace("redis://", "redis-sortedset://") + "?queue=rq&results=res&retry=rt")
    try:
        deadline = int(time.time()) + 600
        data = {"id": "u1", "created": int(time.time()), "deadline": deadline, "payload": {"prompt": "p"}}
        upstream = {
            "internal": {"request_token": "tok", "result_queue_name": "tenant-results"},
            "request_kind": "redis",
            "data": {**data, "result_queue_name": "tenant-results"},
        }
        member = orjson.dumps(upstream).decode()
        await r.zadd("rq", {member: deadline})
        (d,) = await q.claim(1, 30)
        assert orjson.loads(d.body)["id"] == "u1" and await r.zcard("rq") == 0
        # A retry parks the member in the retry set, scored by its due time, retry_count + 1.
        await q.retry(d.key, 0.2, count_attempt=True, error="500")
        ((parked, due),) = await r.zrange("rt", 0, -1, withscores=True)
        assert time.time() < due < time.time() + 1
        parked_doc = orjson.loads(parked)
        assert parked_doc["internal"]["retry_count"] == 1 and parked_doc["internal"]["request_token"] == "tok"
        assert parked_doc["data"] == upstream["data"] and parked_doc["request_kind"] == "redis"
        await asyncio.sleep(0.25)
        (d,) = await q.claim(1, 30)
        assert d.attempts == 1
        assert await r.zcard("rt") == 0
        assert await q.complete(d.key, AsyncResult.http("u1", 200, b'{"choices": []}'))
        # The result went to the message's own result list, in llm-d-async's result shape.
        assert await r.llen("res") == 0
        (pushed,) = await r.lrange("tenant-results", 0, -1)
        assert orjson.loads(pushed) == {"id": "u1", "status_code": 200, "payload": '{"choices": []}'}
        assert await q.backlog() == 0
        # A cancellation marker set the way upstream's producer does is honoured.
        await r.set("request-cancel:u2", "tok2")
        assert await q.is_cancelled("u2")
    finally:
        await q.close()
        await r.aclose()


async def test_cluster_keeps_every_key_of_a_queue_in_one_slot(redis_cluster_url: str) -> None:
    import redis.asyncio as aioredis
    from redis.crc import key_slot

    from ingate.asyncproc.backends import open_backend

    q = open_backend(redis_cluster_url + "&stream=jobs&group=g")
    try:
        await q.submit([msg("a"), msg("b"), b"{not json"])
        (d, *_) = await q.claim(1, lease_s=30)
        await q.complete(d.key, AsyncResult("a", 200, "{}"))
        (d2, *_) = await q.claim(1, lease_s=30)
        await q.retry(d2.key, 60, count_attempt=True, error="x")
        await q.cancel("b")
    finally:
        await q.close()
    # Every key the queue wrote, found on whichever primary holds it.
    keys: list[bytes] = []
    nodes = aioredis.RedisCluster.from_url(redis_cluster_url.split("?")[0])
    try:
        await nodes.initialize()
        assert len(nodes.get_primaries()) == 3
        for node in nodes.get_primaries():
            keys += await nodes.keys("*jobs*", target_nodes=node)
    finally:
        await nodes.aclose()
    assert len(keys) >= 5 and all(k.startswith(b"{jobs}") for k in keys), keys
    assert {key_slot(k) for k in keys} == {key_slot(b"{jobs}")}


def test_cluster_queue_urls_are_checked() -> None:
    from ingate.asyncproc.backends import open_backend

    with pytest.raises(ValueError, match=r"share a hash slot.*queue='request-sortedset'"):
        open_backend("redis-sortedset://127.0.0.1:1/0?cluster=1")  # llm-d-async's untagged names
    with pytest.raises(ValueError, match="cluster='maybe'"):
        open_backend("redis://127.0.0.1:1/0?cluster=maybe")
