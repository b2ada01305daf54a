"""Multi-tenant workloads in the bench harness: validation, per-tenant headers, summaries, isolation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import web
from loopback_http import completions_server, stream_completion
from pydantic import ValidationError

from ingate.bench.loadgen import make_session
from ingate.bench.runner import _run_tenants
from ingate.bench.stats import isolation, tenant_summaries
from ingate.bench.systems import ingate_config
from ingate.bench.tables import tenant_markdown
from ingate.bench.workload import Workload
from ingate.config import parse_config

SEEN: list[dict[str, str]] = []


async def _completions(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    SEEN.append(dict(request.headers))
    if request.headers.get("x-gateway-inference-objective") == "sheddable":
        return web.json_response({"error": {"message": "shed", "code": "shed"}}, status=429)
    usage: dict[str, object] = {"prompt_tokens": 3, "completion_tokens": int(body["max_tokens"])}
    return await stream_completion(request, 1, usage, 0.001)


@pytest.fixture
async def server() -> AsyncIterator[str]:
    async with completions_server(_completions) as url:
        yield url


def _wl(**kw: Any) -> Workload:
    base: dict[str, Any] = {
        "name": "t",
        "model": "m",
        "data": {"type": "random", "input": {"mean": 4}, "output": {"mean": 2}},
        "load": {"rates": [20, 60], "duration_s": 0.5},
        "gateway": {"objectives": [{"name": "critical", "priority": 10}]},
        "tenants": [
            {"name": "crit", "rates": [20, 20], "headers": {"x-gateway-inference-objective": "critical"}},
            {"name": "std", "rates": [0, 20], "headers": {"x-gateway-inference-fairness-id": "b"}},
            {"name": "shed", "rates": [0, 20], "headers": {"x-gateway-inference-objective": "sheddable"}},
        ],
    }
    base.update(kw)
    return Workload.model_validate(base)


def test_tenant_rates_must_match_stages_and_sum_to_the_stage_rate() -> None:
    wl = _wl()
    assert [t.name for t in wl.tenants] == ["crit", "std", "shed"]
    with pytest.raises(ValidationError, match=r"one rate per load\.rates"):
        _wl(tenants=[{"name": "a", "rates": [20]}])
    with pytest.raises(ValidationError, match=r"load\.rates\[1\]"):
        _wl(tenants=[{"name": "a", "rates": [20, 50]}])
    with pytest.raises(ValidationError, match="set by the harness"):
        _wl(gateway={"listen": {"port": 1}})
    with pytest.raises(ValidationError, match=r"pool\.endpoints are set by the harness"):
        _wl(gateway={"pool": {"endpoints": [{"address": "127.0.0.1:2"}]}})
    cfg = ingate_config(wl, ["127.0.0.1:1"], 9)
    assert cfg["objectives"] == [{"name": "critical", "priority": 10}]
    assert cfg["listen"] == {"host": "127.0.0.1", "port": 9}
    # Pool settings merge into the harness's pool; the endpoints stay the fleet's.
    cfg = ingate_config(_wl(gateway={"pool": {"modelServerPriority": "vllm"}}), ["127.0.0.1:1"], 9)
    assert cfg["pool"] == {
        "name": "bench",
        "engine": "vllm",
        "endpoints": [{"address": "127.0.0.1:1"}],
        "modelServerPriority": "vllm",
    }
    # `ingate:PROFILE` sets the default profile and keeps the workload's own profiles, so PROFILE may
    # be one of them (it used to replace the whole scheduler section).
    mine = {"scorers": [{"type": "least-in-flight"}], "picker": {"type": "max-score"}}
    wl = _wl(gateway={"scheduler": {"fallbacks": 1, "profiles": {"mine": mine}}})
    cfg = ingate_config(wl, ["127.0.0.1:1"], 9, profile="mine")
    assert cfg["scheduler"] == {"fallbacks": 1, "profiles": {"mine": mine}, "defaultProfile": "mine"}
    assert parse_config(cfg).scheduler.default_profile == "mine"
    assert wl.gateway["scheduler"] == {"fallbacks": 1, "profiles": {"mine": mine}}  # not mutated


def test_ingate_profile_from_a_file_joins_the_workloads_profiles(tmp_path: Path) -> None:
    # `ingate:PATH.yaml`: the profile files the scheduling replay takes work as bench systems too.
    theirs = {"scorers": [{"type": "prefix-cache", "parameters": {"adaptive": False}}]}
    f = tmp_path / "fixed.yaml"
    f.write_text(yaml.safe_dump({"scheduler": {"defaultProfile": "fixed", "profiles": {"fixed": theirs}}}))
    mine = {"scorers": [{"type": "least-in-flight"}], "picker": {"type": "max-score"}}
    wl = _wl(gateway={"scheduler": {"profiles": {"mine": mine}}})
    cfg = ingate_config(wl, ["127.0.0.1:1"], 9, profile=str(f))
    assert cfg["scheduler"] == {"profiles": {"mine": mine, "fixed": theirs}, "defaultProfile": "fixed"}
    parsed = parse_config(cfg).scheduler
    assert parsed.default_profile == "fixed" and {"mine", "fixed", "default"} <= set(parsed.profiles)
    f.write_text(yaml.safe_dump({"scheduler": {"profiles": {"fixed": theirs}}}))
    with pytest.raises(ValueError, match="defaultProfile"):
        ingate_config(wl, ["127.0.0.1:1"], 9, profile=str(f))


async def test_tenants_run_side_by_side_with_their_own_headers(server: str) -> None:
    wl = _wl()
    SEEN.clear()
    async with make_session(64) as s:
        alone = await _run_tenants(s, server, wl, 0, lambda _: None)
        loaded = await _run_tenants(s, server, wl, 1, lambda _: None)
    assert {r.tenant for r in alone.records} == {"crit"}
    assert {r.tenant for r in loaded.records} == {"crit", "std", "shed"}
    # The same arrival pattern for "crit" alone and under load (same rate): the same number of requests.
    assert sum(r.tenant == "crit" for r in loaded.records) == len(alone.records)
    assert all(h.get("x-gateway-inference-objective") == "critical" for h in SEEN[: len(alone.records)])
    assert any(h.get("x-gateway-inference-fairness-id") == "b" for h in SEEN)
    summ = tenant_summaries([r.to_json() for r in loaded.records], 0.5, {"ttft_s": 2.0})
    assert summ["shed"]["shed"] == summ["shed"]["sent"] > 0 and summ["shed"]["ok"] == 0
    assert summ["crit"]["ok"] == summ["crit"]["sent"] and summ["crit"]["served_tokens"] > 0
    # The results-file shape: isolation finds the stage where "crit" ran alone at the same rate.
    stages = [
        {"rate": st.rate, "tenants": tenant_summaries([r.to_json() for r in st.records], 0.5, {"ttft_s": 2})}
        for st in (alone, loaded)
    ]
    res = {"workload": wl.model_dump(), "systems": [{"name": "x", "stages": stages}]}
    iso = isolation(res)
    assert [(i["tenant"], i["tenant_rate"]) for i in iso] == [("crit", 20.0)]
    r = iso[0]["ratio"]["e2e_p50"]
    assert r == pytest.approx(
        stages[1]["tenants"]["crit"]["e2e_p50"] / stages[0]["tenants"]["crit"]["e2e_p50"]
    )
    assert "| x | crit |" in tenant_markdown([res])
