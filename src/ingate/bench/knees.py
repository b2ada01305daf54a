"""Each system's knee, and ingate against the best peer where that peer saturates (`ingate bench knees`).

Definitions (one set, used by every table that cites them):

- **knee**: the highest offered rate at which a system still met the SLO for at least 90% of requests
  (`stats.max_sustainable_rate`); **past its knee** when the sweep also ran a higher rate at which it
  fell below 90%. A system never below 90% in the sweep has not been pushed past its knee.
- **goodput**: requests that met the SLO, counted (and per offered second).
- **best peer**: the peer router with the highest knee (ties: the one with more good requests at the
  first rate past that knee).
- **the best peer's saturation load**: the first rate of the sweep past its knee. The verdict compares
  ingate's good requests with the best peer's there (target: at least 1.15x).
- **arrived rate**: requests sent over the stage's offered seconds. Poisson arrivals on a few streams
  can fall short of (or exceed) the nominal rate by several percent, which matters near a cliff; the
  rates above are nominal, every table also shows what arrived.
"""

from __future__ import annotations

from typing import Any

from ingate.bench.peers import is_peer
from ingate.bench.stats import max_sustainable_rate

TARGET_VS_PEER = 1.15
ATTAINMENT = 0.9


def _good(st: dict[str, Any]) -> int:
    s = st["summary"]
    return int(s.get("good", round(s["slo_attainment"] * s.get("sent", 0))))


def _arrived(st: dict[str, Any]) -> float | None:
    s = st["summary"]
    return s["sent"] / s["offered_s"] if s.get("sent") and s.get("offered_s") else None


def system_knees(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Per system that ran: knee, first rate past it, and goodput / p90 / p99 TTFT at the knee."""
    out = []
    for sysres in res["systems"]:
        stages = [st for st in sysres.get("stages") or [] if st.get("rate") is not None]
        if not stages:
            continue
        knee = max_sustainable_rate(stages, ATTAINMENT)
        past = next(
            (st["rate"] for st in stages if (knee is None or st["rate"] > knee)
             and st["summary"]["slo_attainment"] < ATTAINMENT),
            None,
        )  # fmt: skip
        at = next((st for st in stages if st["rate"] == knee), None)
        row: dict[str, Any] = {
            "system": sysres["name"],
            "knee": knee,
            "past_knee_at": past,
            "peer": is_peer(sysres["name"]),
        }
        if at is not None:
            s = at["summary"]
            row |= {
                "good": _good(at),
                "sent": s.get("sent"),
                "arrived_rps": _arrived(at),
                "goodput_rps": _good(at) / s["offered_s"] if s.get("offered_s") else None,
                "ttft_p90_s": s.get("ttft_p90"),
                "ttft_p99_s": s.get("ttft_p99"),
            }
        out.append(row)
    return out


def verdict(res: dict[str, Any], subject: str = "ingate") -> dict[str, Any]:
    """ingate's good requests over the best peer's at the best peer's saturation load (module docstring)."""
    knees = {k["system"]: k for k in system_knees(res)}
    peers = [k for k in knees.values() if k["peer"]]
    out: dict[str, Any] = {"subject": subject, "target": TARGET_VS_PEER}
    if subject not in knees or not peers:
        return out | {"status": "not comparable: ingate or every peer missing"}
    stages = {s["name"]: {st["rate"]: st for st in s.get("stages") or []} for s in res["systems"]}

    def good_past(k: dict[str, Any]) -> int:
        st = stages[k["system"]].get(k["past_knee_at"]) if k["past_knee_at"] is not None else None
        return _good(st) if st is not None else 0

    # Highest knee; among equal knees, the one that serves the most where it saturates.
    best = max(peers, key=lambda k: (k["knee"] if k["knee"] is not None else -1.0, good_past(k)))
    out["best_peer"] = best["system"]
    rate = best["past_knee_at"]
    if rate is None:
        return out | {"status": f"not reached: {best['system']} was not pushed past its knee; extend --rates"}
    mine, theirs = stages[subject].get(rate), stages[best["system"]].get(rate)
    if mine is None or theirs is None:
        return out | {"status": f"not comparable: no stage at {rate:g} req/s for both"}
    g_mine, g_theirs = _good(mine), _good(theirs)
    ratio = g_mine / g_theirs if g_theirs else float("inf")
    return out | {
        "rate": rate,
        "good": [g_mine, g_theirs],
        "sent": mine["summary"].get("sent"),
        "arrived_rps": _arrived(mine),
        "ratio": ratio,
        "ttft_p90_s": [mine["summary"].get("ttft_p90"), theirs["summary"].get("ttft_p90")],
        "ttft_p99_s": [mine["summary"].get("ttft_p99"), theirs["summary"].get("ttft_p99")],
        "status": "met" if ratio >= TARGET_VS_PEER else "NOT met",
    }


def markdown(res: dict[str, Any], subject: str = "ingate") -> str:
    """The knee table and the verdict line of one results file."""

    def f(v: Any, scale: float = 1.0, digits: int = 2) -> str:
        return "-" if v is None else f"{v * scale:.{digits}f}"

    name = res["workload"]["name"]
    lines = [
        f"| {name}: system | knee (req/s) | past knee at | arrived at knee (req/s) | good / sent at knee | goodput at knee (req/s) | TTFT p90 / p99 at knee (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in system_knees(res):
        knee = "below lowest rate" if k["knee"] is None else f"{k['knee']:g}"
        past = "not reached" if k["past_knee_at"] is None else f"{k['past_knee_at']:g}"
        good = f"{k['good']} / {k['sent']}" if "good" in k else "-"
        lines.append(
            f"| {k['system']} | {knee} | {past} | {f(k.get('arrived_rps'), digits=1)} | {good} | "
            f"{f(k.get('goodput_rps'))} | "
            f"{f(k.get('ttft_p90_s'))} / {f(k.get('ttft_p99_s'))} |"
        )
    v = verdict(res, subject)
    if "ratio" in v:
        line = (
            f"**Verdict ({name})**: at {v['rate']:g} req/s ({f(v.get('arrived_rps'), digits=1)} arrived), where the best peer ({v['best_peer']}) is past its "
            f"knee, {subject} served {v['good'][0]} requests within the SLO vs {v['good'][1]} "
            f"({v['ratio']:.2f}x; target {TARGET_VS_PEER}x: {v['status']}); TTFT p90 "
            f"{f(v['ttft_p90_s'][0])} vs {f(v['ttft_p90_s'][1])} s, p99 {f(v['ttft_p99_s'][0])} vs "
            f"{f(v['ttft_p99_s'][1])} s."
        )
    else:
        line = f"**Verdict ({name})**: {v['status']}."
    return "\n".join(lines) + "\n\n" + line + "\n"
