"""e2e: `ingate async run` as a real process (SQLite queue; Redis Streams or the llm-d-async sorted-set
layout on a real redis-server), killed with SIGKILL in the middle of a 1,000-message batch
and restarted as two processors sharing the queue, in front of `ingate serve --proxy builtin` and
`ingate sim` replicas.

The batch goes in through `ingate async submit` (OpenAI Batch JSONL lines plus malformed lines). The
gateway runs flow control with the async objective sheddable (priority -1), so some requests are shed
with 429 and retried. After the restart drains the queue, every id has exactly one outcome: a result or
a dead-letter entry, never both, never two; malformed lines are answered INVALID_REQUEST; the rest
complete with 200.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

import orjson
import pytest
from conftest import MODEL, SimProcess
from prometheus_client.parser import text_string_to_metric_families
from test_flowcontrol_serve import serve

from ingate.asyncproc.backends import open_backend
from ingate.asyncproc.models import INVALID_REQUEST
from ingate.asyncproc.pubsublocal import emulator_binary, local_pubsub
from ingate.asyncproc.redislocal import local_redis, local_redis_cluster, redis_binary
from ingate.bench.systems import free_port
from ingate.procs import ChildProcess, spawn

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N = 1000
MALFORMED = [
    b"{this is not json",
    b'{"id": "bad-payload", "deadline": 4102444800, "payload": "a string"}',
    b'{"id": "bad-endpoint", "deadline": 4102444800, "payload": {}, "endpoint": "/admin/shutdown"}',
    b'{"id": "no-deadline", "payload": {"prompt": "x"}}',
]


@pytest.fixture(params=["sqlite", "redis", "llmd-sortedset", "redis-cluster", "pubsub"])
def queue_url(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The embedded SQLite queue, or Redis Streams / llm-d-async's sorted-set layout on a real
    redis-server started here, or Redis Streams on a real three-primary Redis Cluster, or Google
    Cloud Pub/Sub on the real emulator (SQLite ledger; skipped where the emulator is not installed)."""
    if request.param == "sqlite":
        yield str(tmp_path / "queue.db")
        return
    if request.param == "pubsub":
        if emulator_binary() is None:
            pytest.skip("the Pub/Sub emulator (Cloud SDK pubsub-emulator) or Java is not installed here")
        with local_pubsub(tmp_path / "pubsub") as host:
            monkeypatch.setenv("PUBSUB_EMULATOR_HOST", host)  # the processors inherit it
            ledger = tmp_path / "ledger.db"
            yield f"pubsub://e2e/batch-sub?topic=batch&results=batch-results&create=1&ledger={ledger}"
        return
    if redis_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing in CI: `make test` installs it (apt-get) when run as root")
        pytest.skip(
            "redis-server is not installed (apt-get install -y redis-server; `make test` does it as root)"
        )
    if request.param == "redis-cluster":
        with local_redis_cluster(tmp_path / "redis-cluster") as url:
            yield url + "&stream=batch&group=processors"
        return
    with local_redis(tmp_path / "redis") as url:
        if request.param == "llmd-sortedset":
            yield url.replace("redis://", "redis-sortedset://")  # upstream's default key names
        else:
            yield url + "?stream=batch&group=processors"


def write_batch(path: Path) -> None:
    with path.open("wb") as fh:
        for i in range(N):
            line = {
                "custom_id": f"req-{i:04d}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": MODEL, "prompt": f"async request {i}", "max_tokens": 8, "ignore_eos": True},
            }
            fh.write(orjson.dumps(line) + b"\n")
            if i in (10, 400, 700, 900):
                fh.write(MALFORMED[(10, 400, 700, 900).index(i)] + b"\n")


def cli(*args: str, timeout: float = 60) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "ingate", "async", *args], capture_output=True, timeout=timeout, check=True
    )
    return out.stdout.decode()


def metric(url: str, name: str) -> float | None:
    with suppress(OSError), urllib.request.urlopen(url + "/metrics", timeout=2) as r:
        for fam in text_string_to_metric_families(r.read().decode()):
            for s in fam.samples:
                if s.name == name:
                    return float(s.value)
    return None


def gateway_shed(url: str) -> float:
    """Requests the gateway's flow control shed (429), from its /metrics."""
    total = 0.0
    with urllib.request.urlopen(url + "/metrics", timeout=2) as r:
        for fam in text_string_to_metric_families(r.read().decode()):
            for smp in fam.samples:
                if smp.name == "ingate_flow_control_rejected_total" and smp.labels.get("reason") == "shed":
                    total += smp.value
    return total


