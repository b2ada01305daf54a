"""The picker's Kubernetes manifests without Helm: `ingate k8s render`.

One source of defaults, `values.yaml` beside this module (the Helm chart's `values.yaml` is a copy,
checked by the tests); the same values give the same objects here and in `helm template
deploy/helm/ingate` (tests/unit/test_helm_chart.py renders both and compares them object by object).
Objects are built as data, not text, so every value is typed and quoting cannot go wrong.

Why two renderers rather than one: the chart is what Helm users install and must stay plain Helm;
`ingate k8s render` must work where no Helm exists (the image, CI, air-gapped clusters) and without a
Go runtime in Python. The equality test keeps them one behaviour.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import click
import yaml

from ingate.kube import render_ha
from ingate.kube.values import (
    ENGINES,
    VALUES_FILE,
    RenderError,
    check_values,
    default_values,
    load_overrides,
    merge,
    values_schema,
)

POOL_GROUP = "inference.networking.k8s.io"
CONFIG_KEY = "config.yaml"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
CONFIG_DIR = "/config"


def app_version() -> str:
    try:
        return version("ingate")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0.1.0"


def picker_name(release: str) -> str:
    """The picker's objects are named `<release>-epp`, as upstream."""
    return f"{release.lower().strip()[:40]}-epp"


def _flag(key: str, value: Any) -> str:
    v = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return f"--{key}={v}"


def _truthy_flag(flags: dict[str, Any], key: str, default: bool) -> bool:
    if key not in flags:
        return default
    return str(flags[key]).lower() != "false"


@dataclass
class _Release:
    """One rendering: the merged values and what every object derives from them."""

    v: dict[str, Any]
    release: str
    namespace: str

    def __post_init__(self) -> None:
        self.r: dict[str, Any] = self.v["router"]
        self.epp: dict[str, Any] = self.r["epp"]
        self.ms: dict[str, Any] = self.r["modelServers"]
        self.mon: dict[str, Any] = self.r["monitoring"]
        self.name = picker_name(self.release)
        self.flags: dict[str, Any] = dict(self.epp.get("flags") or {})
        self.replicas = int(self.epp["replicas"])
        self.leader = self.replicas > 1 and _truthy_flag(self.flags, "ha-enable-leader-election", True)
        self.secure = _truthy_flag(self.flags, "secure-serving", True)
        self.auth = bool(self.mon["prometheus"]["auth"]["enabled"])
        self.prom = bool(self.mon["prometheus"]["enabled"])
        self.ext = int(self.epp["extProcPort"])
        self.health = int(self.epp["grpcHealthPort"])
        self.metrics = int(self.epp["metricsPort"])
        self.provider = str(self.v["provider"]["name"]).lower()
        self.share = render_ha.enabled(self.epp, self.replicas, self.leader)
        self.share_port = int(self.epp["prefixSharing"]["port"])
        self.labels = {
            "app.kubernetes.io/name": self.name,
            "app.kubernetes.io/instance": self.release,
            "app.kubernetes.io/part-of": "ingate",
            "app.kubernetes.io/version": app_version(),
        }
        self.selector = {"inferencepool": self.name}
        self.pool_ref = {"group": POOL_GROUP, "kind": "InferencePool", "name": self.release}

    def meta(self, name: str, ns: str | None = "", extra: dict[str, str] | None = None) -> dict[str, Any]:
        """Object metadata: in the release namespace unless `ns` names another (None: cluster-wide)."""
        m: dict[str, Any] = {"name": name}
        if ns is not None:
            m["namespace"] = ns or self.namespace
        m["labels"] = {**self.labels, **(extra or {})}
        return m


def render(
    overrides: dict[str, Any] | None = None, release: str = "default-pool", namespace: str = "default"
) -> list[dict[str, Any]]:
    """The picker's manifests for `release` (the InferencePool's name) in `namespace`."""
    if not _DNS_LABEL.match(release) or len(release) > 53:
        raise RenderError(
            f"name {release!r}: must be a lowercase DNS label of at most 53 characters (the InferencePool's name)"
        )
    if not _DNS_LABEL.match(namespace) or len(namespace) > 63:
        raise RenderError(f"namespace {namespace!r}: must be a lowercase DNS label")
    v = merge(default_values(), overrides or {})
    problems = check_values(v, values_schema())
    if problems:
        raise RenderError("; ".join(problems))
    ms = v["router"]["modelServers"]
    if not ms.get("matchLabels"):
        raise RenderError("router.modelServers.matchLabels is required (the model-server pods' labels)")
    if not ms.get("targetPorts") or len(ms["targetPorts"]) > 8:
        raise RenderError("router.modelServers.targetPorts needs 1 to 8 ports")
    c = _Release(v, release, namespace)
    configmap, config_file = _configmap(c)
    return [
        *_rbac(c),
        configmap,
        _deployment(c, config_file),
        _service(c),
        *([render_ha.peers_service(c.meta(f"{c.name}-peers"), c.selector, c.share_port)] if c.share else []),
        *_disruption_budget(c),
        *_service_monitor(c),
        *_pool(c),
        *_routing(c),
        *_provider(c),
    ]


