"""Summaries (percentiles, throughput, goodput), tables and plots of benchmark results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _pct(vals: list[float], q: float) -> float | None:
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
    out: dict[str, Any] = {
        "streams": max(1, len(ends)),
        "sent": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "throughput_rps": len(ok) / span,
        "output_tok_s": sum(r["completion_tokens"] for r in ok) / span,
        "goodput_rps": sum(1 for r in ok if good(r)) / span,
        "slo_attainment": (sum(1 for r in ok if good(r)) / len(records)) if records else 0.0,
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
            out[f"{name}_p{round(q * 100)}"] = _pct(vals, q)
    return out


def max_sustainable_rate(stages: list[dict[str, Any]], slo_attainment: float = 0.9) -> float | None:
    """Highest offered rate at which at least `slo_attainment` of requests met the SLO."""
    best = None
    for st in stages:
        if st.get("rate") is not None and st["summary"]["slo_attainment"] >= slo_attainment:
            best = max(best or 0.0, st["rate"])
    return best


def _oneline(text: str, limit: int = 200) -> str:
    """A reason fit for one table cell: no newlines or pipes, at most `limit` characters."""
    flat = " ".join(str(text).replace("|", "/").split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _fmt(v: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def _pct_cell(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.0f}%"


def rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """Table rows: one per (workload, system, stage)."""
    out = []
    for res in results:
        for sysres in res["systems"]:
            if sysres.get("unavailable"):
                out.append(
                    [
                        res["workload"]["name"],
                        sysres["name"],
                        "-",
                        f"unavailable: {_oneline(sysres['unavailable'])}",
                    ]
                )
                continue
            msr = max_sustainable_rate(sysres["stages"])
            for st in sysres["stages"]:
                s = st["summary"]
                load = f"{st['rate']:g} rps" if st["rate"] is not None else f"c={st['concurrency']}"
                out.append(
                    [
                        res["workload"]["name"],
                        sysres["name"],
                        load,
                        _fmt(s["throughput_rps"]),
                        _fmt(s["ttft_p50"], 1000, 0),
                        _fmt(s["ttft_p90"], 1000, 0),
                        _fmt(s["ttft_p99"], 1000, 0),
                        _fmt(s["e2e_p99"], 1, 2),
                        _fmt(s["goodput_rps"]),
                        f"{s['slo_attainment'] * 100:.0f}%",
                        _pct_cell(s.get("cached_token_share")),
                        str(s["errors"]),
                        "-" if msr is None else f"{msr:g}",
                    ]
                )
    return out


HEADERS = [
    "workload",
    "system",
    "load",
    "req/s",
    "TTFT p50 ms",
    "TTFT p90 ms",
    "TTFT p99 ms",
    "e2e p99 s",
    "goodput req/s",
    "SLO met",
    "cached",
    "errors",
    "max rate",
]


def rich_table(results: list[dict[str, Any]]) -> Table:
    """A rich table of all stages of all systems."""
    t = Table(title="ingate bench")
    for h in HEADERS:
        t.add_column(h)
    for r in rows(results):
        t.add_row(*(r + [""] * (len(HEADERS) - len(r))))
    return t


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The same table as GitHub markdown (for benchmarks/README.md)."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for r in rows(results):
        lines.append("| " + " | ".join(r + [""] * (len(HEADERS) - len(r))) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], out: Path) -> Path:
    """PNG: TTFT and e2e percentiles against achieved throughput, one line per system, and goodput
    against offered load."""
    if results and all(_has_tenants(r) for r in results):
        return plot_tenants(results, out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    metrics = [
        ("ttft_p50", "TTFT p50 (s)"),
        ("ttft_p90", "TTFT p90 (s)"),
        ("ttft_p99", "TTFT p99 (s)"),
        ("e2e_p50", "e2e p50 (s)"),
        ("e2e_p99", "e2e p99 (s)"),
    ]
    for res in results:
        for sysres in res["systems"]:
            stages = sysres.get("stages") or []
            if not stages:
                continue
            label = sysres["name"] if len(results) == 1 else f"{res['workload']['name']}/{sysres['name']}"
            x = [st["summary"]["throughput_rps"] for st in stages]
            for ax, (key, title) in zip(axes.flat, metrics, strict=False):
                y = [st["summary"][key] for st in stages]
                pts = [(a, b) for a, b in zip(x, y, strict=True) if b is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
                ax.set_title(title)
                ax.set_xlabel("achieved throughput (req/s)")
            offered = [st["rate"] if st["rate"] is not None else st["concurrency"] for st in stages]
            axes.flat[5].plot(
                offered, [st["summary"]["goodput_rps"] for st in stages], marker="o", label=label
            )
    axes.flat[5].set_title("goodput (req/s meeting SLO)")
    axes.flat[5].set_xlabel("offered load")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def print_table(results: list[dict[str, Any]], console: Console | None = None) -> None:
    """Print the rich table to the console (and the per-tenant tables of multi-tenant workloads)."""
    (console or Console()).print(rich_table(results))
    print_tenant_tables(results, console)


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


def _pct_str(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v * 100:+.0f}%" if signed else f"{v * 100:.0f}%"


def knee_rate(res: dict[str, Any]) -> float | None:
    """The offered rate where the comparison is made: round robin's saturation point (see `headline`)."""
    h = headline(res, "ingate", "round-robin")
    if h is None:
        for subject in SUBJECTS[1:]:
            h = headline(res, subject, "round-robin")
            if h is not None:
                break
    return None if h is None else float(h["rate"])


