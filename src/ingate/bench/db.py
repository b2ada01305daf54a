"""The benchmark database: latency-vs-throughput curves keyed by everything that shaped them.

One SQL schema, three tables (SQLAlchemy Core, so the same code runs on the embedded SQLite file that is
the default and on any database SQLAlchemy has a driver for, given as a URL):

- `runs`: where a set of points came from: the tool (`ingate-bench`, `inference-perf`, `ingate-replay`),
  `kind` (`simulated` or `measured` on real hardware), the simulator calibration and whether the
  accelerator profile is an estimate, the source file or command, the machine, when, and the time scale
  the simulator ran at.
- `curves`: one row per configuration: model, accelerator (+ count per replica and profile), model server
  and its arguments, replicas, gateway and scheduler profile, workload and seed set.
- `points`: one row per load point of a curve in a run: offered rate (or concurrency), counts,
  throughput (requests and tokens), TTFT / TPOT / ITL / e2e percentiles, goodput and the SLO it was
  counted against, SLO attainment and prefix-cache hit rate.

Values are stored as measured (wall-clock seconds); `time_scale` says how fast the simulator ran, and
`Series.normalised()` turns a series into hardware time (latencies x time_scale, rates / time_scale).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa

Kind = Literal["simulated", "measured"]

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2e")
RATE_METRICS = ("throughput_rps", "input_tok_s", "output_tok_s", "goodput_rps")


def default_db_path() -> Path:
    """`$INGATE_DB`, else `$XDG_DATA_HOME/ingate/bench.db` (default `~/.local/share/ingate/bench.db`)."""
    env = os.environ.get("INGATE_DB")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "ingate" / "bench.db"


@dataclass(frozen=True, slots=True)
class CurveKey:
    """What a curve's points have in common: the configuration that was loaded at increasing rates."""

    model: str
    accelerator: str
    """Accelerator type as priced in prices.yaml (e.g. `h100`, `l4`); `unknown` if not known."""
    accelerators_per_replica: int
    accelerator_profile: str
    """The simulator profile (`ingate sim --profile`) or a description of the real hardware."""
    model_server: str
    server_args: tuple[str, ...]
    replicas: int
    gateway: str
    """The system in front of the replicas: `ingate`, `ingate-envoy`, `round-robin`, ... or `direct`."""
    scheduler_profile: str
    workload: str
    seeds: str
    """The seed set, e.g. `seed=42 streams=3` (same seeds = same requests and arrivals)."""

    def label(self) -> str:
        """A short human label."""
        return (
            f"{self.accelerator}x{self.accelerators_per_replica} x{self.replicas} "
            f"{self.gateway}/{self.scheduler_profile} {self.workload}"
        )


@dataclass(frozen=True, slots=True)
class RunInfo:
    """Provenance of a set of points."""

    tool: str
    kind: Kind
    calibration: str
    """The simulator profile's source line (what it was fitted to, or how it was estimated); for
    measured runs, free text (e.g. the engine version)."""
    estimated: bool
    """True when the accelerator profile is an estimate, not calibrated on that hardware."""
    source: str
    machine: str = ""
    recorded_utc: str = ""
    time_scale: float = 1.0
    workload_spec: str = ""
    """The workload's request shape as `ingate bench` workload YAML keys, JSON (`name`, `api`, `model`,
    `data`, `slo`, `seed`, ...), when known: lets a recommendation be re-run (`--emit bench`)."""


@dataclass(slots=True)
class Point:
    """One load point. Latencies in seconds, rates per second, all as measured (see `time_scale`)."""

    rate: float | None = None
    concurrency: int | None = None
    duration_s: float | None = None
    sent: int = 0
    ok: int = 0
    errors: int = 0
    throughput_rps: float | None = None
    input_tok_s: float | None = None
    output_tok_s: float | None = None
    ttft_p50: float | None = None
    ttft_p90: float | None = None
    ttft_p99: float | None = None
    tpot_p50: float | None = None
    tpot_p90: float | None = None
    tpot_p99: float | None = None
    itl_p50: float | None = None
    itl_p90: float | None = None
    itl_p99: float | None = None
    e2e_p50: float | None = None
    e2e_p90: float | None = None
    e2e_p99: float | None = None
    goodput_rps: float | None = None
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    slo_e2e_s: float | None = None
    slo_attainment: float | None = None
    cache_hit_rate: float | None = None

    @property
    def error_rate(self) -> float:
        """Share of sent requests that failed (0 when nothing was sent)."""
        return self.errors / self.sent if self.sent else 0.0


POINT_FIELDS = tuple(f.name for f in fields(Point))
_LATENCY_FIELDS = (
    *(f"{m}_p{q}" for m in LATENCIES for q in PERCENTILES),
    "slo_ttft_s",
    "slo_tpot_s",
    "slo_e2e_s",
    "duration_s",
)


