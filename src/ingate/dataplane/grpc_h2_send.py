"""The sending half of a `grpc_h2` connection: gRPC messages out as DATA frames within the peer's
windows, streams parked while the connection window is closed, trailers, resets, coalesced writes."""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from ingate.dataplane.grpc_h2_frames import (
    _MSG_PREFIX,
    _U32,
    CANCEL,
    DATA,
    F_END_HEADERS,
    F_END_STREAM,
    GOAWAY,
    HEADERS,
    NO_ERROR,
    RESPONSE_HEADERS,
    RST_STREAM,
    _Stream,
    frame,
    trailers_block,
)


class _Sender:
    """Mixed into `_Connection` (`grpc_h2_conn`), which owns the state declared here."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport | None
    streams: dict[int, _Stream]
    last_sid: int
    peer_max_frame: int
    send_window: int
    blocked: OrderedDict[int, _Stream]
    out: list[bytes]
    flush_scheduled: bool

    def _release(self, st: _Stream) -> None:
        raise NotImplementedError

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
        self._release(st)

    def _fail_stream(self, st: _Stream, status: int, message: str) -> None:
        """End a stream from the receive path (bad message): trailers with `status`, then reset."""
        self._release(st)
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

    def _abandon(self, st: _Stream) -> None:
        """The stream is gone (reset, connection lost): stop its handler."""
        st.reset = True
        self.blocked.pop(st.sid, None)
        self._release(st)
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
            self._park(st)
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

    def _park(self, st: _Stream) -> None:
        """After a drain: a stream still holding DATA with its own window open waits for the connection
        window (`blocked`); one whose own window is shut waits for its WINDOW_UPDATE (not queued)."""
        if st.pending and not st.reset and st.send_window > 0:
            if st.sid not in self.blocked:
                self.blocked[st.sid] = st
        else:
            self.blocked.pop(st.sid, None)

    def _unblock(self) -> None:
        """The connection window grew: send what blocked streams hold, in the order they blocked, until
        the window is used up (each stream drained either empties, waits on its own window, or used
        the last of the connection window and stays first in line)."""
        blocked = self.blocked
        while blocked and self.send_window > 0:
            sid, st = blocked.popitem(last=False)
            if st.reset:
                continue
            self._drain_stream(st)
            if st.pending and st.send_window > 0:
                blocked[sid] = st
                blocked.move_to_end(sid, last=False)
                break
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