def get_json(url: str) -> dict[str, object] | None:
    with suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
        doc = orjson.loads(r.read())
        return doc if isinstance(doc, dict) else None
    return None


def start_processor(
    tmp_path: Path, queue: str, gateway: str, tag: str, *extra: str
) -> tuple[ChildProcess, str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "ingate", "async", "run",
        "--queue", queue, "--gateway", gateway, "--objective", "async",
        "--lease", "2", "--backoff-base", "0.1", "--max-concurrency", "48", "--initial-window", "8",
        "--poll-interval", "0.05", "--grace", "2", "--listen", f"127.0.0.1:{port}", "--log-level", "warning",
        *extra,
    ]  # fmt: skip
    return spawn(cmd, tmp_path / f"async-{tag}.log"), f"http://127.0.0.1:{port}"


async def count(queue: str) -> tuple[int, int, int]:
    q = open_backend(queue)
    try:
        n = 0
        async for _ in q.results():
            n += 1
        return await q.backlog(), n, len(await q.dead_letters())
    finally:
        await q.close()


async def test_kill_9_mid_batch_then_restart_every_id_has_exactly_one_outcome(
    sim_fleet: Callable[..., SimProcess], tmp_path: Path, queue_url: str
) -> None:
    sim = sim_fleet(2, "--time-scale", "20", "--max-num-seqs", "16")
    batch = tmp_path / "batch.jsonl"
    write_batch(batch)
    assert f"submitted {N + len(MALFORMED)} messages" in cli("submit", str(batch), "--queue", queue_url)

    objectives = [{"name": "async", "priority": -1}]
    with serve(tmp_path, sim.addresses, objectives=objectives, flowControl={"pollIntervalS": 0.02}) as gw:
        first, murl = start_processor(tmp_path, queue_url, gw, "first")
        try:
            deadline = time.monotonic() + 40
            in_flight_at_kill = 0.0
            while True:
                assert first.proc.poll() is None, first.tail()
                assert time.monotonic() < deadline, f"no progress: {await count(queue_url)} {first.tail()}"
                _, done, _ = await count(queue_url)
                in_flight_at_kill = metric(murl, "ingate_async_in_flight") or 0.0
                if done >= N // 3 and in_flight_at_kill > 0:
                    break
                await asyncio.sleep(0.05)
            first.proc.kill()  # SIGKILL: no drain, claimed messages stay leased
            first.proc.wait(timeout=10)
        finally:
            first.stop()
        backlog, done, _ = await count(queue_url)
        print(f"\nkilled with {in_flight_at_kill:.0f} in flight: {done} results, {backlog} left")
        assert backlog > 0 and done < N

        # Restart as two processors consuming the same queue.
        restarted = [start_processor(tmp_path, queue_url, gw, t, "--exit-when-empty")[0] for t in ("b", "c")]
        try:
            for p in restarted:
                p.proc.wait(timeout=60)
        finally:
            for p in restarted:
                p.stop()
        for p in restarted:
            assert p.proc.returncode == 0, p.tail()
        shed = gateway_shed(gw)
    print(f"gateway shed {shed:.0f} async requests with 429 (retried)")
    assert shed > 0, "the load never saturated the pool: the shed/retry path was not exercised"

    q = open_backend(queue_url)
    try:
        results = [r async for r in q.results()]
        dead_letters = await q.dead_letters()
        assert await q.backlog() == 0
    finally:
        await q.close()
    ids = Counter([r.id for r in results] + [d.id for d in dead_letters])
    assert all(c == 1 for c in ids.values()), [i for i, c in ids.items() if c > 1]
    by_id = {r.id: r for r in results}
    expected = {f"req-{i:04d}" for i in range(N)}
    assert expected <= set(ids), sorted(expected - set(ids))[:5]
    assert len(ids) == N + len(MALFORMED)  # one outcome for each message, malformed ones included
    for rid in ("bad-payload", "bad-endpoint", "no-deadline"):
        assert by_id[rid].error_code == INVALID_REQUEST, by_id[rid]
    (no_id,) = [r for r in results if r.id.startswith("invalid-")]
    assert no_id.error_code == INVALID_REQUEST and "not JSON" in no_id.error_message
    statuses = Counter(by_id[i].status_code for i in expected if i in by_id)
    assert statuses == {200: N}, (statuses, [(d.id, d.error) for d in dead_letters][:5])
    body = orjson.loads(by_id["req-0999"].payload)
    assert body["usage"]["completion_tokens"] == 8

    out = tmp_path / "out.jsonl"
    cli("results", "--queue", queue_url, "--out", str(out))
    lines = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert len(lines) == N + len(MALFORMED)
    line = next(x for x in lines if x["custom_id"] == "req-0005")
    assert line["response"]["status_code"] == 200 and line["error"] is None


