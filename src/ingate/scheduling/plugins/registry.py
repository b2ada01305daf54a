"""The plugin registry: every filter, scorer and picker registers itself here under its config name.

A plugin module decorates its class::

    @register("scorer", "queue")
    @dataclass
    class QueueScorer: ...

and profiles name it by `type` in YAML. The built-in plugins are registered when
`ingate.scheduling.plugins` is imported; plugins of other packages register through the entry-point
group `ingate.scheduling.plugins` (each entry point names a module to import), loaded on the first
lookup. The scheduler only composes profiles from what is registered.

A plugin that keeps state an operator should see (e.g. the prefix index's memory) implements
`ExposesMetrics`; the gateway exports what every such plugin of every profile yields, merged by metric
name, at scrape time.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib.metadata import entry_points
from typing import Literal, Protocol, TypeVar, runtime_checkable

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from ingate.datastore import Datastore, Endpoint

Kind = Literal["filter", "scorer", "picker"]
KINDS: tuple[Kind, ...] = ("filter", "scorer", "picker")
ENTRY_POINT_GROUP = "ingate.scheduling.plugins"

log = logging.getLogger(__name__)

_REGISTRY: dict[Kind, dict[str, type]] = {k: {} for k in KINDS}
_external_loaded = False
T = TypeVar("T", bound=type)


def register(kind: Kind, name: str) -> Callable[[T], T]:
    """Class decorator: make the plugin class available to profiles as `type: name`."""

    def deco(cls: T) -> T:
        table = _REGISTRY[kind]
        prev = table.get(name)
        if prev is not None and prev is not cls:
            raise ValueError(f"{kind} plugin {name!r} is registered twice ({prev.__name__}, {cls.__name__})")
        table[name] = cls
        return cls

    return deco


def _load_external() -> None:
    global _external_loaded
    if _external_loaded:
        return
    _external_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            importlib.import_module(ep.value.split(":")[0])
        except Exception as e:  # a broken third-party plugin must not take the gateway down
            log.error("plugin entry point %s (%s) failed to load: %r", ep.name, ep.value, e)


def plugins(kind: Kind) -> dict[str, type]:
    """Registered plugins of `kind`, by config name (built-in and entry-point ones)."""
    # Importing the package registers the built-in plugins (each module decorates its classes).
    importlib.import_module("ingate.scheduling.plugins")
    _load_external()
    return _REGISTRY[kind]


@runtime_checkable
class ExposesMetrics(Protocol):
    """A plugin with state worth exporting. `collect_metrics` is called at scrape time (never per
    request) with the name of the profile the instance belongs to; families should carry a `profile`
    label so instances of several profiles can share a metric name."""

    def collect_metrics(self, profile: str, endpoints: Sequence[Endpoint]) -> Iterable[Metric]: ...


class PluginMetricsCollector(Collector):
    """Exports the metrics of every `ExposesMetrics` plugin: families of the same name from several
    profiles are merged into one family (Prometheus allows one family per name)."""

    def __init__(self, plugins: Iterable[tuple[str, object]], datastore: Datastore) -> None:
        self.plugins: list[tuple[str, ExposesMetrics]] = [
            (prof, p) for prof, p in plugins if isinstance(p, ExposesMetrics)
        ]
        self.ds = datastore

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        eps = self.ds.endpoints()
        for profile, plugin in self.plugins:
            for fam in plugin.collect_metrics(profile, eps):
                have = merged.get(fam.name)
                if have is None:
                    merged[fam.name] = fam
                else:
                    have.samples.extend(fam.samples)
        yield from merged.values()
