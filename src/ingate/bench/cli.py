"""`ingate bench`: run workloads, render reports, regenerate the committed results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import orjson
from pydantic import ValidationError
from rich.console import Console

from ingate.bench.plots import plot
from ingate.bench.runner import run_workload
from ingate.bench.stats import resummarize
from ingate.bench.tables import headline_markdown, markdown_table, print_table
from ingate.bench.workload import Workload, load_workload, with_seed_set

RESULTS_DIR = Path("benchmarks/results")
ALL_WORKLOADS = ("benchmarks/workloads/shared-prefix.yaml", "benchmarks/workloads/mixed.yaml")


@click.group()
def bench() -> None:
    """Benchmark harness: load sweeps against ingate, baselines and peers; reports and plots."""


@bench.command("run")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False), default=str(RESULTS_DIR), show_default=True
)
@click.option("--systems", default=None, help="Comma list overriding the config's systems.")
@click.option(
    "--streams",
    type=click.IntRange(1, 9),
    default=None,
    help="Request streams per system (overrides load.streams): each reruns the sweep with new seeds "
    "on a fresh fleet, and each point pools them.",
)
@click.option(
    "--first-stream",
    type=click.IntRange(0, 99),
    default=None,
    help="Index of the first request stream (overrides load.first_stream): streams K, K+1, ... run, so "
    "a second run adds new seeds to a measurement instead of repeating streams 0, 1, ...",
)
@click.option(
    "--eval",
    "evaluation",
    is_flag=True,
    help="Use the held-out evaluation seeds (seed + 10,000) instead of the tuning seeds: what every "
    "published number comes from.",
)
@click.option(
    "--rates", default=None, help="Comma list of offered rates (req/s) overriding load.rates, e.g. to "
    "extend a sweep past every system's knee.",
)  # fmt: skip
@click.option(
    "--duration", "duration_s", type=float, default=None, help="Seconds per rate (overrides load.duration_s)."
)
@click.option("--no-report", is_flag=True, help="Skip the table and PNG.")
@click.option(
    "--db",
    "db_target",
    default=None,
    help="Also record the curves into this benchmark database (SQLite path or SQLAlchemy URL; default "
    "$INGATE_DB, else ~/.local/share/ingate/bench.db). See `ingate db`.",
)
@click.option("--no-db", is_flag=True, help="Do not record into the benchmark database.")
def run_cmd(
    config: str,
    out_dir: str,
    systems: str | None,
    streams: int | None,
    first_stream: int | None,
    evaluation: bool,
    rates: str | None,
    duration_s: float | None,
    no_report: bool,
    db_target: str | None,
    no_db: bool,
) -> None:
    """Run the workload in CONFIG against each system; write JSON (and a PNG + table) under --out, and
    record the curves into the benchmark database."""
    wl = load_workload(config)
    if evaluation:
        wl = with_seed_set(wl, "eval")
    if systems:
        wl.systems = [s.strip() for s in systems.split(",") if s.strip()]
    if streams is not None:
        wl.load.streams = streams
    if first_stream is not None:
        wl.load.first_stream = first_stream
    if rates and wl.tenants:
        raise click.BadParameter(
            "not for workloads with tenants (their rates are per tenant)", param_hint="--rates"
        )
    if rates:
        try:
            wl.load.rates = [float(r) for r in rates.split(",") if r.strip()]
        except ValueError:
            raise click.BadParameter(f"{rates!r}: a comma list of numbers", param_hint="--rates") from None
    if duration_s is not None:
        wl.load.duration_s = duration_s
    try:  # the overrides together (e.g. streams past the last a multi-tenant workload has)
        wl = Workload.model_validate(wl.model_dump())
    except ValidationError as e:
        raise click.UsageError(f"{config} with these options: {e}") from None
    console = Console()
    path = run_workload(wl, Path(out_dir), console)
    _after_run(path, console, report=not no_report, record=not no_db, db_target=db_target)


def _from_stream(first: int) -> str:
    return f" from stream {first}" if first else ""


def _after_run(path: Path, console: Console, *, report: bool, record: bool, db_target: str | None) -> None:
    """What follows a run (`run`, `rerun`): where its results are, the curves into the benchmark
    database (`record`), the table and PNG (`report`), the latency model's errors."""
    console.print(f"results: {path}")
    if record:
        from ingate.bench.dbcli import record_results

        n, where = record_results(path, db_target)
        console.print(f"benchmark database: {n} point(s) recorded into {where}")
    if report:
        _report([path], path.with_suffix(".png"), None, console)
    _print_prediction_errors(path, console)


