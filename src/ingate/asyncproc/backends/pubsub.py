"""Google Cloud Pub/Sub: request messages from a pull subscription, results to a topic.

The same wire contract as llm-d-async's ``gcp-pubsub`` transport: a request message's data is the
llm-d-async request JSON (its attributes are merged into ``metadata``), and every outcome is published
to the result topic as the llm-d-async result JSON. The mapping onto the queue interface:

- **claim** = synchronous pull; the **lease** is the message's ack deadline, **extended** with
  ``modify_ack_deadline`` while the request runs (at most 600 s per call, Pub/Sub's limit);
- **retry after a delay** = ``modify_ack_deadline(delay)``: the message is redelivered when it runs
  out (Pub/Sub caps it at 600 s; a 0 s delay is a nack);
- **complete** = record the result in the ledger (insert-if-absent, keyed by request id), publish it to
  the result topic, wait for the publish to be confirmed, then acknowledge;
- **dead letter** = record it in the ledger (and publish the record to the dead-letter topic, when one
  is configured), then acknowledge.

Pub/Sub keeps no outcome, attempt count (without a dead-letter policy) or backlog count, so a ledger
(:mod:`ingate.asyncproc.backends.ledger`: SQLite file or Redis) keeps them. Guarantees: one stored
result per request id (the ledger's insert-if-absent); a killed processor's messages are redelivered
when their ack deadline passes and their result, if recorded but not confirmed published, is published
on that redelivery, so the result topic gets every outcome **at least once**, identical copies
possible (consumers dedupe by id, as they must with any Pub/Sub subscription).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import orjson

from ingate.asyncproc.backends.base import DeadLetter, Delivery, peek_id
from ingate.asyncproc.backends.ledger import Ledger
from ingate.asyncproc.models import AsyncResult

MAX_ACK_DEADLINE_S = 600  # Pub/Sub's limit for one modify_ack_deadline / ack_deadline_seconds
PULL_TIMEOUT_S = 0.5


def _with_attributes(body: bytes, attributes: dict[str, str]) -> bytes:
    """Merge message attributes into the request's ``metadata`` (as llm-d-async does); a body that is
    not a JSON object is left for the processor to answer INVALID_REQUEST."""
    if not attributes:
        return body
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(doc, dict):
        return body
    meta = doc.get("metadata")
    meta = dict(meta) if isinstance(meta, dict) else {}
    for k, v in attributes.items():
        meta.setdefault(k, v)  # the message's own metadata wins over transport attributes
    doc["metadata"] = meta
    return orjson.dumps(doc)


class PubSubBackend:
    """:class:`~ingate.asyncproc.backends.base.QueueBackend` on a Pub/Sub subscription + a ledger.

    Uses the synchronous Google client in worker threads (it honours ``PUBSUB_EMULATOR_HOST``)."""

    name = "pubsub"

    def __init__(
        self,
        project: str,
        subscription: str,
        *,
        result_topic: str,
        ledger: Ledger,
        dead_topic: str | None = None,
        request_topic: str | None = None,
        create: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from google.cloud import pubsub_v1

        self.project = project
        self._sub = pubsub_v1.SubscriberClient()
        self._pub = pubsub_v1.PublisherClient()
        self.sub_path = self._sub.subscription_path(project, subscription)
        self.result_path = self._pub.topic_path(project, result_topic)
        self.dead_path = self._pub.topic_path(project, dead_topic) if dead_topic else None
        self.request_path = self._pub.topic_path(project, request_topic) if request_topic else None
        self.ledger = ledger
        self.clock = clock
        self._create = create
        self._ready = False
        self.quiet_s = float(MAX_ACK_DEADLINE_S)
        """How long the queue must stay without deliveries before it counts as empty (processor's
        --exit-when-empty): the subscription's ack deadline, read at start."""
        # ack id -> (Pub/Sub message id, request id, body, failed attempts) of the deliveries held here.
        self._held: dict[str, tuple[str, str | None, bytes, int]] = {}

    async def _ensure(self) -> None:
        """Create the topics and the subscription when asked to (tests, demos); look up the request
        topic from the subscription otherwise (for ``submit``)."""
        if self._ready:
            return

        def go() -> None:
            from google.api_core.exceptions import AlreadyExists

            if self._create:
                topics = [t for t in (self.request_path, self.result_path, self.dead_path) if t]
                for t in topics:
                    try:
                        self._pub.create_topic(name=t)
                    except AlreadyExists:
                        pass
                if self.request_path:
                    try:
                        self._sub.create_subscription(
                            name=self.sub_path, topic=self.request_path, ack_deadline_seconds=10
                        )
                    except AlreadyExists:
                        pass
            sub = self._sub.get_subscription(subscription=self.sub_path)
            if self.request_path is None:
                self.request_path = sub.topic
            # Messages a processor pulled and died with stay hidden this long (until it renews them).
            self.quiet_s = float(max(sub.ack_deadline_seconds, 10)) + 1.0

        await asyncio.to_thread(go)
        self._ready = True

    async def _publish(self, topic: str, data: bytes) -> None:
        fut = self._pub.publish(topic, data)
        await asyncio.to_thread(fut.result, 30)

    async def _modack(self, ack_ids: list[str], seconds: float) -> None:
        s = max(0, min(MAX_ACK_DEADLINE_S, round(seconds)))
        req = {"subscription": self.sub_path, "ack_ids": ack_ids, "ack_deadline_seconds": s}
        await asyncio.to_thread(self._sub.modify_ack_deadline, request=req)

    async def _ack(self, ack_id: str) -> None:
        await asyncio.to_thread(
            self._sub.acknowledge, request={"subscription": self.sub_path, "ack_ids": [ack_id]}
        )

    async def submit(self, bodies: Sequence[bytes]) -> int:
        await self._ensure()
        assert self.request_path is not None
        futs = [self._pub.publish(self.request_path, b) for b in bodies]
        await asyncio.to_thread(lambda: [f.result(30) for f in futs])
        await self.ledger.submitted([i for i in map(peek_id, bodies) if i is not None])
        return len(bodies)

    async def claim(self, n: int, lease_s: float) -> list[Delivery]:
        if n <= 0:
            return []
        await self._ensure()
        from google.api_core.exceptions import DeadlineExceeded

        def pull() -> Any:
            try:
                return self._sub.pull(
                    request={"subscription": self.sub_path, "max_messages": n}, timeout=PULL_TIMEOUT_S
                ).received_messages
            except DeadlineExceeded:  # nothing to deliver within the timeout
                return []

        got = await asyncio.to_thread(pull)
        if got:  # the lease starts now, whatever ack deadline the subscription was created with
            await self._modack([m.ack_id for m in got], lease_s)
        out: list[Delivery] = []
        for m in got:
            msg = m.message
            body = _with_attributes(bytes(msg.data), dict(msg.attributes))
            rid = peek_id(body)
            attempts = await self.ledger.delivered(msg.message_id, rid)
            self._held[m.ack_id] = (msg.message_id, rid, body, attempts)
            enq = msg.publish_time.timestamp() if msg.publish_time else self.clock()
            out.append(Delivery(m.ack_id, body, attempts, enq))
        return out

    async def extend(self, key: str, lease_s: float) -> bool:
        if key not in self._held:
            return False
        await self._modack([key], lease_s)
        return True

    async def _publish_result(self, id: str) -> None:
        pending = await self.ledger.unpublished(id)
        if pending is not None:
            await self._publish(self.result_path, pending.encode())
            await self.ledger.mark_published(id)

    async def complete(self, key: str, result: AsyncResult) -> bool:
        wrote = await self.ledger.record_result(result)
        # Publish before acknowledging: a crash in between redelivers the message, and ack() then
        # publishes the recorded result (never a second, different one).
        await self._publish_result(result.id)
        await self._finish(key)
        return wrote

    async def _finish(self, key: str) -> None:
        # Ledger first: a crash between the two redelivers the message (it is then answered from the
        # ledger and finished again); the other order could leave it open in the ledger for ever.
        held = self._held.pop(key, None)
        if held is not None:
            await self.ledger.finished(held[0])
        await self._ack(key)

    async def ack(self, key: str) -> None:
        held = self._held.get(key)
        if held is not None and held[1] is not None:
            await self._publish_result(held[1])
        await self._finish(key)

    async def retry(self, key: str, delay_s: float, *, count_attempt: bool, error: str = "") -> None:
        held = self._held.pop(key, None)
        await self._modack([key], delay_s)
        if held is not None:
            await self.ledger.released(held[0], free=not count_attempt)

    async def dead_letter(self, key: str, id: str, error: str) -> None:
        held = self._held.get(key)
        body, attempts = (held[2], held[3] + 1) if held else (b"", 1)
        dead = DeadLetter(id, body, attempts, error, self.clock())
        if await self.ledger.record_dead(dead) and self.dead_path:
            doc = {"id": id, "body": body.decode("utf-8", "replace"), "attempts": attempts, "error": error}
            await self._publish(self.dead_path, orjson.dumps(doc))
        await self._finish(key)

    async def has_result(self, id: str) -> bool:
        return await self.ledger.has_result(id)

    async def get_result(self, id: str) -> AsyncResult | None:
        return await self.ledger.get_result(id)

    async def results(self) -> AsyncIterator[AsyncResult]:
        async for r in self.ledger.results():
            yield r

    async def dead_letters(self) -> list[DeadLetter]:
        return await self.ledger.dead_letters()

    async def cancel(self, id: str) -> None:
        await self.ledger.cancel(id)

    async def is_cancelled(self, id: str) -> bool:
        return await self.ledger.is_cancelled(id)

    async def backlog(self) -> int:
        """Messages delivered and not finished (held here, waiting for redelivery, or abandoned by a
        killed processor), from the ledger: Pub/Sub has no cheap count of never-delivered messages
        (Cloud Monitoring's ``num_undelivered_messages`` lags by minutes), so those are not included."""
        return await self.ledger.open_count()

    async def put_meta(self, key: str, value: bytes) -> None:
        await self.ledger.put_meta(key, value)

    async def get_meta(self, key: str) -> bytes | None:
        return await self.ledger.get_meta(key)

    async def status(self, id: str) -> str | None:
        return await self.ledger.status(id)

    async def close(self) -> None:
        await asyncio.to_thread(self._pub.stop)
        self._sub.close()
        await self.ledger.close()
