"""llm-d-async's ``redis-sortedset`` layout, for drop-in use with its producers and result consumers.

Upstream layout (llm-d-async, 2026-08; pkg/redis/sortedset_impl.go, producer/redis_sortedset_producer.go):

- request queue: sorted set (default ``request-sortedset``) scored by the message's deadline (unix s);
  each member is the "internal request" wire JSON ``{"internal": {routing...}, "request_kind": "plain" |
  "redis" | "pubsub", "data": {id, created, deadline, payload, metadata, headers, endpoint, ...}}``;
- results: ``LPUSH`` of result JSON onto a list (default ``result-list``; a message's
  ``internal.result_queue_name`` overrides it);
- retries: sorted set ``retry-sortedset`` scored by the due time; due members go back to their request
  queue with their deadline as score; ``internal.retry_count`` counts retries;
- cancellation: ``request-cancel:<id>`` (a token; upstream compares it with ``request-active:<id>``).

Upstream pops with ZPOPMIN, so a message is lost if the processor dies before answering it. Here a claim
moves the member atomically into ``<queue>:processing`` scored by its lease expiry, and a member whose
lease ran out is claimed again (counted as a failed attempt): at-least-once. Results are also kept in
the hash ``<results>:ids`` (id -> result) and pushed onto the list only the first time, so a redelivered
id never yields two results. Additions upstream processors ignore: ``<queue>:processing``,
``<queue>:dead-letters`` (hash), ``<queue>:abandoned``, ``<queue>:owners``, ``<queue>:index``; the attempt count rides in
``internal.labels["ingate-attempts"]``.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from ingate.asyncproc.backends.base import Delivery
from ingate.asyncproc.backends.redisconn import RedisResults, check_one_slot, reconnect
from ingate.asyncproc.models import AsyncResult

ATTEMPTS_LABEL = "ingate-attempts"

# KEYS: queue, retry; ARGV: now, limit. Due retries back into the queue, scored by their deadline.
_MOVE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  local score = 0
  local ok, doc = pcall(cjson.decode, m)
  if ok and type(doc) == 'table' and type(doc['data']) == 'table' and tonumber(doc['data']['deadline']) then
    score = tonumber(doc['data']['deadline'])
  end
  redis.call('ZREM', KEYS[2], m)
  redis.call('ZADD', KEYS[1], tostring(score), m)
end
return #due
"""

# KEYS: queue, processing, owners; ARGV: now, lease_until, n, consumer. Returns {member, reclaimed, ...}.
_CLAIM = """
local out = {}
local n = tonumber(ARGV[3])
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, n)
for _, m in ipairs(expired) do
  redis.call('ZADD', KEYS[2], ARGV[2], m)
  redis.call('HSET', KEYS[3], redis.sha1hex(m), ARGV[4])
  table.insert(out, m)
  table.insert(out, 1)
end
local left = n - #expired
if left > 0 then
  local fresh = redis.call('ZRANGE', KEYS[1], 0, left - 1)
  for _, m in ipairs(fresh) do
    redis.call('ZREM', KEYS[1], m)
    redis.call('ZADD', KEYS[2], ARGV[2], m)
    redis.call('HSET', KEYS[3], redis.sha1hex(m), ARGV[4])
    table.insert(out, m)
    table.insert(out, 0)
  end
end
return out
"""

# KEYS: processing, owners; ARGV: member, lease_until, consumer. Renews only the owner's claim.
_EXTEND = """
if redis.call('HGET', KEYS[2], redis.sha1hex(ARGV[1])) ~= ARGV[3] then return 0 end
return redis.call('ZADD', KEYS[1], 'XX', 'CH', ARGV[2], ARGV[1]) + 1
"""

# KEYS: processing, results hash, result list, dead, abandoned, owners; ARGV: member, id, result JSON, member sha
_COMPLETE = """
local wrote = 0
if redis.call('HEXISTS', KEYS[4], ARGV[2]) == 0 and redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3]) == 1 then
  redis.call('LPUSH', KEYS[3], ARGV[3])
  wrote = 1
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[4])
redis.call('HDEL', KEYS[6], ARGV[4])
return wrote
"""

