"""Envoy's bootstrap for ingate: `render_bootstrap` builds a static Envoy v3 bootstrap:

- one listener (loopback by default) with the HTTP connection manager and its HTTP filters:
  `envoy.filters.http.ext_proc` for the request (headers SEND, body FULL_DUPLEX_STREAMED, trailers SEND;
  receives the `envoy.lb` and `ingate` metadata namespaces), with `response_processing: observe` a
  second ext_proc filter in observability mode that streams the response to the picker without waiting
  for it, and the router. Envoy adds the served-endpoint header itself, from the `envoy.lb` metadata;
- routes: when the picker has set the `envoy.lb` / `x-gateway-destination-endpoint` *dynamic metadata*
  (which clients cannot forge, unlike a header), the request goes to an `ORIGINAL_DST` cluster
  (`CLUSTER_PROVIDED` load balancing) that connects to the address in the `x-gateway-destination-endpoint`
  header the picker set; otherwise it goes to a round-robin cluster over the pool's endpoints. That
  second route is what makes FailOpen work: with the picker unreachable, `failure_mode_allow: true` lets
  the request continue without metadata and plain load balancing takes over. With FailClose Envoy
  answers 503 (with a JSON body, through a local-reply mapper) instead;
- a gRPC (HTTP/2) cluster for the picker's ext_proc server.

The round-robin pool is an EDS file (`pool_assignment`) that Envoy watches, so it changes without a
restart (`ingate.dataplane.envoy_process`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from ingate.dataplane.extproc import (
    DEFAULT_MAX_BODY,
    INGATE_NAMESPACE,
    LB_NAMESPACE,
    RESPONSE_MODES,
    ResponseMode,
)
from ingate.dataplane.extproc_server import Transport
from ingate.request import HDR_DESTINATION, HDR_DESTINATION_SERVED

log = logging.getLogger(__name__)

FailureMode = Literal["FailOpen", "FailClose"]

CLUSTER_PICKED = "ingate_picked"
CLUSTER_POOL = "ingate_pool"
CLUSTER_EXTPROC = "ingate_extproc"
POOL_FILE = "pool.json"
"""EDS file (in the Envoy work directory's `pool/`) that lists the FailOpen round-robin pool."""
PICKER_ERROR_STATUS = 508
"""Status Envoy's ext_proc filter answers when the picker fails (`status_on_error`); never sent by the
picker, and rewritten to 503 with `PICKER_ERROR_BODY` by the listener's local-reply mapper."""
PICKER_ERROR_BODY = orjson.dumps(
    {
        "error": {
            "message": "the endpoint picker is unavailable",
            "type": "service_unavailable",
            "code": "picker_unavailable",
        }
    }
)
HDR_UPSTREAM_DEBUG = "x-ingate-upstream-address"
"""Response header with the address Envoy really connected to (only with `debug_headers`)."""
OBSERVER_FILTER = "ingate.ext_proc.observe"
"""Name of the second ext_proc filter (observability mode) that streams responses to the picker."""
OBSERVER_CLOSE_S = 1.0
"""`deferred_close_timeout` of the observer: how long Envoy keeps an observer stream open after the
HTTP stream ended (only cut-off responses: the picker closes the others itself at their end)."""


@dataclass(slots=True)
class EnvoySettings:
    """Everything the bootstrap depends on (the `dataplane:` section of the gateway config)."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    """0 = ephemeral; the bound port is read back from the admin API."""
    admin_host: str = "127.0.0.1"
    admin_port: int = 0
    picker_host: str = "127.0.0.1"
    picker_port: int = 0
    failure_mode: FailureMode = "FailClose"
    message_timeout_s: float = 30.0
    """How long Envoy waits for one ext_proc answer; covers flow-control queueing of the request."""
    connect_timeout_s: float = 2.0
    stream_idle_timeout_s: float = 300.0
    route_timeout_s: float = 0.0
    """Whole-request upstream timeout; 0 = none (long generations stream for minutes)."""
    pool: list[str] = field(default_factory=list)
    """`ip:port` of every pool endpoint, for the FailOpen round-robin route and headers-only requests."""
    concurrency: int = 0
    """Envoy worker threads; 0 = min(4, CPU count)."""
    debug_headers: bool = False
    """Add `x-ingate-upstream-address` (the upstream Envoy connected to) to responses."""
    max_body_bytes: int = DEFAULT_MAX_BODY
    log_level: str = "warning"
    response_processing: ResponseMode = "full"
    """How the picker sees responses: "full" (default: the request's filter sends them and waits for
    the picker's answer to every message), "observe" (a second, observability-mode ext_proc filter
    streams them to the picker without waiting for it: TTFT and usage feedback off the token's path;
    opt-in: its ~140-200 ms p99 tail at 32 streams was probably the picker's GC pauses, gone in the
    runs since, see docs/envoy.md), "none"
    (responses bypass the picker: no TTFT/usage feedback). From YAML, true = "full", false = "none"."""
    access_log: str = ""
    """Path of a JSON-lines access log Envoy writes (one object per HTTP request, fields in
    `ACCESS_LOG_FORMAT`: status, picked endpoint, timing phases, the picker's gRPC latencies);
    "" = none. `EnvoyProcess` has Envoy flush it every second."""
    ext_proc: bool = True
    """False renders plain Envoy round robin over `pool` (no picker): the benchmark baseline."""
    picker_health_interval_s: float = 0.5
    """FailOpen only: how often Envoy checks that the picker is up (the detection window)."""
    pool_refresh_s: float = 1.0
    """How often `EnvoyDataPlane` compares the pool with Envoy's FailOpen pool and rewrites it
    (0 = never: the pool stays as rendered at start)."""
    picker_transport: Transport = "h2"
    picker_tls: bool = False
    """Connect to the picker over TLS (ALPN h2, certificate not verified: what Gateway API
    implementations do with the upstream picker's self-signed certificate)."""
    picker_health_port: int = 0
    """Check the picker with gRPC health (`grpc.health.v1`, service
    `envoy.service.ext_proc.v3.ExternalProcessor`, plaintext) on this port, as upstream deployments
    do; 0 = TCP checks (FailOpen only)."""
    picker_replicas: list[tuple[int, int]] = field(default_factory=list)
    """More picker replicas on `picker_host`, as (ext_proc port, gRPC health port): one ext_proc
    cluster holds them all (a picker Service with several pods); with `picker_health_port` each is
    health-checked on its own port, so only SERVING ones (the leader, under leader election) get
    streams."""
    """gRPC server the picker's ext_proc runs on: "h2" (in-loop HTTP/2, default) or "grpcio"."""

    def __post_init__(self) -> None:
        mode: Any = self.response_processing
        if isinstance(mode, bool):  # the YAML option before the modes existed
            mode = "full" if mode else "none"
        if mode not in RESPONSE_MODES:
            raise ValueError(
                f"response_processing: unknown mode {mode!r} (known: {', '.join(RESPONSE_MODES)})"
            )
        self.response_processing = mode


def _phase(start: str, end: str) -> str:
    return f"%COMMON_DURATION({start}:{end}:us)%"


_EXT_PROC_STATE = "envoy.filters.http.ext_proc"
ACCESS_LOG_FORMAT: dict[str, str] = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(:PATH)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "status": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration_ms": "%DURATION%",
    "endpoint": f"%DYNAMIC_METADATA({LB_NAMESPACE}:{HDR_DESTINATION})%",
    "upstream_host": "%UPSTREAM_HOST%",
    # Where the time goes, in microseconds (null when the phase did not happen):
    "request_receive_us": _phase("DS_RX_BEG", "DS_RX_END"),
    # The request's last byte to the upstream request's first: the picker's decision (flow-control
    # queueing included) and Envoy's routing.
    "decision_us": _phase("DS_RX_END", "US_TX_BEG"),
    "upstream_first_byte_us": _phase("US_TX_BEG", "US_RX_BEG"),
    # The request's first byte in to the response's first byte out.
    "first_byte_us": _phase("DS_RX_BEG", "DS_TX_BEG"),
    "total_us": _phase("DS_RX_BEG", "DS_TX_END"),
    # The ext_proc filter's own view of the picker: request headers sent to their answer, and the
    # request body's messages to theirs (summed).
    "picker_headers_us": f"%FILTER_STATE({_EXT_PROC_STATE}:FIELD:request_header_latency_us)%",
    "picker_body_us": f"%FILTER_STATE({_EXT_PROC_STATE}:FIELD:request_body_total_latency_us)%",
}
"""What `EnvoySettings.access_log` writes per request (Envoy command operators)."""


def _access_log(path: str) -> dict[str, Any]:
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": path,
            "log_format": {"json_format": ACCESS_LOG_FORMAT},
        },
    }


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _static_cluster(name: str, addresses: Sequence[str], connect_timeout: str, http2: bool) -> dict[str, Any]:
    lb_endpoints = []
    for addr in addresses:
        host, _, port = addr.rpartition(":")
        lb_endpoints.append({"endpoint": {"address": _socket(host, int(port))}})
    c: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": lb_endpoints}]},
    }
    if http2:
        c["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return c


def _picker_cluster(s: EnvoySettings, connect_timeout: str) -> dict[str, Any]:
    pickers = [(s.picker_port, s.picker_health_port), *((int(p), int(h)) for p, h in s.picker_replicas)]
    c = _static_cluster(
        CLUSTER_EXTPROC, [f"{s.picker_host}:{p}" for p, _ in pickers], connect_timeout, http2=True
    )
    if s.picker_tls:
        c["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {"alpn_protocols": ["h2"]},
            },
        }
    if s.picker_health_port:
        # The health port is plaintext while ext_proc may be TLS: the check picks the plaintext
        # transport socket through a match on its criteria.
        for lb, (_, health_port) in zip(
            c["load_assignment"]["endpoints"][0]["lb_endpoints"], pickers, strict=True
        ):
            lb["endpoint"]["health_check_config"] = {"port_value": health_port or s.picker_health_port}
        c["transport_socket_matches"] = [
            {"name": "health-plaintext", "match": {"health": "plaintext"}, "transport_socket": _RAW_BUFFER},
            *(
                [{"name": "default", "match": {}, "transport_socket": c.pop("transport_socket")}]
                if "transport_socket" in c
                else []
            ),
        ]
        interval = _duration(s.picker_health_interval_s)
        c["health_checks"] = [
            {
                "timeout": interval,
                "interval": interval,
                "no_traffic_interval": interval,
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "grpc_health_check": {"service_name": "envoy.service.ext_proc.v3.ExternalProcessor"},
                "transport_socket_match_criteria": {"health": "plaintext"},
            }
        ]
        c["common_lb_config"] = {"healthy_panic_threshold": {"value": 0.0}}
        return c
    if s.failure_mode == "FailOpen":
        # With FULL_DUPLEX_STREAMED bodies Envoy hands the body to the picker as it arrives, so a picker
        # failing mid-request cannot be "allowed" (the body is gone): Envoy answers 503. Failing open
        # therefore relies on *knowing* the picker is down before a request starts: an active health
        # check marks it unhealthy, the gRPC stream then fails before any byte is sent, and
        # failure_mode_allow lets the request continue to the round-robin pool route. No panic
        # routing: an unhealthy picker must not receive traffic.
        interval = _duration(s.picker_health_interval_s)
        c["health_checks"] = [
            {
                "timeout": interval,
                "interval": interval,
                "no_traffic_interval": interval,
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "tcp_health_check": {},
            }
        ]
        c["common_lb_config"] = {"healthy_panic_threshold": {"value": 0.0}}
    return c


