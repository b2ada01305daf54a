"""Hostile HTTP/2 input against the in-loop gRPC server (`ingate.dataplane.grpc_h2`), over real TCP.

The server runs in its own thread on its own event loop (uvloop, as under `ingate serve`); the tests
are a raw HTTP/2 client on a blocking loopback socket that encodes frames itself (no HTTP/2 library
on the client side, so it can send what no library would). Property-based cases (hypothesis) feed
arbitrary bytes, arbitrary frame sequences and hostile values; targeted cases send the known floods.

Every case checks the same contract:

- the server answers with the RFC 9113 error: GOAWAY(code) and a close for a connection error,
  RST_STREAM(code) for a stream error, nothing for frames it must ignore;
- it never hangs: each exchange ends with a barrier PING that must be answered (or the connection
  closed) within seconds;
- it never raises into its event loop (the loop's exception handler and the module's error log stay
  empty) and keeps serving: after every example a fresh connection completes a gRPC call;
- its memory stays bounded: no stream, task or buffered byte outlives a closed connection, buffered
  header blocks and answer queues stay under their caps while a flood lasts.

Examples are derandomized and without a database (the same cases on every run, CI included); set
INGATE_FUZZ_EXAMPLES to run more (then random) examples locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import hpack
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ingate.dataplane import grpc_h2 as g
from ingate.dataplane import grpc_h2_frames as fr

ECHO = "/test.Echo/Chat"
STALL = "/test.Echo/Stall"  # never reads its requests: what a slow handler leaves buffered

_EXAMPLES = int(os.environ.get("INGATE_FUZZ_EXAMPLES", "0"))
_DEEP = _EXAMPLES > 0


def fuzz(n: int) -> Any:
    """Hypothesis settings: `n` derandomized examples (CI), or INGATE_FUZZ_EXAMPLES random ones."""
    return settings(
        max_examples=_EXAMPLES or n,
        deadline=None,
        derandomize=not _DEEP,
        database=None,
        # No shrinking in CI: a failing example is reported as found (shrinking live sockets is slow).
        phases=[Phase.explicit, Phase.generate] + ([Phase.shrink] if _DEEP else []),
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# --- the server, in its own thread ------------------------------------------------------------


async def _echo(requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for m in requests:
        yield b"echo:" + m


async def _stall(requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    await asyncio.Event().wait()
    yield b""  # pragma: no cover - never reached


def _ident(b: bytes) -> bytes:
    return b


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class ServerThread:
    """A `GrpcH2Server` on its own event loop in a thread: the tests' client blocks, the server doesn't."""

    def __init__(self, **kw: Any) -> None:
        try:
            import uvloop

            self.loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
        self.log = _ErrorLog()
        logging.getLogger(g.__name__).addHandler(self.log)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        methods = {
            ECHO: fr.StreamMethod(decode=_ident, handler=_echo, encode=_ident),
            STALL: fr.StreamMethod(decode=_ident, handler=_stall, encode=_ident),
        }

        async def start() -> g.GrpcH2Server:
            srv = g.GrpcH2Server(methods, **kw)
            await srv.start("127.0.0.1", 0)
            return srv

        self.srv = self.call(start())
        self.port = self.srv.port

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def state(self) -> dict[str, int]:
        """What the server holds now (read on its own loop)."""

        async def read() -> dict[str, int]:
            conns = list(self.srv._conns)
            return {
                "conns": len(conns),
                "streams": sum(len(c.streams) for c in conns),
                "tasks": len(asyncio.all_tasks()) - 1,  # minus this one
                "buffered_in": sum(len(c.buf) + len(c.hdr_block) for c in conns),
                "queued": sum(s.queued for c in conns for s in c.streams.values()),
                "out": sum(
                    sum(map(len, c.out))
                    + (c.transport.get_write_buffer_size() if c.transport is not None else 0)
                    for c in conns
                ),
            }

        return dict(self.call(read()))

    def settle(self, within: float = 3.0) -> dict[str, int]:
        """Wait until no connection, stream or task is left (every client closed); the final state."""
        deadline = time.monotonic() + within
        while True:
            s = self.state()
            if (s["conns"], s["streams"], s["tasks"]) == (0, 0, 0) or time.monotonic() > deadline:
                return s
            time.sleep(0.01)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.srv.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        logging.getLogger(g.__name__).removeHandler(self.log)

    def assert_healthy(self) -> None:
        """Nothing escaped into the loop, nothing is left over, and a fresh connection is served."""
        assert not self.loop_errors, self.loop_errors
        assert not self.log.records, [r.getMessage() for r in self.log.records]
        c = Client(self.port)
        try:
            assert c.call(1, b"ping") == b"echo:ping"
        finally:
            c.close()
        left = self.settle()
        assert (left["conns"], left["streams"], left["tasks"]) == (0, 0, 0), left


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    s = ServerThread()
    try:
        yield s
    finally:
        s.close()


@contextlib.contextmanager
def _server(**kw: Any) -> Iterator[ServerThread]:
    s = ServerThread(**kw)
    try:
        yield s
    finally:
        s.close()


# --- a raw client ----------------------------------------------------------------------------


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """One frame; `length` may lie about the payload."""
    n = len(payload) if length is None else length
    return struct.pack(">I", n)[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def grpc_msg(b: bytes) -> bytes:
    return struct.pack(">BI", 0, len(b)) + b


def request_block(enc: hpack.Encoder, path: str = ECHO) -> bytes:
    return bytes(
        enc.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "x"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
        )
    )


BARRIER = b"barrier!"


class Hang(AssertionError):
    pass


@dataclass
class Outcome:
    frames: list[tuple[int, int, int, bytes]] = field(default_factory=list)
    goaway: tuple[int, int] | None = None
    """(last stream id, error code) of the server's GOAWAY."""
    eof: bool = False
    barrier: bool = False

    def resets(self, sid: int | None = None) -> list[int]:
        """Error codes of the RST_STREAM frames the server sent (on `sid`)."""
        return [
            struct.unpack(">I", p)[0]
            for t, _, s, p in self.frames
            if t == fr.RST_STREAM and (sid is None or s == sid)
        ]


