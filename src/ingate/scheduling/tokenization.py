"""Prompt token ids as the model server computes them, for precise prefix-cache routing.

vLLM hashes KV blocks over token ids, so a router that wants to reproduce its block hashes must tokenise
the prompt exactly as the server does. A `Tokenizer` turns a parsed request into those ids, or None when
it cannot (then the precise scorer falls back to the approximate one for that request):

- `SimTokenizer` (``kind: sim``): the simulator's rule (`ingate.sim.tokenizer`), completions and chat;
- `HFTokenizer` (``kind: huggingface``): a Hugging Face ``tokenizer.json`` from a local path (Rust
  `tokenizers`, no download). It encodes completion prompts as vLLM does (special tokens added, e.g.
  Llama's BOS). Chat requests need the model's chat template, which it does not apply: it returns None
  for them.

Token-id prompts (``"prompt": [1, 2, 3]``) are taken as given by both. Tokenisation runs inside the
scheduling decision (it is synchronous and CPU-bound); its cost is measured in
``benchmarks/scheduling/decision_latency.py``.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

from ingate.request import CHAT_COMPLETIONS, InferenceRequest


class Tokenizer(Protocol):
    """Token ids of a request's prompt as the model server computes them, or None if unknown."""

    def encode(self, request: InferenceRequest) -> list[int] | None: ...


def _id_prompt(prompt: Any) -> list[int] | None:
    if isinstance(prompt, list) and prompt and all(type(t) is int and t >= 0 for t in prompt):
        return prompt
    return None


def _text_prompt(prompt: Any) -> str | None:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) and prompt else None


class SimTokenizer:
    """The simulator's tokenisation (`ingate.sim.tokenizer`): exact for simulated fleets.

    Made cheap for shared heads: the rule splits at whitespace only, so a prompt cut at whitespace
    tokenises piece by piece. Prompts are cut at the first whitespace after every `segment_chars`
    characters (positions that depend only on the text before them, so two prompts with the same head
    cut it the same way) and each piece's ids are memoised (bounded LRU): a system prompt seen before
    costs a dictionary lookup per piece.
    """

    def __init__(self, segment_chars: int = 2048, segments: int = 1024) -> None:
        from ingate.sim import (
            tokenizer as simtok,
        )  # imported here: the gateway does not otherwise load the sim

        self._sim = simtok
        self.segment_chars = segment_chars
        self.segments = segments
        self._memo: OrderedDict[str, list[int]] = OrderedDict()

    def _ids(self, text: str) -> list[int]:
        words = text.split()
        if max(map(len, words), default=0) > self._sim.MAX_TOKEN_CHARS:
            words = self._sim.tokenize(text)  # long runs are cut into 8-character tokens
        return self._sim.token_ids(words)

    def ids(self, text: str) -> list[int]:
        """Token ids of `text`, as `ingate.sim.tokenizer.token_ids(tokenize(text))`."""
        out: list[int] = []
        memo, step, n, start = self._memo, self.segment_chars, len(text), 0
        while start < n:
            cut = text.find(" ", start + step) if start + step < n else -1
            end = n if cut < 0 else cut
            seg = text[start:end]
            got = memo.get(seg)
            if got is None:
                got = memo[seg] = self._ids(seg)
                if len(memo) > self.segments:
                    memo.popitem(last=False)
            else:
                memo.move_to_end(seg)
            out += got
            start = end
        return out

    def encode(self, request: InferenceRequest) -> list[int] | None:
        body = request.body
        if request.path == CHAT_COMPLETIONS:
            messages = body.get("messages")
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                return None
            return self.ids(self._sim.chat_prompt(messages))
        prompt = body.get("prompt")
        ids = _id_prompt(prompt)
        if ids is not None:
            return ids
        text = _text_prompt(prompt)
        return self.ids(text) if text is not None else None


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (local file or a directory holding one); completions only."""

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError:  # an optional dependency (pip install 'ingate[bench]' or tokenizers)
            raise ValueError("tokenizer 'huggingface' needs the tokenizers package") from None

        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise ValueError(f"tokenizerPath {path!r}: no tokenizer.json there")
        self._tok = _HF.from_file(str(p))

    def encode(self, request: InferenceRequest) -> list[int] | None:
        if request.path == CHAT_COMPLETIONS:
            return None  # needs the chat template, which tokenizer.json does not carry
        prompt = request.body.get("prompt")
        ids = _id_prompt(prompt)
        if ids is not None:
            return ids
        text = _text_prompt(prompt)
        if text is None:
            return None
        out: list[int] = self._tok.encode(text, add_special_tokens=True).ids
        return out


TOKENIZER_KINDS = ("sim", "huggingface")


def make_tokenizer(kind: str, path: str = "") -> Tokenizer:
    """The tokenizer of `kind` (``sim`` or ``huggingface`` with a local `path`)."""
    if kind == "sim":
        return SimTokenizer()
    if kind == "huggingface":
        if not path:
            raise ValueError(
                "tokenizer 'huggingface' needs tokenizerPath (a tokenizer.json or its directory)"
            )
        return HFTokenizer(path)
    raise ValueError(f"unknown tokenizer {kind!r} (known: {', '.join(TOKENIZER_KINDS)})")
