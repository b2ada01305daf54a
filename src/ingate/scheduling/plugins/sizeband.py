"""Size-band scorer: keeps long prompts and short prompts on different endpoints (size-interval
assignment) when prompt lengths are heavy-tailed.

On a continuous-batching server a long prompt hurts the short requests that share its replica: its
prefill makes the steps it runs in long (a 6,000-token chunk is one slow step for every request in the
batch), and its KV blocks, reserved at admission, make the requests queued behind it wait for room.
With heavy-tailed lengths a few percent of the requests carry a third of the prompt tokens. Classic
size-interval task assignment (SITA) for heavy-tailed job sizes gives each server a band of job sizes
so that small jobs never queue behind huge ones; this scorer does that softly:

- a request's size is its uncached prompt length (characters, minus the longest prefix match the
  prefix-cache scorer found on any endpoint, when that scorer runs first in the profile);
- recent sizes (a window of `window` requests) give a cutoff: requests above it carry `tokenShare`
  of the recent prompt characters and count as long;
- `longFraction` of the pool's endpoints (the last ones by address, at least one, never all) are the
  long band; a long request scores 1 there and 0 elsewhere, a short request the reverse;
- the scorer is neutral (1 everywhere) until `minSamples` sizes are seen, and while the cutoff is
  below `minSpread` x the median size: prompts of similar lengths (e.g. one shared system prompt with
  short questions) are not split, so prefix affinity and plain load balancing decide alone.

It is a preference, not a partition: with a moderate weight, load scorers (predicted-latency, queue)
send a request to the other band when its own band is much more loaded.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ingate.datastore import Datastore, Endpoint
from ingate.request import InferenceRequest
from ingate.scheduling.framework import PREFIX_MATCH_KEY, CycleState
from ingate.scheduling.plugins.registry import register


@register("scorer", "size-band")
@dataclass
class SizeBandScorer:
    """Long prompts prefer the long band of endpoints, short prompts the rest (see module docstring)."""

    long_fraction: float = 0.5
    """Fraction of the pool's endpoints that form the long band (rounded; at least 1, never all)."""
    token_share: float = 0.5
    """Share of recent prompt characters that the long requests carry (sets the cutoff)."""
    min_spread: float = 2.0
    """Banding applies only while cutoff >= min_spread x median size (lengths really spread out)."""
    window: int = 1000
    min_samples: int = 50
    refresh: int = 32
    """Recompute the cutoff every `refresh` requests (sorting the window is not per-request work)."""
    name: str = "size-band"
    _sizes: deque[int] = field(init=False, repr=False)
    _cutoff: float | None = field(default=None, init=False, repr=False)
    _since: int = field(default=0, init=False, repr=False)
    _datastore: Datastore | None = field(default=None, init=False, repr=False)
    _band_of: list[Endpoint] | None = field(default=None, init=False, repr=False)
    _band: set[Endpoint] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.long_fraction < 1.0 or not 0.0 < self.token_share < 1.0:
            raise ValueError("longFraction and tokenShare must be in (0, 1)")
        if self.min_spread < 1.0 or self.window < 1 or self.min_samples < 1 or self.refresh < 1:
            raise ValueError("minSpread must be >= 1; window, minSamples and refresh must be positive")
        self._sizes = deque(maxlen=self.window)

    def attach(self, datastore: Datastore) -> None:
        self._datastore = datastore

    @property
    def cutoff(self) -> float | None:
        """Current cutoff in characters (None: banding inactive)."""
        return self._cutoff

    def observe(self, size: int) -> None:
        """Record one request's size; recompute the cutoff every `refresh` requests."""
        self._sizes.append(size)
        self._since += 1
        if self._since >= self.refresh or (self._cutoff is None and len(self._sizes) == self.min_samples):
            self._since = 0
            self._cutoff = self._compute_cutoff()

    def _compute_cutoff(self) -> float | None:
        if len(self._sizes) < self.min_samples:
            return None
        xs = sorted(self._sizes)
        total = sum(xs)
        if total <= 0:
            return None
        acc = 0
        cut = xs[-1]
        for x in reversed(xs):
            acc += x
            if acc >= self.token_share * total:
                cut = x
                break
        median = xs[len(xs) // 2]
        if cut < self.min_spread * max(1, median):
            return None
        return float(cut)

    def long_band(self, endpoints: list[Endpoint]) -> set[Endpoint]:
        """The endpoints of the long band: the last `long_fraction` of the pool by address."""
        pool = self._datastore.endpoints() if self._datastore is not None else endpoints
        if pool is self._band_of:  # the datastore keeps one list object until membership changes
            return self._band
        if len(pool) < 2:
            band: set[Endpoint] = set()
        else:
            ordered = sorted(pool, key=lambda ep: ep.address)
            k = min(len(ordered) - 1, max(1, round(self.long_fraction * len(ordered))))
            band = set(ordered[-k:])
        self._band_of, self._band = pool, band
        return band

    def size(self, ctx: CycleState, request: InferenceRequest) -> int:
        matched: dict[Endpoint, int] = ctx.get(PREFIX_MATCH_KEY) or {}
        best = max(matched.values(), default=0)
        return max(0, len(request.prompt_text) - best)

    def score(
        self, ctx: CycleState, request: InferenceRequest, endpoints: list[Endpoint]
    ) -> dict[Endpoint, float]:
        size = self.size(ctx, request)
        cutoff = self._cutoff
        self.observe(size)
        if cutoff is None:
            return dict.fromkeys(endpoints, 1.0)
        band = self.long_band(endpoints)
        if not band:
            return dict.fromkeys(endpoints, 1.0)
        is_long = size >= cutoff
        return {ep: 1.0 if (ep in band) == is_long else 0.0 for ep in endpoints}