_RAW_BUFFER = {
    "name": "envoy.transport_sockets.raw_buffer",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
    },
}


def _picker_error_mapper() -> dict[str, Any]:
    """Local-reply mapper: Envoy's reply when ext_proc fails becomes 503 + an OpenAI-style JSON body.

    Matching on the otherwise unused `PICKER_ERROR_STATUS` (rather than on 503) leaves the picker's
    own 503 answers (no endpoint, queue expiry), which carry their own JSON body, untouched.
    """
    return {
        "filter": {
            "status_code_filter": {
                "comparison": {
                    "op": "EQ",
                    "value": {
                        "default_value": PICKER_ERROR_STATUS,
                        "runtime_key": "ingate.picker_error_status",
                    },
                }
            }
        },
        "status_code": 503,
        "body": {"inline_string": PICKER_ERROR_BODY.decode()},
        "body_format_override": {
            "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
            "content_type": "application/json",
        },
    }


def _processing_mode(responses: ResponseMode) -> dict[str, str]:
    """The request filter's modes. With "observe" it skips response headers and body (the observer
    filter streams those) but keeps response trailers `SEND`: a filter that may still have something
    to send keeps its gRPC stream open until the HTTP stream ends, so the picker learns when the
    exchange is over (without it Envoy closes the stream right after the request). Responses rarely
    have trailers; when they do, the picker answers them at once, at the end of the response."""
    mode = {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "request_body_mode": "FULL_DUPLEX_STREAMED",
        "response_body_mode": "FULL_DUPLEX_STREAMED",
        "request_trailer_mode": "SEND",
        "response_trailer_mode": "SEND",
    }
    if responses != "full":
        mode.update(response_header_mode="SKIP", response_body_mode="NONE")
    if responses == "none":
        mode.update(response_trailer_mode="SKIP")
    return mode


