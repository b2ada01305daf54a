"""Envoy ext_proc server: Envoy proxies the bytes, the director decides where they go.

One gRPC bidirectional stream (`envoy.service.ext_proc.v3.ExternalProcessor/Process`) carries one HTTP
request. The filter runs with request/response headers `SEND`, bodies `FULL_DUPLEX_STREAMED` and trailers
`SEND` (see `ingate.dataplane.envoy`), so on each stream:

1. `request_headers` arrives. If it ends the stream (no body) the request goes to any endpoint: the
   headers are answered at once, with a destination when a pool lister was given, else none (Envoy's
   route then falls back to round robin over the pool).
2. `request_body` chunks arrive; they are buffered, and the headers answer is *held* until the chunk with
   `end_of_stream`. Then the director decides, and the processor answers, in this order: the headers
   (destination header + new content-length + `clear_route_cache`) with the `envoy.lb` dynamic
   metadata carrying the same destination, then the body as streamed body mutations of at most 62,000
   bytes each, `end_of_stream` on the last.
3. `response_headers` / `response_body` / `response_trailers` are passed through unchanged (each streamed
   chunk is echoed as a streamed mutation). The first body chunk marks the first token; usage is read
   from the tail of the body; `director.finish` runs exactly once when the stream ends for any reason
   (normal end, client disconnect, Envoy reset, processor error).

Errors from the director (`GatewayError`) and oversized bodies become `ImmediateResponse`s with the
OpenAI-style JSON body, so the client never waits on a decision that will not come.

The servicer is transport-neutral: `Process` takes an async iterator of requests and yields answers.
`ExtProcServer` runs it on `ingate.dataplane.grpc_h2` (an in-loop HTTP/2 gRPC server, the default) or
on `grpc.aio` (`transport="grpcio"`).

The per-message path is the gateway's latency path: no JSON is re-serialised (the body is forwarded as
the director returns it), constant responses are prebuilt protobuf messages, and bodies are sliced with
`memoryview` without copies beyond what protobuf needs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from ingate.dataplane.grpc_h2 import GrpcH2Server, StreamMethod
from ingate.errors import GatewayError
from ingate.request import HDR_DESTINATION, HDR_DESTINATION_SERVED
from ingate.scheduling.framework import ResponseInfo
from ingate.usage import USAGE_TAIL, parse_usage_tail

log = logging.getLogger(__name__)

MAX_CHUNK = 62_000
"""Largest body chunk sent back to Envoy in one streamed mutation (stays under gRPC's default frame)."""
LB_NAMESPACE = "envoy.lb"
DEFAULT_MAX_BODY = 16 * 1024 * 1024
ANSWER_CACHE = 4096
"""Prebuilt per-destination answers kept (a pool has at most a few thousand endpoints)."""

# Prebuilt constant answers: one allocation at import, none per message.
_EMPTY_REQ_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
_EMPTY_RESP_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
_EMPTY_REQ_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
_EMPTY_RESP_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
_EMPTY_RESP_EOS = pb.ProcessingResponse(
    response_body=pb.BodyResponse(
        response=pb.CommonResponse(
            body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(end_of_stream=True))
        )
    )
)


class DirectorLike(Protocol):
    """What the processor needs from `ingate.director.Director` (see its module docstring)."""

    async def handle(self, path: str, headers: Mapping[str, str], raw_body: bytes) -> Any: ...

    def on_first_token(self, decision: Any) -> None: ...

    def finish(self, decision: Any, info: Any) -> None: ...


@dataclass(slots=True)
class ResponseOutcome:
    """What the processor saw of one response; turned into the director's `ResponseInfo`."""

    status: int = 0
    started_at: float = 0.0
    """time.monotonic() when the request headers arrived."""
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_at: float | None = None
    ended_at: float = 0.0
    error: str | None = None
    """Why the stream ended early (client disconnect, reset), None when the response completed."""
    body_bytes: int = 0


InfoFactory = Callable[[Any, ResponseOutcome], Any]
"""Builds the director's `ResponseInfo` from what the processor observed."""


def to_response_info(decision: Any, o: ResponseOutcome) -> ResponseInfo:
    """The default `InfoFactory`: `ingate.scheduling.framework.ResponseInfo` with TTFT and e2e times.

    A stream that ended early (client gone, reset) reports status 499 when the upstream had answered
    with success, so learning plugins do not count a cut-off response as a complete one.
    """
    status = o.status if o.error is None or o.status >= 400 else 499
    return ResponseInfo(
        status=status,
        prompt_tokens=o.prompt_tokens,
        completion_tokens=o.completion_tokens,
        cached_tokens=o.cached_tokens,
        ttft_s=None if o.first_token_at is None else o.first_token_at - o.started_at,
        e2e_s=(o.ended_at - o.started_at) if o.ended_at else None,
    )


