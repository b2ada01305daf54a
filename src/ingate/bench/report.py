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

    # Throughput over the span from the first send to the last completion.
    span = max((r["send"] + (r["e2e"] or 0.0) for r in ok), default=duration_s)
    span = max(span, duration_s, 1e-9)
    out: dict[str, Any] = {
        "sent": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "throughput_rps": len(ok) / span,
        "output_tok_s": sum(r["completion_tokens"] for r in ok) / span,
        "goodput_rps": sum(1 for r in ok if good(r)) / span,
        "slo_attainment": (sum(1 for r in ok if good(r)) / len(records)) if records else 0.0,
    }
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


def _fmt(v: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """Table rows: one per (workload, system, stage)."""
    out = []
    for res in results:
        for sysres in res["systems"]:
            if sysres.get("unavailable"):
                out.append(
                    [res["workload"]["name"], sysres["name"], "-", f"unavailable: {sysres['unavailable']}"]
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
    """Print the rich table to the console."""
    (console or Console()).print(rich_table(results))


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


def headline_markdown(results: list[dict[str, Any]]) -> str:
    """Markdown lines: ingate vs each other system at the round-robin saturation point, with verdicts."""
    lines = [
        "| workload | rate (req/s) | vs | TTFT p99 ingate / other (s) | p99 TTFT reduction | goodput ingate / other | goodput gain |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        rr = headline(res, "ingate", "round-robin")
        for other in [s["name"] for s in res["systems"] if s["name"] != "ingate"]:
            h = None if rr is None else _at_rate(res, "ingate", other, rr["rate"])
            if h is None:
                lines.append(f"| {res['workload']['name']} | - | {other} | not run | | | |")
                continue
            red = h.get("ttft_p99_reduction")
            gain = h.get("goodput_gain")
            lines.append(
                f"| {res['workload']['name']} | {h['rate']:g} | {other} | {_fmt(h['ttft_p99'][0])} / "
                f"{_fmt(h['ttft_p99'][1])} | {'-' if red is None else f'{red * 100:.0f}%'} | "
                f"{_fmt(h['goodput'][0])} / {_fmt(h['goodput'][1])} | "
                f"{'-' if gain is None else f'{gain * 100:+.0f}%'} |"
            )
    return "\n".join(lines) + "\n"


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
