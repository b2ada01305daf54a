"""A `grpc_h2` connection's receiving half (frames in, checks, flow control, a task per stream)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import hpack

from ingate.dataplane.grpc_h2_frames import (
    _FRAME,
    _MSG_PREFIX,
    _SETTING,
    _U32,
    BLOCK_CACHE,
    BLOCK_CACHE_MAX_BYTES,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    DEFAULT_WINDOW,
    ENHANCE_YOUR_CALM,
    F_ACK,
    F_END_HEADERS,
    F_END_STREAM,
    F_PADDED,
    F_PRIORITY,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    GRPC_INTERNAL,
    GRPC_OK,
    GRPC_RESOURCE_EXHAUSTED,
    GRPC_UNIMPLEMENTED,
    HEADERS,
    INTERNAL_ERROR,
    MAX_CONTINUATIONS,
    MAX_EMPTY_FRAMES,
    MAX_FRAME,
    MAX_HEADER_BLOCK,
    MAX_WINDOW,
    OK_TRAILERS,
    PING,
    PREFACE,
    PRIORITY,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RESPONSE_HEADERS,
    RST_STREAM,
    S_ENABLE_PUSH,
    S_INITIAL_WINDOW_SIZE,
    S_MAX_CONCURRENT_STREAMS,
    S_MAX_FRAME_SIZE,
    S_MAX_HEADER_LIST_SIZE,
    SETTINGS,
    STREAM_CLOSED,
    WINDOW_UPDATE,
    ConnectionError_,
    _Stream,
    frame,
    trailers_block,
)
from ingate.dataplane.grpc_h2_send import _Sender

if TYPE_CHECKING:
    from ingate.dataplane.grpc_h2 import GrpcH2Server

log = logging.getLogger("ingate.dataplane.grpc_h2")


class _Connection(_Sender, asyncio.Protocol):
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
        self.recv_window = server.conn_window
        """What the peer may still send on the connection."""
        self.recv_unacked = 0
        """Bytes consumed or discarded and not yet credited back (WINDOW_UPDATE on stream 0)."""
        self.settings_seen = False
        self.hdr_frames = 0
        self.empty_frames = 0
        self.blocked: OrderedDict[int, _Stream] = OrderedDict()
        """Streams with DATA waiting for connection window (their own window open), in blocking order.
        Streams waiting for their own window are not here: their WINDOW_UPDATE drains them directly,
        so no frame costs a scan of every blocked stream."""
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.hdr_sid = 0
        """Stream whose header block continues in CONTINUATION frames (0 = none)."""
        self.hdr_block = bytearray()
        self.hdr_end_stream = False
        self.closed = False
        self.failed = False
        """A connection error was sent: whatever else arrives is ignored."""
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
                (S_MAX_CONCURRENT_STREAMS, self.server.max_concurrent_streams),
                (S_INITIAL_WINDOW_SIZE, self.server.stream_window),
                (S_MAX_FRAME_SIZE, MAX_FRAME),
                (S_MAX_HEADER_LIST_SIZE, MAX_HEADER_BLOCK),
            )
        )
        self._write(frame(SETTINGS, 0, 0, settings))
        self._write(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.server.conn_window - DEFAULT_WINDOW)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._conns.discard(self)
        for st in list(self.streams.values()):
            self._abandon(st)
        self.streams.clear()

    def eof_received(self) -> bool:
        """The peer closed its side: send what is queued (GOAWAY, answers), then close."""
        self._flush()
        return False

    def pause_writing(self) -> None:
        """The peer is not reading (our write buffer is over the high-water mark): stop reading it, so
        the answers a flood of PINGs, SETTINGS or requests would queue stay bounded."""
        if self.transport is not None:
            with contextlib.suppress(RuntimeError):
                self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return
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
                if not self.settings_seen:
                    # RFC 9113 section 3.4: the preface ends with a SETTINGS frame.
                    if ftype != SETTINGS or flags & F_ACK:
                        raise ConnectionError_(PROTOCOL_ERROR, "preface without SETTINGS")
                    self.settings_seen = True
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
            self._fail(e.code)
        except Exception:  # a bug here must cost this connection, never the event loop
            log.exception("grpc connection failed")
            self._fail(INTERNAL_ERROR)

    def _fail(self, code: int) -> None:
        """Connection error: GOAWAY(code), then close once it is written."""
        self.failed = True
        self.buf.clear()
        self._goaway(code)
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
            self.hdr_frames += 1
            if len(self.hdr_block) + len(payload) > MAX_HEADER_BLOCK or self.hdr_frames > MAX_CONTINUATIONS:
                raise ConnectionError_(ENHANCE_YOUR_CALM, "header block too large")
            self.hdr_block += payload
            if flags & F_END_HEADERS:
                sid, block, eos = self.hdr_sid, bytes(self.hdr_block), self.hdr_end_stream
                self.hdr_sid = 0
                self.hdr_block.clear()
                self._header_block(sid, block, eos)
        elif ftype == WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif ftype == RST_STREAM:
            if len(payload) != 4:
                raise ConnectionError_(FRAME_SIZE_ERROR, "RST_STREAM payload")
            self._check_not_idle(sid, "RST_STREAM")
            st = self.streams.pop(sid, None)
            if st is not None:
                self._abandon(st)
        elif ftype == SETTINGS:
            if sid:
                raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS on a stream")
            if flags & F_ACK:
                if payload:
                    raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            else:
                self._settings(payload)
                self._write(frame(SETTINGS, F_ACK, 0))
        elif ftype == PING:
            if sid:
                raise ConnectionError_(PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise ConnectionError_(FRAME_SIZE_ERROR, "PING payload")
            if not flags & F_ACK:
                self._write(frame(PING, F_ACK, 0, payload))
        elif ftype == GOAWAY:
            if sid:
                raise ConnectionError_(PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise ConnectionError_(FRAME_SIZE_ERROR, "GOAWAY payload")
            self.going_away = True
        elif ftype == PUSH_PROMISE:
            raise ConnectionError_(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        elif ftype == PRIORITY:
            if not sid:
                raise ConnectionError_(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                self._stream_error(sid, FRAME_SIZE_ERROR)
            elif _U32.unpack_from(payload)[0] & 0x7FFFFFFF == sid:
                self._stream_error(sid, PROTOCOL_ERROR)  # a stream cannot depend on itself
        # Unknown types: ignored (RFC 9113 section 5.5).

    def _check_not_idle(self, sid: int, what: str) -> None:
        """RFC 9113 section 5.1: frames other than HEADERS/PRIORITY on an idle stream (never opened)."""
        if sid == 0 or sid > self.last_sid:
            raise ConnectionError_(PROTOCOL_ERROR, f"{what} on an idle stream")

    def _stream_error(self, sid: int, code: int) -> None:
        """RST_STREAM(code); an open stream is closed and its handler stopped."""
        self._write(frame(RST_STREAM, 0, sid, _U32.pack(code)))
        st = self.streams.pop(sid, None)
        if st is not None:
            self._abandon(st)

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS payload")
        for off in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, off)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ConnectionError_(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_window
                self.peer_window = value
                if not delta:
                    continue
                for st in self.streams.values():
                    st.send_window += delta
                    if st.send_window > MAX_WINDOW:
                        raise ConnectionError_(FLOW_CONTROL_ERROR, "stream window over 2^31-1")
                    if delta > 0 and st.pending and not st.reset:
                        self._drain_stream(st)
                        self._park(st)
            elif key == S_MAX_FRAME_SIZE:
                if not 16_384 <= value <= 16_777_215:
                    raise ConnectionError_(PROTOCOL_ERROR, "bad MAX_FRAME_SIZE")
                self.peer_max_frame = value
            elif key == S_ENABLE_PUSH:
                if value > 1:
                    raise ConnectionError_(PROTOCOL_ERROR, "bad ENABLE_PUSH")
            # HEADER_TABLE_SIZE: our blocks never use the dynamic table. Others: nothing to do.

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "WINDOW_UPDATE payload")
        inc = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise ConnectionError_(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += inc
            if self.send_window > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "connection window over 2^31-1")
        else:
            self._check_not_idle(sid, "WINDOW_UPDATE")
            st = self.streams.get(sid)
            if st is None:
                return  # closed: a window update may cross our end of the stream
            if inc == 0:
                self._stream_error(sid, PROTOCOL_ERROR)
                return
            st.send_window += inc
            if st.send_window > MAX_WINDOW:
                self._stream_error(sid, FLOW_CONTROL_ERROR)
                return
            if st.pending and not st.reset:
                self._drain_stream(st)
                self._park(st)
            return
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
            if end >= off + 5 and _U32.unpack_from(payload, off)[0] & 0x7FFFFFFF == sid:
                # A stream error by the RFC; as a connection error the header block need not be
                # decoded first to keep HPACK in sync (RFC 9113 section 5.4 allows either).
                raise ConnectionError_(PROTOCOL_ERROR, "stream depends on itself")
            off += 5
        if end < off:
            raise ConnectionError_(PROTOCOL_ERROR, "padding")
        if end - off > MAX_HEADER_BLOCK:
            raise ConnectionError_(ENHANCE_YOUR_CALM, "header block too large")
        fragment = payload[off:end]
        eos = bool(flags & F_END_STREAM)
        if flags & F_END_HEADERS:
            self._header_block(sid, fragment, eos)
        else:
            self.hdr_sid = sid
            self.hdr_block = bytearray(fragment)
            self.hdr_end_stream = eos
            self.hdr_frames = 0

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
        if len(block) <= BLOCK_CACHE_MAX_BYTES and self._table_state() == before:
            if len(self.block_cache) >= BLOCK_CACHE:
                self.block_cache.clear()
            self.block_cache[key] = headers
        return headers

    def _header_block(self, sid: int, block: bytes, eos: bool) -> None:
        headers = self._decode_block(block)  # always: the HPACK table must stay in sync
        st = self.streams.get(sid)
        if st is not None:  # trailers from the client
            if not eos:
                raise ConnectionError_(PROTOCOL_ERROR, "trailers without END_STREAM")
            if st.remote_closed:
                self._stream_error(sid, STREAM_CLOSED)
                return
            self._remote_end(st)
            return
        if sid % 2 == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "even stream id from a client")
        if sid <= self.last_sid:
            if eos:
                return  # trailers crossing our reset of the stream: ignored (RFC 9113 section 5.1)
            raise ConnectionError_(PROTOCOL_ERROR, "stream id reused or decreasing")
        self.last_sid = sid
        if self.going_away or self.server._stopping:
            self._write(frame(RST_STREAM, 0, sid, _U32.pack(REFUSED_STREAM)))
            return
        if len(self.streams) >= self.server.max_concurrent_streams:
            self._write(frame(RST_STREAM, 0, sid, _U32.pack(REFUSED_STREAM)))
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
            return
        st = _Stream(sid, self.peer_window, self.server.stream_window, method)
        self.streams[sid] = st
        st.remote_closed = eos
        st.task = self.loop.create_task(self._run(st))
        st.task.add_done_callback(st.forget_task)

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        n = len(payload)
        if n > self.recv_window:
            raise ConnectionError_(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self.recv_window -= n
        if n == 0 and not flags & F_END_STREAM:
            self.empty_frames += 1
            if self.empty_frames > MAX_EMPTY_FRAMES:
                raise ConnectionError_(ENHANCE_YOUR_CALM, "flood of empty DATA frames")
        else:
            self.empty_frames = 0
        st = self.streams.get(sid)
        if st is None:
            self._check_not_idle(sid, "DATA")
            self._credit(n)  # a closed stream: its bytes are dropped
            return
        if n > st.recv_window:
            raise ConnectionError_(FLOW_CONTROL_ERROR, "DATA beyond the stream window")
        st.recv_window -= n
        if st.remote_closed:
            self._credit(n)
            self._stream_error(sid, STREAM_CLOSED)
            return
        if flags & F_PADDED:
            if not payload or payload[0] >= n:
                raise ConnectionError_(PROTOCOL_ERROR, "padding")
            pad = payload[0] + 1
            self._credit(pad)
            self._credit_stream(st, pad)
            payload = payload[1 : n - payload[0]]
        if payload:
            self._messages(st, payload)
        if flags & F_END_STREAM and sid in self.streams:
            self._remote_end(st)

    def _messages(self, st: _Stream, payload: bytes) -> None:
        """Split DATA into gRPC messages; decode and queue each for the stream's handler."""
        st.queued += len(payload)
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
            if compressed:
                self._fail_stream(st, GRPC_INTERNAL, "compressed messages are not supported")
                return
            if size > self.server.max_message_bytes:  # known from the prefix: not buffered first
                self._fail_stream(st, GRPC_RESOURCE_EXHAUSTED, "message too large")
                return
            if end - pos - 5 < size:
                break
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

    # --- flow control in ---------------------------------------------------------------------

    def _credit(self, n: int) -> None:
        """`n` received bytes left our buffers: give the peer the connection window back (in batches)."""
        self.recv_unacked += n
        if self.recv_unacked >= self.server.conn_window // 2:
            self._write(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.recv_unacked)))
            self.recv_window += self.recv_unacked
            self.recv_unacked = 0

    def _credit_stream(self, st: _Stream, n: int) -> None:
        st.consumed += n
        if st.consumed >= self.server.stream_window // 2 and not st.remote_closed:
            self._write(frame(WINDOW_UPDATE, 0, st.sid, _U32.pack(st.consumed)))
            st.recv_window += st.consumed
            st.consumed = 0

    def _release(self, st: _Stream) -> None:
        """The stream is done: what it still buffers is dropped and credited to the connection."""
        if st.queued:
            self._credit(st.queued)
            st.queued = 0
        st.queue.clear()
        st.rbuf.clear()

    # --- streams -----------------------------------------------------------------------------

    async def _requests(self, st: _Stream) -> AsyncIterator[Any]:
        q = st.queue
        while True:
            if q:
                msg, size = q.popleft()
                st.queued -= size
                self._credit(size)
                self._credit_stream(st, size)
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
