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


def test_cited_folders_bring_the_runs_directly_in_them(tmp_path: Path) -> None:
    root = tmp_path / "results"
    (root / "heldout" / "deeper").mkdir(parents=True)
    (root / "knees").mkdir()
    for name in (
        "heldout/b2b-large-groups_20261204T051747Z.json",
        "heldout/b2b-large-groups_20261204T051747Z_knees.json",  # a knee table, not a run
        "heldout/mixed-long-outputs_20261204T073949Z.json",
        "heldout/deeper/x_20261204T000000Z.json",  # not directly in the cited folder
        "knees/b2b_20261204T024541Z.json",
    ):
        (root / name).write_text("{}")
    doc = tmp_path / "README.md"
    doc.write_text(
        "first [b2b](results/knees/b2b_20261204T024541Z.json) (a file, not its folder), then the\n"
        "held-out shapes: [results/heldout/](results/heldout/), and a folder that is not there:\n"
        "results/gone/\n"
    )
    assert cited(doc, root) == [
        root / "knees/b2b_20261204T024541Z.json",
        root / "heldout/b2b-large-groups_20261204T051747Z.json",
        root / "heldout/mixed-long-outputs_20261204T073949Z.json",
    ]
