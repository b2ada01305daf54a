"""Per-engine metric names (DESIGN.md, "Model-server metrics") and a fast parser for them.

Only a handful of series matter to the picker, so instead of parsing the whole exposition with
prometheus_client (slow at 20 scrapes/s x many endpoints) each line's metric name is checked against the
engine's small set first and only matching lines are parsed further.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ingate.datastore import EndpointMetrics
from ingate.metric_spec import MetricSpec, parse_metric_spec


@dataclass(frozen=True)
class EngineMetricNames:
    """Where each signal lives for one engine. A (name, label, value) selector picks one labelled series."""

    waiting: tuple[str, ...]
    running: tuple[str, ...]
    kv_usage: tuple[str, ...] = ()
    cache_config: str | None = None
    cache_block_label: str = "block_size"
    cache_blocks_label: str = "num_gpu_blocks"
    lora_info: str | None = None
    selectors: dict[str, dict[str, str]] = field(default_factory=dict)
    """signal ("waiting", "running", "kv_usage", "cache_config", "lora_info") -> labels a series must
    carry to count (Triton puts several signals in one metric; `--*-metric name{l=v}` overrides)."""


ENGINES: dict[str, EngineMetricNames] = {
    "vllm": EngineMetricNames(
        waiting=("vllm:num_requests_waiting",),
        running=("vllm:num_requests_running",),
        kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        cache_config="vllm:cache_config_info",
        lora_info="vllm:lora_requests_info",
    ),
    "sglang": EngineMetricNames(
        waiting=("sglang:num_queue_reqs",),
        running=("sglang:num_running_reqs",),
        kv_usage=("sglang:token_usage",),
        cache_config="sglang:cache_config_info",
        cache_block_label="page_size",
        cache_blocks_label="num_pages",
    ),
    "tgi": EngineMetricNames(waiting=("tgi_queue_size",), running=("tgi_batch_current_size",)),
    "trtllm": EngineMetricNames(
        waiting=("trtllm_num_requests_waiting",),
        running=("trtllm_num_requests_running",),
        kv_usage=("trtllm_kv_cache_utilization",),
    ),
    "triton-trtllm": EngineMetricNames(
        waiting=("nv_trt_llm_request_metrics",),
        running=("nv_trt_llm_request_metrics",),
        kv_usage=("nv_trt_llm_kv_cache_block_metrics",),
        selectors={
            "waiting": {"request_type": "waiting"},
            "running": {"request_type": "scheduled"},
            "kv_usage": {"kv_cache_block_type": "fraction"},
        },
    ),
}

OVERRIDE_KEYS = {
    "queued_requests": "waiting",
    "running_requests": "running",
    "kv_cache_usage": "kv_usage",
    "lora_info": "lora_info",
    "cache_info": "cache_config",
}
"""`metrics.names` keys (upstream's `--*-metric` flags) -> the signal each one names."""


def with_overrides(base: EngineMetricNames, specs: dict[str, str | None]) -> EngineMetricNames:
    """`base` with the signals `specs` names (`metrics.names`: key -> `name{label=value}`, "" = none,
    None = keep the engine's) read from there instead."""
    out = base
    selectors = dict(base.selectors)
    for key, text in specs.items():
        if text is None:
            continue
        sig = OVERRIDE_KEYS[key]
        spec: MetricSpec | None = parse_metric_spec(text)
        selectors.pop(sig, None)
        if spec is not None and spec.labels:
            selectors[sig] = dict(spec.labels)
        name = spec.name if spec is not None else None
        listed: tuple[str, ...] = (name,) if name else ()
        if sig == "cache_config":
            out = replace(out, cache_config=name)
        elif sig == "lora_info":
            out = replace(out, lora_info=name)
        elif sig == "waiting":
            out = replace(out, waiting=listed)
        elif sig == "running":
            out = replace(out, running=listed)
        else:
            out = replace(out, kv_usage=listed)
    return replace(out, selectors=selectors)


def _labels(s: str) -> dict[str, str]:
    """Parse `a="x",b="y"` (values may contain escaped quotes and commas)."""
    out: dict[str, str] = {}
    i, n = 0, len(s)
    while i < n:
        eq = s.find("=", i)
        if eq < 0:
            break
        key = s[i:eq].strip().lstrip(",").strip()
        j = eq + 2  # skip ="
        buf = []
        while j < n and s[j] != '"':
            if s[j] == "\\" and j + 1 < n:
                j += 1
                buf.append({"n": "\n"}.get(s[j], s[j]))
            else:
                buf.append(s[j])
            j += 1
        out[key] = "".join(buf)
        i = j + 1
    return out


def parse_metrics(text: str, names: EngineMetricNames, now: float) -> EndpointMetrics:
    """Extract the picker's signals from a Prometheus text exposition."""
    sel = names.selectors
    # metric name -> the signals it carries; a name listed for several signals counts for the first
    # only, unless the later one picks its own series by label (Triton).
    signals: dict[str, list[str]] = {}
    for sig, listed in (("waiting", names.waiting), ("running", names.running), ("kv_usage", names.kv_usage)):
        for n in listed:
            if n not in signals or sig in sel:
                signals.setdefault(n, []).append(sig)
    wanted = set(signals)
    if names.cache_config:
        wanted.add(names.cache_config)
    if names.lora_info:
        wanted.add(names.lora_info)
    m = EndpointMetrics(updated_at=now)
    found_kv: dict[str, float] = {}
    lora_ts = -1.0
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        space = line.find(" ")
        end = brace if 0 <= brace < space or (brace >= 0 and space < 0) else space
        if end <= 0:
            continue
        name = line[:end]
        if name not in wanted:
            continue
        labels: dict[str, str] = {}
        if end == brace:
            close = line.rfind("}")
            labels = _labels(line[brace + 1 : close])
            rest = line[close + 1 :].split()
        else:
            rest = line[end + 1 :].split()
        if not rest:
            continue
        try:
            value = float(rest[0])
        except ValueError:
            continue
        if name == names.cache_config and _has(labels, sel.get("cache_config")):
            try:
                m.block_size = int(labels.get(names.cache_block_label, "")) or None
                m.num_gpu_blocks = int(labels.get(names.cache_blocks_label, "")) or None
            except ValueError:
                pass
        if name == names.lora_info and _has(labels, sel.get("lora_info")) and value > lora_ts:
            lora_ts = value  # value is a timestamp: the newest series is current
            m.active_adapters = frozenset(a for a in labels.get("running_lora_adapters", "").split(",") if a)
            m.waiting_adapters = frozenset(a for a in labels.get("waiting_lora_adapters", "").split(",") if a)
            try:
                m.max_loras = int(labels.get("max_lora", "0") or 0)
            except ValueError:
                m.max_loras = 0
        for sig in signals.get(name, ()):
            if _has(labels, sel.get(sig)):
                _set(m, sig, value, found_kv, name)
    if found_kv:
        # Prefer the first-listed (current) KV name when an engine exposes both old and new names.
        for n in names.kv_usage:
            if n in found_kv:
                m.kv_usage = found_kv[n]
                break
    return m


def _has(labels: dict[str, str], want: dict[str, str] | None) -> bool:
    return want is None or all(labels.get(k) == v for k, v in want.items())


def _set(m: EndpointMetrics, sig: str, value: float, found_kv: dict[str, float], name: str) -> None:
    if sig == "waiting":
        m.waiting += int(value)  # summed over label sets (e.g. several engines in one pod)
    elif sig == "running":
        m.running += int(value)
    else:
        found_kv[name] = max(found_kv.get(name, 0.0), value)
