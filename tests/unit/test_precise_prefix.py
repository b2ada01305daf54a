"""The precise prefix scorer: scores from an exact index of KV events, falls back to the approximate one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingate.datastore import Datastore, Endpoint
from ingate.metrics.kvevents import BlockStored, block_hashes, new_batch, none_hash
from ingate.request import CHAT_COMPLETIONS, COMPLETIONS, InferenceRequest, parse_request
from ingate.scheduling.config import SchedulerConfig
from ingate.scheduling.framework import (
    PREFIX_MATCH_KEY,
    PREFIX_MATCH_TOKENS_KEY,
    CycleState,
    SchedulingResult,
)
from ingate.scheduling.plugins.latency import PredictedLatencyScorer
from ingate.scheduling.plugins.precise_prefix import PrecisePrefixScorer
from ingate.scheduling.plugins.prefix import PrefixCacheScorer
from ingate.scheduling.scheduler import build_scheduler
from ingate.sim.tokenizer import token_ids, tokenize

MODEL = "m"


def _req(prompt: Any, path: str = COMPLETIONS, **extra: Any) -> InferenceRequest:
    body: dict[str, Any] = {"model": MODEL, **extra}
    if path == CHAT_COMPLETIONS:
        body["messages"] = prompt
    else:
        body["prompt"] = prompt
    return parse_request(path, {}, orjson.dumps(body))


def _text(tag: str, n: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def _store(sc: PrecisePrefixScorer, ep: Endpoint, hashes: list[int]) -> None:
    sc.index.apply(ep.address, new_batch([BlockStored(hashes, None, [], 16)]))


def _setup(**params: Any) -> tuple[PrecisePrefixScorer, list[Endpoint]]:
    eps = [Endpoint(f"e{i}", f"127.0.0.{i + 1}", 8000) for i in range(3)]
    sc = PrecisePrefixScorer(**params)
    sc.attach(Datastore(eps))
    return sc, eps


def test_scores_the_leading_blocks_each_endpoint_holds() -> None:
    sc, (a, b, c) = _setup()
    text = _text("w", 160)  # 160 tokens: 10 blocks of 16
    hashes = block_hashes(token_ids(tokenize(text)), 16, none_hash("0"))
    assert len(hashes) == 10
    _store(sc, a, hashes[:4])
    _store(sc, b, hashes[:2] + hashes[3:])  # block 2 missing: only 2 leading blocks count
    _store(sc, c, [])  # tracked, holds nothing of this prompt
    ctx = CycleState()
    scores = sc.score(ctx, _req(text), [a, b, c])
    assert scores == {a: 0.4, b: 0.2, c: 0.0}
    assert ctx[PREFIX_MATCH_TOKENS_KEY] == {a: 64, b: 32}
    # Converted to characters with this prompt's own ratio, for the scorers that read characters.
    per_token = len(text) / 160
    assert ctx[PREFIX_MATCH_KEY] == {a: round(64 * per_token), b: round(32 * per_token)}


def test_hashes_follow_seed_algorithm_lora_and_cache_salt() -> None:
    sc, (a, _, _) = _setup(hash_seed="42", hash_algo="sha256")
    text = _text("s", 64)
    ids = token_ids(tokenize(text))
    root = none_hash("42", "sha256")
    _store(sc, a, block_hashes(ids, 16, root, algo="sha256", cache_salt="t1"))
    assert sc.score(CycleState(), _req(text, cache_salt="t1"), [a])[a] == 1.0
    assert sc.score(CycleState(), _req(text), [a])[a] == 0.0  # unsalted blocks are other blocks
    assert sc.score(CycleState(), _req(text, cache_salt="t2"), [a])[a] == 0.0


def test_block_size_comes_from_the_endpoint_when_not_configured() -> None:
    sc, (a, b, _) = _setup()
    a.metrics.block_size = 32
    text = _text("q", 128)
    ids = token_ids(tokenize(text))
    _store(sc, a, block_hashes(ids, 32, none_hash("0"))[:2])
    _store(sc, b, block_hashes(ids, 16, none_hash("0"))[:2])
    scores = sc.score(CycleState(), _req(text), [a, b])
    assert scores == {a: 0.5, b: 0.25}


def test_untracked_endpoints_get_the_approximate_score() -> None:
    sc, (a, b, c) = _setup()
    text = _text("p", 200)
    # b served this prompt before (the approximate index remembers); no endpoint publishes events yet.
    ctx = CycleState()
    sc.score(ctx, _req(text), [a, b, c])
    sc.post_schedule(ctx, _req(text), SchedulingResult([b], "p"))
    ref = PrefixCacheScorer()
    ref_ctx = CycleState()
    ref.score(ref_ctx, _req(text), [a, b, c])
    ref.post_schedule(ref_ctx, _req(text), SchedulingResult([b], "p"))
    got = sc.score(CycleState(), _req(text), [a, b, c])
    assert got == ref.score(CycleState(), _req(text), [a, b, c])
    assert got[b] > 0.9 and got[a] == got[c] == 0.0
    # Once a's events are indexed, a is scored precisely; b and c still approximately.
    _store(sc, a, block_hashes(token_ids(tokenize(text)), 16, none_hash("0"))[:3])
    ctx = CycleState()
    got = sc.score(ctx, _req(text), [a, b, c])
    assert got[a] == pytest.approx(3 / 12) and got[b] > 0.9 and got[c] == 0.0
    assert set(ctx[PREFIX_MATCH_KEY]) == {a, b} and set(ctx[PREFIX_MATCH_TOKENS_KEY]) == {a}


def _word_level_tokenizer(tmp_path: Path, words: list[str]) -> Path:
    vocab = {"[UNK]": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": 1,
                "content": "<s>",
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    }
    p = tmp_path / "tokenizer.json"
    p.write_text(json.dumps(spec))
    return tmp_path


def test_huggingface_tokenizer_for_completions_and_fallback_for_chat(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    words = [f"t{i}" for i in range(64)]
    sc, (a, b, _) = _setup(
        tokenizer="huggingface", tokenizer_path=str(_word_level_tokenizer(tmp_path, words))
    )
    text = " ".join(words[:47])  # BOS + 47 words = 48 tokens = 3 blocks
    ids = [1] + [i + 2 for i in range(47)]
    _store(sc, a, block_hashes(ids, 16, none_hash("0")))
    _store(sc, b, [])
    assert sc.score(CycleState(), _req(text), [a, b]) == {a: 1.0, b: 0.0}
    # Chat needs the chat template: every endpoint is scored approximately (nothing remembered: 0).
    ctx = CycleState()
    chat = _req([{"role": "user", "content": text}], CHAT_COMPLETIONS)
    assert sc.score(ctx, chat, [a, b]) == {a: 0.0, b: 0.0}
    assert PREFIX_MATCH_TOKENS_KEY not in ctx


def test_chat_with_the_sim_tokenizer_uses_the_rendered_messages() -> None:
    from ingate.sim.tokenizer import chat_prompt

    sc, (a, _, _) = _setup()
    msgs = [{"role": "system", "content": _text("sys", 40)}, {"role": "user", "content": "hi"}]
    hashes = block_hashes(token_ids(tokenize(chat_prompt(msgs))), 16, none_hash("0"))
    _store(sc, a, hashes)
    assert sc.score(CycleState(), _req(msgs, CHAT_COMPLETIONS), [a])[a] == 1.0


def test_predicted_latency_counts_the_precise_match_as_cached() -> None:
    sc, (a, b, _) = _setup()
    text = _text("x", 800)  # 50 blocks
    _store(sc, a, block_hashes(token_ids(tokenize(text)), 16, none_hash("0")))
    _store(sc, b, [])
    lat = PredictedLatencyScorer(chars_per_token=len(text) / 800, scale=1.0)
    ctx = CycleState()
    sc.score(ctx, _req(text), [a, b])
    costs = lat.score(ctx, _req(text), [a, b])
    assert costs[a] == pytest.approx(1.0) and costs[b] == pytest.approx(0.0)


def test_bad_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="hashAlgo"):
        PrecisePrefixScorer(hash_algo="md5")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        PrecisePrefixScorer(tokenizer="bpe")
    with pytest.raises(ValueError, match="tokenizerPath"):
        PrecisePrefixScorer(tokenizer="huggingface")
    with pytest.raises(ValueError, match="topic"):
        PrecisePrefixScorer(topic="kv@{model}")
    with pytest.raises(ValueError, match="fallback"):
        PrecisePrefixScorer(fallback={"noSuchThing": 1})
    sc = PrecisePrefixScorer(fallback={"blockChars": 32})
    assert sc.approx.block_chars == 32


def test_builtin_profile_and_yaml_parameters() -> None:
    cfg = SchedulerConfig.model_validate(
        {
            "profiles": {
                "p": {
                    "scorers": [
                        {
                            "type": "precise-prefix",
                            "parameters": {"eventsPortOffset": 100, "replayPortOffset": 200, "hashSeed": "7"},
                        }
                    ]
                }
            }
        }
    )
    ep = Endpoint("e", "127.0.0.5", 8000)
    sched = build_scheduler(cfg, Datastore([ep]))
    sc = sched.profiles["p"].scorers[0][0]
    assert isinstance(sc, PrecisePrefixScorer)
    src = sc.source(ep)
    assert (src.endpoint, src.replay_endpoint) == ("tcp://127.0.0.5:8100", "tcp://127.0.0.5:8200")
    names = [s.name for s, _ in sched.profiles["precise-prefix"].scorers]
    assert "precise-prefix" in names and "prefix-cache" not in names


def test_scoring_outside_an_event_loop_does_not_subscribe() -> None:
    sc, (a, _, _) = _setup()
    sc.score(CycleState(), _req(_text("z", 40)), [a])
    assert sc.subscriptions is None


@pytest.mark.parametrize(
    "text",
    [
        "hello   wonderful-world",
        " lead and trail ",
        "x" * 5000,
        " ".join(f"w{i}" for i in range(3000)),
        "a\\nb\\tc " * 900 + "supercalifragilistic " * 200,
    ],
)
def test_sim_tokenizer_pieces_give_the_simulators_ids(text: str) -> None:
    from ingate.scheduling.tokenization import SimTokenizer

    tok = SimTokenizer(segment_chars=64)
    assert tok.ids(text) == token_ids(tokenize(text))
    assert tok.ids(text) == token_ids(tokenize(text))  # again, from the memo
    assert tok.ids(text + " more words") == token_ids(tokenize(text + " more words"))


def test_a_new_prefix_counts_as_held_by_its_target_until_its_events_can_show_it() -> None:
    from ingate.lifecycle import ResponseInfo

    sc, (a, b, _) = _setup(speculative_grace_ms=0.0)
    _store(sc, a, [])
    _store(sc, b, [])
    head = _text("sys", 400)
    first, second = _req(head + " " + _text("u", 40)), _req(head + " " + _text("v", 40))
    ctx1 = CycleState()
    assert sc.score(ctx1, first, [a, b]) == {a: 0.0, b: 0.0}
    sc.post_schedule(ctx1, first, SchedulingResult([b], "p"))
    # Its follower goes where the head is being prefilled, before any event says so.
    ctx2 = CycleState()
    got = sc.score(ctx2, second, [a, b])
    assert got[a] == 0.0 and got[b] > 0.8
    assert ctx2[PREFIX_MATCH_KEY][b] > 0 and ctx2[PREFIX_MATCH_TOKENS_KEY][b] > 0
    # After the first token (and the grace, here 0) only the events count: b never reported the blocks.
    sc.on_first_token(ctx1, first, b)
    assert sc.score(CycleState(), second, [a, b]) == {a: 0.0, b: 0.0}
    # A failed request's entry is dropped at once.
    ctx3 = CycleState()
    sc.score(ctx3, first, [a, b])
    sc.post_schedule(ctx3, first, SchedulingResult([a], "p"))
    assert sc.score(CycleState(), second, [a, b])[a] > 0.8
    sc.post_response(ctx3, first, a, ResponseInfo(status=503))
    assert sc.score(CycleState(), second, [a, b])[a] == 0.0


def test_speculative_grace_runs_on_the_scorers_clock() -> None:
    # The scheduling replay runs in virtual time: the grace after the first token must be measured on
    # the clock it sets, not wall time (else entries outlive their grace by whole virtual minutes).
    now = [100.0]
    sc, (a, b, _) = _setup(speculative_grace_ms=500.0)
    sc.clock = lambda: now[0]
    _store(sc, a, [])
    _store(sc, b, [])
    head = _text("sys", 400)
    first, second = _req(head + " " + _text("u", 40)), _req(head + " " + _text("v", 40))
    ctx1 = CycleState()
    sc.score(ctx1, first, [a, b])
    sc.post_schedule(ctx1, first, SchedulingResult([b], "p"))
    sc.on_first_token(ctx1, first, b)
    now[0] += 0.4
    assert sc.score(CycleState(), second, [a, b])[b] > 0.8  # within the grace
    now[0] += 0.2
    assert sc.score(CycleState(), second, [a, b]) == {a: 0.0, b: 0.0}


def test_speculation_can_be_turned_off() -> None:
    sc, (a, b, _) = _setup(speculative=False)
    _store(sc, a, [])
    _store(sc, b, [])
    head = _text("sys", 400)
    ctx = CycleState()
    sc.score(ctx, _req(head + " x"), [a, b])
    sc.post_schedule(ctx, _req(head + " x"), SchedulingResult([b], "p"))
    assert sc.score(CycleState(), _req(head + " y"), [a, b]) == {a: 0.0, b: 0.0}


async def test_subscriptions_start_on_the_first_score_and_follow_the_pool() -> None:
    import asyncio

    eps = [Endpoint(f"e{i}", "127.0.0.1", 18000 + i) for i in range(3)]
    ds = Datastore(eps)
    sc = PrecisePrefixScorer(events_port_offset=1000, replay_port_offset=2000)
    sc.attach(ds)
    try:
        sc.score(CycleState(), _req(_text("a", 20)), eps)
        await asyncio.sleep(0.05)  # the sync runs in the background
        assert sc.subscriptions is not None
        subs = sc.subscriptions.subscribers
        assert sorted(subs) == [e.address for e in eps]
        assert subs[eps[0].address].endpoint == "tcp://127.0.0.1:19000"
        assert subs[eps[0].address].replay_endpoint == "tcp://127.0.0.1:20000"
        _store(sc, eps[2], [1, 2, 3])
        ds.remove(eps[2].address)
        sc.score(CycleState(), _req(_text("a", 20)), eps[:2])
        await asyncio.sleep(0.05)
        assert sorted(sc.subscriptions.subscribers) == [e.address for e in eps[:2]]
        assert not sc.index.tracks(eps[2].address)  # its entries went with it
    finally:
        await sc.aclose()
    assert sc.subscriptions.subscribers == {}