def _rbac(c: _Release) -> list[dict[str, Any]]:
    read = ["get", "list", "watch"]
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": c.meta(c.name)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": c.meta(c.name),
            "rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": read},
                {"apiGroups": [POOL_GROUP], "resources": ["inferencepools"], "verbs": read},
                {
                    "apiGroups": ["llm-d.ai", "inference.networking.x-k8s.io"],
                    "resources": ["inferenceobjectives", "inferencemodelrewrites"],
                    "verbs": read,
                },
            ],
        },
        _binding("RoleBinding", c.meta(c.name), c.name, c.name, c.namespace),
    ]
    if c.leader:
        le = f"{c.name}-leader-election"
        docs.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": c.meta(le),
                "rules": [
                    {
                        "apiGroups": ["coordination.k8s.io"],
                        "resources": ["leases"],
                        "verbs": ["get", "create", "update", "patch"],
                    },
                    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
                ],
            }
        )
        docs.append(_binding("RoleBinding", c.meta(le), le, c.name, c.namespace))
    if c.prom and c.auth:
        # The picker checks scrapers' tokens (TokenReview) and their right to GET /metrics.
        cr = f"{c.release}-{c.namespace}-epp"[:63]
        docs.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": c.meta(cr, None),
                "rules": [
                    {
                        "apiGroups": ["authentication.k8s.io"],
                        "resources": ["tokenreviews"],
                        "verbs": ["create"],
                    },
                    {
                        "apiGroups": ["authorization.k8s.io"],
                        "resources": ["subjectaccessreviews"],
                        "verbs": ["create"],
                    },
                    {"nonResourceURLs": ["/metrics"], "verbs": ["get"]},
                ],
            }
        )
        docs.append(_binding("ClusterRoleBinding", c.meta(cr, None), cr, c.name, c.namespace))
    return docs


def _configmap(c: _Release) -> tuple[dict[str, Any], str]:
    """The ConfigMap (ingate's config.yaml plus any upstream plugin files) and the file to read."""
    custom = {str(k): str(t) for k, t in (c.epp.get("pluginsCustomConfig") or {}).items()}
    config_file = str(c.epp["pluginsConfigFile"])
    if config_file != CONFIG_KEY and config_file not in custom:
        raise RenderError(
            f"router.epp.pluginsConfigFile {config_file!r} is neither {CONFIG_KEY!r} nor a key of "
            "router.epp.pluginsCustomConfig"
        )
    config = merge(
        {
            "listen": {"host": "0.0.0.0", "port": c.ext},
            "pool": {"name": c.release, "engine": ENGINES[c.ms["type"]]},
            "dataplane": {"type": "extproc", "failureMode": c.r["inferencePool"]["failureMode"]},
            **({"prefixSharing": render_ha.config(c.name, c.namespace, c.share_port)} if c.share else {}),
        },
        c.epp.get("config") or {},
    )
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": c.meta(c.name),
        "data": {CONFIG_KEY: yaml.safe_dump(config, sort_keys=True), **custom},
    }
    return cm, config_file


def _args(c: _Release, config_file: str) -> list[str]:
    """`ingate serve` with the upstream picker's flags (docs/kubernetes.md, "Picker flags")."""
    args = [
        "serve",
        "--pool-name",
        c.release,
        "--pool-namespace",
        c.namespace,
        "--pool-group",
        POOL_GROUP,
        "--zap-encoder",
        "json",
        "--config-file",
        f"{CONFIG_DIR}/{config_file}",
        "--grpc-port",
        str(c.ext),
        "--grpc-health-port",
        str(c.health),
        "--metrics-port",
        str(c.metrics),
    ]
    if c.leader and "ha-enable-leader-election" not in c.flags:
        args.append("--ha-enable-leader-election")
    args += [_flag(k, c.flags[k]) for k in sorted(c.flags)]
    args.append(_flag("tracing", bool(c.r["tracing"]["enabled"])))
    if not c.auth:
        args.append("--metrics-endpoint-auth=false")
    return args


