"""The one `ingate` command line. Subcommands live beside the code they drive and are imported lazily,
so `ingate sim` does not pay for gRPC/Envoy imports and vice versa."""

from __future__ import annotations

import importlib
from typing import Any

import click

# name -> "module:attribute" of a click.Command
_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sim": ("ingate.sim.cli:sim", "Run a fleet of simulated vLLM-compatible model servers."),
    "serve": ("ingate.serve:serve", "Run the gateway (endpoint picker + data plane) from a YAML config."),
    "quickstart": ("ingate.quickstart:quickstart", "Demo: simulated fleet + gateway vs round robin."),
    "bench": ("ingate.bench.cli:bench", "Benchmark harness: load sweeps, reports and plots."),
    "k8s": ("ingate.kube.render:k8s", "Kubernetes packaging: render the endpoint picker's manifests."),
    "async": ("ingate.asyncproc.cli:async_", "Async inference on idle capacity: queue processor, batches."),
    "db": (
        "ingate.bench.dbcli:db_group",
        "Benchmark database: import curves (ingate bench, inference-perf).",
    ),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        spec = _SUBCOMMANDS.get(cmd_name)
        if spec is None:
            return None
        module, attr = spec[0].split(":")
        cmd: Any = getattr(importlib.import_module(module), attr)
        return cmd

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # An upstream picker Deployment runs the image with its flags and no subcommand
        # (`ingate --pool-name P ...`): that is `ingate serve` with those flags.
        from ingate.epp_flags import looks_like_epp_args

        if looks_like_epp_args(args):
            args = ["serve", *args]
        return super().parse_args(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Show help lines without importing every subcommand's module.
        with formatter.section("Commands"):
            formatter.write_dl([(name, spec[1]) for name, spec in sorted(_SUBCOMMANDS.items())])


@click.group(cls=_LazyGroup)
@click.version_option(package_name="ingate")
def main() -> None:
    """ingate: an inference gateway that routes each LLM request to the replica where it finishes best."""
