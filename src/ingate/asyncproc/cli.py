"""``ingate async``: run the async processor, submit JSONL batches, export results."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO

import click
import orjson

from ingate.asyncproc.backends import open_backend
from ingate.asyncproc.backends.base import QueueBackend
from ingate.asyncproc.batchfile import dead_letter_line, openai_line, to_message
from ingate.asyncproc.metrics import AsyncMetrics
from ingate.asyncproc.models import DEFAULT_MAX_MESSAGE_BYTES
from ingate.asyncproc.processor import Processor, ProcessorConfig

log = logging.getLogger("ingate.async")

DEFAULT_QUEUE = "ingate-async.db"
QUEUE_HELP = (
    "Queue: an SQLite path, redis://HOST:PORT/DB?stream=S (Redis Streams), redis-sortedset://... "
    "(llm-d-async's layout), either with &cluster=1 for Redis Cluster, or "
    "pubsub://PROJECT/SUBSCRIPTION?results=TOPIC&ledger=PATH|redis://... (Google Cloud Pub/Sub). See docs/async.md."
)


def _run_async(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        pass
    asyncio.run(main())


def _backend(queue: str) -> QueueBackend:
    try:
        return open_backend(queue)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--queue") from None


def _processor_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option(
            "--gateway",
            "gateway_url",
            default="http://127.0.0.1:8080",
            show_default=True,
            help="Gateway base URL the requests are sent to.",
        ),
        click.option(
            "--objective",
            default="async",
            show_default=True,
            help="InferenceObjective header value; give it a negative priority in the gateway. '' = none.",
        ),
        click.option(
            "--band", default=-1, show_default=True, help="Priority of that objective (capacity band)."
        ),
        click.option(
            "--capacity-url",
            default=None,
            help="Gateway capacity document (JSON, e.g. http://GW/v1/capacity) polled to dispatch only into headroom.",
        ),
        click.option(
            "--gate",
            type=click.Choice(["ingate", "prometheus-saturation", "prometheus-budget"]),
            default="ingate",
            show_default=True,
            help="Dispatch gate: ingate's window + free capacity, or llm-d-async's gates (for comparison; "
            "they read --capacity-url every second).",
        ),
        click.option(
            "--slots-only/--queue-headroom",
            "slots_only",
            default=True,
            show_default=True,
            help="With --capacity-url: dispatch only into free batch slots (never queue on a model server), "
            "or up to the gateway's queue-depth headroom.",
        ),
        click.option(
            "--reserve-slots",
            type=click.IntRange(0, None),
            default=0,
            show_default=True,
            help="With --slots-only: leave this many of the pool's free batch slots to real-time arrivals.",
        ),
        click.option("--max-concurrency", default=64, show_default=True, help="Largest dispatch window."),
        click.option(
            "--initial-window", default=4, show_default=True, help="Window at start (slow start from here)."
        ),
        click.option(
            "--latency-objective",
            "latency_objective_s",
            type=float,
            default=None,
            help="Grow the window only on responses faster than this many seconds.",
        ),
        click.option(
            "--lease",
            "lease_s",
            default=60.0,
            show_default=True,
            help="Seconds a claimed message stays hidden without renewal (redelivered after a crash).",
        ),
        click.option(
            "--max-attempts",
            default=5,
            show_default=True,
            help="Failed attempts (5xx, no answer, abandoned) before dead-lettering; sheds do not count.",
        ),
        click.option(
            "--backoff-base", "backoff_base_s", default=2.0, show_default=True, help="Backoff base, seconds."
        ),
        click.option(
            "--backoff-max", "backoff_max_s", default=60.0, show_default=True, help="Backoff cap, seconds."
        ),
        click.option(
            "--request-timeout",
            "request_timeout_s",
            default=600.0,
            show_default=True,
            help="Per-request timeout (never past the message deadline).",
        ),
        click.option(
            "--max-message-bytes",
            default=DEFAULT_MAX_MESSAGE_BYTES,
            show_default=True,
            help="Larger messages are answered INVALID_REQUEST.",
        ),
        click.option(
            "--grace",
            "grace_s",
            default=30.0,
            show_default=True,
            help="On SIGTERM, seconds in-flight requests get to finish before they are requeued.",
        ),
        click.option(
            "--poll-interval",
            "poll_interval_s",
            default=0.2,
            show_default=True,
            help="Seconds between queue polls while it is empty.",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _config(kw: dict[str, Any], **extra: Any) -> ProcessorConfig:
    kw = dict(kw)
    kw["objective"] = kw.get("objective") or None
    return ProcessorConfig(**kw, **extra)


@click.group("async")
def async_() -> None:
    """Async inference on idle capacity: drain a durable queue into the gateway as sheddable traffic.

    Messages and results are llm-d-async compatible. The queue is an SQLite file by default
    (ingate-async.db); redis://HOST:PORT/DB?stream=NAME&group=NAME uses Redis Streams. See docs/async.md.
    """


@async_.command("run")
@click.option("--queue", default=DEFAULT_QUEUE, show_default=True, help=QUEUE_HELP)
@_processor_options
@click.option(
    "--listen", default=None, help="HOST:PORT for /metrics and the submit/poll/cancel API (off if unset)."
)
@click.option("--exit-when-empty", is_flag=True, help="Exit once the queue holds no message.")
@click.option("--log-level", default="info", show_default=True)
def run(queue: str, listen: str | None, exit_when_empty: bool, log_level: str, **kw: Any) -> None:
    """Consume the queue until SIGTERM/SIGINT (then drain gracefully)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    cfg = _config(kw, exit_when_empty=exit_when_empty)

    async def main() -> None:
        backend = _backend(queue)
        metrics = AsyncMetrics()
        proc = Processor(backend, cfg, metrics=metrics)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, proc.stop)
        runner = None
        try:
            if listen:
                runner = await _serve_api(backend, metrics, listen)
            log.info(
                "async processor: queue=%s gateway=%s objective=%s", queue, cfg.gateway_url, cfg.objective
            )
            await proc.run()
            log.info("async processor stopped: %s", dict(proc.stats))
        finally:
            if runner is not None:
                await runner.cleanup()
            await backend.close()

    _run_async(main)


