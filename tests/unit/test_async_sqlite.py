"""The embedded SQLite queue: leases, redelivery, one outcome per id, several consumers on one file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from ingate.asyncproc.backends.sqlite import SqliteBackend
from ingate.asyncproc.models import AsyncResult


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def msg(i: str, deadline: float = 2_000_000.0) -> bytes:
    return orjson.dumps({"id": i, "deadline": deadline, "payload": {"prompt": i}})


async def test_claim_earliest_deadline_first_and_lease_hides(tmp_path: Path) -> None:
    clock = Clock()
    q = SqliteBackend(tmp_path / "q.db", clock=clock)
    try:
        assert await q.submit([msg("late", 3e6), msg("soon", 1.5e6), b"garbage", msg("mid", 2e6)]) == 4
        got = await q.claim(3, lease_s=10)
        # Malformed messages sort first (deadline 0) so they are answered at once.
        assert [orjson.loads(d.body).get("id") if d.body != b"garbage" else "?" for d in got] == [
            "?",
            "soon",
            "mid",
        ]
        assert all(d.attempts == 0 and d.enqueued_at == clock.t for d in got)
        assert [orjson.loads(d.body)["id"] for d in await q.claim(10, lease_s=10)] == ["late"]
        assert await q.claim(10, lease_s=10) == []
        assert await q.backlog() == 4
        assert await q.status("soon") == "in_progress"
    finally:
        await q.close()


async def test_expired_lease_redelivers_and_counts_an_attempt(tmp_path: Path) -> None:
    clock = Clock()
    dead = SqliteBackend(tmp_path / "q.db", clock=clock)  # a processor that will "die"
    live = SqliteBackend(tmp_path / "q.db", clock=clock)
    try:
        await dead.submit([msg("a")])
        (d,) = await dead.claim(1, lease_s=5)
        assert await live.claim(1, lease_s=5) == []
        clock.t += 4
        assert await dead.extend(d.key, 5)  # renewed while in flight
        clock.t += 4
        assert await live.claim(1, lease_s=5) == []
        clock.t += 2
        (again,) = await live.claim(1, lease_s=5)
        assert again.key == d.key and again.attempts == 1  # the abandoned delivery counted
        assert not await dead.extend(d.key, 5)  # the old owner lost it
        # Both finish: only one result is stored.
        assert await live.complete(again.key, AsyncResult.http("a", 200, b"first"))
        assert not await dead.complete(d.key, AsyncResult.http("a", 200, b"second"))
        r = await live.get_result("a")
        assert r is not None and r.payload == "first"
        assert [x.id async for x in live.results()] == ["a"]
        assert await live.backlog() == 0 and await live.status("a") == "completed"
    finally:
        await dead.close()
        await live.close()


async def test_retry_delay_attempts_and_dead_letter_is_final(tmp_path: Path) -> None:
    clock = Clock()
    q = SqliteBackend(tmp_path / "q.db", clock=clock)
    try:
        await q.submit([msg("a")])
        (d,) = await q.claim(1, 30)
        await q.retry(d.key, 2.0, count_attempt=False, error="shed")
        assert await q.claim(1, 30) == []
        assert await q.status("a") == "queued"
        clock.t += 2.0
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
    finally:
        await q.close()


async def test_cancel_and_unknown_status(tmp_path: Path) -> None:
    q = SqliteBackend(tmp_path / "q.db")
    try:
        assert await q.status("nope") is None
        assert not await q.is_cancelled("x")
        await q.cancel("x")
        await q.cancel("x")
        assert await q.is_cancelled("x")
    finally:
        await q.close()


async def test_concurrent_consumers_on_one_file_never_share_a_claim(tmp_path: Path) -> None:
    n = 300
    seed = SqliteBackend(tmp_path / "q.db")
    await seed.submit([msg(f"m{i}") for i in range(n)])
    await seed.close()
    consumers = [SqliteBackend(tmp_path / "q.db") for _ in range(3)]
    claimed: list[list[str]] = [[] for _ in consumers]

    async def drain(i: int) -> None:
        q = consumers[i]
        while True:
            got = await q.claim(7, lease_s=60)
            if not got:
                return
            for d in got:
                claimed[i].append(orjson.loads(d.body)["id"])
                await q.complete(d.key, AsyncResult.http(orjson.loads(d.body)["id"], 200, b"ok"))

    try:
        await asyncio.gather(*(drain(i) for i in range(3)))
        everything = [x for c in claimed for x in c]
        assert sorted(everything) == sorted(f"m{i}" for i in range(n))  # each exactly once
        assert len([r async for r in consumers[0].results()]) == n
    finally:
        for q in consumers:
            await q.close()
