"""vLLM KV-cache events: block hashes, wire format, the block index, and the sim's KV cache as a source."""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
import pytest

from ingate.metrics.kvevents import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEventDecodeError,
    block_digests,
    block_hashes,
    decode_batch,
    encode_batch,
    external_hash,
    none_hash,
)
from ingate.metrics.kvsubscriber import BlockIndex
from ingate.sim.kvcache import KVCache


def _cbor_uint(n: int) -> bytes:
    # RFC 8949 major type 0, shortest form (what canonical CBOR requires)
    if n < 24:
        return bytes([n])
    if n < 256:
        return bytes([0x18, n])
    if n < 65536:
        return b"\x19" + n.to_bytes(2, "big")
    return b"\x1a" + n.to_bytes(4, "big")


def _cbor_text(s: str) -> bytes:
    b = s.encode()
    assert len(b) < 24
    return bytes([0x60 + len(b)]) + b


def _hand_hash(parent: bytes, tokens: list[int], extra: list[str] | None) -> bytes:
    """vLLM's sha256_cbor((parent, tuple(tokens), extra)) with the CBOR bytes written out by hand."""
    body = b"\x83" + b"\x58\x20" + parent + bytes([0x80 + len(tokens)]) + b"".join(map(_cbor_uint, tokens))
    body += b"\xf6" if extra is None else bytes([0x80 + len(extra)]) + b"".join(map(_cbor_text, extra))
    return hashlib.sha256(body).digest()


def test_block_hashes_chain_as_vllm_sha256_cbor() -> None:
    root = none_hash("0")
    assert root == hashlib.sha256(b"\x61\x30").digest()  # sha256_cbor("0"): CBOR text of length 1
    tokens = [*range(1, 17), 200, 65535, 65536, 100000, *range(12), 7, 7, 7]  # 35 tokens
    d = block_digests(tokens, 16, root)
    assert len(d) == 2  # the partial third block is not hashed
    assert d[0] == _hand_hash(root, tokens[:16], None)
    assert d[1] == _hand_hash(d[0], tokens[16:32], None)  # the parent is the full 32-byte digest
    assert block_hashes(tokens, 16, root) == [int.from_bytes(x[-8:], "big") for x in d]
    assert external_hash(d[0]) < 2**64
    # A LoRA adapter's name is an extra key on every block, a cache salt on the first block only.
    ds = block_digests(tokens, 16, root, lora_name="my-lora", cache_salt="s1")
    assert ds[0] == _hand_hash(root, tokens[:16], ["my-lora", "s1"])
    assert ds[1] == _hand_hash(ds[0], tokens[16:32], ["my-lora"])
    assert block_digests(tokens, 16, root, cache_salt="s1")[1] == _hand_hash(
        _hand_hash(root, tokens[:16], ["s1"]), tokens[16:32], None
    )
    assert block_digests(tokens, 16, none_hash("1")) != d  # another seed, other hashes


def test_batch_layouts_are_vllms_msgpack() -> None:
    stored = BlockStored([2**64 - 1, 5], None, list(range(32)), 16, lora_id=1, lora_name="a")
    batch = EventBatch(1.5, [stored, BlockRemoved([5]), AllBlocksCleared()], 0)
    # Current vLLM: the batch is array_like, its events maps tagged by "type".
    payload = encode_batch(batch)
    raw = msgpack.unpackb(payload)
    assert raw[0] == 1.5 and raw[2] == 0
    assert raw[1][0] == {
        "type": "BlockStored",
        "block_hashes": [2**64 - 1, 5],
        "parent_block_hash": None,
        "token_ids": list(range(32)),
        "block_size": 16,
        "lora_id": 1,
        "medium": "GPU",
        "lora_name": "a",
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
    }
    assert raw[1][1:] == [
        {"type": "BlockRemoved", "block_hashes": [5], "medium": "GPU", "group_idx": 0},
        {"type": "AllBlocksCleared"},
    ]
    assert decode_batch(payload) == batch
    # Earlier vLLM: events array_like too, tag first.
    payload = encode_batch(batch, layout="array")
    raw = msgpack.unpackb(payload)
    assert raw == [
        1.5,
        [
            ["BlockStored", [2**64 - 1, 5], None, list(range(32)), 16, 1, "GPU", "a"],
            ["BlockRemoved", [5], "GPU"],
            ["AllBlocksCleared"],
        ],
        0,
    ]
    assert decode_batch(payload) == batch


