"""Request parsing and error bodies of a simulated replica, and vLLM's render / tokenize routes.

The render routes are vLLM's renderer API (real vLLM serves them with `--enable-scale-out`): they turn
a completion or chat request into the token ids the server would run, without running it. The ids are
the ones the replica hashes its KV blocks by, so a router grouping requests by them (vllm-router's
`cache_aware`, a precise prefix scorer) sees the replica's prefixes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from ingate.sim.profiles import SimProfile
from ingate.sim.tokenizer import chat_prompt, token_ids, tokenize

DEFAULT_MAX_TOKENS = 16
_KINDS = {400: "invalid_request_error", 404: "not_found_error", 409: "invalid_request_error"}


def error(status: int, message: str, code: str) -> web.Response:
    """An OpenAI-style error response."""
    body = orjson.dumps(
        {"error": {"message": message, "type": _KINDS.get(status, "internal_error"), "code": code}}
    )
    return web.Response(status=status, body=body, content_type="application/json")


async def read_json(request: web.Request) -> dict[str, Any] | web.Response:
    """The request's JSON object, or the 400 to answer."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return error(400, "request body is not valid JSON", "invalid_json")
    if not isinstance(body, dict):
        return error(400, "request body must be a JSON object", "invalid_json")
    return body


def check_model(body: dict[str, Any], base_model: str, adapters: frozenset[str]) -> str | web.Response:
    """The requested model (the base model or a served adapter), or the 400/404 to answer."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return error(400, "'model' is required", "missing_model")
    if model != base_model and model not in adapters:
        return error(404, f"The model `{model}` does not exist.", "model_not_found")
    return model


def prompt_token_ids(prompt: object) -> list[int] | None:
    """Token ids of one completion prompt (text, or token ids as given); None if it is not one."""
    if isinstance(prompt, str):
        ids = token_ids(tokenize(prompt))
        return ids or None
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    ):
        return prompt
    return None


def chat_token_ids(body: dict[str, Any]) -> list[int] | web.Response:
    """Token ids of a chat request's rendered messages, or the 400 to answer."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return error(400, "'messages' must be a non-empty list of objects", "invalid_messages")
    return token_ids(tokenize(chat_prompt(messages)))


def generate_request(rid: str, ids: list[int], model: str, body: dict[str, Any]) -> dict[str, Any]:
    """One vLLM `GenerateRequest` as the render routes return it (what /inference/v1/generate takes)."""
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    return {
        "request_id": rid,
        "token_ids": ids,
        "features": None,
        # The sampling fields the simulator honours or accepts (vLLM sends its whole SamplingParams).
        "sampling_params": {
            "n": 1,
            "temperature": body.get("temperature", 1.0),
            "top_p": body.get("top_p", 1.0),
            "max_tokens": DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
            "ignore_eos": bool(body.get("ignore_eos", False)),
        },
        "model": model,
        "stream": bool(body.get("stream", False)),
        "stream_options": body.get("stream_options"),
        "cache_salt": body.get("cache_salt"),
        "priority": body.get("priority", 0),
        "kv_transfer_params": body.get("kv_transfer_params"),
    }


class RenderAPI:
    """`POST /v1/completions/render`, `/v1/chat/completions/render` and `/tokenize` of one replica."""

    def __init__(self, check: Callable[[dict[str, Any]], str | web.Response], profile: SimProfile) -> None:
        self._check = check
        self._profile = profile

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/completions/render", self.render_completions)
        app.router.add_post("/v1/chat/completions/render", self.render_chat)
        app.router.add_post("/tokenize", self.tokenize)

    async def _request(self, request: web.Request) -> tuple[str, dict[str, Any]] | web.Response:
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        model = self._check(body)
        if isinstance(model, web.Response):
            return model
        return model, body

    async def render_completions(self, request: web.Request) -> web.Response:
        # vLLM answers a list of GenerateRequest, one per prompt of the (possibly batched) request.
        got = await self._request(request)
        if isinstance(got, web.Response):
            return got
        model, body = got
        prompt = body.get("prompt")
        batch = (
            prompt
            if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt)
            else [prompt]
        )
        rid = f"cmpl-{uuid.uuid4().hex}"
        out = []
        for i, p in enumerate(batch):
            ids = prompt_token_ids(p)
            if ids is None:
                return error(
                    400,
                    "'prompt' must be a non-empty string, a list of token ids, or a list of those",
                    "invalid_prompt",
                )
            out.append(generate_request(f"{rid}-{i}" if len(batch) > 1 else rid, ids, model, body))
        return web.Response(body=orjson.dumps(out), content_type="application/json")

    async def render_chat(self, request: web.Request) -> web.Response:
        got = await self._request(request)
        if isinstance(got, web.Response):
            return got
        model, body = got
        ids = chat_token_ids(body)
        if isinstance(ids, web.Response):
            return ids
        out = generate_request(f"chatcmpl-{uuid.uuid4().hex}", ids, model, body)
        return web.Response(body=orjson.dumps(out), content_type="application/json")

    async def tokenize(self, request: web.Request) -> web.Response:
        # vLLM's /tokenize: a completion `prompt` or chat `messages` -> count, token ids, max_model_len.
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        if body.get("model") is not None:
            model = self._check(body)
            if isinstance(model, web.Response):
                return model
        if "messages" in body:
            ids = chat_token_ids(body)
            if isinstance(ids, web.Response):
                return ids
        else:
            maybe = prompt_token_ids(body.get("prompt"))
            if maybe is None:
                return error(
                    400, "'prompt' must be a non-empty string or list of token ids", "invalid_prompt"
                )
            ids = maybe
        p = self._profile
        # The longest request the simulator admits: its whole KV cache (it has no separate context limit).
        return web.json_response(
            {"count": len(ids), "max_model_len": p.num_gpu_blocks * p.block_size, "tokens": ids}
        )