def headline_markdown(results: list[dict[str, Any]]) -> str:
    """Markdown: each ingate variant vs each other system at the round-robin saturation point, then
    the verdicts against the issue's targets."""
    lines = [
        "| workload | rate (req/s) | system | vs | TTFT p99 system / other (s) | p99 TTFT reduction "
        "| goodput system / other (req/s) | goodput gain | max sustainable rate system / other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        wname = res["workload"]["name"]
        rate = knee_rate(res)
        msr = {s["name"]: max_sustainable_rate(s["stages"]) for s in res["systems"] if s.get("stages")}
        for subject in [s["name"] for s in res["systems"] if s["name"] in SUBJECTS and s.get("stages")]:
            for sysres in res["systems"]:
                other = sysres["name"]
                if other in SUBJECTS:
                    continue
                if sysres.get("unavailable"):
                    why = _oneline(sysres["unavailable"])
                    lines.append(f"| {wname} | - | {subject} | {other} | unavailable: {why} | | | | |")
                    continue
                h = None if rate is None else _at_rate(res, subject, other, rate)
                if h is None:
                    lines.append(f"| {wname} | - | {subject} | {other} | not run | | | | |")
                    continue
                lines.append(
                    f"| {wname} | {h['rate']:g} | {subject} | {other} | {_fmt(h['ttft_p99'][0])} / "
                    f"{_fmt(h['ttft_p99'][1])} | {_pct_str(h.get('ttft_p99_reduction'))} | "
                    f"{_fmt(h['goodput'][0])} / {_fmt(h['goodput'][1])} | "
                    f"{_pct_str(h.get('goodput_gain'), True)} | {_rate(msr.get(subject))} / {_rate(msr.get(other))} |"
                )
    return "\n".join(lines) + "\n\n" + verdict_markdown(results)


def _rate(v: float | None) -> str:
    return "<lowest" if v is None else f"{v:g}"


def verdict_markdown(results: list[dict[str, Any]]) -> str:
    """Bullets: does each ingate variant meet the targets (p99 TTFT >= 60% lower and goodput >= 40% higher
    than round robin at its saturation point, and at least as good as the best peer that ran)?"""
    from ingate.bench.peers import is_peer

    out = []
    for res in results:
        wname = res["workload"]["name"]
        rate = knee_rate(res)
        if rate is None:
            out.append(f"- {wname}: no comparison (round robin or ingate did not run)")
            continue
        peers = [s for s in res["systems"] if is_peer(s["name"]) and s.get("stages")]
        down = [s["name"] for s in res["systems"] if is_peer(s["name"]) and s.get("unavailable")]
        for subject in [s["name"] for s in res["systems"] if s["name"] in SUBJECTS and s.get("stages")]:
            h = _at_rate(res, subject, "round-robin", rate)
            if h is None:
                continue
            red, gain = h.get("ttft_p99_reduction"), h.get("goodput_gain")
            ok_ttft = red is not None and red >= TARGET_TTFT_P99_REDUCTION
            ok_good = gain is not None and gain >= TARGET_GOODPUT_GAIN
            parts = [
                f"p99 TTFT {_pct_str(red)} lower than round robin ({'met' if ok_ttft else 'NOT met'})",
                f"goodput {_pct_str(gain, True)} ({'met' if ok_good else 'NOT met'})",
            ]
            best = _best_peer(res, peers, rate)
            if best is None:
                parts.append("no peer ran" + (f" ({', '.join(down)} unavailable)" if down else ""))
            else:
                b = _at_rate(res, subject, best, rate)
                assert b is not None
                # Every system gets the same requests at a rate, so "as many requests within the SLO"
                # compares goodput without the noise of each stage's drain time.
                mine, theirs = _good_count(res, subject, rate), _good_count(res, best, rate)
                as_good = mine >= theirs and (b["ttft_p99"][0] or 0) <= (b["ttft_p99"][1] or float("inf"))
                parts.append(
                    f"vs best peer {best}: goodput {_fmt(b['goodput'][0])} / {_fmt(b['goodput'][1])} req/s "
                    f"({mine} / {theirs} requests within the SLO), "
                    f"p99 TTFT {_fmt(b['ttft_p99'][0])} / {_fmt(b['ttft_p99'][1])} s "
                    f"({'at least as good: met' if as_good else 'NOT met'})"
                )
            out.append(f"- {wname} @ {rate:g} req/s, {subject}: " + "; ".join(parts))
    return "\n".join(out) + "\n"


def _good_count(res: dict[str, Any], system: str, rate: float) -> int:
    """Requests of `system`'s stage at `rate` that met the SLO."""
    sysres = next(s for s in res["systems"] if s["name"] == system)
    st = next(st for st in sysres["stages"] if st["rate"] == rate)
    s = st["summary"]
    return round(s["slo_attainment"] * s.get("sent", 0))


def _best_peer(res: dict[str, Any], peers: list[dict[str, Any]], rate: float) -> str | None:
    """The peer with the most requests within the SLO at `rate` (ties: lower p99 TTFT)."""
    best: tuple[float, float, str] | None = None
    for p in peers:
        st = next((st for st in p["stages"] if st["rate"] == rate), None)
        if st is None:
            continue
        s = st["summary"]
        good = _good_count(res, p["name"], rate)
        key = (good, -(s["ttft_p99"] if s["ttft_p99"] is not None else float("inf")), p["name"])
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]


