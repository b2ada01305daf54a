"""The processor's HTTP face: submit / poll / cancel over real HTTP, bad input answered 400/413/409,
and its Prometheus metrics."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import aiohttp
import async_backends
import orjson
from aiohttp import web
from loopback_http import start_app
from prometheus_client.parser import text_string_to_metric_families

from ingate.asyncproc.api import build_app
from ingate.asyncproc.backends.base import QueueBackend
from ingate.asyncproc.metrics import AsyncMetrics
from ingate.asyncproc.processor import Processor, ProcessorConfig

Open = Callable[[], QueueBackend]
redis_url, queue_url, open_queue = (
    async_backends.redis_url,
    async_backends.queue_url,
    async_backends.open_queue,
)


async def test_submit_poll_cancel_and_metrics(open_queue: Open) -> None:
    release = asyncio.Event()

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        if body["prompt"] == "slow":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await release.wait()
        return web.json_response({"choices": [{"text": "hi"}], "echo": body["prompt"]})

    gw_app = web.Application()
    gw_app.router.add_post("/v1/completions", completions)
    gw_runner, gw_port = await start_app(gw_app)
    q = open_queue()
    metrics = AsyncMetrics()
    api_runner, api_port = await start_app(build_app(q, metrics, max_bytes=2000))
    api = f"http://127.0.0.1:{api_port}"
    cfg = ProcessorConfig(
        gateway_url=f"http://127.0.0.1:{gw_port}", poll_interval_s=0.02, cancel_check_s=0.05
    )
    proc = Processor(q, cfg, metrics=metrics)
    try:
        async with aiohttp.ClientSession() as s:
            # Bad input: synchronous 400/413 with an OpenAI-style body, nothing enqueued.
            async with s.post(api + "/v1/async/requests", data=b"nope") as r:
                assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"
            async with s.post(api + "/v1/async/requests", json={"payload": "x"}) as r:
                body = await r.json()
                assert r.status == 400 and "payload" in body["error"]["message"]
            async with s.post(api + "/v1/async/requests", json={"payload": {"prompt": "x" * 3000}}) as r:
                assert r.status == 413
            async with s.post(api + "/v1/async/requests", json={"payload": {}, "deadline": 5}) as r:
                assert r.status == 400 and "past" in (await r.json())["error"]["message"]
            assert await q.backlog() == 0

            async with s.post(
                api + "/v1/async/requests", json={"id": "a", "payload": {"prompt": "fast"}}
            ) as r:
                assert r.status == 202 and await r.json() == {"id": "a", "status": "queued"}
            async with s.post(
                api + "/v1/async/requests", json={"id": "a", "payload": {"prompt": "again"}}
            ) as r:
                assert r.status == 409
            async with s.post(api + "/v1/async/requests", json={"payload": {"prompt": "slow"}}) as r:
                slow_id = (await r.json())["id"]
                assert r.status == 202 and slow_id.startswith("req-")
            async with s.get(api + "/v1/async/requests/a") as r:
                assert (await r.json())["status"] == "queued"
            async with s.get(api + "/v1/async/requests/nope") as r:
                assert r.status == 404

            run = asyncio.create_task(proc.run())
            deadline = time.monotonic() + 10
            while True:
                async with s.get(api + "/v1/async/requests/a") as r:
                    doc = await r.json()
                if doc["status"] == "completed":
                    break
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            assert (
                doc["result"]["status_code"] == 200
                and orjson.loads(doc["result"]["payload"])["echo"] == "fast"
            )
            async with s.post(api + f"/v1/async/requests/{slow_id}/cancel") as r:
                assert r.status in (200, 202)
            while True:
                async with s.get(api + f"/v1/async/requests/{slow_id}") as r:
                    doc = await r.json()
                if doc["status"] == "completed":
                    break
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            # Cancelled while in flight: the gateway never answered it.
            assert doc["result"]["error_code"] == "CANCELLED" and "status_code" not in doc["result"]
            proc.stop()
            await run
            async with s.get(api + "/metrics") as r:
                text = await r.text()
    finally:
        release.set()
        await api_runner.cleanup()
        await gw_runner.cleanup()
    samples = {s.name: s for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples["ingate_async_completed_total"].value >= 1
    for name in ("ingate_async_window", "ingate_async_in_flight", "ingate_async_age_seconds_count"):
        assert name in samples, name


async def test_openai_batch_upload_status_and_output(open_queue: Open) -> None:
    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("model") == "missing":
            return web.json_response(
                {"error": {"message": "unknown model", "code": "model_not_found"}}, status=404
            )
        return web.json_response({"choices": [{"text": body.get("prompt", "")}]})

    gw_app = web.Application()
    gw_app.router.add_post("/v1/completions", completions)
    gw_runner, gw_port = await start_app(gw_app)
    q = open_queue()
    api_runner, api_port = await start_app(build_app(q))
    api = f"http://127.0.0.1:{api_port}"

    def line(cid: str, model: str = "m", url: str = "/v1/completions") -> bytes:
        doc = {"custom_id": cid, "method": "POST", "url": url, "body": {"model": model, "prompt": cid}}
        return orjson.dumps(doc)

    try:
        async with aiohttp.ClientSession() as s:
            bad = b"\n".join([line("a"), line("b", url="/v1/admin")])
            async with s.post(api + "/v1/async/batches", data=bad) as r:
                err = await r.json()
                assert r.status == 400 and "line 2" in err["error"]["message"]
            dup = b"\n".join([line("a"), line("a")])
            async with s.post(api + "/v1/async/batches", data=dup) as r:
                assert r.status == 400 and "duplicate" in (await r.json())["error"]["message"]
            assert await q.backlog() == 0  # a rejected file enqueues nothing

            good = b"\n".join([line("a"), b"", line("b"), line("c", model="missing")]) + b"\n"
            async with s.post(api + "/v1/async/batches", data=good) as r:
                batch = await r.json()
            assert batch["object"] == "batch" and batch["status"] == "in_progress"
            assert batch["request_counts"] == {"total": 3, "completed": 0, "failed": 0}
            cfg = ProcessorConfig(
                gateway_url=f"http://127.0.0.1:{gw_port}", poll_interval_s=0.02, exit_when_empty=True
            )
            async with asyncio.timeout(10):
                await Processor(q, cfg).run()
            async with s.get(api + f"/v1/async/batches/{batch['id']}") as r:
                done = await r.json()
            assert done["status"] == "completed"
            assert done["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
            async with s.get(api + f"/v1/async/batches/{batch['id']}/output") as r:
                assert r.headers["content-type"].startswith("application/jsonl")
                out = [orjson.loads(x) for x in (await r.read()).splitlines()]
            async with s.get(api + "/v1/async/batches/batch_nope") as r:
                assert r.status == 404
    finally:
        await api_runner.cleanup()
        await gw_runner.cleanup()
    by_cid = {x["custom_id"]: x for x in out}
    assert set(by_cid) == {"a", "b", "c"}
    assert by_cid["a"]["response"]["status_code"] == 200
    assert by_cid["a"]["response"]["body"] == {"choices": [{"text": "a"}]}
    assert by_cid["c"]["response"]["status_code"] == 404
