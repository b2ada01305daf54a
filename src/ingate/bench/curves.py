"""Latency-vs-throughput plots of the benchmark database: a PNG and a self-contained HTML page.

Every configuration (curve) is one line; simulated points are hollow markers on dashed lines, measured
points filled markers on solid lines, and curves from an estimated accelerator profile say so in the
legend. The HTML page embeds the plot as a base64 PNG and lists every point in a table: no scripts, no
network, nothing outside the file.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

from ingate.bench.db import Series

PANELS = (
    ("throughput_rps", "ttft_p90", "throughput (req/s)", "p90 TTFT (s)"),
    ("throughput_rps", "tpot_p90", "throughput (req/s)", "p90 TPOT (s)"),
    ("output_tok_s", "ttft_p90", "output tokens/s", "p90 TTFT (s)"),
    ("throughput_rps", "e2e_p90", "throughput (req/s)", "p90 e2e latency (s)"),
)


def source_label(s: Series) -> str:
    """`measured`, `simulated` or `simulated, estimated profile`."""
    if s.run.kind == "measured":
        return "measured"
    return "simulated, estimated profile" if s.run.estimated else "simulated"


def curve_label(s: Series) -> str:
    """Legend text of a curve."""
    k = s.key
    return (
        f"{k.accelerator}x{k.accelerators_per_replica} x{k.replicas} {k.gateway}/{k.scheduler_profile} "
        f"{k.workload} [{source_label(s)}]"
    )


def render_png(series: Sequence[Series], title: str) -> bytes:
    """The plot (2 x 2 panels) as PNG bytes; `series` must be normalised to hardware time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    colors = plt.get_cmap("tab10")
    for ax, (xk, yk, xl, yl) in zip(axes.flat, PANELS, strict=True):
        for i, s in enumerate(series):
            pts = [(getattr(p, xk), getattr(p, yk)) for p in s.points]
            pts = sorted((x, y) for x, y in pts if x is not None and y is not None)
            if not pts:
                continue
            measured = s.run.kind == "measured"
            ax.plot(
                [x for x, _ in pts],
                [y for _, y in pts],
                linestyle="-" if measured else "--",
                marker="o",
                markerfacecolor=colors(i % 10) if measured else "white",
                color=colors(i % 10),
                label=curve_label(s),
            )
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"{title}\nfilled markers, solid lines: measured; hollow markers, dashed lines: simulated")
    fig.tight_layout(rect=(0, 0.04 + 0.018 * ((len(series) + 1) // 2), 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


_COLS = (
    ("rate", "offered req/s", "{:.3g}"),
    ("throughput_rps", "req/s", "{:.3g}"),
    ("output_tok_s", "out tok/s", "{:.0f}"),
    ("ttft_p50", "TTFT p50", "{:.3f}"),
    ("ttft_p90", "TTFT p90", "{:.3f}"),
    ("ttft_p99", "TTFT p99", "{:.3f}"),
    ("tpot_p90", "TPOT p90", "{:.4f}"),
    ("e2e_p90", "e2e p90", "{:.2f}"),
    ("goodput_rps", "goodput req/s", "{:.3g}"),
    ("cache_hit_rate", "cache hit", "{:.0%}"),
    ("errors", "errors", "{}"),
)


def _cell(v: object, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def render_html(series: Sequence[Series], title: str, png: bytes) -> str:
    """A self-contained page: the plot (base64 PNG) and a table of every point with its source."""
    img = base64.b64encode(png).decode()
    rows = []
    for s in series:
        k = s.key
        src = source_label(s)
        cls = "measured" if s.run.kind == "measured" else "simulated"
        for p in s.points:
            cells = [
                k.model,
                f"{k.accelerator}x{k.accelerators_per_replica}",
                k.accelerator_profile,
                " ".join(k.server_args),
                str(k.replicas),
                f"{k.gateway}/{k.scheduler_profile}",
                k.workload,
                *(_cell(getattr(p, f), fmt) for f, _, fmt in _COLS),
                src,
            ]
            rows.append(
                f'<tr class="{cls}">' + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
            )
    head = ["model", "accelerator", "profile", "server args", "replicas", "gateway", "workload"]
    head += [h for _, h, _ in _COLS] + ["source"]
    calib = sorted({f"{s.run.tool}: {s.run.calibration}" for s in series if s.run.calibration})
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; font-size: 12px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; }}
th {{ background: #eee; }}
tr.simulated td:last-child {{ color: #a05a00; font-style: italic; }}
tr.measured td:last-child {{ color: #006400; font-weight: bold; }}
img {{ max-width: 100%; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>Latency vs throughput per configuration, in hardware time (simulator runs slowed down are scaled
back). Filled markers and solid lines are <b>measured</b> on real hardware; hollow markers and dashed
lines are <b>simulated</b>; "estimated profile" marks simulated accelerators not calibrated on that
hardware.</p>
<img id="plot" alt="latency vs throughput plots" src="data:image/png;base64,{img}">
<h2>Points</h2>
<table id="points"><thead><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in head)}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<h2>Calibration</h2>
<ul>{"".join(f"<li>{html.escape(c)}</li>" for c in calib)}</ul>
</body></html>
"""


def write_curves(series: Sequence[Series], title: str, png_path: Path, html_path: Path | None) -> None:
    """Write the PNG (and the HTML page) for normalised `series`."""
    png = render_png(series, title)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.write_bytes(png)
    if html_path is not None:
        html_path.parent.mkdir(parents=True, exist_ok=True)
        html_path.write_text(render_html(series, title, png))
