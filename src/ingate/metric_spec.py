"""A model-server metric named the way the upstream picker's `--*-metric` flags name one:
`name` or `name{label=value,...}` (the series of `name` whose labels include all of those pairs).

The empty string means "none" (upstream: `--lora-info-metric ""` turns LoRA affinity's signal off).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    labels: dict[str, str] = field(default_factory=dict)

    def matches(self, labels: dict[str, str]) -> bool:
        """Every pair of the spec is among `labels`."""
        return all(labels.get(k) == v for k, v in self.labels.items())

    def __str__(self) -> str:
        if not self.labels:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in self.labels.items()) + "}"


def parse_metric_spec(text: str) -> MetricSpec | None:
    """`vllm:num_requests_waiting`, `nv_trt_llm_request_metrics{request_type=waiting}` -> a spec;
    "" -> None. ValueError saying what is wrong otherwise (values may be quoted)."""
    t = text.strip()
    if not t:
        return None
    name, brace, rest = t.partition("{")
    name = name.strip()
    if not _NAME.fullmatch(name):
        raise ValueError(f"metric spec {text!r}: {name!r} is not a Prometheus metric name")
    labels: dict[str, str] = {}
    if brace:
        if not rest.endswith("}"):
            raise ValueError(f"metric spec {text!r}: missing closing '}}'")
        for pair in filter(None, (p.strip() for p in rest[:-1].split(","))):
            key, eq, value = pair.partition("=")
            key, value = key.strip(), value.strip().strip('"')
            if not eq or not _LABEL.fullmatch(key) or not value:
                raise ValueError(f"metric spec {text!r}: expected label=value, got {pair!r}")
            labels[key] = value
    return MetricSpec(name, labels)
