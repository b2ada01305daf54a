"""Composes scheduling profiles (filters -> weighted scorers -> picker) from the plugin registry and
runs them. The director runs each profile's lifecycle hooks (`ingate.lifecycle`) around the decision."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from time import perf_counter
from typing import Any

from ingate.datastore import Datastore, Endpoint
from ingate.errors import GatewayError
from ingate.lifecycle import Hooks
from ingate.naming import camel_to_snake
from ingate.request import InferenceRequest
from ingate.scheduling.config import PluginSpec, ProfileConfig, SchedulerConfig
from ingate.scheduling.framework import CycleState, Filter, Picker, SchedulingResult, Scorer
from ingate.scheduling.plugins.registry import Kind, plugins
from ingate.scheduling.timing import PluginTiming, PluginTimings

NO_ENDPOINT_RETRY_S = 1.0
"""Retry-After of a 503 for a pool with no healthy endpoint (without flow control, which would hold
the request until one is ready: `flowControl.noEndpointTtlS`)."""


def _make(kind: Kind, spec: PluginSpec, where: str) -> Any:
    registry = plugins(kind)
    cls = registry.get(spec.type)
    if cls is None:
        raise ValueError(f"{where}: unknown {kind} type {spec.type!r} (known: {', '.join(sorted(registry))})")
    params = {camel_to_snake(k): v for k, v in spec.parameters.items()}
    allowed = (
        {f.name for f in fields(cls) if f.init and f.name not in ("name", "rng")}
        if is_dataclass(cls)
        else set()
    )
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(
            f"{where}: unknown parameter(s) {sorted(unknown)} for {spec.type!r} (allowed: {sorted(allowed)})"
        )
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: bad parameters for {spec.type!r}: {e}") from None


@dataclass
class Profile:
    name: str
    filters: list[Filter]
    scorers: list[tuple[Scorer, float]]
    picker: Picker
    hooks: Hooks
    """The lifecycle hooks its plugins implement (run by the director for requests it schedules)."""
    timings: PluginTimings = field(default_factory=PluginTimings)
    _timed_filters: list[tuple[Filter, PluginTiming]] = field(init=False, default_factory=list)
    _timed_scorers: list[tuple[Scorer, float, PluginTiming]] = field(init=False, default_factory=list)
    _picker_timing: PluginTiming | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        t = self.timings
        self._timed_filters = [(f, t.timing("Filter", f.name, f"{self.name}/{f.name}")) for f in self.filters]
        # A scorer of weight 0 is skipped, so it is neither run nor timed.
        self._timed_scorers = [
            (s, w, t.timing("Scorer", s.name, f"{self.name}/{s.name}")) for s, w in self.scorers if w != 0.0
        ]
        self._picker_timing = t.timing("Picker", self.picker.name, f"{self.name}/{self.picker.name}")

    def plugins(self) -> Iterator[object]:
        """Every plugin instance of the profile, in order."""
        yield from self.filters
        for s, _ in self.scorers:
            yield s
        yield self.picker


def build_profile(
    name: str, cfg: ProfileConfig, datastore: Datastore, timings: PluginTimings | None = None
) -> Profile:
    where = f"scheduler.profiles.{name}"
    filters = [_make("filter", s, f"{where}.filters[{i}]") for i, s in enumerate(cfg.filters)]
    scorers = [(_make("scorer", s, f"{where}.scorers[{i}]"), s.weight) for i, s in enumerate(cfg.scorers)]
    picker = _make("picker", cfg.picker, f"{where}.picker")
    plugins: list[Any] = [*filters, *(s for s, _ in scorers), picker]
    for p in plugins:
        attach = getattr(p, "attach", None)
        if attach is not None:
            attach(datastore)
    return Profile(name, filters, scorers, picker, Hooks.of(plugins), timings or PluginTimings())


class Scheduler:
    """Chooses the endpoint for each request with the configured profiles."""

    def __init__(
        self, profiles: dict[str, Profile], default: str, fallbacks: int, datastore: Datastore
    ) -> None:
        self.profiles = profiles
        self.default = profiles[default]
        self.fallbacks = fallbacks
        self.datastore = datastore

    def schedule(
        self, request: InferenceRequest, endpoints: list[Endpoint] | None = None, profile: str | None = None
    ) -> tuple[SchedulingResult, CycleState]:
        """Pick the target (and fallbacks) for `request`; GatewayError 503 when no endpoint qualifies.

        Runs no lifecycle hook: the caller (the director) may still reorder the result (preemption
        preference) and then runs `hooks(result.profile).post_schedule`, so what the hooks record
        (prefix index, load) is where the request really goes."""
        prof = self.default
        if profile is not None:
            p = self.profiles.get(profile)
            if p is None:
                raise GatewayError(400, f"unknown scheduling profile {profile!r}", "unknown_profile")
            prof = p
        eps = self.datastore.endpoints() if endpoints is None else endpoints
        candidates = [ep for ep in eps if ep.healthy]
        if not candidates:
            raise GatewayError(
                503,
                "no healthy model-server endpoint is available",
                "no_endpoint",
                retry_after=NO_ENDPOINT_RETRY_S,
            )
        ctx = CycleState()
        clock = perf_counter
        for f, timing in prof._timed_filters:
            t0 = clock()
            candidates = f.filter(ctx, request, candidates)
            timing.observe(clock() - t0)
            if not candidates:
                raise GatewayError(503, f"no endpoint passed filter {f.name!r}", "no_endpoint")
        totals = dict.fromkeys(candidates, 0.0)
        for scorer, weight, timing in prof._timed_scorers:
            t0 = clock()
            scores = scorer.score(ctx, request, candidates)
            timing.observe(clock() - t0)
            for ep, s in scores.items():
                if ep in totals:
                    totals[ep] += weight * s
        t0 = clock()
        ordered = prof.picker.pick(ctx, request, list(totals.items()))
        prof._picker_timing.observe(clock() - t0)  # type: ignore[union-attr]
        return SchedulingResult(ordered[: 1 + self.fallbacks], prof.name, totals), ctx

    def hooks(self, profile: str) -> Hooks:
        """The lifecycle hooks of `profile` (a name a `SchedulingResult` carries)."""
        return self.profiles[profile].hooks

    def timings(self) -> PluginTimings:
        """The plugin timings of every profile (a gateway exports them as Prometheus histograms)."""
        return self.default.timings

    def plugins(self) -> Iterator[tuple[str, object]]:
        """(profile name, plugin) for every plugin instance of every profile."""
        for name, prof in self.profiles.items():
            for p in prof.plugins():
                yield name, p


def build_scheduler(cfg: SchedulerConfig, datastore: Datastore) -> Scheduler:
    """Instantiate every profile of `cfg` (raises ValueError naming the bad field)."""
    timings = PluginTimings()
    profiles = {name: build_profile(name, p, datastore, timings) for name, p in cfg.profiles.items()}
    return Scheduler(profiles, cfg.default_profile, cfg.fallbacks, datastore)
