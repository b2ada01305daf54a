"""e2e: flow control in a real `ingate serve --proxy builtin` process in front of `ingate sim` replicas.

Everything crosses real HTTP on loopback: clients -> gateway process -> simulator process. Capacity is
kept tiny (one replica running 1-4 sequences, `queueDepthThreshold: 1`) so a few dozen requests
saturate the pool. What is measured: a high-priority flow keeps its latency while a low-priority one
absorbs the queueing; two tenants with 10x different offered load share served tokens fairly (Jain's
index); queued requests past the TTL get 503 `queue_ttl_expired`; a client that disconnects while queued
leaves the queue and never reaches a replica.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import MODEL, SimProcess
from prometheus_client.parser import text_string_to_metric_families

from ingate.bench.systems import free_port
from ingate.flowcontrol import jain_index
from ingate.procs import spawn

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPT = "tell me a story about the sea"


@contextmanager
def serve(tmp_path: Path, addresses: list[str], **extra: Any) -> Iterator[str]:
    """Run `ingate serve --proxy builtin` on a free port with a generated YAML; yields its base URL."""
    port = free_port()
    doc: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "pool": {"name": "fc-pool", "endpoints": [{"address": a} for a in addresses]},
        "metrics": {"intervalMs": 20},
        "dataplane": {"type": "builtin"},
        **extra,
    }
    cfg = tmp_path / f"gateway-{port}.yaml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    cmd = [sys.executable, "-m", "ingate", "serve", "--config", str(cfg), "--proxy", "builtin"]
    proc = spawn([*cmd, "--log-level", "warning"], tmp_path / f"gateway-{port}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.proc.poll() is None, f"ingate serve exited: {proc.tail()}"
            assert time.monotonic() < deadline, f"ingate serve not ready: {proc.tail()}"
            with suppress(OSError):
                with urllib.request.urlopen(url + "/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            time.sleep(0.05)
        yield url
    finally:
        proc.stop()


@dataclass
class Result:
    status: int
    body: dict[str, Any]
    latency: float
    done_at: float
    headers: dict[str, str]

    @property
    def tokens(self) -> int:
        u = self.body.get("usage") or {}
        return int(u.get("prompt_tokens") or 0) + int(u.get("completion_tokens") or 0)


async def complete(
    s: aiohttp.ClientSession,
    url: str,
    *,
    objective: str | None = None,
    flow: str | None = None,
    max_tokens: int = 20,
    timeout_s: float = 60.0,
) -> Result:
    headers = {}
    if objective is not None:
        headers["x-gateway-inference-objective"] = objective
    if flow is not None:
        headers["x-gateway-inference-fairness-id"] = flow
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True}
    t0 = time.perf_counter()
    async with s.post(
        url + "/v1/completions",
        json=body,
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    ) as r:
        data = await r.json(content_type=None)
        done = time.perf_counter()
        return Result(r.status, data, done - t0, done, dict(r.headers))


async def samples(s: aiohttp.ClientSession, url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of metric `name` from `url`/metrics, keyed by their sorted labels."""
    async with s.get(url + "/metrics") as r:
        text = await r.text()
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == name:
                out[tuple(sorted(smp.labels.items()))] = smp.value
    return out