# KEYS: processing, retry, abandoned, owners; ARGV: old member, new member, due, old sha
_RETRY = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[4])
redis.call('HDEL', KEYS[4], ARGV[4])
return 1
"""

# KEYS: processing, results hash, dead, abandoned, owners; ARGV: member, id, dead JSON, sha
_DEAD = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then redis.call('HSETNX', KEYS[3], ARGV[2], ARGV[3]) end
redis.call('HDEL', KEYS[4], ARGV[4])
redis.call('HDEL', KEYS[5], ARGV[4])
return 1
"""


def _sha(member: str) -> str:
    return hashlib.sha1(member.encode(), usedforsecurity=False).hexdigest()


def _wire(member: str) -> dict[str, Any] | None:
    try:
        doc = orjson.loads(member)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


class LlmdSortedSetBackend(RedisResults):
    """:class:`~ingate.asyncproc.backends.base.QueueBackend` on llm-d-async's Redis sorted-set layout."""

    name = "llmd-sortedset"
    quiet_s = 0.0  # every message is counted in backlog()

    def __init__(
        self,
        url: str,
        *,
        queue: str = "request-sortedset",
        results: str = "result-list",
        retry: str = "retry-sortedset",
        clock: Callable[[], float] = time.time,
        cluster: bool = False,
    ) -> None:
        if cluster:
            # llm-d-async names these keys itself; on a cluster the operator tags them (check_one_slot).
            check_one_slot({"queue": queue, "results": results, "retry": retry})
            self.r: Any = RedisCluster.from_url(url, decode_responses=True, **reconnect())
        else:
            self.r = aioredis.Redis.from_url(url, decode_responses=True, **reconnect())
        self.queue, self.result_list, self.retry_set = queue, results, retry
        self.k_processing, self.k_dead = f"{queue}:processing", f"{queue}:dead-letters"
        self.k_aband, self.k_index = f"{queue}:abandoned", f"{queue}:index"
        self.k_owners, self.k_meta = f"{queue}:owners", f"{queue}:meta"
        self.consumer = f"ingate-{uuid.uuid4().hex[:12]}"
        self.k_results = f"{results}:ids"
        self.clock = clock
        self._move = self.r.register_script(_MOVE_DUE)
        self._claim = self.r.register_script(_CLAIM)
        self._extend = self.r.register_script(_EXTEND)
        self._complete = self.r.register_script(_COMPLETE)
        self._retry = self.r.register_script(_RETRY)
        self._dead = self.r.register_script(_DEAD)

    async def submit(self, bodies: Sequence[bytes]) -> int:
        async with self.r.pipeline(transaction=True) as p:
            for b in bodies:
                try:
                    data = orjson.loads(b)
                except orjson.JSONDecodeError:
                    data = None
                if isinstance(data, dict):
                    member = orjson.dumps({"internal": {}, "request_kind": "plain", "data": data}).decode()
                    dl = data.get("deadline")
                    score = float(dl) if isinstance(dl, int | float) and not isinstance(dl, bool) else 0.0
                    if isinstance(data.get("id"), str):
                        p.hset(self.k_index, data["id"], "1")
                else:
                    member, score = b.decode("utf-8", "replace"), 0.0  # answered INVALID_REQUEST first
                p.zadd(self.queue, {member: score})
            await p.execute()
        return len(bodies)

    def _delivery(self, member: str, extra: int) -> Delivery:
        doc = _wire(member)
        if doc is None or not isinstance(doc.get("data"), dict):
            # Not the wire format: a bare request message is processed as is, anything else is answered
            # INVALID_REQUEST by the processor.
            return Delivery(member, member.encode(), extra, 0.0)
        internal: dict[str, Any] = doc["internal"] if isinstance(doc.get("internal"), dict) else {}
        labels: dict[str, Any] = internal["labels"] if isinstance(internal.get("labels"), dict) else {}
        try:
            attempts = int(labels.get(ATTEMPTS_LABEL, 0))
        except (TypeError, ValueError):
            attempts = 0
        data = doc["data"]
        created = data.get("created") if isinstance(data.get("created"), int | float) else 0.0
        return Delivery(member, orjson.dumps(data), attempts + extra, float(created))

    async def claim(self, n: int, lease_s: float) -> list[Delivery]:
        if n <= 0:
            return []
        now = self.clock()
        await self._move(keys=[self.queue, self.retry_set], args=[now, 100])
        flat = await self._claim(
            keys=[self.queue, self.k_processing, self.k_owners], args=[now, now + lease_s, n, self.consumer]
        )
        out = []
        for member, reclaimed in zip(flat[::2], flat[1::2], strict=True):
            # A member whose lease ran out was abandoned by a dead processor: one more failed attempt.
            extra = int(await self.r.hincrby(self.k_aband, _sha(member), 1)) if int(reclaimed) else 0
            out.append(self._delivery(member, extra))
        return out

    async def extend(self, key: str, lease_s: float) -> bool:
        t = self.clock() + lease_s
        return bool(await self._extend(keys=[self.k_processing, self.k_owners], args=[key, t, self.consumer]))

    def _result_list(self, member: str) -> str:
        doc = _wire(member) or {}
        internal: dict[str, Any] = doc["internal"] if isinstance(doc.get("internal"), dict) else {}
        name = internal.get("result_queue_name")
        return name if isinstance(name, str) and name else self.result_list

    async def complete(self, key: str, result: AsyncResult) -> bool:
        keys = [
            self.k_processing,
            self.k_results,
            self._result_list(key),
            self.k_dead,
            self.k_aband,
            self.k_owners,
        ]
        wrote = await self._complete(keys=keys, args=[key, result.id, result.encode().decode(), _sha(key)])
        if wrote:
            await self.r.hdel(self.k_index, result.id)
        return bool(wrote)

    async def ack(self, key: str) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.zrem(self.k_processing, key)
            p.hdel(self.k_aband, _sha(key))
            p.hdel(self.k_owners, _sha(key))
            await p.execute()

    async def retry(self, key: str, delay_s: float, *, count_attempt: bool, error: str = "") -> None:
        doc = _wire(key)
        if doc is None or not isinstance(doc.get("data"), dict):
            return  # never retried: the processor answers malformed messages
        abandoned = int(await self.r.hget(self.k_aband, _sha(key)) or 0)
        internal = dict(doc.get("internal") or {})
        labels = dict(internal.get("labels") or {})
        attempts = int(labels.get(ATTEMPTS_LABEL, 0) or 0) + abandoned + int(count_attempt)
        labels[ATTEMPTS_LABEL] = str(attempts)
        internal["labels"] = labels
        internal["retry_count"] = int(internal.get("retry_count", 0) or 0) + 1
        new = orjson.dumps({**doc, "internal": internal}).decode()
        due = self.clock() + max(0.0, delay_s)
        keys = [self.k_processing, self.retry_set, self.k_aband, self.k_owners]
        await self._retry(keys=keys, args=[key, new, due, _sha(key)])

    async def dead_letter(self, key: str, id: str, error: str) -> None:
        d = self._delivery(key, int(await self.r.hget(self.k_aband, _sha(key)) or 0))
        doc = {
            "id": id,
            "body": d.body.decode("utf-8", "replace"),
            "attempts": d.attempts + 1,
            "error": error,
        }
        doc["at"] = self.clock()
        keys = [self.k_processing, self.k_results, self.k_dead, self.k_aband, self.k_owners]
        if await self._dead(keys=keys, args=[key, id, orjson.dumps(doc).decode(), _sha(key)]):
            await self.r.hdel(self.k_index, id)

    async def cancel(self, id: str) -> None:
        # Upstream marks a cancellation with the request's active token; without one, any value marks it.
        token = await self.r.get(f"request-active:{id}")
        await self.r.set(f"request-cancel:{id}", token or "cancelled", ex=7 * 24 * 3600)

    async def is_cancelled(self, id: str) -> bool:
        return bool(await self.r.exists(f"request-cancel:{id}"))

    async def backlog(self) -> int:
        async with self.r.pipeline(transaction=False) as p:
            p.zcard(self.queue)
            p.zcard(self.k_processing)
            p.zcard(self.retry_set)
            a, b, c = await p.execute()
        return int(a) + int(b) + int(c)

    async def status(self, id: str) -> str | None:
        if await self.r.hexists(self.k_results, id):
            return "completed"
        if await self.r.hexists(self.k_dead, id):
            return "dead_lettered"
        # Only messages submitted through ingate are indexed; others are known once they complete.
        return "queued" if await self.r.hexists(self.k_index, id) else None

    async def close(self) -> None:
        await self.r.aclose()