def _print_prediction_errors(path: Path, console: Console) -> None:
    """The latency model's prediction errors each ingate system exported (its window of the last 2,000
    predictions; over several streams, the windows' quantiles weighted by their sizes), and on a fleet
    of several simulator profiles, by profile (from the per-endpoint windows)."""
    for entry in orjson.loads(path.read_bytes())["systems"]:
        for key, q in (entry.get("info") or {}).get("latency_prediction_error", {}).items():
            n = int(q["n"])
            k = int(q.get("streams", 1))
            where = (
                f"over its last {min(n, 2000)} of {n} predictions"
                if k == 1
                else f"over {k} streams' windows ({n} predictions; quantiles weighted by window size)"
            )
            console.print(
                f"{entry['name']}: latency model {key} |error|/actual {where} after warm-up: "
                f"median {q.get('0.5', float('nan')):.0%}, "
                f"p90 {q.get('0.9', float('nan')):.0%}"
            )
            by_class = (entry.get("info") or {}).get("latency_prediction_error_by_class", {}).get(key, {})
            for cls, c in sorted(by_class.items()):
                console.print(
                    f"  on {cls} ({int(c.get('endpoints', 0)) or '?'} endpoint(s) per stream, last "
                    f"{int(c.get('window', 0))} predictions): median {c.get('0.5', float('nan')):.0%}, "
                    f"p90 {c.get('0.9', float('nan')):.0%}"
                )


def _report(paths: list[Path], png: Path, md: Path | None, console: Console) -> None:
    # Summaries are recomputed from the records: one definition of goodput and percentiles for every
    # file, whichever version of the harness wrote it.
    results: list[dict[str, Any]] = [resummarize(orjson.loads(p.read_bytes())) for p in paths]
    print_table(results, console)
    console.print(f"plot: {plot(results, png)}")
    if md is not None:
        md.write_text(headline_markdown(results) + "\n" + markdown_table(results))
        console.print(f"markdown: {md}")


@bench.command("report")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--png", type=click.Path(dir_okay=False), default=None, help="Plot path (default: next to the first)."
)
@click.option(
    "--markdown", type=click.Path(dir_okay=False), default=None, help="Also write a markdown table."
)
def report_cmd(results: tuple[str, ...], png: str | None, markdown: str | None) -> None:
    """Render tables and plots (TTFT/e2e percentiles vs throughput, goodput) from RESULTS JSON files."""
    paths = [Path(p) for p in results]
    _report(
        paths,
        Path(png) if png else paths[0].with_suffix(".png"),
        Path(markdown) if markdown else None,
        Console(),
    )


@bench.command("all")
def all_cmd() -> None:
    """Regenerate the committed results (shared-prefix and mixed workloads, evaluation seeds) and the
    markdown table."""
    console = Console()
    paths = [
        run_workload(with_seed_set(load_workload(w), "eval"), RESULTS_DIR, console) for w in ALL_WORKLOADS
    ]
    for p in paths:
        plot([orjson.loads(p.read_bytes())], p.with_suffix(".png"))
    _report(paths, RESULTS_DIR / "bench_all.png", RESULTS_DIR / "bench_table.md", console)


