"""Workload configs (YAML) and deterministic request generation.

Prompt text is made of short words (at most 8 characters, no whitespace inside), so under the
simulator's tokenisation rule (`ingate.sim.tokenizer`) every word is exactly one token and a prompt of
N words counts as N prompt tokens.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

# Prompt vocabulary: distinct from the simulator's output vocabulary, each word one token.
_WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
    "quebec romeo sierra tango uniform victor whiskey xray yankee zulu amber basil cedar dune ember fern "
    "granite harbor iris jade kelp lotus maple nectar opal pearl quartz river sage thyme umber violet "
    "willow yarrow zinc apple berry cherry grape lemon mango olive peach plum"
).split()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Dist(_Strict):
    """A token-length distribution. `fixed` uses `mean`; `normal` uses mean/std; `lognormal` and
    `pareto` are heavy-tailed (lognormal: mean and sigma of the log; pareto: scale=`mean`, shape=`alpha`);
    `uniform` draws from [min, max]. Every draw is clipped to [min, max]."""

    kind: Literal["fixed", "normal", "lognormal", "pareto", "uniform"] = "fixed"
    mean: float = 128
    std: float = 0.0
    sigma: float = 1.0
    alpha: float = 1.5
    min: int = 1
    max: int = 1_000_000

    def draw(self, rng: random.Random) -> int:
        """One length drawn from this distribution with `rng`."""
        if self.kind == "fixed":
            v = self.mean
        elif self.kind == "normal":
            v = rng.gauss(self.mean, self.std)
        elif self.kind == "lognormal":
            v = rng.lognormvariate(math.log(self.mean), self.sigma)
        elif self.kind == "pareto":
            v = self.mean * rng.paretovariate(self.alpha)
        else:
            v = rng.uniform(self.min, self.max)
        return max(self.min, min(self.max, round(v)))


class SharedPrefixData(_Strict):
    """The upstream shared-prefix shape: `groups` system prompts, each shared by `prompts_per_group`
    distinct questions. With `turns` > 1 each conversation re-sends its history (multi-turn chat)."""

    type: Literal["shared_prefix"] = "shared_prefix"
    groups: int = 6
    prompts_per_group: int = 20
    system_tokens: int = 1000
    question: Dist = Field(default_factory=Dist)
    output: Dist = Field(default_factory=Dist)
    turns: int = 1


class RandomData(_Strict):
    """Independent prompts with lengths from `input` and `output` distributions (no shared prefix)."""

    type: Literal["random"] = "random"
    input: Dist = Field(default_factory=Dist)
    output: Dist = Field(default_factory=Dist)


class LoraMix(_Strict):
    """Traffic split over LoRA adapters: `adapters[i]` gets weight `weights[i]` (any scale)."""

    adapters: list[str]
    weights: list[float]


class Load(_Strict):
    """`poisson`: open-loop arrivals at each rate in `rates` (req/s) for `duration_s`; `concurrent`: a
    fixed number of clients in a closed loop for each value in `concurrency`. `burst_on_s`/`burst_off_s`
    turn Poisson arrivals on/off (the on-phase rate is scaled so the mean equals the stated rate)."""

    type: Literal["poisson", "concurrent"] = "poisson"
    rates: list[float] = Field(default_factory=lambda: [1.0])
    concurrency: list[int] = Field(default_factory=lambda: [4])
    duration_s: float = 30.0
    warmup_s: float = 0.0
    max_inflight: int = 2000
    timeout_s: float = 300.0
    burst_on_s: float = 0.0
    burst_off_s: float = 0.0
    streams: int = Field(default=1, ge=1, le=100)
    """Request streams per system: stream k runs the whole sweep again on a fresh fleet and system with
    every seed shifted by 100 k (the replay's stream k), and each point pools the streams' requests.
    One stream's p99 is one of its few slowest requests; several streams make it a statistic.
    (`ingate bench run --streams` takes 1-9 per run; a merged file, `ingate bench merge`, holds more.)"""
    first_stream: int = Field(default=0, ge=0, le=99)
    """Index of the first stream: streams `first_stream` .. `first_stream + streams - 1` run, so a
    later run can add streams (new seeds) to a measurement without repeating the ones already run."""


class Slo(_Strict):
    """A request meets the SLO when its TTFT (and e2e latency, if set) are within bounds."""

    ttft_s: float = 2.0
    e2e_s: float | None = None


class Fleet(_Strict):
    """The simulated fleet: `ingate sim` with these replicas and extra arguments."""

    replicas: int = 8
    args: list[str] = Field(default_factory=list)
    kv_events_port_offset: int | None = Field(default=None, ge=1, le=20_000)
    """Publish KV-cache events: the harness picks free HTTP ports P + i and has replica i publish on
    P + i + offset and replay on P + i + 2 x offset, so a precise-prefix scorer finds them with
    ``eventsPortOffset: offset, replayPortOffset: 2 x offset`` (None: no events)."""


class Tenant(_Strict):
    """One tenant of a multi-tenant workload: its own request headers (e.g. the fairness id and the
    objective) and its own Poisson rate in each stage (`rates[i]` in stage i; 0 = absent)."""

    name: str
    headers: dict[str, str] = Field(default_factory=dict)
    rates: list[float]


SEED_SETS: dict[str, int] = {"tuning": 0, "eval": 10_000}
"""Seeds are split in two disjoint sets (docs/benchmarks.md, "Tuning and evaluation seeds"):

- `tuning`: the workload's own `seed` (streams k = 0, 1, ... shift it by 100 k): what the scheduler
  replay, profile tuning and default selection read;
- `eval`: `seed + 10,000` (its streams likewise), and the workload variants under
  `benchmarks/workloads/eval/`: what every headline number in the README and docs comes from. No
  tuning step may read them (the replay refuses to).
"""
EVAL_WORKLOADS_DIR = "workloads/eval"
"""Held-out workload shapes (other length distributions and prefix-group sizes) live here."""


def with_seed_set(wl: Workload, seed_set: str) -> Workload:
    """`wl` with the seeds of `seed_set` (`tuning` leaves it as is); records the set on the workload."""
    if seed_set not in SEED_SETS:
        raise ValueError(f"unknown seed set {seed_set!r} (known: {', '.join(SEED_SETS)})")
    out = wl.model_copy(update={"seed": wl.seed + SEED_SETS[seed_set], "seed_set": seed_set})
    return out


# Keys of the generated gateway config a workload may not override (the harness owns them).
_HARNESS_KEYS = frozenset({"listen", "dataplane"})


class Workload(_Strict):
    """One benchmark: data shape, load sweep, SLO, fleet and systems under test."""

    name: str
    description: str = ""
    seed: int = 0
    seed_set: Literal["tuning", "eval"] = "tuning"
    """Which seed set `seed` belongs to (`with_seed_set`; written into results for the record)."""
    api: Literal["completion", "chat"] = "completion"
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    data: SharedPrefixData | RandomData = Field(discriminator="type")
    lora: LoraMix | None = None
    load: Load = Field(default_factory=Load)
    slo: Slo = Field(default_factory=Slo)
    fleet: Fleet = Field(default_factory=Fleet)
    systems: list[str] = Field(default_factory=lambda: ["ingate", "round-robin"])
    tenants: list[Tenant] = Field(default_factory=list)
    """Poisson tenants sent side by side; then `load.rates[i]` must be the sum of `tenants[*].rates[i]`."""
    gateway: dict[str, Any] = Field(default_factory=dict)
    """Extra top-level keys of the generated ingate config (e.g. `objectives`, `flowControl`, and `pool`
    settings such as `modelServerPriority`; the pool's endpoints are the harness's fleet)."""

    @model_validator(mode="after")
    def _check_tenants(self) -> Workload:
        bad = _HARNESS_KEYS & set(self.gateway)
        pool = self.gateway.get("pool")
        if pool is not None and (not isinstance(pool, dict) or "endpoints" in pool):
            bad = bad | {"pool.endpoints"}  # pool settings may be given; its endpoints are the fleet's
        if bad:
            raise ValueError(f"gateway: {', '.join(sorted(bad))} are set by the harness")
        # Stream k shifts every seed offset by 100 k; stage offsets stay below 100, and tenants' are
        # 1,000 apart, so stream 10 of a multi-tenant workload would replay tenant 2's stream 0.
        last, top = self.load.first_stream + self.load.streams - 1, 9 if self.tenants else 99
        if last > top:
            raise ValueError(
                f"load: streams {self.load.first_stream}..{last}: a "
                f"{'multi-tenant ' if self.tenants else ''}workload has streams 0..{top} (distinct seeds)"
            )
        if not self.tenants:
            return self
        if self.load.type != "poisson":
            raise ValueError("tenants: only with load.type poisson")
        for t in self.tenants:
            if len(t.rates) != len(self.load.rates):
                raise ValueError(f"tenants[{t.name}].rates: needs one rate per load.rates entry")
        for i, total in enumerate(self.load.rates):
            got = sum(t.rates[i] for t in self.tenants)
            if abs(got - total) > 1e-6 * max(1.0, total):
                raise ValueError(f"load.rates[{i}]: {total:g} is not the tenants' sum {got:g}")
        return self


def load_workload(path: str | Path) -> Workload:
    """Parse and validate a workload YAML file."""
    raw: Any = yaml.safe_load(Path(path).read_text())
    return Workload.model_validate(raw)


@dataclass(slots=True)
class BenchRequest:
    """One request to send: the OpenAI body and a label of its prefix group (for analysis)."""

    body: dict[str, Any]
    group: int
    conversation: int = -1
    turn: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    tenant: str = ""
    headers: dict[str, str] = field(default_factory=dict)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(_WORDS, k=n))


class RequestStream:
    """Deterministic, endless source of requests for a workload (same seed -> same sequence)."""

    def __init__(self, wl: Workload, seed_offset: int = 0) -> None:
        self.wl = wl
        self.rng = random.Random(wl.seed * 1_000_003 + seed_offset)
        self._systems: list[str] = []
        self._history: dict[int, tuple[int, str]] = {}  # conversation -> (turns done, transcript)
        data = wl.data
        if isinstance(data, SharedPrefixData):
            srng = random.Random(wl.seed)  # system prompts independent of the sweep offset
            self._systems = [
                f"system {g} " + _words(srng, data.system_tokens - 2) for g in range(data.groups)
            ]

    def _lora_model(self) -> str:
        if self.wl.lora is None:
            return self.wl.model
        return self.rng.choices(self.wl.lora.adapters, weights=self.wl.lora.weights, k=1)[0]

    def next(self) -> BenchRequest:
        """The next request of the stream."""
        data = self.wl.data
        model = self._lora_model()
        if isinstance(data, SharedPrefixData):
            g = self.rng.randrange(data.groups)
            conv = g * data.prompts_per_group + self.rng.randrange(data.prompts_per_group)
            question = _words(self.rng, data.question.draw(self.rng))
            out = data.output.draw(self.rng)
            turns_done, transcript = self._history.get(conv, (0, ""))
            if turns_done >= data.turns:
                turns_done, transcript = 0, ""
            prompt = f"{self._systems[g]}\n{transcript}user {conv} {question}"
            if data.turns > 1:
                # The reply is unknown to the client ahead of time; a fixed-length stand-in keeps the
                # next turn's prefix identical to what this turn sent (what chat clients re-send).
                self._history[conv] = (turns_done + 1, f"{transcript}user {conv} {question}\nreply {out}\n")
            return BenchRequest(self._body(model, prompt, out), group=g, conversation=conv, turn=turns_done)
        prompt = _words(self.rng, data.input.draw(self.rng))
        return BenchRequest(self._body(model, prompt, data.output.draw(self.rng)), group=-1)

    def _body(self, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        if self.wl.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body
