"""The ext_proc gRPC transport on `grpclib` (asyncio gRPC in the caller's event loop, on the `h2` library).

An alternative to `ingate.dataplane.grpc_h2` measured beside it (benchmarks/dataplane/overhead.py,
plane ``envoy-extproc-null-grpclib``; docs/envoy.md "The gRPC transport"): like `grpc_h2` it runs in the
gateway's own loop, so it has none of grpcio's poller-thread hops; unlike it, the HTTP/2 state machine,
HPACK and flow control are grpclib's and h2's. Same shape as `GrpcH2Server`: methods are
`{"/package.Service/Method": StreamMethod}`, `start(host, port) -> port`, `stop(grace)`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

from grpclib.const import Cardinality, Handler
from grpclib.encoding.base import CodecBase
from grpclib.server import Server, Stream

from ingate.dataplane.grpc_h2_frames import StreamMethod


class _MethodCodec(CodecBase):
    """grpclib hands the codec each method's request/reply "type": here the `StreamMethod` itself."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message_type.encode(message))

    def decode(self, data: bytes, message_type: Any) -> Any:
        return message_type.decode(data)


class _Service:
    def __init__(self, methods: Mapping[str, StreamMethod]) -> None:
        self.methods = dict(methods)

    def __mapping__(self) -> dict[str, Handler]:
        return {
            path: Handler(self._bind(m), Cardinality.STREAM_STREAM, m, m) for path, m in self.methods.items()
        }

    @staticmethod
    def _bind(method: StreamMethod) -> Any:
        async def serve(stream: Stream[Any, Any]) -> None:
            async def requests() -> AsyncIterator[Any]:
                while True:
                    msg = await stream.recv_message()
                    if msg is None:
                        return
                    yield msg

            async for resp in method.handler(requests()):
                await stream.send_message(resp)

        return serve


class GrpclibServer:
    """Serves `methods` (`{"/package.Service/Method": StreamMethod}`) with grpclib on one TCP address."""

    def __init__(self, methods: Mapping[str, StreamMethod]) -> None:
        self.methods = dict(methods)
        self._server: Server | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Bind and serve; returns the bound port."""
        server = Server([_Service(self.methods)], codec=_MethodCodec())
        await server.start(host, port, backlog=1024, reuse_address=True)
        listener = cast(asyncio.Server, server._server)
        self.port = int(listener.sockets[0].getsockname()[1])
        self._server = server
        return self.port

    async def stop(self, grace: float = 1.0) -> None:
        """Stop listening and cancel the open streams (grpclib has no graceful drain), waiting up to
        `grace` seconds for their handlers to finish."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), max(grace, 0.1))
