"""Envoy ext_proc server: Envoy proxies the bytes, the director decides where they go.

One gRPC bidirectional stream (`envoy.service.ext_proc.v3.ExternalProcessor/Process`) carries one HTTP
request. The request filter runs with request headers `SEND`, body `FULL_DUPLEX_STREAMED` and trailers
`SEND` (see `ingate.dataplane.envoy`), so on each stream:

1. `request_headers` arrives. If it ends the stream (no body) the request goes to any endpoint: the
   headers are answered at once, with a destination when a pool lister was given, else none (Envoy's
   route then falls back to round robin over the pool).
2. `request_body` chunks arrive (Envoy sends them without waiting for the headers answer); they are
   buffered, and the headers answer is *held* until the chunk with `end_of_stream`, so the request costs
   one round trip. Then the director decides, and the processor answers, in this order: the headers
   (destination header + new content-length + `clear_route_cache`) with the `envoy.lb` dynamic metadata
   carrying the same destination, then the body as streamed body mutations of at most 62,000 bytes
   each, `end_of_stream` on the last.
3. The response, in one of three `responses` modes:
   - ``"observe"`` (opt-in for `ingate serve --proxy envoy`): a second ext_proc filter in Envoy's observability
     mode streams the response headers, body chunks and trailers on a stream of their own and never
     waits for an answer (none is sent), so the picker is off the token's path. The request's answer
     also sets the `ingate` metadata namespace to a request key, which Envoy forwards on every observer
     message (`metadata_context`): that ties the two streams together. The request filter keeps its
     stream open to the end of the HTTP stream (response trailers `SEND`), so its end says the exchange
     is over;
   - ``"full"`` (the default, and what a Gateway API implementation's Envoy sends): the same stream carries the response
     and every message is answered (each streamed chunk echoed as a streamed mutation);
   - ``"none"``: responses bypass the picker; the request is released when Envoy closes its stream.

   The first body chunk marks the first token; usage is read from the tail of the body;
   `director.finish` runs exactly once: at the response's end, or when the streams end early (client
   disconnect, Envoy reset, processor error, a response that never came) with an error.

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
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from ingate.dataplane.extproc_messages import (
    ANSWER_CACHE,
    DEFAULT_MAX_BODY,
    EMPTY_REQ_HEADERS,
    EMPTY_REQ_TRAILERS,
    EMPTY_RESP_EOS,
    EMPTY_RESP_HEADERS,
    EMPTY_RESP_TRAILERS,
    INGATE_NAMESPACE,
    KEY_FIELD,
    LB_NAMESPACE,
    MAX_CHUNK,
    body_chunk,
    echo_body,
    gateway_error_response,
    header_map,
    immediate_error,
    lb_metadata,
    set_header,
)
from ingate.dataplane.extproc_outcome import InfoFactory, ResponseOutcome, to_response_info
from ingate.dataplane.extproc_timing import ExtProcTimings
from ingate.datastore import StepTiming
from ingate.errors import GatewayError
from ingate.lifecycle import Decision, DirectorLike
from ingate.request import HDR_DESTINATION, HDR_DESTINATION_SERVED
from ingate.usage import USAGE_TAIL, parse_usage_tail

__all__ = [
    "DEFAULT_MAX_BODY",
    "INGATE_NAMESPACE",
    "LB_NAMESPACE",
    "MAX_CHUNK",
    "RESPONSE_MODES",
    "ExtProcServicer",
    "InfoFactory",
    "ResponseMode",
    "ResponseOutcome",
    "immediate_error",
    "to_response_info",
]

log = logging.getLogger(__name__)


def _destination(decision: Decision, fallbacks: int) -> str:
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


ResponseMode = Literal["observe", "full", "none"]
"""How Envoy shows the picker the response (see the module docstring and `ingate.dataplane.envoy`)."""
RESPONSE_MODES: tuple[str, ...] = get_args(ResponseMode)
LINGER_S = 0.5
"""observe: how long a request outlives its request-side stream for the observer stream to finish it
(the observer's last messages may still be queued); after that it is released as cut off."""


@dataclass(slots=True)
class _Exchange:
    """One routed request: the decision and what was seen of its response, until `finish` ran once."""

    decision: Decision
    outcome: ResponseOutcome
    key: str = ""
    tail: bytearray = field(default_factory=bytearray)
    """The response body's last bytes (at most 2 x USAGE_TAIL), for `usage`."""
    resp_len: int = -1
    """The response's content-length, -1 when not sized."""
    done: bool = False
    """`director.finish` ran or is scheduled: nothing may report this request again."""
    steps: StepTiming | None = None
    """The target's step timing when the request streams (each chunk is timed there), else None."""

    def on_headers(self, rsh: pb.HttpHeaders) -> bool:
        """Note status and content-length; True when the response has no body (it ends here)."""
        o = self.outcome
        for h in rsh.headers.headers:
            if h.key == ":status":
                v = h.raw_value or h.value.encode()
                o.status = int(v) if v.isdigit() else 0
            elif h.key == "content-length":
                # A sized response is complete at its last byte: Envoy may end the HTTP stream (and
                # reset the gRPC stream) before sending an empty end-of-stream chunk.
                v = h.raw_value or h.value.encode()
                self.resp_len = int(v) if v.isdigit() else -1
        return rsh.end_of_stream

    def on_body(self, data: bytes) -> bool:
        """Account one body chunk; True when it is the first token of a successful response."""
        if not data:
            return False
        o = self.outcome
        now = time.monotonic()
        if self.steps is not None:  # the engine's step timing, for the latency model
            self.steps.chunk(now)
        first = o.first_token_at is None and o.status < 400
        if first:
            o.first_token_at = now
        elif o.last_chunk_at:
            o.chunk_gaps.append(now - o.last_chunk_at)
        o.last_chunk_at = now
        o.body_bytes += len(data)
        tail = self.tail
        # Amortised: append, trim only when twice the window (no per-chunk 16 KB copy).
        tail += data
        if len(tail) > 2 * USAGE_TAIL:
            del tail[:-USAGE_TAIL]
        return first

    def complete(self, eos: bool) -> bool:
        return eos or 0 <= self.resp_len <= self.outcome.body_bytes


@dataclass(slots=True)
class _Stream:
    """One ext_proc stream's state, shared by its request- and response-phase handlers."""

    ex: _Exchange | None = None
    started: float = 0.0
    path: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    closed: bool = False
    """The answers just produced end the stream (an error answer: nothing more will be processed)."""
    first_pending: bool = False
    """full: the first token was seen and `director.on_first_token` is still to run."""
    unaccounted: bool = False
    """full: the response completed and `director.finish` is still to run."""


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):
    """The `ExternalProcessor` service over a director. One instance serves every stream.

    `responses` says how the Envoy in front shows the responses (see the module docstring):
    ``"full"`` (the request's own stream carries the response, the picker answers every message; what
    a Gateway API implementation's Envoy does), ``"observe"`` (a second, observability-mode filter
    streams the response on its own stream; opt-in with `ingate serve --proxy envoy`) or ``"none"``
    (responses bypass the picker: released when Envoy closes the request's stream).
    """

    def __init__(
        self,
        director: DirectorLike,
        *,
        info_factory: InfoFactory = to_response_info,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        any_endpoint: Callable[[], str | None] | None = None,
        fallbacks: int = 0,
        report_served: bool = True,
        responses: ResponseMode = "full",
        timings: ExtProcTimings | None = None,
    ) -> None:
        if responses not in RESPONSE_MODES:
            raise ValueError(f"unknown response mode {responses!r} (known: {', '.join(RESPONSE_MODES)})")
        self.director = director
        self.info_factory = info_factory
        self.max_body_bytes = max_body_bytes
        self.any_endpoint = any_endpoint
        self.fallbacks = fallbacks
        self.report_served = report_served
        """full mode: add the served-endpoint header to the response (an Envoy that adds it itself,
        like ours, does not need it)."""
        self.responses = responses
        self.timings = timings
        """What the picker costs per request and per response message (Prometheus histograms)."""
        self.active_streams = 0
        self._answers: dict[str, pb.ProcessingResponse] = {}
        self._served: dict[str, pb.ProcessingResponse] = {}
        self._exchanges: dict[str, _Exchange] = {}
        """observe: requests whose response an observer stream may still report, by key."""
        self._keys = itertools.count(1)
        self._too_large = GatewayError(
            413, f"request body exceeds the limit of {max_body_bytes} bytes", "too_large"
        )

    @property
    def pending(self) -> int:
        """observe: routed requests not yet reported (for tests and diagnostics)."""
        return len(self._exchanges)

    # --- request side -------------------------------------------------------------------------

    def _headers_only(self) -> pb.ProcessingResponse:
        dest = self.any_endpoint() if self.any_endpoint is not None else None
        if not dest:
            return EMPTY_REQ_HEADERS
        return pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(
                response=pb.CommonResponse(
                    header_mutation=pb.HeaderMutation(set_headers=[set_header(HDR_DESTINATION, dest)]),
                    clear_route_cache=True,
                )
            ),
            dynamic_metadata=lb_metadata(dest),
        )

    async def _decide(self, st: _Stream) -> list[pb.ProcessingResponse]:
        """Hand the complete body to the director (clearing the buffered chunks); the answers to send.
        A refused request (`GatewayError`) gets its error answer and closes the stream."""
        chunks = st.chunks
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        t0 = time.perf_counter()
        try:
            decision = await self.director.handle(st.path, st.headers, raw)
        except GatewayError as e:
            st.closed = True
            return [gateway_error_response(e)]
        # A streamed answer's chunks are the engine's steps; a whole answer's body tells none.
        steps = decision.target.steps if decision.request.stream else None
        ex = st.ex = _Exchange(decision, ResponseOutcome(started_at=st.started), steps=steps)
        if self.responses == "observe":
            ex.key = str(next(self._keys))
            self._exchanges[ex.key] = ex
        answers = self._decided(ex, len(raw))
        if self.timings is not None:
            self.timings.request.observe(time.perf_counter() - t0)
        return answers

    def _headers_answer(self, dest: str, new_length: int | None, key: str) -> pb.ProcessingResponse:
        """The request-headers answer routing to `dest`. Constant per destination when the body is
        unchanged, so those are built once (bounded cache) and reused; a request key (observe mode)
        goes into a copy of the cached answer (a copy costs a third of building one)."""
        if new_length is None:
            hit = self._answers.get(dest)
            if hit is None:
                hit = self._build_headers_answer(dest, None)
                if len(self._answers) >= ANSWER_CACHE:
                    self._answers.clear()
                self._answers[dest] = hit
            if not key:
                return hit
            answer = pb.ProcessingResponse()
            answer.CopyFrom(hit)
        else:
            answer = self._build_headers_answer(dest, new_length)
        if key:
            answer.dynamic_metadata.fields[INGATE_NAMESPACE].struct_value.fields[KEY_FIELD].string_value = key
        return answer

    @staticmethod
    def _build_headers_answer(dest: str, new_length: int | None) -> pb.ProcessingResponse:
        sets = [set_header(HDR_DESTINATION, dest)]
        if new_length is not None:
            sets.append(set_header("content-length", str(new_length)))
        return pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(
                response=pb.CommonResponse(
                    header_mutation=pb.HeaderMutation(set_headers=sets),
                    clear_route_cache=True,
                )
            ),
            dynamic_metadata=lb_metadata(dest),
        )

    def _served_answer(self, address: str) -> pb.ProcessingResponse:
        """The response-headers answer adding the served-endpoint header (cached per address)."""
        hit = self._served.get(address)
        if hit is None:
            hit = pb.ProcessingResponse(
                response_headers=pb.HeadersResponse(
                    response=pb.CommonResponse(
                        header_mutation=pb.HeaderMutation(
                            set_headers=[set_header(HDR_DESTINATION_SERVED, address)]
                        )
                    )
                )
            )
            if len(self._served) >= ANSWER_CACHE:
                self._served.clear()
            self._served[address] = hit
        return hit

    def _decided(self, ex: _Exchange, original_len: int) -> list[pb.ProcessingResponse]:
        """Headers answer + body chunks for a decision (the order Envoy requires)."""
        decision = ex.decision
        dest = _destination(decision, self.fallbacks)
        body: bytes = decision.upstream_body
        n = len(body)
        out = [self._headers_answer(dest, None if n == original_len else n, ex.key)]
        if n == 0:
            out.append(body_chunk(b"", True))
            return out
        view = memoryview(body)
        for off in range(0, n, MAX_CHUNK):
            end = min(off + MAX_CHUNK, n)
            out.append(body_chunk(bytes(view[off:end]), end == n))
        return out

    # --- the streams --------------------------------------------------------------------------

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[pb.ProcessingResponse]:
        """Serve one ext_proc stream: a request's (see the module docstring for the sequence) or, when
        it starts with an observability-mode response, an observer's (`_observe`). Request-phase
        messages go to `_request_message`, response-phase ones to the `_response_*` handlers."""
        self.active_streams += 1
        director = self.director
        st = _Stream()
        loop = asyncio.get_running_loop()
        try:
            async for msg in request_iterator:
                kind = msg.WhichOneof("request")
                if kind == "response_body":
                    if self.timings is None:
                        yield self._response_body(st, msg.response_body)
                    else:
                        t0 = time.perf_counter()
                        answer = self._response_body(st, msg.response_body)
                        self.timings.response.observe(time.perf_counter() - t0)
                        yield answer
                    # The echo is queued with the transport; the feedback work (metrics, plugins'
                    # post-response hooks) runs after it, off the token's path (FIFO callbacks).
                    if st.first_pending:
                        st.first_pending = False
                        loop.call_soon(director.on_first_token, st.ex.decision)  # type: ignore[union-attr]
                    if st.unaccounted:
                        st.unaccounted = False
                        loop.call_soon(self._report, st.ex, None)  # type: ignore[arg-type]
                elif kind == "response_headers":
                    if msg.observability_mode and not st.path:
                        await self._observe(msg, request_iterator)
                        return
                    answer, end = self._response_headers(st, msg.response_headers)
                    yield answer
                    if end:
                        self._finish(st.ex, None)  # type: ignore[arg-type]
                elif kind == "response_trailers":
                    yield self._response_trailers(st)
                else:
                    for r in await self._request_message(st, kind, msg):
                        yield r
                    if st.closed:
                        return
        except asyncio.CancelledError:
            # Envoy resets the stream at the end of the HTTP stream (observe, none) and right after a
            # completed response (full): an error only when a full-mode response is cut off.
            ex = st.ex
            if ex is not None and not ex.done and self.responses == "full":
                ex.outcome.error = "cancelled"
            raise
        except Exception as e:  # never leave a decision unreleased; Envoy applies its failure mode
            ex = st.ex
            if ex is not None and not ex.done:
                ex.outcome.error = f"processor error: {e!r}"
            log.exception("ext_proc stream failed")
            raise
        finally:
            self.active_streams -= 1
            ex = st.ex
            if ex is not None:
                if st.first_pending:
                    director.on_first_token(ex.decision)
                if st.unaccounted:
                    self._report(ex, None)
                elif not ex.done:
                    self._request_ended(ex, loop)

    # --- request phase ------------------------------------------------------------------------

    async def _request_message(
        self, st: _Stream, kind: str | None, msg: pb.ProcessingRequest
    ) -> list[pb.ProcessingResponse]:
        """Answers to one request-phase message; sets `st.closed` when the stream ends with them."""
        if kind == "request_body":
            rb = msg.request_body
            if rb.body:
                st.size += len(rb.body)
                if st.size > self.max_body_bytes:
                    st.closed = True
                    return [gateway_error_response(self._too_large)]
                st.chunks.append(rb.body)
            if rb.end_of_stream:
                return await self._decide(st)
            return []
        if kind == "request_headers":
            rh = msg.request_headers
            st.started = time.monotonic()
            st.headers = headers = header_map(rh.headers)
            st.path = headers.get(":path", "")
            cl = headers.get("content-length")
            if cl is not None and cl.isdigit() and int(cl) > self.max_body_bytes:
                st.closed = True
                return [gateway_error_response(self._too_large)]
            if rh.end_of_stream:
                return [self._headers_only()]  # nothing to account: no decision is made
            return []
        if kind == "request_trailers":
            # Trailers end the request body; decide now if the body had no end_of_stream chunk.
            out: list[pb.ProcessingResponse] = []
            if st.ex is None and st.path:
                out = await self._decide(st)
                if st.closed:
                    return out
            out.append(EMPTY_REQ_TRAILERS)
            return out
        return []

    # --- response phase -----------------------------------------------------------------------

    def _response_headers(self, st: _Stream, rsh: pb.HttpHeaders) -> tuple[pb.ProcessingResponse, bool]:
        """The answer, and whether the response ended with its headers (no body)."""
        ex = st.ex
        end = ex is not None and not ex.done and ex.on_headers(rsh)
        if self.report_served and ex is not None:
            return self._served_answer(ex.decision.target.address), end
        return EMPTY_RESP_HEADERS, end

    def _response_body(self, st: _Stream, rb: pb.HttpBody) -> pb.ProcessingResponse:
        """Account one response chunk (first token, completion) and echo it."""
        data = rb.body
        ex = st.ex
        if ex is not None and not ex.done:
            st.first_pending = ex.on_body(data)
            if ex.complete(rb.end_of_stream):
                # Accounted as complete even if Envoy closes the stream as soon as it has this chunk
                # and the generator never resumes (see Process's finally).
                ex.done = st.unaccounted = True
                ex.outcome.ended_at = time.monotonic()
        if rb.end_of_stream:
            return echo_body(data, True) if data else EMPTY_RESP_EOS
        return echo_body(data, False)

    def _response_trailers(self, st: _Stream) -> pb.ProcessingResponse:
        if st.ex is not None and self.responses == "full":
            self._finish(st.ex, None)
        return EMPTY_RESP_TRAILERS

    def _request_ended(self, ex: _Exchange, loop: asyncio.AbstractEventLoop) -> None:
        """The request's own stream ended before its response was reported."""
        if self.responses == "none":
            self._finish(ex, ex.outcome.error)  # the stream's end is the request's end
        elif self.responses == "full":
            self._finish(ex, ex.outcome.error or "stream ended before the response completed")
        else:
            # observe: Envoy closes this stream when the HTTP stream is over, so the response has no
            # more bytes to come. The observer may still have its last messages queued (they were sent
            # first): give it a moment, then release the request as cut off (when there was no
            # response at all too: a client gone before the upstream answered).
            loop.call_later(LINGER_S, self._expire, ex)

    def _expire(self, ex: _Exchange) -> None:
        self._finish(ex, ex.outcome.error or "stream ended before the response completed")

    async def _observe(
        self, first: pb.ProcessingRequest, requests: AsyncIterator[pb.ProcessingRequest]
    ) -> None:
        """An observability-mode stream: the response of the request whose key is in the metadata.

        Envoy does not wait for answers (none are sent). The stream is closed as soon as the response
        is complete, or at once when no routed request matches (no decision, already released).
        """
        fm = first.metadata_context.filter_metadata
        if INGATE_NAMESPACE not in fm:
            return
        ex = self._exchanges.get(fm[INGATE_NAMESPACE].fields[KEY_FIELD].string_value)
        if ex is None or ex.done:
            return
        if ex.on_headers(first.response_headers):
            self._finish(ex, None)
            return
        director = self.director
        async for msg in requests:
            if ex.done:  # released meanwhile (the request's stream ended long ago)
                return
            kind = msg.WhichOneof("request")
            if kind == "response_body":
                rb = msg.response_body
                if ex.on_body(rb.body):
                    director.on_first_token(ex.decision)
                if ex.complete(rb.end_of_stream):
                    self._finish(ex, None)
                    return
            elif kind == "response_trailers":
                self._finish(ex, None)
                return
        # Envoy half-closed without the response's end; the request's stream decides (`_expire`).

    def _finish(self, ex: _Exchange, error: str | None) -> None:
        """Report the request once: the first caller wins, later ones do nothing."""
        if ex.done:
            return
        ex.done = True
        self._report(ex, error)

    def _report(self, ex: _Exchange, error: str | None) -> None:
        if ex.key:
            self._exchanges.pop(ex.key, None)
        outcome = ex.outcome
        if not outcome.ended_at:
            outcome.ended_at = time.monotonic()
        outcome.error = error
        tail = ex.tail
        if tail:
            outcome.prompt_tokens, outcome.completion_tokens, outcome.cached_tokens = parse_usage_tail(
                bytes(tail[-USAGE_TAIL:])
            )
        try:
            self.director.finish(ex.decision, self.info_factory(ex.decision, outcome))
        except Exception:
            log.exception("director.finish failed")
