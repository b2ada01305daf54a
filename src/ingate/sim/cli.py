"""`ingate sim`: run a fleet of simulated vLLM-compatible model servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Mapping

import click

from ingate.sim.fleet import SimFleet, SimFleetConfig
from ingate.sim.profiles import PROFILES, get_profile
from ingate.sim.server import Replica, ReplicaConfig


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@click.command("sim")
@click.option("--replicas", default=1, show_default=True, help="Number of replicas, one port each.")
@click.option(
    "--base-port", default=8100, show_default=True, help="Replica i listens on base-port + i; 0 = ephemeral."
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Bind address, or a comma list cycled over replicas; replicas on different addresses share "
    "port numbers (--host 127.0.0.2,127.0.0.3 --replicas 2: both on --base-port, like two pods).",
)
@click.option(
    "--model", default="meta-llama/Llama-3.1-8B-Instruct", show_default=True, help="Base model name."
)
@click.option(
    "--profile",
    default="h100-llama3-8b",
    show_default=True,
    help=f"Profile, or a comma list cycled over replicas (heterogeneous fleet). Known: {', '.join(sorted(PROFILES))}.",
)
@click.option(
    "--time-scale", default=1.0, show_default=True, help="Run this many times faster than real time."
)
@click.option("--max-num-seqs", type=int, default=None, help="Override the profile's max running sequences.")
@click.option("--max-num-batched-tokens", type=int, default=None, help="Override the per-step token budget.")
@click.option("--num-gpu-blocks", type=int, default=None, help="Override the KV-cache size in blocks.")
@click.option("--block-size", type=int, default=None, help="Override the KV block size in tokens.")
@click.option(
    "--max-loras", default=0, show_default=True, help="Resident LoRA adapters (default 4 if adapters given)."
)
@click.option("--lora-adapters", default="", help="Comma list of LoRA adapter names the replicas serve.")
@click.option(
    "--lora-load-ms", type=float, default=None, help="Time to load an adapter (profile default 25 ms)."
)
@click.option("--error-rate", default=0.0, show_default=True, help="Fraction of requests answered with 500.")
@click.option("--extra-latency-ms", default=0.0, show_default=True, help="Added before each request starts.")
@click.option("--hang-rate", default=0.0, show_default=True, help="Fraction of requests never answered.")
@click.option("--crash-after", type=int, default=None, help="Each replica stops listening after N requests.")
@click.option(
    "--stream-interval-ms",
    default=0.0,
    show_default=True,
    help="Coalesce mid-stream tokens into SSE writes at most this often (first token and finish are immediate).",
)
@click.option(
    "--scheduling-policy",
    type=click.Choice(["fcfs", "priority"]),
    default="fcfs",
    show_default=True,
    help="As vLLM's: 'priority' serves waiting requests by their 'priority' field (lower first); "
    "'fcfs' rejects requests that carry a non-zero priority with 400.",
)
@click.option(
    "--priority-preemption/--no-priority-preemption",
    default=False,
    show_default=True,
    help="With --scheduling-policy priority: a waiting request that finds no batch slot or KV room "
    "preempts the lowest-priority running request (as SGLang's priority scheduling; vLLM V1 does not).",
)
@click.option(
    "--kv-events-port",
    type=int,
    default=None,
    help="Publish vLLM-format KV-cache events (ZMQ PUB, msgpack) on this port; replica i uses port + i; "
    "0 = ephemeral ports (see --ready-file). Off by default.",
)
@click.option(
    "--kv-events-replay-port",
    type=int,
    default=None,
    help="With --kv-events-port: a ROUTER socket replaying missed batches on this port (+ i per replica).",
)
@click.option(
    "--kv-events-topic",
    default="kv@{host}:{port}@{model}",
    show_default=True,
    help="Topic of the event messages; {host}, {port} (the replica's HTTP port) and {model} are filled in.",
)
@click.option(
    "--kv-events-buffer-steps",
    default=10_000,
    show_default=True,
    help="Batches each replica keeps for replay (vLLM's buffer_steps).",
)
@click.option(
    "--kv-events-layout",
    type=click.Choice(["map", "array"]),
    default="map",
    show_default=True,
    help="Event encoding: 'map' (current vLLM: events are maps tagged by 'type') or 'array' "
    "(earlier vLLM's array_like events, which llm-d's kv-cache decoder reads).",
)
@click.option(
    "--kv-hash-seed",
    default="0",
    show_default=True,
    help="Root of the block-hash chains, as vLLM's PYTHONHASHSEED.",
)
@click.option(
    "--prefix-caching-hash-algo",
    "kv_hash_algo",
    type=click.Choice(["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]),
    default="sha256_cbor",
    show_default=True,
    help="Block hash function, as vLLM's flag (vLLM defaults to sha256, i.e. pickle + SHA-256; "
    "precise-prefix routers such as llm-d need sha256_cbor).",
)
@click.option(
    "--request-log",
    type=click.Path(dir_okay=False),
    default=None,
    help="Append one JSON line per finished request (replica, priority, arrival, queue/TTFT/e2e "
    "seconds as the server saw them, preemptions): tells server-side waits from gateway or client time.",
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write replica addresses here (JSON) once listening.",
)
def sim(
    replicas: int,
    base_port: int,
    host: str,
    model: str,
    profile: str,
    time_scale: float,
    max_num_seqs: int | None,
    max_num_batched_tokens: int | None,
    num_gpu_blocks: int | None,
    block_size: int | None,
    max_loras: int,
    lora_adapters: str,
    lora_load_ms: float | None,
    error_rate: float,
    extra_latency_ms: float,
    hang_rate: float,
    crash_after: int | None,
    stream_interval_ms: float,
    scheduling_policy: str,
    priority_preemption: bool,
    kv_events_port: int | None,
    kv_events_replay_port: int | None,
    kv_events_topic: str,
    kv_events_buffer_steps: int,
    kv_events_layout: str,
    kv_hash_seed: str,
    kv_hash_algo: str,
    request_log: str | None,
    seed: int,
    ready_file: str | None,
) -> None:
    """Run REPLICAS simulated vLLM servers (OpenAI API + vLLM metrics) until interrupted."""
    profiles = _csv(profile)
    try:
        for p in profiles:
            get_profile(p)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--profile") from None
    if time_scale <= 0:
        raise click.BadParameter("must be positive", param_hint="--time-scale")
    if kv_events_replay_port is not None and kv_events_port is None:
        raise click.BadParameter("needs --kv-events-port", param_hint="--kv-events-replay-port")
    if kv_events_buffer_steps < 1:
        raise click.BadParameter("must be positive", param_hint="--kv-events-buffer-steps")
    hosts = _csv(host)
    if not hosts:
        raise click.BadParameter("needs an address", param_hint="--host")
    template = ReplicaConfig(
        profile=get_profile(profiles[0]),
        model=model,
        host=hosts[0],
        time_scale=time_scale,
        max_loras=max_loras,
        lora_adapters=_csv(lora_adapters),
        lora_load_ms=lora_load_ms,
        error_rate=error_rate,
        extra_latency_ms=extra_latency_ms,
        hang_rate=hang_rate,
        crash_after=crash_after,
        stream_interval_ms=stream_interval_ms,
        seed=seed,
        scheduling_policy=scheduling_policy,
        priority_preemption=priority_preemption,
        kv_hash_seed=kv_hash_seed,
        kv_hash_algo=kv_hash_algo,
        kv_events_port=kv_events_port,
        kv_events_replay_port=kv_events_replay_port,
        kv_events_topic=kv_events_topic,
        kv_events_buffer_steps=kv_events_buffer_steps,
        kv_events_layout=kv_events_layout,
        request_log=request_log,
    )
    cfg = SimFleetConfig(
        replicas=replicas,
        base_port=base_port,
        profiles=profiles,
        overrides={
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max_num_batched_tokens,
            "num_gpu_blocks": num_gpu_blocks,
            "block_size": block_size,
        },
        replica=template,
        hosts=hosts,
    )
    _run(cfg, ready_file)


def _run(cfg: SimFleetConfig, ready_file: str | None) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        pass
    asyncio.run(_main(cfg, ready_file))


def _write_ready(path: str, info: Mapping[str, object]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)  # atomic: readers never see a half-written file


def _replica_info(r: Replica) -> dict[str, object]:
    out: dict[str, object] = {"index": r.cfg.index, "address": r.address, "profile": r.cfg.profile.name}
    if r.kv_publisher is not None:
        out["kv_events"] = {
            "endpoint": r.kv_publisher.endpoint,
            "replay_endpoint": r.kv_publisher.replay_endpoint,
            "topic": r.kv_publisher.topic.decode(),
        }
    return out


async def _main(cfg: SimFleetConfig, ready_file: str | None) -> None:
    fleet = SimFleet(cfg)
    await fleet.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    info = {"replicas": [_replica_info(r) for r in fleet.replicas]}
    if ready_file:
        _write_ready(ready_file, info)
    click.echo(f"ingate sim: {len(fleet.replicas)} replicas ready: {' '.join(fleet.addresses)}", err=True)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await fleet.stop()