class Client:
    """Blocking raw HTTP/2 client: the preface and an empty SETTINGS are sent on connect."""

    def __init__(self, port: int, settings_payload: bytes = b"", preface: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = bytearray()
        self.enc = hpack.Encoder()
        self.out = Outcome()
        if preface:
            self.send(fr.PREFACE + frame(fr.SETTINGS, 0, 0, settings_payload))

    def send(self, data: bytes) -> bool:
        """False when the server already closed (it may stop reading a hostile peer at once)."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def _read_frame(self, deadline: float) -> tuple[int, int, int, bytes] | None:
        while True:
            if len(self.buf) >= 9:
                n = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) >= 9 + n:
                    t, f = self.buf[3], self.buf[4]
                    sid = struct.unpack(">I", self.buf[5:9])[0] & 0x7FFFFFFF
                    p = bytes(self.buf[9 : 9 + n])
                    del self.buf[: 9 + n]
                    return t, f, sid, p
            left = deadline - time.monotonic()
            if left <= 0:
                raise Hang("the server neither answered nor closed the connection")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise Hang("the server neither answered nor closed the connection") from None
            except ConnectionResetError:
                data = b""
            if not data:
                assert not self.buf, f"the server closed mid-frame: {bytes(self.buf[:32])!r}"
                return None
            self.buf += data

    def read_until(self, pred: Callable[[tuple[int, int, int, bytes]], bool], within: float = 5.0) -> Outcome:
        """Read frames until `pred` holds for one or the server closes; record GOAWAY and EOF."""
        deadline = time.monotonic() + within
        while True:
            f = self._read_frame(deadline)
            if f is None:
                self.out.eof = True
                return self.out
            self.out.frames.append(f)
            t, flags, sid, p = f
            assert t in range(10), f"unknown frame type {t} from the server"
            if t == fr.GOAWAY:
                assert sid == 0 and len(p) >= 8
                self.out.goaway = struct.unpack(">II", p[:8])
            if t == fr.PING and flags & fr.F_ACK and p == BARRIER:
                self.out.barrier = True
            if pred(f):
                return self.out

    def finish(self, within: float = 5.0) -> Outcome:
        """Send a barrier PING; wait for its ACK (everything before it was handled) or the close.
        A connection that got GOAWAY must then close."""
        self.out = Outcome()
        self.send(frame(fr.PING, 0, 0, BARRIER))
        out = self.read_until(lambda f: f[0] == fr.PING and bool(f[1] & fr.F_ACK) and f[3] == BARRIER, within)
        if out.goaway is not None and not out.eof:
            self.read_until(lambda f: False, within)
        return self.out

    def expect_goaway(self, code: int, within: float = 5.0) -> Outcome:
        out = self.finish(within)
        assert out.goaway is not None, f"no GOAWAY (expected code {code}): {_kinds(out)}"
        assert out.goaway[1] == code, f"GOAWAY code {out.goaway[1]}, expected {code}"
        assert out.eof, "GOAWAY without closing the connection"
        assert not out.barrier
        return out

    def call(self, sid: int, msg: bytes) -> bytes:
        """One unary-shaped echo exchange on stream `sid`; the answer's message."""
        self.out = Outcome()
        self.send(
            frame(fr.HEADERS, fr.F_END_HEADERS, sid, request_block(self.enc))
            + frame(fr.DATA, fr.F_END_STREAM, sid, grpc_msg(msg))
        )
        got = bytearray()
        out = self.read_until(lambda f: f[0] == fr.HEADERS and f[2] == sid and bool(f[1] & fr.F_END_STREAM))
        assert not out.eof, "closed before the answer"
        for t, _, s, p in out.frames:
            if t == fr.DATA and s == sid:
                got += p
        assert got[:1] == b"\0"
        return bytes(got[5:])

    def close(self) -> None:
        self.sock.close()


def _kinds(out: Outcome) -> list[tuple[int, int]]:
    return [(t, s) for t, _, s, _ in out.frames]


ERROR_CODES = set(range(14))


# --- arbitrary input --------------------------------------------------------------------------


@fuzz(60)
@given(junk=st.binary(max_size=600))
def test_arbitrary_bytes_after_the_preface(server: ServerThread, junk: bytes) -> None:
    """Whatever follows the preface: an answer to the barrier, or GOAWAY and a close; after a
    half-close, always a close. Never a hang, never a crash."""
    c = Client(server.port)
    try:
        c.send(junk)
        c.send(frame(fr.PING, 0, 0, BARRIER))
        try:
            c.read_until(lambda f: f[0] == fr.PING and f[3] == BARRIER, within=0.3)
        except Hang:
            pass  # a frame header promised more bytes than came: the server waits for them
        if not c.out.eof:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_WR)
            c.read_until(lambda f: False, within=5.0)  # EOF must follow our half-close
        assert c.out.eof
        if c.out.goaway is not None:
            assert c.out.goaway[1] in ERROR_CODES
    finally:
        c.close()
    server.assert_healthy()