def _header_map(headers: base_pb2.HeaderMap) -> dict[str, str]:
    """Envoy sends values in `raw_value` (bytes) since 1.27; older ones use `value`."""
    out: dict[str, str] = {}
    for h in headers.headers:
        out[h.key] = h.raw_value.decode("latin-1") if h.raw_value else h.value
    return out


def _set_header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode("latin-1")),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _lb_metadata(destination: str) -> struct_pb2.Struct:
    md = struct_pb2.Struct()
    md.fields[LB_NAMESPACE].struct_value.fields[HDR_DESTINATION].string_value = destination
    return md


def immediate_error(status: int, body: bytes, headers: Mapping[str, str]) -> pb.ProcessingResponse:
    """An `ImmediateResponse` that ends the request with `status` and a JSON error body."""
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=pb.HeaderMutation(set_headers=[_set_header(k, v) for k, v in headers.items()]),
            body=body,
            details="ingate_" + str(status),
        )
    )


def _gateway_error_response(e: GatewayError) -> pb.ProcessingResponse:
    return immediate_error(e.status, e.body(), e.headers())


def _destination(decision: Any, fallbacks: int) -> str:
    """`ip:port[,ip:port...]`: the target, then up to `fallbacks` alternatives in order."""
    primary: str = decision.target.address
    if fallbacks <= 0:
        return primary
    more = getattr(decision, "fallbacks", None)
    if more is None:
        return primary
    extra = more() if callable(more) else more
    addrs = [primary]
    for ep in extra:
        if len(addrs) > fallbacks:
            break
        addr = ep.address if hasattr(ep, "address") else str(ep)
        if addr != primary:
            addrs.append(addr)
    return ",".join(addrs)


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):
    """The `ExternalProcessor` service over a director. One instance serves every stream."""

    def __init__(
        self,
        director: DirectorLike,
        *,
        info_factory: InfoFactory = to_response_info,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        any_endpoint: Callable[[], str | None] | None = None,
        fallbacks: int = 0,
        report_served: bool = True,
        expect_responses: bool = True,
    ) -> None:
        self.director = director
        self.info_factory = info_factory
        self.max_body_bytes = max_body_bytes
        self.any_endpoint = any_endpoint
        self.fallbacks = fallbacks
        self.report_served = report_served
        self.expect_responses = expect_responses
        """False when Envoy does not send responses (response modes SKIP/NONE): the stream's end is then
        the request's end, not an early disconnect."""
        self.active_streams = 0
        self._answers: dict[str, pb.ProcessingResponse] = {}
        self._served: dict[str, pb.ProcessingResponse] = {}
        self._too_large = GatewayError(
            413, f"request body exceeds the limit of {max_body_bytes} bytes", "too_large"
        )

    # --- request side -------------------------------------------------------------------------

    def _headers_only(self) -> pb.ProcessingResponse:
        dest = self.any_endpoint() if self.any_endpoint is not None else None
        if not dest:
            return _EMPTY_REQ_HEADERS
        return pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(
                response=pb.CommonResponse(
                    header_mutation=pb.HeaderMutation(set_headers=[_set_header(HDR_DESTINATION, dest)]),
                    clear_route_cache=True,
                )
            ),
            dynamic_metadata=_lb_metadata(dest),
        )

    async def _decide(
        self, path: str, headers: Mapping[str, str], chunks: list[bytes]
    ) -> tuple[Any, list[pb.ProcessingResponse]]:
        """Hand the complete body to the director (clearing `chunks`); the decision and the answers to
        send, or (None, [error]) when the director refuses the request."""
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        try:
            decision = await self.director.handle(path, headers, raw)
        except GatewayError as e:
            return None, [_gateway_error_response(e)]
        return decision, self._decided(decision, len(raw))

    def _headers_answer(self, dest: str, new_length: int | None) -> pb.ProcessingResponse:
        """The request-headers answer routing to `dest`; constant per destination when the body is
        unchanged, so those are built once (bounded cache) and reused."""
        if new_length is None:
            hit = self._answers.get(dest)
            if hit is not None:
                return hit
        sets = [_set_header(HDR_DESTINATION, dest)]
        if new_length is not None:
            sets.append(_set_header("content-length", str(new_length)))
        answer = pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(
                response=pb.CommonResponse(
                    header_mutation=pb.HeaderMutation(set_headers=sets),
                    clear_route_cache=True,
                )
            ),
            dynamic_metadata=_lb_metadata(dest),
        )
        if new_length is None:
            if len(self._answers) >= ANSWER_CACHE:
                self._answers.clear()
            self._answers[dest] = answer
        return answer

    def _served_answer(self, address: str) -> pb.ProcessingResponse:
        """The response-headers answer adding the served-endpoint header (cached per address)."""
        hit = self._served.get(address)
        if hit is None:
            hit = pb.ProcessingResponse(
                response_headers=pb.HeadersResponse(
                    response=pb.CommonResponse(
                        header_mutation=pb.HeaderMutation(
                            set_headers=[_set_header(HDR_DESTINATION_SERVED, address)]
                        )
                    )
                )
            )
            if len(self._served) >= ANSWER_CACHE:
                self._served.clear()
            self._served[address] = hit
        return hit

    def _decided(self, decision: Any, original_len: int) -> list[pb.ProcessingResponse]:
        """Headers answer + body chunks for a decision (the order Envoy requires)."""
        dest = _destination(decision, self.fallbacks)
        body: bytes = decision.upstream_body
        n = len(body)
        out = [self._headers_answer(dest, None if n == original_len else n)]
        if n == 0:
            out.append(_body_chunk(b"", True))
            return out
        view = memoryview(body)
        for off in range(0, n, MAX_CHUNK):
            end = min(off + MAX_CHUNK, n)
            out.append(_body_chunk(bytes(view[off:end]), end == n))
        return out

    # --- the stream ---------------------------------------------------------------------------

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[pb.ProcessingResponse]:
        """Serve one HTTP request's ext_proc stream (see the module docstring for the sequence)."""
        self.active_streams += 1
        director = self.director
        decision: Any = None
        outcome = ResponseOutcome()
        path = ""
        headers: dict[str, str] = {}
        chunks: list[bytes] = []
        size = 0
        tail = bytearray()
        resp_len = -1
        finished = False
        first_pending = False
        """The first token was seen and `director.on_first_token` is still to run."""
        unaccounted = False
        """The response completed and `director.finish` is still to run."""
        loop = asyncio.get_running_loop()
        try:
            async for msg in request_iterator:
                kind = msg.WhichOneof("request")
                if kind == "response_body":
                    rb = msg.response_body
                    data = rb.body
                    first = (
                        bool(data)
                        and outcome.first_token_at is None
                        and decision is not None
                        and outcome.status < 400
                    )
                    if first:
                        outcome.first_token_at = time.monotonic()
                        first_pending = True
                    if data:
                        outcome.body_bytes += len(data)
                        # Amortised: append, trim only when twice the window (no per-chunk 16 KB copy).
                        tail += data
                        if len(tail) > 2 * USAGE_TAIL:
                            del tail[:-USAGE_TAIL]
                    complete = not finished and (rb.end_of_stream or 0 <= resp_len <= outcome.body_bytes)
                    if complete:
                        # The response is complete; it is accounted as such even if Envoy closes the
                        # stream as soon as it has this chunk and the generator never resumes (finally).
                        finished = True
                        outcome.ended_at = time.monotonic()
                        unaccounted = True
                    if rb.end_of_stream:
                        yield _echo_body(data, True) if data else _EMPTY_RESP_EOS
                    else:
                        yield _echo_body(data, False)
                    # The echo is queued with the transport; the feedback work (metrics, plugins'
                    # post-response hooks) runs after it, off the token's path (FIFO callbacks).
                    if first_pending:
                        first_pending = False
                        loop.call_soon(director.on_first_token, decision)
                    if unaccounted:
                        unaccounted = False
                        loop.call_soon(self._finish, decision, outcome, tail, None)
                elif kind == "request_body":
                    rb2 = msg.request_body
                    if rb2.body:
                        size += len(rb2.body)
                        if size > self.max_body_bytes:
                            yield _gateway_error_response(self._too_large)
                            return
                        chunks.append(rb2.body)
                    if rb2.end_of_stream:
                        decision, answers = await self._decide(path, headers, chunks)
                        for r in answers:
                            yield r
                        if decision is None:
                            return
                elif kind == "request_headers":
                    rh = msg.request_headers
                    outcome.started_at = time.monotonic()
                    headers = _header_map(rh.headers)
                    path = headers.get(":path", "")
                    cl = headers.get("content-length")
                    if cl is not None and cl.isdigit() and int(cl) > self.max_body_bytes:
                        yield _gateway_error_response(self._too_large)
                        return
                    if rh.end_of_stream:
                        yield self._headers_only()
                        finished = True  # nothing to account: no decision was made
                elif kind == "response_headers":
                    rsh = msg.response_headers
                    for h in rsh.headers.headers:
                        if h.key == ":status":
                            v = h.raw_value or h.value.encode()
                            outcome.status = int(v) if v.isdigit() else 0
                        elif h.key == "content-length":
                            # A sized response is complete at its last byte: Envoy may end the HTTP
                            # stream (and reset this one) before sending an empty end-of-stream chunk.
                            v = h.raw_value or h.value.encode()
                            resp_len = int(v) if v.isdigit() else -1
                    if self.report_served and decision is not None:
                        yield self._served_answer(decision.target.address)
                    else:
                        yield _EMPTY_RESP_HEADERS
                    if rsh.end_of_stream and decision is not None:
                        self._finish(decision, outcome, tail, None)
                        finished = True
                elif kind == "response_trailers":
                    if decision is not None and not finished:
                        finished = True
                        self._finish(decision, outcome, tail, None)
                    yield _EMPTY_RESP_TRAILERS
                elif kind == "request_trailers":
                    # Trailers end the request body; decide now if the body had no end_of_stream chunk.
                    if decision is None and path:
                        decision, answers = await self._decide(path, headers, chunks)
                        for r in answers:
                            yield r
                        if decision is None:
                            return
                    yield _EMPTY_REQ_TRAILERS
        except asyncio.CancelledError:
            # Without response processing Envoy may reset the stream at the end of a normal request.
            # Envoy also resets the stream right after a completed response: not an error then.
            if self.expect_responses and not finished:
                outcome.error = "cancelled"
            raise
        except Exception as e:  # never leave a decision unreleased; Envoy applies its failure mode
            if not finished:
                outcome.error = f"processor error: {e!r}"
            log.exception("ext_proc stream failed")
            raise
        finally:
            self.active_streams -= 1
            if first_pending:
                director.on_first_token(decision)
            if unaccounted:
                self._finish(decision, outcome, tail, None)
            elif decision is not None and not finished:
                if outcome.error is None and self.expect_responses:
                    outcome.error = "stream ended before the response completed"
                self._finish(decision, outcome, tail, outcome.error)

    def _finish(self, decision: Any, outcome: ResponseOutcome, tail: bytearray, error: str | None) -> None:
        if decision is None:
            return
        if not outcome.ended_at:
            outcome.ended_at = time.monotonic()
        outcome.error = error
        if tail:
            outcome.prompt_tokens, outcome.completion_tokens, outcome.cached_tokens = parse_usage_tail(
                bytes(tail[-USAGE_TAIL:])
            )
        try:
            self.director.finish(decision, self.info_factory(decision, outcome))
        except Exception:
            log.exception("director.finish failed")


