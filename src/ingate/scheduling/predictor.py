"""Online latency predictor: learns, from the requests it routed, how many seconds an endpoint takes to
produce a request's first token (TTFT) and each further token (TPOT), given what the gateway knew when
it sent the request there.

Model: per endpoint, a linear model of the features below, fitted by recursive least squares (RLS)
with a forgetting factor, so it follows load regimes and replica changes without keeping samples:
memory is one d x d matrix per endpoint and model (d = 11 for TTFT), an update costs O(d^2) on the
response path (about 20-40 us in CPython) and a prediction O(d) on the decision path. Samples are
weighted by 1 / max(y, floor)^2, i.e. the fit minimises *relative* squared error: a 50 ms error on a
100 ms TTFT counts as much as a 1 s error on a 2 s one, which is what SLO decisions care about.

Blending: one more model, the *pooled* one, learns from every endpoint's outcomes. An endpoint's
prediction blends its own model with the pooled one, by how well each has predicted that endpoint
lately: both are scored on every outcome before they learn it (exponentially weighted mean squared
relative error, `e_own` and `e_pool`), and the own model's weight is
`w = (e_pool / (e_own + e_pool))^2 * n / (n + shrink)` once one of its outcomes has been scored. A new
endpoint predicts what the pool does; a replica that really is slower or faster moves to its own
coefficients within a few dozen responses; in a pool of equal replicas the noisier own models weigh
little. No per-class configuration. (Measured in the scheduler replay, tuning seeds, 20 streams:
against a blend by sample count alone, `n / (n + 20)`, it cut the p90 TTFT error on mixed from 58% to
47% at 9 req/s and from 55% to 50% at 10, and on heterogeneous from 41% to 39% at 8; see
docs/scheduling.md.) Until the pooled model has seen `warmup`
samples `warm` is False and callers fall back to a heuristic (the predicted-latency scorer's cost).

Features (what the gateway knows at dispatch, for the request on a candidate endpoint):

    TTFT: 1, new prompt ktokens (prompt - expected cached), its square, prefill ktokens this gateway
          has pending there, scraped waiting and running counts, KV utilisation, KV shortfall ktokens
          (demand beyond capacity), requests past their first token (decoding) this gateway has there,
          seconds since the endpoint's last engine step ended (from the streamed chunks, capped at two
          steps: the phase of the step in progress, which a new request waits out), seconds until the
          requests this gateway has there free enough KV cache for the prompt (their remaining
          max_tokens at one token per step; 0 when it fits)
    TPOT: 1, running, KV utilisation, decoding, pending prefill ktokens, new prompt ktokens

Pure Python (numpy is not a core dependency); lists, no allocation beyond the feature vector.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

TTFT_FEATURES = (
    "bias",
    "new_ktokens",
    "new_ktokens_sq",
    "pending_prefill_ktokens",
    "waiting",
    "running",
    "kv_utilisation",
    "kv_shortfall_ktokens",
    "decoding",
    "since_step_s",
    "kv_wait_s",
)
TPOT_FEATURES = ("bias", "running", "kv_utilisation", "decoding", "pending_prefill_ktokens", "new_ktokens")


@dataclass(slots=True)
class Features:
    """What the gateway knew about a (request, endpoint) pair when it chose."""

    new_tokens: float
    """Prompt tokens minus the tokens expected to be served from the endpoint's prefix cache."""
    pending_prefill: float
    """Uncached prompt tokens of requests this gateway sent there that have no first token yet."""
    waiting: float
    running: float
    kv_utilisation: float
    kv_shortfall: float
    """Tokens of KV demand (in flight + this request) beyond the endpoint's capacity (0 when it fits)."""
    decoding: float
    """Requests this gateway sent there that are past their first token."""
    since_step: float = 0.0
    """Seconds since the endpoint's last step ended, as seen in the streamed chunks relayed from it,
    capped at two steps (`ingate.datastore.StepTiming.since`): how far the step in progress has got,
    which a request arriving there waits out."""
    kv_wait: float = 0.0
    """Seconds until the requests this gateway has there are expected to have freed room in the KV
    cache for this prompt (0 when it fits now): their remaining output tokens (max_tokens minus the
    steps since their first token) times the engine's step, in order of ending
    (`PredictedTTFTScorer._kv_wait`)."""

    def ttft(self) -> list[float]:
        k = self.new_tokens / 1000.0
        return [
            1.0,
            k,
            k * k,
            self.pending_prefill / 1000.0,
            self.waiting,
            self.running,
            self.kv_utilisation,
            self.kv_shortfall / 1000.0,
            self.decoding,
            self.since_step,
            self.kv_wait,
        ]

    def tpot(self) -> list[float]:
        return [
            1.0,
            self.running,
            self.kv_utilisation,
            self.decoding,
            self.pending_prefill / 1000.0,
            self.new_tokens / 1000.0,
        ]