async def _serve_api(backend: QueueBackend, metrics: AsyncMetrics, listen: str) -> Any:
    from aiohttp import web

    from ingate.asyncproc.api import build_app

    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(build_app(backend, metrics), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host or "127.0.0.1", int(port)).start()
    return runner


async def _submit_file(backend: QueueBackend, path: Path, ttl_s: float) -> int:
    n = 0
    batch: list[bytes] = []
    with path.open("rb") as fh:
        for line in fh:
            m = to_message(line, ttl_s=ttl_s)
            if m is None:
                continue
            batch.append(m)
            if len(batch) >= 500:
                n += await backend.submit(batch)
                batch = []
    if batch:
        n += await backend.submit(batch)
    return n


@async_.command("submit")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--queue", default=DEFAULT_QUEUE, show_default=True, help=QUEUE_HELP)
@click.option(
    "--ttl",
    "ttl_s",
    default=86400.0,
    show_default=True,
    help="Deadline (seconds from now) of OpenAI Batch lines.",
)
def submit(file: Path, queue: str, ttl_s: float) -> None:
    """Enqueue a JSONL file: OpenAI Batch lines (custom_id/url/body) or llm-d-async messages."""

    async def main() -> None:
        backend = _backend(queue)
        try:
            n = await _submit_file(backend, file, ttl_s)
        finally:
            await backend.close()
        click.echo(f"submitted {n} messages to {queue}")

    _run_async(main)


async def _export(backend: QueueBackend, out: TextIO, fmt: str) -> int:
    n = 0
    async for r in backend.results():
        doc = openai_line(r) if fmt == "openai" else r.to_json()
        out.write(orjson.dumps(doc).decode() + "\n")
        n += 1
    for d in await backend.dead_letters():
        if fmt == "openai":
            doc = dead_letter_line(d)
        else:
            doc = {"id": d.id, "dead_letter": True, "attempts": d.attempts, "error": d.error}
        out.write(orjson.dumps(doc).decode() + "\n")
        n += 1
    return n


