"""Redis Streams queue with a consumer group: several processors share one stream.

Keys (``S`` = the stream name, default ``ingate-async``):

- ``S``: the stream; entry fields ``body`` (the message), ``attempts``, ``enq`` (unix seconds);
- ``S:delayed``: sorted set of messages waiting to be retried, scored by due time (streams have no delay);
- ``S:results``: hash id -> result JSON (one per id); ``S:results:log`` a stream of results as written;
- ``S:dead``: hash id -> dead-letter JSON; ``S:cancelled``: set of cancelled ids;
- ``S:index``: hash id -> stream entry id (or ``delayed``) of queued messages, for status queries;
- ``S:abandoned``: hash entry id -> deliveries reclaimed from dead consumers.

On a Redis Cluster (``?cluster=1``) ``S`` is ``{NAME}``: the hash tag keeps every key on one slot.

A claimed entry sits in the group's pending list; one whose consumer stopped renewing it for the lease
is taken over with XAUTOCLAIM (that delivery counts as a failed attempt). Completion, retry and
dead-lettering are Lua scripts, so each is atomic: the result is written (only if the id has no outcome)
in the same step that acknowledges and deletes the entry. Order is FIFO, not by deadline.
Durability is Redis's: with AOF ``appendfsync everysec`` a Redis crash can lose the last second.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from redis.exceptions import ResponseError

from ingate.asyncproc.backends.base import Delivery, peek_id
from ingate.asyncproc.backends.redisconn import RedisResults, connect, hash_tagged
from ingate.asyncproc.models import AsyncResult

# KEYS: stream, results, results_log, dead, abandoned, index; ARGV: entry id, request id, result JSON, group
_COMPLETE = """
local wrote = 0
if redis.call('HEXISTS', KEYS[4], ARGV[2]) == 0 and redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3]) == 1 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', '100000', '*', 'id', ARGV[2], 'result', ARGV[3])
  wrote = 1
