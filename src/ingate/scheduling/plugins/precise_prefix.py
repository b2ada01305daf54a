"""Precise prefix-cache affinity from the model servers' own KV-cache events.

The approximate `prefix-cache` scorer remembers where the gateway sent which prompt blocks and guesses
how long each server keeps them. This scorer knows: it subscribes to every endpoint's vLLM KV-event
stream (`ingate.metrics.kvsubscriber`: ZMQ, replay on gaps) and keeps an exact, bounded index of the
blocks each one holds. A request is tokenised as the server tokenises it (`ingate.scheduling.tokenization`), its
full blocks hashed as vLLM hashes them (`ingate.metrics.kvevents.block_hashes`: algorithm, seed, LoRA
name, cache salt), and each endpoint scores ``leading blocks it holds / prompt blocks``.

**Fallback.** It carries an approximate `prefix-cache` scorer inside (same parameters as that scorer,
under ``fallback``) that scores and records every request. Endpoints whose events the index is not
tracking (no batch applied yet, or cleared after a publisher restart or lost batches) get the
approximate score, and every endpoint does when the request cannot be tokenised (e.g. a chat request
with the ``huggingface`` tokenizer). One scorer slot keeps one weight for both, and the approximate
index stays warm for when events stop.

**Lifecycle.** The subscriptions start lazily on the first request this scorer scores (inside the
running event loop), so a built-in profile that no request selects opens no sockets. They follow the
pool: whenever the datastore's membership changes (`Datastore.endpoints()` returns a new list), a
background sync subscribes new endpoints and drops departed ones with their index entries. The gateway
calls `aclose` on shutdown. A subscriber that connects late replays what the publisher still buffers.

**Where the events are.** ``eventsPort`` (vLLM's default publisher binds ``tcp://*:5557``) on the
endpoint's host, or ``eventsPortOffset`` from the endpoint's HTTP port (simulated fleets on one host:
``ingate sim --port P --kv-events-port P+k``); the replay socket likewise (``replayPort`` /
``replayPortOffset``; none by default, as in vLLM). ``topic`` filters messages by prefix (``""``: all).

The matched prefix goes into the cycle state for the predicted-latency and size-band scorers: in
tokens under `PREFIX_MATCH_TOKENS_KEY`, and converted to characters (this prompt's own characters per
token) under `PREFIX_MATCH_KEY`, which is what they read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from ingate.datastore import Datastore, Endpoint
from ingate.lifecycle import ResponseInfo
from ingate.metrics.kvevents import HASH_ALGOS, iter_block_hashes, none_hash
from ingate.metrics.kvsubscriber import BlockIndex, EventSource, KVEventSubscriptions
from ingate.naming import camel_to_snake
from ingate.request import InferenceRequest
from ingate.scheduling.framework import (
    PREFIX_MATCH_KEY,
    PREFIX_MATCH_TOKENS_KEY,
    CycleState,
    SchedulingResult,
)
from ingate.scheduling.plugins.prefix import PrefixCacheScorer
from ingate.scheduling.plugins.registry import register
from ingate.scheduling.tokenization import Tokenizer, make_tokenizer

log = logging.getLogger(__name__)

_INNER_KEY = "precise_prefix.fallback_ctx"
"""The fallback scorer's own cycle state (it reads and writes PREFIX_MATCH_KEY in its own terms)."""
_IDS_KEY = "precise_prefix.ids"
_PENDING_KEY = "precise_prefix.pending"
"""The endpoint holding this request's speculative entry (keyed by id(ctx) there)."""


@dataclass(slots=True)
class _Pending:
    """A scheduled request's prompt (approximate block hashes), held speculatively by its target."""

    hashes: list[int]
    expires: float


def _common_blocks(a: list[int], b: list[int]) -> int:
    """Leading blocks two chained hash lists share (equal at i implies equal before: binary search)."""
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    if a[n - 1] == b[n - 1]:
        return n
    lo, hi = 0, n - 1  # a[lo] == b[lo], a[hi] != b[hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[mid] == b[mid]:
            lo = mid
        else:
            hi = mid
    return hi


