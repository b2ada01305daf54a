"""The engine of one simulated replica: a stepped continuous-batching scheduler like vLLM's V1.

Each step the scheduler (1) advances running requests, prefill chunks first-come first-served within a
token budget (`max_num_batched_tokens`), one token per decoding request, preempting the newest running
request (recompute) when a decode step needs a KV block and none is left; (2) if nothing was preempted,
admits waiting requests in arrival order while there is a sequence slot, token budget and KV room,
skipping requests whose LoRA adapter cannot be loaded yet.

Scheduling policies, as vLLM's `--scheduling-policy`: `fcfs` (arrival order; preemption victim the newest
running request) and `priority` (waiting requests ordered by (priority, arrival), lower value first;
the victim of a KV shortage is the running request with the largest (priority, arrival)). Optional
`priority_preemption` (off by default; vLLM V1 does not do it, SGLang's `--enable-priority-scheduling`
does): a waiting request that finds no sequence slot or KV room preempts (recompute) the lowest-priority
running request when that one's priority value is larger. The step's duration comes from the profile
(`SimProfile.step_ms`), divided by `time_scale`; its effects (tokens, first tokens, finishes) apply when
the step ends. One asyncio task per replica does O(batch) arithmetic per step.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from ingate.metrics.kvevents import KVEvent
from ingate.sim.kvcache import KVCache
from ingate.sim.lora import LoraSlots
from ingate.sim.profiles import SimProfile

WAITING, RUNNING, FINISHED, ABORTED = "waiting", "running", "finished", "aborted"
POLICIES = ("fcfs", "priority")


@dataclass(eq=False, slots=True)
class SimRequest:
    """One request inside the engine."""

    rid: str
    prompt_len: int
    hashes: list[int]
    max_tokens: int
    adapter: str | None
    arrival: float
    priority: int = 0
    """vLLM semantics: a lower value is scheduled first (only with the `priority` policy)."""
    seq: int = 0
    state: str = WAITING
    prefill_target: int = 0
    computed: int = 0
    num_cached: int = 0
    generated: int = 0
    cached_refs: list[int] = field(default_factory=list)
    private_blocks: int = 0
    hit_blocks: int = 0
    scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float = 0.0
    finished_at: float | None = None
    preemptions: int = 0
    event: asyncio.Event = field(default_factory=asyncio.Event)
    notify: Callable[[], None] | None = None
    """Called instead of setting `event` when set (streaming responses are written by a flusher)."""
    token_ids: Sequence[int] = ()
    """Prompt token ids (only for the KV-cache events' BlockStored)."""
    lora_id: int | None = None

    def signal(self) -> None:
        if self.notify is not None:
            self.notify()
        else:
            self.event.set()

    @property
    def done(self) -> bool:
        return self.state in (FINISHED, ABORTED)


@dataclass(slots=True)
class EngineConfig:
    profile: SimProfile
    time_scale: float = 1.0
    max_loras: int = 0
    lora_load_ms: float | None = None
    scheduling_policy: str = "fcfs"
    priority_preemption: bool = False


class _FCFSQueue:
    """Waiting requests in arrival order (preempted ones go back to the front)."""

    def __init__(self) -> None:
        self._q: deque[SimRequest] = deque()

    def push(self, req: SimRequest) -> None:
        self._q.append(req)

    def push_front(self, req: SimRequest) -> None:
        self._q.appendleft(req)

    def pop(self) -> SimRequest:
        return self._q.popleft()

    def peek(self) -> SimRequest:
        return self._q[0]

    def remove(self, req: SimRequest) -> None:
        self._q.remove(req)

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[SimRequest]:
        return iter(self._q)


class _PriorityQueue:
    """Waiting requests ordered by (priority, arrival); a preempted request keeps its place."""

    def __init__(self) -> None:
        self._h: list[tuple[int, float, int, SimRequest]] = []

    def push(self, req: SimRequest) -> None:
        heapq.heappush(self._h, (req.priority, req.arrival, req.seq, req))

    push_front = push  # the key, not the insertion side, decides the order

    def pop(self) -> SimRequest:
        return heapq.heappop(self._h)[3]

    def peek(self) -> SimRequest:
        return self._h[0][3]

    def remove(self, req: SimRequest) -> None:
        for i, e in enumerate(self._h):
            if e[3] is req:
                self._h[i] = self._h[-1]
                self._h.pop()
                heapq.heapify(self._h)
                return
        raise ValueError("not queued")

    def __len__(self) -> int:
        return len(self._h)

    def __iter__(self) -> Iterator[SimRequest]:
        return (e[3] for e in self._h)


class Engine:
    """Continuous-batching engine of one replica (see module docstring)."""

    def __init__(self, cfg: EngineConfig, on_finish: Callable[[SimRequest], None] | None = None) -> None:
        p = cfg.profile
        if cfg.time_scale <= 0:
            raise ValueError("time_scale must be positive")
        if cfg.scheduling_policy not in POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(POLICIES)}")
        self.cfg = cfg
        self.profile = p
        self.kv = KVCache(p.num_gpu_blocks, p.block_size)
        self.lora = LoraSlots(cfg.max_loras)
        self.lora_load_ms = p.lora_load_ms if cfg.lora_load_ms is None else cfg.lora_load_ms
        self.by_priority = cfg.scheduling_policy == "priority"
        self.priority_preemption = cfg.priority_preemption and self.by_priority
        self.waiting: _FCFSQueue | _PriorityQueue = _PriorityQueue() if self.by_priority else _FCFSQueue()
        self.running: list[SimRequest] = []
        self._seq = itertools.count()
        self.on_finish = on_finish
        self.preemptions = 0
        self.steps = 0
        self.busy_s = 0.0  # simulated busy time (wall seconds at this time scale)
        self.lag_s = 0.0  # how much later than modelled steps ended (event-loop overload shows here)
        self.max_lag_s = 0.0
        self.itl_observer: Callable[[float], None] | None = None
        self.kv_event_sink: Callable[[list[KVEvent]], object] | None = None
        """Receives each step's KV-cache events (one batch per step, as vLLM publishes them)."""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- client side ---------------------------------------------------------------------------------
    def submit(
        self,
        rid: str,
        prompt_len: int,
        hashes: list[int],
        max_tokens: int,
        adapter: str | None,
        priority: int = 0,
        token_ids: Sequence[int] = (),
        lora_id: int | None = None,
    ) -> SimRequest:
        """Queue a request; progress is signalled on `request.event`."""
        if priority and not self.by_priority:
            # vLLM's answer when a request carries a priority the server was not started for.
            raise ValueError(f"Got priority {priority} but Priority scheduling is not enabled.")
        bs = self.profile.block_size
        if (prompt_len + max_tokens + bs - 1) // bs > self.kv.num_blocks:
            raise ValueError(
                f"request needs {prompt_len + max_tokens} tokens of KV cache but the replica holds "
                f"{self.kv.num_blocks * bs}"
            )
        req = SimRequest(rid, prompt_len, hashes, max_tokens, adapter, time.monotonic(), priority)
        req.seq = next(self._seq)
        req.prefill_target = prompt_len
        req.token_ids = token_ids
        req.lora_id = lora_id
        self.waiting.push(req)
        self._wake.set()
        return req

    def abort(self, req: SimRequest) -> None:
        """Drop a request (client went away); frees its KV blocks and adapter slot."""
        if req.done:
            return
        if req.state == WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        elif req.state == RUNNING:
            self.running.remove(req)
            self._free(req)
        req.state = ABORTED
        req.signal()

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for req in list(self.running) + list(self.waiting):
            self.abort(req)

    # -- the step loop -------------------------------------------------------------------------------
    async def _run(self) -> None:
        scale = self.cfg.time_scale
        t_next = time.monotonic()
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                t_next = time.monotonic()
            prefill, decode, loads = self._schedule()
            if not prefill and not decode:
                # Everything waiting is blocked (LoRA slots / KV) and nothing runs to free them: wait.
                self._wake.clear()
                await self._wake.wait()
                t_next = time.monotonic()
                continue
            n_tok = 0
            quad = 0.0
            for _req, n, k in prefill:
                n_tok += n
                quad += n * (n + 2 * k)
            ctx = 0
            for req in decode:
                ctx += req.prompt_len + req.generated
            ms = self.profile.step_ms(n_tok, quad, len(decode), ctx) + loads * self.lora_load_ms
            dur = ms / 1000.0 / scale
            t_end = max(t_next, time.monotonic() - 0.05) + dur  # don't bank more than 50 ms of lag
            delay = t_end - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            lag = now - t_end
            if lag > 0:
                self.lag_s += lag
                self.max_lag_s = max(self.max_lag_s, lag)
            t_next = t_end
            self.steps += 1
            self.busy_s += dur
            self._apply(prefill, decode, now)
            self.flush_kv_events()

    def enable_kv_events(self, sink: Callable[[list[KVEvent]], object]) -> None:
        """Record the KV cache's events and hand them to `sink` once per step."""
        self.kv_event_sink = sink
        self.kv.events = []

    def flush_kv_events(self) -> None:
        events = self.kv.events
        if events and self.kv_event_sink is not None:
            self.kv.events = []
            self.kv_event_sink(events)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix block (vLLM's reset_prefix_cache): only when no block is in use."""
        ok = self.kv.reset_prefix_cache()
        self.flush_kv_events()
        return ok

    def _schedule(self) -> tuple[list[tuple[SimRequest, int, int]], list[SimRequest], int]:
        p = self.profile
        bs = p.block_size
        budget = p.max_num_batched_tokens
        prefill: list[tuple[SimRequest, int, int]] = []
        decode: list[SimRequest] = []
        preempted = False
        i = 0
        while i < len(self.running):
            req = self.running[i]
            if req.computed < req.prefill_target:
                n = min(req.prefill_target - req.computed, budget)
                if n > 0:
                    budget -= n
                    prefill.append((req, n, req.computed))
                i += 1
                continue
            if budget <= 0:
                i += 1
                continue
            need = -(-(req.prompt_len + req.generated + 1) // bs)
            held = req.private_blocks + len(req.cached_refs)
            victim_is_self = False
            while need > held and not self.kv.allocate(1):
                victim = self._victim()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    victim_is_self = True
                    break
            if victim_is_self:
                break
            if need > held:
                req.private_blocks += 1
            budget -= 1
            decode.append(req)
            i += 1
        loads = 0
        if not preempted:
            blocked_adapters: set[str] = set()
            skipped: list[SimRequest] = []
            preempted_now: list[SimRequest] = []
            while self.waiting and budget > 0:
                if len(self.running) >= p.max_num_seqs and not self.priority_preemption:
                    break
                req = self.waiting.pop()
                if req in preempted_now or (
                    req.adapter is not None
                    and (req.adapter in blocked_adapters or not self.lora.can_run(req.adapter))
                ):
                    # Blocked on LoRA slots, or preempted in this very step (its entries in this step's
                    # batch are void): it waits for a later step.
                    if req.adapter is not None and req not in preempted_now:
                        blocked_adapters.add(req.adapter)
                    skipped.append(req)
                    continue
                if len(self.running) >= p.max_num_seqs and not self._preempt_for(req, preempted_now):
                    self.waiting.push_front(req)
                    break
                admitted = self._admit(req)
                while not admitted and self._preempt_for(req, preempted_now):
                    admitted = self._admit(req)  # room made by preempting lower-priority work
                if not admitted:
                    self.waiting.push_front(req)
                    break
                if req.adapter is not None and self.lora.acquire(req.adapter):
                    loads += 1
                n = min(req.prefill_target - req.computed, budget)
                budget -= n
                prefill.append((req, n, req.computed))
            for req in reversed(skipped):
                self.waiting.push_front(req)
        return prefill, decode, loads

    def _admit(self, req: SimRequest) -> bool:
        """Reserve KV blocks for the request's whole prompt, reusing cached prefix blocks."""
        bs = self.profile.block_size
        total = -(-req.prefill_target // bs)
        hit = 0
        cached: list[int] = []
        if req.preemptions == 0:
            # At least one prompt token must be computed to produce logits (as in vLLM).
            hit = min(self.kv.match_prefix(req.hashes), (req.prompt_len - 1) // bs)
            # Pin the hit blocks before allocating: allocation evicts unreferenced cached blocks in
            # LRU order, and the ones this request just matched may be among them.
            cached = req.hashes[:hit]
            self.kv.acquire_cached(cached)
        if not self.kv.allocate(total - hit):
            self.kv.release(cached, 0)
            return False
        if req.preemptions == 0:
            self.kv.record_lookup(req.prompt_len, hit * bs)
            req.num_cached = hit * bs
        req.cached_refs = cached
        req.hit_blocks = hit
        req.private_blocks = total - hit
        req.computed = hit * bs
        req.state = RUNNING
        if req.scheduled_at is None:
            req.scheduled_at = time.monotonic()
        self.running.append(req)
        return True

    def _victim(self) -> SimRequest:
        """The running request to preempt on a KV shortage."""
        if self.by_priority:
            return max(self.running, key=lambda r: (r.priority, r.arrival))
        return self.running[-1]

    def _preempt_for(self, req: SimRequest, preempted: list[SimRequest]) -> bool:
        """Priority preemption: free room for ``req`` by preempting one strictly lower-priority request."""
        if not (self.priority_preemption and self.running):
            return False
        victim = max(self.running, key=lambda r: (r.priority, r.arrival))
        if victim.priority <= req.priority:
            return False
        self._preempt(victim)
        preempted.append(victim)
        return True

    def _preempt(self, req: SimRequest) -> None:
        self.running.remove(req)
        self._free(req)
        req.state = WAITING
        req.preemptions += 1
        self.preemptions += 1
        req.computed = 0
        req.prefill_target = req.prompt_len + req.generated
        self.waiting.push_front(req)

    def _free(self, req: SimRequest) -> None:
        self.kv.release(req.cached_refs, req.private_blocks)
        req.cached_refs = []
        req.private_blocks = 0
        if req.adapter is not None:
            self.lora.release(req.adapter)

    def _apply(
        self, prefill: list[tuple[SimRequest, int, int]], decode: list[SimRequest], now: float
    ) -> None:
        finished: list[SimRequest] = []
        for req, n, _ in prefill:
            if req.state != RUNNING:
                continue  # aborted or preempted during the step
            req.computed += n
            if req.computed < req.prefill_target:
                continue
            # Register the prompt's full blocks now that they are computed, so later requests hit them.
            k = len(req.cached_refs)
            new = req.hashes[k:]
            if new and req.private_blocks >= len(new):
                bs = self.profile.block_size
                stored = self.kv.register(
                    new,
                    req.hashes[k - 1] if k else None,
                    req.token_ids[k * bs : len(req.hashes) * bs],
                    req.lora_id,
                    req.adapter,
                )
                req.cached_refs = req.cached_refs + stored
                req.private_blocks -= len(new)
            req.generated += 1
            if req.first_token_at is None:
                req.first_token_at = now
            req.last_token_at = now
            if req.generated >= req.max_tokens:
                finished.append(req)
            req.signal()
        itl = self.itl_observer
        for req in decode:
            if req.state != RUNNING:
                continue
            req.generated += 1
            if itl is not None:
                itl(now - req.last_token_at)
            req.last_token_at = now
            if req.generated >= req.max_tokens:
                finished.append(req)
            req.signal()
        for req in finished:
            self.running.remove(req)
            self._free(req)
            req.state = FINISHED
            req.finished_at = now
            if self.on_finish is not None:
                self.on_finish(req)
