"""The recommender: the cheapest configurations whose curves meet a latency target at a request rate.

For each curve (normalised to hardware time) it asks: with k replicas of this configuration, each
replica carries R / k req/s; what p90 TTFT (and TPOT) does the curve give at that per-replica rate?
Between two measured rates the answer is interpolated linearly; above the highest measured rate there is
no answer (the curve is never extrapolated: more replicas are needed instead); below the lowest measured
rate the lowest point's latencies are used and the option says so (an upper bound if latency does not
fall as load rises). A curve measured with N replicas is reused for k != N by assuming the gateway
spreads load evenly (per-replica rate R / k), which the option also says.
The cheapest feasible option wins (cost = replicas x accelerators per replica x price per hour); ties
go to the larger TTFT margin.
"""

from __future__ import annotations

import bisect
import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ingate.bench.db import Point, Series

PRICES_FILE = Path(__file__).with_name("prices.yaml")
MAX_ERROR_RATE = 0.01
"""A point with more failed requests than this is not a valid operating point."""
MAX_REPLICAS = 256


class RecommendError(ValueError):
    """Bad input or nothing to recommend from; the message says what is available."""


@dataclass(frozen=True, slots=True)
class Price:
    """One accelerator's price per hour, with where and when it came from."""

    usd_per_hour: float
    name: str = ""
    source: str = ""
    date: str = ""


def load_prices(path: str | Path | None = None) -> dict[str, Price]:
    """The price table (`prices.yaml` next to this module unless `path` is given)."""
    p = Path(path) if path else PRICES_FILE
    try:
        doc = yaml.safe_load(p.read_text()) or {}
        accs = doc["accelerators"]
        return {str(k).lower(): Price(**v) for k, v in accs.items()}
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        raise RecommendError(f"{p}: not a price table ({type(e).__name__}: {e})") from None


@dataclass(frozen=True, slots=True)
class Targets:
    """What the user asks for: `rps` requests per second with p90 TTFT (and TPOT) within bounds."""

    rps: float
    ttft_p90: float
    tpot_p90: float | None = None
    max_cost_per_hour: float | None = None


@dataclass(frozen=True, slots=True)
class Estimate:
    """A curve's metrics at one per-replica rate (hardware time)."""

    rate: float
    """Per-replica request rate asked for."""
    where: str
    """`on-curve` (a rate the curve has a point at), `interpolated` (between two), or `below-range`
    (below the lowest point, whose latencies are used)."""
    ttft_p90: float | None
    tpot_p90: float | None
    e2e_p90: float | None
    error_rate: float
    output_tokens_per_request: float | None
    lo: float
    hi: float
    """The curve's measured per-replica rate range."""


def per_replica_points(s: Series) -> list[tuple[float, Point]]:
    """(per-replica rate, point) of a normalised series, by rate; points without a rate are skipped."""
    out = [(p.rate / s.key.replicas, p) for p in s.points if p.rate is not None and p.rate > 0]
    out.sort(key=lambda t: t[0])
    return out


def _lerp(a: float | None, b: float | None, w: float) -> float | None:
    if a is None or b is None:
        return None
    return a + (b - a) * w


def _tokens_per_request(p: Point) -> float | None:
    if p.output_tok_s is None or not p.throughput_rps:
        return None
    return p.output_tok_s / p.throughput_rps


def estimate(points: Sequence[tuple[float, Point]], x: float) -> Estimate | None:
    """The curve `points` (per-replica rate, point; sorted) at per-replica rate `x`, or None when `x` is
    above the highest measured rate (never extrapolated) or there are no points."""
    if not points or x > points[-1][0] or x <= 0:
        return None
    lo, hi = points[0][0], points[-1][0]
    rates = [r for r, _ in points]
    i = bisect.bisect_left(rates, x)
    if i < len(points) and rates[i] == x:
        p = points[i][1]
        return Estimate(
            x, "on-curve", p.ttft_p90, p.tpot_p90, p.e2e_p90, p.error_rate, _tokens_per_request(p), lo, hi
        )
    if i == 0:
        p = points[0][1]
        return Estimate(
            x, "below-range", p.ttft_p90, p.tpot_p90, p.e2e_p90, p.error_rate, _tokens_per_request(p), lo, hi
        )
    (r0, a), (r1, b) = points[i - 1], points[i]
    w = (x - r0) / (r1 - r0)
    return Estimate(
        x,
        "interpolated",
        _lerp(a.ttft_p90, b.ttft_p90, w),
        _lerp(a.tpot_p90, b.tpot_p90, w),
        _lerp(a.e2e_p90, b.e2e_p90, w),
        a.error_rate + (b.error_rate - a.error_rate) * w,
        _lerp(_tokens_per_request(a), _tokens_per_request(b), w),
        lo,
        hi,
    )