end
redis.call('XACK', KEYS[1], ARGV[4], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
if redis.call('HGET', KEYS[6], ARGV[2]) == ARGV[1] then redis.call('HDEL', KEYS[6], ARGV[2]) end
return wrote
"""

# KEYS: stream, delayed, abandoned, index; ARGV: entry id, group, due, attempts increment, error
_RETRY = """
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return 0 end
local f = e[1][2]
local body, attempts, enq = nil, 0, '0'
for i = 1, #f, 2 do
  if f[i] == 'body' then body = f[i+1] elseif f[i] == 'attempts' then attempts = tonumber(f[i+1])
  elseif f[i] == 'enq' then enq = f[i+1] end
end
attempts = attempts + tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0') + tonumber(ARGV[4])
local member = cjson.encode({body = body, attempts = attempts, enq = enq, error = ARGV[5], n = ARGV[1]})
redis.call('ZADD', KEYS[2], ARGV[3], member)
redis.call('XACK', KEYS[1], ARGV[2], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
local ok, doc = pcall(cjson.decode, body)
if ok and type(doc) == 'table' and type(doc['id']) == 'string' and redis.call('HGET', KEYS[4], doc['id']) == ARGV[1] then
  redis.call('HSET', KEYS[4], doc['id'], 'delayed')
end
return 1
"""

# KEYS: stream, delayed, index; ARGV: now, limit. Moves due retries back into the stream.
_MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  local d = cjson.decode(m)
  local eid = redis.call('XADD', KEYS[1], '*', 'body', d['body'], 'attempts', tostring(d['attempts']), 'enq', d['enq'])
  redis.call('ZREM', KEYS[2], m)
  local ok, doc = pcall(cjson.decode, d['body'])
  if ok and type(doc) == 'table' and type(doc['id']) == 'string' and redis.call('HGET', KEYS[3], doc['id']) == 'delayed' then
    redis.call('HSET', KEYS[3], doc['id'], eid)
  end
end
return #due
"""

# KEYS: stream, results, dead, abandoned, index; ARGV: entry id, request id, dead JSON, group
_DEAD = """
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return 0 end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then redis.call('HSETNX', KEYS[3], ARGV[2], ARGV[3]) end
redis.call('XACK', KEYS[1], ARGV[4], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
if redis.call('HGET', KEYS[5], ARGV[2]) == ARGV[1] then redis.call('HDEL', KEYS[5], ARGV[2]) end
return 1
"""


class RedisStreamsBackend(RedisResults):
    """:class:`~ingate.asyncproc.backends.base.QueueBackend` on a Redis stream and consumer group."""

    name = "redis"
    quiet_s = 0.0  # every message is counted in backlog()

    def __init__(
        self,
        url: str,
        *,
        stream: str = "ingate-async",
        group: str = "ingate-async",
        consumer: str | None = None,
        clock: Callable[[], float] = time.time,
        cluster: bool = False,
    ) -> None:
        self.url = url
        # On a cluster every key of the queue carries the stream's hash tag: one slot for its scripts.
        self.stream = hash_tagged(stream) if cluster else stream
        self.group = group
        self.consumer = consumer or f"ingate-{uuid.uuid4().hex[:12]}"
        self.clock = clock
        self.r: Any = connect(url, cluster=cluster)
        k = self.stream
        self.k_delayed, self.k_results, self.k_log = f"{k}:delayed", f"{k}:results", f"{k}:results:log"
        self.k_dead, self.k_cancel, self.k_index = f"{k}:dead", f"{k}:cancelled", f"{k}:index"
        self.k_aband, self.k_meta = f"{k}:abandoned", f"{k}:meta"
        self._complete = self.r.register_script(_COMPLETE)
        self._retry = self.r.register_script(_RETRY)
        self._move = self.r.register_script(_MOVE_DUE)
        self._dead = self.r.register_script(_DEAD)
        self._group_ready = False

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    async def submit(self, bodies: Sequence[bytes]) -> int:
        await self._ensure_group()
        enq = repr(self.clock())
        async with self.r.pipeline(transaction=True) as p:
            for b in bodies:
                p.xadd(self.stream, {"body": b, "attempts": "0", "enq": enq})
            ids = await p.execute()
        async with self.r.pipeline(transaction=False) as p:
            for b, eid in zip(bodies, ids, strict=True):
                rid = peek_id(b)
                if rid is not None:
                    p.hset(self.k_index, rid, eid)
            await p.execute()
        return len(bodies)

    @staticmethod
    def _delivery(eid: Any, fields: dict[Any, Any], extra_attempts: int) -> Delivery:
        key = eid.decode() if isinstance(eid, bytes) else str(eid)
        attempts = int(fields.get(b"attempts", b"0")) + extra_attempts
        return Delivery(key, bytes(fields.get(b"body", b"")), attempts, float(fields.get(b"enq", b"0")))

    async def claim(self, n: int, lease_s: float) -> list[Delivery]:
        if n <= 0:
            return []
        await self._ensure_group()
        await self._move(keys=[self.stream, self.k_delayed, self.k_index], args=[self.clock(), max(n, 100)])
        out: list[Delivery] = []
        # Entries whose consumer stopped renewing them for a lease: abandoned, take them over.
        res = await self.r.xautoclaim(
            self.stream, self.group, self.consumer, min_idle_time=int(lease_s * 1000), start_id="0-0", count=n
        )
        for eid, fields in res[1]:
            if not fields:
                continue
            extra = await self.r.hincrby(self.k_aband, eid, 1)
            out.append(self._delivery(eid, fields, int(extra)))
        if len(out) < n:
            got: Any = await self.r.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=n - len(out)
            )
            for _stream, entries in got or []:
                for eid, fields in entries:
                    out.append(self._delivery(eid, fields, 0))
        return out

    async def extend(self, key: str, lease_s: float) -> bool:
        pend = await self.r.xpending_range(self.stream, self.group, min=key, max=key, count=1)
        if not pend or _s(pend[0]["consumer"]) != self.consumer:
            return False
        # XCLAIM by the owner resets the entry's idle time: the lease starts over.
        await self.r.xclaim(self.stream, self.group, self.consumer, 0, [key], justid=True)
        return True

    async def complete(self, key: str, result: AsyncResult) -> bool:
        keys = [self.stream, self.k_results, self.k_log, self.k_dead, self.k_aband, self.k_index]
        wrote = await self._complete(keys=keys, args=[key, result.id, result.encode(), self.group])
        return bool(wrote)

    async def ack(self, key: str) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.xack(self.stream, self.group, key)
            p.xdel(self.stream, key)
            p.hdel(self.k_aband, key)
            await p.execute()

    async def retry(self, key: str, delay_s: float, *, count_attempt: bool, error: str = "") -> None:
        due = self.clock() + max(0.0, delay_s)
        await self._retry(
            keys=[self.stream, self.k_delayed, self.k_aband, self.k_index],
            args=[key, self.group, due, int(count_attempt), error],
        )

    async def dead_letter(self, key: str, id: str, error: str) -> None:
        entry: Any = await self.r.xrange(self.stream, key, key)
        if not entry:
            return
        d = self._delivery(entry[0][0], entry[0][1], int(await self.r.hget(self.k_aband, key) or 0))
        doc = {
            "id": id,
            "body": d.body.decode("utf-8", "replace"),
            "attempts": d.attempts + 1,
            "error": error,
        }
        doc["at"] = self.clock()
        await self._dead(
            keys=[self.stream, self.k_results, self.k_dead, self.k_aband, self.k_index],
            args=[key, id, orjson.dumps(doc), self.group],
        )

    async def backlog(self) -> int:
        async with self.r.pipeline(transaction=False) as p:
            p.xlen(self.stream)
            p.zcard(self.k_delayed)
            a, b = await p.execute()
        return int(a) + int(b)

    async def status(self, id: str) -> str | None:
        if await self.r.hexists(self.k_results, id):
            return "completed"
        if await self.r.hexists(self.k_dead, id):
            return "dead_lettered"
        where = await self.r.hget(self.k_index, id)
        if where is None:
            return None
        eid = _s(where)
        if eid == "delayed":
            return "queued"
        await self._ensure_group()
        pend = await self.r.xpending_range(self.stream, self.group, min=eid, max=eid, count=1)
        return "in_progress" if pend else "queued"

    async def close(self) -> None:
        await self.r.aclose()


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
