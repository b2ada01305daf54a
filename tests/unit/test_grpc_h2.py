"""The in-loop HTTP/2 gRPC server, checked against a real, independent client (grpcio) and raw frames.

grpcio's client has its own HTTP/2 stack (flow control, HPACK with a dynamic table, frame splitting),
so interoperating with it exercises the server the way Envoy's gRPC client does; the raw-frame tests
cover what a well-behaved client rarely sends (PING, CONTINUATION, padding, a bad preface).
"""

from __future__ import annotations

import asyncio
import gc
import struct
import weakref
from collections.abc import AsyncIterator
from typing import Any

import grpc
import hpack
import pytest

from ingate.dataplane import grpc_h2 as g
from ingate.dataplane import grpc_h2_frames as fr

ECHO = "/test.Echo/Chat"


def _ident(b: bytes) -> bytes:
    return b


class _State:
    pass


class _Handlers:
    """Handlers that record how their streams ended (the exactly-once property the picker relies on)."""

    def __init__(self) -> None:
        self.finished: list[str] = []
        self.started = asyncio.Event()
        self.state: list[weakref.ref[_State]] = []

    async def echo(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        how = "completed"
        state = _State()  # what a real handler keeps per stream (the picker: the request's decision)
        self.state.append(weakref.ref(state))
        try:
            async for m in requests:
                self.started.set()
                if m == b"boom":
                    raise RuntimeError("boom")
                if m == b"silent":
                    return  # ends the stream without a single answer (ext_proc observer streams)
                yield b"echo:" + m
        except asyncio.CancelledError:
            how = "cancelled"
            raise
        except RuntimeError:
            how = "raised"
            raise
        finally:
            self.finished.append(how)


@pytest.fixture
async def server() -> AsyncIterator[tuple[g.GrpcH2Server, _Handlers]]:
    h = _Handlers()
    srv = g.GrpcH2Server({ECHO: fr.StreamMethod(decode=_ident, handler=h.echo, encode=_ident)})
    await srv.start("127.0.0.1", 0)
    try:
        yield srv, h
    finally:
        await srv.stop(0)


def _chat(channel: grpc.aio.Channel, path: str = ECHO) -> Any:
    return channel.stream_stream(path, request_serializer=_ident, response_deserializer=_ident)


async def test_echo_large_and_concurrent_streams(server: tuple[g.GrpcH2Server, _Handlers]) -> None:
    srv, h = server
    big = bytes(range(256)) * 4096  # 1 MiB: split into frames, needs WINDOW_UPDATEs both ways
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        call = _chat(ch)([b"a", big, b"c"])
        got = [m async for m in call]
        assert got == [b"echo:a", b"echo:" + big, b"echo:c"]
        assert await call.code() == grpc.StatusCode.OK

        async def one(i: int) -> list[bytes]:
            return [m async for m in _chat(ch)([f"{i}-{j}".encode() for j in range(3)])]

        results = await asyncio.gather(*(one(i) for i in range(40)))
    assert results == [[f"echo:{i}-{j}".encode() for j in range(3)] for i in range(40)]
    assert h.finished == ["completed"] * 41
    assert srv.active_streams() == 0


async def test_interleaved_request_response(server: tuple[g.GrpcH2Server, _Handlers]) -> None:
    """Each answer arrives before the next request is sent (Envoy's ext_proc pattern)."""
    srv, _ = server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        call = _chat(ch)()
        for i in range(5):
            await call.write(f"m{i}".encode())
            assert await call.read() == f"echo:m{i}".encode()
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


async def test_client_cancel_ends_the_handler_once(server: tuple[g.GrpcH2Server, _Handlers]) -> None:
    srv, h = server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        call = _chat(ch)()
        await call.write(b"x")
        assert await call.read() == b"echo:x"
        call.cancel()  # RST_STREAM from the client
        for _ in range(100):
            if h.finished:
                break
            await asyncio.sleep(0.01)
        assert h.finished == ["cancelled"]
        # The connection is still good for new streams.
        assert [m async for m in _chat(ch)([b"y"])] == [b"echo:y"]
    assert h.finished == ["cancelled", "completed"]


async def test_a_reset_stream_is_freed_without_the_cyclic_gc(
    server: tuple[g.GrpcH2Server, _Handlers],
) -> None:
    """Envoy resets every ext_proc stream at the end of its HTTP stream, so a reset must not leave a
    reference cycle (stream -> task -> CancelledError -> traceback -> frames -> stream) holding the
    handler's state until a GC pass: those passes paused the picker's loop for 10-20 ms."""
    srv, h = server
    gc.collect()
    gc.disable()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            call = _chat(ch)()
            await call.write(b"x")
            assert await call.read() == b"echo:x"
            call.cancel()
            for _ in range(100):
                if h.finished:
                    break
                await asyncio.sleep(0.01)
            assert h.finished == ["cancelled"]
            await asyncio.sleep(0.05)  # the finished task's callbacks
            assert h.state[0]() is None, "the handler's state outlived its stream"
    finally:
        gc.enable()


async def test_errors_are_grpc_statuses(server: tuple[g.GrpcH2Server, _Handlers]) -> None:
    srv, h = server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        call = _chat(ch, "/test.Echo/Nope")()  # nothing written: the answer is trailers-only
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call.read()
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        call = _chat(ch)([b"ok", b"boom"])
        with pytest.raises(grpc.aio.AioRpcError) as e:
            _ = [m async for m in call]
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert "RuntimeError" in (e.value.details() or "")
    assert h.finished == ["raised"]


async def test_stop_cancels_open_streams() -> None:
    h = _Handlers()
    srv = g.GrpcH2Server({ECHO: fr.StreamMethod(decode=_ident, handler=h.echo, encode=_ident)})
    port = await srv.start("127.0.0.1", 0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = _chat(ch)()
        await call.write(b"x")
        assert await call.read() == b"echo:x"
        await srv.stop(0)
        assert h.finished == ["cancelled"]
        with pytest.raises(grpc.aio.AioRpcError):
            await call.write(b"y")
            await call.read()
            await call.read()
    with pytest.raises(OSError):  # the listener is gone
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.close()


# --- raw frames -------------------------------------------------------------------------------


class _Raw:
    """A bare HTTP/2 client on a socket: writes frames, reads frames."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w, self.buf = r, w, bytearray()

    @classmethod
    async def connect(cls, port: int, preface: bytes = fr.PREFACE) -> _Raw:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(preface + fr.frame(fr.SETTINGS, 0, 0))
        return cls(r, w)

    def send(self, ftype: int, flags: int, sid: int, payload: bytes = b"") -> None:
        self.w.write(fr.frame(ftype, flags, sid, payload))

    async def next(self) -> tuple[int, int, int, bytes]:
        while True:
            if len(self.buf) >= 9:
                hi, lo, t, f, sid = struct.unpack_from(">HBBBI", self.buf)
                n = (hi << 8) | lo
                if len(self.buf) >= 9 + n:
                    payload = bytes(self.buf[9 : 9 + n])
                    del self.buf[: 9 + n]
                    return t, f, sid, payload
            data = await asyncio.wait_for(self.r.read(65536), 2.0)
            if not data:
                raise EOFError
            self.buf += data

    async def until(self, ftype: int, sid: int | None = None) -> tuple[int, bytes]:
        for _ in range(50):
            t, f, s, p = await self.next()
            if t == ftype and (sid is None or s == sid):
                return f, p
        raise AssertionError("frame not seen")

    def close(self) -> None:
        self.w.close()


def _request_block(enc: hpack.Encoder, path: str = ECHO) -> bytes:
    return enc.encode(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "x"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
    )


def _grpc_msg(b: bytes) -> bytes:
    return struct.pack(">BI", 0, len(b)) + b


async def test_raw_ping_continuation_padding(server: tuple[g.GrpcH2Server, _Handlers]) -> None:
    srv, h = server
    c = await _Raw.connect(srv.port)
    try:
        c.send(fr.PING, 0, 0, b"12345678")
        flags, payload = await c.until(fr.PING)
        assert flags & fr.F_ACK and payload == b"12345678"
        enc = hpack.Encoder()
        for sid in (1, 3, 5):  # later blocks reuse the dynamic table the first one filled (cache hit)
            block = _request_block(enc)
            c.send(fr.HEADERS, 0, sid, block[:5])  # split over HEADERS + CONTINUATION
            c.send(fr.CONTINUATION, fr.F_END_HEADERS, sid, block[5:])
            msg = _grpc_msg(b"hi")
            pad = 7
            c.send(fr.DATA, fr.F_PADDED | fr.F_END_STREAM, sid, bytes([pad]) + msg + b"\0" * pad)
            await c.until(fr.HEADERS, sid)  # response headers
            _, data = await c.until(fr.DATA, sid)
            assert data == _grpc_msg(b"echo:hi")
            flags, trailers = await c.until(fr.HEADERS, sid)
            assert flags & fr.F_END_STREAM
            assert (b"grpc-status", b"0") in hpack.Decoder().decode(trailers, raw=True)
    finally:
        c.close()
    assert h.finished == ["completed"] * 3


async def test_raw_handler_without_answers_ends_with_a_trailers_only_ok(
    server: tuple[g.GrpcH2Server, _Handlers],
) -> None:
    """A stream answered by no message (an ext_proc observer) ends with one HEADERS frame that holds
    the response headers and the OK status (gRPC's trailers-only form, which clients require)."""
    srv, h = server
    c = await _Raw.connect(srv.port)
    try:
        c.send(fr.HEADERS, fr.F_END_HEADERS, 1, _request_block(hpack.Encoder()))
        c.send(fr.DATA, fr.F_END_STREAM, 1, _grpc_msg(b"silent"))
        flags, block = await c.until(fr.HEADERS, 1)
        assert flags & fr.F_END_STREAM
        fields = hpack.Decoder().decode(block, raw=True)
        assert (b":status", b"200") in fields and (b"grpc-status", b"0") in fields
        assert (b"content-type", b"application/grpc") in fields
    finally:
        c.close()
    assert h.finished == ["completed"]


async def test_raw_bad_preface_gets_goaway(server: tuple[g.GrpcH2Server, _Handlers]) -> None:
    srv, _ = server
    c = await _Raw.connect(srv.port, preface=b"GET / HTTP/1.1\r\n\r\n")
    try:
        _, payload = await c.until(fr.GOAWAY)
        assert struct.unpack(">II", payload[:8])[1] == fr.PROTOCOL_ERROR
    finally:
        c.close()


async def test_raw_flow_control_holds_data_until_window_update(
    server: tuple[g.GrpcH2Server, _Handlers],
) -> None:
    """A client with a 10-byte stream window gets the first 10 bytes, the rest after WINDOW_UPDATE."""
    srv, _ = server
    r, w = await asyncio.open_connection("127.0.0.1", srv.port)
    c = _Raw(r, w)
    try:
        w.write(fr.PREFACE + fr.frame(fr.SETTINGS, 0, 0, struct.pack(">HI", fr.S_INITIAL_WINDOW_SIZE, 10)))
        enc = hpack.Encoder()
        c.send(fr.HEADERS, fr.F_END_HEADERS, 1, _request_block(enc))
        c.send(fr.DATA, fr.F_END_STREAM, 1, _grpc_msg(b"0123456789"))
        _, first = await c.until(fr.DATA, 1)
        assert len(first) == 10
        c.send(fr.WINDOW_UPDATE, 0, 1, struct.pack(">I", 100))
        _, rest = await c.until(fr.DATA, 1)
        assert first + rest == _grpc_msg(b"echo:0123456789")
        flags, _ = await c.until(fr.HEADERS, 1)
        assert flags & fr.F_END_STREAM
    finally:
        c.close()
