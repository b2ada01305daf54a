"""The `ingate` command line: subcommands listed without importing them, help for each, and clear
errors for bad configs (click's runner, in process)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ingate.cli import _SUBCOMMANDS, main


def test_help_lists_every_subcommand_without_importing_them() -> None:
    heavy = ("ingate.serve", "ingate.sim.cli", "ingate.bench.cli", "ingate.quickstart")
    for m in heavy:
        sys.modules.pop(m, None)
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0, res.output
    for name, (_, help_line) in _SUBCOMMANDS.items():
        assert name in res.output and help_line.split(":")[0] in res.output
    assert not [m for m in heavy if m in sys.modules]  # help stays cheap


@pytest.mark.parametrize("name", sorted(_SUBCOMMANDS))
def test_each_subcommand_has_help(name: str) -> None:
    res = CliRunner().invoke(main, [name, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output and len(res.output.splitlines()) > 3


def test_unknown_subcommand_is_an_error() -> None:
    res = CliRunner().invoke(main, ["nope"])
    assert res.exit_code == 2 and "No such command" in res.output


def test_serve_rejects_a_bad_config_naming_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("pool:\n  endpoints:\n    - address: not-an-address\n")
    res = CliRunner().invoke(main, ["serve", "--config", str(cfg)])
    assert res.exit_code == 1
    assert "pool.endpoints.0.address" in res.output and "expected host:port" in res.output
    res = CliRunner().invoke(main, ["serve", "--config", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_serve_rejects_an_unknown_envoy_option(tmp_path: Path) -> None:
    cfg = tmp_path / "opt.yaml"
    cfg.write_text(
        "listen: {port: 0}\npool:\n  endpoints: [{address: '127.0.0.1:9'}]\n"
        "dataplane: {type: envoy, options: {noSuchThing: 1}}\n"
    )
    res = CliRunner().invoke(main, ["serve", "--config", str(cfg)])
    assert res.exit_code == 1 and "dataplane.options.noSuchThing: unknown Envoy setting" in res.output
