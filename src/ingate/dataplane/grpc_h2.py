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

A method is a `StreamMethod`: a decoder for request messages, a handler `(requests) -> responses`
(async iterator in, async iterator out) and an encoder. A stream reset by the peer, or a connection that
drops, cancels the handler's task; the handler's `finally` runs exactly once either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any, cast
from urllib.parse import quote

import hpack

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
F_END_STREAM = 0x1
F_ACK = 0x1
F_END_HEADERS = 0x4
F_PADDED = 0x8
F_PRIORITY = 0x20

# Settings identifiers.
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE = (
    1,
    2,
    3,
    4,
    5,
)

# Error codes.
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0, 1, 3, 6
REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 7, 8, 9

# gRPC status codes used here.
GRPC_OK, GRPC_INTERNAL, GRPC_UNIMPLEMENTED, GRPC_RESOURCE_EXHAUSTED = 0, 13, 12, 8

DEFAULT_WINDOW = 65_535
STREAM_WINDOW = 16 * 1024 * 1024
"""Initial window we give each stream (SETTINGS_INITIAL_WINDOW_SIZE)."""
CONN_WINDOW = 1 << 30
"""Connection window we open right after the preface (WINDOW_UPDATE on stream 0)."""
MAX_FRAME = 1 << 20
"""Largest frame we accept (SETTINGS_MAX_FRAME_SIZE); fewer, larger frames from the peer."""
MAX_STREAMS = 100_000
BLOCK_CACHE = 256
"""Decoded header blocks remembered per connection (see `_Connection._decode_block`)."""

_FRAME = struct.Struct(">HBBBI")  # 24-bit length as (high 16, low 8), type, flags, stream id
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")
_MSG_PREFIX = struct.Struct(">BI")


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame: 9-byte header + payload."""
    n = len(payload)
    return _FRAME.pack(n >> 8, n & 0xFF, ftype, flags, sid) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """HPACK literal header field without indexing, new name (no dynamic-table side effects)."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def _literal_indexed_name(index: int, value: bytes) -> bytes:
    """HPACK literal without indexing whose name is static-table entry `index`."""
    return _hpack_int(index, 4) + _hpack_int(len(value), 7) + value


# `:status: 200` is static entry 8; `content-type` is static entry 31.
RESPONSE_HEADERS = b"\x88" + _literal_indexed_name(31, b"application/grpc")


def trailers_block(status: int, message: str | None = None) -> bytes:
    """HPACK block with `grpc-status` (and a percent-encoded `grpc-message`)."""
    block = _literal(b"grpc-status", str(status).encode())
    if message:
        block += _literal(b"grpc-message", quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode())
    return block


OK_TRAILERS = trailers_block(GRPC_OK)


