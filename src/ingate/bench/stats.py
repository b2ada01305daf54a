"""Statistics of benchmark results: per-stage summaries (percentiles, throughput, goodput), the
sustainable rate, the knee comparison against round robin, and per-tenant isolation.

Definitions used everywhere (the live report, the scheduler replay, the headline tables):

- **goodput**: requests that met the SLO, *counted* (`good`), and per offered second (`goodput_rps =
  good / offered_s`, `offered_s` = the stage's duration times the request streams pooled in it: the
  time load was offered, never a span that includes draining the queue afterwards);
- **percentiles**: `percentile(values, q)`, the nearest rank `round(q * (n - 1))` of the sorted values.
"""

from __future__ import annotations

from typing import Any

RESULTS_FORMAT = "ingate-bench/1"
"""The `format` of a results file written by `ingate bench run` (what `resummarize` and its readers take)."""


def percentile(vals: list[float], q: float) -> float | None:
    """The nearest-rank q-quantile of `vals` (None when empty): the one definition of ingate's reports."""
    if not vals:
        return None
    s = sorted(vals)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summarize(records: list[dict[str, Any]], duration_s: float, slo: dict[str, Any]) -> dict[str, Any]:
    """Per-stage summary of request records (dicts as written to the results file)."""
    ok = [r for r in records if r["status"] == 200 and not r["error"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    e2e = [r["e2e"] for r in ok if r["e2e"] is not None]
    itl = [r["itl_mean"] for r in ok if r["itl_mean"] is not None]
    e2e_bound = slo.get("e2e_s")

    def good(r: dict[str, Any]) -> bool:
        if r["ttft"] is None or r["ttft"] > slo["ttft_s"]:
            return False
        return e2e_bound is None or (r["e2e"] is not None and r["e2e"] <= e2e_bound)

    # Throughput over the span from the first send to the last completion, summed over the request
    # streams pooled here (`load.streams`; send times are relative to their own stream's stage start).
    ends: dict[int, float] = {r.get("stream", 0): duration_s for r in records}
    for r in ok:
        k = r.get("stream", 0)
        end = r["send"] + (r["e2e"] or 0.0)
        if end > ends[k]:
            ends[k] = end
    span = max(sum(ends.values()) if ends else duration_s, 1e-9)
    streams = max(1, len(ends))
    offered_s = max(duration_s * streams, 1e-9)
    n_good = sum(1 for r in ok if good(r))
    out: dict[str, Any] = {
        "streams": streams,
        "sent": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "good": n_good,
        "offered_s": duration_s * streams,
        # Achieved throughput: completions over the span from the first send to the last completion.
        "throughput_rps": len(ok) / span,
        "output_tok_s": sum(r["completion_tokens"] for r in ok) / span,
        "goodput_rps": n_good / offered_s,
        "slo_attainment": (n_good / len(records)) if records else 0.0,
    }
    # Share of prompt tokens served from the replicas' prefix caches (how well routing kept prefixes
    # where they are cached); None when the servers do not report cached tokens.
    reported = [r for r in ok if r.get("cached_tokens") is not None]
    prompt = sum(r["prompt_tokens"] for r in reported)
    out["cached_token_share"] = (
        sum(r["cached_tokens"] for r in reported) / prompt if reported and prompt else None
    )
    for name, vals in (("ttft", ttft), ("e2e", e2e), ("itl", itl)):
        for q in (0.5, 0.9, 0.99):
            out[f"{name}_p{round(q * 100)}"] = percentile(vals, q)
    return out


def resummarize(result: dict[str, Any]) -> dict[str, Any]:
    """Recompute every stage's summary from its stored records with the current definitions (so
    tables rendered from older result files agree with new ones); returns `result`, updated."""
    slo = result["workload"]["slo"]
    for sysres in result.get("systems", []):
        for st in sysres.get("stages") or []:
            if st.get("records") is not None:
                st["summary"] = summarize(st["records"], st["duration_s"], slo)
        if sysres.get("stages"):
            sysres["max_sustainable_rate"] = max_sustainable_rate(sysres["stages"])
    return result


def max_sustainable_rate(stages: list[dict[str, Any]], slo_attainment: float = 0.9) -> float | None:
    """Highest offered rate at which at least `slo_attainment` of requests met the SLO."""
    best = None
    for st in stages:
        if st.get("rate") is not None and st["summary"]["slo_attainment"] >= slo_attainment:
            best = max(best or 0.0, st["rate"])
    return best


def headline(
    result: dict[str, Any], system: str = "ingate", baseline: str = "round-robin"
) -> dict[str, Any] | None:
    """Compare `system` with `baseline` at the load nearest the baseline's saturation: the lowest offered
    rate at which the baseline met the SLO for fewer than 90% of requests (else the highest rate run).
    Returns p99 TTFT reduction and goodput gain, or None if either system has no stages."""
    by_name = {s["name"]: s for s in result["systems"] if s.get("stages")}
    if system not in by_name or baseline not in by_name:
        return None
    base_stages = [st for st in by_name[baseline]["stages"] if st["rate"] is not None]
    if not base_stages:
        return None
    sat = next((st for st in base_stages if st["summary"]["slo_attainment"] < 0.9), base_stages[-1])
    mine = next((st for st in by_name[system]["stages"] if st["rate"] == sat["rate"]), None)
    if mine is None:
        return None
    b, m = sat["summary"], mine["summary"]
    out: dict[str, Any] = {"rate": sat["rate"], "baseline": baseline, "system": system}
    out["ttft_p99"] = (m["ttft_p99"], b["ttft_p99"])
    out["goodput"] = (m["goodput_rps"], b["goodput_rps"])
    if m["ttft_p99"] is not None and b["ttft_p99"]:
        out["ttft_p99_reduction"] = 1 - m["ttft_p99"] / b["ttft_p99"]
    if b["goodput_rps"] > 0:
        out["goodput_gain"] = m["goodput_rps"] / b["goodput_rps"] - 1
    return out


SUBJECTS = ("ingate", "ingate-envoy")  # ingate with the built-in proxy and with Envoy + ext_proc

TARGET_TTFT_P99_REDUCTION = 0.60

TARGET_GOODPUT_GAIN = 0.40


def knee_rate(res: dict[str, Any]) -> float | None:
    """The offered rate where the comparison is made: round robin's saturation point (see `headline`)."""
    h = headline(res, "ingate", "round-robin")
    if h is None:
        for subject in SUBJECTS[1:]:
            h = headline(res, subject, "round-robin")
            if h is not None:
                break
    return None if h is None else float(h["rate"])


def good_count(res: dict[str, Any], system: str, rate: float) -> int:
    """Requests of `system`'s stage at `rate` that met the SLO."""
    sysres = next(s for s in res["systems"] if s["name"] == system)
    st = next(st for st in sysres["stages"] if st["rate"] == rate)
    s = st["summary"]
    return round(s["slo_attainment"] * s.get("sent", 0))


def best_peer(res: dict[str, Any], peers: list[dict[str, Any]], rate: float) -> str | None:
    """The peer with the most requests within the SLO at `rate` (ties: lower p99 TTFT)."""
    best: tuple[float, float, str] | None = None
    for p in peers:
        st = next((st for st in p["stages"] if st["rate"] == rate), None)
        if st is None:
            continue
        s = st["summary"]
        good = good_count(res, p["name"], rate)
        key = (good, -(s["ttft_p99"] if s["ttft_p99"] is not None else float("inf")), p["name"])
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]


def at_rate(res: dict[str, Any], system: str, other: str, rate: float) -> dict[str, Any] | None:
    by_name = {s["name"]: s for s in res["systems"] if s.get("stages")}
    if system not in by_name or other not in by_name:
        return None
    a = next((st for st in by_name[system]["stages"] if st["rate"] == rate), None)
    b = next((st for st in by_name[other]["stages"] if st["rate"] == rate), None)
    if a is None or b is None:
        return None
    m, o = a["summary"], b["summary"]
    out: dict[str, Any] = {"rate": rate, "ttft_p99": (m["ttft_p99"], o["ttft_p99"])}
    out["goodput"] = (m["goodput_rps"], o["goodput_rps"])
    if m["ttft_p99"] is not None and o["ttft_p99"]:
        out["ttft_p99_reduction"] = 1 - m["ttft_p99"] / o["ttft_p99"]
    if o["goodput_rps"] > 0:
        out["goodput_gain"] = m["goodput_rps"] / o["goodput_rps"] - 1
    return out


def tenant_summaries(
    records: list[dict[str, Any]], duration_s: float, slo: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """`summarize` per tenant, plus status counts, `shed` (429s) and served tokens of successful requests."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault(r.get("tenant", ""), []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for name, recs in by.items():
        s = summarize(recs, duration_s, slo)
        status: dict[str, int] = {}
        for r in recs:
            k = str(r["status"]) if r["status"] else "failed"
            status[k] = status.get(k, 0) + 1
        s["status"] = status
        s["shed"] = status.get("429", 0)
        s["served_tokens"] = sum(
            r["prompt_tokens"] + r["completion_tokens"] for r in recs if r["status"] == 200 and not r["error"]
        )
        out[name] = s
    return out


def tenant_rate(res: dict[str, Any], tenant: str, stage: int) -> float:
    for t in res["workload"].get("tenants") or []:
        if t["name"] == tenant:
            return float(t["rates"][stage])
    return 0.0


def isolation(res: dict[str, Any]) -> list[dict[str, Any]]:
    """For each tenant that also ran alone at the same rate: its latency loaded vs alone (ratios)."""
    out = []
    keys = ("ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99")
    for sysres in res["systems"]:
        stages = sysres.get("stages") or []
        for i, st in enumerate(stages):
            ten = st.get("tenants") or {}
            if len(ten) < 2:
                continue
            for name, loaded in ten.items():
                rate = tenant_rate(res, name, i)
                alone_i = next(
                    (
                        j
                        for j, o in enumerate(stages)
                        if set(o.get("tenants") or {}) == {name} and tenant_rate(res, name, j) == rate
                    ),
                    None,
                )
                if alone_i is None:
                    continue
                alone = stages[alone_i]["tenants"][name]
                ratios = {
                    k: (loaded[k] / alone[k] if loaded[k] is not None and alone[k] else None) for k in keys
                }
                out.append(
                    {
                        "system": sysres["name"],
                        "tenant": name,
                        "tenant_rate": rate,
                        "loaded_stage_rate": st["rate"],
                        "alone": {k: alone[k] for k in keys},
                        "loaded": {k: loaded[k] for k in keys},
                        "ratio": ratios,
                    }
                )
    return out


def has_tenants(res: dict[str, Any]) -> bool:
    return any(st.get("tenants") for s in res["systems"] for st in s.get("stages") or [])
