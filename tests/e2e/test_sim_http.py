"""The simulator over real HTTP on loopback, as the gateway and benchmarks see it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingate.sim import SimFleetConfig, start_fleet
from ingate.sim.profiles import get_profile
from ingate.sim.server import ReplicaConfig

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
VLLM_NAMES = {
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "vllm:lora_requests_info",
    "vllm:cache_config_info",
    "vllm:prefix_cache_queries",
    "vllm:prefix_cache_hits",
    "vllm:num_preemptions",
    "vllm:prompt_tokens",
    "vllm:generation_tokens",
    "vllm:request_success",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
}


def _cfg(**kw: object) -> SimFleetConfig:
    overrides = kw.pop("overrides", {})
    profile = str(kw.pop("profile", "h100-llama3-8b"))
    replica = ReplicaConfig(profile=get_profile(profile), model=MODEL, **kw)  # type: ignore[arg-type]
    return SimFleetConfig(replicas=1, profiles=[profile], replica=replica, overrides=overrides)  # type: ignore[arg-type]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


async def _metrics(s: aiohttp.ClientSession, addr: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    async with s.get(f"http://{addr}/metrics") as r:
        text = await r.text()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            out.setdefault(smp.name, []).append((smp.labels, smp.value))
        out.setdefault(fam.name, [])
    return out


async def _ttft(
    s: aiohttp.ClientSession, addr: str, body: dict[str, object]
) -> tuple[float, dict[str, object]]:
    t0 = time.perf_counter()
    ttft = None
    usage: dict[str, object] = {}
    async with s.post(
        f"http://{addr}/v1/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        assert r.status == 200
        async for line in r.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                usage = chunk["usage"]
    assert ttft is not None
    return ttft, usage


async def test_shared_prefix_second_request_is_faster_and_hits(session: aiohttp.ClientSession) -> None:
    async with start_fleet(_cfg(time_scale=2.0)) as fleet:
        addr = fleet.addresses[0]
        system = " ".join(f"sys{i}" for i in range(3000))
        t1, u1 = await _ttft(
            session, addr, {"model": MODEL, "prompt": system + " question one", "max_tokens": 2}
        )
        t2, u2 = await _ttft(
            session, addr, {"model": MODEL, "prompt": system + " question two", "max_tokens": 2}
        )
        assert u1["prompt_tokens_details"] == {"cached_tokens": 0}
        assert u2["prompt_tokens_details"]["cached_tokens"] >= 2992  # type: ignore[index]
        assert t2 < t1 * 0.6, (t1, t2)
        m = await _metrics(session, addr)
        assert m["vllm:prefix_cache_hits_total"][0][1] >= 2992


async def test_kv_exhaustion_queues_and_waiting_gauge_rises(session: aiohttp.ClientSession) -> None:
    cfg = _cfg(time_scale=1.0, overrides={"num_gpu_blocks": 64})  # 1024 tokens of KV
    async with start_fleet(cfg) as fleet:
        addr = fleet.addresses[0]
        bodies = [
            {"model": MODEL, "prompt": " ".join(f"p{k}-{i}" for i in range(300)), "max_tokens": 60}
            for k in range(8)
        ]
        tasks = [asyncio.create_task(session.post(f"http://{addr}/v1/completions", json=b)) for b in bodies]
        await asyncio.sleep(0.15)
        m = await _metrics(session, addr)
        assert m["vllm:num_requests_waiting"][0][1] >= 4  # ~22 blocks each: only 2 fit at once
        assert m["vllm:kv_cache_usage_perc"][0][1] > 0.5
        for resp in await asyncio.gather(*tasks):
            assert resp.status == 200
            resp.release()


async def test_request_log_records_what_the_server_did(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    log = tmp_path / "requests.jsonl"
    cfg = _cfg(time_scale=1.0, request_log=str(log), overrides={"max_num_seqs": 1})
    async with start_fleet(cfg) as fleet:
        addr = fleet.addresses[0]
        body = {"model": MODEL, "prompt": "hello there", "max_tokens": 5}
        resps = await asyncio.gather(
            *(
                session.post(f"http://{addr}/v1/completions", json=body, headers={"x-request-id": f"r{i}"})
                for i in range(3)
            )
        )
        for r in resps:
            assert r.status == 200
            r.release()
    recs = {rec["id"]: rec for rec in map(json.loads, log.read_text().splitlines())}
    assert set(recs) == {"r0", "r1", "r2"}
    for rec in recs.values():
        assert rec["generated"] == 5 and rec["priority"] == 0 and rec["preemptions"] == 0
        assert 0 <= rec["queue_s"] <= rec["ttft_s"] <= rec["e2e_s"]
        assert abs(rec["arrival"] - time.time()) < 30  # wall clock, comparable across processes
    # One sequence slot: the three ran one after another, so two of them queued at the server.
    queued = sorted(rec["queue_s"] for rec in recs.values())
    assert queued[0] < 0.02 and queued[2] > queued[1] > 0.02


async def test_lora_residency_is_limited(session: aiohttp.ClientSession) -> None:
    cfg = _cfg(time_scale=1.0, max_loras=2, lora_adapters=["a1", "a2", "a3"], profile="null",
               overrides={"step_floor": 2.0, "decode_base": 2.0})  # fmt: skip
    async with start_fleet(cfg) as fleet:
        addr = fleet.addresses[0]
        async with session.get(f"http://{addr}/v1/models") as r:
            ids = [m["id"] for m in (await r.json())["data"]]
        assert ids == [MODEL, "a1", "a2", "a3"]
        tasks = [
            asyncio.create_task(
                session.post(
                    f"http://{addr}/v1/completions", json={"model": a, "prompt": "x y", "max_tokens": 60}
                )
            )
            for a in ("a1", "a2", "a3")
        ]
        await asyncio.sleep(0.05)
        (labels, _), *_ = (await _metrics(session, addr))["vllm:lora_requests_info"]
        assert labels["max_lora"] == "2"
        assert len(labels["running_lora_adapters"].split(",")) == 2
        assert labels["waiting_lora_adapters"] == "a3"
        for resp in await asyncio.gather(*tasks):
            assert resp.status == 200
            resp.release()


async def test_streaming_chat_is_well_formed_sse(session: aiohttp.ClientSession) -> None:
    async with start_fleet(_cfg(time_scale=10.0)) as fleet:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 7,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        async with session.post(f"http://{fleet.addresses[0]}/v1/chat/completions", json=body) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            raw = (await r.read()).decode()
        events = raw.split("\n\n")
        assert events[-1] == "" and events[-2] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-2]]
        assert all(e.startswith("data: ") for e in events[:-1])
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert chunks[-1]["usage"]["completion_tokens"] == 7 == len(text.split())
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"


async def test_streaming_chat_role_chunk_comes_with_the_first_token_after_prefill(
    session: aiohttp.ClientSession,
) -> None:
    # vLLM sends the role chunk on the request's first engine output (with the first token, after
    # prefill), so a client timing its first chunk measures TTFT, not the time to accept the request.
    scale = 2.0
    async with start_fleet(_cfg(time_scale=scale)) as fleet:
        words = " ".join(f"w{i}" for i in range(4000))
        body = {"model": MODEL, "messages": [{"role": "user", "content": words}], "max_tokens": 3,
                "stream": True}  # fmt: skip
        prefill_s = get_profile("h100").step_ms(4003, 4003.0**2, 0, 0) / 1000 / scale  # ~65 ms
        arrivals: list[tuple[float, dict[str, object]]] = []
        t0 = time.perf_counter()
        async with session.post(f"http://{fleet.addresses[0]}/v1/chat/completions", json=body) as r:
            async for line in r.content:
                if line.startswith(b"data: {"):
                    arrivals.append((time.perf_counter() - t0, json.loads(line[6:])))
        (t_role, role), (t_tok, tok) = arrivals[0], arrivals[1]
        assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # type: ignore[index]
        assert tok["choices"][0]["delta"]["content"]  # type: ignore[index]
        assert t_role >= 0.8 * prefill_s, (t_role, prefill_s)
        assert t_tok - t_role < 0.01


async def test_metrics_parse_and_carry_every_vllm_name(session: aiohttp.ClientSession) -> None:
    async with start_fleet(_cfg(time_scale=10.0, max_loras=1, lora_adapters=["a1"])) as fleet:
        addr = fleet.addresses[0]
        async with session.post(
            f"http://{addr}/v1/completions", json={"model": MODEL, "prompt": "a b c", "max_tokens": 3}
        ) as r:
            assert r.status == 200
        m = await _metrics(session, addr)
        assert VLLM_NAMES <= set(m), VLLM_NAMES - set(m)
        (cfg_labels, _), *_ = m["vllm:cache_config_info"]
        assert cfg_labels["block_size"] == "16" and int(cfg_labels["num_gpu_blocks"]) > 0


async def test_bad_requests_get_openai_errors(session: aiohttp.ClientSession) -> None:
    async with start_fleet(_cfg(time_scale=10.0)) as fleet:
        url = f"http://{fleet.addresses[0]}/v1/completions"
        for body, status in (
            ({"model": "nope", "prompt": "x"}, 404),
            ({"model": MODEL}, 400),
            ({"prompt": "x"}, 400),
        ):
            async with session.post(url, json=body) as r:
                assert r.status == status
                assert (await r.json())["error"]["message"]


async def test_fault_injection_errors_and_crash(session: aiohttp.ClientSession) -> None:
    async with start_fleet(_cfg(time_scale=10.0, error_rate=1.0)) as fleet:
        async with session.post(
            f"http://{fleet.addresses[0]}/v1/completions", json={"model": MODEL, "prompt": "x"}
        ) as r:
            assert r.status == 500 and (await r.json())["error"]["code"] == "injected_error"
    async with start_fleet(_cfg(time_scale=10.0, crash_after=1)) as fleet:
        url = f"http://{fleet.addresses[0]}/v1/completions"
        async with session.post(url, json={"model": MODEL, "prompt": "x"}) as r:
            assert r.status == 200
        with pytest.raises(aiohttp.ClientError):
            async with session.post(url, json={"model": MODEL, "prompt": "x"}) as r:
                await r.read()
        await asyncio.sleep(0.1)
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.get(f"http://{fleet.addresses[0]}/health") as r:
                await r.read()


async def test_time_scale_preserves_ratios(session: aiohttp.ClientSession) -> None:
    """A 4000-token prefill vs a 500-token one: the ratio must not depend on the time scale."""
    ratios = []
    for scale in (1.0, 4.0):
        async with start_fleet(_cfg(time_scale=scale)) as fleet:
            addr = fleet.addresses[0]
            long_t, _ = await _ttft(
                session,
                addr,
                {"model": MODEL, "prompt": " ".join(f"l{i}" for i in range(4000)), "max_tokens": 1},
            )
            short_t, _ = await _ttft(
                session,
                addr,
                {"model": MODEL, "prompt": " ".join(f"s{i}" for i in range(500)), "max_tokens": 1},
            )
            ratios.append(long_t / short_t)
    # modelled: 4000 tokens ~ 122 ms vs 500 tokens ~ 17 ms -> ~7x; allow event-loop noise
    assert 3.5 < ratios[0] < 10 and 3.5 < ratios[1] < 10, ratios


def test_cli_subprocess_ready_file(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingate", "sim", "--replicas", "2", "--base-port", "0", "--time-scale", "10",
         "--profile", "h100,l4", "--kv-events-port", "0", "--kv-events-replay-port", "0",
         "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "sim did not become ready"
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert [r["profile"] for r in info["replicas"]] == ["h100-llama3-8b", "l4-llama3-8b"]
        kv = [r["kv_events"] for r in info["replicas"]]
        assert [k["topic"] for k in kv] == [f"kv@{r['address']}@{MODEL}" for r in info["replicas"]]
        assert all(k["endpoint"].startswith("tcp://127.0.0.1:") and k["replay_endpoint"] for k in kv)
        assert len({k["endpoint"] for k in kv} | {k["replay_endpoint"] for k in kv}) == 4
        import urllib.request

        for r in info["replicas"]:
            with urllib.request.urlopen(f"http://{r['address']}/health", timeout=5) as resp:
                assert resp.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_render_returns_the_token_ids_the_replica_caches_by(session: aiohttp.ClientSession) -> None:
    from ingate.sim.tokenizer import chat_prompt, token_ids, tokenize

    async with start_fleet(_cfg(time_scale=20.0)) as fleet:
        addr = fleet.addresses[0]
        text = " ".join(f"doc{i}" for i in range(100))
        async with session.post(
            f"http://{addr}/v1/completions/render", json={"model": MODEL, "prompt": text, "max_tokens": 7}
        ) as r:
            assert r.status == 200
            rendered = await r.json()
        # vLLM's shape: a list of GenerateRequest, one per prompt.
        assert isinstance(rendered, list) and len(rendered) == 1
        g = rendered[0]
        assert g["token_ids"] == token_ids(tokenize(text)) and len(g["token_ids"]) == 100
        assert g["request_id"].startswith("cmpl-") and g["model"] == MODEL
        assert g["sampling_params"]["max_tokens"] == 7
        # The ids are the ones the replica hashes: text first, then the rendered ids hit its cache.
        _, u1 = await _ttft(session, addr, {"model": MODEL, "prompt": text, "max_tokens": 1})
        _, u2 = await _ttft(session, addr, {"model": MODEL, "prompt": g["token_ids"], "max_tokens": 1})
        assert u1["prompt_tokens_details"] == {"cached_tokens": 0}
        assert u2["prompt_tokens_details"] == {"cached_tokens": 96}  # 6 full blocks of 16
        async with session.post(
            f"http://{addr}/v1/completions/render", json={"model": MODEL, "prompt": ["a b", [5, 6, 7]]}
        ) as r:
            batch = await r.json()
        assert [b["token_ids"] for b in batch] == [token_ids(["a", "b"]), [5, 6, 7]]
        assert batch[0]["request_id"] != batch[1]["request_id"]
        messages = [{"role": "user", "content": "hello there"}]
        async with session.post(
            f"http://{addr}/v1/chat/completions/render", json={"model": MODEL, "messages": messages}
        ) as r:
            chat = await r.json()
        assert chat["token_ids"] == token_ids(tokenize(chat_prompt(messages)))
        assert chat["request_id"].startswith("chatcmpl-")
        async with session.post(f"http://{addr}/tokenize", json={"model": MODEL, "prompt": text}) as r:
            tok = await r.json()
        assert tok["count"] == 100 and tok["tokens"] == g["token_ids"]
        for path, body, status in (
            ("/v1/completions/render", {"model": "nope", "prompt": "x"}, 404),
            ("/v1/completions/render", {"model": MODEL, "prompt": []}, 400),
            ("/v1/chat/completions/render", {"model": MODEL, "messages": []}, 400),
        ):
            async with session.post(f"http://{addr}{path}", json=body) as r:
                assert r.status == status and "error" in await r.json()
