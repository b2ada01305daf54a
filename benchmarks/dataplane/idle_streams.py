"""Memory of many concurrent idle ext_proc streams on one connection, per gRPC transport.

Envoy opens one ext_proc stream per HTTP request and keeps it open while the request lives, so a
picker behind a busy Envoy holds as many open streams as there are requests in flight (a long
generation keeps its stream for its whole length). This measures what each open stream costs the
picker process: the picker (the real ext_proc servicer over a director that routes unread, on the
chosen transport, with uvloop, in its own process) gets one connection from a raw HTTP/2 client that
opens ``--streams`` streams (request HEADERS, no message yet: each handler is waiting for its first
request) and keeps them open. The picker's resident memory (VmRSS) is read before, with the streams
open, and after the connection closed.

    python benchmarks/dataplane/idle_streams.py --streams 10000 [--transports h2,grpcio,grpclib,h2lib]

Prints a table and writes benchmarks/results/grpc_idle_streams.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hpack
import orjson

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "grpc_idle_streams.json"
PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
TRANSPORTS = ("h2", "grpcio", "grpclib", "h2lib")


def _frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


async def _serve(transport: str) -> None:
    """Child role: the picker's ext_proc server over a null director; prints its port."""
    from overhead import ALT_TRANSPORTS, _alt_server, _NullDirector

    from ingate.dataplane.extproc import ExtProcServicer
    from ingate.dataplane.extproc_server import ExtProcServer

    svc = ExtProcServicer(_NullDirector("127.0.0.1:9"), report_served=False, responses="none")  # type: ignore[arg-type]
    server: Any
    if transport in ALT_TRANSPORTS:
        server = _alt_server(svc, transport)
        port = await server.start("127.0.0.1", 0)
    else:
        server = ExtProcServer(svc, port=0, transport=transport)  # type: ignore[arg-type]
        port = await server.start()
    print(port, flush=True)
    await asyncio.Event().wait()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class _Client:
    """Raw HTTP/2 client: opens streams, answers SETTINGS, waits on PING barriers."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = bytearray()
        self.refused = 0
        self.goaway: int | None = None
        # Large windows so the server's answers (none expected) never block on us.
        settings = struct.pack(">HI", 4, 1 << 30)
        self.sock.sendall(PREFACE + _frame(4, 0, 0, settings))

    def barrier(self, tag: bytes | None, within: float = 60.0) -> None:
        """With `tag`: send a PING and read until its ACK (everything before it was handled). Without:
        read until the server's SETTINGS. (One PING per run: grpclib, like grpc C-core, answers a
        client that PINGs repeatedly without sending data with GOAWAY ENHANCE_YOUR_CALM.)"""
        if tag is not None:
            self.sock.sendall(_frame(6, 0, 0, tag))
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            while len(self.buf) >= 9:
                n = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) < 9 + n:
                    break
                t, f = self.buf[3], self.buf[4]
                p = bytes(self.buf[9 : 9 + n])
                del self.buf[: 9 + n]
                if t == 4 and not f & 1:
                    self.sock.sendall(_frame(4, 1, 0))  # ACK the server's SETTINGS
                    if tag is None:
                        return
                elif t == 3:
                    self.refused += 1  # RST_STREAM: the server refused (or ended) a stream
                elif t == 7:
                    self.goaway = struct.unpack(">I", p[4:8])[0]
                elif t == 6 and f & 1 and p == tag:
                    return
            data = self.sock.recv(1 << 16)
            if not data:
                raise RuntimeError("server closed the connection")
            self.buf += data
        raise TimeoutError("no PING ACK")

    def open_streams(self, n: int) -> None:
        enc = hpack.Encoder()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", PROCESS),
            (":authority", "picker"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        burst = b"".join(_frame(1, 4, sid, enc.encode(headers)) for sid in range(1, 2 * n, 2))
        self.sock.sendall(burst)

    def close(self) -> None:
        self.sock.close()


def _measure(transport: str, streams: int) -> dict[str, Any]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--role", "server", "--transport", transport],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        c = _Client(port)
        c.barrier(None)
        time.sleep(1.0)
        before = _rss_kib(proc.pid)
        c.open_streams(streams)
        try:
            c.barrier(b"opened!!")
        except (OSError, RuntimeError) as e:
            return {"transport": transport, "streams": streams, "error": f"connection closed: {e}"}
        time.sleep(2.0)  # every handler task has run up to its first await
        during = _rss_kib(proc.pid)
        opened = streams - c.refused
        c.close()
        time.sleep(2.0)
        after = _rss_kib(proc.pid)
        return {
            "transport": transport,
            "streams": streams,
            "open": opened,
            "refused_or_reset": c.refused,
            "rss_before_kib": before,
            "rss_open_kib": during,
            "rss_after_close_kib": after,
            "per_stream_bytes": (during - before) * 1024 / max(opened, 1),
        }
    finally:
        proc.terminate()
        proc.wait(5)


def main() -> None:
    """Measure each transport in turn; print the table; write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=["bench", "server"], default="bench")
    ap.add_argument("--transport", choices=TRANSPORTS, default="h2")
    ap.add_argument("--transports", default="h2,grpcio,grpclib,h2lib")
    ap.add_argument("--streams", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    import uvloop

    if args.role == "server":
        uvloop.install()
        asyncio.run(_serve(args.transport))
        return
    rows = [_measure(t, args.streams) for t in args.transports.split(",") if t]
    print(
        f"{'transport':<9} {'open':>6} {'refused':>7} {'RSS before':>11} {'with streams':>13} {'after close':>12} {'per stream':>11}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['transport']:<9} {r['error']}")
            continue
        print(
            f"{r['transport']:<9} {r['open']:>6} {r['refused_or_reset']:>7} {r['rss_before_kib'] / 1024:>8.1f} MiB"
            f" {r['rss_open_kib'] / 1024:>9.1f} MiB {r['rss_after_close_kib'] / 1024:>8.1f} MiB"
            f" {r['per_stream_bytes'] / 1024:>7.2f} KiB"
        )
    out = {
        "benchmark": "grpc_idle_streams",
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
