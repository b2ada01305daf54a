"""`ingate quickstart curves|recommend`: the Inference Quickstart over the benchmark database.

Curves come from the database (`--db`, default `$INGATE_DB` or ~/.local/share/ingate/bench.db) and,
unless `--no-seed`, from the committed seed curves shipped with ingate (simulated; see
docs/quickstart-db.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ingate.bench.db import BenchDB, Series, default_db_path
from ingate.bench.dbcli import SEED_FILE, db_option, load_seed
from ingate.bench.recommend import (
    Option,
    RecommendError,
    Targets,
    check_names,
    describe,
    load_prices,
    recommend,
)


@dataclass
class Catalog:
    """Every curve the command may use, and where they came from."""

    series: list[Series]
    sources: list[str]


def gather(db_target: str | None, seed: bool) -> Catalog:
    """The curves of the database and (unless `seed` is False) of the seed file."""
    series: list[Series] = []
    sources: list[str] = []
    target = str(db_target or default_db_path())
    if db_target or Path(target).exists() or "://" in target:
        try:
            db = BenchDB(target)
        except ValueError as e:
            raise RecommendError(str(e)) from None
        try:
            series += db.series()
        finally:
            db.close()
        sources.append(target)
    if seed and SEED_FILE.exists():
        mem = BenchDB(":memory:")
        try:
            for key, run, points in load_seed():
                mem.record(key, run, points)
            series += mem.series()
        finally:
            mem.close()
        sources.append(f"seed curves ({SEED_FILE.name})")
    return Catalog(series, sources)


def select(
    cat: Catalog, model: str, accelerator: str | None, workload: str | None, db_target: str | None
) -> list[Series]:
    """The curves for model / accelerator / workload, or a RecommendError naming what exists."""
    if not cat.series:
        where = ", ".join(cat.sources) or str(db_target or default_db_path())
        raise RecommendError(
            f"the benchmark database is empty ({where}): load the seed curves with `ingate db seed`, "
            "import results with `ingate db import FILE...`, or record a run with `ingate bench run`"
        )
    check_names(model, sorted({s.key.model for s in cat.series}), "model")
    mine = [s for s in cat.series if s.key.model.lower() == model.lower()]
    check_names(accelerator, sorted({s.key.accelerator for s in mine}), f"accelerator for {model}")
    if accelerator:
        mine = [s for s in mine if s.key.accelerator.lower() == accelerator.lower()]
    wanted = [w.strip().lower() for w in (workload or "").split(",") if w.strip()]
    for w in wanted:
        check_names(w, sorted({s.key.workload for s in mine}), f"workload for {model}")
    if wanted:
        mine = [s for s in mine if s.key.workload.lower() in wanted]
    return mine


@click.command("curves")
@click.option("--model", required=True, help="Model name (as served).")
@click.option("--accelerator", default=None, help="Only this accelerator (e.g. h100, l4).")
@click.option("--workload", default=None, help="Only this workload (e.g. chat, rag, batch), or a comma list.")
@db_option
@click.option("--no-seed", is_flag=True, help="Leave out the committed seed curves.")
@click.option(
    "--out",
    "out_prefix",
    type=click.Path(dir_okay=False),
    default="quickstart-curves",
    show_default=True,
    help="Writes OUT.png and OUT.html.",
)
def curves_cmd(
    model: str,
    accelerator: str | None,
    workload: str | None,
    db_target: str | None,
    no_seed: bool,
    out_prefix: str,
) -> None:
    """Plot latency vs throughput per configuration (PNG + a self-contained HTML page with the table),
    simulated and measured points marked apart."""
    from ingate.bench.curves import write_curves

    try:
        series = select(gather(db_target, not no_seed), model, accelerator, workload, db_target)
    except RecommendError as e:
        raise click.ClickException(str(e)) from None
    norm = [s.normalised() for s in series]
    title = f"{model}" + (f" on {accelerator}" if accelerator else "") + (f", {workload}" if workload else "")
    png, page = Path(f"{out_prefix}.png"), Path(f"{out_prefix}.html")
    write_curves(norm, f"Latency vs throughput: {title}", png, page)
    click.echo(f"{len(norm)} curve(s): {png} {page}")


@click.command("recommend")
@click.option("--model", required=True, help="Model name (as served).")
@click.option("--rps", type=float, required=True, help="Request rate to serve (req/s).")
@click.option("--ttft-p90", type=float, required=True, help="p90 time to first token target (s).")
@click.option("--tpot-p90", type=float, default=None, help="p90 time per output token target (s).")
@click.option(
    "--workload",
    default="chat",
    show_default=True,
    help="Workload shape: chat, rag (long shared prefix), batch.",
)
@click.option("--accelerator", default=None, help="Only this accelerator.")
@click.option("--max-cost", type=float, default=None, help="Most to spend per hour (price table's currency).")
@click.option(
    "--prices", type=click.Path(exists=True, dir_okay=False), default=None, help="Price table YAML."
)
@db_option
@click.option("--no-seed", is_flag=True, help="Leave out the committed seed curves.")
@click.option("--top", type=int, default=5, show_default=True, help="Options to list.")
@click.option("--json", "as_json", is_flag=True, help="Print the options as JSON.")
@click.option(
    "--emit",
    type=click.Choice(["helm", "config", "bench"]),
    default=None,
    help="Write the choice out: Helm values, an ingate config, or an `ingate bench` workload that re-runs "
    "it on the simulated fleet (simulated curves).",
)
@click.option(
    "--out", type=click.Path(dir_okay=False), default=None, help="File for --emit (default stdout)."
)
@click.option(
    "--time-scale",
    type=float,
    default=0.2,
    show_default=True,
    help="--emit bench: simulator speed (below 1 = slower than real time, for small machines).",
)
@click.option(
    "--duration",
    type=float,
    default=150.0,
    show_default=True,
    help="--emit bench: wall-clock seconds of load.",
)
def recommend_cmd(
    model: str,
    rps: float,
    ttft_p90: float,
    tpot_p90: float | None,
    workload: str,
    accelerator: str | None,
    max_cost: float | None,
    prices: str | None,
    db_target: str | None,
    no_seed: bool,
    top: int,
    as_json: bool,
    emit: str | None,
    out: str | None,
    time_scale: float,
    duration: float,
) -> None:
    """The cheapest configurations whose curves meet the targets at --rps: accelerator, replicas,
    server arguments and gateway profile, with the margin and the cost per hour and per million output
    tokens. Rates between measured ones are interpolated; above the measured range a curve is never
    extrapolated (more replicas are used instead) and below it the lowest point stands in, said so."""
    t = Targets(rps=rps, ttft_p90=ttft_p90, tpot_p90=tpot_p90, max_cost_per_hour=max_cost)
    try:
        series = select(gather(db_target, not no_seed), model, accelerator, workload, db_target)
        table = load_prices(prices)
        rec = recommend(series, t, table)
    except RecommendError as e:
        raise click.ClickException(str(e)) from None
    console = Console(width=170)
    if not rec.options:
        msg = f"no configuration of {model} ({workload}) meets p90 TTFT <= {ttft_p90:g} s"
        msg += f", p90 TPOT <= {tpot_p90:g} s" if tpot_p90 is not None else ""
        msg += f" at {rps:g} req/s. Closest: {rec.closest}"
        if rec.unpriced:
            msg += f"; {len(rec.unpriced)} feasible option(s) have no price (add them to the price table)"
        raise click.ClickException(msg)
    if as_json:
        click.echo(json.dumps([o.to_json(t) for o in rec.options[:top]], indent=2))
    else:
        _print(console, rec.options[:top], t, model, workload)
    if emit:
        from ingate.bench.emit import bench_workload, helm_values, ingate_config

        if emit == "bench":
            try:
                text = bench_workload(rec.options[0], t, time_scale, duration)
            except ValueError as e:
                raise click.ClickException(f"--emit bench: {e}") from None
        else:
            text = (helm_values if emit == "helm" else ingate_config)(rec.options[0], t)
        if out:
            Path(out).write_text(text)
            click.echo(f"{emit} for the first choice written to {out}", err=as_json)
        else:
            click.echo(text)


def _fmt(v: float | None, f: str) -> str:
    return "-" if v is None else format(v, f)


def _print(console: Console, opts: list[Option], t: Targets, model: str, workload: str) -> None:
    title = f"{model}, {workload}: {t.rps:g} req/s with p90 TTFT <= {t.ttft_p90:g} s"
    title += f", p90 TPOT <= {t.tpot_p90:g} s" if t.tpot_p90 is not None else ""
    tab = Table(title=title)
    cols = ["#", "accelerator", "replicas", "profile", "gateway", "req/s each", "p90 TTFT (margin)"]
    cols += ["p90 TPOT", "$/h", "$/M out tok", "source", "curve"]
    for c in cols:
        tab.add_column(c)
    for i, o in enumerate(opts, 1):
        k, e = o.series.key, o.estimate
        src = o.series.run.kind + (" (estimated)" if o.series.run.estimated else "")
        curve = f"{k.replicas} replicas, {e.where}"
        tab.add_row(
            str(i),
            f"{k.accelerator} x{k.accelerators_per_replica}",
            str(o.replicas),
            k.accelerator_profile,
            f"{k.gateway}/{k.scheduler_profile}",
            f"{e.rate:.3g}",
            f"{_fmt(e.ttft_p90, '.3f')} s ({_fmt(o.ttft_margin(t), '+.3f')})",
            f"{_fmt(e.tpot_p90, '.4f')} s",
            _fmt(o.cost_per_hour, ".2f"),
            _fmt(o.cost_per_million_output_tokens, ".2f"),
            src,
            curve,
        )
    console.print(tab)
    best = opts[0]
    console.print(f"choice: {describe(best)}")
    console.print(
        f"  {best.estimate.rate:.3g} req/s per replica; predicted p90 TTFT {_fmt(best.estimate.ttft_p90, '.3f')} s "
        f"({best.estimate.where}; the curve spans {best.estimate.lo:.3g}-{best.estimate.hi:.3g} req/s per replica)"
    )
    for n in best.notes:
        console.print(f"  note: {n}")
    if best.price is not None:
        console.print(f"  price: {best.price.name or best.series.key.accelerator} {best.price.usd_per_hour}/h "
                      f"({best.price.source}, {best.price.date})")  # fmt: skip
