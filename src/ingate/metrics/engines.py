"""Per-engine metric names (DESIGN.md, "Model-server metrics") and a fast parser for them.

Only a handful of series matter to the picker, so instead of parsing the whole exposition with
prometheus_client (slow at 20 scrapes/s x many endpoints) each line's metric name is checked against the
engine's small set first and only matching lines are parsed further.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ingate.datastore import EndpointMetrics


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
    selectors: dict[str, tuple[str, str]] = field(default_factory=dict)
    """signal -> (label, value) for engines that put several signals in one metric (Triton)."""


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
            "waiting": ("request_type", "waiting"),
            "running": ("request_type", "scheduled"),
            "kv_usage": ("kv_cache_block_type", "fraction"),
        },
    ),
}


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
    signals: dict[str, str] = {}
    for n in names.waiting:
        signals[n] = "waiting"
    for n in names.running:
        signals.setdefault(n, "running")
    for n in names.kv_usage:
        signals.setdefault(n, "kv_usage")
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
        if name == names.cache_config:
            try:
                m.block_size = int(labels.get(names.cache_block_label, "")) or None
                m.num_gpu_blocks = int(labels.get(names.cache_blocks_label, "")) or None
            except ValueError:
                pass
            continue
        if name == names.lora_info:
            if value > lora_ts:  # value is a timestamp: the newest series is current
                lora_ts = value
                m.active_adapters = frozenset(
                    a for a in labels.get("running_lora_adapters", "").split(",") if a
                )
                m.waiting_adapters = frozenset(
                    a for a in labels.get("waiting_lora_adapters", "").split(",") if a
                )
                try:
                    m.max_loras = int(labels.get("max_lora", "0") or 0)
                except ValueError:
                    m.max_loras = 0
            continue
        if names.selectors:
            for sig, (lk, lv) in names.selectors.items():
                if (
                    labels.get(lk) == lv
                    and name
                    in {"waiting": names.waiting, "running": names.running, "kv_usage": names.kv_usage}[sig]
                ):
                    _set(m, sig, value, found_kv, name)
            continue
        _set(m, signals[name], value, found_kv, name)
    if found_kv:
        # Prefer the first-listed (current) KV name when an engine exposes both old and new names.
        for n in names.kv_usage:
            if n in found_kv:
                m.kv_usage = found_kv[n]
                break
    return m


def _set(m: EndpointMetrics, sig: str, value: float, found_kv: dict[str, float], name: str) -> None:
    if sig == "waiting":
        m.waiting += int(value)  # summed over label sets (e.g. several engines in one pod)
    elif sig == "running":
        m.running += int(value)
    else:
        found_kv[name] = max(found_kv.get(name, 0.0), value)
