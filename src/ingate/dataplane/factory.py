"""`make_dataplane`: the data plane of a kind around a started gateway core."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ingate.config import ConfigError
from ingate.dataplane.base import DataPlane, PickerCore
from ingate.naming import camel_to_snake

KINDS = ("envoy", "builtin", "extproc")


def make_dataplane(core: PickerCore, kind: str, port: int | None = None) -> DataPlane:
    """Build the data plane `kind` ("envoy", "builtin" or "extproc") around a gateway core; `port`
    overrides the config's `listen.port`. Raises ConfigError for unknown Envoy options."""
    cfg = core.config
    listen_port = cfg.listen.port if port is None else port

    def pool() -> list[str]:
        return [ep.address for ep in core.datastore.endpoints()]

    if kind == "builtin":
        from ingate.dataplane.proxy import BuiltinProxy

        return BuiltinProxy.serving(core, cfg.listen.host, listen_port)
    if kind == "extproc":
        from ingate.dataplane.extproc_server import ExtProcOnly

        tls = None
        if cfg.serving.secure_serving:
            from ingate.dataplane.tls import ServerTLS

            try:
                tls = ServerTLS(
                    cfg.serving.cert_path,
                    reload=cfg.serving.enable_cert_reload,
                    hosts=["localhost", cfg.listen.host],
                    min_version=cfg.serving.tls_min_version,
                    cipher_suites=cfg.serving.tls_cipher_suites,
                )
            except ValueError as e:
                raise ConfigError(f"serving: {e}") from None
        return ExtProcOnly(
            core.director,
            cfg.listen.host,
            listen_port,
            max_body_bytes=cfg.proxy.max_body_bytes,
            pool_addresses=pool,
            tls=tls,
            timings=_timings(core),
            max_recv_msg_bytes=cfg.serving.grpc_max_recv_msg_bytes,
            max_send_msg_bytes=cfg.serving.grpc_max_send_msg_bytes,
        )
    if kind != "envoy":
        raise ConfigError(f"unknown data plane {kind!r} (known: {', '.join(KINDS)})")
    from ingate.dataplane.envoy import EnvoyDataPlane
    from ingate.dataplane.envoy_bootstrap import EnvoySettings

    allowed = {f.name for f in fields(EnvoySettings)}
    opts: dict[str, Any] = {}
    for k, v in cfg.dataplane.options.items():
        key = camel_to_snake(k)
        if key not in allowed:
            raise ConfigError(
                f"dataplane.options.{k}: unknown Envoy setting (known: {', '.join(sorted(allowed))})"
            )
        opts[key] = v
    settings = EnvoySettings(
        **{
            "listen_host": cfg.listen.host,
            "listen_port": listen_port,
            "failure_mode": cfg.dataplane.failure_mode,
            "pool": pool(),
            "max_body_bytes": cfg.proxy.max_body_bytes,
            "connect_timeout_s": cfg.proxy.connect_timeout_s,
            **opts,
        }
    )
    return EnvoyDataPlane(
        core.director,
        settings,
        pool_addresses=pool,
        fallbacks=0,  # ORIGINAL_DST takes one address; fallbacks need a subset-aware LB (see docs/envoy.md)
        timings=_timings(core),
    )


def _timings(core: PickerCore) -> Any:
    """The ext_proc path's processing-time histograms, exported with the gateway's metrics."""
    from ingate.dataplane.extproc_timing import ExtProcTimings

    t = ExtProcTimings()
    for c in t.collectors():
        core.registry.register(c)
    return t
