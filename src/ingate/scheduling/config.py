"""Scheduler configuration: profiles of filters -> weighted scorers -> picker, with every default here.

YAML shape (all optional; `SchedulerConfig()` is what a user gets without writing any)::

    scheduler:
      defaultProfile: default
      fallbacks: 2
      profiles:
        default:
          filters: [{type: lora-affinity}, {type: load-guard, parameters: {queueMargin: 4}}]
          scorers:
            - {type: queue, weight: 2}
            - {type: kv-cache, weight: 2}
            - {type: prefix-cache, weight: 3, parameters: {blockChars: 64}}
          picker: {type: max-score}
        precise-prefix:                   # the built-in profile, some parameters and weights changed
          extends: precise-prefix
          parameters: {precise-prefix: {eventsPort: 5600}}
          weights: {predicted-latency: 4}
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PluginSpec(BaseModel):
    """One plugin of a profile: its type name, weight (scorers only) and typed parameters."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: str
    weight: float = Field(default=1.0, ge=0.0)
    parameters: dict[str, Any] = Field(default_factory=dict)


class ProfileConfig(BaseModel):
    """A profile: its plugins spelled out, or `extends` another profile with some of its scorers'
    weights and plugins' parameters changed (the built-in profile of the same name when `extends` is
    the profile's own name)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    filters: list[PluginSpec] = Field(default_factory=list)
    scorers: list[PluginSpec] = Field(default_factory=list)
    picker: PluginSpec = Field(default_factory=lambda: PluginSpec(type="max-score"))
    extends: str | None = None
    """Start from this profile (a built-in one, or another in the file) instead of listing plugins."""
    weights: dict[str, Annotated[float, Field(ge=0.0)]] = Field(default_factory=dict)
    """With `extends`: new weights by scorer type."""
    parameters: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """With `extends`: parameters by plugin type, merged over the ones it already has."""

    @model_validator(mode="after")
    def _check_extends(self) -> ProfileConfig:
        if self.extends is None:
            if self.weights or self.parameters:
                raise ValueError("weights and parameters (by plugin type) need extends: <profile name>")
        else:
            listed = {"filters", "scorers", "picker"} & self.model_fields_set
            if listed:
                raise ValueError(
                    f"a profile with extends takes weights and parameters, not {', '.join(sorted(listed))}: "
                    "list every plugin without extends, or change the extended ones by type"
                )
        return self

    def apply_to(self, base: ProfileConfig) -> ProfileConfig:
        """`base` with this profile's weights and parameters applied to every plugin of each named type
        (ValueError: `base` has no plugin of a named type)."""
        out = base.model_copy(deep=True)
        plugins = [*out.filters, *out.scorers, out.picker]
        have = {p.type for p in plugins}
        scorers = {s.type for s in out.scorers}
        no_plugin = sorted({*self.parameters} - have)
        if no_plugin:
            raise ValueError(
                f"profile {self.extends!r} has no {', '.join(no_plugin)} plugin to set parameters of "
                f"(its plugins: {', '.join(sorted(have))})"
            )
        no_scorer = sorted({*self.weights} - scorers)
        if no_scorer:
            raise ValueError(
                f"profile {self.extends!r} has no {', '.join(no_scorer)} scorer to weight "
                f"(its scorers: {', '.join(sorted(scorers))})"
            )
        for spec in plugins:
            if spec.type in self.parameters:
                spec.parameters = {**spec.parameters, **self.parameters[spec.type]}
        for spec in out.scorers:
            if spec.type in self.weights:
                spec.weight = self.weights[spec.type]
        return out


def _default_profile(
    prefix_scorer: str,
    prefix: float = 3,
    latency: float = 2,
    kv: float = 0.5,
    in_flight: float = 0.5,
    margin_factor: float = 0.0,
) -> ProfileConfig:
    guard: dict[str, Any] = {"queueMargin": 8, "kvThreshold": 1.0}
    if margin_factor:
        guard["marginFactor"] = margin_factor
    return ProfileConfig(
        filters=[PluginSpec(type="lora-affinity"), PluginSpec(type="load-guard", parameters=guard)],
        scorers=[
            PluginSpec(type=prefix_scorer, weight=prefix),
            PluginSpec(type="size-band", weight=1),
            PluginSpec(type="predicted-latency", weight=latency),
            PluginSpec(type="kv-cache", weight=kv),
            PluginSpec(type="least-in-flight", weight=in_flight),
            PluginSpec(type="lora-affinity", weight=1),
        ],
        picker=PluginSpec(type="max-score"),
    )


def default_profiles() -> dict[str, ProfileConfig]:
    """The built-in profiles.

    default: LoRA affinity first, then prefix-cache affinity (3), size bands (1: long and short prompts
    on different endpoints when lengths are heavy-tailed), the predicted latency of this request on
    each endpoint (2: prefill work this gateway has queued there plus the KV-cache shortfall, minus
    the prefix hit), and small tie-breakers on scraped KV utilisation and the gateway's own in-flight
    count (0.5 each), so requests spread out where the prediction is equal (e.g. new prefixes).
    The load guard stays as a loose safety net against piling onto one prefix (queue margin 8, no KV
    threshold): request counts and KV utilisation misjudge load when prompt lengths differ by 100x,
    and the predicted-latency scorer accounts for load in tokens. Its margin widens to 8x the other
    candidates' mean queue once that is larger (every replica queueing: spilling then costs cache
    hits the pool needs); chosen on the replay's tuning seeds (docs/scheduling.md, "Load guard").
    """
    return {
        "default": _default_profile("prefix-cache", margin_factor=8),
        # The default with prefix affinity from the servers' own KV-cache events (vLLM's publisher on
        # port 5557 of each endpoint by default; see docs/scheduling.md), falling back to the
        # approximate index per endpoint while events are unavailable.
        # Weights: prefix 3 and predicted latency 3, KV and in-flight 0.5 (heavier load terms, 2 / 5 / 1 / 1,
        # won at b2b 12 req/s but spilled groups off their cached replica past shared-prefix's knee).
        # Chosen on the scheduling replay's tuning seeds at b2b 8/12/16 and shared-prefix 20/26/32
        # req/s among 11 weightings, then adopted after a held-out side-by-side (+23% within the SLO
        # pooled over those six points, none more than 5% lower); the widening load guard
        # (marginFactor 8) likewise. docs/scheduling.md, "Weights of the precise profile".
        "precise-prefix": _default_profile("precise-prefix", latency=3, margin_factor=8),
        # The default until 2026-12 (request-count load guard, queue/KV/in-flight scorers), kept for
        # side-by-side comparison and for pools where prompt lengths are uniform.
        "guarded-affinity": ProfileConfig(
            filters=[PluginSpec(type="lora-affinity"), PluginSpec(type="load-guard")],
            scorers=[
                PluginSpec(type="queue", weight=2),
                PluginSpec(type="kv-cache", weight=2),
                PluginSpec(type="prefix-cache", weight=3),
                PluginSpec(type="least-in-flight", weight=1),
                PluginSpec(type="lora-affinity", weight=1),
            ],
            picker=PluginSpec(type="max-score"),
        ),
        # SLO-aware: endpoints ranked by an online model's predicted TTFT in seconds (and by predicted
        # headroom against the request's TTFT/TPOT SLO); sheddable requests that no endpoint is
        # predicted to serve in time shed with 429 slo_unattainable, others held up to 10 s (holdS,
        # chosen on the replay's tuning seeds: 5-20 s all raised goodput past mixed's knee, 10 s is
        # 5x its 2 s SLO) while the best prediction x 1.5 exceeds what is left of their budget
        # (holdMargin, the scorer's default, also chosen on tuning seeds). The prefix scorer (small
        # weight) runs so the model sees each endpoint's expected cached tokens.
        "slo-aware": ProfileConfig(
            filters=[
                PluginSpec(type="lora-affinity"),
                PluginSpec(type="load-guard", parameters={"queueMargin": 8, "kvThreshold": 1.0}),
            ],
            scorers=[
                PluginSpec(type="prefix-cache", weight=1),
                PluginSpec(type="predicted-ttft", weight=4, parameters={"holdS": 10}),
                PluginSpec(type="least-in-flight", weight=0.25),
                PluginSpec(type="lora-affinity", weight=1),
            ],
            picker=PluginSpec(type="max-score"),
        ),
        "round-robin": ProfileConfig(picker=PluginSpec(type="round-robin")),
        "random": ProfileConfig(picker=PluginSpec(type="random")),
        "least-in-flight": ProfileConfig(
            scorers=[PluginSpec(type="least-in-flight")], picker=PluginSpec(type="max-score")
        ),
    }


class SchedulerConfig(BaseModel):
    """Scheduler profiles; user profiles are added to (or replace) the built-in ones by name."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    profiles: dict[str, ProfileConfig] = Field(default_factory=dict)
    default_profile: str = Field(default="default", alias="defaultProfile")
    fallbacks: int = Field(default=2, ge=0, le=8, description="Fallback endpoints after the target.")

    @model_validator(mode="after")
    def _merge_builtins(self) -> SchedulerConfig:
        builtin = default_profiles()
        user = self.profiles
        resolved: dict[str, ProfileConfig] = {}

        def resolve(name: str, chain: tuple[str, ...]) -> ProfileConfig:
            if name in resolved:
                return resolved[name]
            prof = user.get(name) or builtin.get(name)
            if prof is None:
                raise ValueError(
                    f"profile {chain[-1]!r} extends {name!r}, which is not a profile "
                    f"(have: {', '.join(sorted({*builtin, *user}))})"
                )
            if prof.extends is None:
                resolved[name] = prof
                return prof
            if name in chain:
                raise ValueError(f"profiles extend each other in a cycle: {' -> '.join((*chain, name))}")
            if prof.extends == name:  # overrides the built-in profile of the same name
                base = builtin.get(name)
                if base is None:
                    raise ValueError(f"profile {name!r} extends itself, and there is no built-in {name!r}")
            else:
                base = resolve(prof.extends, (*chain, name))
            resolved[name] = out = prof.apply_to(base)
            return out

        merged = dict(builtin)
        for name in user:
            merged[name] = resolve(name, ())
        self.profiles = merged
        if self.default_profile not in self.profiles:
            raise ValueError(
                f"defaultProfile {self.default_profile!r} is not a profile (have: {', '.join(sorted(self.profiles))})"
            )
        return self