def _body_chunk(data: bytes, eos: bool) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        request_body=pb.BodyResponse(
            response=pb.CommonResponse(
                body_mutation=pb.BodyMutation(
                    streamed_response=pb.StreamedBodyResponse(body=data, end_of_stream=eos)
                )
            )
        )
    )


def _echo_body(data: bytes, eos: bool) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        response_body=pb.BodyResponse(
            response=pb.CommonResponse(
                body_mutation=pb.BodyMutation(
                    streamed_response=pb.StreamedBodyResponse(body=data, end_of_stream=eos)
                )
            )
        )
    )


PROCESS_METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
Transport = Literal["h2", "grpcio"]
TRANSPORTS: tuple[str, ...] = get_args(Transport)


class ExtProcServer:
    """Hosts `ExtProcServicer` on one address (loopback by default) over a gRPC transport.

    The servicer's `Process` is the whole protocol; the transport only carries messages:

    - ``"h2"`` (default): `ingate.dataplane.grpc_h2`, a small HTTP/2 gRPC server in the caller's event
      loop (no thread hop per message; see that module and docs/envoy.md for the measured difference);
    - ``"grpcio"``: `grpc.aio`, the reference implementation (its own poller thread).
    """

    def __init__(
        self, servicer: ExtProcServicer, host: str = "127.0.0.1", port: int = 0, transport: Transport = "h2"
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown ext_proc transport {transport!r} (known: {', '.join(TRANSPORTS)})")
        self.servicer = servicer
        self.host = host
        self.port = port
        self.transport = transport
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
                        encode=pb.ProcessingResponse.SerializeToString,
                    )
                }
            )
            try:
                self.port = await h2.start(self.host, self.port)
            except OSError as e:
                raise OSError(f"ext_proc server could not bind {self.host}:{self.port}: {e}") from e
            self._h2 = h2
            return self.port
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
                ("grpc.max_concurrent_streams", 10_000),
            ]
        )
        pb_grpc.add_ExternalProcessorServicer_to_server(self.servicer, server)
        bound = server.add_insecure_port(f"{self.host}:{self.port}")
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
