"""`ingate db`: load benchmark results into the benchmark database and look at what it holds."""

from __future__ import annotations

from pathlib import Path

import click
import orjson
from rich.console import Console
from rich.table import Table

from ingate.bench.db import BenchDB, default_db_path, series_from_json, series_to_json
from ingate.bench.importers import ImportError_, Triple, load_bench_file, load_inference_perf

SEED_FILE = Path(__file__).with_name("seed_curves.json")
"""The committed seed curves (`make quickstart-seed` regenerates them)."""


def db_option(f: click.decorators.FC) -> click.decorators.FC:
    """The shared `--db PATH|URL` option."""
    return click.option(
        "--db",
        "db_target",
        default=None,
        help="Benchmark database: a SQLite file path or a SQLAlchemy URL "
        "(default: $INGATE_DB, else ~/.local/share/ingate/bench.db).",
    )(f)


def open_db(target: str | None) -> BenchDB:
    """Open (create) the database `target` or the default one; a clear CLI error if it cannot."""
    try:
        return BenchDB(target or default_db_path())
    except ValueError as e:
        raise click.ClickException(str(e)) from None


def record_all(db: BenchDB, triples: list[Triple]) -> int:
    """Record every (key, run, points) triple; returns the number of points stored."""
    n = 0
    for key, run, points in triples:
        db.record(key, run, points)
        n += len(points)
    return n


def record_results(path: Path, target: str | None) -> tuple[int, str]:
    """Record an `ingate bench` results file into the database (what `ingate bench run` does after a
    run); returns (points stored, database)."""
    db = open_db(target)
    try:
        return record_all(db, load_bench_file(path)), db.target
    finally:
        db.close()


def load_seed(path: Path = SEED_FILE) -> list[Triple]:
    """The seed curves as (key, run, points) triples."""
    doc = orjson.loads(path.read_bytes())
    return series_from_json(doc["series"])


@click.group("db")
def db_group() -> None:
    """The benchmark database: latency-vs-throughput curves for `ingate quickstart curves|recommend`."""


@db_group.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@db_option
@click.option("--model", default=None, help="inference-perf reports: the model served.")
@click.option(
    "--accelerator", default=None, help="inference-perf reports: accelerator type (as in prices.yaml)."
)
@click.option("--accelerators-per-replica", type=int, default=1, show_default=True)
@click.option("--model-server", default="vllm", show_default=True, help="inference-perf reports: engine.")
@click.option(
    "--server-args", default="", help="inference-perf reports: the engine's arguments (one string)."
)
@click.option("--replicas", type=int, default=1, show_default=True)
@click.option("--gateway", default="ingate", show_default=True)
@click.option("--scheduler-profile", default="default", show_default=True)
@click.option("--workload", default=None, help="inference-perf reports: workload name (default: dir name).")
@click.option(
    "--kind",
    type=click.Choice(["measured", "simulated"]),
    default="measured",
    show_default=True,
    help="inference-perf reports: measured on real hardware, or against a simulator.",
)
@click.option("--calibration", default="", help="inference-perf reports: engine version / notes.")
def import_cmd(
    paths: tuple[str, ...],
    db_target: str | None,
    model: str | None,
    accelerator: str | None,
    accelerators_per_replica: int,
    model_server: str,
    server_args: str,
    replicas: int,
    gateway: str,
    scheduler_profile: str,
    workload: str | None,
    kind: str,
    calibration: str,
) -> None:
    """Load `ingate bench` results JSON files and inference-perf report directories (or their
    `*_lifecycle_metrics.json` files) into the database. inference-perf does not record the deployment
    it measured, so give --model and --accelerator (and replicas, gateway, ...) for its reports."""
    db = open_db(db_target)
    total = 0
    try:
        for raw in paths:
            p = Path(raw)
            try:
                if p.is_dir() or _is_iperf(p):
                    if not model or not accelerator:
                        raise click.UsageError(
                            f"{p}: an inference-perf report needs --model and --accelerator "
                            "(it does not record the deployment it measured)"
                        )
                    triples = load_inference_perf(
                        p,
                        model=model,
                        accelerator=accelerator,
                        accelerators_per_replica=accelerators_per_replica,
                        model_server=model_server,
                        server_args=server_args.split(),
                        replicas=replicas,
                        gateway=gateway,
                        scheduler_profile=scheduler_profile,
                        workload=workload or "",
                        kind=kind,
                        calibration=calibration,
                    )
                else:
                    triples = load_bench_file(p)
            except ImportError_ as e:
                raise click.ClickException(str(e)) from None
            n = record_all(db, triples)
            total += n
            click.echo(f"{p}: {len(triples)} curve(s), {n} point(s)")
        click.echo(f"{total} point(s) recorded into {db.target}")
    finally:
        db.close()


def _is_iperf(p: Path) -> bool:
    return p.name.endswith("_lifecycle_metrics.json")


@db_group.command("seed")
@db_option
def seed_cmd(db_target: str | None) -> None:
    """Load the committed seed curves (simulated; see docs/quickstart-db.md) into the database."""
    db = open_db(db_target)
    try:
        n = record_all(db, load_seed())
        click.echo(f"{n} seed point(s) recorded into {db.target}")
    finally:
        db.close()


@db_group.command("list")
@db_option
@click.option("--model", default=None)
@click.option("--accelerator", default=None)
@click.option("--workload", default=None)
def list_cmd(db_target: str | None, model: str | None, accelerator: str | None, workload: str | None) -> None:
    """List the curves in the database (newest run of each), with their provenance."""
    db = open_db(db_target)
    try:
        series = db.series(model=model, accelerator=accelerator, workload=workload)
    finally:
        db.close()
    if not series:
        click.echo(f"{db.target}: no curves match (load some with `ingate db import` or `ingate db seed`)")
        return
    t = Table(title=f"curves in {db.target}")
    for col in (
        "model",
        "accelerator",
        "replicas",
        "gateway",
        "workload",
        "points",
        "rates (req/s)",
        "source",
    ):
        t.add_column(col)
    for s in series:
        n = s.normalised()
        rates = [p.rate for p in n.points if p.rate is not None]
        src = f"{s.run.kind}{' (estimated profile)' if s.run.estimated else ''}, {s.run.tool}"
        t.add_row(
            s.key.model,
            f"{s.key.accelerator} x{s.key.accelerators_per_replica}",
            str(s.key.replicas),
            f"{s.key.gateway}/{s.key.scheduler_profile}",
            s.key.workload,
            str(len(s.points)),
            f"{min(rates):g}-{max(rates):g}" if rates else "-",
            src,
        )
    Console(width=160).print(t)


@db_group.command("export")
@click.argument("out", type=click.Path(dir_okay=False))
@db_option
def export_cmd(out: str, db_target: str | None) -> None:
    """Write the newest run of every curve as JSON (the seed file's format)."""
    db = open_db(db_target)
    try:
        items = series_to_json(db.series())
    finally:
        db.close()
    Path(out).write_bytes(
        orjson.dumps({"format": "ingate-curves/1", "series": items}, option=orjson.OPT_INDENT_2)
    )
    click.echo(f"{len(items)} curve(s) written to {out}")