@bench.command("rerun")
@click.argument("results", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--cited",
    "docs",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Also rerun every `ingate bench run` results file this markdown file names (repeatable), "
    "e.g. README.md and benchmarks/README.md after a change of the default profile.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory for the new files (default: beside each original).",
)
@click.option(
    "--dry-run", is_flag=True, help="List what would run and how long it took last time; run nothing."
)
@click.option(
    "--db", "db_target", default=None, help="Also record the new curves into this benchmark database."
)
def rerun_cmd(results: tuple[str, ...], docs: tuple[str, ...], out_dir: str | None, dry_run: bool,
              db_target: str | None) -> None:  # fmt: skip
    """Rerun RESULTS (files written by `ingate bench run`) exactly as they were run: the workload each
    file stores (its seeds, rates, streams, fleet, gateway settings) against the systems it holds, in
    the same order. Writes a new timestamped file (and PNG) per run; the originals stay until you
    replace them (`ingate bench archive`)."""
    from ingate.bench.rerun import RerunError, cited, plan

    console = Console()
    paths = [Path(p) for p in results]
    from_docs: list[Path] = []
    for doc in docs:
        from_docs += [p for p in cited(Path(doc), RESULTS_DIR) if p not in paths and p not in from_docs]
    if not paths and not from_docs:
        hint = f" (none of the files named in {', '.join(docs)} is under {RESULTS_DIR}/: run from the repository root)"
        raise click.UsageError("nothing to rerun: give RESULTS files or --cited DOC" + (hint if docs else ""))
    runs = []
    for p in paths:
        try:
            runs.append(plan(p))
        except RerunError as e:
            raise click.ClickException(str(e)) from None
    for p in from_docs:
        try:
            runs.append(plan(p))
        except RerunError as e:
            console.print(f"skipped (cited, not rerunnable here): {e}", soft_wrap=True)
    total = 0.0
    for r in runs:
        w = r.workload
        took = "?" if r.previous_wall_s is None else f"{r.previous_wall_s / 60:.0f} min"
        total += r.previous_wall_s or 0.0
        load = (
            f"concurrency {', '.join(map(str, w.load.concurrency))}"
            if w.load.type == "concurrent"
            else f"rates {', '.join(f'{x:g}' for x in w.load.rates)}"
        )
        console.print(
            f"{r.source}: {w.name}, {w.seed_set} seeds (seed {w.seed}), {load} x {w.load.duration_s:g} s, "
            f"{w.load.streams} stream(s){_from_stream(w.load.first_stream)}; systems {', '.join(r.systems)}; took {took}",
            soft_wrap=True,
        )
    console.print(f"{len(runs)} run(s), about {total / 60:.0f} min by their last wall times")
    if dry_run:
        return
    for r in runs:
        path = run_workload(r.workload, Path(out_dir) if out_dir else r.source.parent, console)
        console.print(f"rerun of {r.source}")
        _after_run(path, console, report=True, record=db_target is not None, db_target=db_target)
        if r.source.with_name(r.source.stem + "_knees.json").exists():  # the original had a knee table
            console.print(_write_knees(path))


@bench.command("merge")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory for the merged file (default: beside the first).",
)
@click.option("--no-report", is_flag=True, help="Skip the table and PNG.")
def merge_cmd(results: tuple[str, ...], out_dir: str | None, no_report: bool) -> None:
    """Merge RESULTS of one workload run over different request streams (`run --first-stream`) into
    one results file, as if every stream had run at once: points pooled, summaries recomputed, the
    latency model's errors pooled over all streams. The streams must join up (0-5 and 6-11), so
    `ingate bench rerun` can repeat the merged file. The originals stay until you archive them."""
    from ingate.bench.merge import MergeError, write_merged

    paths = [Path(p) for p in results]
    try:
        path = write_merged(paths, Path(out_dir) if out_dir else paths[0].parent)
    except MergeError as e:
        raise click.ClickException(str(e)) from None
    console = Console()
    console.print(f"merged {len(paths)} file(s)")
    _after_run(path, console, report=not no_report, record=False, db_target=None)


@bench.command("archive")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--index",
    type=click.Path(dir_okay=False),
    default=str(RESULTS_DIR / "archive.json"),
    show_default=True,
    help="The archive index the summaries are appended to.",
)
def archive_cmd(results: tuple[str, ...], index: str) -> None:
    """Replace superseded RESULTS files (and their PNGs and knee tables) by compact summaries in the archive index;
    the full files stay in git history (the index names the commit)."""
    from ingate.bench.archive import archive

    added = archive([Path(p) for p in results], Path(index), Path.cwd())
    click.echo(f"archived {len(added)} result file(s) into {index}")


@bench.command("install-peers")
def install_peers_cmd() -> None:
    """Install the peer routers (sglang-router, vllm-router; exact pins) into their own venv."""
    from ingate.bench.peers import PEERS, PeerUnavailable, install_peers

    try:
        venv = install_peers()
    except PeerUnavailable as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"peers installed in {venv}: {', '.join(p.requirement for p in PEERS.values())}")


@bench.command("tokenizer")
@click.argument("out_dir", type=click.Path(file_okay=False))
def tokenizer_cmd(out_dir: str) -> None:
    """Write a local HF-format tokenizer (simulator's counting rule) to OUT_DIR, for inference-perf."""
    from ingate.bench.tokenizer import build_tokenizer

    click.echo(f"tokenizer written to {build_tokenizer(out_dir)}")


