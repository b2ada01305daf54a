"""The in-loop HTTP/2 gRPC server against the reference client (grpcio's `grpc.aio` channel).

grpcio's client has its own HTTP/2 stack (C-core: flow control, HPACK with a dynamic table, frame
splitting, BDP probing PINGs, its own reset and GOAWAY handling), so these exchanges check the server
the way a second, independent implementation sees it: messages above one frame (20 KB), above the
default windows (1.5 MB) and above our own initial stream window (20 MB), 200 concurrent streams on one
connection, cancellation mid-stream, a concurrency limit the client must queue behind, GOAWAY on stop
while streams are in flight, and thousands of streams one after another on one connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from ingate.dataplane import grpc_h2 as g
from ingate.dataplane import grpc_h2_frames as fr

ECHO = "/test.Echo/Chat"
GATED = "/test.Echo/Gated"  # answers each message only once the test opens the gate


def _ident(b: bytes) -> bytes:
    return b


class _Service:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.finished: list[str] = []
        self.entered = 0

    async def echo(self, requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        how = "completed"
        try:
            async for m in requests:
                yield b"echo:" + m
        except asyncio.CancelledError:
            how = "cancelled"
            raise
        finally:
            self.finished.append(how)

    async def gated(self, requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        how = "completed"
        try:
            async for m in requests:
                self.entered += 1
                await self.gate.wait()
                yield b"gated:" + m
        except asyncio.CancelledError:
            how = "cancelled"
            raise
        finally:
            self.finished.append(how)

    def methods(self) -> dict[str, fr.StreamMethod]:
        return {
            ECHO: fr.StreamMethod(decode=_ident, handler=self.echo, encode=_ident),
            GATED: fr.StreamMethod(decode=_ident, handler=self.gated, encode=_ident),
        }


async def _serve(svc: _Service, **kw: Any) -> g.GrpcH2Server:
    srv = g.GrpcH2Server(svc.methods(), **kw)
    await srv.start("127.0.0.1", 0)
    return srv


def _call(ch: grpc.aio.Channel, path: str = ECHO) -> Any:
    return ch.stream_stream(path, request_serializer=_ident, response_deserializer=_ident)


def _channel(port: int) -> grpc.aio.Channel:
    big = 64 * 1024 * 1024
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.max_receive_message_length", big), ("grpc.max_send_message_length", big)],
    )


async def _until(cond: Any, within: float = 5.0) -> None:
    for _ in range(int(within / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


@pytest.mark.parametrize("size", [20 * 1024, 1536 * 1024, 20 * 1024 * 1024], ids=["20KB", "1.5MB", "20MB"])
async def test_large_messages_both_ways(size: int) -> None:
    """Request and answer of `size` bytes, several per stream. 20 MB is above the 16 MiB stream window
    the server used to give: the stream must be credited for it, not stall."""
    svc = _Service()
    srv = await _serve(svc)
    try:
        body = bytes(range(256)) * (size // 256)
        async with _channel(srv.port) as ch:
            call = _call(ch)()
            for i in range(3 if size < 10_000_000 else 1):
                msg = bytes([i]) + body
                await call.write(msg)
                got = await asyncio.wait_for(call.read(), 30)
                assert got == b"echo:" + msg
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
    finally:
        await srv.stop(0)
    assert svc.finished == ["completed"]


async def test_200_concurrent_streams_on_one_connection() -> None:
    svc = _Service()
    srv = await _serve(svc)
    try:
        async with _channel(srv.port) as ch:
            # Every stream is open at once: each waits at the gate after its first message.
            calls = [_call(ch, GATED)() for _ in range(200)]
            for i, c in enumerate(calls):
                await c.write(f"{i}".encode())
            await _until(lambda: svc.entered == 200)
            assert srv.active_streams() == 200
            assert len(srv._conns) == 1
            svc.gate.set()
            for i, c in enumerate(calls):
                assert await asyncio.wait_for(c.read(), 10) == f"gated:{i}".encode()
                await c.done_writing()
            codes = await asyncio.gather(*(c.code() for c in calls))
        assert codes == [grpc.StatusCode.OK] * 200
        assert svc.finished == ["completed"] * 200
        assert srv.active_streams() == 0
    finally:
        await srv.stop(0)


async def test_a_concurrency_limit_queues_the_client_not_fails_it() -> None:
    """With SETTINGS_MAX_CONCURRENT_STREAMS 8, grpcio holds the other streams until slots free up."""
    svc = _Service()
    srv = await _serve(svc, max_concurrent_streams=8)
    try:
        async with _channel(srv.port) as ch:

            async def one(i: int) -> list[bytes]:
                return [m async for m in _call(ch)([f"{i}".encode()] * 3)]

            got = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(64))), 30)
        assert got == [[f"echo:{i}".encode()] * 3 for i in range(64)]
    finally:
        await srv.stop(0)


async def test_cancel_mid_stream_while_a_large_answer_is_in_flight() -> None:
    """The client resets a stream (RST_STREAM CANCEL) while the server is still sending a 1.5 MB answer
    and the client has not read it: the handler is cancelled once, its buffered bytes are dropped, and
    the connection carries on."""
    svc = _Service()
    srv = await _serve(svc)
    try:
        async with _channel(srv.port) as ch:
            call = _call(ch)()
            await call.write(b"x" * (1536 * 1024))
            await _until(lambda: srv.active_streams() == 1)
            await asyncio.sleep(0.05)
            call.cancel()
            await _until(lambda: svc.finished == ["cancelled"])
            await _until(lambda: srv.active_streams() == 0)
            assert [m async for m in _call(ch)([b"after"])] == [b"echo:after"]
        assert svc.finished == ["cancelled", "completed"]
    finally:
        await srv.stop(0)


async def test_stop_sends_goaway_and_lets_in_flight_streams_finish() -> None:
    """`stop(grace)`: GOAWAY to the client, the listener closes, streams already open finish within the
    grace period with their answers and OK; the client opens no new stream on that connection."""
    svc = _Service()
    srv = await _serve(svc)
    port = srv.port
    async with _channel(port) as ch:
        calls = [_call(ch, GATED)() for _ in range(5)]
        for i, c in enumerate(calls):
            await c.write(f"{i}".encode())
            await c.done_writing()
        await _until(lambda: svc.entered == 5)
        stopping = asyncio.create_task(srv.stop(grace=5.0))
        await asyncio.sleep(0.1)  # GOAWAY is out; the streams are still waiting at the gate
        assert not stopping.done()
        svc.gate.set()
        got = [await asyncio.wait_for(c.read(), 5) for c in calls]
        assert got == [f"gated:{i}".encode() for i in range(5)]
        assert await asyncio.gather(*(c.code() for c in calls)) == [grpc.StatusCode.OK] * 5
        await asyncio.wait_for(stopping, 5)
        # The server is gone: a new call fails cleanly instead of hanging.
        late = _call(ch)([b"late"])
        with pytest.raises(grpc.aio.AioRpcError) as e:
            _ = [m async for m in late]
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert svc.finished == ["completed"] * 5


async def test_stop_cancels_what_outlives_the_grace() -> None:
    svc = _Service()
    srv = await _serve(svc)
    async with _channel(srv.port) as ch:
        call = _call(ch, GATED)()
        await call.write(b"x")
        await _until(lambda: svc.entered == 1)
        await asyncio.wait_for(srv.stop(grace=0.2), 5)
        assert svc.finished == ["cancelled"]
        assert await asyncio.wait_for(call.code(), 5) != grpc.StatusCode.OK


async def test_thousands_of_sequential_streams_on_one_connection() -> None:
    svc = _Service()
    srv = await _serve(svc)
    try:
        async with _channel(srv.port) as ch:
            for i in range(3000):
                assert [m async for m in _call(ch)([b"%d" % i])] == [b"echo:%d" % i]
            assert len(srv._conns) == 1
            (conn,) = srv._conns
            assert conn.last_sid == 2 * 3000 - 1  # one connection, stream ids 1, 3, ..., 5999
        assert svc.finished == ["completed"] * 3000
        assert srv.active_streams() == 0
    finally:
        await srv.stop(0)
