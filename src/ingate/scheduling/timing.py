"""What each plugin costs, as upstream exports it: `inference_extension_plugin_duration_seconds`
(histogram; labels `extension_point` Filter/Scorer/Picker, `plugin_type`, `plugin_name`; upstream's
buckets), and again as `llm_d_epp_plugin_duration_seconds`.

The request path only adds to plain per-plugin counters (a bisect into ten bucket bounds, an increment
and a sum: no locks, no label lookups); the histogram families are built at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ingate.telemetry import BucketCounts

BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
NAME = "inference_extension_plugin_duration_seconds"
LABELS = ["extension_point", "plugin_type", "plugin_name"]


class PluginTiming(BucketCounts):
    """Durations of one plugin at one extension point (upstream's buckets)."""

    __slots__ = ("labels",)

    def __init__(self, extension_point: str, plugin_type: str, plugin_name: str) -> None:
        super().__init__(BUCKETS)
        self.labels = (extension_point, plugin_type, plugin_name)


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
        merged: dict[tuple[str, ...], BucketCounts] = {}
        for t in self.timings:
            if not any(t.counts):
                continue  # a plugin that never ran (a profile no request selects): no series yet
            m = merged.get(t.labels)  # the same plugin twice in one profile shares one series
            if m is None:
                m = merged[t.labels] = BucketCounts(BUCKETS)
            m.counts = [a + b for a, b in zip(m.counts, t.counts, strict=True)]
            m.total += t.total
        for labels, m in merged.items():
            fam.add_metric(list(labels), m.cumulative(), m.total)
        yield fam
