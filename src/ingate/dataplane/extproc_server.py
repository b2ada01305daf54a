"""Hosting the ext_proc servicer: the gRPC transport (`ExtProcServer`) and the picker-only data plane
(`ExtProcOnly`) that a cluster's Envoy (Envoy Gateway, Istio, kgateway, GKE) calls."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, get_args

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from ingate.dataplane.extproc import ExtProcServicer
from ingate.dataplane.extproc_timing import ExtProcTimings
from ingate.dataplane.grpc_h2 import GrpcH2Server
from ingate.dataplane.grpc_h2_frames import StreamMethod
from ingate.dataplane.tls import ServerTLS
from ingate.lifecycle import DirectorLike

PROCESS_METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
Transport = Literal["h2", "grpcio"]
TRANSPORTS: tuple[str, ...] = get_args(Transport)
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024


class MessageTooLarge(Exception):
    """An answer over `--grpc-max-send-msg-size`: the stream fails instead of sending it."""


def limited_encoder(limit: int | None) -> Callable[[pb.ProcessingResponse], bytes]:
    """`ProcessingResponse` -> bytes, refusing answers larger than `limit` (None: no limit)."""
    if limit is None:
        return pb.ProcessingResponse.SerializeToString

    def encode(resp: pb.ProcessingResponse) -> bytes:
        data = resp.SerializeToString()
        if len(data) > limit:
            raise MessageTooLarge(
                f"ext_proc answer of {len(data)} bytes exceeds --grpc-max-send-msg-size {limit}"
            )
        return data

    return encode


class ExtProcServer:
    """Hosts `ExtProcServicer` on one address (loopback by default) over a gRPC transport.

    The servicer's `Process` is the whole protocol; the transport only carries messages:

    - ``"h2"`` (default): `ingate.dataplane.grpc_h2`, a small HTTP/2 gRPC server in the caller's event
      loop (no thread hop per message; see that module and docs/envoy.md for the measured difference);
    - ``"grpcio"``: `grpc.aio`, the reference implementation (its own poller thread).
    """

    def __init__(
        self,
        servicer: ExtProcServicer,
        host: str = "127.0.0.1",
        port: int = 0,
        transport: Transport = "h2",
        tls: ServerTLS | None = None,
        max_recv_msg_bytes: int = DEFAULT_MAX_MESSAGE,
        max_send_msg_bytes: int | None = None,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown ext_proc transport {transport!r} (known: {', '.join(TRANSPORTS)})")
        self.servicer = servicer
        self.host = host
        self.port = port
        self.transport = transport
        self.tls = tls
        """TLS (`--secure-serving`): the h2 transport serves the context's certificate as reloaded;
        grpcio reads the files once at start."""
        self.max_recv_msg_bytes = max_recv_msg_bytes
        """Larger requests fail the stream with RESOURCE_EXHAUSTED (`--grpc-max-recv-msg-size`)."""
        self.max_send_msg_bytes = max_send_msg_bytes
        """Larger answers fail the stream (`--grpc-max-send-msg-size`): RESOURCE_EXHAUSTED with grpcio,
        INTERNAL ("handler error: MessageTooLarge") with h2; None = no limit."""
        self._server: grpc.aio.Server | None = None
        self._h2: GrpcH2Server | None = None

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (useful when `port` was 0)."""
        if self.transport == "h2":
            svc = self.servicer
            h2 = GrpcH2Server(
                {
                    PROCESS_METHOD: StreamMethod(
                        decode=pb.ProcessingRequest.FromString,
                        handler=lambda requests: svc.Process(requests, None),
                        encode=limited_encoder(self.max_send_msg_bytes),
                    )
                },
                max_message_bytes=self.max_recv_msg_bytes,
            )
            try:
                ctx = self.tls.context if self.tls is not None else None
                self.port = await h2.start(self.host, self.port, ssl=ctx)
            except OSError as e:
                raise OSError(f"ext_proc server could not bind {self.host}:{self.port}: {e}") from e
            self._h2 = h2
            return self.port
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.max_recv_msg_bytes),
                ("grpc.max_send_message_length", self.max_send_msg_bytes or -1),
                ("grpc.so_reuseport", 0),
                ("grpc.max_concurrent_streams", 10_000),
            ]
        )
        pb_grpc.add_ExternalProcessorServicer_to_server(self.servicer, server)
        addr = f"{self.host}:{self.port}"
        if self.tls is not None:
            if self.tls.restricted:
                raise ValueError("--tls-min-version / --tls-cipher-suites need the h2 ext_proc transport")
            creds = grpc.ssl_server_credentials(
                [(self.tls.key_file.read_bytes(), self.tls.cert_file.read_bytes())]
            )
            bound = server.add_secure_port(addr, creds)
        else:
            bound = server.add_insecure_port(addr)
        if bound == 0:
            raise OSError(f"ext_proc server could not bind {self.host}:{self.port}")
        await server.start()
        self.port = bound
        self._server = server
        return bound

    async def stop(self, grace: float = 1.0) -> None:
        """Stop accepting streams; in-flight ones get `grace` seconds, then are cancelled."""
        if self._h2 is not None:
            await self._h2.stop(grace)
            self._h2 = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None


def first_of(addresses: Callable[[], Sequence[str]]) -> Callable[[], str | None]:
    """An `any_endpoint` for headers-only requests that rotates over the current pool addresses."""
    state = [0]

    def pick() -> str | None:
        addrs = addresses()
        if not addrs:
            return None
        state[0] = (state[0] + 1) % len(addrs)
        return addrs[state[0]]

    return pick


class ExtProcOnly:
    """The picker alone as an ext_proc gRPC server, for an Envoy run by someone else.

    This is how ingate runs in a cluster: Envoy Gateway, Istio, kgateway or GKE own the proxy and call
    the picker named by the InferencePool's endpointPickerRef.
    """

    def __init__(
        self,
        director: DirectorLike,
        host: str,
        port: int,
        *,
        max_body_bytes: int,
        pool_addresses: Callable[[], Sequence[str]],
        tls: ServerTLS | None = None,
        timings: ExtProcTimings | None = None,
        max_recv_msg_bytes: int = DEFAULT_MAX_MESSAGE,
        max_send_msg_bytes: int | None = None,
    ) -> None:
        svc = ExtProcServicer(
            director, max_body_bytes=max_body_bytes, any_endpoint=first_of(pool_addresses), timings=timings
        )
        self.server = ExtProcServer(
            svc,
            host=host,
            port=port,
            tls=tls,
            max_recv_msg_bytes=max_recv_msg_bytes,
            max_send_msg_bytes=max_send_msg_bytes,
        )
        self.tls = tls

    @property
    def url(self) -> str:
        scheme = "grpcs" if self.tls is not None else "grpc"
        return f"{scheme}://{self.server.host}:{self.server.port}"

    async def start(self) -> None:
        if self.tls is not None:
            self.tls.start()
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(1.0)
        if self.tls is not None:
            await self.tls.stop()
