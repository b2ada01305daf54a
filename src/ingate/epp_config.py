"""The upstream `EndpointPickerConfig` (llm-d.ai/v1alpha1, or the older
inference.networking.x-k8s.io/v1alpha1) read as ingate scheduler profiles.

Plugins with an ingate equivalent are mapped (docs/kubernetes.md, "The config file"); plugins that
only wire upstream's internals (parsers, data sources, single-profile handler, the approximate prefix
producer) need nothing; any other plugin type fails start-up naming the plugin, rather than running
a scheduler different from the one the manifest asked for.
"""

from __future__ import annotations

from typing import Any

from ingate.config import ConfigError

API_GROUPS = ("llm-d.ai/", "inference.networking.x-k8s.io/")
KIND = "EndpointPickerConfig"

# upstream type -> (ingate kind, ingate type)
PLUGINS: dict[str, tuple[str, str]] = {
    "queue-scorer": ("scorer", "queue"),
    "kv-cache-utilization-scorer": ("scorer", "kv-cache"),
    "prefix-cache-scorer": ("scorer", "prefix-cache"),
    "lora-affinity-scorer": ("scorer", "lora-affinity"),
    "active-request-scorer": ("scorer", "least-in-flight"),
    "max-score-picker": ("picker", "max-score"),
    "random-picker": ("picker", "random"),
    "weighted-random-picker": ("picker", "weighted-random"),
}
WIRING = frozenset(
    {
        "single-profile-handler",
        "approx-prefix-cache-producer",
        "openai-parser",
        "metrics-data-source",
        "core-metrics-extractor",
    }
)
"""Upstream plugins that connect its internals; ingate has them built in."""
PARAMETERS: dict[str, dict[str, str]] = {
    "prefix-cache-scorer": {
        "hashBlockSize": "blockChars",
        "blockSize": "blockChars",
        "maxPrefixBlocksToMatch": "maxBlocks",
        "lruCapacityPerServer": "capacity",
    },
}
"""Upstream parameter -> ingate parameter, per plugin type (others take none)."""


def is_endpoint_picker_config(doc: Any) -> bool:
    return (
        isinstance(doc, dict)
        and doc.get("kind") == KIND
        and isinstance(doc.get("apiVersion"), str)
        and doc["apiVersion"].startswith(API_GROUPS)
    )


def scheduler_from_epp(doc: dict[str, Any], source: str = "config-file") -> dict[str, Any]:
    """The `scheduler:` section (YAML shape) equivalent to an EndpointPickerConfig."""
    plugins: dict[str, tuple[str, str, dict[str, Any]]] = {}
    for i, p in enumerate(doc.get("plugins") or []):
        if not isinstance(p, dict) or not isinstance(p.get("type"), str):
            raise ConfigError(f"{source}: plugins[{i}] needs a 'type'")
        ptype = p["type"]
        name = p.get("name") or ptype
        if ptype in WIRING:
            continue
        mapped = PLUGINS.get(ptype)
        if mapped is None:
            raise ConfigError(f'{source}: plugin type "{ptype}" (name "{name}") has no ingate equivalent')
        params: dict[str, Any] = {}
        names = PARAMETERS.get(ptype, {})
        for k, v in (p.get("parameters") or {}).items():
            if k not in names:
                raise ConfigError(
                    f'{source}: plugin "{name}" ({ptype}): parameter {k!r} has no ingate equivalent'
                    + (f" (known: {', '.join(sorted(names))})" if names else "")
                )
            params[names[k]] = v
        plugins[name] = (mapped[0], mapped[1], params)
    profiles: dict[str, Any] = {}
    for j, prof in enumerate(doc.get("schedulingProfiles") or []):
        pname = prof.get("name") or f"profile-{j}"
        scorers: list[dict[str, Any]] = []
        picker: dict[str, Any] | None = None
        for ref in prof.get("plugins") or []:
            key = ref.get("pluginRef")
            if key not in plugins:
                if key in {p.get("name") or p.get("type") for p in doc.get("plugins") or []}:
                    continue  # a wiring plugin
                raise ConfigError(f"{source}: schedulingProfiles[{j}] refers to unknown plugin {key!r}")
            kind, itype, params = plugins[key]
            if kind == "scorer":
                scorers.append({"type": itype, "weight": float(ref.get("weight", 1)), "parameters": params})
            else:
                picker = {"type": itype, "parameters": params}
        profiles[pname] = {"scorers": scorers, "picker": picker or {"type": "max-score"}}
    if not profiles:
        raise ConfigError(f"{source}: an EndpointPickerConfig needs at least one schedulingProfiles entry")
    return {"defaultProfile": next(iter(profiles)), "profiles": profiles}
