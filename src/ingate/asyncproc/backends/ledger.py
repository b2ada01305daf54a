"""The outcome ledger of a broker that keeps no state of its own (Google Cloud Pub/Sub).

Pub/Sub delivers at least once and forgets a message once it is acknowledged; it has no result store,
no per-message attempt count without a dead-letter policy, no cancel marker and no cheap backlog
count. The ledger keeps those, keyed by request id and by Pub/Sub message id:

- results and dead letters, at most one outcome per request id (insert-if-absent);
- which results are not yet confirmed published to the result topic (republished on redelivery);
- per Pub/Sub message: deliveries, deliveries released without counting (sheds), and whether it is
  held, waiting for redelivery or done: the failed-attempt count and the backlog this processor knows;
- cancel markers, small documents (batch manifests), ids submitted through ingate (for ``status``).

Two stores: :class:`SqliteLedger` (a file, for processors on one host) and :class:`RedisLedger`
(processors on any host).
"""

from __future__ import annotations

import sqlite3
from typing import Any, Protocol

import orjson

from ingate.asyncproc.backends.base import DeadLetter
from ingate.asyncproc.backends.redisconn import RedisResults, connect
from ingate.asyncproc.backends.sqlite import SqliteBackend
from ingate.asyncproc.models import AsyncResult

_SQL = """
CREATE TABLE IF NOT EXISTS ps_deliveries (
  msg_id TEXT PRIMARY KEY, req_id TEXT, deliveries INTEGER NOT NULL, free INTEGER NOT NULL, state TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ps_deliveries_req ON ps_deliveries (req_id);
CREATE TABLE IF NOT EXISTS ps_unpublished (id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS ps_submitted (id TEXT PRIMARY KEY);
"""


class Ledger(Protocol):
    """What :class:`~ingate.asyncproc.backends.pubsub.PubSubBackend` needs besides the broker."""

    async def record_result(self, result: AsyncResult) -> bool:
        """Store ``result`` (marked unpublished) unless its id has an outcome; True if stored."""
        ...

    async def unpublished(self, id: str) -> AsyncResult | None: ...

    async def mark_published(self, id: str) -> None: ...

    async def record_dead(self, dead: DeadLetter) -> bool: ...

    async def delivered(self, msg_id: str, req_id: str | None) -> int:
        """Count a delivery of ``msg_id``; returns its failed attempts before this one (earlier
        deliveries not released as free, abandoned ones included)."""
        ...

    async def released(self, msg_id: str, *, free: bool) -> None:
        """The message goes back to the broker (``free``: the delivery does not count as an attempt)."""
        ...

    async def finished(self, msg_id: str) -> None: ...

    async def open_count(self) -> int:
        """Messages delivered at least once and not finished (held, waiting or abandoned)."""
        ...

    async def submitted(self, ids: list[str]) -> None: ...

    async def status(self, id: str) -> str | None: ...

    # The QueueBackend read side, delegated as is.
    async def has_result(self, id: str) -> bool: ...
    async def get_result(self, id: str) -> AsyncResult | None: ...
    def results(self) -> Any: ...
    async def dead_letters(self) -> list[DeadLetter]: ...
    async def cancel(self, id: str) -> None: ...
    async def is_cancelled(self, id: str) -> bool: ...
    async def put_meta(self, key: str, value: bytes) -> None: ...
    async def get_meta(self, key: str) -> bytes | None: ...
    async def close(self) -> None: ...