@async_.command("results")
@click.option("--queue", default=DEFAULT_QUEUE, show_default=True, help=QUEUE_HELP)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Output file (stdout if unset).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["openai", "llm-d"]),
    default="openai",
    show_default=True,
    help="OpenAI Batch output lines, or llm-d-async result objects.",
)
def results(queue: str, out: Path | None, fmt: str) -> None:
    """Export every result (and dead letter) as JSONL."""

    async def main() -> None:
        backend = _backend(queue)
        try:
            if out is None:
                n = await _export(backend, sys.stdout, fmt)
            else:
                with out.open("w") as fh:
                    n = await _export(backend, fh, fmt)
        finally:
            await backend.close()
        click.echo(f"exported {n} lines", err=True)

    _run_async(main)


async def _counts(backend: QueueBackend) -> dict[str, int]:
    out = {
        "backlog": await backend.backlog(),
        "results": 0,
        "dead_letters": len(await backend.dead_letters()),
    }
    async for _ in backend.results():
        out["results"] += 1
    return out


@async_.command("status")
@click.option("--queue", default=DEFAULT_QUEUE, show_default=True, help=QUEUE_HELP)
def status(queue: str) -> None:
    """Print the queue's counts as JSON: backlog, results, dead_letters."""

    async def main() -> None:
        backend = _backend(queue)
        try:
            click.echo(orjson.dumps(await _counts(backend)).decode())
        finally:
            await backend.close()

    _run_async(main)


@async_.command("batch")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output JSONL.")
@click.option(
    "--queue", default=None, help="Queue (default: OUT.queue.db; an existing one is resumed, not refilled)."
)
@click.option(
    "--ttl",
    "ttl_s",
    default=86400.0,
    show_default=True,
    help="Deadline (seconds from now) of OpenAI Batch lines.",
)
@_processor_options
@click.option("--progress/--no-progress", default=None, help="Progress display (default: when interactive).")
def batch(file: Path, out: Path, queue: str | None, ttl_s: float, progress: bool | None, **kw: Any) -> None:
    """Run a JSONL batch through the gateway: submit, process until done, write OpenAI Batch output."""
    qurl = queue or str(out) + ".queue.db"
    cfg = _config(kw, exit_when_empty=True)
    show = sys.stderr.isatty() if progress is None else progress

    fresh = "://" in qurl or not Path(qurl).exists()

    async def main() -> None:
        backend = _backend(qurl)
        proc = Processor(backend, cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, proc.stop)
        try:
            if fresh:
                await _submit_file(backend, file, ttl_s)
            c = await _counts(backend)
            total = c["backlog"] + c["results"] + c["dead_letters"]
            task = asyncio.create_task(proc.run())
            if show:
                await _progress(proc, backend, total, task)
            await task
            with out.open("w") as fh:
                n = await _export(backend, fh, "openai")
            c = await _counts(backend)
        finally:
            await backend.close()
        click.echo(
            f"{n} results in {out} (ok {proc.stats['ok']}, dead-lettered {c['dead_letters']}, "
            f"still queued {c['backlog']})",
            err=True,
        )

    _run_async(main)


async def _progress(proc: Processor, backend: QueueBackend, total: int, task: asyncio.Task[None]) -> None:
    """A rich progress bar over the batch until ``task`` ends."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cols = (
        TextColumn("[bold]async batch"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[detail]}"),
    )
    with Progress(*cols, transient=False) as p:
        tid = p.add_task("batch", total=total, detail="")
        while not task.done():
            with contextlib.suppress(Exception):
                left = await backend.backlog()
                s = proc.stats
                p.update(
                    tid,
                    completed=total - left,
                    detail=(
                        f"ok {s['ok']}  err {s['client_error'] + s['invalid'] + s['expired']}  "
                        f"dead {s['dead_lettered']}  shed-retry {s['retried_shed']}  "
                        f"window {proc.window.limit}  in-flight {proc.window.in_flight}"
                    ),
                )
            await asyncio.wait({task}, timeout=0.5)
        with contextlib.suppress(Exception):
            p.update(tid, completed=total - await backend.backlog())
