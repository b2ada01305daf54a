"""Async messages (llm-d-async wire format), retry delays and the AIMD window."""

from __future__ import annotations

import random
import time

import orjson
import pytest

from ingate.asyncproc.backoff import parse_retry_after, retry_delay
from ingate.asyncproc.models import (
    INVALID_REQUEST,
    AsyncRequest,
    AsyncResult,
    InvalidMessage,
    new_message,
    parse_message,
)
from ingate.asyncproc.window import AimdWindow

GOOD = {
    "id": "req-1",
    "created": 1764745200,
    "deadline": 1764748800,
    "payload": {"model": "m", "prompt": "hi", "max_tokens": 4},
    "metadata": {"userid": "alice"},
    "headers": {"authorization": "Bearer x"},
    "endpoint": "/v1/chat/completions",
}


def test_parses_an_llm_d_async_message_and_round_trips() -> None:
    m = parse_message(orjson.dumps(GOOD))
    assert isinstance(m, AsyncRequest)
    assert (m.id, m.deadline, m.metadata["userid"], m.endpoint) == (
        "req-1",
        1764748800.0,
        "alice",
        "/v1/chat/completions",
    )
    assert m.to_json() == GOOD
    # Defaults: no endpoint -> /v1/completions, no metadata/headers.
    minimal = parse_message(b'{"id": "a", "deadline": 5, "payload": {}}')
    assert isinstance(minimal, AsyncRequest) and minimal.endpoint == "/v1/completions"
    assert minimal.to_json() == {"id": "a", "created": 0, "deadline": 5, "payload": {}}


@pytest.mark.parametrize(
    ("raw", "id", "fragment"),
    [
        (b"not json", None, "not JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"deadline": 5, "payload": {}}', None, "id is required"),
        (b'{"id": 7, "deadline": 5, "payload": {}}', None, "id is required"),
        (b'{"id": "x", "payload": {}}', "x", "deadline is required"),
        (b'{"id": "x", "deadline": 0, "payload": {}}', "x", "deadline is required"),
        (b'{"id": "x", "deadline": true, "payload": {}}', "x", "deadline is required"),
        (b'{"id": "x", "deadline": 5, "payload": "hi"}', "x", "payload must be a JSON object"),
        (b'{"id": "x", "deadline": 5}', "x", "payload must be a JSON object"),
        (b'{"id": "x", "deadline": 5, "payload": {}, "endpoint": "/admin"}', "x", "unknown endpoint"),
        (b'{"id": "x", "deadline": 5, "payload": {}, "metadata": {"a": 1}}', "x", "metadata must be"),
        (b'{"id": "x", "deadline": 5, "payload": {}, "headers": []}', "x", "headers must be"),
    ],
)
def test_malformed_messages_become_invalid_not_exceptions(raw: bytes, id: str | None, fragment: str) -> None:
    m = parse_message(raw)
    assert isinstance(m, InvalidMessage)
    assert m.id == id
    assert fragment in m.reason


def test_oversized_message_is_invalid_and_keeps_its_id() -> None:
    big = orjson.dumps({"id": "big-1", "deadline": 5, "payload": {"prompt": "x" * 5000}})
    m = parse_message(big, max_bytes=1000)
    assert isinstance(m, InvalidMessage) and m.id == "big-1" and "limit of 1000" in m.reason
    assert isinstance(parse_message(big, max_bytes=10_000), AsyncRequest)


def test_result_wire_format_matches_llm_d_async() -> None:
    ok = AsyncResult.http("a", 200, b'{"choices": []}')
    assert ok.to_json() == {"id": "a", "status_code": 200, "payload": '{"choices": []}'}
    err = AsyncResult.error("b", INVALID_REQUEST, "bad")
    # Go's omitempty drops status_code 0; the payload carries the error for payload-only consumers.
    assert err.to_json() == {
        "id": "b",
        "payload": '{"error":"bad"}',
        "error_code": INVALID_REQUEST,
        "error_message": "bad",
    }
    assert AsyncResult.from_json(orjson.loads(err.encode())) == err
    assert not err.ok and ok.ok


def test_new_message_sets_created_and_deadline() -> None:
    m = new_message("x", {"prompt": "p"}, ttl_s=60, now=1000.5)
    assert (m.created, m.deadline) == (1000.0, 1060.0)


# ---- backoff ----------------------------------------------------------------------------------------


def test_backoff_grows_exponentially_with_equal_jitter_and_cap() -> None:
    rng = random.Random(1)
    for attempt, hi in [(1, 2.0), (2, 4.0), (3, 8.0), (6, 60.0), (10, 60.0)]:
        for _ in range(50):
            d = retry_delay(attempt, 1e6, rng=rng)
            assert d is not None and hi / 2 <= d < hi


def test_backoff_never_reaches_the_deadline_and_honours_retry_after() -> None:
    rng = random.Random(2)
    assert retry_delay(1, 0.0) is None and retry_delay(1, -3) is None
    for left in (0.01, 0.5, 3.0, 100.0):
        for attempt in range(1, 8):
            for ra in (None, 0.0, 1.0, 30.0, 1e6):
                d = retry_delay(attempt, left, retry_after_s=ra, rng=rng)
                assert d is not None and 0 <= d < left
    # Retry-After longer than the backoff wins (plus < 25% jitter) while it fits in half the time left.
    d = retry_delay(1, 100.0, retry_after_s=10.0, rng=rng)
    assert d is not None and 10.0 <= d < 12.5
    d = retry_delay(1, 10.0, retry_after_s=30.0, rng=rng)  # clamped to half of 10 s
    assert d is not None and 5.0 <= d < 6.25


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(1000.0 + 30))
    assert parse_retry_after(date, now=1000.0) == pytest.approx(30.0)
    assert parse_retry_after(date, now=2000.0) == 0.0


# ---- window -----------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_window_slow_start_then_additive_increase_then_halves_once_per_round_trip() -> None:
    clock = Clock()
    w = AimdWindow(initial=2, maximum=64, clock=clock)
    for _ in range(6):
        w.on_success(0.1)
    assert w.limit == 8  # slow start: +1 per success
    assert w.on_congestion() and w.limit == 4
    assert not w.on_congestion() and w.limit == 4  # same round trip (rtt ~0.1 s): one cut only
    clock.t += 0.2
    assert w.on_congestion() and w.limit == 2
    expected = w.size
    for _ in range(4):
        w.on_success(0.1)
        expected += 1 / expected  # congestion avoidance: about +1 per window of successes
    assert w.size == pytest.approx(expected) and 3.5 < expected < 3.6
    clock.t += 1
    for _ in range(20):
        clock.t += 1
        w.on_congestion()
    assert w.limit == 1  # never below the minimum


def test_window_grows_only_within_the_latency_objective_and_respects_maximum() -> None:
    w = AimdWindow(initial=4, maximum=6, objective_s=0.5)
    w.on_success(2.0)
    assert w.limit == 4
    for _ in range(10):
        w.on_success(0.1)
    assert w.limit == 6


async def test_window_gates_acquire_on_limit_and_headroom() -> None:
    w = AimdWindow(initial=2, maximum=8)
    await w.acquire()
    await w.acquire()
    assert not w.can_dispatch()
    w.release()
    assert w.can_dispatch()
    w.set_headroom(0)
    assert not w.can_dispatch()  # the pool has no room for our band, whatever the window says
    w.set_headroom(1)
    await w.acquire()
    assert w.headroom == 0 and not w.can_dispatch()
    w.set_headroom(None)
    w.release()
    assert w.can_dispatch()
