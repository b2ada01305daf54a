import orjson
import pytest

from ingate.errors import GatewayError
from ingate.request import CHAT_COMPLETIONS, COMPLETIONS, parse_request


def _body(**kw: object) -> bytes:
    return orjson.dumps(kw)


def test_completion_fields_and_headers() -> None:
    raw = _body(model="m", prompt="hello world", stream=True, max_tokens=5)
    req = parse_request(
        COMPLETIONS,
        {"x-gateway-inference-objective": "critical", "x-gateway-inference-fairness-id": "t1"},
        raw,
    )
    assert (req.model, req.prompt_text, req.stream, req.max_tokens) == ("m", "hello world", True, 5)
    assert (req.objective, req.fairness_id) == ("critical", "t1")
    assert req.request_id  # generated when absent
    assert req.body_for_upstream() is raw  # unchanged body is forwarded as-is, not re-serialised


def test_flow_from_header_else_api_key_else_default() -> None:
    raw = _body(model="m", prompt="hi")
    bearer = {"authorization": "Bearer sk-secret-1"}
    by_key = parse_request(COMPLETIONS, bearer, raw).fairness_id
    assert by_key.startswith("key-") and len(by_key) == 20 and "secret" not in by_key
    assert parse_request(COMPLETIONS, {"authorization": "Bearer sk-secret-1"}, raw).fairness_id == by_key
    assert parse_request(COMPLETIONS, {"authorization": "Bearer sk-secret-2"}, raw).fairness_id != by_key
    hdr = {**bearer, "x-gateway-inference-fairness-id": "t1"}
    assert parse_request(COMPLETIONS, hdr, raw).fairness_id == "t1"
    assert parse_request(COMPLETIONS, {"authorization": "Basic abc"}, raw).fairness_id == "default-flow"
    assert parse_request(COMPLETIONS, {}, raw).fairness_id == "default-flow"


def test_chat_messages_flattened_with_roles() -> None:
    raw = _body(
        model="m",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
    )
    req = parse_request(CHAT_COMPLETIONS, {}, raw)
    assert req.prompt_text == "<|system|>be brief\n<|user|>hi\n"


def test_model_rewrite_header_rewrites_body() -> None:
    req = parse_request(COMPLETIONS, {"x-gateway-model-name-rewrite": "m2"}, _body(model="m", prompt="x"))
    assert orjson.loads(req.body_for_upstream())["model"] == "m2"


@pytest.mark.parametrize(
    ("path", "raw", "status"),
    [
        (COMPLETIONS, b"{not json", 400),
        (COMPLETIONS, b"[]", 400),
        (COMPLETIONS, _body(prompt="x"), 400),
        (COMPLETIONS, _body(model="m", prompt=""), 400),
        (CHAT_COMPLETIONS, _body(model="m", messages=[]), 400),
        (COMPLETIONS, _body(model="m", prompt="x", n=2), 400),
        (COMPLETIONS, _body(model="m", prompt="x", max_tokens=0), 400),
        ("/v1/embeddings", _body(model="m", input="x"), 404),
    ],
)
def test_bad_input_is_a_clear_error(path: str, raw: bytes, status: int) -> None:
    with pytest.raises(GatewayError) as ei:
        parse_request(path, {}, raw)
    assert ei.value.status == status
    err = orjson.loads(ei.value.body())["error"]
    assert err["message"] and err["type"]


def test_body_limit_is_413() -> None:
    with pytest.raises(GatewayError) as ei:
        parse_request(COMPLETIONS, {}, _body(model="m", prompt="x" * 100), max_body_bytes=50)
    assert ei.value.status == 413


def test_upstream_header_names_and_their_older_aliases() -> None:
    """The x-llm-d-* names llm-d-router reads, the older x-gateway-* / x-slo-* names as aliases; the
    current name wins when a client sends both."""
    body = b'{"model": "m", "prompt": "hi"}'
    new = {
        "x-llm-d-inference-objective": "critical",
        "x-llm-d-inference-fairness-id": "tenant-a",
        "x-llm-d-model-name-rewrite": "m2",
        "x-llm-d-slo-ttft-ms": "250",
        "x-llm-d-slo-tpot-ms": "40",
    }
    old = {
        "x-gateway-inference-objective": "batch",
        "x-gateway-inference-fairness-id": "tenant-b",
        "x-gateway-model-name-rewrite": "m3",
        "x-slo-ttft-ms": "900",
        "x-slo-tpot-ms": "90",
    }
    for headers, want in (
        (new, ("critical", "tenant-a", "m2", 250.0, 40.0)),
        (old, ("batch", "tenant-b", "m3", 900.0, 90.0)),
        ({**old, **new}, ("critical", "tenant-a", "m2", 250.0, 40.0)),
    ):
        r = parse_request("/v1/completions", headers, body)
        assert (r.objective, r.fairness_id, r.target_model, r.slo_ttft_ms, r.slo_tpot_ms) == want
    with pytest.raises(GatewayError, match="x-slo-ttft-ms"):
        parse_request("/v1/completions", {"x-slo-ttft-ms": "soon"}, body)


def test_dropped_requests_say_why_in_a_header() -> None:
    e = GatewayError(429, "shed", "shed", retry_after=2)
    assert e.headers()["x-llm-d-request-dropped-reason"] == "shed" and e.headers()["retry-after"] == "2"
    assert "x-llm-d-request-dropped-reason" not in GatewayError(400, "bad", "invalid_json").headers()