def test_decode_accepts_older_and_newer_vllm_layouts_and_byte_hashes() -> None:
    digest = bytes(range(32))
    old = msgpack.packb([2.0, [["BlockStored", [7], 3, [1, 2], 2, None], ["BlockRemoved", [7]]]])
    b = decode_batch(old)
    assert b.events[0] == BlockStored([7], 3, [1, 2], 2, None, None)
    assert b.events[1] == BlockRemoved([7], None) and b.data_parallel_rank is None
    newer = msgpack.packb(
        [2.0, [["BlockStored", [digest], None, [1], 1, None, "GPU", None, None, 0, "full", None]], 1]
    )
    ev = decode_batch(newer).events[0]
    assert isinstance(ev, BlockStored) and ev.block_hashes == [int.from_bytes(digest[-8:], "big")]
    bad_map = msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": "x", "token_ids": []}]])
    for bad in (b"\xc1", msgpack.packb({"ts": 1}), msgpack.packb([1.0, [["Nope"]]]), bad_map):
        with pytest.raises(KVEventDecodeError):
            decode_batch(bad)


def test_block_index_counts_copies_ignores_other_tiers_and_trims() -> None:
    idx = BlockIndex(max_blocks_per_endpoint=3)
    idx.apply("a", EventBatch(0, [BlockStored([1, 2], None, [], 16), BlockStored([1], None, [], 16)]))
    idx.apply("a", EventBatch(0, [BlockStored([9], None, [], 16, medium="CPU")]))
    assert idx.hashes("a") == {1, 2} and idx.prefix_blocks("a", [1, 2, 3]) == 2
    idx.apply("a", EventBatch(0, [BlockRemoved([1])]))  # vLLM held two copies of block 1
    assert idx.contains("a", 1)
    idx.apply("a", EventBatch(0, [BlockRemoved([1]), BlockRemoved([42])]))
    assert not idx.contains("a", 1) and idx.prefix_blocks("a", [1, 2]) == 0 and idx.unknown_removals == 1
    idx.apply("a", EventBatch(0, [BlockStored([3, 4, 5], 2, [], 16)]))
    assert idx.hashes("a") == {3, 4, 5} and idx.trimmed == 1  # oldest (2) dropped at the bound
    idx.apply("a", EventBatch(0, [AllBlocksCleared()]))
    assert idx.size("a") == 0 and idx.size("b") == 0


def test_kvcache_records_vllm_events() -> None:
    kv = KVCache(num_blocks=4, block_size=2)
    kv.events = []
    toks = [10, 11, 12, 13, 14, 15]
    assert kv.allocate(3)
    kv.register([1, 2, 3], None, toks, lora_id=2, lora_name="x")
    assert kv.events == [BlockStored([1, 2, 3], None, toks, 2, 2, "GPU", "x")]
    kv.events.clear()
    kv.release([1, 2, 3], 0)
    kv.acquire_cached([1])
    assert kv.allocate(3)  # evicts the unreferenced blocks in LRU order: 2, then 3
    assert kv.events == [BlockRemoved([2]), BlockRemoved([3])]
    kv.events.clear()
    # Block 1 is already cached: the new blocks on each side of it are stored as two runs.
    kv.register([7, 1, 8], 6, [20, 21, 10, 11, 22, 23])
    assert kv.events == [
        BlockStored([7], 6, [20, 21], 2, None, "GPU", None),
        BlockStored([8], 1, [22, 23], 2, None, "GPU", None),
    ]
    kv.events.clear()
    assert not kv.reset_prefix_cache()  # blocks in use
    kv.release([7, 1, 8, 1], 0)
    assert kv.reset_prefix_cache() and kv.events == [AllBlocksCleared()] and not kv.cached_hashes()


