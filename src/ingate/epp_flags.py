"""The upstream endpoint picker's command-line flags, so an upstream Deployment's `args` run ingate.

Both spellings are accepted (docs/kubernetes.md, "Picker flags"): the current `--kebab-case` flags and
the older single-dash `-camelCase` ones; like Go's flag package, one or two dashes, `--f v` or
`--f=v`, booleans bare (`--f`) or `--f=true|false`, durations in Go syntax (`50ms`, `2s`, `1m30s`).
An unknown flag is an error naming it.

`parse_flags` returns the flags by canonical name; `EppOptions.from_flags` turns them into what
`ingate serve` needs: overrides of the gateway config and the Kubernetes discovery options.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ingate import tls_options
from ingate.metric_spec import parse_metric_spec

FlagKind = Literal["bool", "int", "str", "duration"]
log = logging.getLogger("ingate.flags")
MIN_REFRESH_S = 0.05
ZAP_TIME_ENCODINGS = ("epoch", "millis", "nano", "iso8601", "rfc3339", "rfc3339nano")


@dataclass(frozen=True)
class Flag:
    name: str
    kind: FlagKind
    default: Any
    effect: str = "used"
    """"used", or "noop" (accepted for compatibility, no effect: named in one log line at start)."""
    aliases: tuple[str, ...] = ()


FLAGS: tuple[Flag, ...] = (
    Flag("pool-name", "str", ""),
    Flag("pool-namespace", "str", ""),
    Flag("pool-group", "str", "inference.networking.k8s.io"),
    Flag("endpoint-selector", "str", ""),
    Flag("endpoint-target-ports", "str", ""),
    Flag("grpc-port", "int", 9002),
    Flag("grpc-health-port", "int", 9003),
    Flag("metrics-port", "int", 9090),
    Flag("metrics-endpoint-auth", "bool", True),
    Flag("config-file", "str", ""),
    Flag("config-text", "str", ""),
    Flag("secure-serving", "bool", True),
    Flag("cert-path", "str", ""),
    Flag("enable-cert-reload", "bool", False),
    Flag("tls-min-version", "str", ""),
    Flag("tls-cipher-suites", "str", ""),
    Flag("metrics-cert-dir", "str", ""),
    Flag("metrics-client-ca-file", "str", ""),
    Flag("grpc-max-recv-msg-size", "str", ""),
    Flag("grpc-max-send-msg-size", "str", ""),
    Flag("ha-enable-leader-election", "bool", False),
    # ingate extensions (upstream uses controller-runtime's fixed 15 s / 10 s / 2 s)
    Flag("ingate-leader-election-lease-duration", "duration", 15.0),
    Flag("ingate-leader-election-renew-deadline", "duration", 10.0),
    Flag("ingate-leader-election-retry-period", "duration", 2.0),
    Flag("drain-timeout", "duration", 30.0),
    Flag("zap-encoder", "str", "console"),
    Flag("zap-log-level", "str", "info"),
    Flag("v", "int", 0),
    Flag("refresh-metrics-interval", "duration", 0.05),
    Flag("metrics-staleness-threshold", "duration", 2.0),
    Flag("model-server-metrics-port", "int", 0),
    Flag("model-server-metrics-path", "str", "/metrics"),
    Flag("model-server-metrics-scheme", "str", "http"),
    Flag("model-server-metrics-https-insecure-skip-verify", "bool", True),
    Flag("total-queued-requests-metric", "str", ""),
    Flag("total-running-requests-metric", "str", ""),
    Flag("kv-cache-usage-percentage-metric", "str", ""),
    Flag("lora-info-metric", "str", ""),
    Flag("cache-info-metric", "str", ""),
    Flag("tracing", "bool", True, "noop"),
    Flag("enable-pprof", "bool", True, "noop"),
    Flag("health-checking", "bool", False, "noop"),
    Flag("refresh-prometheus-metrics-interval", "duration", 5.0, "noop"),
    Flag("emit-endpoint-scores", "bool", False, "noop"),
    Flag("enable-grpc-stream-metrics", "bool", False, "noop"),
    Flag("allow-experimental-plugins", "bool", False, "noop"),
    Flag("disable-endpoint-subset-filter", "bool", False, "noop"),
    Flag("fairness-id-metric-label-limit", "int", 1000, "noop"),
    Flag("plugin-state-staleness-threshold", "duration", 0.0, "noop"),
    Flag("feature-gates", "str", "", "noop"),
    # the rest of controller-runtime's zap flags (upstream binds them all)
    Flag("zap-devel", "bool", True, "noop"),
    Flag("zap-stacktrace-level", "str", "", "noop"),
    Flag("zap-time-encoding", "str", "", "noop"),
    Flag("destination-endpoint-hint-key", "str", "x-gateway-destination-endpoint"),
    Flag("destination-endpoint-hint-metadata-namespace", "str", "envoy.lb"),
)
BY_NAME = {f.name: f for f in FLAGS}
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)(?:[eE](\d+))?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")
_SUFFIX = {
    **{s: 1024**i for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"), 1)},
    **{s: 1000**i for i, s in enumerate(("k", "M", "G", "T", "P", "E"), 1)},
}
METRIC_FLAGS = {
    "total-queued-requests-metric": "queuedRequests",
    "total-running-requests-metric": "runningRequests",
    "kv-cache-usage-percentage-metric": "kvCacheUsage",
    "lora-info-metric": "loraInfo",
    "cache-info-metric": "cacheInfo",
}
"""Upstream's metric-name flags -> `metrics.names` keys."""


