"""The alternative in-loop gRPC transports (grpclib, h2 + thin framing) measured against `grpc_h2`
(benchmarks/dataplane/overhead.py): they must carry the same exchanges correctly before their numbers
mean anything. Checked with the reference client (grpcio) and with the real ext_proc servicer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from ingate.dataplane.grpc_h2 import GrpcH2Server
from ingate.dataplane.grpc_h2_frames import StreamMethod
from ingate.dataplane.grpclib_server import GrpclibServer
from ingate.dataplane.h2_server import H2Server

ECHO = "/test.Echo/Chat"
SERVERS = {"grpc_h2": GrpcH2Server, "grpclib": GrpclibServer, "h2lib": H2Server}


def _ident(b: bytes) -> bytes:
    return b


class _Echo:
    def __init__(self) -> None:
        self.finished: list[str] = []

    async def __call__(self, requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        how = "completed"
        try:
            async for m in requests:
                yield b"echo:" + m
        except asyncio.CancelledError:
            how = "cancelled"
            raise
        finally:
            self.finished.append(how)


@pytest.fixture(params=sorted(SERVERS))
async def served(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, _Echo]]:
    echo = _Echo()
    srv = SERVERS[request.param]({ECHO: StreamMethod(decode=_ident, handler=echo, encode=_ident)})
    await srv.start("127.0.0.1", 0)
    try:
        yield srv, echo
    finally:
        await srv.stop(0)


def _chat(ch: grpc.aio.Channel) -> Any:
    return ch.stream_stream(ECHO, request_serializer=_ident, response_deserializer=_ident)


async def test_echo_sizes_concurrency_and_cancel(served: tuple[Any, _Echo]) -> None:
    srv, echo = served
    big = bytes(range(256)) * 6144  # 1.5 MiB
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        assert [m async for m in _chat(ch)([b"a", big, b"c"])] == [b"echo:a", b"echo:" + big, b"echo:c"]

        async def one(i: int) -> list[bytes]:
            return [m async for m in _chat(ch)([b"%d" % i] * 2)]

        got = await asyncio.gather(*(one(i) for i in range(100)))
        assert got == [[b"echo:%d" % i] * 2 for i in range(100)]
        call = _chat(ch)()
        await call.write(b"x")
        assert await call.read() == b"echo:x"
        call.cancel()
        for _ in range(200):
            if "cancelled" in echo.finished:
                break
            await asyncio.sleep(0.01)
    assert echo.finished.count("completed") == 101 and echo.finished.count("cancelled") == 1


async def test_the_ext_proc_servicer_runs_on_each(served: tuple[Any, _Echo]) -> None:
    """The real ext_proc servicer's Process over each transport, driven by the real ext_proc stub."""
    from types import SimpleNamespace

    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    from ingate.dataplane.extproc import ExtProcServicer
    from ingate.dataplane.extproc_server import PROCESS_METHOD

    class _Director:
        async def handle(self, path: str, headers: Any, raw_body: bytes) -> Any:
            return SimpleNamespace(
                target=SimpleNamespace(address="127.0.0.1:9"),
                request=SimpleNamespace(stream=False),
                upstream_body=raw_body,
            )

        def on_first_token(self, decision: Any) -> None:
            pass

        def finish(self, decision: Any, info: Any) -> None:
            pass

    srv_cls = type(served[0])
    svc = ExtProcServicer(_Director(), report_served=False, responses="none")  # type: ignore[arg-type]
    srv = srv_cls(
        {
            PROCESS_METHOD: StreamMethod(
                decode=pb.ProcessingRequest.FromString,
                handler=lambda requests: svc.Process(requests, None),
                encode=pb.ProcessingResponse.SerializeToString,
            )
        }
    )
    await srv.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            hdrs = pb.HttpHeaders()
            for k, v in (
                (":method", "POST"),
                (":path", "/v1/completions"),
                ("content-type", "application/json"),
            ):
                hdrs.headers.headers.add(key=k, raw_value=v.encode())
            body = pb.HttpBody(body=b'{"model":"m","prompt":"hi"}', end_of_stream=True)
            answers = [
                a
                async for a in stub.Process(
                    [pb.ProcessingRequest(request_headers=hdrs), pb.ProcessingRequest(request_body=body)]
                )
            ]
        assert [a.WhichOneof("response") for a in answers] == ["request_headers", "request_body"]
    finally:
        await srv.stop(0)