@dataclass(slots=True)
class Series:
    """The points of one curve from one run, ordered by offered rate (or concurrency)."""

    curve_id: int
    run_id: int
    key: CurveKey
    run: RunInfo
    points: list[Point] = field(default_factory=list)

    def normalised(self) -> Series:
        """This series in hardware time: a simulator run at time scale s (s < 1 = slowed down) saw
        latencies 1/s times the modelled ones and carried s times the modelled rates."""
        s = self.run.time_scale
        if s == 1.0:
            return self
        pts = []
        for p in self.points:
            d = asdict(p)
            for k in _LATENCY_FIELDS:
                if d[k] is not None:
                    d[k] = d[k] * s
            for k in ("rate", *RATE_METRICS):
                if d[k] is not None:
                    d[k] = d[k] / s
            pts.append(Point(**d))
        return replace(self, points=pts, run=replace(self.run, time_scale=1.0))


SCHEMA_VERSION = 1
"""Bumped on any incompatible schema change; a database of another version is refused, not misread."""

_meta = sa.MetaData()

meta_t = sa.Table(
    "meta",
    _meta,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)

runs_t = sa.Table(
    "runs",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tool", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("calibration", sa.Text, nullable=False),
    sa.Column("estimated", sa.Boolean, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("machine", sa.Text, nullable=False),
    sa.Column("recorded_utc", sa.String(32), nullable=False),
    sa.Column("time_scale", sa.Float, nullable=False),
    sa.Column("workload_spec", sa.Text, nullable=False, server_default=""),
)

curves_t = sa.Table(
    "curves",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("accelerator", sa.String(64), nullable=False),
    sa.Column("accelerators_per_replica", sa.Integer, nullable=False),
    sa.Column("accelerator_profile", sa.String(256), nullable=False),
    sa.Column("model_server", sa.String(64), nullable=False),
    sa.Column("server_args", sa.String(1024), nullable=False),  # JSON list, canonical
    sa.Column("replicas", sa.Integer, nullable=False),
    sa.Column("gateway", sa.String(256), nullable=False),
    sa.Column("scheduler_profile", sa.String(256), nullable=False),
    sa.Column("workload", sa.String(128), nullable=False),
    sa.Column("seeds", sa.String(128), nullable=False),
    sa.UniqueConstraint(
        "model",
        "accelerator",
        "accelerators_per_replica",
        "accelerator_profile",
        "model_server",
        "server_args",
        "replicas",
        "gateway",
        "scheduler_profile",
        "workload",
        "seeds",
        name="curve_key",
    ),
)

points_t = sa.Table(
    "points",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("curve_id", sa.Integer, sa.ForeignKey("curves.id"), nullable=False, index=True),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False, index=True),
    *(
        sa.Column(f.name, sa.Integer if f.name in ("concurrency", "sent", "ok", "errors") else sa.Float)
        for f in fields(Point)
    ),
)


def _engine_url(target: str | Path) -> str:
    s = str(target)
    if "://" in s:
        return s
    if s == ":memory:":
        return "sqlite://"
    p = Path(s).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{p.resolve()}"


