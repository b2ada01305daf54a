"""The objective store: InferenceObjectives and model rewrites that can change while the gateway runs.

Two layers: the static one from the YAML config, and a dynamic one a discovery source (the Kubernetes
controller, from InferenceObjective / InferenceModelRewrite resources) replaces or edits at run time.
A dynamic entry overrides a static one of the same name. Readers (the director) look objectives and
rewrites up per request; writers notify `on_change` listeners, and `version` counts changes so a reader
can cache derived state. Pure and synchronous: it runs on the gateway's one event loop, like the
datastore, and imports no adapter.

Rewrite precedence follows upstream InferenceModelRewrite: a rule naming the model exactly wins over a
rule with no matches (a catch-all); among several, the static config comes first, then the resources
in `order` (upstream: oldest creationTimestamp first, then name).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ingate.config import GatewayConfig


@dataclass(frozen=True, slots=True)
class ObjectiveSpec:
    """One objective: its priority (higher first, negative = sheddable), optional SLOs and models."""

    name: str
    priority: int = 0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    models: tuple[str, ...] = ()
    """Requests for these models get this objective when they name none by header (static config)."""


@dataclass(frozen=True, slots=True)
class RewriteRuleSpec:
    models: tuple[str, ...]
    """Exact model names; empty = a catch-all for models no exact rule names."""
    targets: tuple[tuple[str, int], ...]
    """(target model, weight); weights are relative."""


@dataclass(frozen=True, slots=True)
class RewriteSpec:
    """The rules of one rewrite source (an InferenceModelRewrite, or the config's `models.rewrites`)."""

    name: str
    rules: tuple[RewriteRuleSpec, ...]
    order: tuple[str, ...] = ()
    """Sort key among rewrites (upstream: creationTimestamp, then name)."""


@dataclass(slots=True)
class _Split:
    targets: list[str]
    cum: list[int]
    total: int

    def pick(self, rnd: float) -> str:
        x = rnd * self.total
        for t, c in zip(self.targets, self.cum, strict=True):
            if x < c:
                return t
        return self.targets[-1]


def _split(targets: tuple[tuple[str, int], ...]) -> _Split:
    cum, acc = [], 0
    for _, w in targets:
        acc += max(w, 0)
        cum.append(acc)
    return _Split([t for t, _ in targets], cum, acc)


@dataclass
class ObjectiveStore:
    """See the module docstring."""

    _static: dict[str, ObjectiveSpec] = field(default_factory=dict)
    _dynamic: dict[str, ObjectiveSpec] = field(default_factory=dict)
    _static_rewrites: list[RewriteSpec] = field(default_factory=list)
    _dynamic_rewrites: dict[str, RewriteSpec] = field(default_factory=dict)
    default_name: str | None = None
    """The objective of requests that name none and whose model no objective lists (config
    `defaultObjective`)."""
    version: int = 0
    _listeners: list[Callable[[], None]] = field(default_factory=list)
    _merged: dict[str, ObjectiveSpec] = field(default_factory=dict)
    _by_model: dict[str, ObjectiveSpec] = field(default_factory=dict)
    _exact: dict[str, _Split] = field(default_factory=dict)
    _catch_all: _Split | None = None

    @classmethod
    def create(
        cls, objectives: Iterable[ObjectiveSpec] = (), rewrites: Iterable[RewriteSpec] = ()
    ) -> ObjectiveStore:
        """A store whose static layer is `objectives` and `rewrites`."""
        s = cls(_static={o.name: o for o in objectives}, _static_rewrites=list(rewrites))
        s._rebuild()
        return s

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> ObjectiveStore:
        """The static layer from a gateway config (`objectives`, `models.rewrites`)."""
        objs = [
            ObjectiveSpec(o.name, o.priority, o.slo.ttft_ms, o.slo.tpot_ms, tuple(o.models))
            for o in cfg.objectives
        ]
        rules = tuple(
            RewriteRuleSpec(
                tuple(m.model.value for m in r.matches), tuple((t.model_rewrite, t.weight) for t in r.targets)
            )
            for r in cfg.models.rewrites
        )
        store = cls.create(objs, [RewriteSpec("config", rules)] if rules else [])
        store.default_name = cfg.default_objective
        return store

    # ---- readers ---------------------------------------------------------------------------------

    def get(self, name: str) -> ObjectiveSpec | None:
        return self._merged.get(name)

    def for_model(self, model: str) -> ObjectiveSpec | None:
        """The objective whose `models` list names `model` (static config only)."""
        return self._by_model.get(model)

    def resolve(self, name: str | None, model: str) -> ObjectiveSpec | None:
        """The objective of a request: the one it names (header) when known, else the one listing its
        model, else the default; None = priority 0 and no SLOs (what the director does today)."""
        if name is not None:
            named = self._merged.get(name)
            if named is not None:
                return named
        by_model = self._by_model.get(model)
        if by_model is not None:
            return by_model
        return self._merged.get(self.default_name) if self.default_name else None

    def objectives(self) -> Mapping[str, ObjectiveSpec]:
        return MappingProxyType(self._merged)

    def rewrite(self, model: str, rnd: float | Callable[[], float]) -> str | None:
        """The model to send a request for `model` to (weighted by `rnd` in [0, 1), or a random source
        drawn only when a rule applies), or None."""
        sp = self._exact.get(model) or self._catch_all
        if sp is None or sp.total <= 0:
            return None
        return sp.pick(rnd() if callable(rnd) else rnd)

    def on_change(self, cb: Callable[[], None]) -> None:
        self._listeners.append(cb)

    # ---- writers (the dynamic layer) -------------------------------------------------------------

    def put(self, obj: ObjectiveSpec) -> bool:
        """Add or replace a dynamic objective; True (and listeners called) when something changed."""
        if self._dynamic.get(obj.name) == obj:
            return False
        self._dynamic[obj.name] = obj
        return self._changed()

    def delete(self, name: str) -> bool:
        if self._dynamic.pop(name, None) is None:
            return False
        return self._changed()

    def replace(self, objs: Iterable[ObjectiveSpec]) -> bool:
        """Make the dynamic objectives exactly `objs` (a relist); no notification when equal."""
        new = {o.name: o for o in objs}
        if new == self._dynamic:
            return False
        self._dynamic = new
        return self._changed()

    def put_rewrite(self, rw: RewriteSpec) -> bool:
        if self._dynamic_rewrites.get(rw.name) == rw:
            return False
        self._dynamic_rewrites[rw.name] = rw
        return self._changed()

    def delete_rewrite(self, name: str) -> bool:
        if self._dynamic_rewrites.pop(name, None) is None:
            return False
        return self._changed()

    def replace_rewrites(self, rws: Iterable[RewriteSpec]) -> bool:
        new = {r.name: r for r in rws}
        if new == self._dynamic_rewrites:
            return False
        self._dynamic_rewrites = new
        return self._changed()

    # ---- internals -------------------------------------------------------------------------------

    def _changed(self) -> bool:
        self._rebuild()
        self.version += 1
        for cb in list(self._listeners):
            cb()
        return True

    def _rebuild(self) -> None:
        self._merged = {**self._static, **self._dynamic}
        self._by_model = {m: o for o in self._merged.values() for m in o.models}
        exact: dict[str, _Split] = {}
        catch_all: _Split | None = None
        ordered = self._static_rewrites + sorted(
            self._dynamic_rewrites.values(), key=lambda r: (r.order, r.name)
        )
        for rw in ordered:
            for rule in rw.rules:
                if not rule.targets:
                    continue
                if not rule.models:
                    catch_all = catch_all or _split(rule.targets)
                for m in rule.models:
                    exact.setdefault(m, _split(rule.targets))
        self._exact, self._catch_all = exact, catch_all
