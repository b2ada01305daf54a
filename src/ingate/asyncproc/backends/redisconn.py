"""Redis client settings shared by the Redis backends.

A dropped connection (a Redis restart or failover, a proxy timing out an idle connection, a command
cancelled mid-reply that leaves its connection unusable) is retried on a fresh connection a few times
with backoff instead of failing the message. Every command and script the backends send is safe to
repeat: the scripts check the entry they act on still exists and write a result only once per id.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError


def reconnect() -> dict[str, Any]:
    """Client keyword arguments: up to 3 retries on a fresh connection, 20 ms to 0.5 s apart, and no
    command waits on a silent connection for more than 5 s (the backends never block server-side)."""
    return {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 5.0,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.02), 3),
        "retry_on_error": [ConnectionError, TimeoutError],
    }