class SqliteLedger(SqliteBackend):
    """The ledger in an SQLite file (WAL; every step one transaction, so kill -9 leaves it consistent).
    Shares the embedded queue's result, dead-letter, cancel and meta tables and adds three."""

    name = "sqlite-ledger"

    def _call(self, fn: Any) -> Any:
        fresh = self._db is None
        out = super()._call(lambda db: db)
        if fresh:
            out.executescript(_SQL)
        return fn(out)

    async def record_result(self, result: AsyncResult) -> bool:
        now = self.clock()

        def go(db: sqlite3.Connection) -> bool:
            def tx() -> bool:
                if db.execute("SELECT 1 FROM dead_letters WHERE id = ?", (result.id,)).fetchone():
                    return False
                cur = db.execute(
                    "INSERT OR IGNORE INTO results (id, status_code, payload, error_code, error_message, "
                    "completed_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (result.id, result.status_code, result.payload, result.error_code,
                     result.error_message, now),
                )  # fmt: skip
                if cur.rowcount:
                    db.execute("INSERT OR IGNORE INTO ps_unpublished (id) VALUES (?)", (result.id,))
                return bool(cur.rowcount)

            return self._tx(db, tx)

        return bool(await self._run(go))

    async def unpublished(self, id: str) -> AsyncResult | None:
        def go(db: sqlite3.Connection) -> bool:
            return db.execute("SELECT 1 FROM ps_unpublished WHERE id = ?", (id,)).fetchone() is not None

        return await self.get_result(id) if await self._run(go) else None

    async def mark_published(self, id: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM ps_unpublished WHERE id = ?", (id,)))

    async def record_dead(self, dead: DeadLetter) -> bool:
        def go(db: sqlite3.Connection) -> bool:
            def tx() -> bool:
                if db.execute("SELECT 1 FROM results WHERE id = ?", (dead.id,)).fetchone():
                    return False
                cur = db.execute(
                    "INSERT OR IGNORE INTO dead_letters (id, body, attempts, error, at) VALUES (?, ?, ?, ?, ?)",
                    (dead.id, dead.body, dead.attempts, dead.error, dead.at),
                )
                return bool(cur.rowcount)

            return self._tx(db, tx)

        return bool(await self._run(go))

    async def delivered(self, msg_id: str, req_id: str | None) -> int:
        def go(db: sqlite3.Connection) -> int:
            def tx() -> int:
                row = db.execute(
                    "SELECT deliveries, free FROM ps_deliveries WHERE msg_id = ?", (msg_id,)
                ).fetchone()
                before, free = (row[0], row[1]) if row else (0, 0)
                db.execute(
                    "INSERT INTO ps_deliveries (msg_id, req_id, deliveries, free, state) VALUES (?, ?, 1, 0, "
                    "'held') ON CONFLICT(msg_id) DO UPDATE SET deliveries = deliveries + 1, state = 'held'",
                    (msg_id, req_id),
                )
                return int(before - free)

            return self._tx(db, tx)

        return int(await self._run(go))

    async def released(self, msg_id: str, *, free: bool) -> None:
        await self._run(
            lambda db: db.execute(
                "UPDATE ps_deliveries SET state = 'waiting', free = free + ? WHERE msg_id = ?",
                (int(free), msg_id),
            )
        )

    async def finished(self, msg_id: str) -> None:
        await self._run(
            lambda db: db.execute("UPDATE ps_deliveries SET state = 'done' WHERE msg_id = ?", (msg_id,))
        )

    async def open_count(self) -> int:
        def go(db: sqlite3.Connection) -> int:
            return int(db.execute("SELECT COUNT(*) FROM ps_deliveries WHERE state != 'done'").fetchone()[0])

        return int(await self._run(go))

    async def submitted(self, ids: list[str]) -> None:
        def go(db: sqlite3.Connection) -> None:
            db.executemany("INSERT OR IGNORE INTO ps_submitted (id) VALUES (?)", [(i,) for i in ids])

        await self._run(go)

    async def status(self, id: str) -> str | None:
        def go(db: sqlite3.Connection) -> str | None:
            if db.execute("SELECT 1 FROM results WHERE id = ?", (id,)).fetchone():
                return "completed"
            if db.execute("SELECT 1 FROM dead_letters WHERE id = ?", (id,)).fetchone():
                return "dead_lettered"
            row = db.execute(
                "SELECT state FROM ps_deliveries WHERE req_id = ? AND state != 'done' LIMIT 1", (id,)
            ).fetchone()
            if row:
                return "in_progress" if row[0] == "held" else "queued"
            return (
                "queued" if db.execute("SELECT 1 FROM ps_submitted WHERE id = ?", (id,)).fetchone() else None
            )

        return await self._run(go)


class RedisLedger(RedisResults):
    """The ledger in Redis hashes under one hash tag (``{L}:results``, ...; Redis Cluster safe):
    processors on several hosts share it."""

    name = "redis-ledger"

    # KEYS: results, dead, unpublished; ARGV: id, result JSON
    _RECORD = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""
    # KEYS: results, dead; ARGV: id, dead JSON
    _DEAD = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
return redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
"""
    # KEYS: deliveries hash, free hash, state hash, req hash; ARGV: msg id, req id. Returns attempts before.
    _DELIVERED = """
local before = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') - tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('HSET', KEYS[3], ARGV[1], 'held')
if ARGV[2] ~= '' then redis.call('HSET', KEYS[4], ARGV[2], ARGV[1]) end
return before
"""

    def __init__(self, url: str, *, name: str = "ingate-pubsub", cluster: bool = False) -> None:
        self.r = connect(url, cluster=cluster)
        k = "{" + name.strip("{}") + "}"
        self.k_results, self.k_dead, self.k_unpub = f"{k}:results", f"{k}:dead", f"{k}:unpublished"
        self.k_deliv, self.k_free, self.k_state = f"{k}:deliveries", f"{k}:free", f"{k}:state"
        self.k_req, self.k_cancel, self.k_meta, self.k_sub = (
            f"{k}:req",
            f"{k}:cancelled",
            f"{k}:meta",
            f"{k}:sub",
        )
        self._record = self.r.register_script(self._RECORD)
        self._dead = self.r.register_script(self._DEAD)
        self._delivered = self.r.register_script(self._DELIVERED)

    async def record_result(self, result: AsyncResult) -> bool:
        keys = [self.k_results, self.k_dead, self.k_unpub]
        return bool(await self._record(keys=keys, args=[result.id, result.encode()]))

    async def unpublished(self, id: str) -> AsyncResult | None:
        return await self.get_result(id) if await self.r.sismember(self.k_unpub, id) else None

    async def mark_published(self, id: str) -> None:
        await self.r.srem(self.k_unpub, id)

    async def record_dead(self, dead: DeadLetter) -> bool:
        doc = {"id": dead.id, "body": dead.body.decode("utf-8", "replace"), "attempts": dead.attempts}
        doc |= {"error": dead.error, "at": dead.at}
        return bool(await self._dead(keys=[self.k_results, self.k_dead], args=[dead.id, orjson.dumps(doc)]))

    async def delivered(self, msg_id: str, req_id: str | None) -> int:
        keys = [self.k_deliv, self.k_free, self.k_state, self.k_req]
        return int(await self._delivered(keys=keys, args=[msg_id, req_id or ""]))

    async def released(self, msg_id: str, *, free: bool) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.hset(self.k_state, msg_id, "waiting")
            if free:
                p.hincrby(self.k_free, msg_id, 1)
            await p.execute()

    async def finished(self, msg_id: str) -> None:
        # The delivery counters stay (a duplicate publish of a finished id is answered from results).
        await self.r.hdel(self.k_state, msg_id)

    async def open_count(self) -> int:
        return int(await self.r.hlen(self.k_state))

    async def submitted(self, ids: list[str]) -> None:
        if ids:
            await self.r.sadd(self.k_sub, *ids)

    async def status(self, id: str) -> str | None:
        if await self.r.hexists(self.k_results, id):
            return "completed"
        if await self.r.hexists(self.k_dead, id):
            return "dead_lettered"
        msg = await self.r.hget(self.k_req, id)
        if msg is not None:
            state = await self.r.hget(self.k_state, msg)
            if state is not None:
                return "in_progress" if state in (b"held", "held") else "queued"
        return "queued" if await self.r.sismember(self.k_sub, id) else None

    async def close(self) -> None:
        await self.r.aclose()


def open_ledger(url: str) -> Ledger:
    """``redis://...`` (``?name=N&cluster=1``) or an SQLite path (``sqlite:PATH`` or ``PATH``)."""
    from urllib.parse import parse_qs, urlsplit

    if url.startswith(("redis://", "rediss://", "unix://")):
        parts = urlsplit(url)
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        cluster = q.get("cluster", "0").lower() in ("1", "true", "yes")
        return RedisLedger(
            parts._replace(query="").geturl(), name=q.get("name", "ingate-pubsub"), cluster=cluster
        )
    path = url[len("sqlite:") :].removeprefix("//") if url.startswith("sqlite:") else url
    if not path or "://" in path:
        raise ValueError(f"ledger {url!r}: use a file path, sqlite:PATH or redis://HOST:PORT/DB")
    return SqliteLedger(path)
