"""`ingate k8s render`: every manifest it prints is valid Kubernetes (OpenAPI schemas of the API
server, and the CRDs' own schemas), the objects reference each other correctly, and the picker gets
the upstream ports, probes and flags (docs/kubernetes.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from k8s_schemas import CRD_SCHEMAS, validation_errors

from ingate.cli import main
from ingate.config import parse_config
from ingate.kube.render import render, to_yaml
from ingate.kube.values import RenderError, default_values, load_overrides, merge, parse_set

ROOT = Path(__file__).resolve().parents[2]
POOL = {"router": {"modelServers": {"matchLabels": {"app": "vllm-llama3-8b"}}}}

# Value sets covering every branch of the templates; the Helm test renders the same ones.
CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "ha": {"router": {"epp": {"replicas": 3}}},
    "active-active": {"router": {"epp": {"replicas": 2, "flags": {"ha-enable-leader-election": False}}}},
    "active-active-shared": {
        "router": {
            "epp": {
                "replicas": 3,
                "flags": {"ha-enable-leader-election": False},
                "prefixSharing": {"enabled": True},
            }
        }
    },
    "monitoring": {
        "router": {"monitoring": {"prometheus": {"enabled": True, "extraLabels": {"release": "prom"}}}}
    },
    "monitoring-no-auth": {
        "router": {"monitoring": {"prometheus": {"enabled": True, "auth": {"enabled": False}}}}
    },
    "istio": {
        "provider": {"name": "istio"},
        "httpRoute": {"create": True},
        "gateway": {"create": True, "className": "istio"},
    },
    "istio-plaintext": {
        "provider": {"name": "istio"},
        "router": {"epp": {"flags": {"secure-serving": False}}},
    },
    "gke": {
        "provider": {"name": "gke"},
        "httpRoute": {"create": True, "inferenceGatewayNamespace": "gateways"},
        "gateway": {"create": True, "className": "gke-l7-regional-external-managed"},
    },
    "envoy-gateway": {"httpRoute": {"create": True}, "gateway": {"create": True, "className": "eg"}},
    "kgateway": {"httpRoute": {"create": True}, "gateway": {"create": True, "className": "kgateway"}},
    "objectives-llm-d": {
        "router": {
            "inferenceObjectives": [{"name": "chat", "priority": 10}, {"name": "batch", "priority": -1}]
        }
    },
    "objectives-legacy": {
        "router": {
            "inferenceObjectivesApiVersion": "inference.networking.x-k8s.io/v1alpha2",
            "inferenceObjectives": [{"name": "chat", "priority": 5}],
        }
    },
    "sglang-grpc-ports": {
        "router": {
            "modelServers": {
                "type": "sglang",
                "protocol": "grpc",
                "targetPorts": [{"number": 30000}, {"number": 30001}],
            }
        }
    },
    "custom": {
        "router": {
            "epp": {
                "flags": {"v": 2, "cert-path": "/certs", "enable-cert-reload": True},
                "config": {"flowControl": {"enabled": True}, "metrics": {"intervalMs": 100}},
                "env": [{"name": "EXTRA", "value": "1"}],
                "volumes": [{"name": "certs", "secret": {"secretName": "picker-tls"}}],
                "volumeMounts": [{"name": "certs", "mountPath": "/certs", "readOnly": True}],
                "tolerations": [
                    {"key": "dedicated", "operator": "Equal", "value": "gateway", "effect": "NoSchedule"}
                ],
                "podAnnotations": {"prometheus.io/scrape": "false"},
            },
            "tracing": {"enabled": True},
        }
    },
    "no-pool": {"router": {"inferencePool": {"create": False}}},
    "upstream-plugins-config": {
        "router": {
            "epp": {
                "pluginsConfigFile": "default-plugins.yaml",
                "pluginsCustomConfig": {
                    "default-plugins.yaml": "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
                    "plugins:\n- type: queue-scorer\n- type: max-score-picker\n"
                    "schedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: queue-scorer\n"
                    "  - pluginRef: max-score-picker\n"
                },
            }
        }
    },
}


# The documented example values files (deploy/helm/examples) are cases too, used as they are.
EXAMPLES = sorted((ROOT / "deploy" / "helm" / "examples").glob("values-*.yaml"))
for _f in EXAMPLES:
    CASES[f"example:{_f.stem}"] = yaml.safe_load(_f.read_text())


def case_values(name: str) -> dict[str, Any]:
    if name.startswith("example:"):
        return CASES[name]
    return merge(POOL, CASES[name])


def test_example_values_cover_the_four_gateways() -> None:
    classes = {CASES[f"example:{f.stem}"]["gateway"]["className"] for f in EXAMPLES}
    assert classes == {"eg", "istio", "kgateway", "gke-l7-regional-external-managed"}
    for f in EXAMPLES:
        k = by_kind(render(case_values(f"example:{f.stem}"), "vllm-llama3-8b", "default"))
        assert {"Gateway", "HTTPRoute", "InferencePool", "Deployment"} <= set(k), f.name


def by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def picker(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = by_kind(docs)["Deployment"]
    c: dict[str, Any] = dep["spec"]["template"]["spec"]["containers"][0]
    return c


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rendered_manifest_is_valid(case: str) -> None:
    docs = render(case_values(case), "vllm-llama3-8b", "inference")
    assert docs
    for d in docs:
        assert validation_errors(d) == [], f"{d['kind']}/{d['metadata']['name']}"


def test_the_validator_catches_what_the_api_server_would_reject() -> None:
    docs = render(POOL, "p", "default")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    bad = yaml.safe_load(yaml.safe_dump(dep))
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9002"
    assert validation_errors(bad)
    typo = yaml.safe_load(yaml.safe_dump(dep))
    typo["spec"]["replica"] = 1
    assert validation_errors(typo)
    pool = next(d for d in docs if d["kind"] == "InferencePool")
    nine = yaml.safe_load(yaml.safe_dump(pool))
    nine["spec"]["targetPorts"] = [{"number": 8000 + i} for i in range(9)]
    assert validation_errors(nine)
    mode = yaml.safe_load(yaml.safe_dump(pool))
    mode["spec"]["endpointPickerRef"]["failureMode"] = "Sometimes"
    assert validation_errors(mode)
    assert validation_errors({"apiVersion": "example.com/v1", "kind": "Unknown", "metadata": {"name": "x"}})


def test_crd_schemas_cover_both_objective_generations() -> None:
    assert ("llm-d.ai/v1alpha2", "InferenceObjective") in CRD_SCHEMAS
    assert ("llm-d.ai/v1alpha2", "InferenceModelRewrite") in CRD_SCHEMAS
    assert ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective") in CRD_SCHEMAS
    assert ("inference.networking.k8s.io/v1", "InferencePool") in CRD_SCHEMAS
    assert ("monitoring.coreos.com/v1", "ServiceMonitor") in CRD_SCHEMAS
    assert ("networking.istio.io/v1", "DestinationRule") in CRD_SCHEMAS


def test_defaults_give_the_upstream_ports_probes_and_objects() -> None:
    docs = render(POOL, "vllm-llama3-8b", "default")
    kinds = by_kind(docs)
    assert sorted(kinds) == sorted(
        ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service", "InferencePool"]
    )
    c = picker(docs)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "grpc": 9002,
        "grpc-health": 9003,
        "metrics": 9090,
    }
    assert c["livenessProbe"]["grpc"] == {"port": 9003, "service": "inference-extension"}
    assert c["readinessProbe"]["grpc"] == {"port": 9003, "service": "inference-extension"}
    a = c["args"]
    assert a[0] == "serve"  # ingate serve with the upstream flags
    assert a[a.index("--pool-name") + 1] == "vllm-llama3-8b"
    assert a[a.index("--pool-namespace") + 1] == "default"
    assert a[a.index("--config-file") + 1] == "/config/config.yaml"
    assert "--ha-enable-leader-election" not in a and "--tracing=false" in a
    assert "--metrics-endpoint-auth=false" not in a  # auth stays on (upstream default)
    assert {e["name"] for e in c["env"]} == {"NAMESPACE", "POD_NAME"}
    dep = kinds["Deployment"][0]["spec"]
    assert dep["strategy"] == {"type": "Recreate"}
    assert dep["template"]["spec"]["terminationGracePeriodSeconds"] == 130
    assert dep["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]  # writable scratch space
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    (svc,) = kinds["Service"]
    assert {p["name"]: (p["port"], p.get("appProtocol")) for p in svc["spec"]["ports"]} == {
        "grpc-ext-proc": (9002, "kubernetes.io/h2c"),
        "http-metrics": (9090, None),
    }
    (pool,) = kinds["InferencePool"]
    assert pool["metadata"]["name"] == "vllm-llama3-8b"
    assert pool["spec"]["endpointPickerRef"] == {
        "name": "vllm-llama3-8b-epp",
        "port": {"number": 9002},
        "failureMode": "FailOpen",
    }


def test_references_between_objects_resolve() -> None:
    for case in CASES:
        docs = render(case_values(case), "pool-a", "ns1")
        k = by_kind(docs)
        names = {(d["kind"], d["metadata"]["name"]) for d in docs}
        (svc, *peers), (dep,) = k["Service"], k["Deployment"]  # peers: the prefix-sharing Service
        pod = dep["spec"]["template"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        port_names = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
        for s in (svc, *peers):
            assert s["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
            assert {p["targetPort"] for p in s["spec"]["ports"]} <= port_names
        assert ("ServiceAccount", pod["spec"]["serviceAccountName"]) in names
        assert pod["spec"]["volumes"][0]["configMap"]["name"] in {
            n for kind, n in names if kind == "ConfigMap"
        }
        for b in k.get("RoleBinding", []) + k.get("ClusterRoleBinding", []):
            assert (b["roleRef"]["kind"], b["roleRef"]["name"]) in names
            assert ("ServiceAccount", b["subjects"][0]["name"]) in names
        for pool in k.get("InferencePool", []):
            ref = pool["spec"]["endpointPickerRef"]
            assert ref["name"] == svc["metadata"]["name"]
            assert ref["port"]["number"] in {p["port"] for p in svc["spec"]["ports"]}
        for o in k.get("InferenceObjective", []):
            assert ("InferencePool", o["spec"]["poolRef"]["name"]) in names
        for route in k.get("HTTPRoute", []):
            assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == "pool-a"
            if "Gateway" in k:
                assert route["spec"]["parentRefs"][0]["name"] == k["Gateway"][0]["metadata"]["name"]
        for sm in k.get("ServiceMonitor", []):
            assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
            assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}


def test_least_privilege_rbac() -> None:
    docs = render(POOL, "p", "default")
    (role,) = by_kind(docs)["Role"]
    grants = {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert all(v in {"get", "list", "watch"} for _, _, v in grants)  # read-only without HA
    for g in ("llm-d.ai", "inference.networking.x-k8s.io"):  # both objective generations
        assert (g, "inferenceobjectives", "watch") in grants and (
            g,
            "inferencemodelrewrites",
            "list",
        ) in grants
    assert ("inference.networking.k8s.io", "inferencepools", "watch") in grants
    assert ("", "pods", "watch") in grants
    assert "ClusterRole" not in by_kind(docs)  # nothing cluster-wide unless metrics auth needs it


def test_high_availability_switches_on_leader_election() -> None:
    docs = render(case_values("ha"), "p", "default")
    k = by_kind(docs)
    c = picker(docs)
    assert "--ha-enable-leader-election" in c["args"]
    assert c["livenessProbe"]["grpc"]["service"] == "liveness"
    assert c["readinessProbe"]["grpc"]["service"] == "readiness"
    le = next(r for r in k["Role"] if r["metadata"]["name"].endswith("-leader-election"))
    assert le["rules"][0]["resources"] == ["leases"] and "delete" not in le["rules"][0]["verbs"]
    assert "PodDisruptionBudget" not in k  # only the leader is ready: a budget would block drains
    aa = render(case_values("active-active"), "p", "default")
    assert by_kind(aa)["PodDisruptionBudget"][0]["spec"]["maxUnavailable"] == 1
    assert "--ha-enable-leader-election=false" in picker(aa)["args"]
    assert picker(aa)["readinessProbe"]["grpc"]["service"] == "inference-extension"
    # Active-active with prefix sharing: a headless Service lists the replicas; the config names it.
    sh = render(case_values("active-active-shared"), "p", "ns")
    peers = next(s for s in by_kind(sh)["Service"] if s["metadata"]["name"] == "p-epp-peers")
    assert peers["spec"]["clusterIP"] == "None" and peers["spec"]["publishNotReadyAddresses"] is True
    assert peers["spec"]["ports"][0] == {
        "name": "prefix-share",
        "protocol": "UDP",
        "port": 9005,
        "targetPort": "prefix-share",
    }
    assert {"name": "prefix-share", "containerPort": 9005, "protocol": "UDP"} in picker(sh)["ports"]
    cfg = yaml.safe_load(by_kind(sh)["ConfigMap"][0]["data"]["config.yaml"])
    assert cfg["prefixSharing"] == {
        "listen": "0.0.0.0:9005",
        "peers": ["p-epp-peers.ns.svc.cluster.local:9005"],
    }
    assert "p-epp-peers" not in {s["metadata"]["name"] for s in by_kind(aa)["Service"]}


def test_monitoring_renders_service_monitor_and_metrics_auth() -> None:
    docs = render(case_values("monitoring"), "p", "ns")
    k = by_kind(docs)
    (sm,) = k["ServiceMonitor"]
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"][0]["authorization"]["credentials"]["key"] == "token"
    (cr,) = k["ClusterRole"]
    assert {"nonResourceURLs": ["/metrics"], "verbs": ["get"]} in cr["rules"]
    off = render(case_values("monitoring-no-auth"), "p", "ns")
    assert "--metrics-endpoint-auth=false" in picker(off)["args"]
    assert "ClusterRole" not in by_kind(off)
    assert "authorization" not in by_kind(off)["ServiceMonitor"][0]["spec"]["endpoints"][0]


def test_providers() -> None:
    istio = by_kind(render(case_values("istio"), "p", "ns"))
    (dr,) = istio["DestinationRule"]
    assert dr["spec"]["host"] == "p-epp.ns.svc.cluster.local"
    assert dr["spec"]["trafficPolicy"]["tls"] == {"mode": "SIMPLE", "insecureSkipVerify": True}
    assert istio["Gateway"][0]["spec"]["gatewayClassName"] == "istio"
    assert "DestinationRule" not in by_kind(render(case_values("istio-plaintext"), "p", "ns"))
    gke = by_kind(render(case_values("gke"), "p", "ns"))
    (hc,) = gke["HealthCheckPolicy"]
    assert hc["spec"]["targetRef"] == {
        "group": "inference.networking.k8s.io",
        "kind": "InferencePool",
        "name": "p",
    }
    assert hc["spec"]["default"]["config"]["httpHealthCheck"] == {"requestPath": "/health", "port": 8000}
    (bp,) = gke["GCPBackendPolicy"]
    assert bp["spec"]["default"]["timeoutSec"] == 300 and bp["spec"]["targetRef"] == hc["spec"]["targetRef"]
    (route,) = gke["HTTPRoute"]
    assert "timeouts" not in route["spec"]["rules"][0]
    assert route["spec"]["parentRefs"][0]["namespace"] == "gateways"
    assert gke["Gateway"][0]["metadata"]["namespace"] == "gateways"


def test_configmap_carries_a_valid_ingate_config() -> None:
    for case in CASES:
        docs = render(case_values(case), "p", "ns")
        (cm,) = by_kind(docs)["ConfigMap"]
        cfg = yaml.safe_load(cm["data"]["config.yaml"])
        assert cfg["pool"]["name"] == "p" and cfg["dataplane"]["type"] == "extproc"
        # No pool.endpoints: in Kubernetes mode the controller supplies them.
        assert "endpoints" not in cfg["pool"]
        parsed = parse_config(cfg, f"{case} ConfigMap")
        assert parsed.listen.port == 9002
    custom = yaml.safe_load(
        by_kind(render(case_values("custom"), "p", "ns"))["ConfigMap"][0]["data"]["config.yaml"]
    )
    assert custom["flowControl"] == {"enabled": True} and custom["metrics"] == {"intervalMs": 100}
    sg = yaml.safe_load(
        by_kind(render(case_values("sglang-grpc-ports"), "p", "ns"))["ConfigMap"][0]["data"]["config.yaml"]
    )
    assert sg["pool"]["engine"] == "sglang"


def test_upstream_plugins_config_is_mounted_and_read() -> None:
    docs = render(case_values("upstream-plugins-config"), "p", "ns")
    (cm,) = by_kind(docs)["ConfigMap"]
    epc = yaml.safe_load(cm["data"]["default-plugins.yaml"])
    assert epc["kind"] == "EndpointPickerConfig"
    a = picker(docs)["args"]
    assert a[a.index("--config-file") + 1] == "/config/default-plugins.yaml"
    with pytest.raises(RenderError, match="pluginsConfigFile"):
        render({"router": {**POOL["router"], "epp": {"pluginsConfigFile": "missing.yaml"}}}, "p", "ns")


def test_flags_render_like_helm() -> None:
    a = picker(render(case_values("custom"), "p", "ns"))["args"]
    assert ["--cert-path=/certs", "--enable-cert-reload=true", "--v=2"] == [
        x for x in a if x.split("=")[0] in ("--cert-path", "--enable-cert-reload", "--v")
    ]
    assert "--tracing=true" in a


def test_bad_values_fail_naming_the_value() -> None:
    with pytest.raises(RenderError, match="matchLabels"):
        render({}, "p", "ns")
    with pytest.raises(RenderError, match=r"provider\.name"):
        render({**POOL, "provider": {"name": "aws"}}, "p", "ns")
    with pytest.raises(RenderError, match="targetPorts"):
        render({"router": {"modelServers": {"matchLabels": {"a": "b"}, "targetPorts": []}}}, "p", "ns")
    with pytest.raises(RenderError, match=r"inferencePool\.create"):
        render(
            case_values("no-pool")
            | {"router": {**case_values("no-pool")["router"], "inferenceObjectives": [{"name": "x"}]}},
            "p",
            "ns",
        )
    with pytest.raises(RenderError, match="type"):
        render({"router": {"modelServers": {"matchLabels": {"a": "b"}, "type": "llamacpp"}}}, "p", "ns")


def test_names_must_be_valid_kubernetes_names() -> None:
    for bad in ("Pool", "pool_a", "-pool", "p" * 54):
        with pytest.raises(RenderError, match="name"):
            render(POOL, bad, "ns")
    with pytest.raises(RenderError, match="namespace"):
        render(POOL, "pool", "Bad_NS")
    long = render(POOL, "p" * 53, "ns")
    assert all(len(d["metadata"]["name"]) <= 63 for d in long)


def test_set_and_values_files_merge_like_helm(tmp_path: Path) -> None:
    assert parse_set("a.b=true") == {"a": {"b": True}}
    assert parse_set("a.n=3") == {"a": {"n": 3}}
    assert parse_set("a.s=007") == {"a": {"s": "007"}}  # Helm keeps leading zeros as strings
    assert parse_set("a.x=null") == {"a": {"x": None}}
    with pytest.raises(RenderError):
        parse_set("a[0].b=1")
    f = tmp_path / "v.yaml"
    f.write_text("router:\n  epp:\n    replicas: 2\n  modelServers:\n    matchLabels: {app: x}\n")
    o = load_overrides((str(f),), ("router.epp.replicas=4",))
    assert o["router"]["epp"]["replicas"] == 4 and o["router"]["modelServers"]["matchLabels"] == {"app": "x"}
    deleted = render(load_overrides((str(f),), ("router.epp.resources=null",)), "p", "ns")
    assert "resources" not in picker(deleted)


def test_cli_prints_the_same_manifests(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main,
        [
            "k8s",
            "render",
            "--name",
            "vllm-llama3-8b",
            "-n",
            "inference",
            "--set",
            "router.modelServers.matchLabels.app=vllm",
            "--set",
            "router.epp.replicas=2",
        ],
    )
    assert res.exit_code == 0, res.output
    printed = [d for d in yaml.safe_load_all(res.output) if d]
    expected = render(
        {"router": {"modelServers": {"matchLabels": {"app": "vllm"}}, "epp": {"replicas": 2}}},
        "vllm-llama3-8b",
        "inference",
    )
    assert printed == expected
    assert yaml.safe_load_all(to_yaml(expected))
    bad = CliRunner().invoke(main, ["k8s", "render"])
    assert bad.exit_code != 0 and "matchLabels" in bad.output
    top = CliRunner().invoke(main, ["--help"])
    assert "k8s" in top.output
    vals = CliRunner().invoke(main, ["k8s", "values"])
    assert yaml.safe_load(vals.output) == default_values()


def test_chart_values_are_the_render_defaults() -> None:
    chart = (ROOT / "deploy/helm/ingate/values.yaml").read_bytes()
    assert chart == (ROOT / "src/ingate/kube/values.yaml").read_bytes()


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_picker_starts_with_ingates_own_flag_parser(case: str, tmp_path: Path) -> None:
    """What the picker container will run, checked with ingate's real code: the args parse as
    upstream picker flags, the drop-in dispatch recognises them, and the ConfigMap's file builds a
    gateway config with the ports, TLS and data plane the manifests promise."""
    from ingate.epp_flags import EppOptions, looks_like_epp_args
    from ingate.serve import build_config

    docs = render(case_values(case), "vllm-llama3-8b", "inference")
    (cm,) = by_kind(docs)["ConfigMap"]
    for file, text in cm["data"].items():  # the ConfigMap mounted at /config, here under tmp_path
        (tmp_path / file).write_text(text)
    c = picker(docs)
    assert c["args"][0] == "serve"
    flags = [a.replace("/config/", f"{tmp_path}/") for a in c["args"][1:]]
    assert looks_like_epp_args(flags)  # the same args without "serve" also run (image swap)
    epp = EppOptions.from_args(flags)
    assert epp.kubernetes and epp.get("pool-name") == "vllm-llama3-8b" and epp.namespace == "inference"
    cfg = build_config(None, epp)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert cfg.listen.port == ports["grpc"] and cfg.dataplane.type == "extproc"
    assert cfg.serving.health_port == ports["grpc-health"] == c["readinessProbe"]["grpc"]["port"]
    assert cfg.serving.metrics_port == ports["metrics"]
    assert cfg.serving.host == "0.0.0.0" and cfg.listen.host == "0.0.0.0"
    assert cfg.serving.secure_serving is (
        case_values(case)["router"].get("epp", {}).get("flags", {}).get("secure-serving", True)
    )
    assert cfg.pool.name == "vllm-llama3-8b"
