"""The OpenAI-compatible HTTP front of one simulated replica (aiohttp)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, TextIO

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ingate.metrics.kvevents import block_hashes, none_hash
from ingate.sim.api import (
    DEFAULT_MAX_TOKENS,
    RenderAPI,
    chat_token_ids,
    check_model,
    prompt_token_ids,
    read_json,
)
from ingate.sim.api import error as _error
from ingate.sim.engine import Engine, EngineConfig, SimRequest
from ingate.sim.kvpublisher import KVEventPublisher
from ingate.sim.metrics import SimMetrics
from ingate.sim.profiles import SimProfile
from ingate.sim.tokenizer import output_text


@dataclass(slots=True)
class ReplicaConfig:
    """Everything one replica needs; see `ingate sim --help` for the meaning of each field."""

    profile: SimProfile
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    host: str = "127.0.0.1"
    port: int = 0
    index: int = 0
    time_scale: float = 1.0
    max_loras: int = 0
    lora_adapters: list[str] = field(default_factory=list)
    lora_load_ms: float | None = None
    error_rate: float = 0.0
    extra_latency_ms: float = 0.0
    hang_rate: float = 0.0
    crash_after: int | None = None
    stream_interval_ms: float = 0.0
    seed: int = 0
    scheduling_policy: str = "fcfs"
    priority_preemption: bool = False
    kv_hash_seed: str = "0"
    """Plays vLLM's PYTHONHASHSEED: the root of every block-hash chain (`ingate.metrics.kvevents`)."""
    kv_hash_algo: str = "sha256_cbor"
    """vLLM's --prefix-caching-hash-algo: sha256 (vLLM's default), sha256_cbor, xxhash, xxhash_cbor."""
    kv_events_port: int | None = None
    """Publish vLLM KV-cache events on this ZMQ PUB port (0 = ephemeral); None = off."""
    kv_events_replay_port: int | None = None
    """ROUTER port answering replay requests (0 = ephemeral); None = no replay socket."""
    kv_events_topic: str = "kv@{host}:{port}@{model}"
    """Topic template ({host}, {port} = the HTTP port, {model}); llm-d's convention is kv@<pod>@<model>."""
    kv_events_buffer_steps: int = 10_000
    """Batches kept for replay (vLLM's buffer_steps)."""
    kv_events_layout: str = "map"
    """Event encoding: "map" (current vLLM) or "array" (earlier vLLM's array_like; llm-d reads it)."""
    request_log: str | None = None
    """Append one JSON line per finished request (timings, priority, preemptions) to this file."""


@dataclass(eq=False, slots=True)
class _Stream:
    """One streaming response, written by the replica's flusher rather than by its own task."""

    req: SimRequest
    resp: web.StreamResponse
    head: bytes
    pre: bytes
    mid_open: bytes
    mid_last: bytes
    include_usage: bool
    done: asyncio.Future[None]
    first: bytes = b""
    """Written just before the first tokens (chat: the role chunk, which vLLM sends with the first token)."""
    sent: int = 0
    queued: bool = False


