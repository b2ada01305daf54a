"""Where the latency model's TTFT error comes from: the replay's predictions split by what happened after
dispatch.

Runs `replay.py`'s virtual-time fleet with one profile (default `slo-aware`) and records, for every
prediction the warm model made for the endpoint it chose, the predicted and the actual TTFT, when the
request was dispatched and when its first token came. A request is *joined* when another request
dispatched to the same endpoint after it got its first token no later than it did: the later prompt's
prefill ran in the same engine step as the end of this one's (or overtook it), which lengthened this
request's wait by work that did not exist when it was dispatched, so no dispatch-time prediction
could have counted it. The table shows the error quantiles of joined and not-joined requests and
which side of the prediction the large errors fall on.

    python benchmarks/scheduling/error_breakdown.py benchmarks/workloads/mixed-slo.yaml \\
        --rates 6,10,11,12,13,14 --stages 4,5 --streams 6 --slo-header

Tuning seeds only (as the replay); prints a table, writes JSON with `--out`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

import ingate.sim.engine as sim_engine
from ingate.bench.runner import STREAM_SHIFT
from ingate.bench.stats import percentile
from ingate.scheduling.plugins.slo import PredictedTTFTScorer
from ingate.scheduling.predictor import ErrorWindow

# The replay beside this file (benchmarks/ is not a package).
_spec = importlib.util.spec_from_file_location("replay", Path(__file__).resolve().parent / "replay.py")
assert _spec is not None and _spec.loader is not None
replay: Any = importlib.util.module_from_spec(_spec)
sys.modules["replay"] = replay
_spec.loader.exec_module(replay)


class RecordingWindow(ErrorWindow):
    """An endpoint's TTFT error window that also keeps (dispatch, first token, predicted, actual)."""

    def __init__(self, sink: list[tuple[float, float, float, float]]) -> None:
        super().__init__(1)
        self.sink = sink

    def add(self, predicted: float, actual: float) -> float:
        now = replay.CLOCK.t  # the scorer learns a TTFT when the first token arrives
        self.sink.append((now - actual, now, predicted, actual))
        return super().add(predicted, actual)


def joined(recs: list[tuple[float, float, float, float]]) -> list[bool]:
    """Per record (one endpoint's, any order): did a request dispatched later get its first token no
    later?"""
    order = sorted(range(len(recs)), key=lambda i: recs[i][0])
    out = [False] * len(recs)
    # Walk from the last dispatched back, keeping the earliest first token seen among later ones.
    earliest = float("inf")
    for i in reversed(order):
        out[i] = earliest <= recs[i][1] + 1e-9
        earliest = min(earliest, recs[i][1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workload", type=Path)
    ap.add_argument("--rates", default=None, help="comma list replacing the workload's load.rates")
    ap.add_argument("--stages", default="-1", help="comma list of indexes into load.rates (reported)")
    ap.add_argument("--streams", type=int, default=6)
    ap.add_argument("--profile", default="slo-aware")
    ap.add_argument("--slo-header", action="store_true", help="send the SLO as x-llm-d-slo-ttft-ms")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    try:
        wl = replay.load_tuning_workload(args.workload)
    except ValueError as e:
        ap.error(str(e))
    if args.rates:
        rates = [float(r) for r in args.rates.split(",")]
        wl = wl.model_copy(update={"load": wl.load.model_copy(update={"rates": rates})})
    stages = sorted({int(s) % len(wl.load.rates) for s in args.stages.split(",")})
    sim_engine.time = replay.CLOCK
    cfg, prof = replay.load_profile(args.profile)
    rows: list[dict[str, Any]] = []
    for k in range(args.streams):
        fleet = replay.Fleet(wl, cfg, prof, seed=1234 + 100 * k)
        scorers = [
            s
            for p in fleet.sched.profiles.values()
            for s, _ in p.scorers
            if isinstance(s, PredictedTTFTScorer)
        ]
        if not scorers:
            ap.error(f"profile {args.profile} has no predicted-ttft scorer")
        for s in range(max(stages) + 1):
            sinks: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
            if s in stages:
                for sc in scorers:
                    for ep in fleet.eps:
                        sc._ep_errors[ep] = (RecordingWindow(sinks[ep.name]), ErrorWindow(1))
            replay.run_stage(fleet, wl, float(wl.load.rates[s]), s, STREAM_SHIFT * k, args.slo_header)
            for ep_name, recs in sinks.items():
                for rec, j in zip(recs, joined(recs), strict=True):
                    rows.append(
                        {
                            "stream": k,
                            "stage": s,
                            "rate": wl.load.rates[s],
                            "endpoint": ep_name,
                            "dispatched": rec[0],
                            "predicted": rec[2],
                            "actual": rec[3],
                            "joined": j,
                        }
                    )
    table = Table(
        title=f"{wl.name} @ {', '.join(f'{wl.load.rates[s]:g}' for s in stages)} req/s, {args.streams} "
        f"streams, {args.profile}{' (SLO sent)' if args.slo_header else ''}: |TTFT error| / actual"
    )
    table.add_column("requests")
    for c in ("n", "share", "median", "p90", "errors > 50%", "of those under"):
        table.add_column(c, justify="right")
    big_all = sum(1 for r in rows if abs(r["predicted"] - r["actual"]) > 0.5 * r["actual"])
    summary: dict[str, dict[str, float]] = {}
    for label, sel in (
        ("all", rows),
        ("not joined", [r for r in rows if not r["joined"]]),
        ("joined later", [r for r in rows if r["joined"]]),
    ):
        errs = [abs(r["predicted"] - r["actual"]) / r["actual"] for r in sel]
        big = [r for r in sel if abs(r["predicted"] - r["actual"]) > 0.5 * r["actual"]]
        under = sum(1 for r in big if r["predicted"] < r["actual"])
        summary[label] = {
            "n": len(sel),
            "p50": percentile(errs, 0.5) or 0.0,
            "p90": percentile(errs, 0.9) or 0.0,
            "big": len(big),
            "under": under,
        }
        table.add_row(
            label,
            str(len(sel)),
            f"{len(sel) / max(1, len(rows)):.0%}",
            f"{summary[label]['p50']:.0%}",
            f"{summary[label]['p90']:.0%}",
            f"{len(big) / max(1, big_all):.0%}",
            f"{under / max(1, len(big)):.0%}",
        )
    console = Console()
    console.print(table)
    console.print(
        "joined later: a request dispatched to the same endpoint after it got its first token no later "
        "(its prefill shared this one's last step or overtook it); errors > 50%: the row's share of "
        "them; of those under: the share predicted too short."
    )
    if args.out is not None:
        args.out.write_bytes(
            orjson.dumps(
                {
                    "workload": wl.name,
                    "rates": [wl.load.rates[s] for s in stages],
                    "streams": args.streams,
                    "profile": args.profile,
                    "slo_header": args.slo_header,
                    "summary": summary,
                },
                option=orjson.OPT_INDENT_2,
            )
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
