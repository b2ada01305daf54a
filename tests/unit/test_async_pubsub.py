"""The Google Cloud Pub/Sub queue backend on the real Pub/Sub emulator (skipped where the Cloud SDK's
emulator or Java is missing), with each ledger (SQLite file, real redis-server): leases as ack
deadlines, redelivery counted as an attempt, delayed retries, one result per id published to the
result topic, dead letters, attributes merged into metadata, and a result recorded by a processor
that died before publishing it is published on redelivery."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import async_backends
import orjson
import pytest

from ingate.asyncproc.backends import open_backend
from ingate.asyncproc.backends.base import QueueBackend
from ingate.asyncproc.models import AsyncResult
from ingate.asyncproc.pubsublocal import emulator_binary, local_pubsub

redis_url, open_queue = async_backends.redis_url, async_backends.open_queue
PROJECT = "ingate-test"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if emulator_binary() is None:
        pytest.skip("the Pub/Sub emulator (Cloud SDK pubsub-emulator) or Java is not installed here")
    old = os.environ.get("PUBSUB_EMULATOR_HOST")
    with local_pubsub(tmp_path_factory.mktemp("pubsub")) as host:
        os.environ["PUBSUB_EMULATOR_HOST"] = host
        try:
            yield host
        finally:
            if old is None:
                os.environ.pop("PUBSUB_EMULATOR_HOST", None)
            else:
                os.environ["PUBSUB_EMULATOR_HOST"] = old


@pytest.fixture(params=["sqlite-ledger", "redis-ledger"])
def queue_url(request: pytest.FixtureRequest, emulator: str, tmp_path: Path) -> str:
    name = f"t{uuid.uuid4().hex[:8]}"
    if request.param == "redis-ledger":
        ledger = request.getfixturevalue("redis_url") + f"?name={name}"
    else:
        ledger = str(tmp_path / "ledger.db")
    return (
        f"pubsub://{PROJECT}/{name}-sub?topic={name}&results={name}-results&dead={name}-dead"
        f"&create=1&ledger={ledger}"
    )


def topic_messages(queue_url: str, topic_param: str) -> Callable[[], list[dict[str, object]]]:
    """A subscription on the result (or dead-letter) topic, made now; returns a reader of what arrived."""
    from google.cloud import pubsub_v1

    name = queue_url.split(f"{topic_param}=")[1].split("&")[0]
    sub = pubsub_v1.SubscriberClient()
    pub = pubsub_v1.PublisherClient()
    topic = pub.topic_path(PROJECT, name)
    try:
        pub.create_topic(name=topic)
    except Exception:
        pass
    path = sub.subscription_path(PROJECT, f"{name}-reader")
    sub.create_subscription(name=path, topic=topic)

    def read() -> list[dict[str, object]]:
        got = sub.pull(request={"subscription": path, "max_messages": 100}, timeout=2).received_messages
        if got:
            sub.acknowledge(request={"subscription": path, "ack_ids": [m.ack_id for m in got]})
        return [orjson.loads(m.message.data) for m in got]

    return read


def msg(i: str, **extra: object) -> bytes:
    return orjson.dumps({"id": i, "deadline": 4_102_444_800, "payload": {"prompt": "x"}, **extra})


def rid(d: object) -> str:
    return str(orjson.loads(d.body)["id"])  # type: ignore[attr-defined]


async def test_lease_redelivery_attempts_and_one_published_result(
    open_queue: Callable[[], QueueBackend], queue_url: str
) -> None:
    dead, live = open_queue(), open_queue()
    assert await dead.submit([msg("a"), msg("b")]) == 2
    results = topic_messages(queue_url, "results")
    got = await dead.claim(5, lease_s=2)
    assert sorted(map(rid, got)) == ["a", "b"] and all(d.attempts == 0 for d in got)
    assert await live.claim(5, lease_s=2) == []
    assert await live.backlog() == 2 and await live.status("a") == "in_progress"
    a = next(d for d in got if rid(d) == "a")
    await asyncio.sleep(1.2)
    assert await dead.extend(a.key, 3)  # "a" renewed, "b" not
    await asyncio.sleep(1.3)
    (b,) = await live.claim(5, lease_s=5)
    assert rid(b) == "b" and b.attempts == 1  # the abandoned delivery counted
    assert await live.complete(b.key, AsyncResult.http("b", 200, b"first"))
    old_b = next(d for d in got if rid(d) == "b")
    assert not await dead.complete(old_b.key, AsyncResult.http("b", 200, b"second"))
    assert await dead.complete(a.key, AsyncResult.http("a", 200, b"ok"))
    r = await live.get_result("b")
    assert r is not None and r.payload == "first" and await live.status("b") == "completed"
    assert sorted([x.id async for x in live.results()]) == ["a", "b"]
    assert await live.backlog() == 0
    published = results()
    # Every outcome on the result topic in llm-d-async's result format; "b" only with its first result.
    assert {(m["id"], m["payload"]) for m in published} == {("a", "ok"), ("b", "first")}
    assert all(m["status_code"] == 200 for m in published)


async def test_delayed_retry_dead_letter_and_late_duplicate(
    open_queue: Callable[[], QueueBackend], queue_url: str
) -> None:
    q = open_queue()
    dead_topic = topic_messages(queue_url, "dead")
    await q.submit([msg("a")])
    (d,) = await q.claim(1, 30)
    await q.retry(d.key, 1.0, count_attempt=False, error="shed")
    assert await q.claim(1, 30) == []
    assert await q.status("a") == "queued" and await q.backlog() == 1
    await asyncio.sleep(1.3)
    (d,) = await q.claim(1, 30)
    assert d.attempts == 0  # a shed is not a failure
    await q.retry(d.key, 0.0, count_attempt=True, error="500 boom")
    (d,) = await q.claim(1, 30)
    assert d.attempts == 1
    await q.dead_letter(d.key, "a", "after 2 attempts: 500 boom")
    (dl,) = await q.dead_letters()
    assert (dl.id, dl.attempts, dl.error) == ("a", 2, "after 2 attempts: 500 boom")
    assert await q.status("a") == "dead_lettered" and await q.has_result("a")
    (pub,) = dead_topic()
    assert pub["id"] == "a" and pub["attempts"] == 2
    await q.submit([msg("a")])  # a late duplicate cannot add a result next to the dead letter
    (d,) = await q.claim(1, 30)
    assert not await q.complete(d.key, AsyncResult.http("a", 200, b"late"))
    assert await q.get_result("a") is None and await q.backlog() == 0


async def test_attributes_become_metadata_and_malformed_bodies_pass_through(
    open_queue: Callable[[], QueueBackend], queue_url: str
) -> None:
    from google.cloud import pubsub_v1

    q = open_queue()
    await q.submit([msg("m", metadata={"userid": "own"})])
    pub = pubsub_v1.PublisherClient()
    topic = pub.topic_path(PROJECT, queue_url.split("topic=")[1].split("&")[0])
    pub.publish(topic, msg("attr"), userid="alice", team="x").result()
    pub.publish(topic, b"{not json", userid="bob").result()
    got = []
    for _ in range(20):
        got += await q.claim(5, 30)
        if len(got) == 3:
            break
    bodies = {d.body for d in got}
    assert b"{not json" in bodies  # left for the processor to answer INVALID_REQUEST
    docs = {orjson.loads(b)["id"]: orjson.loads(b) for b in bodies if b != b"{not json"}
    assert docs["attr"]["metadata"] == {"userid": "alice", "team": "x"}
    assert docs["m"]["metadata"] == {"userid": "own"}


async def test_result_recorded_before_a_crash_is_published_on_redelivery(
    open_queue: Callable[[], QueueBackend], queue_url: str
) -> None:
    first, second = open_queue(), open_queue()
    results = topic_messages(queue_url, "results")
    await first.submit([msg("c")])
    (_d,) = await first.claim(1, lease_s=1)
    # The processor recorded the result and died before publishing and acknowledging it.
    assert await first.ledger.record_result(AsyncResult.http("c", 200, b"done"))  # type: ignore[attr-defined]
    await asyncio.sleep(1.3)
    (again,) = await second.claim(1, lease_s=30)
    assert await second.has_result("c")  # the processor sees the outcome and acknowledges
    await second.ack(again.key)
    (m,) = results()
    assert (m["id"], m["payload"]) == ("c", "done")
    assert await second.backlog() == 0


def test_bad_pubsub_urls() -> None:
    with pytest.raises(ValueError, match="results=TOPIC"):
        open_backend("pubsub://proj/sub")
    with pytest.raises(ValueError, match="PROJECT/SUBSCRIPTION"):
        open_backend("pubsub://proj?results=r")
