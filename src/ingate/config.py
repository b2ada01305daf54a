"""Typed configuration of a standalone gateway: one YAML file, validated at start.

Keys are camelCase in YAML (snake_case is accepted too); unknown keys are rejected; every error names
the field, e.g. ``pool.endpoints.2.address: expected host:port``. Defaults live here and are documented
in docs/configuration.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from ingate import tls_options
from ingate.flowcontrol.config import FlowControlConfig
from ingate.metric_spec import parse_metric_spec
from ingate.scheduling.config import SchedulerConfig


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class ListenConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)


class EndpointConfig(_Model):
    address: str
    name: str | None = None
    engine: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    weight: float = Field(default=1.0, gt=0)

    @field_validator("address")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port, got {v!r}")
        return v

    def split(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)


class PoolConfig(_Model):
    name: str = "default-pool"
    engine: Literal["vllm", "sglang", "tgi", "trtllm", "triton-trtllm"] = "vllm"
    endpoints: list[EndpointConfig] = Field(default_factory=list)
    """The static pool; empty when endpoints are discovered (Kubernetes mode). `ingate serve` without
    discovery needs at least one."""
    model_server_priority: Literal["none", "vllm", "sglang"] = "none"
    """Send the objective's priority to the model servers in the body's `priority` field: `vllm`
    (servers started with `--scheduling-policy priority`; lower value first, so the value is the
    negated objective priority), `sglang` (`--enable-priority-scheduling`; higher first, sent as is).
    Off by default: a vLLM server without the priority policy answers 400 to a non-zero priority.
    When on, a `priority` the client put in the body is overwritten (clients cannot promote
    themselves)."""

    @model_validator(mode="after")
    def _unique(self) -> PoolConfig:
        seen: set[str] = set()
        for i, ep in enumerate(self.endpoints):
            if ep.address in seen:
                raise ValueError(f"endpoints[{i}].address {ep.address!r} is listed twice")
            seen.add(ep.address)
        return self


class ModelMatch(_Model):
    type: Literal["Exact"] = "Exact"
    value: str


class RewriteMatch(_Model):
    model: ModelMatch


class RewriteTarget(_Model):
    model_rewrite: str
    weight: int = Field(default=1, ge=0)


class RewriteRule(_Model):
    """Upstream InferenceModelRewrite rule: requests for a matched model go to weighted targets."""

    matches: list[RewriteMatch] = Field(min_length=1)
    targets: list[RewriteTarget] = Field(min_length=1)

    @model_validator(mode="after")
    def _weights(self) -> RewriteRule:
        if sum(t.weight for t in self.targets) <= 0:
            raise ValueError("targets need a positive total weight")
        return self


class ModelsConfig(_Model):
    served: list[str] = Field(default_factory=list)
    """Base model names the pool serves; empty = pass any model name through."""
    adapters: list[str] = Field(default_factory=list)
    """LoRA adapters of the base model (requests naming them are routed with LoRA affinity)."""
    rewrites: list[RewriteRule] = Field(default_factory=list)


class SLOConfig(_Model):
    ttft_ms: float | None = Field(default=None, gt=0)
    tpot_ms: float | None = Field(default=None, gt=0)


class ObjectiveConfig(_Model):
    """An InferenceObjective: priority (higher = more important, negative = sheddable) and SLOs."""

    name: str
    priority: int = 0
    slo: SLOConfig = Field(default_factory=SLOConfig)
    models: list[str] = Field(default_factory=list)
    """Requests for these model names get this objective when they name none by header."""


class MetricNamesConfig(_Model):
    """Where the scraper reads each signal, overriding the engine's mapping (upstream's
    `--total-queued-requests-metric`, ...): a spec `name` or `name{label=value,...}`; "" = none;
    unset = the engine's name. Applies to the pool's default engine (`pool.engine`); pods labelled
    with another engine keep that engine's names."""

    queued_requests: str | None = None
    running_requests: str | None = None
    kv_cache_usage: str | None = None
    lora_info: str | None = None
    cache_info: str | None = None

    @field_validator("*")
    @classmethod
    def _spec(cls, v: str | None) -> str | None:
        if v is not None:
            parse_metric_spec(v)  # ValueError names what is wrong
        return v


class MetricsConfig(_Model):
    interval_ms: float = Field(default=50, gt=0)
    stale_after_ms: float = Field(default=200, gt=0)
    timeout_ms: float = Field(default=1000, gt=0)
    port: int | None = Field(default=None, ge=1, le=65535)
    """Scrape this port of each endpoint's host instead of the serving port (upstream
    `--model-server-metrics-port`)."""
    path: str = "/metrics"
    scheme: Literal["http", "https"] = "http"
    insecure_skip_verify: bool = True
    """https: do not verify the model server's certificate (upstream's default)."""
    names: MetricNamesConfig = Field(default_factory=MetricNamesConfig)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"expected a path starting with '/', got {v!r}")
        return v


class ProxyConfig(_Model):
    request_timeout_s: float = Field(default=600, gt=0)
    connect_timeout_s: float = Field(default=2, gt=0)
    max_body_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    retries: int = Field(default=1, ge=0, le=4)
    """Extra endpoints tried when a connection is refused, before any byte reached the client."""


class DataplaneConfig(_Model):
    type: Literal["builtin", "envoy", "extproc"] = "envoy"
    failure_mode: Literal["FailOpen", "FailClose"] = "FailClose"
    options: dict[str, Any] = Field(default_factory=dict)
    """Data-plane specific settings (see docs/envoy.md)."""


