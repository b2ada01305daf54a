"""OpenAI request parsing: the one place a request body is decoded.

The body is parsed exactly once per request (upstream pickers parse and re-marshal it several times, which
is their known weak spot on large prompts). Everything the gateway needs later (model, text for prefix
hashing, stream flag, adapter, headers that pick an objective or a flow) is lifted into `InferenceRequest`.
The raw bytes are kept so an unchanged body is forwarded without re-serialisation.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from ingate.errors import GatewayError

# Header names the ecosystem uses (DESIGN.md, "Protocol facts"): upstream's current `x-llm-d-*` names,
# each with the older name it replaced as an alias (the current name wins when both are sent).
HDR_OBJECTIVE = "x-llm-d-inference-objective"
HDR_FAIRNESS_ID = "x-llm-d-inference-fairness-id"
HDR_MODEL_REWRITE = "x-llm-d-model-name-rewrite"
HDR_SLO_TTFT = "x-llm-d-slo-ttft-ms"
HDR_SLO_TPOT = "x-llm-d-slo-tpot-ms"
HDR_OBJECTIVE_OLD = "x-gateway-inference-objective"
HDR_FAIRNESS_ID_OLD = "x-gateway-inference-fairness-id"
HDR_MODEL_REWRITE_OLD = "x-gateway-model-name-rewrite"
HDR_SLO_TTFT_OLD = "x-slo-ttft-ms"
HDR_SLO_TPOT_OLD = "x-slo-tpot-ms"
HDR_TIMEOUT = "x-gateway-request-timeout-ms"
"""The request's own deadline, in ms from arrival: flow control answers 503 if it is still queued then."""
HDR_REQUEST_ID = "x-request-id"
HDR_DESTINATION = "x-gateway-destination-endpoint"
HDR_DESTINATION_SERVED = "x-gateway-destination-endpoint-served"
DEFAULT_FLOW = "default-flow"

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
INFERENCE_PATHS = frozenset({COMPLETIONS, CHAT_COMPLETIONS})


