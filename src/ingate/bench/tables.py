"""Tables of benchmark results: the rich console table, markdown tables, the headline and verdicts,
and the per-tenant tables."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from ingate.bench.stats import (
    SUBJECTS,
    TARGET_GOODPUT_GAIN,
    TARGET_TTFT_P99_REDUCTION,
    at_rate,
    best_peer,
    good_count,
    has_tenants,
    isolation,
    knee_rate,
    max_sustainable_rate,
)


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
                        f"{s.get('good', '-')} / {s['sent']}",
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
    "good / sent",
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


def print_table(results: list[dict[str, Any]], console: Console | None = None) -> None:
    """Print the rich table to the console (and the per-tenant tables of multi-tenant workloads)."""
    (console or Console()).print(rich_table(results))
    print_tenant_tables(results, console)


def _pct_str(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v * 100:+.0f}%" if signed else f"{v * 100:.0f}%"


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
                h = None if rate is None else at_rate(res, subject, other, rate)
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
            h = at_rate(res, subject, "round-robin", rate)
            if h is None:
                continue
            red, gain = h.get("ttft_p99_reduction"), h.get("goodput_gain")
            ok_ttft = red is not None and red >= TARGET_TTFT_P99_REDUCTION
            ok_good = gain is not None and gain >= TARGET_GOODPUT_GAIN
            parts = [
                f"p99 TTFT {_pct_str(red)} lower than round robin ({'met' if ok_ttft else 'NOT met'})",
                f"goodput {_pct_str(gain, True)} ({'met' if ok_good else 'NOT met'})",
            ]
            best = best_peer(res, peers, rate)
            if best is None:
                parts.append("no peer ran" + (f" ({', '.join(down)} unavailable)" if down else ""))
            else:
                b = at_rate(res, subject, best, rate)
                assert b is not None
                # Every system gets the same requests at a rate, so "as many requests within the SLO"
                # compares goodput without the noise of each stage's drain time.
                mine, theirs = good_count(res, subject, rate), good_count(res, best, rate)
                as_good = mine >= theirs and (b["ttft_p99"][0] or 0) <= (b["ttft_p99"][1] or float("inf"))
                parts.append(
                    f"vs best peer {best}: goodput {_fmt(b['goodput'][0])} / {_fmt(b['goodput'][1])} req/s "
                    f"({mine} / {theirs} requests within the SLO), "
                    f"p99 TTFT {_fmt(b['ttft_p99'][0])} / {_fmt(b['ttft_p99'][1])} s "
                    f"({'at least as good: met' if as_good else 'NOT met'})"
                )
            out.append(f"- {wname} @ {rate:g} req/s, {subject}: " + "; ".join(parts))
    return "\n".join(out) + "\n"


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


def print_tenant_tables(results: list[dict[str, Any]], console: Console | None = None) -> None:
    """Print the per-tenant and isolation tables (nothing for workloads without tenants)."""
    if not any(has_tenants(r) for r in results):
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