class OnlineLinear:
    """Weighted recursive least squares with exponential forgetting (one linear model).

    `P` is the inverse information matrix; its trace is capped at the prior's (`max_trace`), so a
    direction that the data stop exciting does not wind up without bound under forgetting.
    """

    __slots__ = ("P", "d", "lam", "max_trace", "n", "theta")

    def __init__(self, d: int, forgetting: float, prior_var: float, theta: Sequence[float] | None = None):
        if not 0.0 < forgetting <= 1.0:
            raise ValueError("forgetting must be in (0, 1]")
        if prior_var <= 0:
            raise ValueError("prior variance must be positive")
        self.d = d
        self.lam = forgetting
        self.theta: list[float] = list(theta) if theta is not None else [0.0] * d
        self.P: list[list[float]] = [[prior_var if i == j else 0.0 for j in range(d)] for i in range(d)]
        self.max_trace = prior_var * d
        self.n = 0

    def predict(self, x: Sequence[float]) -> float:
        return sum(t * v for t, v in zip(self.theta, x, strict=True))

    def update(self, x: Sequence[float], y: float, weight: float = 1.0) -> None:
        """One RLS step on sample (x, y) with sample weight `weight` (> 0)."""
        s = math.sqrt(weight)
        xs = [v * s for v in x]
        ys = y * s
        P = self.P
        d = self.d
        Px = [sum(P[i][j] * xs[j] for j in range(d)) for i in range(d)]
        denom = self.lam + sum(xs[i] * Px[i] for i in range(d))
        if denom <= 0.0 or not math.isfinite(denom):
            return
        err = ys - sum(t * v for t, v in zip(self.theta, xs, strict=True))
        k = [p / denom for p in Px]
        theta = self.theta
        for i in range(d):
            theta[i] += k[i] * err
        trace = 0.0
        for i in range(d):
            row = P[i]
            ki = k[i]
            for j in range(d):
                row[j] -= ki * Px[j]
            trace += row[i]
        if trace < self.max_trace:  # forget only while the uncertainty is below the prior's
            inv = 1.0 / self.lam
            for row in P:
                for j in range(d):
                    row[j] *= inv
        self.n += 1


@dataclass(slots=True)
class _EndpointModels:
    ttft: OnlineLinear
    tpot: OnlineLinear
    # EWMA squared relative errors of this endpoint's own and the pooled predictions, per kind
    # (-1 until the first outcome is scored, which then sets them).
    ttft_err: list[float] = field(default_factory=lambda: [-1.0, -1.0])
    tpot_err: list[float] = field(default_factory=lambda: [-1.0, -1.0])


class ErrorWindow:
    """Absolute relative errors |predicted - actual| / actual of the last `size` predictions, with
    cumulative histogram bucket counts for Prometheus."""

    BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)

    def __init__(self, size: int = 2000) -> None:
        self.recent: deque[float] = deque(maxlen=size)
        self.counts = [0] * (len(self.BUCKETS) + 1)
        self.total = 0.0
        self.n = 0

    def add(self, predicted: float, actual: float) -> float:
        err = abs(predicted - actual) / actual
        self.recent.append(err)
        i = 0
        for b in self.BUCKETS:
            if err <= b:
                break
            i += 1
        self.counts[i] += 1
        self.total += err
        self.n += 1
        return err

    def quantile(self, q: float) -> float | None:
        """Nearest-rank quantile of the recent window (None when empty)."""
        got = self.quantiles((q,))
        return got[0] if got else None

    def quantiles(self, qs: Sequence[float]) -> list[float]:
        """Nearest-rank quantiles of the recent window, one sort for all ([] when empty): a scrape
        asks for several of each endpoint's window, on the event loop."""
        if not self.recent:
            return []
        s = sorted(self.recent)
        n = len(s)
        return [s[min(n - 1, max(0, math.ceil(q * n) - 1))] for q in qs]