class ServingConfig(_Model):
    """The picker's production ports, in every data-plane mode (all off by default for standalone use;
    `ingate serve` with the upstream picker flags turns them on with upstream's defaults: 9003, 9090, TLS)."""

    host: str = "127.0.0.1"
    """Address the health and metrics ports bind (a pod binds 0.0.0.0)."""
    health_port: int | None = Field(default=None, ge=0, le=65535)
    """`grpc.health.v1.Health` (upstream `--grpc-health-port`, 9003); None = off."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """HTTP `/metrics`, `/health`, `/ready` (upstream `--metrics-port`, 9090); None = off."""
    metrics_auth_token_file: str | None = None
    """A file with the bearer token scrapes must present; None = no auth."""
    secure_serving: bool = False
    """TLS on the ext_proc port (upstream `--secure-serving`, on by default there)."""
    cert_path: str | None = None
    """Directory with tls.crt / tls.key; None with secure serving = a self-signed certificate."""
    enable_cert_reload: bool = False
    """Re-read the certificate files when they change (upstream `--enable-cert-reload`)."""
    tls_min_version: str = tls_options.DEFAULT_MIN_VERSION
    """Oldest TLS version the ext_proc port accepts, Go's name (upstream `--tls-min-version`)."""
    tls_cipher_suites: list[str] = Field(default_factory=list)
    """Go cipher-suite names allowed up to TLS 1.2 (upstream `--tls-cipher-suites`); [] = defaults."""
    grpc_max_recv_msg_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    """Largest gRPC message the ext_proc server accepts (upstream `--grpc-max-recv-msg-size`)."""
    grpc_max_send_msg_bytes: int | None = Field(default=None, gt=0)
    """Largest gRPC message it sends; None = no limit (upstream `--grpc-max-send-msg-size`)."""
    metrics_cert_dir: str | None = None
    """Serve the metrics port over TLS with DIR/tls.crt and DIR/tls.key (`--metrics-cert-dir`)."""
    metrics_client_ca_file: str | None = None
    """Require metrics clients to present a certificate signed by this CA (`--metrics-client-ca-file`;
    needs `metricsCertDir`)."""

    @field_validator("tls_min_version")
    @classmethod
    def _tls_version(cls, v: str) -> str:
        tls_options.min_version(v)
        return v

    @field_validator("tls_cipher_suites")
    @classmethod
    def _ciphers(cls, v: list[str]) -> list[str]:
        tls_options.openssl_ciphers(v)
        return v

    @model_validator(mode="after")
    def _metrics_tls(self) -> ServingConfig:
        if self.metrics_client_ca_file and not self.metrics_cert_dir:
            raise ValueError("metricsClientCaFile needs metricsCertDir")
        return self


class PrefixSharingConfig(_Model):
    """Active-active pickers share what their approximate prefix indexes learn (docs/kubernetes.md,
    "High availability"): each routing decision's prompt-block hashes go to the peers in batched UDP
    datagrams; loss only costs affinity. Absent = off."""

    listen: str = "0.0.0.0:9005"
    """HOST:PORT this replica receives peers' datagrams on."""
    peers: list[str] = Field(default_factory=list)
    """HOST:PORT of each peer; a host name is resolved to all its addresses (a headless Service)
    every `resolveIntervalS`, so one entry can name every replica."""
    resolve_interval_s: float = Field(default=5.0, gt=0)
    flush_interval_ms: float = Field(default=20.0, gt=0, le=1000)
    """Batching: pending records are sent every this many milliseconds."""
    max_datagram_bytes: int = Field(default=16_384, ge=1024, le=65_000)
    queue_limit: int = Field(default=20_000, gt=0)
    """Records waiting to be sent; beyond it new ones are dropped (counted), never the request."""

    @field_validator("listen", "peers")
    @classmethod
    def _hostports(cls, v: Any) -> Any:
        for hp in [v] if isinstance(v, str) else v:
            host, sep, port = str(hp).rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise ValueError(f"expected HOST:PORT, got {hp!r}")
        return v


class GatewayConfig(_Model):
    listen: ListenConfig = Field(default_factory=ListenConfig)
    pool: PoolConfig = Field(default_factory=PoolConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    objectives: list[ObjectiveConfig] = Field(default_factory=list)
    default_objective: str | None = None
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    dataplane: DataplaneConfig = Field(default_factory=DataplaneConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    flow_control: FlowControlConfig | None = None
    """Fair queuing, priority bands and shedding (docs/flow-control.md); absent = no flow control."""
    prefix_sharing: PrefixSharingConfig | None = None
    """Active-active replicas share their prefix indexes (docs/kubernetes.md); absent = off."""

    @model_validator(mode="after")
    def _objectives(self) -> GatewayConfig:
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError("objectives: names must be unique")
        if self.default_objective is not None and self.default_objective not in names:
            raise ValueError(f"defaultObjective {self.default_objective!r} is not among objectives")
        return self


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and the fields."""


def _format(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> GatewayConfig:
    """Validate a loaded YAML document."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: invalid configuration:\n{_format(e)}") from None


def read_yaml(path: str | Path) -> Any:
    """One YAML document from a file (ConfigError when unreadable or not YAML)."""
    p = Path(path)
    try:
        return yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a gateway YAML file."""
    return parse_config(read_yaml(path), str(path))