@bench.command("async")
@click.option(
    "--out", "out_dir", default=str(RESULTS_DIR / "async"), show_default=True, help="Results folder."
)
@click.option("--duration", "duration_s", default=60.0, show_default=True, help="Seconds per scenario.")
@click.option("--backlog", default=10_000, show_default=True, help="Async messages queued at the start.")
@click.option("--replicas", default=2, show_default=True)
@click.option("--max-num-seqs", default=8, show_default=True)
@click.option("--time-scale", default=1.0, show_default=True)
@click.option("--rt-load", default=0.35, show_default=True, help="Real-time rate as a fraction of capacity.")
@click.option("--capacity-s", default=20.0, show_default=True, help="Seconds of the capacity measurement.")
@click.option(
    "--gates",
    default=",".join(("ingate", "ingate-window-only", "prometheus-saturation", "prometheus-budget")),
    show_default=True,
    help="Comma list of async gates to compare.",
)
@click.option(
    "--preemption", is_flag=True, help="Replicas preempt lower-priority work; the gateway sends priorities."
)
@click.option(
    "--reserve-slots", default=0, show_default=True, type=click.IntRange(0, None),
    help="The ingate gate leaves this many free batch slots to real-time arrivals.",
)  # fmt: skip
@click.option(
    "--runs", default=1, show_default=True, type=click.IntRange(1, 20),
    help="Repeat every scenario on independent seeds (run k shifts seeds by 100 k); pooled summary.",
)  # fmt: skip
@click.option(
    "--eval", "eval_seeds", is_flag=True,
    help="Evaluation seeds (docs/benchmarks.md): the numbers docs may quote.",
)  # fmt: skip
@click.option(
    "--add-runs", is_flag=True,
    help="Add the new runs to OUT/results.json (same parameters; the runs continue its seeds) and pool "
    "them all: to extend an evaluation decided in advance, never to rerun until a number looks good.",
)  # fmt: skip
def async_cmd(out_dir: str, gates: str, eval_seeds: bool, add_runs: bool, **kw: Any) -> None:
    """Real-time p99 TTFT alone vs with an async backlog; idle capacity used; llm-d-async's gates."""
    from ingate.bench.asyncbench import GATES, HEADER, Params, run_bench, table
    from ingate.bench.asyncruns import HEADER as RUNS_HEADER
    from ingate.bench.asyncruns import table as runs_table

    chosen = tuple(g for g in gates.split(",") if g)
    bad = [g for g in chosen if g not in GATES]
    if bad:
        raise click.BadParameter(f"unknown gates {bad}; known: {', '.join(GATES)}", param_hint="--gates")
    console = Console()
    seed_set = "eval" if eval_seeds else "tuning"
    earlier = None
    if add_runs:
        prev = Path(out_dir) / "results.json"
        if not prev.is_file():
            raise click.BadParameter(f"{prev} does not exist", param_hint="--add-runs")
        earlier = orjson.loads(prev.read_bytes())
    try:
        results = run_bench(
            Params(gates=chosen, seed_set=seed_set, **kw), Path(out_dir), log=console.print, add_to=earlier
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    from rich.table import Table

    if len(results["runs"]) > 1:
        header, rows = RUNS_HEADER, runs_table(results["summary"])
        title = f"ingate bench async ({results['started']}, {len(results['runs'])} runs, {seed_set} seeds)"
    else:
        header, rows = HEADER, table(results)
        title = f"ingate bench async ({results['started']}, {seed_set} seeds)"
    t = Table(*header, title=title)
    for row in rows:
        t.add_row(*row)
    console.print(t)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    (Path(out_dir) / "results.md").write_text("\n".join(md) + "\n")
    console.print(f"wrote {out_dir}/results.json, results.md, async.png")


@bench.command("knees")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--subject", default="ingate", show_default=True, help="The system compared with the best peer."
)
def knees_cmd(results: tuple[str, ...], subject: str) -> None:
    """Each system's knee in RESULTS (ingate bench run JSON) and SUBJECT vs the best peer where that
    peer saturates; writes <results>_knees.json and .md beside each file."""
    for path in map(Path, results):
        click.echo(_write_knees(path, subject))


def _write_knees(path: Path, subject: str = "ingate") -> str:
    """Write <path>_knees.json and .md beside a results file; returns the markdown."""
    from ingate.bench.knees import markdown, system_knees, verdict

    res = orjson.loads(path.read_bytes())
    md = markdown(res, subject)
    doc = {"results": path.name, "knees": system_knees(res), "verdict": verdict(res, subject)}
    path.with_name(path.stem + "_knees.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    path.with_name(path.stem + "_knees.md").write_text(md)
    return md