@dataclass
class LatencyPredictor:
    """Per-endpoint online TTFT and TPOT models shrunk toward a pooled one (see the module doc)."""

    forgetting: float = 0.998
    """RLS forgetting factor: the effective memory is about 1 / (1 - forgetting) samples (500)."""
    warmup: int = 50
    """Pooled samples before `warm` (predictions are used); before it callers use their fallback."""
    shrink: float = 20.0
    """Sample count damping of an endpoint's own model: its weight is scaled by n / (n + shrink)."""
    error_decay: float = 0.05
    """Weight of the newest outcome in the own-vs-pooled error averages that set the blend."""
    prior_var: float = 100.0
    """Prior variance of the coefficients (seconds per unit feature; large = learn fast)."""
    min_ttft_s: float = 0.005
    """Floor of a TTFT sample in the relative weighting (and of every prediction)."""
    min_tpot_s: float = 0.0005
    error_window: int = 2000
    _pooled: _EndpointModels = field(init=False, repr=False)
    _models: dict[Hashable, _EndpointModels] = field(default_factory=dict, init=False, repr=False)
    ttft_errors: ErrorWindow = field(init=False, repr=False)
    tpot_errors: ErrorWindow = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.warmup < 1 or self.shrink < 0 or self.min_ttft_s <= 0 or self.min_tpot_s <= 0:
            raise ValueError("warmup must be >= 1, shrink >= 0, the floors > 0")
        self._pooled = self._new()
        self.ttft_errors = ErrorWindow(self.error_window)
        self.tpot_errors = ErrorWindow(self.error_window)

    def _new(self) -> _EndpointModels:
        return _EndpointModels(
            OnlineLinear(len(TTFT_FEATURES), self.forgetting, self.prior_var),
            OnlineLinear(len(TPOT_FEATURES), self.forgetting, self.prior_var),
        )

    @property
    def warm(self) -> bool:
        return self._pooled.ttft.n >= self.warmup

    def samples(self, endpoint: Hashable | None = None) -> int:
        """TTFT samples learned (pooled, or of one endpoint)."""
        if endpoint is None:
            return self._pooled.ttft.n
        m = self._models.get(endpoint)
        return m.ttft.n if m is not None else 0

    def forget(self, endpoint: Hashable) -> None:
        """Drop an endpoint's own models (it left the pool)."""
        self._models.pop(endpoint, None)

    def endpoints(self) -> int:
        return len(self._models)

    # -- decision path ------------------------------------------------------------------------------
    def _blend(self, own: OnlineLinear, err: list[float], pooled: OnlineLinear, x: Sequence[float]) -> float:
        p = pooled.predict(x)
        if err[0] < 0:
            return p  # no outcome of this endpoint scored yet: the pool's prediction
        r = err[1] / (err[0] + err[1]) if err[0] + err[1] > 0 else 0.5
        w = r * r * own.n / (own.n + self.shrink)
        return w * own.predict(x) + (1.0 - w) * p

    def predict_ttft(self, endpoint: Hashable, f: Features) -> float:
        """Predicted seconds from dispatch to the first token on `endpoint`."""
        m = self._models.get(endpoint)
        x = f.ttft()
        y = (
            self._blend(m.ttft, m.ttft_err, self._pooled.ttft, x)
            if m is not None
            else self._pooled.ttft.predict(x)
        )
        return y if y > self.min_ttft_s else self.min_ttft_s

    def predict_tpot(self, endpoint: Hashable, f: Features) -> float:
        """Predicted seconds per output token after the first on `endpoint`."""
        m = self._models.get(endpoint)
        x = f.tpot()
        y = (
            self._blend(m.tpot, m.tpot_err, self._pooled.tpot, x)
            if m is not None
            else self._pooled.tpot.predict(x)
        )
        return y if y > self.min_tpot_s else self.min_tpot_s

    def _score(self, own: OnlineLinear, pooled: OnlineLinear, err: list[float], x: list[float], y: float,
               floor: float) -> None:  # fmt: skip
        """Before learning an outcome: how far off the own and the pooled model were (EWMA)."""
        if own.n == 0:
            return
        a = self.error_decay
        for i, model in enumerate((own, pooled)):
            p = model.predict(x)
            e = ((p if p > floor else floor) - y) / y
            err[i] = e * e if err[i] < 0 else err[i] + a * (e * e - err[i])

    # -- response path ------------------------------------------------------------------------------
    def observe(
        self, endpoint: Hashable, f: Features, ttft_s: float | None, tpot_s: float | None, own: bool = True
    ) -> None:
        """Learn one completed request's outcome (either may be None: not measured). `own=False`: the
        pooled model only (the endpoint has left the pool: no model of its own is kept or re-created)."""
        m = self._models.get(endpoint)
        if m is None and own:
            m = self._models[endpoint] = self._new()
        pooled = self._pooled
        if ttft_s is not None and ttft_s > 0 and math.isfinite(ttft_s):
            x = f.ttft()
            w = 1.0 / max(ttft_s, self.min_ttft_s) ** 2
            if m is not None:
                self._score(m.ttft, pooled.ttft, m.ttft_err, x, ttft_s, self.min_ttft_s)
                m.ttft.update(x, ttft_s, w)
            pooled.ttft.update(x, ttft_s, w)
        if tpot_s is not None and tpot_s > 0 and math.isfinite(tpot_s):
            x = f.tpot()
            w = 1.0 / max(tpot_s, self.min_tpot_s) ** 2
            if m is not None:
                self._score(m.tpot, pooled.tpot, m.tpot_err, x, tpot_s, self.min_tpot_s)
                m.tpot.update(x, tpot_s, w)
            pooled.tpot.update(x, tpot_s, w)
