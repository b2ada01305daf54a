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
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import click
import yaml

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
    r = v["router"]
    epp, ms, mon = r["epp"], r["modelServers"], r["monitoring"]
    name = picker_name(release)
    flags: dict[str, Any] = dict(epp.get("flags") or {})
    replicas = int(epp["replicas"])
    leader = replicas > 1 and _truthy_flag(flags, "ha-enable-leader-election", True)
    secure = _truthy_flag(flags, "secure-serving", True)
    auth = bool(mon["prometheus"]["auth"]["enabled"])
    prom = bool(mon["prometheus"]["enabled"])
    ext, health, metrics = int(epp["extProcPort"]), int(epp["grpcHealthPort"]), int(epp["metricsPort"])
    if not ms.get("matchLabels"):
        raise RenderError("router.modelServers.matchLabels is required (the model-server pods' labels)")
    if not ms.get("targetPorts") or len(ms["targetPorts"]) > 8:
        raise RenderError("router.modelServers.targetPorts needs 1 to 8 ports")
    if ms["type"] not in ENGINES:
        raise RenderError(f"router.modelServers.type {ms['type']!r} is not one of {sorted(ENGINES)}")
    labels = {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/instance": release,
        "app.kubernetes.io/part-of": "ingate",
        "app.kubernetes.io/version": app_version(),
    }
    selector = {"inferencepool": name}

    def meta(
        obj_name: str, ns: str | None = namespace, extra: dict[str, str] | None = None
    ) -> dict[str, Any]:
        m: dict[str, Any] = {"name": obj_name}
        if ns is not None:
            m["namespace"] = ns
        m["labels"] = {**labels, **(extra or {})}
        return m

    docs: list[dict[str, Any]] = []
    docs.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(name)})
    docs.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta(name),
            "rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                {
                    "apiGroups": [POOL_GROUP],
                    "resources": ["inferencepools"],
                    "verbs": ["get", "list", "watch"],
                },
                {
                    "apiGroups": ["llm-d.ai", "inference.networking.x-k8s.io"],
                    "resources": ["inferenceobjectives", "inferencemodelrewrites"],
                    "verbs": ["get", "list", "watch"],
                },
            ],
        }
    )
    docs.append(_binding("RoleBinding", meta(name), name, name, namespace))
    if leader:
        le = f"{name}-leader-election"
        docs.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": meta(le),
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
        docs.append(_binding("RoleBinding", meta(le), le, name, namespace))
    if prom and auth:
        cr = f"{release}-{namespace}-epp"[:63]
        docs.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": meta(cr, None),
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
        docs.append(_binding("ClusterRoleBinding", meta(cr, None), cr, name, namespace))

    custom = {str(k): str(t) for k, t in (epp.get("pluginsCustomConfig") or {}).items()}
    config_file = str(epp["pluginsConfigFile"])
    if config_file != CONFIG_KEY and config_file not in custom:
        raise RenderError(
            f"router.epp.pluginsConfigFile {config_file!r} is neither {CONFIG_KEY!r} nor a key of "
            "router.epp.pluginsCustomConfig"
        )
    config = merge(
        {
            "listen": {"host": "0.0.0.0", "port": ext},
            "pool": {"name": release, "engine": ENGINES[ms["type"]]},
            "dataplane": {"type": "extproc", "failureMode": r["inferencePool"]["failureMode"]},
        },
        epp.get("config") or {},
    )
    docs.append(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta(name),
            "data": {CONFIG_KEY: yaml.safe_dump(config, sort_keys=True), **custom},
        }
    )

    args = [
        "epp",
        "--pool-name",
        release,
        "--pool-namespace",
        namespace,
        "--pool-group",
        POOL_GROUP,
        "--zap-encoder",
        "json",
        "--config-file",
        f"{CONFIG_DIR}/{config_file}",
        "--grpc-port",
        str(ext),
        "--grpc-health-port",
        str(health),
        "--metrics-port",
        str(metrics),
    ]
    if leader and "ha-enable-leader-election" not in flags:
        args.append("--ha-enable-leader-election")
    args += [_flag(k, flags[k]) for k in sorted(flags)]
    args.append(_flag("tracing", bool(r["tracing"]["enabled"])))
    if not auth:
        args.append("--metrics-endpoint-auth=false")
    live, ready = ("liveness", "readiness") if leader else ("inference-extension", "inference-extension")
    container: dict[str, Any] = {
        "name": "epp",
        "image": f"{epp['image']['registry']}/{epp['image']['repository']}:{epp['image']['tag']}",
        "imagePullPolicy": epp["image"]["pullPolicy"],
        "args": args,
        "ports": [
            {"name": "grpc", "containerPort": ext},
            {"name": "grpc-health", "containerPort": health},
            {"name": "metrics", "containerPort": metrics},
            *epp["extraContainerPorts"],
        ],
        "livenessProbe": {
            "grpc": {"port": health, "service": live},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
        },
        "readinessProbe": {"grpc": {"port": health, "service": ready}, "periodSeconds": 2},
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
    template_meta: dict[str, Any] = {"labels": {**selector, "app.kubernetes.io/part-of": "ingate"}}
    if epp.get("podAnnotations"):
        template_meta["annotations"] = epp["podAnnotations"]
    pod: dict[str, Any] = {
        "serviceAccountName": name,
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
            {"name": "config", "configMap": {"name": name}},
            {"name": "tmp", "emptyDir": {}},
            *epp["volumes"],
        ],
    }
    if epp.get("affinity"):
        pod["affinity"] = epp["affinity"]
    if epp.get("tolerations"):
        pod["tolerations"] = epp["tolerations"]
    docs.append(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta(name),
            "spec": {
                "replicas": replicas,
                # Recreate, as upstream: a rolling update would keep the old leader (the only ready
                # pod under leader election) alive and stall.
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": selector},
                "template": {"metadata": template_meta, "spec": pod},
            },
        }
    )
    docs.append(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(name),
            "spec": {
                "type": "ClusterIP",
                "selector": selector,
                "ports": [
                    {
                        "name": "grpc-ext-proc",
                        "protocol": "TCP",
                        "port": ext,
                        "targetPort": "grpc",
                        "appProtocol": "kubernetes.io/h2c",
                    },
                    {"name": "http-metrics", "protocol": "TCP", "port": metrics, "targetPort": "metrics"},
                ],
            },
        }
    )
    if replicas > 1 and not leader:
        docs.append(
            {
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": meta(name),
                "spec": {
                    "maxUnavailable": epp["pdb"]["maxUnavailable"],
                    "selector": {"matchLabels": selector},
                },
            }
        )
    if prom:
        endpoint: dict[str, Any] = {"port": "http-metrics", "path": "/metrics", "interval": mon["interval"]}
        if auth:
            endpoint["authorization"] = {
                "credentials": {"name": mon["prometheus"]["auth"]["secretName"], "key": "token"}
            }
        docs.append(
            {
                "apiVersion": "monitoring.coreos.com/v1",
                "kind": "ServiceMonitor",
                "metadata": meta(f"{name}-monitor", extra=mon["prometheus"].get("extraLabels") or {}),
                "spec": {
                    "endpoints": [endpoint],
                    "namespaceSelector": {"matchNames": [namespace]},
                    "selector": {"matchLabels": labels},
                },
            }
        )
    pool_ref = {"group": POOL_GROUP, "kind": "InferencePool", "name": release}
    if r["inferencePool"]["create"]:
        pool_spec: dict[str, Any] = {
            "selector": {"matchLabels": {str(k): str(val) for k, val in ms["matchLabels"].items()}},
            "targetPorts": [{"number": int(p["number"])} for p in ms["targetPorts"]],
            "endpointPickerRef": {
                "name": name,
                "port": {"number": ext},
                "failureMode": r["inferencePool"]["failureMode"],
            },
        }
        if ms.get("protocol") == "grpc":
            pool_spec["appProtocol"] = "kubernetes.io/h2c"
        elif ms.get("protocol") == "http":
            pool_spec["appProtocol"] = "http"
        docs.append(
            {
                "apiVersion": f"{POOL_GROUP}/v1",
                "kind": "InferencePool",
                "metadata": meta(release),
                "spec": pool_spec,
            }
        )
        for obj in r["inferenceObjectives"]:
            if "name" not in obj:
                raise RenderError("router.inferenceObjectives[]: every objective needs a name")
            docs.append(
                {
                    "apiVersion": r["inferenceObjectivesApiVersion"],
                    "kind": "InferenceObjective",
                    "metadata": meta(obj["name"]),
                    "spec": {"priority": int(obj.get("priority", 0)), "poolRef": pool_ref},
                }
            )
    elif r["inferenceObjectives"]:
        raise RenderError("router.inferenceObjectives needs router.inferencePool.create=true")
    route, gw = v["httpRoute"], v["gateway"]
    gw_ns = route["inferenceGatewayNamespace"] or namespace
    provider = str(v["provider"]["name"]).lower()
    if gw["create"]:
        docs.append(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": meta(route["inferenceGatewayName"], gw_ns),
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
            "backendRefs": [{**pool_ref}],
            "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
        }
        if provider != "gke":  # the GKE controller rejects HTTPRoute timeouts, as upstream notes
            rule["timeouts"] = {"request": route["requestTimeout"]}
        docs.append(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": meta(release),
                "spec": {"parentRefs": [parent], "rules": [rule]},
            }
        )
    if provider == "istio" and secure:
        host = v["provider"]["istio"]["destinationRule"]["host"] or f"{name}.{namespace}.svc.cluster.local"
        docs.append(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "DestinationRule",
                "metadata": meta(name),
                "spec": {
                    "host": host,
                    "trafficPolicy": {"tls": {"mode": "SIMPLE", "insecureSkipVerify": True}},
                },
            }
        )
    elif provider == "gke":
        docs.append(
            {
                "apiVersion": "networking.gke.io/v1",
                "kind": "HealthCheckPolicy",
                "metadata": meta(release),
                "spec": {
                    "targetRef": {"group": POOL_GROUP, "kind": "InferencePool", "name": release},
                    "default": {
                        "timeoutSec": 2,
                        "checkIntervalSec": 2,
                        "config": {
                            "type": "HTTP",
                            "httpHealthCheck": {
                                "requestPath": "/health",
                                "port": int(ms["targetPorts"][0]["number"]),
                            },
                        },
                    },
                },
            }
        )
        docs.append(
            {
                "apiVersion": "networking.gke.io/v1",
                "kind": "GCPBackendPolicy",
                "metadata": meta(release),
                "spec": {
                    "targetRef": {"group": POOL_GROUP, "kind": "InferencePool", "name": release},
                    "default": {
                        "timeoutSec": int(v["provider"]["gke"]["timeoutSec"]),
                        "logging": {"enabled": True},
                    },
                },
            }
        )
    elif provider not in ("none", "istio"):
        raise RenderError(f"provider.name {provider!r} is not one of none, istio, gke")
    return docs


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
