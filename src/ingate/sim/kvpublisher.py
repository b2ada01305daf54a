"""A replica's vLLM-format KV-cache event publisher: ZMQ PUB plus a ROUTER replay socket.

Behaves as vLLM's ``ZmqEventPublisher`` (format in `ingate.metrics.kvevents`): each batch goes out as
``[topic, seq, payload]`` with seq counting from 0; the last ``buffer_steps`` batches are kept, and a
request on the replay socket carrying an 8-byte start sequence gets every kept batch from there on,
then the end marker. Sending never blocks the engine: PUB drops messages past its high-water mark, as
vLLM's does, and subscribers recover them through the replay socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

import zmq
import zmq.asyncio

from ingate.metrics.kvevents import END_SEQ, LAYOUTS, KVEvent, encode_batch, new_batch, seq_bytes

log = logging.getLogger(__name__)


def _bind(sock: zmq.Socket[bytes] | zmq.asyncio.Socket, host: str, port: int) -> str:
    """Bind on ``host:port`` (0 = an ephemeral port); returns the connectable ``tcp://host:port``."""
    if port == 0:
        port = sock.bind_to_random_port(f"tcp://{host}")
    else:
        sock.bind(f"tcp://{host}:{port}")
    return f"tcp://{host}:{port}"


class KVEventPublisher:
    """PUB + replay sockets of one replica; `publish` is called by the engine once per step."""

    def __init__(
        self,
        host: str,
        port: int,
        replay_port: int | None,
        topic: str,
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        layout: str = "map",
    ) -> None:
        if buffer_steps < 1:
            raise ValueError("buffer_steps must be positive")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}")
        self.layout = layout
        self.topic = topic.encode()
        # PUB is a plain socket (the engine sends from synchronous code); only the replay socket awaits.
        self._pub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
        self._pub.set_hwm(hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._replay: zmq.asyncio.Socket | None = None
        try:
            self.endpoint = _bind(self._pub, host, port)
            self.replay_endpoint: str | None = None
            if replay_port is not None:
                self._replay = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self.replay_endpoint = _bind(self._replay, host, replay_port)
        except zmq.ZMQError:
            self.close()
            raise
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq = 0
        self.dropped = 0  # sends that failed (they stay replayable)
        self._task: asyncio.Task[None] | None = None

    @property
    def next_seq(self) -> int:
        """Sequence number the next batch will carry."""
        return self._seq

    def start(self) -> None:
        if self._replay is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve_replay(), name="kv-replay")

    def publish(self, events: list[KVEvent]) -> int:
        """Send one batch now; returns its sequence number."""
        seq = self._seq
        self._seq += 1
        payload = encode_batch(new_batch(events), self.layout)
        self._buffer.append((seq, payload))
        try:
            # PUB never waits: past the high-water mark it drops (the batch stays replayable).
            self._pub.send_multipart((self.topic, seq_bytes(seq), payload), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            self.dropped += 1
        return seq

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        sock = self._replay
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3:
                log.warning("ignoring a malformed KV-event replay request (%d frames)", len(frames))
                continue
            client, _, start_frame = frames
            start = int.from_bytes(start_frame, "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await sock.send_multipart((client, b"", seq_bytes(seq), payload))
            await sock.send_multipart((client, b"", END_SEQ, b""))

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.close()

    def close(self) -> None:
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