def _at_rate(res: dict[str, Any], system: str, other: str, rate: float) -> dict[str, Any] | None:
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


# ---- multi-tenant workloads (Workload.tenants) ------------------------------------------------------


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


def _tenant_rate(res: dict[str, Any], tenant: str, stage: int) -> float:
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
                rate = _tenant_rate(res, name, i)
                alone_i = next(
                    (
                        j
                        for j, o in enumerate(stages)
                        if set(o.get("tenants") or {}) == {name} and _tenant_rate(res, name, j) == rate
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


TENANT_HEADERS = [
    "workload",
    "system",
    "load",
    "tenant",
    "sent",
    "ok",
    "429",
    "503",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "e2e p50 s",
    "e2e p99 s",
    "goodput req/s",
]


def tenant_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """One row per (workload, system, stage, tenant) of multi-tenant workloads."""
    out = []
    for res in results:
        for sysres in res["systems"]:
            for st in sysres.get("stages") or []:
                for name, s in (st.get("tenants") or {}).items():
                    out.append(
                        [
                            res["workload"]["name"],
                            sysres["name"],
                            f"{st['rate']:g} rps",
                            name,
                            str(s["sent"]),
                            str(s["ok"]),
                            str(s["status"].get("429", 0)),
                            str(s["status"].get("503", 0)),
                            _fmt(s["ttft_p50"], 1000, 0),
                            _fmt(s["ttft_p99"], 1000, 0),
                            _fmt(s["e2e_p50"]),
                            _fmt(s["e2e_p99"]),
                            _fmt(s["goodput_rps"]),
                        ]
                    )
    return out


ISOLATION_HEADERS = [
    "system",
    "tenant",
    "tenant rps",
    "total rps",
    "TTFT p50 alone/loaded ms",
    "TTFT p99 alone/loaded ms",
    "e2e p50 alone/loaded s",
    "e2e p99 alone/loaded s",
    "e2e p50 ratio",
    "e2e p99 ratio",
    "TTFT p50 ratio",
    "TTFT p99 ratio",
]


def isolation_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """Latency of each tenant loaded vs alone; a ratio <= 1.20 is within 20%."""
    out = []
    for res in results:
        for iso in isolation(res):
            a, lo, r = iso["alone"], iso["loaded"], iso["ratio"]
            out.append(
                [
                    iso["system"],
                    iso["tenant"],
                    f"{iso['tenant_rate']:g}",
                    f"{iso['loaded_stage_rate']:g}",
                    f"{_fmt(a['ttft_p50'], 1000, 0)} / {_fmt(lo['ttft_p50'], 1000, 0)}",
                    f"{_fmt(a['ttft_p99'], 1000, 0)} / {_fmt(lo['ttft_p99'], 1000, 0)}",
                    f"{_fmt(a['e2e_p50'])} / {_fmt(lo['e2e_p50'])}",
                    f"{_fmt(a['e2e_p99'])} / {_fmt(lo['e2e_p99'])}",
                    *(_fmt(r[k]) for k in ("e2e_p50", "e2e_p99", "ttft_p50", "ttft_p99")),
                ]
            )
    return out


def _md(headers: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def tenant_markdown(results: list[dict[str, Any]]) -> str:
    """Markdown: the per-tenant table and the loaded-vs-alone table."""
    return _md(TENANT_HEADERS, tenant_rows(results)) + "\n" + _md(ISOLATION_HEADERS, isolation_rows(results))


def _has_tenants(res: dict[str, Any]) -> bool:
    return any(st.get("tenants") for s in res["systems"] for st in s.get("stages") or [])


def print_tenant_tables(results: list[dict[str, Any]], console: Console | None = None) -> None:
    """Print the per-tenant and isolation tables (nothing for workloads without tenants)."""
    if not any(_has_tenants(r) for r in results):
        return
    console = console or Console()
    for title, headers, body in (
        ("per tenant", TENANT_HEADERS, tenant_rows(results)),
        ("loaded vs alone", ISOLATION_HEADERS, isolation_rows(results)),
    ):
        t = Table(title=title)
        for h in headers:
            t.add_column(h)
        for r in body:
            t.add_row(*r)
        console.print(t)


def plot_tenants(results: list[dict[str, Any]], out: Path) -> Path:
    """PNG for multi-tenant workloads: each isolated tenant's latency alone vs loaded, per system, and
    per-tenant outcomes (served, 429, 503) of the loaded stages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.5))
    keys = ("ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99")
    isos = [iso for res in results for iso in isolation(res)]
    width = 0.8 / max(1, 2 * len(isos))
    for n, iso in enumerate(isos):
        for m, which in enumerate(("alone", "loaded")):
            vals = [iso[which][k] or 0.0 for k in keys]
            xs = [i + (2 * n + m) * width for i in range(len(keys))]
            ax1.bar(xs, vals, width, label=f"{iso['system']} {iso['tenant']} {which}")
    ax1.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], [k.replace("_", " ") for k in keys])
    ax1.set_yscale("log")
    ax1.set_ylabel("seconds (log)")
    ax1.set_title("tenant latency: alone vs under load")
    ax1.legend(fontsize=8)
    labels, served, shed, expired = [], [], [], []
    for res in results:
        for sysres in res["systems"]:
            for st in sysres.get("stages") or []:
                ten = st.get("tenants") or {}
                if len(ten) < 2:
                    continue
                for name, s in ten.items():
                    labels.append(f"{sysres['name']}\n{name}")
                    served.append(s["ok"])
                    shed.append(s["status"].get("429", 0))
                    expired.append(s["status"].get("503", 0))
    xs = list(range(len(labels)))
    ax2.bar(xs, served, label="200 served")
    ax2.bar(xs, shed, bottom=served, label="429 shed / queue full")
    ax2.bar(xs, expired, bottom=[a + b for a, b in zip(served, shed, strict=True)], label="503")
    ax2.set_xticks(xs, labels, fontsize=8)
    ax2.set_ylabel("requests")
    ax2.set_title("loaded stage: outcome per tenant")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3, axis="y")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