def _observer_filter(s: EnvoySettings) -> dict[str, Any]:
    """The second ext_proc filter: streams response headers, body and trailers to the picker in
    observability mode (Envoy sends and goes on, never waits for an answer; only `STREAMED` bodies)
    with the `ingate` metadata namespace (the request key the picker's request answer set) on every
    message. It must never fail a response, whatever the failure mode: `failure_mode_allow` is on."""
    return {
        "name": OBSERVER_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": CLUSTER_EXTPROC}},
            "observability_mode": True,
            "failure_mode_allow": True,
            "deferred_close_timeout": _duration(OBSERVER_CLOSE_S),
            "processing_mode": {
                "request_header_mode": "SKIP",
                "response_header_mode": "SEND",
                "request_body_mode": "NONE",
                "response_body_mode": "STREAMED",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SEND",
            },
            "metadata_options": {"forwarding_namespaces": {"untyped": [INGATE_NAMESPACE]}},
        },
    }


def pool_assignment(addresses: Sequence[str], version: int = 0) -> dict[str, Any]:
    """The pool cluster's endpoints as an EDS discovery response (the file Envoy watches)."""
    lb_endpoints = []
    for addr in addresses:
        host, _, port = addr.rpartition(":")
        lb_endpoints.append({"endpoint": {"address": _socket(host, int(port))}})
    return {
        "version_info": str(version),
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
                "cluster_name": CLUSTER_POOL,
                "endpoints": [{"lb_endpoints": lb_endpoints}],
            }
        ],
    }