_SIDS = st.sampled_from([0, 1, 2, 3, 5, 7, 0x7FFFFFFF])


@st.composite
def _frames(draw: st.DrawFn) -> bytes:
    """One well-framed frame: random type, flags, stream and payload, or a plausible one."""
    kind = draw(st.integers(0, 9))
    sid = draw(_SIDS)
    if kind <= 3:
        ftype = draw(st.integers(0, 12))
        return frame(ftype, draw(st.integers(0, 255)), sid, draw(st.binary(max_size=40)))
    if kind == 4:
        return frame(fr.HEADERS, draw(st.sampled_from([4, 5])), sid, request_block(hpack.Encoder()))
    if kind == 5:
        msg = grpc_msg(draw(st.binary(max_size=20)))
        cut = draw(st.integers(0, len(msg)))
        return frame(fr.DATA, draw(st.sampled_from([0, 1])), sid, msg[:cut])
    if kind == 6:
        inc = draw(st.sampled_from([0, 1, 1 << 16, 0x7FFFFFFF]))
        return frame(fr.WINDOW_UPDATE, 0, sid, struct.pack(">I", inc))
    if kind == 7:
        return frame(fr.RST_STREAM, 0, sid, struct.pack(">I", draw(st.integers(0, 13))))
    if kind == 8:
        key = draw(st.integers(0, 8))
        value = draw(st.sampled_from([0, 1, 16_384, 1 << 24, 0x7FFFFFFF, 0xFFFFFFFF]))
        return frame(fr.SETTINGS, draw(st.sampled_from([0, 1])), 0, struct.pack(">HI", key, value))
    return frame(fr.CONTINUATION, draw(st.sampled_from([0, 4])), sid, request_block(hpack.Encoder())[:10])


@fuzz(120)
@given(frames=st.lists(_frames(), max_size=10))
def test_arbitrary_frame_sequences(server: ServerThread, frames: list[bytes]) -> None:
    """Well-framed but arbitrary frames: the barrier is answered or the connection ends with a valid
    GOAWAY; the server's answers are valid frames; nothing is left behind once the client leaves."""
    c = Client(server.port)
    try:
        c.send(b"".join(frames))
        out = c.finish()
        assert out.barrier or out.eof
        if out.goaway is not None:
            assert out.goaway[1] in ERROR_CODES - {fr.NO_ERROR, fr.INTERNAL_ERROR}
    finally:
        c.close()
    server.assert_healthy()


# --- sizes ------------------------------------------------------------------------------------


@fuzz(25)
@given(length=st.integers(fr.MAX_FRAME + 1, (1 << 24) - 1), ftype=st.integers(0, 12))
def test_frames_over_max_frame_size_are_frame_size_errors(
    server: ServerThread, length: int, ftype: int
) -> None:
    c = Client(server.port)
    try:
        c.send(frame(ftype, 0, 1, b"\0" * 100, length=length))  # the header alone is enough
        c.expect_goaway(fr.FRAME_SIZE_ERROR)
    finally:
        c.close()
    server.assert_healthy()


_FIXED_SIZES = {fr.PING: 8, fr.WINDOW_UPDATE: 4, fr.RST_STREAM: 4}


@fuzz(30)
@given(ftype=st.sampled_from(sorted(_FIXED_SIZES)), size=st.integers(0, 20))
def test_fixed_size_frames_with_another_size_are_frame_size_errors(
    server: ServerThread, ftype: int, size: int
) -> None:
    c = Client(server.port)
    try:
        c.call(1, b"x")  # stream 1 exists (closed), so RST_STREAM/WINDOW_UPDATE on it are legal
        c.send(frame(ftype, 0, 0 if ftype == fr.PING else 1, b"\1" * size))
        if size == _FIXED_SIZES[ftype]:
            assert c.finish().barrier
        else:
            c.expect_goaway(fr.FRAME_SIZE_ERROR)
    finally:
        c.close()
    server.assert_healthy()


def test_settings_with_a_partial_entry_or_an_ack_with_payload(server: ServerThread) -> None:
    for payload, flags in ((b"\0\4\0\0", 0), (b"\0" * 6, fr.F_ACK)):
        c = Client(server.port)
        try:
            c.send(frame(fr.SETTINGS, flags, 0, payload))
            c.expect_goaway(fr.FRAME_SIZE_ERROR)
        finally:
            c.close()
    server.assert_healthy()


def test_the_preface_must_end_with_settings(server: ServerThread) -> None:
    c = Client(server.port, preface=False)
    try:
        c.send(fr.PREFACE + frame(fr.PING, 0, 0, b"12345678"))
        c.expect_goaway(fr.PROTOCOL_ERROR)
    finally:
        c.close()
    server.assert_healthy()