def meets(e: Estimate, t: Targets) -> bool:
    """Whether the estimate meets the latency targets with few enough errors."""
    if e.ttft_p90 is None or e.ttft_p90 > t.ttft_p90 or e.error_rate > MAX_ERROR_RATE:
        return False
    return t.tpot_p90 is None or (e.tpot_p90 is not None and e.tpot_p90 <= t.tpot_p90)


@dataclass(slots=True)
class Option:
    """One way to serve the target: a curve's configuration with `replicas` replicas."""

    series: Series
    replicas: int
    estimate: Estimate
    cost_per_hour: float | None
    price: Price | None
    notes: list[str] = field(default_factory=list)

    @property
    def accelerators(self) -> int:
        """Accelerators in all."""
        return self.replicas * self.series.key.accelerators_per_replica

    @property
    def cost_per_million_output_tokens(self) -> float | None:
        """Cost of a million output tokens at the target rate (None without a price or token counts)."""
        tpr = self.estimate.output_tokens_per_request
        if self.cost_per_hour is None or not tpr:
            return None
        tokens_per_hour = self.estimate.rate * self.replicas * tpr * 3600
        return self.cost_per_hour / tokens_per_hour * 1e6

    def ttft_margin(self, t: Targets) -> float | None:
        """Target minus predicted p90 TTFT (seconds; positive = headroom)."""
        return None if self.estimate.ttft_p90 is None else t.ttft_p90 - self.estimate.ttft_p90

    def tpot_margin(self, t: Targets) -> float | None:
        """Target minus predicted p90 TPOT (seconds), when a TPOT target is given."""
        if t.tpot_p90 is None or self.estimate.tpot_p90 is None:
            return None
        return t.tpot_p90 - self.estimate.tpot_p90

    def to_json(self, t: Targets) -> dict[str, Any]:
        """A plain dict for `--json` and the emitters."""
        k = self.series.key
        return {
            "model": k.model,
            "accelerator": k.accelerator,
            "accelerators_per_replica": k.accelerators_per_replica,
            "accelerator_profile": k.accelerator_profile,
            "model_server": k.model_server,
            "server_args": list(k.server_args),
            "replicas": self.replicas,
            "measured_replicas": k.replicas,
            "gateway": k.gateway,
            "scheduler_profile": k.scheduler_profile,
            "workload": k.workload,
            "per_replica_rate": self.estimate.rate,
            "predicted": {
                "ttft_p90_s": self.estimate.ttft_p90,
                "tpot_p90_s": self.estimate.tpot_p90,
                "e2e_p90_s": self.estimate.e2e_p90,
                "error_rate": self.estimate.error_rate,
                "where": self.estimate.where,
                "measured_per_replica_rates": [self.estimate.lo, self.estimate.hi],
            },
            "ttft_margin_s": self.ttft_margin(t),
            "tpot_margin_s": self.tpot_margin(t),
            "cost_per_hour": self.cost_per_hour,
            "cost_per_million_output_tokens": self.cost_per_million_output_tokens,
            "price": None
            if self.price is None
            else {
                "usd_per_hour": self.price.usd_per_hour,
                "source": self.price.source,
                "date": self.price.date,
            },
            "source": {
                "kind": self.series.run.kind,
                "estimated_profile": self.series.run.estimated,
                "tool": self.series.run.tool,
                "calibration": self.series.run.calibration,
            },
            "notes": list(self.notes),
        }


def _notes(s: Series, k: int, e: Estimate) -> list[str]:
    notes = []
    if e.where == "below-range":
        notes.append(
            f"{e.rate:.3g} req/s per replica is below the lowest measured rate ({e.lo:.3g}): latencies "
            "taken from that lowest point"
        )
    if k != s.key.replicas:
        notes.append(f"scaled from a {s.key.replicas}-replica curve assuming even load per replica")
    if s.run.kind == "simulated":
        prof = "an estimated accelerator profile" if s.run.estimated else "a calibrated profile"
        notes.append(f"simulated ({prof}), not measured on the hardware")
    return notes


def options_for(s: Series, t: Targets, prices: dict[str, Price]) -> Option | None:
    """The cheapest feasible option of one (normalised) curve: the fewest replicas whose per-replica
    rate the curve says meets the targets; None if no replica count up to MAX_REPLICAS does."""
    pts = per_replica_points(s)
    if not pts:
        return None
    hi = pts[-1][0]
    price = prices.get(s.key.accelerator.lower())
    k = max(1, math.ceil(t.rps / hi - 1e-9))
    while k <= MAX_REPLICAS:
        e = estimate(pts, t.rps / k)
        if e is not None and meets(e, t):
            cost = None if price is None else k * s.key.accelerators_per_replica * price.usd_per_hour
            return Option(s, k, e, cost, price, _notes(s, k, e))
        if e is not None and e.where == "below-range":
            return None  # more replicas only go further below the range: nothing changes
        k += 1
    return None


@dataclass(slots=True)
class Recommendation:
    """Feasible options, cheapest first, and what was left out and why."""

    targets: Targets
    options: list[Option]
    unpriced: list[Option]
    over_budget: list[Option]
    closest: str | None = None


def recommend(series: Sequence[Series], t: Targets, prices: dict[str, Price]) -> Recommendation:
    """Rank every curve's cheapest feasible option by cost per hour (then TTFT margin)."""
    if t.rps <= 0 or t.ttft_p90 <= 0 or (t.tpot_p90 is not None and t.tpot_p90 <= 0):
        raise RecommendError("--rps, --ttft-p90 and --tpot-p90 must be positive")
    feasible, unpriced, over = [], [], []
    for s in series:
        o = options_for(s.normalised(), t, prices)
        if o is None:
            continue
        if o.cost_per_hour is None:
            o.notes.append(f"no price for accelerator {s.key.accelerator!r} in the price table")
            unpriced.append(o)
        elif t.max_cost_per_hour is not None and o.cost_per_hour > t.max_cost_per_hour:
            over.append(o)
        else:
            feasible.append(o)
    feasible.sort(key=lambda o: (o.cost_per_hour, -(o.ttft_margin(t) or 0.0)))
    over.sort(key=lambda o: o.cost_per_hour or 0.0)
    rec = Recommendation(t, feasible, unpriced, over)
    if not feasible:
        rec.closest = closest_feasible(series, t, over)
    return rec


def closest_feasible(series: Sequence[Series], t: Targets, over_budget: Sequence[Option]) -> str:
    """What comes nearest when nothing meets the targets: the cheapest option over budget, or the
    lowest p90 TTFT (and TPOT) any curve reaches at any measured rate."""
    if over_budget:
        o = over_budget[0]
        return (
            f"nothing fits --max-cost {t.max_cost_per_hour:g}/h; the cheapest configuration that meets the "
            f"latency targets costs {o.cost_per_hour:.2f}/h: {describe(o)}"
        )
    best: tuple[float, Series, float, Point] | None = None
    for s in series:
        n = s.normalised()
        for r, p in per_replica_points(n):
            if p.ttft_p90 is None or p.error_rate > MAX_ERROR_RATE:
                continue
            if t.tpot_p90 is not None and (p.tpot_p90 is None or p.tpot_p90 > t.tpot_p90):
                continue
            if best is None or p.ttft_p90 < best[0]:
                best = (p.ttft_p90, n, r, p)
    if best is None:
        if t.tpot_p90 is not None:
            lows = [
                p.tpot_p90
                for s in series
                for _, p in per_replica_points(s.normalised())
                if p.tpot_p90 is not None
            ]
            if lows:
                return f"no curve reaches p90 TPOT <= {t.tpot_p90:g} s; the lowest on any curve is {min(lows):.3g} s"
        return "no curve has a valid point (p90 TTFT with under 1% errors)"
    ttft, s, r, p = best
    return (
        f"the lowest p90 TTFT any curve reaches is {ttft:.3g} s ({s.key.label()}, {s.key.accelerator}, at "
        f"{r:.3g} req/s per replica): relax --ttft-p90 to at least {ttft:.3g} s"
    )


def describe(o: Option) -> str:
    """One line: what to run."""
    k = o.series.key
    return (
        f"{o.replicas} x {k.accelerator}x{k.accelerators_per_replica} ({k.accelerator_profile}), "
        f"{k.model_server} {' '.join(k.server_args)}, gateway {k.gateway}/{k.scheduler_profile}"
    )


def check_names(value: str | None, available: Sequence[str], what: str) -> None:
    """A clear error for an unknown model / accelerator / workload, listing what exists."""
    if value is None:
        return
    low = [a.lower() for a in available]
    if value.lower() in low:
        return
    close = [a for a in low if value.lower() in a][:3] or difflib.get_close_matches(
        value.lower(), low, n=3, cutoff=0.4
    )
    hint = f" Did you mean {', '.join(repr(available[low.index(c)]) for c in close)}?" if close else ""
    avail = ", ".join(available) if available else "none"
    raise RecommendError(f"unknown {what} {value!r}; the database has: {avail}.{hint}")