async def test_capacity_signal_from_a_real_gateway_drives_the_processor(
    sim_fleet: Callable[..., SimProcess], tmp_path: Path
) -> None:
    """`ingate serve` serves GET /v1/capacity (built-in proxy port, and the admin port when on); the
    processor dispatches only into the free slots it reports and drains the queue."""
    sim = sim_fleet(2, "--time-scale", "20", "--max-num-seqs", "4")
    port, mport = free_port(), free_port()
    doc = {
        "listen": {"host": "127.0.0.1", "port": port},
        "pool": {"name": "cap", "endpoints": [{"address": a} for a in sim.addresses]},
        "metrics": {"intervalMs": 20},
        "dataplane": {"type": "builtin"},
        "objectives": [{"name": "async", "priority": -1}],
        "flowControl": {},
        "serving": {"metricsPort": mport},
    }
    cfg = tmp_path / "gw.yaml"
    cfg.write_bytes(orjson.dumps(doc))  # JSON is YAML
    gw = spawn([sys.executable, "-m", "ingate", "serve", "--config", str(cfg)], tmp_path / "gw.log")
    queue = str(tmp_path / "q.db")
    batch = tmp_path / "batch.jsonl"
    with batch.open("wb") as fh:
        for i in range(120):
            body = {"model": MODEL, "prompt": f"p {i}", "max_tokens": 8, "ignore_eos": True}
            fh.write(orjson.dumps({"custom_id": f"c{i}", "url": "/v1/completions", "body": body}) + b"\n")
    cli("submit", str(batch), "--queue", queue)
    try:
        cap_url = f"http://127.0.0.1:{mport}/v1/capacity"  # the admin port; the proxy port serves it too
        deadline = time.monotonic() + 30
        snap: dict[str, object] = {}
        # Served from the first moment; the replicas count as ready once their metrics are scraped.
        while snap.get("ready_endpoints") != 2:
            assert gw.proc.poll() is None and time.monotonic() < deadline, (snap, gw.tail())
            snap = get_json(cap_url) or {}
            await asyncio.sleep(0.1)
        assert "free_slots" in snap and snap["saturated"] is False
        proc, _ = start_processor(
            tmp_path, queue, f"http://127.0.0.1:{port}", "cap", "--capacity-url", cap_url, "--exit-when-empty"
        )
        try:
            proc.proc.wait(timeout=60)
        finally:
            proc.stop()
        assert proc.proc.returncode == 0, proc.tail()
    finally:
        gw.stop()
    backlog, done, dead = await count(queue)
    assert (backlog, done, dead) == (0, 120, 0)


def test_batch_command_runs_a_file_with_progress_and_resumes(
    sim_fleet: Callable[..., SimProcess], tmp_path: Path
) -> None:
    sim = sim_fleet(1, "--time-scale", "20")
    batch, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    with batch.open("wb") as fh:
        for i in range(40):
            body = {"model": MODEL, "prompt": f"p {i}", "max_tokens": 4, "ignore_eos": True}
            fh.write(
                orjson.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": body})
            )
            fh.write(b"\n")
        fh.write(b"not json\n")
    with serve(tmp_path, sim.addresses, objectives=[{"name": "async", "priority": -1}]) as gw:
        cmd = ["batch", str(batch), "--out", str(out), "--gateway", gw, "--progress", "--backoff-base", "0.1"]
        res = subprocess.run(
            [sys.executable, "-m", "ingate", "async", *cmd], capture_output=True, timeout=60, check=True
        )
        err = res.stderr.decode()
        assert "async batch" in res.stdout.decode() + err  # the progress display ran
        assert "41 results" in err, err
        lines = [orjson.loads(x) for x in out.read_bytes().splitlines()]
        assert sum(1 for x in lines if x["response"] and x["response"]["status_code"] == 200) == 40
        assert sum(1 for x in lines if x["error"] and x["error"]["code"] == "INVALID_REQUEST") == 1
        # Run again: the queue next to the output is resumed (nothing left), not refilled.
        res = subprocess.run(
            [sys.executable, "-m", "ingate", "async", *cmd], capture_output=True, timeout=60, check=True
        )
        assert "41 results" in res.stderr.decode()
