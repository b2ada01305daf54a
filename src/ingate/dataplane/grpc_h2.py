"""A small asyncio gRPC server (HTTP/2 cleartext) for bidirectional-streaming methods.

Why not grpcio: `grpc.aio` runs the HTTP/2 stack on its own poller thread and hands every message to
the event loop through an eventfd, so each gRPC message costs two thread wake-ups (measured: ~3.3 ms per
4-message ext_proc stream on a 2-core VM, most of it waiting on wake-ups, not computing). Envoy's
ext_proc exchange is several strictly sequential round trips per HTTP request, so those hops add up.
This server runs in the caller's event loop (uvloop in production), parses HTTP/2 frames itself and
writes everything one loop iteration produced in a single `write`.

Scope (what Envoy's gRPC client needs, nothing more):

- h2c with prior knowledge (client preface, SETTINGS/ACK, PING, WINDOW_UPDATE, RST_STREAM, GOAWAY,
  PRIORITY ignored, unknown frame types ignored, HEADERS + CONTINUATION, padding);
- HPACK decoding with the `hpack` package (every header block is decoded, so the dynamic table stays in
  sync); our own header blocks use only the static table and literals without indexing, so they are
  prebuilt bytes;
- flow control both ways: we advertise large windows and credit the connection on receipt and each
  stream when its messages are consumed; we honour the peer's windows and `MAX_FRAME_SIZE` when sending;
- gRPC length-prefixed messages (uncompressed only: we advertise no `grpc-accept-encoding`), status in
  trailers (`grpc-status` / `grpc-message`).

Hostile peers (RFC 9113 errors and the known HTTP/2 flood attacks; `tests/unit/test_grpc_h2_fuzz.py`):
every frame is validated (sizes, stream states, stream ids, window arithmetic) and answered with the
RFC's connection error (GOAWAY + close) or stream error (RST_STREAM). Memory per connection is bounded:
received bytes are credited back only once the handler consumed them (so at most the connection
window is buffered), a header block is capped at `MAX_HEADER_BLOCK` bytes and `MAX_CONTINUATIONS`
frames, open streams at `max_concurrent_streams` (more are refused), and when the peer stops reading
(its TCP window full, our write buffer over the transport's high-water mark) we stop reading it too,
so PING/SETTINGS/HEADERS floods cannot queue unbounded answers. Runs of empty frames get
ENHANCE_YOUR_CALM. A peer that resets streams as fast as it opens them ("rapid reset") costs a task
creation and cancellation each: a reset stream's state is freed at once.

A method is a `StreamMethod`: a decoder for request messages, a handler `(requests) -> responses`
(async iterator in, async iterator out) and an encoder. A stream reset by the peer, or a connection that
drops, cancels the handler's task; the handler's `finally` runs exactly once either way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from ssl import SSLContext

from ingate.dataplane.grpc_h2_conn import _Connection
from ingate.dataplane.grpc_h2_frames import (
    CONN_WINDOW,
    MAX_STREAMS,
    MAX_WINDOW,
    NO_ERROR,
    STREAM_WINDOW,
    StreamMethod,
)

__all__ = ["GrpcH2Server", "StreamMethod"]


class GrpcH2Server:
    """Serves `methods` (`{"/package.Service/Method": StreamMethod}`) on one TCP address."""

    def __init__(
        self,
        methods: Mapping[str, StreamMethod],
        *,
        max_message_bytes: int = 64 * 1024 * 1024,
        max_concurrent_streams: int = MAX_STREAMS,
    ) -> None:
        self.methods = dict(methods)
        self.max_message_bytes = max_message_bytes
        self.max_concurrent_streams = max_concurrent_streams
        # A stream is credited for whole messages only, so its window must hold the largest one.
        self.stream_window = min(MAX_WINDOW, max(STREAM_WINDOW, max_message_bytes + 5))
        self.conn_window = min(MAX_WINDOW, max(CONN_WINDOW, 4 * (max_message_bytes + 5)))
        self._server: asyncio.Server | None = None
        self._conns: set[_Connection] = set()
        self._stopping = False
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0, ssl: SSLContext | None = None) -> int:
        """Bind and serve (over TLS with `ssl`, which must offer ALPN `h2`); returns the bound port."""
        loop = asyncio.get_running_loop()
        self._stopping = False
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, backlog=1024, reuse_address=True, ssl=ssl
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def active_streams(self) -> int:
        """Streams open on all connections."""
        return sum(len(c.streams) for c in self._conns)

    async def stop(self, grace: float = 1.0) -> None:
        """Stop listening, GOAWAY every connection, give open streams `grace` seconds, then close."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
            self._server = None
        for c in list(self._conns):
            c._goaway(NO_ERROR)
            c._flush()
        running = [st.task for c in self._conns for st in c.streams.values() if st.task is not None]
        if running and grace > 0:
            await asyncio.wait(running, timeout=grace)
        tasks = []
        for c in list(self._conns):
            for st in list(c.streams.values()):
                if st.task is not None:
                    tasks.append(st.task)
                c._abandon(st)
            if c.transport is not None:
                c.transport.close()
        if tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait(tasks, timeout=1.0)