def _eds_pool_cluster(pool_file: Path, connect_timeout: str) -> dict[str, Any]:
    return {
        "name": CLUSTER_POOL,
        "type": "EDS",
        "connect_timeout": connect_timeout,
        "lb_policy": "ROUND_ROBIN",
        "eds_cluster_config": {
            "eds_config": {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": str(pool_file),
                    "watched_directory": {"path": str(pool_file.parent)},
                },
            }
        },
    }


def render_bootstrap(s: EnvoySettings, pool_file: Path | None = None) -> dict[str, Any]:
    """The Envoy v3 bootstrap (as a dict; Envoy reads it as JSON) for `s`.

    With `pool_file`, the pool cluster's endpoints come from that file (EDS, watched by Envoy:
    replace it atomically with `pool_assignment` to change the FailOpen round-robin pool while Envoy
    runs); without it they are rendered statically from `s.pool`.
    """
    connect = _duration(s.connect_timeout_s)
    route_timeout = _duration(s.route_timeout_s)
    observe = s.response_processing == "observe"
    receiving = [LB_NAMESPACE, INGATE_NAMESPACE] if observe else [LB_NAMESPACE]
    ext_proc = {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": CLUSTER_EXTPROC}},
            "failure_mode_allow": s.failure_mode == "FailOpen",
            "message_timeout": _duration(s.message_timeout_s),
            "processing_mode": _processing_mode(s.response_processing),
            "metadata_options": {"receiving_namespaces": {"untyped": receiving}},
            # The picker failing (unreachable, stream error, FailClose) answers a status the picker itself
            # never sends; the local-reply mapper below turns it into a 503 with a JSON error body.
            "status_on_error": {"code": PICKER_ERROR_STATUS},
        },
    }
    picked_match = {
        "prefix": "/",
        "dynamic_metadata": [
            {
                "filter": LB_NAMESPACE,
                "path": [{"key": HDR_DESTINATION}],
                "value": {"present_match": True},
            }
        ],
    }
    route_common: dict[str, Any] = {"timeout": route_timeout}
    # Envoy itself tells the client which replica served it: the destination the picker chose (only
    # this route has one), from the envoy.lb metadata, in every response mode.
    served = {
        "header": {
            "key": HDR_DESTINATION_SERVED,
            "value": f"%DYNAMIC_METADATA({LB_NAMESPACE}:{HDR_DESTINATION})%",
        },
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }
    routes: list[dict[str, Any]] = [
        {
            "name": "picked",
            "match": picked_match,
            "route": {"cluster": CLUSTER_PICKED, **route_common},
            "response_headers_to_add": [served],
        }
    ]
    if s.pool:
        routes.append(
            {"name": "pool", "match": {"prefix": "/"}, "route": {"cluster": CLUSTER_POOL, **route_common}}
        )
    else:
        routes.append(
            {
                "name": "no_pool",
                "match": {"prefix": "/"},
                "direct_response": {
                    "status": 503,
                    "body": {
                        "inline_string": '{"error":{"message":"no endpoint was picked","type":'
                        '"service_unavailable","code":"no_endpoint"}}'
                    },
                },
            }
        )
    vhost: dict[str, Any] = {"name": "ingate", "domains": ["*"], "routes": routes}
    if s.debug_headers:
        vhost["response_headers_to_add"] = [
            {"header": {"key": HDR_UPSTREAM_DEBUG, "value": "%UPSTREAM_REMOTE_ADDRESS%"}}
        ]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "ingate",
        "codec_type": "AUTO",
        "stream_idle_timeout": _duration(s.stream_idle_timeout_s),
        "route_config": {"name": "ingate", "virtual_hosts": [vhost]},
        "local_reply_config": {"mappers": [_picker_error_mapper()]},
        **({"access_log": [_access_log(s.access_log)]} if s.access_log else {}),
        "http_filters": [
            *([ext_proc] if s.ext_proc else []),
            *([_observer_filter(s)] if s.ext_proc and observe else []),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    clusters = [
        {
            "name": CLUSTER_PICKED,
            "type": "ORIGINAL_DST",
            "connect_timeout": connect,
            "lb_policy": "CLUSTER_PROVIDED",
            "original_dst_lb_config": {"use_http_header": True, "http_header_name": HDR_DESTINATION},
            "cleanup_interval": "60s",
        },
    ]
    if s.ext_proc:
        clusters.append(_picker_cluster(s, connect))
    if s.pool:
        if pool_file is not None:
            clusters.append(_eds_pool_cluster(pool_file, connect))
        else:
            clusters.append(_static_cluster(CLUSTER_POOL, s.pool, connect, http2=False))
    return {
        # A node identity is required by file-based EDS (the pool file); it names nothing else.
        "node": {"id": "ingate", "cluster": "ingate"},
        "admin": {"address": _socket(s.admin_host, s.admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingate",
                    "address": _socket(s.listen_host, s.listen_port),
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }
