"""The ext_proc gRPC transport on the `h2` library plus thin gRPC framing, in the caller's event loop.

An alternative to `ingate.dataplane.grpc_h2` measured beside it (benchmarks/dataplane/overhead.py,
plane ``envoy-extproc-null-h2lib``; docs/envoy.md "The gRPC transport"): the HTTP/2 state machine,
HPACK, frame validation and flow control are the `h2` library's (python-hyper, the stack under
grpclib and httpx); this module adds only what gRPC puts on top (length-prefixed messages, status
trailers, one task per stream), with the same write batching as `grpc_h2` (everything one loop
iteration produced goes out in one `write`). Same shape as `GrpcH2Server`.

Flow control: received bytes are acknowledged to `h2` when a message is complete (h2 then sends
WINDOW_UPDATE once half a window is used), the peer's windows are honoured when sending.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from ingate.dataplane.grpc_h2_frames import (
    GRPC_INTERNAL,
    GRPC_OK,
    GRPC_UNIMPLEMENTED,
    MAX_FRAME,
    MAX_STREAMS,
    STREAM_WINDOW,
    StreamMethod,
)

log = logging.getLogger(__name__)

CONN_WINDOW = 256 * 1024 * 1024
_MSG_PREFIX = struct.Struct(">BI")
_RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]


def _trailers(status: int, message: str | None = None) -> list[tuple[bytes, bytes]]:
    out = [(b"grpc-status", str(status).encode())]
    if message:
        out.append((b"grpc-message", message.encode("ascii", "replace")))
    return out


class _Stream:
    __slots__ = (
        "drain",
        "headers_sent",
        "method",
        "pending",
        "queue",
        "rbuf",
        "remote_closed",
        "reset",
        "sid",
        "task",
        "waiter",
    )

    def __init__(self, sid: int, method: StreamMethod) -> None:
        self.sid = sid
        self.method = method
        self.queue: deque[Any] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.remote_closed = False
        self.reset = False
        self.rbuf = bytearray()
        self.pending = bytearray()
        self.drain: asyncio.Future[None] | None = None
        self.headers_sent = False
        self.task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    def forget_task(self, _task: asyncio.Task[None]) -> None:
        self.task = None  # no stream <-> task cycle (see grpc_h2._Stream.forget_task)


class _Connection(asyncio.Protocol):
    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_inbound_headers=False,
                validate_outbound_headers=False,
                normalize_inbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.flush_scheduled = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server._conns.add(self)
        c = self.conn
        c.initiate_connection()
        c.update_settings(
            {
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            }
        )
        c.increment_flow_control_window(CONN_WINDOW - 65_535)
        self._schedule_flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._conns.discard(self)
        for st in list(self.streams.values()):
            self._abandon(st)
        self.streams.clear()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:  # h2 has queued the GOAWAY
            log.warning("grpc connection error: %s", e)
            self._flush()
            if self.transport is not None:
                self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.DataReceived):
                self._data(ev)
            elif isinstance(ev, h2.events.RequestReceived):
                self._request(ev)
            elif isinstance(ev, h2.events.StreamEnded):
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    st.remote_closed = True
                    st.wake()
            elif isinstance(ev, h2.events.StreamReset):
                st = self.streams.pop(ev.stream_id, None)
                if st is not None:
                    self._abandon(st)
            elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self._unblock()
            elif isinstance(ev, h2.events.ConnectionTerminated) and self.transport is not None:
                self.transport.close()
        self._schedule_flush()

    # --- streams in ----------------------------------------------------------------------------

    def _request(self, ev: h2.events.RequestReceived) -> None:
        sid = ev.stream_id
        path = b""
        for k, v in ev.headers or ():
            if k == b":path":
                path = bytes(v)
                break
        method = self.server.methods.get(path.decode("latin-1"))
        if method is None or self.server._stopping:
            self.conn.send_headers(
                sid, _RESPONSE_HEADERS + _trailers(GRPC_UNIMPLEMENTED, "unknown method"), end_stream=True
            )
            return
        st = _Stream(sid, method)
        self.streams[sid] = st
        st.remote_closed = ev.stream_ended is not None
        st.task = self.loop.create_task(self._run(st))
        st.task.add_done_callback(st.forget_task)

    def _data(self, ev: h2.events.DataReceived) -> None:
        sid = ev.stream_id
        st = self.streams.get(sid)
        data = ev.data or b""
        if st is None:
            self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
            return
        rbuf = st.rbuf
        rbuf += data
        pos, end = 0, len(rbuf)
        while end - pos >= 5:
            _compressed, size = _MSG_PREFIX.unpack_from(rbuf, pos)
            if end - pos - 5 < size:
                break
            st.queue.append(st.method.decode(bytes(rbuf[pos + 5 : pos + 5 + size])))
            pos += 5 + size
        if pos:
            del rbuf[:pos]
            st.wake()
        # Credit on receipt; the handler's queue is bounded by what the peer sends in one exchange.
        self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)

    async def _requests(self, st: _Stream) -> AsyncIterator[Any]:
        q = st.queue
        while True:
            if q:
                yield q.popleft()
                continue
            if st.remote_closed or st.reset:
                return
            w = self.loop.create_future()
            st.waiter = w
            await w

    async def _run(self, st: _Stream) -> None:
        method = st.method
        gen = method.handler(self._requests(st))
        status, message = GRPC_OK, None
        try:
            async for resp in gen:
                if st.reset or self.closed:
                    break
                if not self._send_message(st, method.encode(resp)):
                    st.drain = self.loop.create_future()
                    await st.drain
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("grpc handler failed")
            status, message = GRPC_INTERNAL, f"handler error: {type(e).__name__}"
        finally:
            aclose = getattr(gen, "aclose", None)
            if aclose is not None:
                await aclose()
        if st.reset or self.closed:
            return
        if st.pending:
            st.drain = self.loop.create_future()
            await st.drain
            if st.reset or self.closed:
                return
        self._end(st, _trailers(status, message))

    def _end(self, st: _Stream, trailers: list[tuple[bytes, bytes]]) -> None:
        self.streams.pop(st.sid, None)
        head = [] if st.headers_sent else _RESPONSE_HEADERS
        try:
            self.conn.send_headers(st.sid, head + trailers, end_stream=True)
            if not st.remote_closed:
                self.conn.reset_stream(st.sid, 0)  # as grpc_h2: the client stops sending
        except h2.exceptions.StreamClosedError:
            pass
        self._schedule_flush()

    def _abandon(self, st: _Stream) -> None:
        st.reset = True
        st.pending.clear()
        st.wake()
        d = st.drain
        if d is not None and not d.done():
            d.set_result(None)
        if st.task is not None and not st.task.done():
            st.task.cancel()

    # --- streams out ---------------------------------------------------------------------------

    def _send_message(self, st: _Stream, body: bytes) -> bool:
        """Queue one message; False when flow control holds part of it back."""
        try:
            if not st.headers_sent:
                st.headers_sent = True
                self.conn.send_headers(st.sid, _RESPONSE_HEADERS)
            st.pending += _MSG_PREFIX.pack(0, len(body)) + body
            self._drain(st)
        except h2.exceptions.StreamClosedError:
            self._abandon(st)
            return True
        self._schedule_flush()
        return not st.pending

    def _drain(self, st: _Stream) -> None:
        c = self.conn
        pending = st.pending
        while pending:
            room = min(c.local_flow_control_window(st.sid), c.max_outbound_frame_size, len(pending))
            if room <= 0:
                return
            c.send_data(st.sid, bytes(pending[:room]))
            del pending[:room]
        d = st.drain
        if d is not None and not d.done():
            d.set_result(None)

    def _unblock(self) -> None:
        for st in list(self.streams.values()):
            if st.pending and not st.reset:
                try:
                    self._drain(st)
                except h2.exceptions.StreamClosedError:
                    self._abandon(st)

    def _schedule_flush(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


class H2Server:
    """Serves `methods` (`{"/package.Service/Method": StreamMethod}`) over `h2` on one TCP address."""

    def __init__(self, methods: Mapping[str, StreamMethod]) -> None:
        self.methods = dict(methods)
        self._server: asyncio.Server | None = None
        self._conns: set[_Connection] = set()
        self._stopping = False
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Bind and serve; returns the bound port."""
        loop = asyncio.get_running_loop()
        self._stopping = False
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, backlog=1024, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def active_streams(self) -> int:
        return sum(len(c.streams) for c in self._conns)

    async def stop(self, grace: float = 1.0) -> None:
        """Stop listening, GOAWAY every connection, give open streams `grace` seconds, then close."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
            self._server = None
        for c in list(self._conns):
            c.conn.close_connection()
            c._flush()
        running = [st.task for c in self._conns for st in c.streams.values() if st.task is not None]
        if running and grace > 0:
            await asyncio.wait(running, timeout=grace)
        for c in list(self._conns):
            for st in list(c.streams.values()):
                c._abandon(st)
            if c.transport is not None:
                c.transport.close()
