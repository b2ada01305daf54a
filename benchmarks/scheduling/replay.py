"""Replay a bench workload in virtual time through ingate's Scheduler and the simulator's engine.

Compares scheduler profiles on many request streams in seconds (not a test, and not a replacement for
`ingate bench`, which measures the real gateway, HTTP and processes). Each replica is an
`ingate.sim.engine.Engine` (the same step-time, batching and KV-cache model as `ingate sim`) driven by
an event loop in virtual time: requests arrive as the bench's Poisson stream (`RequestStream` and the
same arrival seeds; stream k > 0 shifts both seeds by 100 k), are scheduled by the real `Scheduler`
(the director's bookkeeping: in-flight counts, first-token and post-response hooks), reach the engine
2 ms later, and the scheduler sees metrics scraped from the engines every 50 ms and each engine step's
streamed tokens 2 ms after the step (the data plane's step timing, `Endpoint.steps`). Stages run in order
on the same fleet and scheduler (as `ingate bench` does), and the chosen stage is reported.

    python benchmarks/scheduling/replay.py benchmarks/workloads/mixed.yaml --stage 2 --streams 20 \\
        --profiles round-robin,guarded-affinity,default

Profiles are built-in names, YAML files with a `scheduler:` section, or `emu:sglang-cache-aware`: a
model of the peer sglang-router's cache_aware policy re-stated from its documentation (not its code),
to compare routing policies on many streams where `ingate bench` runs the real peer on one. Prints a
table (with the share of prompt tokens served from the replicas' prefix caches) and writes JSON
(default benchmarks/results/replay_<workload>_stage<k>.json).
"""

from __future__ import annotations

import argparse
import heapq
import platform
import random
import statistics
from pathlib import Path
from typing import Any

import orjson
import yaml
from rich.console import Console
from rich.table import Table

import ingate.sim.engine as sim_engine
from ingate.bench.runner import STREAM_SHIFT
from ingate.bench.stats import percentile
from ingate.bench.workload import EVAL_WORKLOADS_DIR, BenchRequest, RequestStream, Workload, load_workload
from ingate.datastore import Datastore, Endpoint
from ingate.errors import SLO_HOLD_EXPIRED, GatewayError, SloHold
from ingate.lifecycle import ResponseInfo
from ingate.metrics.kvevents import EventBatch, block_hashes, none_hash
from ingate.request import parse_request
from ingate.scheduling.config import SchedulerConfig
from ingate.scheduling.plugins.precise_prefix import PrecisePrefixScorer
from ingate.scheduling.predictor import ErrorWindow
from ingate.scheduling.scheduler import Scheduler, build_scheduler
from ingate.sim.engine import FINISHED, Engine, EngineConfig, SimRequest
from ingate.sim.profiles import get_profile
from ingate.sim.tokenizer import token_ids, tokenize

RESULTS = Path(__file__).resolve().parents[1] / "results"
NET_S = 0.002
SCRAPE_S = 0.05
HASH_ROOT = none_hash("0")  # as `ingate sim`'s default --kv-hash-seed


class _VirtualClock:
    """Stands in for the `time` module inside ingate.sim.engine (it stamps arrivals/admissions)."""

    t = 0.0

    def monotonic(self) -> float:
        return self.t


CLOCK = _VirtualClock()


def _fleet_args(wl: Workload) -> tuple[float, int | None, str]:
    """Time scale, KV-block override and the simulator profile list (comma list, cycled over replicas)."""
    args = list(wl.fleet.args)
    scale, blocks, profile = 1.0, None, "h100"
    for i, a in enumerate(args[:-1]):
        if a == "--time-scale":
            scale = float(args[i + 1])
        elif a == "--num-gpu-blocks":
            blocks = int(args[i + 1])
        elif a == "--profile":
            profile = args[i + 1]
    return scale, blocks, profile