class FlagError(ValueError):
    """A flag that cannot be used; the message names it."""


def canonical(name: str) -> str:
    """`poolName`, `-poolName`, `--pool-name`, `DestinationEndpointHintKey` -> their kebab-case name."""
    return _CAMEL.sub("-", name.lstrip("-")).lower()


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration syntax (`50ms`, `1m30s`, a bare `0`) in seconds."""
    t = text.strip()
    if t == "0":
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION.finditer(t):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(t) or not t:
        raise ValueError(f"not a duration: {text!r} (e.g. 50ms, 2s, 1m30s)")
    return total


def parse_size(text: str) -> int:
    """A byte size as upstream reads `--grpc-max-*-msg-size`: a Kubernetes quantity (`4194304`,
    `10Mi`, `25M`, `1e6`) with an optional trailing `B` (`10MiB`, `25MB`)."""
    t = text.strip()
    if len(t) > 1 and t[-1] in "Bb":
        t = t[:-1]
    m = _QUANTITY.fullmatch(t)
    if m is None:
        raise ValueError(f"not a size: {text!r} (e.g. 4194304, 10MiB, 25MB)")
    value = float(m.group(1)) * 10 ** int(m.group(2) or 0) * _SUFFIX.get(m.group(3) or "", 1)
    if value != int(value):
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(value)


def _value(flag: Flag, raw: str, given_as: str) -> Any:
    try:
        if flag.kind == "bool":
            low = raw.lower()
            if low in ("1", "t", "true"):
                return True
            if low in ("0", "f", "false"):
                return False
            raise ValueError(f"not a boolean: {raw!r}")
        if flag.kind == "int":
            return int(raw)
        if flag.kind == "duration":
            return parse_duration(raw)
        return raw
    except ValueError as e:
        raise FlagError(f"flag {given_as}: {e}") from None


def parse_flags(argv: Sequence[str]) -> dict[str, Any]:
    """Parse upstream picker flags; returns only those given, by canonical name."""
    out: dict[str, Any] = {}
    i = 0
    args = list(argv)
    while i < len(args):
        tok = args[i]
        i += 1
        if not tok.startswith("-") or tok in ("-", "--"):
            raise FlagError(f"unexpected argument {tok!r} (flags only)")
        name, eq, raw = tok.partition("=")
        key = canonical(name)
        flag = BY_NAME.get(key)
        if flag is None:
            raise FlagError(f"unknown flag {name} (see docs/kubernetes.md, 'Picker flags')")
        if not eq:
            if flag.kind == "bool":
                out[key] = True
                continue
            if i >= len(args):
                raise FlagError(f"flag {name} needs a value")
            raw = args[i]
            i += 1
        out[key] = _value(flag, raw, name)
    return out


@dataclass
class EppOptions:
    """What the upstream flags mean for ingate."""

    flags: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> Any:
        return self.flags.get(name, BY_NAME[name].default)

    @classmethod
    def from_args(cls, argv: Sequence[str]) -> EppOptions:
        opts = cls(parse_flags(argv))
        opts.validate()
        return opts

    def validate(self) -> None:
        if self.get("pool-name") and self.get("endpoint-selector"):
            raise FlagError("--pool-name and --endpoint-selector are mutually exclusive (as upstream)")
        if self.get("endpoint-selector") and not self.get("endpoint-target-ports"):
            raise FlagError("--endpoint-selector needs --endpoint-target-ports")
        for key, want in (
            ("destination-endpoint-hint-key", "x-gateway-destination-endpoint"),
            ("destination-endpoint-hint-metadata-namespace", "envoy.lb"),
        ):
            if self.get(key) != want:
                raise FlagError(f"--{key}: only the default {want!r} is supported")
        if self.get("zap-encoder") not in ("json", "console"):
            raise FlagError("--zap-encoder: json or console")
        if self.get("zap-stacktrace-level") not in ("", "info", "error", "panic"):
            raise FlagError("--zap-stacktrace-level: info, error or panic")
        if self.get("zap-time-encoding") not in ("", *ZAP_TIME_ENCODINGS):
            raise FlagError(f"--zap-time-encoding: one of {', '.join(ZAP_TIME_ENCODINGS)}")
        if self.get("refresh-metrics-interval") < MIN_REFRESH_S:
            # upstream clamps with a warning rather than refusing to start
            log.warning(
                "--refresh-metrics-interval %.3fs is below the minimum: using 50ms",
                self.get("refresh-metrics-interval"),
            )
            self.flags["refresh-metrics-interval"] = MIN_REFRESH_S
        if self.get("config-file") and self.get("config-text"):
            raise FlagError("--config-file and --config-text cannot both be set (as upstream)")
        for key in ("metrics-staleness-threshold", "refresh-prometheus-metrics-interval"):
            if self.get(key) <= 0:
                raise FlagError(f"--{key}: must be positive")
        if self.flags.get("plugin-state-staleness-threshold", 1.0) <= 0:  # default: the plugins' own
            raise FlagError("--plugin-state-staleness-threshold: must be positive")
        if int(self.get("fairness-id-metric-label-limit")) < 0:
            raise FlagError("--fairness-id-metric-label-limit: must be non-negative")
        ports = self.target_ports()
        if self.get("endpoint-selector") and not 1 <= len(ports) <= 8:
            raise FlagError("--endpoint-target-ports: 1 to 8 ports")
        self._validate_serving()
        for key in METRIC_FLAGS:
            try:
                parse_metric_spec(str(self.get(key)))
            except ValueError as e:
                raise FlagError(f"--{key}: {e}") from None
        if self.get("model-server-metrics-scheme") not in ("http", "https"):
            raise FlagError("--model-server-metrics-scheme: http or https")
        if not str(self.get("model-server-metrics-path")).startswith("/"):
            raise FlagError("--model-server-metrics-path: must start with '/'")
        if not 0 <= int(self.get("model-server-metrics-port")) <= 65535:
            raise FlagError("--model-server-metrics-port: 0 (the target port) to 65535")
        lease, renew, retry = self.lease_timings()
        if not lease > renew > retry > 0:
            raise FlagError(
                "--ingate-leader-election-lease-duration > --ingate-leader-election-renew-deadline > "
                f"--ingate-leader-election-retry-period > 0 (got {lease}s, {renew}s, {retry}s)"
            )

    def _validate_serving(self) -> None:
        """TLS, metrics-TLS and gRPC message-size flags, checked as upstream does at start."""
        try:
            if self.get("tls-min-version"):
                tls_options.min_version(str(self.get("tls-min-version")))
        except ValueError as e:
            raise FlagError(f"--tls-min-version: {e}") from None
        try:
            tls_options.openssl_ciphers(self.cipher_suites())
        except ValueError as e:
            raise FlagError(f"--tls-cipher-suites: {e}") from None
        for key in ("grpc-max-recv-msg-size", "grpc-max-send-msg-size"):
            try:
                self.size(key)
            except ValueError as e:
                raise FlagError(f"--{key}: {e}") from None
        cert_dir, ca = str(self.get("metrics-cert-dir")), str(self.get("metrics-client-ca-file"))
        if ca and not cert_dir:
            raise FlagError("--metrics-client-ca-file requires --metrics-cert-dir")
        if cert_dir and not ca and not self.get("metrics-endpoint-auth"):
            raise FlagError(
                "--metrics-cert-dir enables metrics TLS without authentication; set "
                "--metrics-client-ca-file or --metrics-endpoint-auth (as upstream)"
            )
        files = [Path(cert_dir) / "tls.crt", Path(cert_dir) / "tls.key"] if cert_dir else []
        for f in [*files, *([Path(ca)] if ca else [])]:
            if not f.is_file():
                raise FlagError(f"metrics TLS: cannot read {f}")

    def cipher_suites(self) -> list[str]:
        return [c.strip() for c in str(self.get("tls-cipher-suites")).split(",") if c.strip()]

    def size(self, key: str) -> int | None:
        """A `--grpc-max-*-msg-size` in bytes; None when not given or 0 (ingate's default)."""
        raw = str(self.get(key))
        return (parse_size(raw) or None) if raw else None

    def lease_timings(self) -> tuple[float, float, float]:
        """Lease duration, renew deadline, retry period in seconds."""
        return (
            float(self.get("ingate-leader-election-lease-duration")),
            float(self.get("ingate-leader-election-renew-deadline")),
            float(self.get("ingate-leader-election-retry-period")),
        )

    @property
    def kubernetes(self) -> bool:
        """Endpoints come from the cluster (an InferencePool, or a pod selector)."""
        return bool(self.get("pool-name") or self.get("endpoint-selector"))

    @property
    def namespace(self) -> str:
        return str(self.get("pool-namespace") or os.environ.get("NAMESPACE") or "default")

    def target_ports(self) -> list[int]:
        raw = str(self.get("endpoint-target-ports") or "")
        try:
            return [int(p) for p in raw.split(",") if p.strip()]
        except ValueError:
            raise FlagError(f"--endpoint-target-ports: comma-separated numbers, got {raw!r}") from None

    def noops(self) -> list[str]:
        """Flags given that ingate accepts without effect."""
        return sorted(k for k in self.flags if BY_NAME[k].effect == "noop")

    @property
    def log_level(self) -> str:
        if int(self.get("v")) >= 1:
            return "debug"
        level = str(self.get("zap-log-level")).lower()
        return {"debug": "debug", "info": "info", "error": "error", "warn": "warning"}.get(level, "info")

    def overrides(self) -> dict[str, Any]:
        """Gateway config (camelCase YAML keys) the flags set, merged over the config file's."""
        serving: dict[str, Any] = {
            "host": "0.0.0.0",
            "healthPort": self.get("grpc-health-port"),
            "metricsPort": self.get("metrics-port"),
            "secureServing": self.get("secure-serving"),
            "enableCertReload": self.get("enable-cert-reload"),
        }
        if self.get("cert-path"):
            serving["certPath"] = self.get("cert-path")
        if self.get("tls-min-version"):
            serving["tlsMinVersion"] = self.get("tls-min-version")
        if self.cipher_suites():
            serving["tlsCipherSuites"] = self.cipher_suites()
        for key, field_ in (
            ("grpc-max-recv-msg-size", "grpcMaxRecvMsgBytes"),
            ("grpc-max-send-msg-size", "grpcMaxSendMsgBytes"),
        ):
            if self.size(key) is not None:
                serving[field_] = self.size(key)
        for key, field_ in (
            ("metrics-cert-dir", "metricsCertDir"),
            ("metrics-client-ca-file", "metricsClientCaFile"),
        ):
            if self.get(key):
                serving[field_] = self.get(key)
        metrics: dict[str, Any] = {
            "intervalMs": self.get("refresh-metrics-interval") * 1000,
            "staleAfterMs": self.get("metrics-staleness-threshold") * 1000,
        }
        # Scrape target and metric names: only what was given, so the config file's settings stay.
        for key, field_ in (
            ("model-server-metrics-path", "path"),
            ("model-server-metrics-scheme", "scheme"),
            ("model-server-metrics-https-insecure-skip-verify", "insecureSkipVerify"),
        ):
            if key in self.flags:
                metrics[field_] = self.flags[key]
        if self.flags.get("model-server-metrics-port"):
            metrics["port"] = self.flags["model-server-metrics-port"]
        names = {field_: self.flags[key] for key, field_ in METRIC_FLAGS.items() if key in self.flags}
        if names:
            metrics["names"] = names
        return {
            "listen": {"host": "0.0.0.0", "port": self.get("grpc-port")},
            "dataplane": {"type": "extproc"},
            "serving": serving,
            "metrics": metrics,
        }


def looks_like_epp_args(argv: Sequence[str]) -> bool:
    """`ingate --pool-name x ...` (an upstream Deployment's args with ingate's image): the first
    argument is a flag, not a subcommand or help/version."""
    if not argv:
        return False
    first = argv[0]
    return first.startswith("-") and first not in ("--help", "-h", "--version")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into a copy of `base`, mappings merged key by key."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out