class ConnectionError_(Exception):
    """A connection-level protocol error: the connection is closed with GOAWAY(code)."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


@dataclass(frozen=True, slots=True)
class StreamMethod:
    """One bidirectional-streaming method."""

    decode: Callable[[bytes], Any]
    handler: Callable[[AsyncIterator[Any]], AsyncIterator[Any]]
    encode: Callable[[Any], bytes]


class _Stream:
    __slots__ = (
        "consumed",
        "drain",
        "headers_sent",
        "local_closed",
        "method",
        "pending",
        "queue",
        "rbuf",
        "remote_closed",
        "reset",
        "send_window",
        "sid",
        "task",
        "waiter",
    )

    def __init__(self, sid: int, send_window: int, method: StreamMethod) -> None:
        self.sid = sid
        self.method = method
        self.headers_sent = False
        self.queue: deque[tuple[Any, int]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.remote_closed = False
        self.local_closed = False
        self.reset = False
        self.send_window = send_window
        self.pending: deque[memoryview] = deque()
        """DATA payload waiting for flow-control credit, in order."""
        self.drain: asyncio.Future[None] | None = None
        self.rbuf = bytearray()
        """Bytes of a gRPC message split over DATA frames."""
        self.task: asyncio.Task[None] | None = None
        self.consumed = 0
        """Bytes handed to the handler and not yet credited back with WINDOW_UPDATE."""

    def forget_task(self, _task: asyncio.Task[None]) -> None:
        """Drop the finished task. A stream reset cancels its task, and the CancelledError's traceback
        holds the frames, whose locals hold this stream: while the stream held the task too, every
        reset request (most of them: Envoy resets each ext_proc stream at the end of its HTTP stream)
        left a reference cycle of ~40 objects for the cyclic GC, whose collections then paused the
        loop for 10-20 ms."""
        self.task = None

    def wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)


class _Connection(asyncio.Protocol):
    """One client connection: frame parsing, flow control, one task per stream."""

    def __init__(self, server: GrpcH2Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.preface_ok = False
        self.decoder = hpack.Decoder()
        self.streams: dict[int, _Stream] = {}
        self.last_sid = 0
        self.peer_window = DEFAULT_WINDOW
        """Peer's initial stream window (its SETTINGS_INITIAL_WINDOW_SIZE)."""
        self.peer_max_frame = 16_384
        self.send_window = DEFAULT_WINDOW
        """Connection-level send window."""
        self.recv_unacked = 0
        self.blocked: deque[_Stream] = deque()
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.hdr_sid = 0
        """Stream whose header block continues in CONTINUATION frames (0 = none)."""
        self.hdr_block = bytearray()
        self.hdr_end_stream = False
        self.closed = False
        self.going_away = False
        self.block_cache: dict[tuple[tuple[int, int, int], bytes], list[tuple[bytes, bytes]]] = {}

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.server._conns.add(self)
        settings = b"".join(
            _SETTING.pack(k, v)
            for k, v in (
                (S_ENABLE_PUSH, 0),
                (S_MAX_CONCURRENT_STREAMS, MAX_STREAMS),
                (S_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                (S_MAX_FRAME_SIZE, MAX_FRAME),
            )
        )
        self._write(frame(SETTINGS, 0, 0, settings))
        self._write(frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONN_WINDOW - DEFAULT_WINDOW)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._conns.discard(self)
        for st in list(self.streams.values()):
            self._abandon(st)
        self.streams.clear()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        try:
            if not self.preface_ok:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buf)):
                        raise ConnectionError_(PROTOCOL_ERROR, "bad client preface")
                    return
                if buf[: len(PREFACE)] != PREFACE:
                    raise ConnectionError_(PROTOCOL_ERROR, "bad client preface")
                del buf[: len(PREFACE)]
                self.preface_ok = True
            pos = 0
            end = len(buf)
            unpack = _FRAME.unpack_from
            while end - pos >= 9:
                hi, lo, ftype, flags, sid = unpack(buf, pos)
                n = (hi << 8) | lo
                if n > MAX_FRAME:
                    raise ConnectionError_(FRAME_SIZE_ERROR, f"frame of {n} bytes")
                if end - pos - 9 < n:
                    break
                payload = bytes(buf[pos + 9 : pos + 9 + n])
                pos += 9 + n
                self._frame(ftype, flags, sid & 0x7FFFFFFF, payload)
                if self.closed:
                    return
            if pos:
                del buf[:pos]
        except ConnectionError_ as e:
            log.warning("grpc connection error: %s", e)
            self._goaway(e.code)
            if self.transport is not None:
                self._flush()
                self.transport.close()

    # --- frames in ---------------------------------------------------------------------------

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self.hdr_sid and (ftype != CONTINUATION or sid != self.hdr_sid):
            raise ConnectionError_(PROTOCOL_ERROR, "header block interrupted")
        if ftype == DATA:
            self._data(flags, sid, payload)
        elif ftype == HEADERS:
            self._headers(flags, sid, payload)
        elif ftype == CONTINUATION:
            if not self.hdr_sid:
                raise ConnectionError_(PROTOCOL_ERROR, "unexpected CONTINUATION")
            self.hdr_block += payload
            if flags & F_END_HEADERS:
                sid, block, eos = self.hdr_sid, bytes(self.hdr_block), self.hdr_end_stream
                self.hdr_sid = 0
                self.hdr_block.clear()
                self._header_block(sid, block, eos)
        elif ftype == WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif ftype == RST_STREAM:
            st = self.streams.pop(sid, None)
            if st is not None:
                self._abandon(st)
        elif ftype == SETTINGS:
            if sid:
                raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS on a stream")
            if not flags & F_ACK:
                self._settings(payload)
                self._write(frame(SETTINGS, F_ACK, 0))
        elif ftype == PING:
            if len(payload) != 8:
                raise ConnectionError_(FRAME_SIZE_ERROR, "PING payload")
            if not flags & F_ACK:
                self._write(frame(PING, F_ACK, 0, payload))
        elif ftype == GOAWAY:
            self.going_away = True
        elif ftype == PUSH_PROMISE:
            raise ConnectionError_(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # PRIORITY and unknown types: ignored (RFC 9113 section 5.5).

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS payload")
        for off in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, off)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > 0x7FFFFFFF:
                    raise ConnectionError_(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_window
                self.peer_window = value
                for st in self.streams.values():
                    st.send_window += delta
                    if st.pending and st not in self.blocked:
                        self.blocked.append(st)
                if delta > 0:
                    self._unblock()
            elif key == S_MAX_FRAME_SIZE:
                if not 16_384 <= value <= 16_777_215:
                    raise ConnectionError_(PROTOCOL_ERROR, "bad MAX_FRAME_SIZE")
                self.peer_max_frame = value
            # HEADER_TABLE_SIZE: our blocks never use the dynamic table. Others: nothing to do.

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "WINDOW_UPDATE payload")
        inc = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            self.send_window += inc
        else:
            st = self.streams.get(sid)
            if st is None:
                return
            st.send_window += inc
        self._unblock()

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "HEADERS on stream 0")
        off = 0
        end = len(payload)
        if flags & F_PADDED:
            if not payload:
                raise ConnectionError_(PROTOCOL_ERROR, "padding")
            end -= payload[0]
            off = 1
        if flags & F_PRIORITY:
            off += 5
        if end < off:
            raise ConnectionError_(PROTOCOL_ERROR, "padding")
        fragment = payload[off:end]
        eos = bool(flags & F_END_STREAM)
        if flags & F_END_HEADERS:
            self._header_block(sid, fragment, eos)
        else:
            self.hdr_sid = sid
            self.hdr_block = bytearray(fragment)
            self.hdr_end_stream = eos

    def _table_state(self) -> tuple[int, int, int]:
        """Identifies the HPACK dynamic table's content: an insertion always puts a new entry first."""
        t = self.decoder.header_table
        entries = t.dynamic_entries
        return len(entries), id(entries[0]) if entries else 0, t.maxsize

    def _decode_block(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """Decode a header block; a block already seen against the same table state is not re-decoded.

        Envoy's request headers are identical on every stream once its encoder has indexed them
        (a few bytes of indexed fields), so the cache hits on nearly every stream. Only blocks that
        left the table unchanged are cached, so skipping their decode cannot desynchronise the table.
        """
        before = self._table_state()
        key = (before, block)
        hit = self.block_cache.get(key)
        if hit is not None:
            return hit
        try:
            headers = cast(list[tuple[bytes, bytes]], self.decoder.decode(block, raw=True))
        except Exception as e:  # hpack raises several types; all are fatal for the connection
            raise ConnectionError_(COMPRESSION_ERROR, f"HPACK: {e}") from None
        if self._table_state() == before:
            if len(self.block_cache) >= BLOCK_CACHE:
                self.block_cache.clear()
            self.block_cache[key] = headers
        return headers

    def _header_block(self, sid: int, block: bytes, eos: bool) -> None:
        headers = self._decode_block(block)
        st = self.streams.get(sid)
        if st is not None:  # trailers from the client
            if not eos:
                raise ConnectionError_(PROTOCOL_ERROR, "trailers without END_STREAM")
            self._remote_end(st)
            return
        if sid <= self.last_sid:
            return  # a stream we already closed: the block only had to be decoded
        if sid % 2 == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "even stream id from a client")
        self.last_sid = sid
        if self.going_away or self.server._stopping:
            self._write(frame(RST_STREAM, 0, sid, _U32.pack(REFUSED_STREAM)))
            self._schedule_flush()
            return
        path = b""
        for k, v in headers:
            if k == b":path":
                path = v
                break
        method = self.server.methods.get(path.decode("latin-1"))
        if method is None:
            self._write(
                frame(
                    HEADERS,
                    F_END_HEADERS | F_END_STREAM,
                    sid,
                    RESPONSE_HEADERS + trailers_block(GRPC_UNIMPLEMENTED, "unknown method"),
                )
            )
            # No RST_STREAM: the client may still be sending its first message, and a reset would
            # turn the status it is about to read into a send failure. Its DATA is ignored.
            self._schedule_flush()
            return
        st = _Stream(sid, self.peer_window, method)
        self.streams[sid] = st
        st.remote_closed = eos
        st.task = self.loop.create_task(self._run(st))
        st.task.add_done_callback(st.forget_task)

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        n = len(payload)
        self.recv_unacked += n
        if self.recv_unacked >= CONN_WINDOW // 2:
            self._write(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.recv_unacked)))
            self.recv_unacked = 0
            self._schedule_flush()
        st = self.streams.get(sid)
        if st is None:
            if sid == 0 or sid > self.last_sid:
                raise ConnectionError_(PROTOCOL_ERROR, "DATA on an idle stream")
            return  # closed stream: credited on the connection, otherwise ignored
        if flags & F_PADDED:
            if not payload or payload[0] >= n:
                raise ConnectionError_(PROTOCOL_ERROR, "padding")
            st.consumed += payload[0] + 1
            payload = payload[1 : n - payload[0]]
        if st.remote_closed:
            raise ConnectionError_(PROTOCOL_ERROR, "DATA after END_STREAM")
        self._messages(st, payload)
        if flags & F_END_STREAM:
            self._remote_end(st)

    def _messages(self, st: _Stream, payload: bytes) -> None:
        """Split DATA into gRPC messages; decode and queue each for the stream's handler."""
        rbuf = st.rbuf
        if rbuf:
            rbuf += payload
            data: bytes | bytearray = rbuf
        else:
            data = payload
        pos = 0
        end = len(data)
        decode = st.method.decode
        woke = False
        while end - pos >= 5:
            compressed, size = _MSG_PREFIX.unpack_from(data, pos)
            if end - pos - 5 < size:
                break
            if compressed:
                self._fail_stream(st, GRPC_INTERNAL, "compressed messages are not supported")
                return
            if size > self.server.max_message_bytes:
                self._fail_stream(st, GRPC_RESOURCE_EXHAUSTED, "message too large")
                return
            try:
                msg = decode(bytes(data[pos + 5 : pos + 5 + size]))
            except Exception:
                self._fail_stream(st, GRPC_INTERNAL, "undecodable message")
                return
            st.queue.append((msg, size + 5))
            woke = True
            pos += 5 + size
        if pos == end:
            if rbuf:
                rbuf.clear()
        elif rbuf:
            del rbuf[:pos]
        else:
            st.rbuf = bytearray(payload[pos:])
        if woke:
            st.wake()

    def _remote_end(self, st: _Stream) -> None:
        st.remote_closed = True
        st.wake()
        if st.local_closed:
            self.streams.pop(st.sid, None)

    # --- streams -----------------------------------------------------------------------------

    async def _requests(self, st: _Stream) -> AsyncIterator[Any]:
        q = st.queue
        while True:
            if q:
                msg, size = q.popleft()
                st.consumed += size
                if st.consumed >= STREAM_WINDOW // 2 and not st.remote_closed:
                    self._write(frame(WINDOW_UPDATE, 0, st.sid, _U32.pack(st.consumed)))
                    st.consumed = 0
                    self._schedule_flush()
                yield msg
                continue
            if st.remote_closed or st.reset:
                return
            w = self.loop.create_future()
            st.waiter = w
            await w

    async def _run(self, st: _Stream) -> None:
        """Run the handler for one stream; send its responses, then the trailers."""
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
        if st.pending:  # trailers go after every queued DATA byte
            st.drain = self.loop.create_future()
            await st.drain
            if st.reset or self.closed:
                return
        self._end_stream(st, OK_TRAILERS if status == GRPC_OK else trailers_block(status, message))

    def _end_stream(self, st: _Stream, trailers: bytes) -> None:
        st.local_closed = True
        # A handler that sent no message ends with a trailers-only response (headers + status).
        head = b"" if st.headers_sent else RESPONSE_HEADERS
        self._write(frame(HEADERS, F_END_HEADERS | F_END_STREAM, st.sid, head + trailers))
        if not st.remote_closed:
            # Like grpc-go and grpc C-core: a server that finished before the client half-closed
            # resets the stream with NO_ERROR, so the client stops sending.
            self._write(frame(RST_STREAM, 0, st.sid, _U32.pack(NO_ERROR)))
            st.reset = True
        self.streams.pop(st.sid, None)
        self._schedule_flush()

    def _fail_stream(self, st: _Stream, status: int, message: str) -> None:
        """End a stream from the receive path (bad message): trailers with `status`, then reset."""
        st.queue.clear()
        st.rbuf.clear()
        if not st.local_closed:
            if st.pending:
                st.pending.clear()
            head = b"" if st.headers_sent else RESPONSE_HEADERS  # trailers-only when nothing was sent
            self._write(
                frame(HEADERS, F_END_HEADERS | F_END_STREAM, st.sid, head + trailers_block(status, message))
            )
            st.local_closed = True
        self._write(frame(RST_STREAM, 0, st.sid, _U32.pack(CANCEL)))
        self.streams.pop(st.sid, None)
        self._abandon(st)
        self._schedule_flush()

    def _abandon(self, st: _Stream) -> None:
        """The stream is gone (reset, connection lost): stop its handler."""
        st.reset = True
        st.pending.clear()
        st.wake()
        d = st.drain
        if d is not None and not d.done():
            d.set_result(None)
        if st.task is not None and not st.task.done():
            st.task.cancel()

    # --- frames out --------------------------------------------------------------------------

    def _send_message(self, st: _Stream, body: bytes) -> bool:
        """Queue one gRPC message on the stream; False when flow control holds part of it back."""
        if not st.headers_sent:
            st.headers_sent = True
            self._write(frame(HEADERS, F_END_HEADERS, st.sid, RESPONSE_HEADERS))
        data = _MSG_PREFIX.pack(0, len(body)) + body
        if st.pending:
            st.pending.append(memoryview(data))
            return False
        n = len(data)
        if n <= st.send_window and n <= self.send_window and n <= self.peer_max_frame:
            st.send_window -= n
            self.send_window -= n
            self._write(frame(DATA, 0, st.sid, data))
            return True
        st.pending.append(memoryview(data))
        self._drain_stream(st)
        if st.pending:
            self.blocked.append(st)
            return False
        return True

    def _drain_stream(self, st: _Stream) -> None:
        """Send as much of the stream's pending DATA as the windows allow."""
        pending = st.pending
        while pending:
            room = min(st.send_window, self.send_window, self.peer_max_frame)
            if room <= 0:
                return
            chunk = pending[0]
            if len(chunk) <= room:
                pending.popleft()
            else:
                pending[0] = chunk[room:]
                chunk = chunk[:room]
            k = len(chunk)
            st.send_window -= k
            self.send_window -= k
            self._write(frame(DATA, 0, st.sid, bytes(chunk)))
        d = st.drain
        if d is not None and not d.done():
            d.set_result(None)

    def _unblock(self) -> None:
        """Windows grew: send what blocked streams hold, in the order they blocked."""
        if not self.blocked:
            return
        for st in list(self.blocked):
            if not st.reset:
                self._drain_stream(st)
        self.blocked = deque(st for st in self.blocked if st.pending and not st.reset)
        self._schedule_flush()

    def _write(self, data: bytes) -> None:
        self.out.append(data)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self.flush_scheduled and self.out:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        out = self.out
        if not out or self.transport is None or self.transport.is_closing():
            out.clear()
            return
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def _goaway(self, code: int) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._write(frame(GOAWAY, 0, 0, _U32.pack(self.last_sid) + _U32.pack(code)))


class GrpcH2Server:
    """Serves `methods` (`{"/package.Service/Method": StreamMethod}`) on one TCP address."""

    def __init__(
        self,
        methods: Mapping[str, StreamMethod],
        *,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.methods = dict(methods)
        self.max_message_bytes = max_message_bytes
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