@dataclass(slots=True)
class InferenceRequest:
    """A parsed inference request; mutable only where the director resolves it (model, objective)."""

    request_id: str
    path: str
    model: str
    """Model name as the client sent it."""
    prompt_text: str
    """Text the prefix-affinity plugins hash (chat messages flattened with their roles)."""
    stream: bool
    max_tokens: int | None
    body: dict[str, Any]
    raw_body: bytes
    headers: Mapping[str, str]
    target_model: str = ""
    """Model sent to the model server after rewrite/traffic split (equals `model` when none applies)."""
    adapter: str | None = None
    """LoRA adapter name when `target_model` is an adapter of the pool's base model."""
    objective: str | None = None
    priority: int = 0
    fairness_id: str = DEFAULT_FLOW
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    timeout_s: float | None = None
    """From header x-gateway-request-timeout-ms: how long the client will wait (None = no deadline)."""
    arrival: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_bytes(self) -> int:
        return len(self.prompt_text)

    @property
    def estimated_prompt_tokens(self) -> int:
        """Rough token count (4 characters per token), used where no tokenizer is at hand."""
        return max(1, len(self.prompt_text) // 4)

    def body_for_upstream(self, server_priority: int | None = None) -> bytes:
        """The body to send upstream: the original bytes unless the model was rewritten or the model
        server's ``priority`` field must be set (``server_priority``, None = leave the body's own)."""
        set_priority = server_priority is not None and self.body.get("priority", 0) != server_priority
        if self.target_model == self.model and not set_priority:
            return self.raw_body
        body = dict(self.body)
        body["model"] = self.target_model
        if set_priority:
            body["priority"] = server_priority
        return orjson.dumps(body)


def _flatten_content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return ""


def _prompt_text(path: str, body: dict[str, Any]) -> str:
    if path == CHAT_COMPLETIONS:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise GatewayError(400, "'messages' must be a non-empty list", "invalid_messages")
        chunks = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise GatewayError(400, "each message needs a string 'role'", "invalid_messages")
            # Role markers keep "user: X" and "system: X" apart in the prefix index.
            chunks.append(f"<|{m['role']}|>{_flatten_content(m.get('content'))}\n")
        return "".join(chunks)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise GatewayError(400, "'prompt' must not be empty", "invalid_prompt")
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise GatewayError(400, "only one prompt per request is supported (n=1)", "invalid_prompt")
            if not prompt[0]:
                raise GatewayError(400, "'prompt' must not be empty", "invalid_prompt")
            return str(prompt[0])
        if all(isinstance(p, int) for p in prompt):  # token ids: hash their decimal form
            return " ".join(map(str, prompt))
    raise GatewayError(400, "'prompt' must be a non-empty string or list of token ids", "invalid_prompt")


def parse_request(
    path: str,
    headers: Mapping[str, str],
    raw_body: bytes,
    *,
    max_body_bytes: int | None = None,
    now: float = 0.0,
) -> InferenceRequest:
    """Parse an OpenAI completions/chat request; raise `GatewayError` (400/413) on bad input.

    `headers` must have lower-case names (aiohttp's and Envoy's are).
    """
    if max_body_bytes is not None and len(raw_body) > max_body_bytes:
        raise GatewayError(
            413, f"request body of {len(raw_body)} bytes exceeds the limit of {max_body_bytes}", "too_large"
        )
    path = path.split("?", 1)[0]
    if path not in INFERENCE_PATHS:
        raise GatewayError(404, f"unknown path {path!r}", "unknown_path")
    try:
        body = orjson.loads(raw_body)
    except orjson.JSONDecodeError as e:
        raise GatewayError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "request body must be a JSON object", "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(400, "'model' is required", "missing_model")
    n = body.get("n", 1)
    if n not in (1, None):
        raise GatewayError(400, "only n=1 is supported", "invalid_n")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise GatewayError(400, "'max_tokens' must be a positive integer", "invalid_max_tokens")
    text = _prompt_text(path, body)
    rid = headers.get(HDR_REQUEST_ID) or uuid.uuid4().hex
    req = InferenceRequest(
        request_id=rid,
        path=path,
        model=model,
        prompt_text=text,
        stream=bool(body.get("stream", False)),
        max_tokens=max_tokens,
        body=body,
        raw_body=raw_body,
        headers=headers,
        target_model=headers.get(HDR_MODEL_REWRITE) or headers.get(HDR_MODEL_REWRITE_OLD) or model,
        objective=headers.get(HDR_OBJECTIVE) or headers.get(HDR_OBJECTIVE_OLD) or None,
        fairness_id=headers.get(HDR_FAIRNESS_ID)
        or headers.get(HDR_FAIRNESS_ID_OLD)
        or api_key_flow(headers)
        or DEFAULT_FLOW,
        slo_ttft_ms=_float_header(headers, HDR_SLO_TTFT, HDR_SLO_TTFT_OLD),
        slo_tpot_ms=_float_header(headers, HDR_SLO_TPOT, HDR_SLO_TPOT_OLD),
        arrival=now,
    )
    timeout_ms = _float_header(headers, HDR_TIMEOUT)
    if timeout_ms is not None:
        req.timeout_s = timeout_ms / 1000.0
    return req


def api_key_flow(headers: Mapping[str, str]) -> str | None:
    """The flow of a request without a fairness-id header: its API key (`authorization: Bearer KEY`),
    as `key-` + the first 16 hex digits of the key's SHA-256, so the key never reaches metric labels."""
    auth = headers.get("authorization")
    if not auth:
        return None
    scheme, _, key = auth.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return None
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _float_header(headers: Mapping[str, str], name: str, alias: str | None = None) -> float | None:
    v = headers.get(name)
    if v is None and alias is not None:
        v = headers.get(alias)
        name = alias
    if v is None:
        return None
    try:
        f = float(v)
    except ValueError:
        raise GatewayError(400, f"header {name} must be a number of milliseconds", "invalid_header") from None
    if not f > 0 or f == math.inf:  # also rejects nan
        raise GatewayError(400, f"header {name} must be a positive, finite number", "invalid_header")
    return f
