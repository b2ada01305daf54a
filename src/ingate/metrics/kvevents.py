"""vLLM KV-cache events: block hashes and the ZMQ/msgpack wire format (no sockets here).

Shared by the simulator's publisher (`ingate.sim.kvpublisher`) and the gateway's subscriber
(`ingate.metrics.kvsubscriber`). Facts from vLLM (`vllm/distributed/kv_events.py`,
`vllm/v1/core/kv_cache_utils.py`, `vllm/config/kv_events.py`) and llm-d-kv-cache (its vLLM adapter):

- **Block hashes.** A full block of ``block_size`` token ids is hashed as
  ``H(serialize((parent, tuple(token_ids), extra_keys)))`` with vLLM's ``--prefix-caching-hash-algo``:
  ``sha256`` (vLLM's default: SHA-256 of ``pickle.dumps(obj, protocol=HIGHEST_PROTOCOL)``),
  ``sha256_cbor`` (SHA-256 of ``cbor2.dumps(obj, canonical=True)``, the cross-language one precise-prefix
  routers such as llm-d require), ``xxhash`` / ``xxhash_cbor`` (xxh3_128 of the same serializations). ``parent`` is the previous block's 32-byte digest, or for the
  first block ``NONE_HASH = H(PYTHONHASHSEED)`` (random when the variable is unset, so a router can
  only reproduce hashes of servers started with a fixed seed). ``extra_keys`` is ``None``, or a tuple of the
  LoRA adapter name (every block) followed by the request's ``cache_salt`` (first block only).
- **Hashes in events** are, by default (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``), the low 64 bits of the
  digest read big-endian (an unsigned int); with the variable at 0 they are the raw 32-byte digests.
  Decoding accepts both and keys the index by the 64-bit int (as llm-d does).
- **Messages.** Multipart ``[topic, seq, payload]``: ``seq`` is an 8-byte big-endian counter starting at
  0, one per batch; ``payload`` is a msgpack array ``[ts, events, data_parallel_rank]`` (msgspec
  ``array_like``). Events are msgspec tagged structs with ``omit_defaults`` (fields without a default
  are always present, nil or not). Current vLLM encodes each as a map tagged by ``"type"``:
  ``{"type": "BlockStored", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
  "medium", "lora_name", ...}``, ``{"type": "BlockRemoved", "block_hashes", "medium", ...}``,
  ``{"type": "AllBlocksCleared"}``. Earlier vLLM (and llm-d's decoder) used the ``array_like`` layout:
  ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name]``
  etc. `encode_batch` writes either (``layout``); `decode_batch` reads both.
- **Replay.** A ROUTER socket answers a request frame holding an 8-byte big-endian start sequence with
  one ``[seq, payload]`` reply per buffered batch whose seq >= start, then ``[-1 as 8 signed bytes, b""]``.
- **Topic.** vLLM's default topic is ``""``; llm-d deploys ``kv@<pod>@<model>``.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
import msgpack
import xxhash

MEDIUM_GPU = "GPU"
LAYOUTS = ("map", "array")
"""Event encodings: current vLLM's tagged maps, or the earlier array_like layout."""
END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""Sequence frame that ends a replay answer."""
_U64 = (1 << 64) - 1


# -- block hashes ----------------------------------------------------------------------------------
def sha256_cbor(obj: object) -> bytes:
    """vLLM's ``sha256_cbor``: SHA-256 of the canonical CBOR encoding of ``obj``."""
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def _sha256_pickle(obj: object) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _xxhash_pickle(obj: object) -> bytes:
    return xxhash.xxh3_128_digest(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _xxhash_cbor(obj: object) -> bytes:
    return xxhash.xxh3_128_digest(cbor2.dumps(obj, canonical=True))


HASH_ALGOS = {
    "sha256": _sha256_pickle,
    "sha256_cbor": sha256_cbor,
    "xxhash": _xxhash_pickle,
    "xxhash_cbor": _xxhash_cbor,
}
"""vLLM's ``--prefix-caching-hash-algo`` choices."""


def _hash_fn(algo: str) -> Callable[[object], bytes]:
    try:
        return HASH_ALGOS[algo]
    except KeyError:
        raise ValueError(f"unknown hash algorithm {algo!r}; known: {', '.join(HASH_ALGOS)}") from None


@functools.lru_cache(maxsize=1 << 14)  # ~16k blocks (~256k tokens of prompts), a few MB
def _block_digest(algo: str, parent: bytes, tokens: tuple[int, ...], extra: tuple[str, ...] | None) -> bytes:
    # Memoised as vLLM's hash_block_tokens once was: shared prefixes are hashed once, not per request
    # (a cache hit costs a tuple hash, a miss serialization + hash, about 5 us per block).
    return HASH_ALGOS[algo]((parent, tokens, extra))


def none_hash(hash_seed: str, algo: str = "sha256_cbor") -> bytes:
    """The parent digest of a chain's first block for a server started with ``PYTHONHASHSEED=hash_seed``."""
    return _hash_fn(algo)(hash_seed)


def external_hash(digest: bytes) -> int:
    """A block digest as vLLM puts it in events by default: its low 64 bits, big-endian."""
    return int.from_bytes(digest, "big") & _U64


def iter_block_digests(
    token_ids: Sequence[int],
    block_size: int,
    root: bytes,
    lora_name: str | None = None,
    cache_salt: str | None = None,
    algo: str = "sha256_cbor",
) -> Iterator[bytes]:
    """The chained 32-byte digests of the full blocks of ``token_ids`` (partial last block not hashed),
    computed lazily: a router matching a prompt against an index stops at the first block no server
    holds, so a prompt's unique tail costs one block's hash, not all of them.

    ``root`` is ``none_hash(seed, algo)``; ``lora_name`` and ``cache_salt`` become the blocks' extra keys as
    vLLM builds them (the adapter name on every block, the salt on the first).
    """
    _hash_fn(algo)
    parent = root
    lora = (lora_name,) if lora_name is not None else ()
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        extra: tuple[str, ...] | None = lora + ((cache_salt,) if start == 0 and cache_salt else ())
        parent = _block_digest(algo, parent, tuple(token_ids[start : start + block_size]), extra or None)
        yield parent


def block_digests(
    token_ids: Sequence[int],
    block_size: int,
    root: bytes,
    lora_name: str | None = None,
    cache_salt: str | None = None,
    algo: str = "sha256_cbor",
) -> list[bytes]:
    """`iter_block_digests`, all of them."""
    return list(iter_block_digests(token_ids, block_size, root, lora_name, cache_salt, algo))


def iter_block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    root: bytes,
    lora_name: str | None = None,
    cache_salt: str | None = None,
    algo: str = "sha256_cbor",
) -> Iterator[int]:
    """`iter_block_digests` in their event form (64-bit ints), lazily."""
    for d in iter_block_digests(token_ids, block_size, root, lora_name, cache_salt, algo):
        yield int.from_bytes(d, "big") & _U64


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    root: bytes,
    lora_name: str | None = None,
    cache_salt: str | None = None,
    algo: str = "sha256_cbor",
) -> list[int]:
    """`block_digests` in their event form (64-bit ints): what BlockStored carries and the index keys on."""
    return [external_hash(d) for d in block_digests(token_ids, block_size, root, lora_name, cache_salt, algo)]


