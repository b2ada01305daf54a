"""`ingate serve`: the gateway from one YAML file, with Envoy (ext_proc) or the built-in proxy.

The data planes themselves live in `ingate.dataplane` (`make_dataplane` picks one)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import click
import yaml

from ingate.config import ConfigError, GatewayConfig, parse_config, read_yaml
from ingate.dataplane.factory import make_dataplane
from ingate.dataplane.services import PickerServices
from ingate.epp_config import is_endpoint_picker_config, scheduler_from_epp
from ingate.epp_flags import EppOptions, FlagError, deep_merge
from ingate.gateway import Gateway
from ingate.telemetry import setup_logging

log = logging.getLogger("ingate.serve")


def freeze_startup_heap() -> None:
    """Move everything allocated so far (modules, config, the started gateway) out of the cyclic GC's
    reach. A long-running gateway's full collections otherwise re-traverse these objects every time
    (about 25 ms per collection measured on the 2-core benchmark machine, a stall for every request in
    flight); what the serving path allocates later is still collected as usual."""
    gc.collect()
    gc.freeze()


async def run_gateway(
    cfg: GatewayConfig,
    kind: str,
    port: int | None,
    stop: asyncio.Event,
    epp: EppOptions | None = None,
    drain_s: float = 0.0,
) -> None:
    """Run until `stop` is set. With upstream flags naming a pool (`epp.kubernetes`), the pool's
    endpoints, objectives and rewrites come from the cluster, and leader election and token-checked
    metrics run as the flags say."""
    gw = Gateway(cfg)
    dp = make_dataplane(gw, kind, port)  # config errors surface before anything starts
    kube: Any = None
    if epp is not None and epp.kubernetes:
        from ingate.kube.options import KubeOptions
        from ingate.kube.runtime import KubeRuntime

        opts = KubeOptions.from_epp(epp)
        opts.default_engine = cfg.pool.engine  # pods without an engine label
        try:
            kube = await KubeRuntime.start(
                opts,
                gw.datastore,
                gw.objectives,
                metrics_auth=bool(epp.get("metrics-endpoint-auth")),
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        gw.synced = kube.synced
    services = PickerServices(
        gw,
        cfg.serving,
        synced=gw.synced,
        leader=kube.leader if kube is not None else (lambda: True),
        leader_election=epp is not None and bool(epp.get("ha-enable-leader-election")),
        metrics_auth=_metrics_auth(kube),
    )
    sharing = None
    if cfg.prefix_sharing is not None:
        from ingate.prefixshare import PrefixSharing

        sharing = PrefixSharing.for_scheduler(
            cfg.prefix_sharing, gw.scheduler.plugins(), gw.datastore, gw.registry
        )
    await gw.start()
    try:
        if sharing is not None:
            await sharing.start()
        await services.start()
        await dp.start()
        freeze_startup_heap()
        extra = services.describe()
        click.echo(
            f"ingate: {kind} data plane listening on {dp.url} for pool {cfg.pool.name!r} "
            f"({len(cfg.pool.endpoints)} endpoints){'; ' + extra if extra else ''}",
            err=True,
        )
        await stop.wait()
        if drain_s > 0:
            # Upstream's drain: readiness goes NOT_SERVING and the lease is handed over at once, so
            # the gateway moves new streams elsewhere; open ones keep being served until the drain
            # timeout (or a second signal) ends it.
            services.draining = True
            if kube is not None:
                with contextlib.suppress(Exception):
                    await kube.elector.stop()
            log.info("draining for up to %.1f s", drain_s)
            stop.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_s):
                    await stop.wait()
    finally:
        if kube is not None:
            # Hand the lease over first, so a standby becomes ready while this one drains.
            with contextlib.suppress(Exception):
                await kube.elector.stop()
        with contextlib.suppress(Exception):
            await dp.stop()
        with contextlib.suppress(Exception):
            await services.stop()
        if sharing is not None:
            with contextlib.suppress(Exception):
                await sharing.stop()
        if kube is not None:
            with contextlib.suppress(Exception):
                await kube.stop()
        await gw.stop()


def _metrics_auth(kube: Any) -> Callable[[str | None], Awaitable[tuple[int, str]]] | None:
    """`--metrics-endpoint-auth` in Kubernetes mode: TokenReview + SubjectAccessReview per scrape."""
    auth = getattr(kube, "metrics_auth", None)
    if auth is None:
        return None

    async def check(header: str | None) -> tuple[int, str]:
        d = await auth.check(header)
        return d.status, d.message

    return check


def build_config(config_path: str | None, epp: EppOptions | None) -> GatewayConfig:
    """The gateway config from `--config` (ingate YAML or an upstream EndpointPickerConfig) and the
    upstream picker flags (which override the file: ports, TLS, scraping)."""
    path = config_path or (epp.get("config-file") if epp is not None else "") or None
    doc: Any = {}
    source = "<flags>"
    if path:
        doc, source = read_yaml(path), str(path)
    elif epp is not None and epp.get("config-text"):
        try:
            doc, source = yaml.safe_load(epp.get("config-text")), "--config-text"
        except yaml.YAMLError as e:
            raise ConfigError(f"--config-text: not valid YAML: {e}") from None
    if doc is None:
        doc = {}
    if is_endpoint_picker_config(doc):
        doc = {"scheduler": scheduler_from_epp(doc, source)}
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    if epp is not None:
        doc = deep_merge(doc, epp.overrides())
        if epp.get("pool-name"):
            doc = deep_merge(doc, {"pool": {"name": epp.get("pool-name")}})
    cfg = parse_config(doc, source)
    kube = epp is not None and epp.kubernetes
    if not cfg.pool.endpoints and not kube:
        raise ConfigError(
            f"{source}: pool.endpoints: list at least one endpoint "
            "(or run in Kubernetes mode with --pool-name / --endpoint-selector)"
        )
    return cfg


@click.command("serve", context_settings={"ignore_unknown_options": True, "allow_extra_args": False})
@click.option(
    "--config",
    "config_path",
    required=False,
    type=click.Path(exists=True, dir_okay=False),
    help="Gateway YAML file (ingate's format, or an upstream EndpointPickerConfig).",
)
@click.option(
    "--proxy",
    type=click.Choice(["envoy", "builtin", "extproc"]),
    default=None,
    help="Data plane (default: the config's dataplane.type, envoy; extproc with upstream flags).",
)
@click.option("--port", type=int, default=None, help="Override listen.port.")
@click.option(
    "--log-level",
    default=None,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Default: info.",
)
@click.argument("upstream_flags", nargs=-1, type=click.UNPROCESSED)
def serve(
    config_path: str | None,
    proxy: str | None,
    port: int | None,
    log_level: str | None,
    upstream_flags: tuple[str, ...],
) -> None:
    """Run the gateway: endpoint picker + data plane in front of the pool in CONFIG.

    Also accepts the upstream endpoint picker's flags (UPSTREAM_FLAGS: `--pool-name`, `--grpc-port`,
    `--config-file`, `-poolName`, ...; docs/kubernetes.md), so an upstream Deployment's arguments run
    ingate unchanged: the picker-only ext_proc server with gRPC health, metrics and TLS."""
    try:
        epp = EppOptions.from_args(upstream_flags) if upstream_flags else None
    except FlagError as e:
        raise click.ClickException(str(e)) from None
    level = log_level or (epp.log_level if epp is not None else "info")
    setup_logging(level, str(epp.get("zap-encoder")) if epp is not None else "console")
    if epp is not None and epp.noops():
        logging.getLogger("ingate.serve").info(
            "accepted without effect (upstream-only features): %s", ", ".join("--" + n for n in epp.noops())
        )
    if config_path is None and epp is None:
        raise click.UsageError("give --config FILE (or the upstream picker flags, e.g. --pool-name)")
    try:
        cfg = build_config(config_path, epp)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    if epp is not None and epp.get("metrics-endpoint-auth") and not epp.kubernetes:
        raise click.ClickException(
            "--metrics-endpoint-auth=true authenticates scrapes against the Kubernetes API; outside "
            "Kubernetes pass --metrics-endpoint-auth=false (or serving.metricsAuthTokenFile in the config)"
        )
    kind = proxy or cfg.dataplane.type
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        drain = float(epp.get("drain-timeout")) if epp is not None else 0.0
        await run_gateway(cfg, kind, port, stop, epp, drain_s=drain)

    try:
        asyncio.run(main())
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