class BenchDB:
    """A benchmark database: a SQLite file path (created if missing), `:memory:`, or a SQLAlchemy URL
    such as `postgresql+psycopg://user@host/db` (its driver installed separately)."""

    def __init__(self, target: str | Path) -> None:
        self.target = str(target)
        try:
            self.engine = sa.create_engine(_engine_url(target))
            _meta.create_all(self.engine)
        except (sa.exc.SQLAlchemyError, ImportError) as e:  # bad URL, missing driver, unreachable server
            raise ValueError(f"{target}: cannot open the benchmark database: {e}") from None
        with self.engine.begin() as conn:
            found = conn.execute(sa.select(meta_t.c.value).where(meta_t.c.key == "schema_version")).scalar()
            if found is None:
                conn.execute(sa.insert(meta_t).values(key="schema_version", value=str(SCHEMA_VERSION)))
            elif found != str(SCHEMA_VERSION):
                self.engine.dispose()
                raise ValueError(
                    f"{target}: benchmark database schema version {found}, this ingate reads version "
                    f"{SCHEMA_VERSION}"
                )

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()

    def record(self, key: CurveKey, run: RunInfo, points: Sequence[Point]) -> int:
        """Store `points` of curve `key` as one run; returns the run id. The curve row is shared with
        earlier runs of the same configuration."""
        with self.engine.begin() as conn:
            run_id = _pk(conn.execute(sa.insert(runs_t).values(**asdict(run))))
            curve_id = self._curve_id(conn, key)
            if points:
                conn.execute(
                    sa.insert(points_t),
                    [{"curve_id": curve_id, "run_id": run_id, **asdict(p)} for p in points],
                )
        return run_id

    def _curve_id(self, conn: sa.Connection, key: CurveKey) -> int:
        row = _key_row(key)
        where = [curves_t.c[k] == v for k, v in row.items()]
        found = conn.execute(sa.select(curves_t.c.id).where(*where)).scalar()
        if found is not None:
            return int(found)
        return _pk(conn.execute(sa.insert(curves_t).values(**row)))

    def series(
        self,
        model: str | None = None,
        accelerator: str | None = None,
        workload: str | None = None,
        latest_only: bool = True,
    ) -> list[Series]:
        """Series matching the filters (case-insensitive), ordered by curve. With `latest_only`, each
        curve keeps its newest run of each kind (simulated, measured)."""
        q = sa.select(curves_t)
        for col, val in (("model", model), ("accelerator", accelerator), ("workload", workload)):
            if val is not None:
                q = q.where(sa.func.lower(curves_t.c[col]) == val.lower())
        out: list[Series] = []
        with self.engine.connect() as conn:
            curves = {int(r.id): r for r in conn.execute(q.order_by(curves_t.c.id))}
            if not curves:
                return []
            prow = conn.execute(
                sa.select(points_t)
                .where(points_t.c.curve_id.in_(list(curves)))
                .order_by(points_t.c.curve_id, points_t.c.run_id, points_t.c.rate, points_t.c.concurrency)
            ).all()
            run_ids = sorted({int(p.run_id) for p in prow})
            runs = {int(r.id): r for r in conn.execute(sa.select(runs_t).where(runs_t.c.id.in_(run_ids)))}
        grouped: dict[tuple[int, int], list[Point]] = {}
        for p in prow:
            grouped.setdefault((int(p.curve_id), int(p.run_id)), []).append(
                Point(**{k: getattr(p, k) for k in POINT_FIELDS})
            )
        for (cid, rid), pts in grouped.items():
            out.append(Series(cid, rid, _key_from_row(curves[cid]), _run_from_row(runs[rid]), pts))
        if latest_only:
            newest: dict[tuple[int, str], Series] = {}
            for s in out:
                k = (s.curve_id, s.run.kind)
                if k not in newest or s.run_id > newest[k].run_id:
                    newest[k] = s
            out = sorted(newest.values(), key=lambda s: (s.curve_id, s.run_id))
        return out

    def distinct(self, column: str) -> list[str]:
        """Distinct values of a curve column (e.g. `model`, `accelerator`, `workload`)."""
        with self.engine.connect() as conn:
            return sorted(str(v) for v in conn.execute(sa.select(curves_t.c[column]).distinct()).scalars())

    def count_points(self) -> int:
        """Number of stored points."""
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(points_t)).scalar() or 0)


def _pk(result: sa.CursorResult[Any]) -> int:
    pk = result.inserted_primary_key
    assert pk is not None
    return int(pk[0])


def _key_row(key: CurveKey) -> dict[str, Any]:
    row = asdict(key)
    row["server_args"] = json.dumps(list(key.server_args))
    return row


def _key_from_row(r: Any) -> CurveKey:
    return CurveKey(
        model=r.model,
        accelerator=r.accelerator,
        accelerators_per_replica=int(r.accelerators_per_replica),
        accelerator_profile=r.accelerator_profile,
        model_server=r.model_server,
        server_args=tuple(json.loads(r.server_args)),
        replicas=int(r.replicas),
        gateway=r.gateway,
        scheduler_profile=r.scheduler_profile,
        workload=r.workload,
        seeds=r.seeds,
    )


def _run_from_row(r: Any) -> RunInfo:
    return RunInfo(
        tool=r.tool,
        kind=r.kind,
        calibration=r.calibration,
        estimated=bool(r.estimated),
        source=r.source,
        machine=r.machine,
        recorded_utc=r.recorded_utc,
        time_scale=float(r.time_scale),
        workload_spec=r.workload_spec or "",
    )


def series_to_json(series: Iterable[Series]) -> list[dict[str, Any]]:
    """Series as plain JSON-able dicts (the seed file's format), points without empty fields."""
    out = []
    for s in series:
        out.append(
            {
                "key": _key_json(s.key),
                "run": asdict(s.run),
                "points": [{k: v for k, v in asdict(p).items() if v is not None} for p in s.points],
            }
        )
    return out


def _key_json(key: CurveKey) -> dict[str, Any]:
    out: dict[str, Any] = asdict(key)
    out["server_args"] = list(key.server_args)
    return out


def series_from_json(items: Iterable[dict[str, Any]]) -> list[tuple[CurveKey, RunInfo, list[Point]]]:
    """The inverse of `series_to_json`: (key, run, points) triples ready for `BenchDB.record`."""
    out = []
    for it in items:
        k = dict(it["key"])
        k["server_args"] = tuple(k["server_args"])
        out.append((CurveKey(**k), RunInfo(**it["run"]), [Point(**p) for p in it["points"]]))
    return out