class CacheAwareEmulation:
    """sglang-router's documented `cache_aware` policy, re-stated over block hashes (a model of the peer).

    The peer keeps an approximate prefix tree of the text it routed to each worker. If the loads (its
    own in-flight counts) are imbalanced, `max - min > abs_threshold` and `max > min * rel_threshold`,
    it picks the least-loaded worker; otherwise the worker with the longest cached prefix if the match
    covers more than `cache_threshold` of the request, else the worker with the smallest tree. The tree
    here is a set of prefix-chained block hashes per worker (no eviction: the peer's default tree limit
    is far larger than these workloads). Defaults are the peer's CLI defaults (0.3, 64, 1.5).
    """

    def __init__(self, n: int, cache_threshold: float = 0.3, abs_thr: int = 64, rel_thr: float = 1.5):
        self.trees: list[set[int]] = [set() for _ in range(n)]
        self.sizes = [0] * n
        self.cache_threshold, self.abs_thr, self.rel_thr = cache_threshold, abs_thr, rel_thr

    def pick(self, hashes: list[int], loads: list[int]) -> int:
        n = len(loads)
        lo, hi = min(loads), max(loads)
        if hi - lo > self.abs_thr and hi > lo * self.rel_thr:
            i = loads.index(lo)
        else:
            best, i = -1, 0
            for j in range(n):
                tree, m = self.trees[j], 0
                for h in hashes:
                    if h not in tree:
                        break
                    m += 1
                if m > best:
                    best, i = m, j
            if not hashes or best / len(hashes) <= self.cache_threshold:
                i = self.sizes.index(min(self.sizes))
        tree = self.trees[i]
        for h in hashes:
            if h not in tree:
                tree.add(h)
                self.sizes[i] += 1
        return i


EMULATIONS = {"emu:sglang-cache-aware": CacheAwareEmulation}


class Fleet:
    """Replicas, their endpoints and one scheduler, kept across stages."""

    def __init__(self, wl: Workload, cfg: SchedulerConfig, profile: str | None, seed: int) -> None:
        scale, blocks, names = _fleet_args(wl)
        classes = [get_profile(n.strip()).with_overrides(num_gpu_blocks=blocks) for n in names.split(",")]
        # As `ingate sim --profile a,b`: replica i runs profile i mod len (heterogeneous fleets).
        self.profs = [classes[i % len(classes)] for i in range(wl.fleet.replicas)]
        self.scale = scale
        self.profile = profile
        self.eps: list[Endpoint] = []
        self.engines: list[Engine] = []
        for i in range(wl.fleet.replicas):
            ep = Endpoint(name=f"r{i}", host="127.0.0.1", port=9000 + i)
            prof = self.profs[i]
            ep.metrics.block_size = prof.block_size
            ep.metrics.num_gpu_blocks = prof.num_gpu_blocks
            self.eps.append(ep)
            self.engines.append(Engine(EngineConfig(prof, time_scale=scale)))
        self.sched: Scheduler = build_scheduler(cfg, Datastore(self.eps))
        emu = EMULATIONS.get(profile or "")
        self.emu = emu(len(self.eps)) if emu is not None else None
        rng = random.Random(seed)
        for p in self.sched.profiles.values():
            if hasattr(p.picker, "rng"):
                p.picker.rng = rng  # deterministic tie-breaking
            for s, _ in p.scorers:
                if hasattr(s, "clock"):
                    s.clock = CLOCK.monotonic  # the latency model's waited-in-gateway time, virtual
        # Precise prefix scorers get each replica's KV-cache events at the end of the step that made
        # them (as `ingate sim --kv-events-port` publishes them; loopback delivery takes well under a
        # step), straight into their block index instead of over ZMQ.
        indexes = [
            s.index
            for p in self.sched.profiles.values()
            for s, _ in p.scorers
            if isinstance(s, PrecisePrefixScorer)
        ]
        if indexes:
            for ep, e in zip(self.eps, self.engines, strict=True):

                def sink(events: list[Any], name: str = ep.address) -> None:
                    batch = EventBatch(CLOCK.t, events)
                    for idx in indexes:
                        idx.apply(name, batch)

                e.enable_kv_events(sink)
        self.t0 = 0.0