# --- HPACK ------------------------------------------------------------------------------------

_BAD_BLOCKS = [
    b"\x80",  # indexed field 0
    b"\xff\xff\xff\xff\x0f",  # index far beyond both tables
    b"\xbe",  # index 62: the dynamic table is empty
    b"\x3f\xe1\xff\x03",  # dynamic table size update above SETTINGS_HEADER_TABLE_SIZE (4096)
    b"\x00\x85",  # Huffman name of 5 bytes, none given
    b"\x00\x01a\x7f",  # value length integer cut off
    b"\x00\x81\xff",  # Huffman string that decodes to EOS
    b"\x82\x20",  # a table size update after a field
]


def _reference_rejects(block: bytes) -> bool:
    """What a fresh decoder (the peer's view of a new connection, our advertised limits) says."""
    d = hpack.Decoder(max_header_list_size=fr.MAX_HEADER_BLOCK)
    try:
        d.decode(block, raw=True)
    except Exception:
        return True
    return False


@fuzz(80)
@given(
    block=st.one_of(
        st.sampled_from(_BAD_BLOCKS),
        st.binary(max_size=64),
        st.tuples(st.sampled_from(_BAD_BLOCKS), st.binary(max_size=16)).map(lambda t: t[1] + t[0]),
    ),
    split=st.integers(0, 8),
)
def test_undecodable_header_blocks_are_compression_errors(
    server: ServerThread, block: bytes, split: int
) -> None:
    """A block a decoder rejects ends the connection with COMPRESSION_ERROR (split over CONTINUATION or
    not); a decodable one never does (it names no method: UNIMPLEMENTED)."""
    c = Client(server.port)
    try:
        if 0 < split < len(block):
            c.send(frame(fr.HEADERS, fr.F_END_STREAM, 1, block[:split]))
            c.send(frame(fr.CONTINUATION, fr.F_END_HEADERS, 1, block[split:]))
        else:
            c.send(frame(fr.HEADERS, fr.F_END_HEADERS | fr.F_END_STREAM, 1, block))
        if _reference_rejects(block):
            c.expect_goaway(fr.COMPRESSION_ERROR)
        else:
            out = c.finish()
            assert out.barrier and out.goaway is None
    finally:
        c.close()
    server.assert_healthy()


# --- flow control -----------------------------------------------------------------------------


@fuzz(30)
@given(incs=st.lists(st.integers(1, 0x7FFFFFFF), min_size=1, max_size=4))
def test_connection_window_overflow_is_a_flow_control_error(server: ServerThread, incs: list[int]) -> None:
    c = Client(server.port)
    try:
        for inc in incs:
            c.send(frame(fr.WINDOW_UPDATE, 0, 0, struct.pack(">I", inc)))
        if fr.DEFAULT_WINDOW + sum(incs) > fr.MAX_WINDOW:
            c.expect_goaway(fr.FLOW_CONTROL_ERROR)
        else:
            assert c.finish().barrier
    finally:
        c.close()
    server.assert_healthy()


@fuzz(30)
@given(incs=st.lists(st.integers(0, 0x7FFFFFFF), min_size=1, max_size=3))
def test_stream_window_overflow_resets_only_that_stream(server: ServerThread, incs: list[int]) -> None:
    """WINDOW_UPDATE beyond 2^31-1 on a stream is a stream error (RST_STREAM FLOW_CONTROL_ERROR); an
    increment of 0 is a PROTOCOL_ERROR stream error. The connection goes on."""
    c = Client(server.port)
    try:
        c.send(frame(fr.HEADERS, fr.F_END_HEADERS, 1, request_block(c.enc, STALL)))
        window, expect = fr.DEFAULT_WINDOW, None
        for inc in incs:
            c.send(frame(fr.WINDOW_UPDATE, 0, 1, struct.pack(">I", inc)))
            if expect is None:
                window += inc
                expect = (
                    fr.PROTOCOL_ERROR
                    if inc == 0
                    else fr.FLOW_CONTROL_ERROR
                    if window > fr.MAX_WINDOW
                    else None
                )
        out = c.finish()
        assert out.barrier and out.goaway is None
        assert out.resets(1) == ([expect] if expect is not None else [])
        assert c.call(3, b"after") == b"echo:after"
    finally:
        c.close()
    server.assert_healthy()


def test_initial_window_changes_are_checked(server: ServerThread) -> None:
    c = Client(server.port, struct.pack(">HI", fr.S_INITIAL_WINDOW_SIZE, 1 << 31))
    try:
        c.expect_goaway(fr.FLOW_CONTROL_ERROR)
    finally:
        c.close()
    # A stream whose window was grown, then a larger initial window pushes it over 2^31-1.
    c = Client(server.port)
    try:
        c.send(frame(fr.HEADERS, fr.F_END_HEADERS, 1, request_block(c.enc, STALL)))
        c.send(frame(fr.WINDOW_UPDATE, 0, 1, struct.pack(">I", fr.MAX_WINDOW - fr.DEFAULT_WINDOW)))
        c.send(frame(fr.SETTINGS, 0, 0, struct.pack(">HI", fr.S_INITIAL_WINDOW_SIZE, fr.DEFAULT_WINDOW + 1)))
        c.expect_goaway(fr.FLOW_CONTROL_ERROR)
    finally:
        c.close()
    server.assert_healthy()


