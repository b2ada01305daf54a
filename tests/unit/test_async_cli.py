"""`ingate async` command line: the example Deployment's args parse; batch JSONL conversion."""

from __future__ import annotations

from pathlib import Path

import orjson
import yaml

from ingate.asyncproc.batchfile import openai_line, to_message
from ingate.asyncproc.cli import async_
from ingate.asyncproc.models import AsyncRequest, AsyncResult, validate

ROOT = Path(__file__).resolve().parents[2]


def test_example_deployment_args_are_valid_flags() -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy/examples/async-processor.yaml").read_text()))
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    spec = dep["spec"]["template"]["spec"]
    args = spec["containers"][0]["args"]
    assert args[:2] == ["async", "run"]
    ctx = async_.commands["run"].make_context("run", list(args[2:]))
    assert ctx.params["queue"].startswith("redis://") and ctx.params["grace_s"] == 60
    assert spec["terminationGracePeriodSeconds"] > ctx.params["grace_s"]


def test_openai_batch_lines_in_and_out() -> None:
    line = {"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}
    msg = validate(orjson.loads(to_message(orjson.dumps(line), ttl_s=60, now=1000.0) or b""))
    assert isinstance(msg, AsyncRequest)
    assert msg.to_json() == {
        "id": "c1",
        "created": 1000,
        "deadline": 1060,
        "payload": {"model": "m"},
        "endpoint": "/v1/chat/completions",
    }
    # llm-d-async messages and garbage pass through unchanged; blank lines are skipped.
    raw = b'{"id": "x", "payload": {}}'
    assert to_message(raw + b"\n", ttl_s=60) == raw
    assert to_message(b"garbage\n", ttl_s=60) == b"garbage"
    assert to_message(b"  \n", ttl_s=60) is None
    ok = openai_line(AsyncResult.http("c1", 200, b'{"choices": []}'))
    assert ok == {
        "id": "batch_req_c1",
        "custom_id": "c1",
        "response": {"status_code": 200, "request_id": "c1", "body": {"choices": []}},
        "error": None,
    }
    err = openai_line(AsyncResult.error("c2", "DEADLINE_EXCEEDED", "late"))
    assert err["response"] is None and err["error"] == {"code": "DEADLINE_EXCEEDED", "message": "late"}