# -- events ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks newly cached, in chain order; ``parent_block_hash`` precedes the first (None: root)."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM_GPU
    lora_name: str | None = None
    extra_keys: list[list[Any] | None] | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Cached blocks evicted."""

    block_hashes: list[int]
    medium: str | None = MEDIUM_GPU


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The whole prefix cache was reset."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    """One published message: the events of one engine step."""

    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = 0


class KVEventDecodeError(ValueError):
    """A payload that is not a vLLM KV-event batch."""


def _event_map(ev: KVEvent) -> dict[str, Any]:
    # Key order follows the struct's field order, as msgspec writes it.
    if isinstance(ev, BlockStored):
        m: dict[str, Any] = {
            "type": "BlockStored",
            "block_hashes": ev.block_hashes,
            "parent_block_hash": ev.parent_block_hash,
            "token_ids": ev.token_ids,
            "block_size": ev.block_size,
            "lora_id": ev.lora_id,
            "medium": ev.medium,
            "lora_name": ev.lora_name,
        }
        if ev.extra_keys is not None:
            m["extra_keys"] = ev.extra_keys
        # vLLM fills the KV-cache group of every event (one full-attention group here).
        m["group_idx"] = 0
        m["kv_cache_spec_kind"] = "full_attention"
        return m
    if isinstance(ev, BlockRemoved):
        return {"type": "BlockRemoved", "block_hashes": ev.block_hashes, "medium": ev.medium, "group_idx": 0}
    return {"type": "AllBlocksCleared"}


def _event_fields(ev: KVEvent) -> list[Any]:
    if isinstance(ev, BlockStored):
        f: list[Any] = [
            "BlockStored",
            ev.block_hashes,
            ev.parent_block_hash,
            ev.token_ids,
            ev.block_size,
            ev.lora_id,
            ev.medium,
            ev.lora_name,
        ]
        if ev.extra_keys is not None:
            f.append(ev.extra_keys)
        return f
    if isinstance(ev, BlockRemoved):
        return ["BlockRemoved", ev.block_hashes, ev.medium]
    return ["AllBlocksCleared"]


def encode_batch(batch: EventBatch, layout: str = "map") -> bytes:
    """msgpack payload of one batch, laid out as vLLM's msgspec encoder lays it out (see `LAYOUTS`)."""
    if layout == "map":
        events: list[Any] = [_event_map(e) for e in batch.events]
    elif layout == "array":
        events = [_event_fields(e) for e in batch.events]
    else:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}")
    fields: list[Any] = [batch.ts, events]
    if batch.data_parallel_rank is not None:
        fields.append(batch.data_parallel_rank)
    return msgpack.packb(fields, use_bin_type=True)


