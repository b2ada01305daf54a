"""ext_proc protocol: message order, destination, body chunking, errors and exactly-once finish.

The servicer is driven directly with real Envoy protobuf messages; the director here is a small in-test
double (protocol unit tests only; the e2e tests use the real director behind real Envoy).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from ingate.dataplane import extproc
from ingate.dataplane.extproc import MAX_CHUNK, ExtProcServicer, ResponseOutcome
from ingate.datastore import StepTiming
from ingate.errors import GatewayError


@dataclass
class _Ep:
    address: str
    steps: StepTiming = field(default_factory=StepTiming)


@dataclass
class _Request:
    stream: bool = True


@dataclass
class _Decision:
    target: _Ep
    upstream_body: bytes
    request: _Request = field(default_factory=_Request)


@dataclass
class _Director:
    rewrite: bytes | None = None
    error: GatewayError | None = None
    seen: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    first_tokens: int = 0
    finished: list[ResponseOutcome] = field(default_factory=list)
    last_target: _Ep | None = None

    async def handle(self, path: str, headers: Mapping[str, str], raw_body: bytes) -> _Decision:
        self.seen.append((path, dict(headers), raw_body))
        if self.error is not None:
            raise self.error
        self.last_target = _Ep("10.0.0.7:8000")
        return _Decision(self.last_target, self.rewrite if self.rewrite is not None else raw_body)

    def on_first_token(self, decision: Any) -> None:
        self.first_tokens += 1

    def finish(self, decision: Any, info: Any) -> None:
        self.finished.append(info)


def _hdrs(pairs: dict[str, str], eos: bool = False) -> pb.HttpHeaders:
    return pb.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
        ),
        end_of_stream=eos,
    )


def req_headers(body_len: int | None = None, eos: bool = False) -> pb.ProcessingRequest:
    h = {":method": "POST", ":path": "/v1/completions", "x-request-id": "r1"}
    if body_len is not None:
        h["content-length"] = str(body_len)
    return pb.ProcessingRequest(request_headers=_hdrs(h, eos))


def req_body(data: bytes, eos: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=eos))


def resp_headers(status: int = 200) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_headers=_hdrs({":status": str(status)}))


def resp_body(data: bytes, eos: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=eos))


class _Stream:
    """Feeds messages one at a time, like Envoy: the next one only after the test releases it."""

    def __init__(self) -> None:
        self.q: asyncio.Queue[pb.ProcessingRequest | None] = asyncio.Queue()

    def send(self, *msgs: pb.ProcessingRequest) -> None:
        for m in msgs:
            self.q.put_nowait(m)

    def close(self) -> None:
        self.q.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[pb.ProcessingRequest]:
        while True:
            m = await self.q.get()
            if m is None:
                return
            yield m


def _servicer(d: _Director, **kw: Any) -> ExtProcServicer:
    return ExtProcServicer(d, info_factory=lambda dec, o: o, **kw)


async def _collect(gen: AsyncIterator[pb.ProcessingResponse], n: int) -> list[pb.ProcessingResponse]:
    out = []
    for _ in range(n):
        out.append(await asyncio.wait_for(gen.__anext__(), 2.0))
    return out


def _set_headers(r: pb.ProcessingResponse) -> dict[str, str]:
    hm = r.request_headers.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in hm.set_headers}


BODY = b'{"model": "m", "prompt": "hello world"}'


async def test_headers_answer_is_held_until_the_whole_body_arrived() -> None:
    d = _Director()
    s = _Stream()
    gen = _servicer(d).Process(s, None)
    s.send(req_headers(len(BODY)), req_body(BODY[:10], False))
    nxt = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(0.05)
    assert not nxt.done(), "no answer may be sent before the body is complete"
    assert d.seen == []
    s.send(req_body(BODY[10:], True))
    first = await asyncio.wait_for(nxt, 2.0)
    assert first.WhichOneof("response") == "request_headers"
    assert d.seen[0][0] == "/v1/completions" and d.seen[0][2] == BODY
    assert d.seen[0][1]["x-request-id"] == "r1"
    # Header and dynamic metadata carry the same destination; the route cache is cleared.
    assert _set_headers(first) == {"x-gateway-destination-endpoint": "10.0.0.7:8000"}
    md = first.dynamic_metadata.fields["envoy.lb"].struct_value.fields["x-gateway-destination-endpoint"]
    assert md.string_value == "10.0.0.7:8000"
    assert first.request_headers.response.clear_route_cache
    (body,) = await _collect(gen, 1)
    sr = body.request_body.response.body_mutation.streamed_response
    assert sr.body == BODY and sr.end_of_stream
    s.close()
    await gen.aclose()


async def test_rewritten_body_gets_new_content_length_and_is_chunked() -> None:
    big = b'{"model": "m2", "prompt": "' + b"x" * (2 * MAX_CHUNK + 5) + b'"}'
    d = _Director(rewrite=big)
    s = _Stream()
    gen = _servicer(d).Process(s, None)
    s.send(req_headers(len(BODY)), req_body(BODY, True))
    out = await _collect(gen, 4)
    assert _set_headers(out[0])["content-length"] == str(len(big))
    parts = [r.request_body.response.body_mutation.streamed_response for r in out[1:]]
    assert all(len(p.body) <= MAX_CHUNK for p in parts)
    assert [p.end_of_stream for p in parts] == [False, False, True]
    assert b"".join(p.body for p in parts) == big
    s.close()
    await gen.aclose()


async def test_gateway_error_becomes_immediate_response_with_openai_body() -> None:
    d = _Director(error=GatewayError(429, "queue full", "queue_full", retry_after=3))
    s = _Stream()
    gen = _servicer(d).Process(s, None)
    s.send(req_headers(len(BODY)), req_body(BODY, True))
    (r,) = await _collect(gen, 1)
    ir = r.immediate_response
    assert ir.status.code == 429
    assert b'"type":"rate_limit_error"' in ir.body and b"queue full" in ir.body
    hdrs = {h.header.key: h.header.raw_value.decode() for h in ir.headers.set_headers}
    assert hdrs["retry-after"] == "3" and hdrs["content-type"] == "application/json"
    with pytest.raises(StopAsyncIteration):
        await gen.__anext__()
    assert d.finished == []  # no decision was made, nothing to release


async def test_body_over_limit_is_413_by_content_length_and_by_bytes_seen() -> None:
    d = _Director()
    for msgs in (
        [req_headers(1000)],
        [req_headers(None), req_body(b"x" * 60, False), req_body(b"y" * 60, False)],
    ):
        s = _Stream()
        gen = _servicer(d, max_body_bytes=100).Process(s, None)
        s.send(*msgs)
        (r,) = await _collect(gen, 1)
        assert r.immediate_response.status.code == 413
        assert b"exceeds the limit of 100 bytes" in r.immediate_response.body
    assert d.seen == []


async def test_headers_only_request_goes_to_any_endpoint() -> None:
    d = _Director()
    s = _Stream()
    gen = _servicer(d, any_endpoint=lambda: "10.0.0.9:8000").Process(s, None)
    s.send(req_headers(None, eos=True))
    (r,) = await _collect(gen, 1)
    assert _set_headers(r) == {"x-gateway-destination-endpoint": "10.0.0.9:8000"}
    assert d.seen == []


async def test_response_passes_through_first_token_usage_and_single_finish() -> None:
    d = _Director()
    s = _Stream()
    gen = _servicer(d).Process(s, None)
    s.send(req_headers(len(BODY)), req_body(BODY, True))
    await _collect(gen, 2)
    sse = [
        b'data: {"choices":[{"text":"a"}]}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":7,'
        b'"completion_tokens":2,"total_tokens":9}}\n\ndata: [DONE]\n\n',
    ]
    s.send(resp_headers(200), resp_body(sse[0], False), resp_body(sse[1], True))
    h, b1, b2 = await _collect(gen, 3)
    served = {
        x.header.key: x.header.raw_value for x in h.response_headers.response.header_mutation.set_headers
    }
    assert served["x-gateway-destination-endpoint-served"] == b"10.0.0.7:8000"
    assert b1.response_body.response.body_mutation.streamed_response.body == sse[0]
    last = b2.response_body.response.body_mutation.streamed_response
    assert last.body == sse[1] and last.end_of_stream
    assert d.first_tokens == 1
    s.close()
    with pytest.raises(StopAsyncIteration):
        await gen.__anext__()
    await asyncio.sleep(0)  # feedback runs right after the last answer was handed to the transport
    assert len(d.finished) == 1
    o = d.finished[0]
    assert (o.status, o.prompt_tokens, o.completion_tokens, o.error) == (200, 7, 2, None)
    # response size and the gap between the two chunks (inter-token latency for a streamed answer)
    assert o.body_bytes == len(sse[0]) + len(sse[1])
    assert len(o.chunk_gaps) == 1 and 0 <= o.chunk_gaps[0] < 1.0
    # every streamed chunk is timed on the endpoint (the latency model's step-phase feature)
    assert d.last_target is not None and d.last_target.steps.last_chunk_at > 0


async def test_stream_closed_right_after_the_last_chunk_counts_as_complete() -> None:
    """Envoy may reset the gRPC stream as soon as it has the final echo: the generator is closed at
    that yield and never resumes, and the response must still be accounted once, as a success."""
    d = _Director()
    s = _Stream()
    gen = _servicer(d).Process(s, None)
    s.send(req_headers(len(BODY)), req_body(BODY, True))
    await _collect(gen, 2)
    s.send(resp_headers(200), resp_body(b'{"usage":{"prompt_tokens":4,"completion_tokens":1}}', True))
    await _collect(gen, 2)
    await gen.aclose()
    await asyncio.sleep(0)
    assert [(o.status, o.prompt_tokens, o.error) for o in d.finished] == [(200, 4, None)]
    assert d.first_tokens == 1


async def test_client_disconnect_mid_stream_finishes_once_with_error() -> None:
    d = _Director()
    s = _Stream()
    gen = _servicer(d).Process(s, None)
    s.send(req_headers(len(BODY)), req_body(BODY, True))
    await _collect(gen, 2)
    s.send(resp_headers(200), resp_body(b"data: {}\n\n", False))
    await _collect(gen, 2)
    s.close()  # Envoy ends the gRPC stream: the client went away
    with pytest.raises(StopAsyncIteration):
        await gen.__anext__()
    assert len(d.finished) == 1 and d.finished[0].error is not None


async def test_cancelled_stream_finishes_once() -> None:
    d = _Director()
    s = _Stream()
    svc = _servicer(d)

    async def run() -> None:
        async for _ in svc.Process(s, None):
            pass

    t = asyncio.ensure_future(run())
    s.send(req_headers(len(BODY)), req_body(BODY, True))
    for _ in range(100):
        if d.seen:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.01)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert len(d.finished) == 1 and d.finished[0].error == "cancelled"
    assert svc.active_streams == 0


def test_default_response_info_carries_times_tokens_and_cut_off_status() -> None:
    from ingate.dataplane.extproc import to_response_info
    from ingate.usage import parse_usage_tail

    tail = b'data: {"usage":{"prompt_tokens":8,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":5}}}'
    assert parse_usage_tail(tail) == (8, 3, 5)
    done = ResponseOutcome(status=200, started_at=10.0, first_token_at=10.25, ended_at=11.0, prompt_tokens=8)
    info = to_response_info(None, done)
    assert (info.status, info.ttft_s, info.e2e_s, info.prompt_tokens) == (200, 0.25, 1.0, 8)
    done.body_bytes, done.chunk_gaps = 120, [0.01, 0.02]
    info = to_response_info(None, done)
    assert (info.response_bytes, info.chunk_gaps) == (120, [0.01, 0.02])
    cut = ResponseOutcome(status=200, started_at=10.0, ended_at=10.5, error="cancelled")
    assert to_response_info(None, cut).status == 499 and to_response_info(None, cut).ttft_s is None


@pytest.mark.parametrize("transport", ["h2", "grpcio"])
async def test_both_transports_carry_the_same_exchange(transport: str) -> None:
    """Through a real gRPC client (grpcio's ext_proc stub), each transport serves one request and its
    response, and a client that cancels mid-response releases the decision exactly once."""
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    from ingate.dataplane.extproc_server import ExtProcServer

    d = _Director()
    server = ExtProcServer(_servicer(d), port=0, transport=transport)  # type: ignore[arg-type]
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            call = stub.Process()
            await call.write(req_headers(len(BODY)))
            await call.write(req_body(BODY, True))
            first = await call.read()
            assert _set_headers(first) == {"x-gateway-destination-endpoint": "10.0.0.7:8000"}
            body = await call.read()
            assert body.request_body.response.body_mutation.streamed_response.body == BODY
            await call.write(resp_headers(200))
            assert (await call.read()).WhichOneof("response") == "response_headers"
            await call.write(resp_body(b'{"usage":{"prompt_tokens":3,"completion_tokens":1}}', True))
            last = await call.read()
            assert last.response_body.response.body_mutation.streamed_response.end_of_stream
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            assert [(o.status, o.prompt_tokens, o.error) for o in d.finished] == [(200, 3, None)]

            cut = stub.Process()
            await cut.write(req_headers(len(BODY)))
            await cut.write(req_body(BODY, True))
            await cut.read()
            await cut.read()
            await cut.write(resp_headers(200))
            await cut.read()
            cut.cancel()  # Envoy resets the stream: the client went away mid-response
            for _ in range(200):
                if len(d.finished) == 2:
                    break
                await asyncio.sleep(0.01)
            assert len(d.finished) == 2 and d.finished[1].error is not None
    finally:
        await server.stop(0)
    assert len(d.finished) == 2


def test_unknown_transport_is_refused() -> None:
    from ingate.dataplane.extproc_server import ExtProcServer

    with pytest.raises(ValueError, match="unknown ext_proc transport"):
        ExtProcServer(_servicer(_Director()), transport="nope")  # type: ignore[arg-type]


# --- observe mode: the response on an observability-mode stream of its own ------------------------


def _key_of(answer: pb.ProcessingResponse) -> str:
    return answer.dynamic_metadata.fields["ingate"].struct_value.fields["key"].string_value


def _observed(msg: pb.ProcessingRequest, key: str | None) -> pb.ProcessingRequest:
    """`msg` as the observer filter sends it: observability_mode, the `ingate` namespace forwarded."""
    msg.observability_mode = True
    if key is not None:
        st = struct_pb2.Struct()
        st.fields["key"].string_value = key
        msg.metadata_context.filter_metadata["ingate"].CopyFrom(st)
    return msg


async def _routed(svc: ExtProcServicer) -> tuple[AsyncIterator[pb.ProcessingResponse], _Stream, str]:
    """A request stream that got its decision: (its generator, its input, the request key)."""
    s = _Stream()
    gen = svc.Process(s, None)
    s.send(req_headers(len(BODY)), req_body(BODY, True))
    first, _ = await _collect(gen, 2)
    return gen, s, _key_of(first)


async def _run_observer(svc: ExtProcServicer, *msgs: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
    """Feed an observer stream `msgs` (then leave it open, like Envoy); what it answered when it ended."""
    s = _Stream()
    s.send(*msgs)
    return await asyncio.wait_for(_drain(svc.Process(s, None)), 2.0)


async def _drain(gen: AsyncIterator[pb.ProcessingResponse]) -> list[pb.ProcessingResponse]:
    return [r async for r in gen]


SSE = [
    b'data: {"choices":[{"text":"a"}]}\n\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}\n\n',
    b"data: [DONE]\n\n",
]


async def test_observe_mode_reports_ttft_and_usage_once_from_the_observer_stream() -> None:
    d = _Director()
    svc = _servicer(d, responses="observe", report_served=False)
    gen, _s, key = await _routed(svc)
    assert key and svc.pending == 1
    # The observer gets no answers; it closes its stream itself once the response is complete.
    out = await _run_observer(
        svc,
        _observed(resp_headers(200), key),
        _observed(resp_body(SSE[0], False), key),
        _observed(resp_body(SSE[1], False), key),
        _observed(resp_body(SSE[2], False), key),
        _observed(resp_body(b"", True), key),
    )
    assert out == []
    assert d.first_tokens == 1
    assert [(o.status, o.prompt_tokens, o.completion_tokens, o.error) for o in d.finished] == [
        (200, 7, 2, None)
    ]
    assert d.finished[0].first_token_at is not None and svc.pending == 0
    # Envoy then resets the request's stream at the end of the HTTP stream: nothing is reported again.
    await gen.aclose()  # type: ignore[attr-defined]
    await asyncio.sleep(0.05)
    assert len(d.finished) == 1 and svc.active_streams == 0


async def test_observe_mode_request_answer_is_not_shared_between_requests() -> None:
    svc = _servicer(_Director(), responses="observe")
    g1, _s1, k1 = await _routed(svc)
    g2, _s2, k2 = await _routed(svc)
    assert k1 != k2 and svc.pending == 2
    # The per-destination answer cache stays keyless: each key went into a copy.
    assert svc._answers and all("ingate" not in a.dynamic_metadata.fields for a in svc._answers.values())
    for g in (g1, g2):
        await g.aclose()  # type: ignore[attr-defined]


async def test_observe_mode_response_that_never_came_is_released_once_after_the_linger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client gone before the upstream answered: Envoy closes the request's stream and no observer
    stream ever starts. The request is released once, as cut off; a late observer changes nothing."""
    monkeypatch.setattr(extproc, "LINGER_S", 0.05)
    d = _Director()
    svc = _servicer(d, responses="observe")
    gen, s, key = await _routed(svc)
    s.close()
    with pytest.raises(StopAsyncIteration):
        await gen.__anext__()
    assert d.finished == []  # the observer may still have queued messages: not yet
    for _ in range(100):
        if d.finished:
            break
        await asyncio.sleep(0.01)
    assert len(d.finished) == 1 and d.finished[0].error is not None and svc.pending == 0
    assert (
        await _run_observer(svc, _observed(resp_headers(200), key), _observed(resp_body(SSE[0], False), key))
        == []
    )
    await asyncio.sleep(0.1)
    assert len(d.finished) == 1 and d.first_tokens == 0


async def test_observe_mode_cut_off_response_is_released_once_with_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(extproc, "LINGER_S", 0.05)
    d = _Director()
    svc = _servicer(d, responses="observe")
    gen, _s, key = await _routed(svc)
    obs = _Stream()
    obs.send(_observed(resp_headers(200), key), _observed(resp_body(SSE[0], False), key))
    observer = asyncio.ensure_future(_drain(svc.Process(obs, None)))
    for _ in range(100):
        if d.first_tokens:
            break
        await asyncio.sleep(0.01)
    assert d.first_tokens == 1 and d.finished == []
    # The client leaves: Envoy resets the request's stream; the observer's stream stays open (Envoy's
    # deferred close) and is reset later.
    await gen.aclose()  # type: ignore[attr-defined]
    for _ in range(100):
        if d.finished:
            break
        await asyncio.sleep(0.01)
    assert len(d.finished) == 1
    o = d.finished[0]
    assert o.status == 200 and o.error is not None and o.first_token_at is not None
    assert extproc.to_response_info(None, o).status == 499  # not counted as a complete response
    obs.send(_observed(resp_body(SSE[1], False), key))  # anything still arriving is ignored
    assert await asyncio.wait_for(observer, 2.0) == []
    assert len(d.finished) == 1 and svc.pending == 0 and svc.active_streams == 0


async def test_observe_mode_response_trailers_end_the_response() -> None:
    d = _Director()
    svc = _servicer(d, responses="observe")
    gen, s, key = await _routed(svc)
    trailers = pb.ProcessingRequest(response_trailers=pb.HttpTrailers())
    assert (
        await _run_observer(
            svc,
            _observed(resp_headers(200), key),
            _observed(resp_body(SSE[0], False), key),
            _observed(trailers, key),
        )
        == []
    )
    assert [o.error for o in d.finished] == [None]
    # The request filter (response trailers SEND, to keep its stream open) gets them too: answered, no
    # second report.
    s.send(pb.ProcessingRequest(response_trailers=pb.HttpTrailers()))
    (r,) = await _collect(gen, 1)
    assert r.WhichOneof("response") == "response_trailers"
    s.close()
    with pytest.raises(StopAsyncIteration):
        await gen.__anext__()
    await asyncio.sleep(0.05)
    assert len(d.finished) == 1


async def test_observer_of_an_unrouted_request_ends_at_once() -> None:
    """No decision (a headers-only request routed to any endpoint, an error answer): the observer stream
    carries no request key, or an unknown one, and is closed right away."""
    d = _Director()
    svc = _servicer(d, responses="observe")
    assert await _run_observer(svc, _observed(resp_headers(200), None)) == []
    assert await _run_observer(svc, _observed(resp_headers(200), "no-such-key")) == []
    assert d.finished == [] and svc.active_streams == 0


async def test_request_only_mode_releases_when_the_request_stream_closes() -> None:
    d = _Director()
    svc = _servicer(d, responses="none")
    s = _Stream()
    gen = svc.Process(s, None)
    s.send(req_headers(len(BODY)), req_body(BODY, True))
    first, _ = await _collect(gen, 2)
    assert "ingate" not in first.dynamic_metadata.fields  # no observer to tie to
    s.close()
    with pytest.raises(StopAsyncIteration):
        await gen.__anext__()
    assert [o.error for o in d.finished] == [None]


def test_unknown_response_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown response mode"):
        _servicer(_Director(), responses="sometimes")  # type: ignore[arg-type]