async def metric(s: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(
        v for k, v in (await samples(s, url, name)).items() if all((lk, lv) in k for lk, lv in labels.items())
    )


QUEUE = "inference_extension_flow_control_queue_size"
REJECTED = "ingate_flow_control_rejected_total"


async def wait_for(cond: Callable[[], Any], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_high_priority_keeps_latency_low_priority_absorbs_queueing(
    sim_fleet: Callable[..., SimProcess], tmp_path: Path
) -> None:
    sim = sim_fleet(1, "--max-num-seqs", "4")
    objectives = [{"name": "critical", "priority": 10}, {"name": "batch", "priority": 0}]
    fc = {"saturation": {"queueDepthThreshold": 1}, "pollIntervalS": 0.02}
    with serve(tmp_path, sim.addresses, objectives=objectives, flowControl=fc) as url:
        async with aiohttp.ClientSession() as s:
            alone = []
            for _ in range(4):
                r = await complete(s, url, objective="critical", flow="crit")
                assert r.status == 200, r.body
                alone.append(r.latency)
            stop = False
            low: list[Result] = []

            async def low_client() -> None:
                while not stop:
                    low.append(await complete(s, url, objective="batch", flow="bulk"))

            clients = [asyncio.create_task(low_client()) for _ in range(24)]
            try:

                async def bulk_queued() -> bool:
                    return await metric(s, url, QUEUE, fairness_id="bulk") >= 10

                await wait_for(bulk_queued, "the gateway to queue low-priority requests")
                t_start = time.perf_counter()
                loaded = []
                for _ in range(8):
                    r = await complete(s, url, objective="critical", flow="crit")
                    assert r.status == 200, r.body
                    loaded.append(r.latency)
                bulk_still_queued = await metric(s, url, QUEUE, fairness_id="bulk")
            finally:
                stop = True
                await cancel_all(clients)
            low_window = [r.latency for r in low if r.status == 200 and r.done_at > t_start]
    a, c, lo = statistics.median(alone), statistics.median(loaded), statistics.median(low_window)
    print(
        f"\ncritical p50 alone {a * 1000:.0f} ms, under overload {c * 1000:.0f} ms ({c / a:.2f}x); "
        f"low-priority p50 {lo * 1000:.0f} ms ({len(low_window)} served in the window)"
    )
    assert bulk_still_queued >= 5, "the overload ended before the critical requests did"
    assert len(low_window) >= 8
    # The low-priority flow absorbs the queueing; the critical flow waits at most about one slot.
    assert lo > 3 * c, (lo, c)
    assert c < 2.0 * a, (c, a)


async def test_two_tenants_10x_offered_load_get_fair_share(
    sim_fleet: Callable[..., SimProcess], tmp_path: Path
) -> None:
    # ~0.4 s per request, 2 at a time: capacity ~5 req/s. Tenant "light" offers 4 req/s (above its fair
    # half), tenant "heavy" 40 req/s: both stay backlogged for the whole window.
    sim = sim_fleet(1, "--max-num-seqs", "2")
    fc = {
        "saturation": {"queueDepthThreshold": 1},
        "pollIntervalS": 0.02,
        "flowMaxRequests": 1000,
        "defaultPolicy": "vtc",
    }
    rates = {"heavy": 40.0, "light": 4.0}
    duration, warmup = 9.0, 2.0
    with serve(tmp_path, sim.addresses, flowControl=fc) as url:
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as s:
            results: dict[str, list[Result]] = {f: [] for f in rates}
            tasks: list[asyncio.Task[Any]] = []

            async def one(flow: str) -> None:
                results[flow].append(await complete(s, url, flow=flow, max_tokens=40))

            async def offer(flow: str, rate: float, t0: float) -> None:
                n = 0
                while (due := t0 + n / rate) < t0 + duration:  # evenly spaced arrivals
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
                    tasks.append(asyncio.create_task(one(flow)))
                    n += 1

            async def backlog_probe(t0: float) -> list[tuple[float, float]]:
                seen = []
                while time.perf_counter() < t0 + duration:
                    await asyncio.sleep(0.25)
                    if time.perf_counter() > t0 + warmup:
                        seen.append(
                            (
                                await metric(s, url, QUEUE, fairness_id="heavy"),
                                await metric(s, url, QUEUE, fairness_id="light"),
                            )
                        )
                return seen

            t0 = time.perf_counter()
            try:
                probe = asyncio.create_task(backlog_probe(t0))
                await asyncio.gather(*(offer(f, r, t0) for f, r in rates.items()))
                seen = await probe
                served_gw = {
                    f: await metric(s, url, "ingate_flow_control_served_tokens_total", fairness_id=f)
                    for f in rates
                }
            finally:
                await cancel_all(tasks)  # client disconnects: the gateway drops what is still queued

            async def drained() -> bool:
                return await metric(s, url, QUEUE) == 0

            await wait_for(drained, "the queues to empty after the clients went away")
    lo, hi = t0 + warmup, t0 + duration
    tokens = {
        f: sum(r.tokens for r in rs if r.status == 200 and lo <= r.done_at < hi) for f, rs in results.items()
    }
    jain = jain_index(list(tokens.values()))
    share = {f: round(v / max(1.0, sum(served_gw.values())), 3) for f, v in served_gw.items()}
    print(
        f"\nserved tokens in the backlogged window {tokens}; Jain's index {jain:.3f}; "
        f"gateway served-token share (whole run) {share}"
    )
    # Both flows were backlogged in (nearly) every probe of the window.
    assert len(seen) >= 10
    assert sum(1 for h, li in seen if h > 0 and li > 0) >= 0.9 * len(seen), seen
    assert min(tokens.values()) > 0
    assert jain >= 0.95, tokens


async def test_queue_ttl_expiry_and_client_disconnect(
    sim_fleet: Callable[..., SimProcess], tmp_path: Path
) -> None:
    sim = sim_fleet(1, "--max-num-seqs", "1")
    fc = {"saturation": {"queueDepthThreshold": 1}, "pollIntervalS": 0.02, "queueTtlS": 0.6}
    replica = f"http://{sim.addresses[0]}"
    with serve(tmp_path, sim.addresses, flowControl=fc) as url:
        async with aiohttp.ClientSession() as s:
            # Two long requests: one runs, one waits on the replica -> the pool is saturated while the
            # first one decodes (500 tokens, a few seconds: room for the TTL and disconnect checks).
            longs = [
                asyncio.create_task(complete(s, url, flow="long", max_tokens=500, timeout_s=60))
                for _ in range(2)
            ]

            async def saturated() -> bool:
                return await metric(s, replica, "vllm:num_requests_waiting") >= 1

            await wait_for(saturated, "the replica to have a waiting request")
            r = await complete(s, url, flow="ttl")
            assert r.status == 503, r.body
            err = r.body["error"]
            assert err["code"] == "queue_ttl_expired"
            assert "queued longer than the queue TTL (0.6 s)" in err["message"], err
            assert 0.5 <= r.latency < 2.5, r.latency
            assert await metric(s, url, REJECTED, reason="expired") == 1

            # A client that gives up while queued: its request leaves the queue at once.
            gone = asyncio.create_task(complete(s, url, flow="gone", timeout_s=10))

            async def gone_queued() -> bool:
                return await metric(s, url, QUEUE, fairness_id="gone") == 1

            await wait_for(gone_queued, "the request to be queued")
            gone.cancel()
            with suppress(asyncio.CancelledError):
                await gone

            async def gone_removed() -> bool:
                return await metric(s, url, QUEUE, fairness_id="gone") == 0

            await wait_for(gone_removed, "the cancelled request to leave its queue", timeout_s=2)
            assert await metric(s, url, REJECTED, reason="cancelled") == 1
            assert [x.status for x in await asyncio.gather(*longs)] == [200, 200]
            # Only the two long requests ever reached the replica.
            assert await metric(s, replica, "vllm:request_success_total") == 2
            assert await metric(s, url, QUEUE) == 0


async def test_critical_request_preempts_low_priority_work_on_the_model_server(
    sim_fleet: Callable[..., SimProcess], tmp_path: Path
) -> None:
    # One replica with 2 batch slots, priority scheduling with preemption; the gateway sends priorities
    # (vLLM semantics) and may dispatch past saturation to displace lower-priority work.
    sim = sim_fleet(1, "--max-num-seqs", "2", "--scheduling-policy", "priority", "--priority-preemption")
    objectives = [{"name": "critical", "priority": 10}, {"name": "batch", "priority": 0}]
    fc = {"saturation": {"queueDepthThreshold": 1}, "pollIntervalS": 0.02, "preemption": True}
    pool = {
        "name": "fc-pool",
        "endpoints": [{"address": a} for a in sim.addresses],
        "modelServerPriority": "vllm",
    }
    with serve(tmp_path, sim.addresses, objectives=objectives, flowControl=fc, pool=pool) as url:
        async with aiohttp.ClientSession() as s:
            # ~3 s each at time scale 1: both slots busy with batch work, one waiting on the replica (it
            # is saturated) and more at the gateway.
            batch = [
                asyncio.create_task(complete(s, url, objective="batch", flow="bulk", max_tokens=300))
                for _ in range(5)
            ]
            sim_url = f"http://{sim.addresses[0]}"

            async def replica_full() -> bool:
                running = await metric(s, sim_url, "vllm:num_requests_running")
                waiting = await metric(s, sim_url, "vllm:num_requests_waiting")
                return running == 2 and waiting >= 1 and await metric(s, url, QUEUE, fairness_id="bulk") >= 1

            await wait_for(
                replica_full, "both batch slots, the replica's queue and the gateway's queue to fill"
            )
            t0 = time.perf_counter()
            crit = await complete(s, url, objective="critical", flow="crit", max_tokens=5)
            crit_latency = time.perf_counter() - t0
            assert crit.status == 200, crit.body
            preemptive = await metric(s, url, "ingate_flow_control_preemptive_dispatch_total", priority="10")
            results = await asyncio.gather(*batch)
        async with aiohttp.ClientSession() as s, s.get(f"http://{sim.addresses[0]}/metrics") as r:
            sim_metrics = await r.text()
    first_batch_done = min(r.latency for r in results)
    print(
        f"\ncritical {crit_latency * 1000:.0f} ms while batch requests took {first_batch_done:.2f} s and more"
    )
    assert preemptive == 1
    assert any(
        line.startswith("vllm:num_preemptions_total") and float(line.split()[-1]) >= 1
        for line in sim_metrics.splitlines()
    ), "the replica did not preempt"
    # The critical request did not wait for a batch request to finish...
    assert crit_latency < 0.3 * first_batch_done, (crit_latency, first_batch_done)
    # ...and the displaced batch request resumed and completed in full.
    assert all(r.status == 200 and r.body["usage"]["completion_tokens"] == 300 for r in results)
