"""The simulator's tokenisation: deterministic, documented, no download.

Rule: a token is a maximal run of non-whitespace characters, with runs longer than 8 characters split
into chunks of 8. Whitespace only separates tokens. So ``"hello   wonderful-world"`` is
``["hello", "wonderfu", "l-world"]``. Generated output is made of short vocabulary words separated by a
single space, so re-tokenising a completion gives exactly ``completion_tokens``. The same rule is
reproduced as a Hugging Face `tokenizers` tokenizer by ``ingate bench tokenizer`` for inference-perf.
Token ids (`token_id`) are what KV block hashes, KV-cache events and ``/v1/completions/render`` use.
"""

from __future__ import annotations

import xxhash

MAX_TOKEN_CHARS = 8

# Output vocabulary: short words (each a single token under the rule above).
VOCAB = (
    "the of and to in is it that for on with as was at by an be this from or are not but have all "
    "they we can one has more will out up so if about its when two which do time their any may new"
).split()


def tokenize(text: str) -> list[str]:
    """Split `text` into tokens by the rule in the module docstring."""
    out: list[str] = []
    for word in text.split():
        if len(word) <= MAX_TOKEN_CHARS:
            out.append(word)
        else:
            out.extend(word[i : i + MAX_TOKEN_CHARS] for i in range(0, len(word), MAX_TOKEN_CHARS))
    return out


def count_tokens(text: str) -> int:
    """Number of tokens of `text` (same rule as `tokenize`)."""
    n = 0
    for word in text.split():
        n += (len(word) + MAX_TOKEN_CHARS - 1) // MAX_TOKEN_CHARS
    return n


def chat_prompt(messages: list[dict[str, object]]) -> str:
    """Render chat messages the way a chat template would: a role marker token before each message."""
    parts: list[str] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = " ".join(
                str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
            )
        parts.append(f"<|{m.get('role', 'user')}|> {content if isinstance(content, str) else ''}")
    parts.append("<|assistant|>")
    return "\n".join(parts)


VOCAB_SIZE = 128_256
"""Token ids lie in [0, VOCAB_SIZE), the size of Llama 3's vocabulary."""


def token_id(token: str) -> int:
    """The id of one token: a fixed hash of its text into the vocabulary (no vocabulary file).

    Different strings can share an id (as in no real tokenizer), but a prompt's ids, and so its KV block
    hashes, are a pure function of its text: equal prompts give equal blocks on every replica and in
    every run.
    """
    return xxhash.xxh32_intdigest(token.encode()) % VOCAB_SIZE


def token_ids(tokens: list[str]) -> list[int]:
    """`token_id` of each token."""
    return [xxhash.xxh32_intdigest(t.encode()) % VOCAB_SIZE for t in tokens]


_CYCLE_TOKENS = len(VOCAB) * 64
_CYCLE = "".join(" " + VOCAB[i % len(VOCAB)] for i in range(2 * _CYCLE_TOKENS))
_OFFSETS = [0]
for _i in range(2 * _CYCLE_TOKENS):
    _OFFSETS.append(_OFFSETS[-1] + 1 + len(VOCAB[_i % len(VOCAB)]))
_CYCLE_BYTES = _CYCLE.encode()


def output_text(start: int, count: int) -> str:
    """`count` generated tokens, deterministic in their position, each preceded by a space."""
    return output_bytes(start, count).decode()


def output_bytes(start: int, count: int) -> bytes:
    """`output_text` as UTF-8 bytes, sliced from a precomputed cycle (the streaming hot path)."""
    if count <= _CYCLE_TOKENS:
        a = start % _CYCLE_TOKENS  # the cycle length is a multiple of the vocabulary size
        return _CYCLE_BYTES[_OFFSETS[a] : _OFFSETS[a + count]]
    n = len(VOCAB)
    return "".join(" " + VOCAB[(start + i) % n] for i in range(count)).encode()
