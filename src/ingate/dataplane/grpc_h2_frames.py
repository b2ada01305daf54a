"""The HTTP/2 and gRPC wire pieces of `ingate.dataplane.grpc_h2`: frame, setting and error codes,
limits, frame and HPACK encoders for our own (prebuilt) header blocks, the protocol errors, and the
per-stream state."""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
F_END_STREAM = 0x1
F_ACK = 0x1
F_END_HEADERS = 0x4
F_PADDED = 0x8
F_PRIORITY = 0x20

# Settings identifiers.
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE = (
    1,
    2,
    3,
    4,
    5,
)

# Error codes.
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR = (
    0,
    1,
    2,
    3,
    5,
    6,
)
REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 7, 8, 9, 11
S_MAX_HEADER_LIST_SIZE = 6

# gRPC status codes used here.
GRPC_OK, GRPC_INTERNAL, GRPC_UNIMPLEMENTED, GRPC_RESOURCE_EXHAUSTED = 0, 13, 12, 8

DEFAULT_WINDOW = 65_535
MAX_WINDOW = 0x7FFFFFFF
STREAM_WINDOW = 16 * 1024 * 1024
"""Least initial window we give each stream (SETTINGS_INITIAL_WINDOW_SIZE); raised to hold one
message of `max_message_bytes`, since a stream is credited only for whole messages consumed."""
CONN_WINDOW = 256 * 1024 * 1024
"""Least connection window (raised to four largest messages): the most request bytes one connection
can have buffered and not yet consumed by its handlers, since the connection is credited back only
for bytes consumed or discarded."""
MAX_FRAME = 1 << 20
"""Largest frame we accept (SETTINGS_MAX_FRAME_SIZE); fewer, larger frames from the peer."""
MAX_STREAMS = 16_384
"""Default SETTINGS_MAX_CONCURRENT_STREAMS; streams beyond it are refused (REFUSED_STREAM)."""
MAX_HEADER_BLOCK = 64 * 1024
"""Largest header block (HEADERS + CONTINUATION payloads) we buffer; also our advertised
SETTINGS_MAX_HEADER_LIST_SIZE, which `hpack` enforces on the decoded list."""
MAX_CONTINUATIONS = 64
"""CONTINUATION frames allowed in one header block (a flood of tiny ones is ENHANCE_YOUR_CALM)."""
MAX_EMPTY_FRAMES = 1024
"""Consecutive empty DATA frames (no payload, no END_STREAM) before ENHANCE_YOUR_CALM (CVE-2019-9518)."""
BLOCK_CACHE = 256
"""Decoded header blocks remembered per connection (see `_Connection._decode_block`)."""
BLOCK_CACHE_MAX_BYTES = 1024
"""Only blocks up to this size are cached (Envoy's, once indexed, are a few bytes)."""

_FRAME = struct.Struct(">HBBBI")  # 24-bit length as (high 16, low 8), type, flags, stream id
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")
_MSG_PREFIX = struct.Struct(">BI")


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame: 9-byte header + payload."""
    n = len(payload)
    return _FRAME.pack(n >> 8, n & 0xFF, ftype, flags, sid) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """HPACK literal header field without indexing, new name (no dynamic-table side effects)."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def _literal_indexed_name(index: int, value: bytes) -> bytes:
    """HPACK literal without indexing whose name is static-table entry `index`."""
    return _hpack_int(index, 4) + _hpack_int(len(value), 7) + value


# `:status: 200` is static entry 8; `content-type` is static entry 31.
RESPONSE_HEADERS = b"\x88" + _literal_indexed_name(31, b"application/grpc")


def trailers_block(status: int, message: str | None = None) -> bytes:
    """HPACK block with `grpc-status` (and a percent-encoded `grpc-message`)."""
    block = _literal(b"grpc-status", str(status).encode())
    if message:
        block += _literal(b"grpc-message", quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode())
    return block


OK_TRAILERS = trailers_block(GRPC_OK)


class ConnectionError_(Exception):
    """A connection-level protocol error: the connection is closed with GOAWAY(code)."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


@dataclass(frozen=True, slots=True)
class StreamMethod:
    """One bidirectional-streaming method."""

    decode: Callable[[bytes], Any]
    handler: Callable[[AsyncIterator[Any]], AsyncIterator[Any]]
    encode: Callable[[Any], bytes]


class _Stream:
    __slots__ = (
        "consumed",
        "drain",
        "headers_sent",
        "local_closed",
        "method",
        "pending",
        "queue",
        "queued",
        "rbuf",
        "recv_window",
        "remote_closed",
        "reset",
        "send_window",
        "sid",
        "task",
        "waiter",
    )

    def __init__(self, sid: int, send_window: int, recv_window: int, method: StreamMethod) -> None:
        self.sid = sid
        self.method = method
        self.headers_sent = False
        self.queue: deque[tuple[Any, int]] = deque()
        self.queued = 0
        """Wire bytes of the messages in `queue` plus `rbuf`: received, not yet consumed or credited."""
        self.recv_window = recv_window
        """What the peer may still send on this stream (our window as the peer sees it)."""
        self.waiter: asyncio.Future[None] | None = None
        self.remote_closed = False
        self.local_closed = False
        self.reset = False
        self.send_window = send_window
        self.pending: deque[memoryview] = deque()
        """DATA payload waiting for flow-control credit, in order."""
        self.drain: asyncio.Future[None] | None = None
        self.rbuf = bytearray()
        """Bytes of a gRPC message split over DATA frames."""
        self.task: asyncio.Task[None] | None = None
        self.consumed = 0
        """Bytes handed to the handler and not yet credited back with WINDOW_UPDATE."""

    def forget_task(self, _task: asyncio.Task[None]) -> None:
        """Drop the finished task. A stream reset cancels its task, and the CancelledError's traceback
        holds the frames, whose locals hold this stream: while the stream held the task too, every
        reset request (most of them: Envoy resets each ext_proc stream at the end of its HTTP stream)
        left a reference cycle of ~40 objects for the cyclic GC, whose collections then paused the
        loop for 10-20 ms."""
        self.task = None

    def wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)
