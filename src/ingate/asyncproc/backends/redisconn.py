"""What the Redis backends share: client settings (a single server or a Redis Cluster), and reading
results and dead letters (both keep them in hashes keyed by request id).

Redis Cluster: every key one queue touches in a script or transaction must hash to one slot, so the
backends keep all of a queue's keys under one hash tag (``{name}``): the cluster places the whole queue
on one primary (a queue is as fast as one primary; several queues spread over the cluster).

A dropped connection (a Redis restart or failover, a proxy timing out an idle connection, a command
cancelled mid-reply that leaves its connection unusable) is retried on a fresh connection a few times
with backoff instead of failing the message. Every command and script the backends send is safe to
repeat: the scripts check the entry they act on still exists and write a result only once per id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError, TimeoutError

from ingate.asyncproc.backends.base import DeadLetter
from ingate.asyncproc.models import AsyncResult


def reconnect() -> dict[str, Any]:
    """Client keyword arguments: up to 3 retries on a fresh connection, 20 ms to 0.5 s apart, and no
    command waits on a silent connection for more than 5 s (the backends never block server-side)."""
    return {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 5.0,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.02), 3),
        "retry_on_error": [ConnectionError, TimeoutError],
    }


def connect(url: str, *, cluster: bool = False) -> Any:
    """A client for ``url``: :class:`redis.asyncio.Redis`, or with ``cluster`` a
    :class:`~redis.asyncio.cluster.RedisCluster` that discovers the nodes from the one ``url`` names
    (both answer the commands and scripts the backends use)."""
    if cluster:
        return RedisCluster.from_url(url, **reconnect())
    return aioredis.Redis.from_url(url, **reconnect())


def hash_tagged(name: str) -> str:
    """``name`` with a hash tag around it (``{name}``), unless it carries one already, so that the keys
    derived from it (``{name}:results``, ...) share a cluster slot."""
    start = name.find("{")
    if start >= 0 and name.find("}", start + 2) > start:
        return name
    return "{" + name + "}"


def check_one_slot(keys: dict[str, str]) -> None:
    """Raise ValueError unless every key (option name -> key) hashes to one Redis Cluster slot."""
    slots = {opt: key_slot(k.encode()) for opt, k in keys.items()}
    if len(set(slots.values())) > 1:
        listed = ", ".join(f"{opt}={keys[opt]!r} (slot {slot})" for opt, slot in slots.items())
        raise ValueError(
            f"on a Redis Cluster every key of one queue must share a hash slot; got {listed}: give them "
            "one hash tag, e.g. queue={q}request-sortedset&results={q}result-list&retry={q}retry-sortedset"
        )


class RedisResults:
    """What the Redis backends keep alike: results and dead letters (`k_results` and `k_dead` hashes,
    id -> JSON), cancel markers (`k_cancel` set) and small documents (`k_meta` hash)."""

    r: Any  # redis.asyncio.Redis or RedisCluster (see connect)
    k_results: str
    k_dead: str
    k_cancel: str
    k_meta: str

    async def has_result(self, id: str) -> bool:
        """Whether `id` has an outcome (a result or a dead letter)."""
        async with self.r.pipeline(transaction=False) as p:
            p.hexists(self.k_results, id)
            p.hexists(self.k_dead, id)
            a, b = await p.execute()
        return bool(a or b)

    async def cancel(self, id: str) -> None:
        await self.r.sadd(self.k_cancel, id)

    async def is_cancelled(self, id: str) -> bool:
        return bool(await self.r.sismember(self.k_cancel, id))

    async def put_meta(self, key: str, value: bytes) -> None:
        await self.r.hset(self.k_meta, key, value)

    async def get_meta(self, key: str) -> bytes | None:
        v = await self.r.hget(self.k_meta, key)
        return None if v is None else (v.encode() if isinstance(v, str) else bytes(v))

    async def get_result(self, id: str) -> AsyncResult | None:
        raw = await self.r.hget(self.k_results, id)
        return None if raw is None else AsyncResult.from_json(orjson.loads(raw))

    async def results(self) -> AsyncIterator[AsyncResult]:
        async for _k, v in self.r.hscan_iter(self.k_results, count=500):
            yield AsyncResult.from_json(orjson.loads(v))

    async def dead_letters(self) -> list[DeadLetter]:
        out = []
        for v in (await self.r.hgetall(self.k_dead)).values():
            d = orjson.loads(v)
            out.append(
                DeadLetter(d["id"], d["body"].encode(), int(d["attempts"]), d["error"], float(d["at"]))
            )
        return sorted(out, key=lambda d: d.id)