@register("scorer", "precise-prefix")
@dataclass
class PrecisePrefixScorer:
    """Score = leading blocks the endpoint holds (from its KV events) / prompt blocks; see module doc."""

    events_port: int = 5557
    events_port_offset: int | None = None
    """When set, the publisher is at the endpoint's HTTP port plus this offset (overrides eventsPort)."""
    replay_port: int | None = None
    replay_port_offset: int | None = None
    topic: str = ""
    """ZMQ topic prefix to subscribe to; ``{host}``, ``{port}`` are the endpoint's."""
    hash_algo: str = "sha256_cbor"
    """The servers' ``--prefix-caching-hash-algo``."""
    hash_seed: str = "0"
    """The servers' ``PYTHONHASHSEED`` (vLLM's first-block parent hash depends on it)."""
    block_size: int = 0
    """Tokens per KV block; 0 = the endpoint's reported ``cache_config_info`` block size, else 16."""
    tokenizer: str = "sim"
    """``sim`` or ``huggingface`` (with ``tokenizerPath``): see `ingate.scheduling.tokenization`."""
    tokenizer_path: str = ""
    max_blocks: int = 2048
    """Blocks of a prompt to hash and match at most (bounds the per-request cost)."""
    max_blocks_per_endpoint: int = 1_000_000
    """Index bound per endpoint; at least the servers' num_gpu_blocks for an exact index."""
    replay_timeout_ms: float = 1000.0
    speculative: bool = True
    """Count a request's prompt as held by its target from the decision until its blocks can have been
    reported (see module docstring), so followers of a new prefix do not scatter meanwhile."""
    speculative_grace_ms: float = 500.0
    """How long a speculative entry outlives its request's first token (events follow the prefill)."""
    speculative_ttl_ms: float = 60_000.0
    """Upper bound on a speculative entry's life (a request that never reports back)."""
    fallback: dict[str, Any] = field(default_factory=dict)
    """Parameters of the inner approximate `prefix-cache` scorer (camelCase, as in its own spec)."""
    name: str = "precise-prefix"
    clock: Callable[[], float] = field(default=time.monotonic, init=False, repr=False)
    """Times speculative entries (the gateway's time.monotonic; the scheduling replay's virtual time)."""
    index: BlockIndex = field(init=False)
    approx: PrefixCacheScorer = field(init=False)
    subscriptions: KVEventSubscriptions | None = field(init=False, default=None)
    _tok: Tokenizer = field(init=False, repr=False)
    _root: bytes = field(init=False, repr=False)
    _ds: Datastore | None = field(init=False, default=None, repr=False)
    _synced: list[Endpoint] | None = field(init=False, default=None, repr=False)
    _lock: asyncio.Lock | None = field(init=False, default=None, repr=False)
    _tasks: set[asyncio.Task[None]] = field(init=False, default_factory=set, repr=False)
    _pending: dict[Endpoint, dict[int, _Pending]] = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.hash_algo not in HASH_ALGOS:
            raise ValueError(f"hashAlgo must be one of {', '.join(HASH_ALGOS)}")
        if self.block_size < 0 or self.max_blocks < 1 or self.max_blocks_per_endpoint < 1:
            raise ValueError("blockSize must be >= 0, maxBlocks and maxBlocksPerEndpoint positive")
        for p in (self.events_port, self.replay_port):
            if p is not None and not 0 < p < 65536:
                raise ValueError("eventsPort and replayPort must be valid TCP ports")
        if self.replay_timeout_ms <= 0 or self.speculative_grace_ms < 0 or self.speculative_ttl_ms <= 0:
            raise ValueError("replayTimeoutMs and speculativeTtlMs must be positive, speculativeGraceMs >= 0")
        try:
            self.topic.format(host="h", port=1)
        except (KeyError, IndexError, ValueError):
            raise ValueError("topic may only use the fields {host} and {port}") from None
        self._tok = make_tokenizer(self.tokenizer, self.tokenizer_path)
        self._root = none_hash(self.hash_seed, self.hash_algo)
        self.index = BlockIndex(self.max_blocks_per_endpoint)
        try:
            self.approx = PrefixCacheScorer(**{camel_to_snake(k): v for k, v in self.fallback.items()})
        except TypeError as e:
            raise ValueError(f"fallback: {e}") from None

    # -- lifecycle ----------------------------------------------------------------------------------
    def attach(self, datastore: Datastore) -> None:
        self._ds = datastore
        self.approx.attach(datastore)
        datastore.on_remove(self._forget)

    def _forget(self, ep: Endpoint) -> None:
        self._pending.pop(ep, None)

    def source(self, ep: Endpoint) -> EventSource:
        """Where `ep` publishes its KV events (from the parameters)."""
        port = ep.port + self.events_port_offset if self.events_port_offset is not None else self.events_port
        replay: str | None = None
        if self.replay_port_offset is not None:
            replay = f"tcp://{ep.host}:{ep.port + self.replay_port_offset}"
        elif self.replay_port is not None:
            replay = f"tcp://{ep.host}:{self.replay_port}"
        topic = self.topic.format(host=ep.host, port=ep.port) if self.topic else ""
        return EventSource(f"tcp://{ep.host}:{port}", replay, topic)

    def _follow_pool(self) -> None:
        """Start (first call) or resync the subscriptions when the pool's membership changed."""
        ds = self._ds
        if ds is None or ds.endpoints() is self._synced:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # scored outside an event loop (offline tools): approximate only
        self._synced = ds.endpoints()
        if self.subscriptions is None:
            self.subscriptions = KVEventSubscriptions(self.index, self.replay_timeout_ms / 1000)
            self._lock = asyncio.Lock()
        task = loop.create_task(self._sync(), name="precise-prefix-sync")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sync(self) -> None:
        assert self._lock is not None and self.subscriptions is not None and self._ds is not None
        async with self._lock:  # serialised; each sync uses the pool as it is then
            try:
                await self.subscriptions.sync({ep.address: self.source(ep) for ep in self._ds.endpoints()})
            except Exception:  # e.g. an unresolvable host: keep scoring (approximately) and retry later
                log.exception("precise-prefix: subscribing to KV events failed")
                self._synced = None

    async def aclose(self) -> None:
        """Stop every subscription (the gateway calls this on shutdown)."""
        for t in list(self._tasks):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self.subscriptions is not None:
            await self.subscriptions.close()
        self._synced = None

    # -- scoring ------------------------------------------------------------------------------------
    def block_size_of(self, ep: Endpoint) -> int:
        return self.block_size or ep.metrics.block_size or 16

    def token_ids(self, ctx: CycleState, request: InferenceRequest) -> list[int] | None:
        """The prompt's token ids as the servers see them (None: cannot tokenise), once per request."""
        if _IDS_KEY not in ctx:
            ctx[_IDS_KEY] = self._tok.encode(request)
        ids: list[int] | None = ctx[_IDS_KEY]
        return ids

    def match(
        self, ids: list[int], request: InferenceRequest, bs: int, eps: list[Endpoint]
    ) -> dict[Endpoint, int]:
        """Leading blocks (of `bs` tokens) of the prompt each of `eps` holds.

        Hashes lazily and stops at the first block that none of them holds: a shared head is hashed
        (memoised by `kvevents`, so a system prompt seen before costs a lookup per block), the unique
        rest of the prompt is never hashed.
        """
        salt = request.body.get("cache_salt")
        hashes = iter_block_hashes(
            ids[: self.max_blocks * bs],
            bs,
            self._root,
            request.adapter,
            salt if isinstance(salt, str) and salt else None,
            self.hash_algo,
        )
        matched = dict.fromkeys(eps, 0)
        held = [(ep, b) for ep in eps if (b := self.index.blocks_of(ep.address))]
        k = 0
        for h in hashes:
            if not held:
                break
            held = [(ep, b) for ep, b in held if h in b]
            k += 1
            for ep, _ in held:
                matched[ep] = k
        return matched

    def score(
        self, ctx: CycleState, request: InferenceRequest, endpoints: list[Endpoint]
    ) -> dict[Endpoint, float]:
        self._follow_pool()
        inner = CycleState()
        ctx[_INNER_KEY] = inner
        scores = self.approx.score(inner, request, endpoints)
        approx_chars: dict[Endpoint, int] = inner.get(PREFIX_MATCH_KEY, {})
        tracks = self.index.tracks
        live = [ep for ep in endpoints if tracks(ep.address)]
        ids = self.token_ids(ctx, request) if live else None
        if ids is None:  # no endpoint's events indexed, or cannot tokenise: approximate for all
            ctx[PREFIX_MATCH_KEY] = dict(approx_chars)
            return scores
        by_bs: dict[int, list[Endpoint]] = {}
        for ep in live:
            by_bs.setdefault(self.block_size_of(ep), []).append(ep)
        matched_chars = dict(approx_chars)
        matched_tokens: dict[Endpoint, int] = {}
        per_token = len(request.prompt_text) / len(ids) if ids else 0.0
        for bs, eps in by_bs.items():
            nblocks = min(len(ids) // bs, self.max_blocks)
            matched = self.match(ids, request, bs, eps) if nblocks else dict.fromkeys(eps, 0)
            for ep, k in matched.items():
                matched_chars.pop(ep, None)
                scores[ep] = k / nblocks if nblocks else 0.0
                if k:
                    matched_tokens[ep] = k * bs
                    matched_chars[ep] = round(k * bs * per_token)
        if self.speculative and self._pending:
            self._speculate(inner, request, live, scores, matched_chars, matched_tokens, per_token)
        ctx[PREFIX_MATCH_TOKENS_KEY] = matched_tokens
        ctx[PREFIX_MATCH_KEY] = matched_chars
        return scores

    def _speculate(
        self,
        inner: CycleState,
        request: InferenceRequest,
        live: list[Endpoint],
        scores: dict[Endpoint, float],
        matched_chars: dict[Endpoint, int],
        matched_tokens: dict[Endpoint, int],
        per_token: float,
    ) -> None:
        """Raise a tracked endpoint's score to what requests sent there, whose blocks its events may
        not show yet, share with this one (in the approximate index's character blocks)."""
        hashes = self.approx.prompt_hashes(inner, request)
        if not hashes:
            return
        now = self.clock()
        bc = self.approx.block_chars
        for ep in live:
            entries = self._pending.get(ep)
            if not entries:
                continue
            best = 0
            for key, p in list(entries.items()):
                if p.expires < now:
                    del entries[key]
                    continue
                k = _common_blocks(p.hashes, hashes)
                if k > best:
                    best = k
            if best and best / len(hashes) > scores[ep]:
                scores[ep] = best / len(hashes)
                matched_chars[ep] = best * bc
                matched_tokens[ep] = round(best * bc / per_token) if per_token else 0

    def post_schedule(self, ctx: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        inner = ctx.get(_INNER_KEY)
        if inner is None:
            return
        self.approx.post_schedule(inner, request, result)
        if self.speculative:
            hashes = self.approx.prompt_hashes(inner, request)
            if hashes:
                ep = result.target
                now = self.clock()
                entries = self._pending.setdefault(ep, {})
                for key in [k for k, p in entries.items() if p.expires < now]:
                    del entries[key]
                entries[id(ctx)] = _Pending(hashes, now + self.speculative_ttl_ms / 1000)
                ctx[_PENDING_KEY] = ep

    def _settle(self, ctx: CycleState, drop: bool) -> None:
        """The request's blocks are (or will shortly be) in its server's events: end its entry."""
        ep: Endpoint | None = ctx.get(_PENDING_KEY)
        entries = self._pending.get(ep) if ep is not None else None
        entry = entries.get(id(ctx)) if entries is not None else None
        if entries is None or entry is None:
            return
        if drop:
            del entries[id(ctx)]
        else:
            entry.expires = min(entry.expires, self.clock() + self.speculative_grace_ms / 1000)

    def on_first_token(self, ctx: CycleState, request: InferenceRequest, endpoint: Endpoint) -> None:
        self._settle(ctx, drop=False)

    def post_response(
        self, ctx: CycleState, request: InferenceRequest, endpoint: Endpoint, info: ResponseInfo
    ) -> None:
        # A failed request (or one moved to a fallback) stored nothing there; a finished one did.
        self._settle(ctx, drop=info.status != 200 or endpoint is not ctx.get(_PENDING_KEY))
        inner = ctx.get(_INNER_KEY)
        if inner is not None:
            self.approx.post_response(inner, request, endpoint, info)

    # -- metrics ------------------------------------------------------------------------------------
    def collect_metrics(self, profile: str, endpoints: Sequence[Endpoint]) -> Iterator[GaugeMetricFamily]:
        """`ExposesMetrics`: per endpoint, the indexed blocks, whether events are tracked, and the
        subscription's counters (batches, gaps, lost batches, publisher restarts), and the fallback
        index's memory. Nothing before the scorer first scored a request inside the gateway (a built-in
        profile that no request selects exports no series)."""
        if self.subscriptions is None:
            return
        yield from self.approx.collect_metrics(profile, endpoints)
        labels = ["profile", "endpoint"]
        fams = {
            "blocks": GaugeMetricFamily(
                "ingate_kv_index_blocks",
                "KV blocks the precise prefix index holds per endpoint.",
                labels=labels,
            ),
            "tracked": GaugeMetricFamily(
                "ingate_kv_events_tracked",
                "1 while the endpoint's KV events are indexed (precise scoring), 0 while it falls back.",
                labels=labels,
            ),
            "batches": GaugeMetricFamily(
                "ingate_kv_events_batches", "KV event batches applied (live and replayed).", labels=labels
            ),
            "gaps": GaugeMetricFamily("ingate_kv_events_gaps", "Sequence gaps seen.", labels=labels),
            "lost": GaugeMetricFamily(
                "ingate_kv_events_lost", "Batches neither received nor replayable.", labels=labels
            ),
            "restarts": GaugeMetricFamily(
                "ingate_kv_events_publisher_restarts", "Publisher sequence restarts.", labels=labels
            ),
        }
        subs = self.subscriptions.subscribers
        for ep in endpoints:
            lv = [profile, ep.address]
            fams["blocks"].add_metric(lv, self.index.size(ep.address))
            fams["tracked"].add_metric(lv, 1.0 if self.index.tracks(ep.address) else 0.0)
            sub = subs.get(ep.address)
            if sub is not None:
                st = sub.stats
                fams["batches"].add_metric(lv, st.batches)
                fams["gaps"].add_metric(lv, st.gaps)
                fams["lost"].add_metric(lv, st.lost)
                fams["restarts"].add_metric(lv, st.restarts)
        yield from fams.values()