def _deployment(c: _Release, config_file: str) -> dict[str, Any]:
    epp = c.epp
    live, ready = ("liveness", "readiness") if c.leader else ("inference-extension", "inference-extension")
    container: dict[str, Any] = {
        "name": "epp",
        "image": f"{epp['image']['registry']}/{epp['image']['repository']}:{epp['image']['tag']}",
        "imagePullPolicy": epp["image"]["pullPolicy"],
        "args": _args(c, config_file),
        "ports": [
            {"name": "grpc", "containerPort": c.ext},
            {"name": "grpc-health", "containerPort": c.health},
            {"name": "metrics", "containerPort": c.metrics},
            *([render_ha.container_port(c.share_port)] if c.share else []),
            *epp["extraContainerPorts"],
        ],
        "livenessProbe": {
            "grpc": {"port": c.health, "service": live},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
        },
        "readinessProbe": {"grpc": {"port": c.health, "service": ready}, "periodSeconds": 2},
        "env": [
            {"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            *epp["env"],
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        # The root filesystem is read-only: /tmp (self-signed certificates, temp files) is an emptyDir.
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            *epp["volumeMounts"],
        ],
    }
    if epp.get("resources"):
        container["resources"] = epp["resources"]
    template_meta: dict[str, Any] = {"labels": {**c.selector, "app.kubernetes.io/part-of": "ingate"}}
    if epp.get("podAnnotations"):
        template_meta["annotations"] = epp["podAnnotations"]
    pod: dict[str, Any] = {
        "serviceAccountName": c.name,
        # As upstream: at least the longest grace period of the model servers the picker routes to.
        "terminationGracePeriodSeconds": 130,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": c.name}},
            {"name": "tmp", "emptyDir": {}},
            *epp["volumes"],
        ],
    }
    if epp.get("affinity"):
        pod["affinity"] = epp["affinity"]
    if epp.get("tolerations"):
        pod["tolerations"] = epp["tolerations"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": c.meta(c.name),
        "spec": {
            "replicas": c.replicas,
            # Recreate, as upstream: a rolling update would keep the old leader (the only ready pod
            # under leader election) alive and stall.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": c.selector},
            "template": {"metadata": template_meta, "spec": pod},
        },
    }


def _service(c: _Release) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": c.meta(c.name),
        "spec": {
            "type": "ClusterIP",
            "selector": c.selector,
            "ports": [
                {
                    "name": "grpc-ext-proc",
                    "protocol": "TCP",
                    "port": c.ext,
                    "targetPort": "grpc",
                    "appProtocol": "kubernetes.io/h2c",
                },
                {"name": "http-metrics", "protocol": "TCP", "port": c.metrics, "targetPort": "metrics"},
            ],
        },
    }


def _disruption_budget(c: _Release) -> list[dict[str, Any]]:
    # Active-active only: under leader election only the leader is ready, and a budget would count
    # just that pod and block every drain.
    if c.replicas <= 1 or c.leader:
        return []
    spec = {"maxUnavailable": c.epp["pdb"]["maxUnavailable"], "selector": {"matchLabels": c.selector}}
    return [
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": c.meta(c.name), "spec": spec}
    ]


def _service_monitor(c: _Release) -> list[dict[str, Any]]:
    if not c.prom:
        return []
    prom = c.mon["prometheus"]
    endpoint: dict[str, Any] = {"port": "http-metrics", "path": "/metrics", "interval": c.mon["interval"]}
    if c.auth:
        endpoint["authorization"] = {"credentials": {"name": prom["auth"]["secretName"], "key": "token"}}
    return [
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": c.meta(f"{c.name}-monitor", extra=prom.get("extraLabels") or {}),
            "spec": {
                "endpoints": [endpoint],
                "namespaceSelector": {"matchNames": [c.namespace]},
                "selector": {"matchLabels": c.labels},
            },
        }
    ]


def _pool(c: _Release) -> list[dict[str, Any]]:
    """The InferencePool and its InferenceObjectives."""
    objectives = c.r["inferenceObjectives"]
    if not c.r["inferencePool"]["create"]:
        if objectives:
            raise RenderError("router.inferenceObjectives needs router.inferencePool.create=true")
        return []
    spec: dict[str, Any] = {
        "selector": {"matchLabels": {str(k): str(val) for k, val in c.ms["matchLabels"].items()}},
        "targetPorts": [{"number": int(p["number"])} for p in c.ms["targetPorts"]],
        "endpointPickerRef": {
            "name": c.name,
            "port": {"number": c.ext},
            "failureMode": c.r["inferencePool"]["failureMode"],
        },
    }
    if c.ms.get("protocol") == "grpc":
        spec["appProtocol"] = "kubernetes.io/h2c"
    elif c.ms.get("protocol") == "http":
        spec["appProtocol"] = "http"
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": f"{POOL_GROUP}/v1",
            "kind": "InferencePool",
            "metadata": c.meta(c.release),
            "spec": spec,
        }
    ]
    for obj in objectives:
        if "name" not in obj:
            raise RenderError("router.inferenceObjectives[]: every objective needs a name")
        docs.append(
            {
                "apiVersion": c.r["inferenceObjectivesApiVersion"],
                "kind": "InferenceObjective",
                "metadata": c.meta(obj["name"]),
                "spec": {"priority": int(obj.get("priority", 0)), "poolRef": c.pool_ref},
            }
        )
    return docs


