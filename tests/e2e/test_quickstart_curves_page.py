"""`ingate quickstart curves` writes a self-contained page that a real browser renders: Debian's headless
chromium loads it from disk, the plot image decodes, the table lists every point with simulated and
measured rows marked apart, the screenshot is not blank, and the console stays free of errors."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from headless_chromium import find_chromium, open_page
from PIL import Image, ImageStat

from ingate.bench.db import BenchDB
from ingate.bench.dbcli import load_seed
from ingate.bench.importers import load_inference_perf
from ingate.cli import main

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
CHECKS = {
    "plot_width": "(() => { const i = document.getElementById('plot'); return i.complete ? i.naturalWidth : 0 })()",
    "rows": "document.querySelectorAll('#points tbody tr').length",
    "measured_rows": "document.querySelectorAll('#points tbody tr.measured').length",
    "estimated_rows": "[...document.querySelectorAll('#points tbody tr')]"
    ".filter(r => r.lastElementChild.textContent.includes('estimated')).length",
    "external": "[...document.querySelectorAll('[src],[href]')]"
    ".filter(e => !(e.getAttribute('src') || e.getAttribute('href') || '').startsWith('data:')).length",
}


def _chromium() -> None:
    if find_chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (make test installs it as root: `make system-deps`)")
        pytest.skip("chromium not installed (Debian package `chromium`; `make system-deps` as root)")


def _not_blank(png: bytes) -> float:
    img = Image.open(io.BytesIO(png)).convert("L")
    assert img.width >= 800 and img.height >= 600
    return float(ImageStat.Stat(img).stddev[0])


def test_curves_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    _chromium()
    db = BenchDB(tmp_path / "q.db")
    for key, run, points in load_seed():
        if key.model == MODEL and key.workload == "chat":
            db.record(key, run, points)
    # A real inference-perf report joins the chat curves as a measured H100 curve: it ran against the
    # simulator, and stands in here for a real-cluster report to exercise the measured styling.
    (t,) = load_inference_perf(
        ROOT / "tests/fixtures/inference-perf/report",
        model=MODEL,
        accelerator="h100",
        replicas=2,
        workload="chat",
        kind="measured",
    )
    db.record(*t)
    n_points = db.count_points()
    db.close()
    out = tmp_path / "chat"
    args = ["quickstart", "curves", "--model", MODEL, "--workload", "chat", "--db", str(tmp_path / "q.db")]
    r = CliRunner().invoke(main, [*args, "--no-seed", "--out", str(out)])
    assert r.exit_code == 0, r.output
    page = tmp_path / "chat.html"
    rep = open_page(page, CHECKS)
    (tmp_path / "screenshot.png").write_bytes(rep.screenshot)
    assert rep.console_errors == [] and rep.exceptions == []
    assert rep.values["plot_width"] == Image.open(tmp_path / "chat.png").width  # the embedded PNG decoded
    assert rep.values["rows"] == n_points
    assert rep.values["measured_rows"] == len(t[2]) == 2
    assert rep.values["estimated_rows"] > 0  # the L4 curve is labelled estimated
    assert rep.values["external"] == 0  # self-contained: nothing loaded from elsewhere
    assert _not_blank(rep.screenshot) > 20


def test_console_errors_are_caught(tmp_path: Path) -> None:
    # The checks above can fail: a page that logs an error and throws is reported as such.
    _chromium()
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><body><p>x</p><script>console.error('boom');"
        "throw new Error('kaput');</script></body></html>"
    )
    rep = open_page(bad, {"p": "document.querySelectorAll('p').length"})
    assert rep.values["p"] == 1
    assert any("boom" in e for e in rep.console_errors)
    assert any("kaput" in e or "Uncaught" in e for e in rep.exceptions)
    assert _not_blank(rep.screenshot) < 5  # a nearly white page counts as blank
