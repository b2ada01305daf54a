"""The embedded queue: one SQLite file in WAL mode, no server.

Every state change is one transaction, so a process killed at any instant (kill -9) leaves each message
either queued, claimed under a lease that will expire, or completed with its result: nothing is lost.
Several processors (threads or processes on one host) may share the file; ``BEGIN IMMEDIATE`` serialises
claims so a message is handed to one claimer per lease. Not for network filesystems (SQLite's locking).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from ingate.asyncproc.backends.base import DeadLetter, Delivery
from ingate.asyncproc.models import AsyncResult

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
  key INTEGER PRIMARY KEY AUTOINCREMENT,
  msg_id TEXT,
  body BLOB NOT NULL,
  deadline REAL NOT NULL,
  enqueued_at REAL NOT NULL,
  visible_at REAL NOT NULL,
  owner TEXT,
  attempts INTEGER NOT NULL DEFAULT 0,
  deliveries INTEGER NOT NULL DEFAULT 0,
  last_error TEXT
);
CREATE INDEX IF NOT EXISTS messages_order ON messages (deadline, key);
CREATE INDEX IF NOT EXISTS messages_id ON messages (msg_id);
CREATE TABLE IF NOT EXISTS results (
  id TEXT PRIMARY KEY,
  status_code INTEGER NOT NULL,
  payload TEXT NOT NULL,
  error_code TEXT NOT NULL,
  error_message TEXT NOT NULL,
  completed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
  id TEXT PRIMARY KEY,
  body BLOB NOT NULL,
  attempts INTEGER NOT NULL,
  error TEXT NOT NULL,
  at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cancels (id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"""