class Replica:
    """One simulated model server: engine + metrics + HTTP server on its own port."""

    def __init__(self, cfg: ReplicaConfig) -> None:
        if cfg.lora_adapters and cfg.max_loras < 1:
            cfg.max_loras = 4
        self.cfg = cfg
        self.engine = Engine(
            EngineConfig(
                cfg.profile,
                cfg.time_scale,
                cfg.max_loras,
                cfg.lora_load_ms,
                cfg.scheduling_policy,
                cfg.priority_preemption,
            ),
        )
        self.metrics = SimMetrics(self.engine, cfg.model, cfg.max_loras)
        self.engine.on_finish = self.metrics.on_finish
        self._request_log: TextIO | None = None
        if cfg.request_log:
            # Line-buffered append: each record is one write, so replicas may share the file.
            self._request_log = open(cfg.request_log, "a", buffering=1)
            self._wall_offset = time.time() - time.monotonic()
            self.engine.on_finish = self._finished
        self._adapters = frozenset(cfg.lora_adapters)
        # vLLM numbers --lora-modules adapters from 1 (lora_int_id); BlockStored carries it as lora_id.
        self._lora_ids = {name: i + 1 for i, name in enumerate(dict.fromkeys(cfg.lora_adapters))}
        self._hash_root = none_hash(cfg.kv_hash_seed, cfg.kv_hash_algo)
        self.kv_publisher: KVEventPublisher | None = None
        self._rng = random.Random(cfg.seed * 1_000_003 + cfg.index)
        self.requests_seen = 0
        self.crashed = False
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = cfg.port
        self._hang = asyncio.Event()  # never set: hung requests wait on it until cancelled
        self._crash_task: asyncio.Task[None] | None = None
        # Streams with new tokens, written by one flusher task per replica: one wake-up per engine step
        # instead of one per stream per step (what lets one process host 8 replicas x 64 streams).
        self._dirty: list[_Stream] = []
        self._urgent: list[_Stream] = []
        self._flush = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/reset_prefix_cache", self._reset_prefix_cache)
        RenderAPI(self._check_model, self.cfg.profile).add_routes(app)
        return app

    async def start(self) -> None:
        self.engine.start()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name="sim-flusher")
        # handler_cancellation: a client that disconnects cancels its handler, which aborts the request
        # in the engine and frees its KV blocks, as vLLM does.
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port, backlog=1024)
        await self._site.start()
        server = self._site._server
        sockets = getattr(server, "sockets", None)  # asyncio and uvloop servers both expose .sockets
        assert sockets, "replica failed to listen"
        self.port = sockets[0].getsockname()[1]
        if self.cfg.kv_events_port is not None:
            await self._start_kv_events()

    async def _start_kv_events(self) -> None:
        cfg = self.cfg
        assert cfg.kv_events_port is not None
        topic = cfg.kv_events_topic.format(host=cfg.host, port=self.port, model=cfg.model)
        try:
            pub = KVEventPublisher(
                cfg.host,
                cfg.kv_events_port,
                cfg.kv_events_replay_port,
                topic,
                cfg.kv_events_buffer_steps,
                layout=cfg.kv_events_layout,
            )
        except BaseException:
            await self.stop()
            raise
        self.kv_publisher = pub
        pub.start()
        self.engine.enable_kv_events(pub.publish)

    def _finished(self, req: SimRequest) -> None:
        """Metrics, then one request-log line: what the server alone did to the request, so a
        benchmark can tell model-server waits from time spent in the gateway or the client."""
        self.metrics.on_finish(req)
        if self._request_log is None:
            return

        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - req.arrival, 6)

        rec = {
            "replica": self.cfg.index,
            "id": req.rid,
            "priority": req.priority,
            "arrival": round(req.arrival + self._wall_offset, 6),
            "prompt_tokens": req.prompt_len,
            "cached_tokens": req.num_cached,
            "generated": req.generated,
            "queue_s": rel(req.scheduled_at),
            "ttft_s": rel(req.first_token_at),
            "e2e_s": rel(req.finished_at),
            "preemptions": req.preemptions,
        }
        self._request_log.write(orjson.dumps(rec).decode() + "\n")

    async def stop(self) -> None:
        if self._request_log is not None:
            self._request_log.close()
            self._request_log = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.engine.stop()
        if self.kv_publisher is not None:
            await self.kv_publisher.aclose()
            self.kv_publisher = None
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None

    def _mark(self, st: _Stream) -> None:
        # First tokens and finishes go out at once (TTFT and e2e stay exact); later tokens of a running
        # stream wait for the next regular flush when --stream-interval-ms coalesces them.
        if st.sent == 0 or st.req.done:
            self._urgent.append(st)
        elif not st.queued:
            st.queued = True
            self._dirty.append(st)
        else:
            return
        self._flush.set()

    async def _flush_loop(self) -> None:
        interval = self.cfg.stream_interval_ms / 1000.0
        loop = asyncio.get_running_loop()
        next_regular = 0.0
        while True:
            now = loop.time()
            if not self._urgent and (not self._dirty or now < next_regular):
                self._flush.clear()
                if self._dirty:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(next_regular - now):
                            await self._flush.wait()
                else:
                    await self._flush.wait()
                continue
            batch, self._urgent = self._urgent, []
            if self._dirty and now >= next_regular:
                batch += self._dirty
                self._dirty = []
                next_regular = now + interval
            for st in batch:
                st.queued = False
                if st.done.done():
                    continue
                try:
                    await self._emit(st)
                except Exception as e:  # the client went away: its handler finishes and aborts the request
                    st.done.set_exception(e)

    async def _emit(self, st: _Stream) -> None:
        req = st.req
        n = req.generated - st.sent
        last = req.state == "finished"
        if n > 0 or last:
            # Tokens produced since the last write go out in one chunk (coalesced when we fall behind).
            first, st.first = st.first, b""
            await st.resp.write(
                first
                + b"data: "
                + st.pre
                + orjson.dumps(output_text(st.sent, n))
                + (st.mid_last if last else st.mid_open)
            )
            st.sent += n
        if not req.done:
            return
        if req.state != "finished":
            await st.resp.write(
                b'data: {"error":{"message":"request aborted","type":"internal_error","code":"aborted"}}\n\n'
            )
        elif st.include_usage:
            await st.resp.write(
                b"data: " + st.head + b',"choices":[],"usage":' + orjson.dumps(self._usage(req)) + b"}\n\n"
            )
        await st.resp.write(b"data: [DONE]\n\n")
        st.done.set_result(None)

    async def crash(self) -> None:
        """Die like a crashed pod: stop listening, drop every connection, forget in-flight work."""
        self.crashed = True
        await self.stop()

    # -- handlers ------------------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _reset_prefix_cache(self, request: web.Request) -> web.Response:
        # vLLM's (dev-mode) endpoint; like vLLM's block pool it refuses while blocks are in use.
        if not self.engine.reset_prefix_cache():
            return _error(409, "prefix cache is in use by running requests; retry when idle", "cache_in_use")
        return web.Response(text="")

    async def _models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        data = [
            {
                "id": self.cfg.model,
                "object": "model",
                "created": created,
                "owned_by": "ingate-sim",
                "root": self.cfg.model,
                "parent": None,
            }
        ]
        for a in sorted(self._adapters):
            data.append(
                {
                    "id": a,
                    "object": "model",
                    "created": created,
                    "owned_by": "ingate-sim",
                    "root": a,
                    "parent": self.cfg.model,
                }
            )
        return web.json_response({"object": "list", "data": data})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        cfg = self.cfg
        self.requests_seen += 1
        if cfg.crash_after is not None and self.requests_seen > cfg.crash_after:
            if self._crash_task is None:
                self._crash_task = asyncio.get_running_loop().create_task(self.crash())
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # the connection is gone; nothing to answer
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        parsed = self._parse(body, chat)
        if isinstance(parsed, web.Response):
            return parsed
        model, ids, max_tokens = parsed
        salt = body.get("cache_salt")
        if salt is not None and (not isinstance(salt, str) or not salt):
            return _error(400, "'cache_salt' must be a non-empty string if provided", "invalid_cache_salt")
        priority = body.get("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            return _error(400, "'priority' must be an integer", "invalid_priority")
        if priority and not self.engine.by_priority:
            # vLLM rejects a priority the server was not started to honour (--scheduling-policy).
            return _error(
                400, f"Got priority {priority} but Priority scheduling is not enabled.", "invalid_priority"
            )
        if cfg.extra_latency_ms > 0:
            await asyncio.sleep(cfg.extra_latency_ms / 1000.0 / cfg.time_scale)
        if cfg.error_rate > 0 and self._rng.random() < cfg.error_rate:
            return _error(500, "injected failure (--error-rate)", "injected_error")
        if cfg.hang_rate > 0 and self._rng.random() < cfg.hang_rate:
            await self._hang.wait()
        adapter = model if model != cfg.model else None
        hashes = block_hashes(ids, cfg.profile.block_size, self._hash_root, adapter, salt, cfg.kv_hash_algo)
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        lora_id = self._lora_ids.get(adapter) if adapter is not None else None
        try:
            req = self.engine.submit(rid, len(ids), hashes, max_tokens, adapter, priority, ids, lora_id)
        except ValueError as e:
            return _error(400, str(e), "context_length_exceeded")
        try:
            if body.get("stream"):
                return await self._stream(request, req, model, chat, body)
            return await self._complete(req, model, chat)
        finally:
            self.engine.abort(req)  # no-op when finished; frees KV when the client went away

    def _parse(self, body: dict[str, Any], chat: bool) -> tuple[str, list[int], int] | web.Response:
        model = self._check_model(body)
        if isinstance(model, web.Response):
            return model
        if body.get("n", 1) not in (1, None):
            return _error(400, "only n=1 is supported", "invalid_n")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_TOKENS
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return _error(400, "'max_tokens' must be a positive integer", "invalid_max_tokens")
        if chat:
            chat_ids = chat_token_ids(body)
            if isinstance(chat_ids, web.Response):
                return chat_ids
            return model, chat_ids, max_tokens
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        ids = prompt_token_ids(prompt)
        if ids is None:
            return _error(400, "'prompt' must be a non-empty string or list of token ids", "invalid_prompt")
        return model, ids, max_tokens

    def _check_model(self, body: dict[str, Any]) -> str | web.Response:
        return check_model(body, self.cfg.model, self._adapters)

    @staticmethod
    def _usage(req: SimRequest) -> dict[str, Any]:
        return {
            "prompt_tokens": req.prompt_len,
            "completion_tokens": req.generated,
            "total_tokens": req.prompt_len + req.generated,
            "prompt_tokens_details": {"cached_tokens": req.num_cached},
        }

    async def _complete(self, req: SimRequest, model: str, chat: bool) -> web.Response:
        while not req.done:
            await req.event.wait()
            req.event.clear()
        if req.state != "finished":
            return _error(500, "request aborted", "aborted")
        text = output_text(0, req.generated)
        created = int(time.time())
        if chat:
            out: dict[str, Any] = {
                "id": f"chatcmpl-{req.rid}", "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
            }  # fmt: skip
        else:
            out = {
                "id": f"cmpl-{req.rid}", "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
            }  # fmt: skip
        out["usage"] = self._usage(req)
        return web.Response(body=orjson.dumps(out), content_type="application/json")

    async def _stream(
        self, request: web.Request, req: SimRequest, model: str, chat: bool, body: dict[str, Any]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        created = int(time.time())
        # Chunks differ only in their text: build the JSON around it once.
        if chat:
            head = orjson.dumps(
                {
                    "id": f"chatcmpl-{req.rid}",
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                }
            )[:-1]
            pre = head + b',"choices":[{"index":0,"delta":{"content":'
            mid_open, mid_last = b'},"finish_reason":null}]}\n\n', b'},"finish_reason":"length"}]}\n\n'
            # vLLM sends the role chunk on the first engine output of the request, i.e. together with the
            # first generated token, after prefill (serving_chat's first_iteration), not at stream start.
            first = (
                b"data: "
                + head
                + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
            )
        else:
            head = orjson.dumps(
                {"id": f"cmpl-{req.rid}", "object": "text_completion", "created": created, "model": model}
            )[:-1]
            pre = head + b',"choices":[{"index":0,"text":'
            mid_open, mid_last = (
                b',"logprobs":null,"finish_reason":null}]}\n\n',
                b',"logprobs":null,"finish_reason":"length"}]}\n\n',
            )
            first = b""
        st = _Stream(
            req,
            resp,
            head,
            pre,
            mid_open,
            mid_last,
            include_usage,
            asyncio.get_running_loop().create_future(),
            first,
        )
        req.notify = lambda: self._mark(st)
        self._mark(st)  # tokens may already exist
        await st.done
        await resp.write_eof()
        return resp
