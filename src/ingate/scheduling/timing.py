"""What each plugin costs, as upstream exports it: `inference_extension_plugin_duration_seconds`
(histogram; labels `extension_point` Filter/Scorer/Picker, `plugin_type`, `plugin_name`; upstream's
buckets), and again as `llm_d_epp_plugin_duration_seconds`.

The request path only adds to plain per-plugin counters (a bisect into ten bucket bounds, an increment
and a sum: no locks, no label lookups); the histogram families are built at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
NAME = "inference_extension_plugin_duration_seconds"
LABELS = ["extension_point", "plugin_type", "plugin_name"]


class PluginTiming:
    """Durations of one plugin at one extension point: counts per bucket (the last is +Inf), sum."""

    __slots__ = ("counts", "labels", "total")

    def __init__(self, extension_point: str, plugin_type: str, plugin_name: str) -> None:
        self.labels = [extension_point, plugin_type, plugin_name]
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus `le`).
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds


class PluginTimings(Collector):
    """All plugins' timings of one scheduler, exported as one histogram family."""

    def __init__(self) -> None:
        self.timings: list[PluginTiming] = []

    def timing(self, extension_point: str, plugin_type: str, plugin_name: str) -> PluginTiming:
        t = PluginTiming(extension_point, plugin_type, plugin_name)
        self.timings.append(t)
        return t

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(NAME, "", labels=LABELS)]

    def collect(self) -> Iterator[Metric]:
        fam = HistogramMetricFamily(
            NAME,
            "Plugin processing latency distribution in seconds for each extension point, plugin type "
            "and plugin name.",
            labels=LABELS,
        )
        merged: dict[tuple[str, ...], tuple[list[int], float]] = {}
        for t in self.timings:
            if not t.total and not any(t.counts):
                continue  # a plugin that never ran (a profile no request selects): no series yet
            key = tuple(t.labels)  # the same plugin twice in one profile shares one series
            counts, total = merged.get(key, ([0] * (len(BUCKETS) + 1), 0.0))
            merged[key] = ([a + b for a, b in zip(counts, t.counts, strict=True)], total + t.total)
        for key, (counts, total) in merged.items():
            acc = 0
            buckets = []
            for bound, n in zip((*BUCKETS, float("inf")), counts, strict=True):
                acc += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
            fam.add_metric(list(key), buckets, total)
        yield fam