def run_stage(
    fleet: Fleet, wl: Workload, rate: float, stage: int, shift: int, slo_header: bool = False
) -> list[dict[str, Any]]:
    """One Poisson stage; returns per-request records (virtual seconds). With `slo_header` every
    request carries the workload's TTFT SLO as `x-llm-d-slo-ttft-ms` (for SLO-aware profiles)."""
    headers = {"x-llm-d-slo-ttft-ms": str(wl.slo.ttft_s * 1000)} if slo_header else {}
    stream = RequestStream(wl, seed_offset=stage + shift)
    rng = random.Random(wl.seed * 7919 + stage + shift)
    ev: list[tuple[float, int, str, Any]] = []
    seq = 0

    def push(t: float, kind: str, payload: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(ev, (t, seq, kind, payload))

    t, n = 0.0, 0
    while True:
        t += rng.expovariate(rate)
        if t >= wl.load.duration_s:
            break
        push(fleet.t0 + t, "arrive", stream.next())
        n += 1
    push(fleet.t0, "scrape", None)
    eps, engines, profs, scale = fleet.eps, fleet.engines, fleet.profs, fleet.scale
    busy = [False] * len(eps)
    steps: list[Any] = [None] * len(eps)
    live: dict[SimRequest, tuple[dict[str, Any], Any, Any, int]] = {}
    recs: list[dict[str, Any]] = []
    now = fleet.t0

    def start_step(i: int) -> None:
        e = engines[i]
        prefill, decode, _loads = e._schedule()
        if not prefill and not decode:
            busy[i] = False
            return
        n_tok = sum(k for _, k, _ in prefill)
        quad = sum(k * (k + 2 * c) for _, k, c in prefill)
        ctx_tok = sum(r.prompt_len + r.generated for r in decode)
        ms = profs[i].step_ms(n_tok, quad, len(decode), ctx_tok)
        busy[i] = True
        steps[i] = (prefill, decode)
        push(now + ms / 1000.0 / scale, "step", i)

    left = n
    while ev and left > 0:
        now, _, kind, payload = heapq.heappop(ev)
        CLOCK.t = now
        if kind == "scrape":
            for ep, e in zip(eps, engines, strict=True):
                ep.metrics.waiting = len(e.waiting)
                ep.metrics.running = len(e.running)
                ep.metrics.kv_usage = e.kv.usage
                ep.metrics.updated_at = now
            push(now + SCRAPE_S, "scrape", None)
        elif kind == "arrive":
            br: BenchRequest
            if isinstance(payload, tuple):  # a held request, scheduled again
                br, req = payload
            else:
                br = payload
                path = "/v1/chat/completions" if "messages" in br.body else "/v1/completions"
                req = parse_request(path, headers, orjson.dumps(br.body), now=now)
            text = br.body.get("prompt") or br.body["messages"][0]["content"]
            if fleet.emu is not None:
                hashes = block_hashes(token_ids(tokenize(text)), 16, HASH_ROOT)
                i, ctx = fleet.emu.pick(hashes, [ep.in_flight for ep in eps]), None
            else:
                try:
                    result, cycle = fleet.sched.schedule(req, profile=fleet.profile)
                except SloHold as h:  # what the director does: hold, schedule again after poll_s
                    if now + h.poll_s >= h.until:
                        req.extra[SLO_HOLD_EXPIRED] = True
                        push(now, "arrive", (br, req))
                    else:
                        push(now + h.poll_s, "arrive", (br, req))
                    continue
                except GatewayError as e:  # e.g. 429 slo_unattainable: answered at once, never good
                    recs.append(
                        {
                            "send": req.arrival,
                            "ep": -1,
                            "group": br.group,
                            "prompt_tokens": 0,
                            "ttft": None,
                            "e2e": None,
                            "status": e.status,
                            "cached_tokens": 0,
                        }
                    )
                    left -= 1
                    continue
                # What the director does after a decision: the profile's post-schedule hooks.
                hooks = fleet.sched.hooks(result.profile)
                hooks.run_post_schedule(cycle, req, result)
                ctx = (cycle, hooks)
                i = eps.index(result.target)
            eps[i].in_flight += 1
            rec = {
                "send": req.arrival,
                "ep": i,
                "group": br.group,
                "prompt_tokens": 0,
                "ttft": None,
                "e2e": None,
            }
            recs.append(rec)
            push(now + NET_S, "submit", (i, text, br.body["max_tokens"], rec, req, ctx))
        elif kind == "submit":
            i, text, max_tokens, rec, req, ctx = payload
            toks = tokenize(text)
            rec["prompt_tokens"] = len(toks)
            sr = engines[i].submit(
                str(len(recs)), len(toks), block_hashes(token_ids(toks), 16, HASH_ROOT), max_tokens, None
            )
            live[sr] = (rec, req, ctx, i)
            if not busy[i]:
                start_step(i)
        elif kind == "chunk":  # a step's streamed tokens reach the gateway: what the data plane records
            eps[payload].steps.chunk(now)
        else:  # step end
            i = payload
            prefill, decode = steps[i]
            engines[i]._apply(prefill, decode, now)
            engines[i].flush_kv_events()
            if decode or any(r.first_token_at == now for r, _, _ in prefill):
                push(now + NET_S, "chunk", i)
            for r, _, _ in prefill:
                entry = live.get(r)
                if entry is not None and r.first_token_at == now and entry[0]["ttft"] is None:
                    rec, req, ctx, j = entry
                    rec["ttft"] = now + NET_S - rec["send"]
                    rec["cached_tokens"] = r.num_cached
                    if ctx is not None:
                        ctx[1].run_first_token(ctx[0], req, eps[j])
            for r in [r for r in live if r.state == FINISHED]:
                rec, req, ctx, j = live.pop(r)
                rec["e2e"] = now + NET_S - rec["send"]
                rec["completion_tokens"] = r.generated
                eps[j].in_flight -= 1
                info = ResponseInfo(
                    status=200,
                    prompt_tokens=rec["prompt_tokens"],
                    completion_tokens=r.generated,
                    cached_tokens=rec.get("cached_tokens"),
                    ttft_s=rec["ttft"],
                    e2e_s=rec["e2e"],
                )
                if ctx is not None:
                    ctx[1].run_post_response(ctx[0], req, eps[j], info)
                left -= 1
            start_step(i)
    fleet.t0 = now + 1.0
    base = recs[0]["send"] if recs else 0.0
    for r in recs:
        r["send"] -= base
    return recs


def summarize(recs: list[dict[str, Any]], slo_s: float, duration_s: float) -> dict[str, float]:
    """The live report's definitions (`ingate.bench.stats`): goodput = requests within the SLO per
    offered second, nearest-rank percentiles."""
    ttfts = [r["ttft"] for r in recs if r["ttft"] is not None]
    good = sum(1 for t in ttfts if t <= slo_s)
    prompt = sum(r["prompt_tokens"] for r in recs)
    return {
        "sent": len(recs),
        "good": good,
        "shed": sum(1 for r in recs if r.get("status") == 429),
        "cached_token_share": sum(r["cached_tokens"] for r in recs) / prompt if prompt else 0.0,
        "goodput_rps": good / duration_s,
        "ttft_p50": percentile(ttfts, 0.5) or 0.0,
        "ttft_p90": percentile(ttfts, 0.9) or 0.0,
        "ttft_p99": percentile(ttfts, 0.99) or 0.0,
    }


def load_profile(arg: str) -> tuple[SchedulerConfig, str | None]:
    if arg in EMULATIONS:
        return SchedulerConfig(), arg
    if arg.endswith((".yaml", ".yml")):
        data = yaml.safe_load(Path(arg).read_text())
        return SchedulerConfig.model_validate(data.get("scheduler", data)), None
    return SchedulerConfig(), arg


def load_tuning_workload(path: Path) -> Workload:
    """The workload at `path` for a tuning step (this replay, and tools built on it): ValueError for a
    held-out evaluation workload or seed set, which no tuning step may read."""
    if EVAL_WORKLOADS_DIR in path.resolve().as_posix():
        raise ValueError(f"{path} is a held-out evaluation workload: no tuning step may read it")
    wl = load_workload(path)
    if wl.seed_set != "tuning":
        raise ValueError("the replay reads tuning seeds only (seed_set: tuning)")
    return wl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workload", type=Path)
    ap.add_argument("--stage", type=int, default=-1, help="index into load.rates (default: last)")
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument(
        "--first-stream", type=int, default=0, help="first stream k (a later round on fresh tuning streams)"
    )
    ap.add_argument("--profiles", default="round-robin,guarded-affinity,default")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--slo-header", action="store_true", help="send the workload's TTFT SLO as x-llm-d-slo-ttft-ms"
    )
    args = ap.parse_args()
    try:
        wl = load_tuning_workload(args.workload)
    except ValueError as e:
        ap.error(str(e))
    stage = args.stage % len(wl.load.rates)
    rate = float(wl.load.rates[stage])
    sim_engine.time = CLOCK  # type: ignore[assignment]
    rows: dict[str, list[dict[str, float]]] = {}
    for name in args.profiles.split(","):
        cfg, prof = load_profile(name)
        rows[name] = []
        for k in range(args.first_stream, args.first_stream + args.streams):
            fleet = Fleet(wl, cfg, prof, seed=1234 + 100 * k)
            for s in range(stage):
                run_stage(fleet, wl, float(wl.load.rates[s]), s, STREAM_SHIFT * k, args.slo_header)
            models = [
                sc.predictor
                for p in fleet.sched.profiles.values()
                for sc, _ in p.scorers
                if hasattr(sc, "predictor")
            ]
            for m in models:  # prediction errors of the reported stage only (the model is warm by then)
                m.ttft_errors = ErrorWindow(1_000_000)
                m.tpot_errors = ErrorWindow(1_000_000)
            recs = run_stage(fleet, wl, rate, stage, STREAM_SHIFT * k, args.slo_header)
            row = summarize(recs, wl.slo.ttft_s, wl.load.duration_s)
            if models:
                row["ttft_errors"] = [e for m in models for e in m.ttft_errors.recent]
                row["tpot_errors"] = [e for m in models for e in m.tpot_errors.recent]
            rows[name].append(row)
    table = Table(title=f"{wl.name} @ {rate:g} req/s, {args.streams} streams (virtual-time replay)")
    cols = (
        "profile",
        "good / sent",
        "TTFT err p50 / p90",
        "goodput req/s (mean)",
        "TTFT p90 s (mean)",
        "TTFT p99 s (mean)",
        "p99 max",
        "cached",
        f"stream {args.first_stream}",
    )
    for col in cols:
        table.add_column(col, justify="right")
    out: dict[str, Any] = {
        "format": "ingate-replay/1",
        "workload": wl.name,
        "rate": rate,
        "stage": stage,
        "streams": args.streams,
        "first_stream": args.first_stream,
        "python": platform.python_version(),
        "profiles": {},
    }
    for name, rs in rows.items():
        errs = {k: sorted(e for r in rs for e in r.pop(f"{k}_errors", [])) for k in ("ttft", "tpot")}
        agg = {
            "good": sum(r["good"] for r in rs),
            "sent": sum(r["sent"] for r in rs),
            "goodput_rps_mean": statistics.mean(r["goodput_rps"] for r in rs),
            "ttft_p90_mean": statistics.mean(r["ttft_p90"] for r in rs),
            "ttft_p99_mean": statistics.mean(r["ttft_p99"] for r in rs),
            "ttft_p99_max": max(r["ttft_p99"] for r in rs),
            "cached_token_share_mean": statistics.mean(r["cached_token_share"] for r in rs),
            "shed": sum(r["shed"] for r in rs),
            "prediction_error": {
                k: {"n": len(v), "p50": percentile(v, 0.5), "p90": percentile(v, 0.9)}
                for k, v in errs.items()
            },
            "per_stream": rs,
        }
        out["profiles"][name] = agg
        s0 = rs[0]
        table.add_row(
            name,
            f"{agg['good']} / {agg['sent']}",
            (
                f"{percentile(errs['ttft'], 0.5):.0%} / {percentile(errs['ttft'], 0.9):.0%}"
                if errs["ttft"]
                else "-"
            ),
            f"{agg['goodput_rps_mean']:.2f}",
            f"{agg['ttft_p90_mean']:.2f}",
            f"{agg['ttft_p99_mean']:.2f}",
            f"{agg['ttft_p99_max']:.2f}",
            f"{agg['cached_token_share_mean']:.0%}",
            f"{s0['good']}/{s0['sent']}, {s0['goodput_rps']:.2f} req/s, p99 {s0['ttft_p99']:.2f} s",
        )
    Console(width=150).print(table)
    path = args.out or RESULTS / f"replay_{wl.name}_stage{stage}.json"
    path.write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