def _hash(raw: Any) -> int:
    if isinstance(raw, bool):
        raise KVEventDecodeError("block hash is a boolean")
    if isinstance(raw, int):
        return raw & _U64
    if isinstance(raw, bytes) and raw:
        return int.from_bytes(raw[-8:], "big")  # a raw digest: its low 64 bits, as in the default form
    raise KVEventDecodeError(f"unsupported block hash {type(raw).__name__}")


def _at(f: list[Any], i: int) -> Any:
    return f[i] if i < len(f) else None


_MAP_FIELDS = {
    "BlockStored": (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
        "extra_keys",
    ),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}


def _decode_event(f: Any) -> KVEvent:
    if isinstance(f, dict):
        # Current layout: a map tagged by "type"; rebuilt as the array layout (missing fields nil).
        tag = f.get("type")
        if tag not in _MAP_FIELDS:
            raise KVEventDecodeError(f"unknown event type {tag!r}")
        f = [tag, *(f.get(k) for k in _MAP_FIELDS[tag])]
    if not isinstance(f, list) or not f or not isinstance(f[0], str):
        raise KVEventDecodeError("event is neither a tagged map nor a tagged array")
    tag = f[0]
    try:
        if tag == "BlockStored":
            if len(f) < 5:
                raise KVEventDecodeError("BlockStored needs at least 5 fields")
            lora_id = _at(f, 5)
            return BlockStored(
                block_hashes=[_hash(h) for h in f[1]],
                parent_block_hash=None if f[2] is None else _hash(f[2]),
                token_ids=[int(t) for t in f[3]],
                block_size=int(f[4]),
                lora_id=None if lora_id is None else int(lora_id),
                medium=_at(f, 6),
                lora_name=_at(f, 7),
                extra_keys=_at(f, 8),
            )
        if tag == "BlockRemoved":
            return BlockRemoved(block_hashes=[_hash(h) for h in f[1]], medium=_at(f, 2))
        if tag == "AllBlocksCleared":
            return AllBlocksCleared()
    except (TypeError, IndexError) as e:
        raise KVEventDecodeError(f"malformed {tag}: {e}") from None
    raise KVEventDecodeError(f"unknown event tag {tag!r}")


def decode_batch(payload: bytes) -> EventBatch:
    """Parse one payload; unknown trailing fields (newer vLLM) are ignored, unknown tags rejected."""
    try:
        f = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:
        raise KVEventDecodeError(f"payload is not msgpack: {e}") from None
    if not isinstance(f, list) or len(f) < 2 or not isinstance(f[1], list):
        raise KVEventDecodeError("payload is not an [ts, events, ...] array")
    rank = _at(f, 2)
    return EventBatch(ts=float(f[0]), events=[_decode_event(e) for e in f[1]], data_parallel_rank=rank)


def new_batch(events: list[KVEvent]) -> EventBatch:
    """A batch stamped now (wall-clock seconds, as vLLM stamps it)."""
    return EventBatch(time.time(), events)


def seq_bytes(seq: int) -> bytes:
    """The 8-byte big-endian sequence frame."""
    return seq.to_bytes(8, "big", signed=True)


def parse_seq(frame: bytes) -> int:
    """Inverse of `seq_bytes` (signed, so the replay end marker reads -1)."""
    if len(frame) != 8:
        raise KVEventDecodeError(f"sequence frame has {len(frame)} bytes, not 8")
    return int.from_bytes(frame, "big", signed=True)
