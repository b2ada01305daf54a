"""Runs scheduling profiles: filters -> weighted scorers -> picker, then post-schedule hooks."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from ingate.datastore import Datastore, Endpoint
from ingate.errors import GatewayError
from ingate.request import InferenceRequest
from ingate.scheduling.config import PluginSpec, ProfileConfig, SchedulerConfig
from ingate.scheduling.framework import (
    CycleState,
    Filter,
    FirstToken,
    Picker,
    PostResponse,
    PostSchedule,
    ResponseInfo,
    SchedulingResult,
    Scorer,
)
from ingate.scheduling.plugins.latency import PredictedLatencyScorer
from ingate.scheduling.plugins.load import KVCacheScorer, LeastInFlightScorer, LoadGuardFilter, QueueScorer
from ingate.scheduling.plugins.lora import LoraAffinityFilter, LoraAffinityScorer
from ingate.scheduling.plugins.pickers import (
    MaxScorePicker,
    RandomPicker,
    RoundRobinPicker,
    WeightedRandomPicker,
)
from ingate.scheduling.plugins.prefix import PrefixCacheScorer
from ingate.scheduling.plugins.sizeband import SizeBandScorer

FILTERS: dict[str, type] = {"load-guard": LoadGuardFilter, "lora-affinity": LoraAffinityFilter}
SCORERS: dict[str, type] = {
    "queue": QueueScorer,
    "kv-cache": KVCacheScorer,
    "least-in-flight": LeastInFlightScorer,
    "prefix-cache": PrefixCacheScorer,
    "lora-affinity": LoraAffinityScorer,
    "predicted-latency": PredictedLatencyScorer,
    "size-band": SizeBandScorer,
}
PICKERS: dict[str, type] = {
    "max-score": MaxScorePicker,
    "random": RandomPicker,
    "weighted-random": WeightedRandomPicker,
    "round-robin": RoundRobinPicker,
}

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def _make(kind: str, registry: dict[str, type], spec: PluginSpec, where: str) -> Any:
    cls = registry.get(spec.type)
    if cls is None:
        raise ValueError(f"{where}: unknown {kind} type {spec.type!r} (known: {', '.join(sorted(registry))})")
    params = {_CAMEL.sub("_", k).lower(): v for k, v in spec.parameters.items()}
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
    post_schedule: list[PostSchedule]
    post_response: list[PostResponse]
    first_token: list[FirstToken] = field(default_factory=list)


def build_profile(name: str, cfg: ProfileConfig, datastore: Datastore) -> Profile:
    where = f"scheduler.profiles.{name}"
    filters = [_make("filter", FILTERS, s, f"{where}.filters[{i}]") for i, s in enumerate(cfg.filters)]
    scorers = [
        (_make("scorer", SCORERS, s, f"{where}.scorers[{i}]"), s.weight) for i, s in enumerate(cfg.scorers)
    ]
    picker = _make("picker", PICKERS, cfg.picker, f"{where}.picker")
    plugins: list[Any] = [*filters, *(s for s, _ in scorers), picker]
    for p in plugins:
        attach = getattr(p, "attach", None)
        if attach is not None:
            attach(datastore)
    return Profile(
        name,
        filters,
        scorers,
        picker,
        [p for p in plugins if isinstance(p, PostSchedule)],
        [p for p in plugins if isinstance(p, PostResponse)],
        [p for p in plugins if isinstance(p, FirstToken)],
    )


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
        self,
        request: InferenceRequest,
        endpoints: list[Endpoint] | None = None,
        profile: str | None = None,
        adjust: Callable[[SchedulingResult], None] | None = None,
    ) -> tuple[SchedulingResult, CycleState]:
        """Pick the target (and fallbacks) for `request`; GatewayError 503 when no endpoint qualifies.

        `adjust` may reorder the picked endpoints (the director's preemption preference) before the
        post-schedule hooks run, so what they record (prefix index, load) is where the request goes."""
        prof = self.default
        if profile is not None:
            p = self.profiles.get(profile)
            if p is None:
                raise GatewayError(400, f"unknown scheduling profile {profile!r}", "unknown_profile")
            prof = p
        eps = self.datastore.endpoints() if endpoints is None else endpoints
        candidates = [ep for ep in eps if ep.healthy]
        if not candidates:
            raise GatewayError(503, "no healthy model-server endpoint is available", "no_endpoint")
        ctx = CycleState()
        for f in prof.filters:
            candidates = f.filter(ctx, request, candidates)
            if not candidates:
                raise GatewayError(503, f"no endpoint passed filter {f.name!r}", "no_endpoint")
        totals = dict.fromkeys(candidates, 0.0)
        for scorer, weight in prof.scorers:
            if weight == 0.0:
                continue
            for ep, s in scorer.score(ctx, request, candidates).items():
                if ep in totals:
                    totals[ep] += weight * s
        ordered = prof.picker.pick(ctx, request, list(totals.items()))
        result = SchedulingResult(ordered[: 1 + self.fallbacks], prof.name, totals)
        if adjust is not None:
            adjust(result)
        for hook in prof.post_schedule:
            hook.post_schedule(ctx, request, result)
        return result, ctx

    def on_first_token(self, ctx: CycleState, request: InferenceRequest, endpoint: Endpoint) -> None:
        """Tell the plugins that track outstanding prefill work that the request's first token came."""
        for prof in self.profiles.values():
            for hook in prof.first_token:
                hook.on_first_token(ctx, request, endpoint)

    def post_response(
        self, ctx: CycleState, request: InferenceRequest, endpoint: Endpoint, info: ResponseInfo
    ) -> None:
        """Feed a finished response back to the learning plugins of every profile that has them."""
        for prof in self.profiles.values():
            for hook in prof.post_response:
                hook.post_response(ctx, request, endpoint, info)


def build_scheduler(cfg: SchedulerConfig, datastore: Datastore) -> Scheduler:
    """Instantiate every profile of `cfg` (raises ValueError naming the bad field)."""
    profiles = {name: build_profile(name, p, datastore) for name, p in cfg.profiles.items()}
    return Scheduler(profiles, cfg.default_profile, cfg.fallbacks, datastore)
