"""What the Redis backends share: client settings, and reading results and dead letters (both keep
them in hashes keyed by request id).

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
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
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


class RedisResults:
    """Results and dead letters of a Redis backend: `k_results` and `k_dead` hashes, id -> JSON."""

    r: aioredis.Redis
    k_results: str
    k_dead: str

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