def test_data_beyond_the_stream_window_is_a_flow_control_error() -> None:
    """A peer that ignores our window cannot make us buffer more than it: a handler that never reads
    holds at most one stream window, and the byte after it ends the connection."""
    with _server(max_message_bytes=1024) as server:
        window = server.srv.stream_window
        c = Client(server.port)
        try:
            c.send(frame(fr.HEADERS, fr.F_END_HEADERS, 1, request_block(c.enc, STALL)))
            chunk = grpc_msg(b"\0" * 1000)
            sent = 0
            while sent + len(chunk) <= window:
                c.send(frame(fr.DATA, 0, 1, chunk))
                sent += len(chunk)
            out = c.finish()
            assert out.barrier and out.goaway is None
            assert server.state()["queued"] == sent <= window
            c.send(frame(fr.DATA, 0, 1, chunk[: window - sent + 1]))
            c.expect_goaway(fr.FLOW_CONTROL_ERROR)
        finally:
            c.close()
        server.assert_healthy()


def test_reset_streams_give_their_buffered_bytes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes a reset (or finished) stream left unread are credited to the connection window: streams
    reset with unread data, many times the connection window in all, do not stall the connection."""
    monkeypatch.setattr(g, "CONN_WINDOW", 256 * 1024)
    monkeypatch.setattr(g, "STREAM_WINDOW", 64 * 1024)
    with _server(max_message_bytes=16 * 1024) as server:
        assert server.srv.conn_window == 256 * 1024
        c = Client(server.port)
        try:
            body = grpc_msg(b"\0" * 16_000)
            sid = 1
            for _ in range(100):  # 1.6 MB through a 256 KB connection window
                c.send(
                    frame(fr.HEADERS, fr.F_END_HEADERS, sid, request_block(c.enc, STALL))
                    + frame(fr.DATA, 0, sid, body)
                    + frame(fr.RST_STREAM, 0, sid, struct.pack(">I", fr.CANCEL))
                )
                sid += 2
            out = c.finish()
            assert out.barrier and out.goaway is None
            # ... and the window those resets gave back was announced to us (WINDOW_UPDATE on 0).
            credited = sum(
                struct.unpack(">I", p)[0] for t, _, s, p in out.frames if t == fr.WINDOW_UPDATE and s == 0
            )
            assert credited >= 100 * len(body) - 256 * 1024
            assert c.call(sid, b"x" * 10_000) == b"echo:" + b"x" * 10_000
        finally:
            c.close()
        server.assert_healthy()


def test_a_declared_message_over_the_limit_fails_at_once() -> None:
    """The message prefix tells the size: a message over the limit is refused before its bytes come
    (RESOURCE_EXHAUSTED), not buffered to the end first."""
    with _server(max_message_bytes=1024) as server:
        c = Client(server.port)
        try:
            c.send(frame(fr.HEADERS, fr.F_END_HEADERS, 1, request_block(c.enc)))
            c.send(frame(fr.DATA, 0, 1, struct.pack(">BI", 0, 0xFFFFFFFF) + b"\0" * 100))
            out = c.read_until(lambda f: f[0] == fr.RST_STREAM and f[2] == 1)
            block = next(p for t, _, s, p in reversed(out.frames) if t == fr.HEADERS and s == 1)
            assert (b"grpc-status", b"8") in hpack.Decoder().decode(block, raw=True)
            assert out.resets(1) == [fr.CANCEL]
            assert c.call(3, b"ok") == b"echo:ok"
        finally:
            c.close()
        server.assert_healthy()


# --- stream ids and states --------------------------------------------------------------------


@fuzz(80)
@given(sids=st.lists(st.integers(0, 12), min_size=1, max_size=6))
def test_stream_ids_must_be_new_odd_and_increasing(server: ServerThread, sids: list[int]) -> None:
    """HEADERS opening streams `sids` in order (no END_STREAM): the first id that is 0, even, or not
    above every earlier one (reused or decreasing) is a PROTOCOL_ERROR; otherwise all is well."""
    c = Client(server.port)
    try:
        last, bad = 0, False
        for sid in sids:
            c.send(frame(fr.HEADERS, fr.F_END_HEADERS, sid, request_block(c.enc, STALL)))
            if sid == 0 or sid % 2 == 0 or sid <= last:
                bad = True
                break
            last = sid
        if bad:
            c.expect_goaway(fr.PROTOCOL_ERROR)
        else:
            out = c.finish()
            assert out.barrier and out.goaway is None and not out.resets()
    finally:
        c.close()
    server.assert_healthy()


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param(frame(fr.DATA, 0, 9, grpc_msg(b"x")), id="DATA-idle"),
        pytest.param(frame(fr.RST_STREAM, 0, 9, b"\0\0\0\x08"), id="RST_STREAM-idle"),
        pytest.param(frame(fr.RST_STREAM, 0, 0, b"\0\0\0\x08"), id="RST_STREAM-0"),
        pytest.param(frame(fr.WINDOW_UPDATE, 0, 9, b"\0\0\0\1"), id="WINDOW_UPDATE-idle"),
        pytest.param(frame(fr.WINDOW_UPDATE, 0, 0, b"\0\0\0\0"), id="WINDOW_UPDATE-0-zero"),
        pytest.param(frame(fr.PING, 0, 1, b"12345678"), id="PING-on-stream"),
        pytest.param(frame(fr.GOAWAY, 0, 1, b"\0" * 8), id="GOAWAY-on-stream"),
        pytest.param(frame(fr.PRIORITY, 0, 0, b"\0" * 5), id="PRIORITY-0"),
        pytest.param(frame(fr.PUSH_PROMISE, 4, 1, b"\0\0\0\2"), id="PUSH_PROMISE"),
        pytest.param(frame(fr.CONTINUATION, 4, 1, b"\x82"), id="CONTINUATION-alone"),
        pytest.param(frame(fr.HEADERS, 0x24, 1, b"\0\0\0\1\x10\x82"), id="HEADERS-depends-on-itself"),
        pytest.param(frame(fr.SETTINGS, 0, 0, struct.pack(">HI", fr.S_ENABLE_PUSH, 2)), id="ENABLE_PUSH-2"),
        pytest.param(
            frame(fr.SETTINGS, 0, 0, struct.pack(">HI", fr.S_MAX_FRAME_SIZE, 100)), id="MAX_FRAME-small"
        ),
    ],
)
def test_frames_the_rfc_makes_connection_errors(server: ServerThread, frames: bytes) -> None:
    c = Client(server.port)
    try:
        c.send(frames)
        c.expect_goaway(fr.PROTOCOL_ERROR)
    finally:
        c.close()
    server.assert_healthy()


def test_data_after_end_stream_is_a_stream_closed_error(server: ServerThread) -> None:
    c = Client(server.port)
    try:
        c.send(frame(fr.HEADERS, fr.F_END_HEADERS | fr.F_END_STREAM, 1, request_block(c.enc, STALL)))
        c.send(frame(fr.DATA, 0, 1, grpc_msg(b"late")))
        out = c.finish()
        assert out.barrier and out.goaway is None
        assert out.resets(1) == [fr.STREAM_CLOSED]
        assert c.call(3, b"ok") == b"echo:ok"
    finally:
        c.close()
    server.assert_healthy()


def test_priority_with_a_bad_size_or_on_itself_resets_the_stream(server: ServerThread) -> None:
    c = Client(server.port)
    try:
        c.send(frame(fr.PRIORITY, 0, 5, b"\0" * 4))
        c.send(frame(fr.PRIORITY, 0, 7, b"\0\0\0\7\x10"))
        c.send(frame(fr.PRIORITY, 0, 9, b"\0\0\0\5\x10"))  # on another stream: fine
        out = c.finish()
        assert out.barrier and out.resets(5) == [fr.FRAME_SIZE_ERROR] and out.resets(7) == [fr.PROTOCOL_ERROR]
        assert out.resets(9) == []
    finally:
        c.close()
    server.assert_healthy()


def test_streams_over_the_concurrency_limit_are_refused() -> None:
    with _server(max_concurrent_streams=4) as server:
        c = Client(server.port)
        try:
            for sid in (1, 3, 5, 7, 9):
                c.send(frame(fr.HEADERS, fr.F_END_HEADERS, sid, request_block(c.enc, STALL)))
            out = c.finish()
            assert (
                out.barrier and out.resets() == [fr.REFUSED_STREAM] and out.resets(9) == [fr.REFUSED_STREAM]
            )
            assert server.state()["streams"] == 4
            c.send(frame(fr.RST_STREAM, 0, 1, struct.pack(">I", fr.CANCEL)))  # one slot frees up
            assert c.call(11, b"ok") == b"echo:ok"
        finally:
            c.close()
        server.assert_healthy()


# --- floods -----------------------------------------------------------------------------------


@fuzz(25)
@given(sizes=st.lists(st.integers(0, 4096), min_size=1, max_size=80))
def test_header_blocks_are_bounded(server: ServerThread, sizes: list[int]) -> None:
    """HEADERS + CONTINUATION never buffer more than MAX_HEADER_BLOCK bytes or MAX_CONTINUATIONS
    frames: past either, ENHANCE_YOUR_CALM. (The block is junk the server must not decode early.)"""
    c = Client(server.port)
    try:
        c.send(frame(fr.HEADERS, 0, 1, b"\x00" * sizes[0]))
        total, over = sizes[0], False
        for i, n in enumerate(sizes[1:], 1):
            c.send(frame(fr.CONTINUATION, 0, 1, b"\x00" * n))
            total += n
            if total > fr.MAX_HEADER_BLOCK or i > fr.MAX_CONTINUATIONS:
                over = True
                break
        assert server.state()["buffered_in"] <= fr.MAX_HEADER_BLOCK + fr.MAX_FRAME + 9
        if over:
            c.expect_goaway(fr.ENHANCE_YOUR_CALM)
        else:
            c.expect_goaway(fr.PROTOCOL_ERROR)  # the barrier PING interrupts the open header block
    finally:
        c.close()
    server.assert_healthy()


def test_continuation_flood(server: ServerThread) -> None:
    """The CONTINUATION flood (2024): endless empty and full CONTINUATION frames in one burst."""
    for size in (0, 16_384):
        c = Client(server.port)
        try:
            c.send(frame(fr.HEADERS, 0, 1, b"\x82") + frame(fr.CONTINUATION, 0, 1, b"\0" * size) * 10_000)
            c.expect_goaway(fr.ENHANCE_YOUR_CALM)
        finally:
            c.close()
    server.assert_healthy()


def test_empty_data_flood(server: ServerThread) -> None:
    """Empty DATA frames cost work and carry nothing (CVE-2019-9518): a run of them is cut off, while
    fewer than the limit are harmless."""
    c = Client(server.port)
    try:
        c.send(frame(fr.HEADERS, fr.F_END_HEADERS, 1, request_block(c.enc)))
        c.send(
            frame(fr.DATA, 0, 1) * fr.MAX_EMPTY_FRAMES + frame(fr.DATA, fr.F_END_STREAM, 1, grpc_msg(b"hi"))
        )
        out = c.read_until(lambda f: f[0] == fr.HEADERS and f[2] == 1 and bool(f[1] & fr.F_END_STREAM))
        assert out.goaway is None
        c.send(frame(fr.HEADERS, fr.F_END_HEADERS, 3, request_block(c.enc)))
        c.send(frame(fr.DATA, 0, 3) * (fr.MAX_EMPTY_FRAMES + 1))
        c.expect_goaway(fr.ENHANCE_YOUR_CALM)
    finally:
        c.close()
    server.assert_healthy()


@pytest.mark.parametrize(
    "unit",
    [
        pytest.param(frame(fr.PING, 0, 0, b"12345678"), id="PING"),
        pytest.param(
            frame(fr.SETTINGS, 0, 0, struct.pack(">HI", fr.S_HEADER_TABLE_SIZE, 4096)), id="SETTINGS"
        ),
        pytest.param(b"", id="HEADERS-unknown-method"),
    ],
)
def test_floods_from_a_peer_that_does_not_read_stay_bounded(server: ServerThread, unit: bytes) -> None:
    """PING/SETTINGS floods (CVE-2019-9512/9515) and request floods from a peer that never reads our
    answers: once our write buffer is full we stop reading the peer, so what we hold stays bounded
    (and the peer's sends block) instead of growing with the flood."""
    c = Client(server.port)
    try:
        if not unit:  # each HEADERS (a 1-byte indexed block after the first) gets a ~60-byte answer
            c.send(frame(fr.HEADERS, fr.F_END_HEADERS | fr.F_END_STREAM, 1, request_block(c.enc, "/nope")))
            block = request_block(c.enc, "/nope")
            burst = b"".join(
                frame(fr.HEADERS, fr.F_END_HEADERS | fr.F_END_STREAM, sid, block)
                for sid in range(3, 40_001, 2)
            )
        else:
            burst = unit * 20_000
        c.sock.setblocking(False)
        sent, peak, stalled_since = 0, 0, None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                n = c.sock.send(burst)
                sent += n
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 0.5:
                    break
                time.sleep(0.01)
            if unit == b"" and sent >= len(burst):
                break  # stream ids must grow: one burst only
            peak = max(peak, server.state()["out"])
        peak = max(peak, server.state()["out"])
        assert peak < 8 * 1024 * 1024, f"{peak} bytes of answers held for a peer that does not read"
        if unit:
            assert stalled_since is not None, f"sent {sent} bytes and the server kept reading"
    finally:
        c.close()
    server.assert_healthy()


def test_rapid_reset(server: ServerThread) -> None:
    """Streams opened and reset at once ("rapid reset", CVE-2023-44487): each costs a task started and
    cancelled, nothing stays behind, and the connection goes on serving."""
    c = Client(server.port)
    try:
        block = request_block(c.enc)
        burst = b"".join(
            frame(fr.HEADERS, fr.F_END_HEADERS, sid, block)
            + frame(fr.DATA, 0, sid, grpc_msg(b"x"))
            + frame(fr.RST_STREAM, 0, sid, struct.pack(">I", fr.CANCEL))
            for sid in range(1, 20_001, 2)
        )
        c.send(burst)
        out = c.finish(within=20)
        assert out.barrier and out.goaway is None
        s = server.state()
        assert s["streams"] == 0 and s["queued"] == 0
        assert c.call(20_001, b"still here") == b"echo:still here"
    finally:
        c.close()
    server.assert_healthy()


def test_truncated_frames_then_close(server: ServerThread) -> None:
    """A connection dropped mid-frame or mid-header-block leaves nothing behind."""
    enc = hpack.Encoder()
    whole = (
        frame(fr.HEADERS, 0, 1, request_block(enc)[:4])
        + frame(fr.CONTINUATION, fr.F_END_HEADERS, 1, request_block(hpack.Encoder())[4:])
        + frame(fr.DATA, 0, 1, grpc_msg(b"0123456789" * 10))
    )
    for cut in range(0, len(whole), 7):
        c = Client(server.port)
        c.send(whole[:cut])
        c.close()
    server.assert_healthy()


# --- many idle streams ------------------------------------------------------------------------


def test_10k_idle_streams_have_a_bounded_cost() -> None:
    """10,000 streams open at once on one connection, each with its handler waiting for a request:
    the server's Python heap (tracemalloc: stream state, task, handler coroutine) grows by less than
    10 KB per stream, and all of it is freed when the client goes. (The measured cost, in RSS too, is
    in docs/envoy.md: benchmarks/dataplane/idle_streams.py.)"""
    import gc
    import tracemalloc

    n = 10_000
    with _server() as server:
        c = Client(server.port)
        try:
            enc = c.enc
            burst = b"".join(
                frame(fr.HEADERS, fr.F_END_HEADERS, sid, request_block(enc)) for sid in range(1, 2 * n, 2)
            )
            assert c.finish().barrier
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                c.send(burst)
                assert c.finish(within=30).barrier
                assert server.state()["streams"] == n
                time.sleep(0.2)  # every handler task has run up to its first await
                gc.collect()
                per_stream = (tracemalloc.get_traced_memory()[0] - before) / n
            finally:
                tracemalloc.stop()
            assert per_stream < 10_000, f"{per_stream:.0f} bytes per idle stream"
            assert c.call(2 * n + 1, b"busy") == b"echo:busy"
        finally:
            c.close()
        server.assert_healthy()


def test_window_floods_over_many_blocked_streams_cost_linear_work(server: ServerThread) -> None:
    """3,000 streams whose answers wait for window (the client's INITIAL_WINDOW_SIZE is 0), then
    floods of SETTINGS and of 1-byte stream WINDOW_UPDATEs: each frame must cost work for the streams it
    concerns, not a scan of every blocked stream (which made each SETTINGS frame quadratic and each
    WINDOW_UPDATE linear in the blocked streams: minutes for this test). Then the windows open and
    every answer is delivered, in full."""
    n = 3000
    c = Client(server.port, struct.pack(">HI", fr.S_INITIAL_WINDOW_SIZE, 0))
    try:
        block = request_block(c.enc)
        sids = range(1, 2 * n, 2)
        c.send(
            b"".join(
                frame(fr.HEADERS, fr.F_END_HEADERS, sid, block)
                + frame(fr.DATA, fr.F_END_STREAM, sid, grpc_msg(b"x"))
                for sid in sids
            )
        )
        assert c.finish(within=30).barrier
        zero = frame(fr.SETTINGS, 0, 0, struct.pack(">HI", fr.S_INITIAL_WINDOW_SIZE, 0))
        one_byte = b"".join(frame(fr.WINDOW_UPDATE, 0, sid, struct.pack(">I", 1)) for sid in sids)
        c.send(zero * 300 + one_byte * 5)  # 5 bytes of window per stream: no answer (11 bytes) completes
        out = c.finish(within=10)
        assert out.barrier and out.goaway is None
        got = {sid: bytearray() for sid in sids}
        for t, _, s, p in out.frames:
            if t == fr.DATA:
                got[s] += p
        assert all(len(v) == 5 for v in got.values())
        # Open every window: each stream gets the rest of its answer and its trailers.
        c.out = Outcome()
        c.send(frame(fr.SETTINGS, 0, 0, struct.pack(">HI", fr.S_INITIAL_WINDOW_SIZE, 65_535)))
        ended: set[int] = set()

        def done(f: tuple[int, int, int, bytes]) -> bool:
            if f[0] == fr.DATA:
                got[f[2]] += f[3]
            if f[0] == fr.HEADERS and f[1] & fr.F_END_STREAM:
                ended.add(f[2])
            return len(ended) == n

        c.read_until(done, within=30)
        assert all(bytes(v) == grpc_msg(b"echo:x") for v in got.values())
    finally:
        c.close()
    server.assert_healthy()


def test_answers_blocked_on_the_connection_window_are_delivered_in_full(server: ServerThread) -> None:
    """Stream windows open, the connection window (65,535 until we say more) too small for the
    answers: they wait, then go out as connection WINDOW_UPDATEs come, first by 1 byte at a time (a
    flood that must not cost a scan of the waiting streams per frame), then in large steps; every
    stream gets exactly its answer."""
    n, size = 40, 20_000
    c = Client(server.port, struct.pack(">HI", fr.S_INITIAL_WINDOW_SIZE, 1 << 20))
    try:
        block = request_block(c.enc)
        sids = list(range(1, 2 * n, 2))
        msgs = {sid: bytes([sid % 251]) * size for sid in sids}
        for sid in sids:
            c.send(
                frame(fr.HEADERS, fr.F_END_HEADERS, sid, block)
                + frame(fr.DATA, fr.F_END_STREAM, sid, grpc_msg(msgs[sid]))
            )
        out = c.finish(within=10)
        got = {sid: bytearray() for sid in sids}
        ended: set[int] = set()
        for t, f, s, p in out.frames:
            if t == fr.DATA:
                got[s] += p
            if t == fr.HEADERS and f & fr.F_END_STREAM:
                ended.add(s)  # the first few answers fit in the window
        assert sum(map(len, got.values())) == fr.DEFAULT_WINDOW  # the connection window, used up
        assert len(ended) < n
        c.send(frame(fr.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)) * 20_000)
        c.out = Outcome()
        c.send(frame(fr.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 24)))

        def done(f: tuple[int, int, int, bytes]) -> bool:
            if f[0] == fr.DATA:
                got[f[2]] += f[3]
            if f[0] == fr.HEADERS and f[1] & fr.F_END_STREAM:
                ended.add(f[2])
            return len(ended) == n

        c.read_until(done, within=20)
        assert {sid: bytes(v) for sid, v in got.items()} == {
            sid: grpc_msg(b"echo:" + m) for sid, m in msgs.items()
        }
    finally:
        c.close()
    server.assert_healthy()
