"""Which results files a doc cites, for `ingate bench rerun --cited`."""

from __future__ import annotations

from pathlib import Path

from ingate.bench.rerun import cited


def test_cited_finds_each_named_results_file_once_in_order(tmp_path: Path) -> None:
    root = tmp_path / "results"
    (root / "knees").mkdir(parents=True)
    for name in ("knees/b2b_20261204T024541Z.json", "mixed_20261204T031218Z.json", "other.json"):
        (root / name).write_text("{}")
    doc = tmp_path / "README.md"
    doc.write_text(
        "see [b2b](results/knees/b2b_20261204T024541Z.json) and `mixed_20261204T031218Z.json`;\n"
        "again b2b_20261204T024541Z.json, its knees b2b_20261204T024541Z_knees.json, and an archived\n"
        "run gone_20261101T000000Z.json\n"
    )
    assert cited(doc, root) == [
        root / "knees/b2b_20261204T024541Z.json",
        root / "mixed_20261204T031218Z.json",
    ]