def _vllm_types(array_like: bool) -> tuple[Any, Any, Any, Any]:
    """vLLM's event structs as vllm/distributed/kv_events.py declares them (msgspec is what vLLM encodes
    with): the batch array_like; events tagged by class name, as maps (current) or arrays (earlier).
    Built with defstruct because this module's annotations are strings."""
    msgspec = pytest.importorskip("msgspec")
    h = int | bytes
    opts = {"array_like": array_like, "omit_defaults": True}
    stored = msgspec.defstruct(
        "BlockStored",
        [("block_hashes", list[h]), ("parent_block_hash", h | None), ("token_ids", list[int]),
         ("block_size", int), ("lora_id", int | None), ("medium", str | None), ("lora_name", str | None),
         ("extra_keys", list[Any] | None, None), ("group_idx", int | None, None),
         ("kv_cache_spec_kind", str | None, None), ("kv_cache_spec_sliding_window", int | None, None)],
        tag=True, **opts,
    )  # fmt: skip
    removed = msgspec.defstruct(
        "BlockRemoved",
        [("block_hashes", list[h]), ("medium", str | None), ("group_idx", int | None, None)],
        tag=True,
        **opts,
    )
    cleared = msgspec.defstruct("AllBlocksCleared", [], tag=True, **opts)
    batch = msgspec.defstruct(
        "EventBatch",
        [
            ("ts", float),
            ("events", list[stored | removed | cleared]),
            ("data_parallel_rank", int | None, None),
        ],
        array_like=True,
        omit_defaults=True,
    )
    return batch, stored, removed, cleared


@pytest.mark.parametrize("layout", ["map", "array"])
def test_vllms_own_msgspec_types_read_our_batches_and_we_read_theirs(layout: str) -> None:
    msgspec = pytest.importorskip("msgspec")
    Batch, VStored, VRemoved, VCleared = _vllm_types(array_like=layout == "array")
    ours = EventBatch(
        2.5,
        [
            BlockStored([2**64 - 1, 7], 3, list(range(32)), 16, 1, lora_name="a"),
            BlockRemoved([7]),
            AllBlocksCleared(),
        ],
        0,
    )
    theirs = msgspec.msgpack.Decoder(Batch).decode(encode_batch(ours, layout))
    stored, removed, cleared = theirs.events
    assert isinstance(stored, VStored) and stored.block_hashes == [2**64 - 1, 7]
    assert (stored.parent_block_hash, stored.token_ids, stored.block_size) == (3, list(range(32)), 16)
    assert (stored.lora_id, stored.medium, stored.lora_name) == (1, "GPU", "a")
    assert isinstance(removed, VRemoved) and removed.block_hashes == [7] and isinstance(cleared, VCleared)
    assert theirs.data_parallel_rank == 0
    # And a batch vLLM's encoder wrote (raw digests, VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0) decodes here.
    digest = bytes(range(32))
    vllm_payload = msgspec.msgpack.encode(
        Batch(1.0, [VStored([digest], None, list(range(16)), 16, None, "GPU", None), VCleared()], 0)
    )
    back = decode_batch(vllm_payload)
    assert back.events == [
        BlockStored([int.from_bytes(digest[-8:], "big")], None, list(range(16)), 16, None, "GPU", None),
        AllBlocksCleared(),
    ]


def test_every_vllm_hash_algorithm_chains_from_its_own_root() -> None:
    import pickle

    import cbor2
    import xxhash

    ser = {
        "sha256": lambda o: hashlib.sha256(pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL)).digest(),
        "sha256_cbor": lambda o: hashlib.sha256(cbor2.dumps(o, canonical=True)).digest(),
        "xxhash": lambda o: xxhash.xxh3_128_digest(pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL)),
        "xxhash_cbor": lambda o: xxhash.xxh3_128_digest(cbor2.dumps(o, canonical=True)),
    }
    tokens = list(range(100, 132))
    seen = set()
    for algo, h in ser.items():
        root = none_hash("0", algo)
        assert root == h("0")
        d = block_digests(tokens, 16, root, lora_name="x", algo=algo)
        assert d[0] == h((root, tuple(tokens[:16]), ("x",))) and d[1] == h((d[0], tuple(tokens[16:]), ("x",)))
        assert block_hashes(tokens, 16, root, lora_name="x", algo=algo) == [external_hash(x) for x in d]
        seen.add(d[1])
    assert len(seen) == 4
    with pytest.raises(ValueError, match="sha256_cbor"):
        none_hash("0", "md5")
