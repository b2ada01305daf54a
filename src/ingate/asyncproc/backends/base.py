"""The queue-backend interface the processor needs, and nothing more.

A backend holds request messages (raw bytes: validation is the processor's job, so a malformed message
can still be answered), hands them out under a visibility lease, and stores results keyed by request id.
The guarantees the processor builds on:

- ``claim`` hides a message for ``lease_s``; if the claimer dies without ``complete``/``retry``/
  ``dead_letter``, the message becomes claimable again when the lease runs out (at-least-once), and that
  abandoned delivery counts as a failed attempt (so a message that kills processors ends dead-lettered).
- ``complete`` writes the result only if the id has none yet, and removes the message, atomically where
  the store allows it: a redelivered id never yields two results.
- ``retry`` makes the message claimable again after ``delay_s`` (optionally counting a failed attempt).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from ingate.asyncproc.models import AsyncResult


def peek_id(body: bytes) -> str | None:
    """The request id of a raw message, for a backend's bookkeeping (None when it has no usable one:
    validating is the processor's job)."""
    import orjson

    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    rid = doc.get("id") if isinstance(doc, dict) else None
    return rid if isinstance(rid, str) else None


@dataclass(slots=True)
class Delivery:
    """One claimed message."""

    key: str
    """The backend's handle for this message (row id, stream entry id, ...)."""
    body: bytes
    attempts: int
    """Failed attempts so far (sheds do not count; abandoned deliveries do)."""
    enqueued_at: float
    """Unix seconds the message entered the queue."""


@dataclass(slots=True)
class DeadLetter:
    id: str
    body: bytes
    attempts: int
    error: str
    at: float


class QueueBackend(Protocol):
    """A durable queue of request messages plus a result store keyed by request id."""

    name: str
    quiet_s: float
    """Seconds the queue must go without a delivery before an empty ``backlog`` is believed (a broker
    that hides messages a dead consumer pulled until their lease runs out, as Pub/Sub does; 0 for
    stores that count every message)."""

    async def submit(self, bodies: Sequence[bytes]) -> int:
        """Enqueue raw messages; returns how many were enqueued."""
        ...

    async def claim(self, n: int, lease_s: float) -> list[Delivery]:
        """Up to ``n`` claimable messages, earliest deadline first where the store can order them."""
        ...

    async def extend(self, key: str, lease_s: float) -> bool:
        """Renew a claim; False if this consumer no longer holds it."""
        ...

    async def complete(self, key: str, result: AsyncResult) -> bool:
        """Store ``result`` unless its id has one, and drop the message. True if this call stored it."""
        ...

    async def ack(self, key: str) -> None:
        """Drop the message without a result (its id already has an outcome)."""
        ...

    async def retry(self, key: str, delay_s: float, *, count_attempt: bool, error: str = "") -> None:
        """Release the claim; claimable again after ``delay_s``."""
        ...

    async def dead_letter(self, key: str, id: str, error: str) -> None:
        """Move the message to the dead-letter store with its last error."""
        ...

    async def has_result(self, id: str) -> bool: ...

    async def get_result(self, id: str) -> AsyncResult | None: ...

    def results(self) -> AsyncIterator[AsyncResult]:
        """Every stored result (for export)."""
        ...

    async def dead_letters(self) -> list[DeadLetter]: ...

    async def cancel(self, id: str) -> None:
        """Mark ``id`` cancelled: a queued message is answered CANCELLED instead of being sent; an
        in-flight one is abandoned at the next check."""
        ...

    async def is_cancelled(self, id: str) -> bool: ...

    async def backlog(self) -> int:
        """Messages waiting or in flight (not yet completed or dead-lettered)."""
        ...

    async def put_meta(self, key: str, value: bytes) -> None:
        """Store a small document (e.g. a batch manifest) under ``key``."""
        ...

    async def get_meta(self, key: str) -> bytes | None: ...

    async def status(self, id: str) -> str | None:
        """``queued``, ``in_progress``, ``completed``, ``dead_lettered`` or None (unknown id)."""
        ...

    async def close(self) -> None: ...