def _peek(body: bytes) -> tuple[str | None, float]:
    """(id, deadline) of a message for indexing; malformed ones sort first so they are answered soon."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, 0.0
    if not isinstance(doc, dict):
        return None, 0.0
    rid = doc.get("id")
    dl = doc.get("deadline")
    deadline = float(dl) if isinstance(dl, int | float) and not isinstance(dl, bool) else 0.0
    return (rid if isinstance(rid, str) else None), deadline


class SqliteBackend:
    """:class:`~ingate.asyncproc.backends.base.QueueBackend` on an SQLite file."""

    name = "sqlite"
    quiet_s = 0.0  # every message is counted in backlog()

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self.owner = uuid.uuid4().hex
        # One connection, used only from this one thread: sqlite3 calls block, the event loop must not.
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingate-sqlite")
        self._db: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._exec, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL: a commit survives a process crash (kill -9); only an OS crash/power loss can
            # roll back the last transactions.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            db.executescript(_SCHEMA)
            self._db = db
        return fn(self._db)

    @staticmethod
    def _tx(db: sqlite3.Connection, fn: Callable[[], T]) -> T:
        db.execute("BEGIN IMMEDIATE")
        try:
            out = fn()
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return out

    async def submit(self, bodies: Sequence[bytes]) -> int:
        now = self.clock()
        rows = [(*_peek(b), b, now) for b in bodies]

        def go(db: sqlite3.Connection) -> int:
            def ins() -> int:
                db.executemany(
                    "INSERT INTO messages (msg_id, deadline, body, enqueued_at, visible_at) "
                    "VALUES (?, ?, ?, ?, 0)",
                    [(i, d, b, t) for i, d, b, t in rows],
                )
                return len(rows)

            return self._tx(db, ins)

        return await self._run(go)

    async def claim(self, n: int, lease_s: float) -> list[Delivery]:
        if n <= 0:
            return []
        now = self.clock()

        def go(db: sqlite3.Connection) -> list[Delivery]:
            # A message still owned when its lease ran out was abandoned by a dead claimer: that delivery
            # counts as a failed attempt.
            rows = db.execute(
                "UPDATE messages SET visible_at = ?, owner = ?, deliveries = deliveries + 1, "
                "attempts = attempts + (owner IS NOT NULL) "
                "WHERE key IN (SELECT key FROM messages WHERE visible_at <= ? ORDER BY deadline, key LIMIT ?) "
                "RETURNING deadline, key, body, attempts, enqueued_at",
                (now + lease_s, self.owner, now, n),
            ).fetchall()
            rows.sort()  # RETURNING has no defined order: earliest deadline first
            return [Delivery(str(k), bytes(b), a, t) for _, k, b, a, t in rows]

        return await self._run(go)

    async def extend(self, key: str, lease_s: float) -> bool:
        t = self.clock() + lease_s

        def go(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE messages SET visible_at = ? WHERE key = ? AND owner = ?", (t, int(key), self.owner)
            )
            return cur.rowcount == 1

        return await self._run(go)

    async def complete(self, key: str, result: AsyncResult) -> bool:
        now = self.clock()
        r = result

        def go(db: sqlite3.Connection) -> bool:
            def tx() -> bool:
                # One outcome per id: no result for an id already dead-lettered (by another claimer).
                cur = db.execute(
                    "INSERT OR IGNORE INTO results SELECT ?, ?, ?, ?, ?, ? "
                    "WHERE NOT EXISTS (SELECT 1 FROM dead_letters WHERE id = ?)",
                    (r.id, r.status_code, r.payload, r.error_code, r.error_message, now, r.id),
                )
                db.execute("DELETE FROM messages WHERE key = ?", (int(key),))
                return cur.rowcount == 1

            return self._tx(db, tx)

        return await self._run(go)

    async def ack(self, key: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM messages WHERE key = ?", (int(key),)))

    async def retry(self, key: str, delay_s: float, *, count_attempt: bool, error: str = "") -> None:
        t = self.clock() + max(0.0, delay_s)

        def go(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE messages SET visible_at = ?, owner = NULL, attempts = attempts + ?, "
                "last_error = COALESCE(NULLIF(?, ''), last_error) WHERE key = ?",
                (t, int(count_attempt), error, int(key)),
            )

        await self._run(go)

    async def dead_letter(self, key: str, id: str, error: str) -> None:
        now = self.clock()

        def go(db: sqlite3.Connection) -> None:
            def tx() -> None:
                row = db.execute("SELECT body, attempts FROM messages WHERE key = ?", (int(key),)).fetchone()
                if row is None:
                    return  # completed or dead-lettered by another claimer meanwhile
                # An id with a result is not dead-lettered: one outcome per id.
                if db.execute("SELECT 1 FROM results WHERE id = ?", (id,)).fetchone() is None:
                    db.execute(
                        "INSERT OR IGNORE INTO dead_letters VALUES (?, ?, ?, ?, ?)",
                        (id, row[0], row[1] + 1, error, now),
                    )
                db.execute("DELETE FROM messages WHERE key = ?", (int(key),))

            self._tx(db, tx)

        await self._run(go)

    async def has_result(self, id: str) -> bool:
        def go(db: sqlite3.Connection) -> bool:
            q = "SELECT 1 FROM results WHERE id = ? UNION ALL SELECT 1 FROM dead_letters WHERE id = ?"
            return db.execute(q, (id, id)).fetchone() is not None

        return await self._run(go)

    async def get_result(self, id: str) -> AsyncResult | None:
        def go(db: sqlite3.Connection) -> Any:
            return db.execute(
                "SELECT id, status_code, payload, error_code, error_message FROM results WHERE id = ?", (id,)
            ).fetchone()

        row = await self._run(go)
        return None if row is None else AsyncResult(*row)

    async def results(self) -> AsyncIterator[AsyncResult]:
        last = ""
        while True:

            def go(db: sqlite3.Connection, after: str = last) -> list[Any]:
                return db.execute(
                    "SELECT id, status_code, payload, error_code, error_message FROM results "
                    "WHERE id > ? ORDER BY id LIMIT 500",
                    (after,),
                ).fetchall()

            rows = await self._run(go)
            if not rows:
                return
            for row in rows:
                yield AsyncResult(*row)
            last = rows[-1][0]

    async def dead_letters(self) -> list[DeadLetter]:
        def go(db: sqlite3.Connection) -> list[Any]:
            return db.execute("SELECT id, body, attempts, error, at FROM dead_letters ORDER BY id").fetchall()

        return [DeadLetter(i, bytes(b), a, e, t) for i, b, a, e, t in await self._run(go)]

    async def cancel(self, id: str) -> None:
        now = self.clock()
        await self._run(lambda db: db.execute("INSERT OR IGNORE INTO cancels VALUES (?, ?)", (id, now)))

    async def is_cancelled(self, id: str) -> bool:
        def go(db: sqlite3.Connection) -> bool:
            return db.execute("SELECT 1 FROM cancels WHERE id = ?", (id,)).fetchone() is not None

        return await self._run(go)

    async def backlog(self) -> int:
        def go(db: sqlite3.Connection) -> int:
            return int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

        return await self._run(go)

    async def put_meta(self, key: str, value: bytes) -> None:
        await self._run(lambda db: db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value)))

    async def get_meta(self, key: str) -> bytes | None:
        def go(db: sqlite3.Connection) -> bytes | None:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return None if row is None else bytes(row[0])

        return await self._run(go)

    async def status(self, id: str) -> str | None:
        now = self.clock()

        def go(db: sqlite3.Connection) -> str | None:
            if db.execute("SELECT 1 FROM results WHERE id = ?", (id,)).fetchone():
                return "completed"
            if db.execute("SELECT 1 FROM dead_letters WHERE id = ?", (id,)).fetchone():
                return "dead_lettered"
            row = db.execute(
                "SELECT owner IS NOT NULL AND visible_at > ? FROM messages WHERE msg_id = ? LIMIT 1",
                (now, id),
            ).fetchone()
            if row is None:
                return None
            return "in_progress" if row[0] else "queued"

        return await self._run(go)

    async def close(self) -> None:
        def go(db: sqlite3.Connection) -> None:
            db.close()

        if self._db is not None:
            await self._run(go)
            self._db = None
        self._exec.shutdown(wait=True)
