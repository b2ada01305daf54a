"""deploy/grafana/ingate.json: every PromQL query parses and names only metrics a running ingate
gateway exports (read from a real Gateway's Prometheus registry, not from a list kept by hand), and
the panels the docs promise are there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import promql_parser
import pytest

from ingate.config import parse_config
from ingate.gateway import Gateway

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "ingate.json"
# Grafana's own variables, replaced by what Grafana substitutes before Prometheus sees the query.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "1h"}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    out = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            # label_values(metric, label) is Grafana syntax, not PromQL: check its metric.
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            assert q.startswith("label_values(") and q.endswith(")")
            out.append((f"variable {var['name']}", q[len("label_values(") : -1].split(",")[0].strip()))
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names selected anywhere in a PromQL expression (parsed, not pattern-matched)."""
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)
            return
        for attr in ("expr", "lhs", "rhs", "vector_selector", "param"):
            child = getattr(node, attr, None)
            if child is not None:
                walk(child)
        for arg in getattr(node, "args", None) or []:
            walk(arg)

    walk(promql_parser.parse(expr))
    return names


def exported_names() -> set[str]:
    """Series names the gateway's registry can expose, from each family's name and type."""
    cfg = parse_config(
        {
            "pool": {"name": "p", "endpoints": [{"address": "127.0.0.1:9"}]},
            "flowControl": {"enabled": True},
        }
    )
    gw = Gateway(cfg)
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count"),
        "gauge": ("",),
        "info": ("_info",),
    }
    out: set[str] = set()
    for fam in gw.telemetry.registry.collect():
        out |= {fam.name + s for s in suffixes.get(fam.type, ("",))}
    return out


EXPORTED = exported_names()


def test_metric_name_extraction_is_real() -> None:
    assert metric_names(
        'histogram_quantile(0.9, sum by (le) (rate(a_bucket{x=~"$pool"}[$__rate_interval])))'
    ) == {"a_bucket"}
    assert metric_names("sum(rate(a_total[1m])) / clamp_min(sum(rate(b_total[1m])), 1e-9)") == {
        "a_total",
        "b_total",
    }
    with pytest.raises(Exception):  # noqa: B017 - the parser's error type is not public API
        metric_names("sum(rate(a_total[1m])")
    # The registry reading finds the core series (and would miss a typo).
    assert "inference_objective_request_total" in EXPORTED
    assert "inference_extension_flow_control_queue_size" in EXPORTED
    assert "inference_objective_request_totals" not in EXPORTED


@pytest.mark.parametrize(("where", "expr"), queries(dashboard()))
def test_every_query_names_an_exported_metric(where: str, expr: str) -> None:
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    assert names <= EXPORTED, f"{where}: {sorted(names - EXPORTED)} not exported by ingate"


def test_the_panels_the_docs_promise() -> None:
    dash = dashboard()
    used = set().union(*(metric_names(e) for _, e in queries(dash)))
    for metric in (
        "inference_objective_request_total",
        "inference_objective_request_error_total",
        "inference_objective_request_duration_seconds_bucket",
        "ingate_time_to_first_token_seconds_bucket",
        "inference_pool_average_kv_cache_utilization",
        "inference_pool_average_queue_size",
        "inference_pool_ready_pods",
        "inference_extension_scheduler_e2e_duration_seconds_bucket",
        "inference_extension_flow_control_queue_size",
        "ingate_endpoint_in_flight",
        "ingate_endpoint_latency_prediction_error_ratio_quantile",
    ):
        assert metric in used, metric
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        assert p["datasource"]["uid"] == "${datasource}"