def _routing(c: _Release) -> list[dict[str, Any]]:
    """The Gateway (optional) and the HTTPRoute from it to the pool."""
    route, gw = c.v["httpRoute"], c.v["gateway"]
    docs: list[dict[str, Any]] = []
    if gw["create"]:
        docs.append(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": c.meta(route["inferenceGatewayName"], route["inferenceGatewayNamespace"]),
                "spec": {
                    "gatewayClassName": gw["className"],
                    "listeners": [{"name": "http", "protocol": "HTTP", "port": int(gw["port"])}],
                },
            }
        )
    if route["create"]:
        parent: dict[str, Any] = {
            "group": "gateway.networking.k8s.io",
            "kind": "Gateway",
            "name": route["inferenceGatewayName"],
        }
        if route["inferenceGatewayNamespace"]:
            parent["namespace"] = route["inferenceGatewayNamespace"]
        rule: dict[str, Any] = {
            "backendRefs": [{**c.pool_ref}],
            "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
        }
        if c.provider != "gke":  # the GKE controller rejects HTTPRoute timeouts, as upstream notes
            rule["timeouts"] = {"request": route["requestTimeout"]}
        docs.append(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": c.meta(c.release),
                "spec": {"parentRefs": [parent], "rules": [rule]},
            }
        )
    return docs


def _provider(c: _Release) -> list[dict[str, Any]]:
    """Istio: a DestinationRule so its gateway speaks TLS to the self-signed picker. GKE: health checks
    of the model servers and a backend timeout long enough for generations."""
    if c.provider == "istio":
        if not c.secure:
            return []
        host = c.v["provider"]["istio"]["destinationRule"]["host"]
        spec = {
            "host": host or f"{c.name}.{c.namespace}.svc.cluster.local",
            "trafficPolicy": {"tls": {"mode": "SIMPLE", "insecureSkipVerify": True}},
        }
        return [
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "DestinationRule",
                "metadata": c.meta(c.name),
                "spec": spec,
            }
        ]
    if c.provider == "gke":
        target = {"group": POOL_GROUP, "kind": "InferencePool", "name": c.release}
        check = {"requestPath": "/health", "port": int(c.ms["targetPorts"][0]["number"])}
        timeout = int(c.v["provider"]["gke"]["timeoutSec"])
        return [
            {
                "apiVersion": "networking.gke.io/v1",
                "kind": "HealthCheckPolicy",
                "metadata": c.meta(c.release),
                "spec": {
                    "targetRef": target,
                    "default": {
                        "timeoutSec": 2,
                        "checkIntervalSec": 2,
                        "config": {"type": "HTTP", "httpHealthCheck": check},
                    },
                },
            },
            {
                "apiVersion": "networking.gke.io/v1",
                "kind": "GCPBackendPolicy",
                "metadata": c.meta(c.release),
                "spec": {
                    "targetRef": target,
                    "default": {"timeoutSec": timeout, "logging": {"enabled": True}},
                },
            },
        ]
    return []


def _binding(kind: str, metadata: dict[str, Any], role: str, sa: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": metadata,
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}],
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole" if kind == "ClusterRoleBinding" else "Role",
            "name": role,
        },
    }


def to_yaml(docs: list[dict[str, Any]]) -> str:
    return "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)


@click.group("k8s")
def k8s() -> None:
    """Kubernetes packaging: the endpoint picker's manifests (docs/kubernetes.md)."""


@k8s.command("render")
@click.option(
    "--name", "release", default="default-pool", show_default=True, help="InferencePool (release) name."
)
@click.option("--namespace", "-n", default="default", show_default=True)
@click.option("--values", "-f", "files", multiple=True, help="Values file(s), as for helm -f.")
@click.option("--set", "sets", multiple=True, help="key.path=value, as for helm --set.")
def render_cmd(release: str, namespace: str, files: tuple[str, ...], sets: tuple[str, ...]) -> None:
    """Print the picker's manifests (what `helm template deploy/helm/ingate` renders) as YAML."""
    try:
        docs = render(load_overrides(files, sets), release, namespace)
    except RenderError as e:
        raise click.ClickException(str(e)) from None
    click.echo(to_yaml(docs), nl=False)


@k8s.command("values")
@click.option(
    "--schema", is_flag=True, help="Print the values' JSON schema (the chart's values.schema.json)."
)
def values_cmd(schema: bool) -> None:
    """Print the default values (the chart's values.yaml)."""
    if schema:
        click.echo(json.dumps(values_schema(), indent=2))
    else:
        click.echo(VALUES_FILE.read_text(), nl=False)
