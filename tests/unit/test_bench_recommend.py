"""The recommender: its choice meets the target on its own curve, is the cheapest feasible one (property
tests on random curves), and interpolation never claims a point beyond the measured range."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from ingate.bench.db import BenchDB, CurveKey, Point, RunInfo, Series
from ingate.bench.recommend import (
    MAX_ERROR_RATE,
    MAX_REPLICAS,
    Price,
    RecommendError,
    Targets,
    estimate,
    load_prices,
    per_replica_points,
    recommend,
)
from ingate.cli import main
from ingate.config import GatewayConfig

PRICES = {"h100": Price(10.0), "l4": Price(1.0)}


def _series(i: int, acc: str, per: int, replicas: int, pts: list[Point], kind: str = "simulated") -> Series:
    key = CurveKey(
        f"m{0}", acc, per, f"{acc}-prof", "ingate-sim", (), replicas, "ingate", "default", "chat", "s"
    )
    run = RunInfo("test", kind, "cal", acc != "h100", "x")  # type: ignore[arg-type]
    return Series(i, i, key, run, pts)


@st.composite
def curves(draw: st.DrawFn) -> list[Series]:
    out = []
    for i in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 6))
        rates = sorted(draw(st.sets(st.floats(0.1, 50.0, allow_nan=False), min_size=n, max_size=n)))
        pts = []
        for r in rates:
            sent = 100
            pts.append(
                Point(
                    rate=r,
                    sent=sent,
                    ok=sent,
                    errors=draw(st.sampled_from([0, 0, 0, 1, 5])),
                    throughput_rps=r,
                    output_tok_s=r * draw(st.floats(10, 500)),
                    ttft_p90=draw(st.floats(0.01, 20.0)),
                    tpot_p90=draw(st.one_of(st.none(), st.floats(0.005, 0.5))),
                )
            )
        acc = draw(st.sampled_from(["h100", "l4", "tpu-unpriced"]))
        out.append(_series(i, acc, draw(st.integers(1, 4)), draw(st.integers(1, 4)), pts))
    return out


def _ref_value(pts: list[tuple[float, float | None]], x: float) -> float | None:
    """Reference linear interpolation (independent of the implementation)."""
    for (r0, a), (r1, b) in itertools.pairwise(pts):
        if r0 <= x <= r1:
            if a is None or b is None:
                return None
            return a + (b - a) * (x - r0) / (r1 - r0)
    return None


def _feasible(s: Series, k: int, t: Targets, tol: float = 1e-9) -> bool:
    """Brute-force feasibility of `k` replicas of curve `s` by the reference interpolation, with every
    bound loosened by `tol` (negative: tightened), so floating-point ties at a bound can go either way."""
    pts = [(p.rate / s.key.replicas, p) for p in s.points if p.rate]
    pts.sort(key=lambda t: t[0])
    x = t.rps / k
    if x > pts[-1][0]:
        return False
    if x <= pts[0][0]:
        p = pts[0][1]
        ttft, tpot, err = p.ttft_p90, p.tpot_p90, p.error_rate
    else:
        ttft = _ref_value([(r, p.ttft_p90) for r, p in pts], x)
        tpot = _ref_value([(r, p.tpot_p90) for r, p in pts], x)
        err_ = _ref_value([(r, p.error_rate) for r, p in pts], x)
        err = 1.0 if err_ is None else err_
    if ttft is None or ttft > t.ttft_p90 + tol or err > MAX_ERROR_RATE + tol:
        return False
    return t.tpot_p90 is None or (tpot is not None and tpot <= t.tpot_p90 + tol)


def _cheapest(series: list[Series], t: Targets, tol: float) -> float:
    best = math.inf
    for s in series:
        price = PRICES.get(s.key.accelerator)
        if price is None:
            continue
        for k in range(1, MAX_REPLICAS + 1):
            if _feasible(s, k, t, tol):
                cost = k * s.key.accelerators_per_replica * price.usd_per_hour
                if t.max_cost_per_hour is None or cost <= t.max_cost_per_hour:
                    best = min(best, cost)
                break  # cost grows with k: the first feasible k is this curve's cheapest
    return best


targets = st.builds(
    Targets,
    rps=st.floats(0.5, 200.0),
    ttft_p90=st.floats(0.05, 10.0),
    tpot_p90=st.one_of(st.none(), st.floats(0.01, 0.3)),
    max_cost_per_hour=st.one_of(st.none(), st.floats(1.0, 2000.0)),
)


@settings(max_examples=150, deadline=None)
@given(series=curves(), t=targets)
def test_choice_meets_target_on_its_curve_and_is_cheapest(series: list[Series], t: Targets) -> None:
    rec = recommend(series, t, PRICES)
    # The brute-force minimum with bounds a hair tighter and a hair looser than the targets: the
    # choice lies between (equal to both unless an interpolated value sits exactly on a bound).
    strict, loose = _cheapest(series, t, -1e-9), _cheapest(series, t, 1e-9)
    if not rec.options:
        assert strict == math.inf
        assert rec.closest
        return
    o = rec.options[0]
    assert o.cost_per_hour is not None
    assert loose - 1e-9 <= o.cost_per_hour <= strict + 1e-9
    # Meets the targets on its own curve, at the per-replica rate it serves.
    assert _feasible(o.series, o.replicas, t)
    assert o.estimate.ttft_p90 is not None and o.estimate.ttft_p90 <= t.ttft_p90
    assert o.ttft_margin(t) is not None and o.ttft_margin(t) >= 0  # type: ignore[operator]
    assert o.estimate.rate * o.replicas == pytest.approx(t.rps)
    assert o.estimate.rate <= o.estimate.hi + 1e-12  # never beyond the measured range
    costs = [x.cost_per_hour for x in rec.options]
    assert costs == sorted(costs)  # type: ignore[type-var]


@settings(max_examples=200, deadline=None)
@given(series=curves(), x=st.floats(0.001, 200.0))
def test_interpolation_never_claims_a_point_beyond_the_measured_range(series: list[Series], x: float) -> None:
    for s in series:
        pts = per_replica_points(s)
        e = estimate(pts, x)
        lo, hi = pts[0][0], pts[-1][0]
        if x > hi:
            assert e is None
            continue
        assert e is not None and (e.lo, e.hi) == (lo, hi)
        if x < lo:
            assert e.where == "below-range" and e.ttft_p90 == pts[0][1].ttft_p90
        elif any(r == x for r, _ in pts):
            assert e.where == "on-curve"
        else:
            assert e.where == "interpolated"
            i = next(j for j, (r, _) in enumerate(pts) if r > x)
            a, b = pts[i - 1][1].ttft_p90, pts[i][1].ttft_p90
            assert a is not None and b is not None and e.ttft_p90 is not None
            assert min(a, b) - 1e-9 <= e.ttft_p90 <= max(a, b) + 1e-9


def _pts(rates: list[float], ttfts: list[float], tpot: float = 0.02) -> list[Point]:
    return [
        Point(rate=r, sent=100, ok=100, throughput_rps=r, output_tok_s=r * 100, ttft_p90=t, tpot_p90=tpot)
        for r, t in zip(rates, ttfts, strict=True)
    ]


def test_a_worked_choice_with_scaling_and_cost() -> None:
    # One H100 replica: p90 TTFT 0.1 s at 2 req/s, 0.3 at 4, 2.0 at 6. 10 req/s within 0.5 s needs
    # 3 replicas (3.33 req/s each: 0.1 + 0.2 x 1.33/2 = 0.233 s), not 2 (5 req/s each: 1.15 s).
    h100 = _series(1, "h100", 1, 1, _pts([2, 4, 6], [0.1, 0.3, 2.0]))
    # One L4: within 0.5 s up to 0.25 req/s: 40 replicas x $1/h = $40/h.
    l4 = _series(2, "l4", 1, 1, _pts([0.1, 0.3], [0.2, 0.6]))
    rec = recommend([h100, l4], Targets(rps=10, ttft_p90=0.5), PRICES)
    o = rec.options[0]
    assert (o.series.key.accelerator, o.replicas) == ("h100", 3)
    assert o.estimate.ttft_p90 == pytest.approx(0.1 + 0.2 * (10 / 3 - 2) / 2)
    assert o.cost_per_hour == pytest.approx(30.0)
    assert o.cost_per_million_output_tokens == pytest.approx(30.0 / (10 * 100 * 3600) * 1e6)
    assert any("scaled from a 1-replica curve" in n for n in o.notes)
    assert any("simulated" in n for n in o.notes)
    l4_opt = rec.options[1]
    assert l4_opt.series.key.accelerator == "l4" and l4_opt.replicas == 40
    assert l4_opt.cost_per_hour == pytest.approx(40.0)
    # A budget below $30/h leaves nothing: the closest (cheapest over budget) is named.
    rec = recommend([h100], Targets(rps=10, ttft_p90=0.5, max_cost_per_hour=20), PRICES)
    assert not rec.options and rec.closest and "costs 30.00/h" in rec.closest
    # Impossible latency: the closest says the lowest reachable p90 TTFT.
    rec = recommend([h100, l4], Targets(rps=10, ttft_p90=0.01), PRICES)
    assert not rec.options and rec.closest and "relax --ttft-p90 to at least 0.1 s" in rec.closest


def test_below_the_measured_range_says_so() -> None:
    s = _series(1, "h100", 1, 1, _pts([2, 4], [0.1, 0.3]))
    rec = recommend([s], Targets(rps=0.5, ttft_p90=1.0), PRICES)
    (o,) = rec.options
    assert o.replicas == 1 and o.estimate.where == "below-range"
    assert any("below the lowest measured rate" in n for n in o.notes)


def test_bad_targets_are_refused() -> None:
    with pytest.raises(RecommendError, match="must be positive"):
        recommend([], Targets(rps=0, ttft_p90=1.0), PRICES)


def test_price_table_is_dated_and_sourced() -> None:
    prices = load_prices()
    assert {"h100", "l4"} <= set(prices)
    for p in prices.values():
        assert p.usd_per_hour > 0 and p.source and p.date


def _db_with(tmp_path: Path, *series: Series) -> str:
    db = BenchDB(tmp_path / "q.db")
    for s in series:
        db.record(s.key, s.run, s.points)
    db.close()
    return str(tmp_path / "q.db")


def test_cli_bad_input_names_what_is_available(tmp_path: Path) -> None:
    db = _db_with(tmp_path, _series(1, "h100", 1, 1, _pts([2, 4, 6], [0.1, 0.3, 2.0])))
    base = ["quickstart", "recommend", "--db", db, "--no-seed", "--rps", "10", "--ttft-p90", "0.5"]
    r = CliRunner().invoke(main, [*base, "--model", "m1"])
    assert r.exit_code != 0 and "unknown model 'm1'" in r.output and "m0" in r.output
    assert "Did you mean 'm0'" in r.output
    r = CliRunner().invoke(main, [*base, "--model", "m0", "--accelerator", "a100"])
    assert r.exit_code != 0 and "unknown accelerator for m0 'a100'" in r.output and "h100" in r.output
    r = CliRunner().invoke(main, [*base, "--model", "m0", "--workload", "rag"])
    assert r.exit_code != 0 and "unknown workload for m0 'rag'" in r.output and "chat" in r.output
    r = CliRunner().invoke(main, [*base[:-1], "0.01", "--model", "m0"])
    assert r.exit_code != 0 and "relax --ttft-p90 to at least 0.1 s" in r.output
    empty = str(tmp_path / "empty.db")
    r = CliRunner().invoke(
        main, ["quickstart", "recommend", "--db", empty, "--no-seed", "--model", "m0", *base[5:]]
    )
    assert r.exit_code != 0 and "the benchmark database is empty" in r.output and "ingate db seed" in r.output


def test_cli_recommends_and_emits_a_valid_config(tmp_path: Path) -> None:
    db = _db_with(tmp_path, _series(1, "h100", 1, 1, _pts([2, 4, 6], [0.1, 0.3, 2.0])))
    out = tmp_path / "cfg.yaml"
    args = ["quickstart", "recommend", "--db", db, "--no-seed", "--model", "m0", "--rps", "10"]
    args += ["--ttft-p90", "0.5", "--emit", "config", "--out", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "h100 x1" in r.output
    assert f"{3 * load_prices()['h100'].usd_per_hour:.2f}" in r.output  # 3 replicas at the table's price
    text = out.read_text()
    assert "ingate sim --replicas 3" in text
    cfg = GatewayConfig.model_validate(yaml.safe_load(text))
    assert len(cfg.pool.endpoints) == 3 and cfg.models.served == ["m0"]
    helm = tmp_path / "values.yaml"
    r = CliRunner().invoke(main, [*args[:-4], "--emit", "helm", "--out", str(helm)])
    assert r.exit_code == 0, r.output
    text = helm.read_text()
    values = yaml.safe_load(text)
    _chart_schema_validates(values)
    assert values["router"]["epp"]["config"]["models"]["served"] == ["m0"]
    # The chart renders with them, and the picker's config in its ConfigMap is a valid ingate config.
    from ingate.kube.render import render

    cm = next(d for d in render(values) if d["kind"] == "ConfigMap")
    picker = GatewayConfig.model_validate(yaml.safe_load(cm["data"]["config.yaml"]))
    assert picker.models.served == ["m0"]
    assert values["router"]["modelServers"]["type"] == "vllm"
    assert "3 vllm pod(s)" in text and "nvidia.com/gpu: 1" in text and "nvidia-h100-80gb" in text


def _chart_schema_validates(values: dict[str, object]) -> None:
    import jsonschema

    root = Path(__file__).resolve().parents[2]
    schema = json.loads((root / "deploy/helm/ingate/values.schema.json").read_text())
    jsonschema.Draft7Validator(schema).validate(values)  # what `helm install -f` checks (draft-07)


def test_helm_values_name_the_device_and_node_label_of_the_accelerator() -> None:
    from ingate.bench.emit import helm_values

    for acc, resource, value in (
        ("tpu-v6e", "google.com/tpu: 1", "cloud.google.com/gke-tpu-accelerator: tpu-v6e-slice"),
        ("l4", "nvidia.com/gpu: 1", "cloud.google.com/gke-accelerator: nvidia-l4"),
    ):
        s = _series(1, acc, 1, 1, _pts([2, 4], [0.1, 0.3]))
        rec = recommend([s], Targets(rps=4, ttft_p90=0.5), {acc: Price(1.0)})
        text = helm_values(rec.options[0], Targets(rps=4, ttft_p90=0.5))
        _chart_schema_validates(yaml.safe_load(text))
        assert resource in text and value in text


def test_emit_bench_reruns_the_choice_on_the_simulated_fleet() -> None:
    from ingate.bench.emit import bench_workload
    from ingate.bench.importers import load_bench_file
    from ingate.bench.workload import SEED_SETS, Workload

    root = Path(__file__).resolve().parents[2]
    path = sorted((root / "benchmarks/results/eval").glob("mixed_*.json"))[-1]
    series = [
        Series(i, i, k, r, p) for i, (k, r, p) in enumerate(load_bench_file(path)) if k.gateway == "ingate"
    ]
    t = Targets(rps=30, ttft_p90=2.0)
    rec = recommend(series, t, PRICES)
    o = rec.options[0]
    wl = Workload.model_validate(yaml.safe_load(bench_workload(o, t, time_scale=0.1, duration_s=60)))
    src = json.loads(path.read_text())["workload"]
    assert wl.data.model_dump() == src["data"] and wl.model == src["model"]  # the curve's request shape
    base = src["seed"] - SEED_SETS[src.get("seed_set", "tuning")]
    assert wl.seed_set == "eval" and wl.seed == base + SEED_SETS["eval"]  # held-out seeds
    assert wl.load.rates == [pytest.approx(3.0)] and wl.load.duration_s == 60
    assert wl.slo.ttft_s == pytest.approx(20.0)  # 2 s of modelled time at a tenth of real speed
    assert wl.fleet.replicas == o.replicas and wl.fleet.args[-2:] == ["--time-scale", "0.1"]
    assert "--time-scale" not in wl.fleet.args[:-2] and wl.systems == ["ingate"]
    # A curve that does not record its request shape cannot be re-run.
    bare = _series(1, "h100", 1, 1, _pts([2, 4], [0.1, 0.3]))
    o2 = recommend([bare], Targets(rps=4, ttft_p90=0.5), PRICES).options[0]
    with pytest.raises(ValueError, match="does not record its request shape"):
        bench_workload(o2, Targets(rps=4, ttft_p90=0.5))
