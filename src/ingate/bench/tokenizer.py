"""A Hugging Face-format tokenizer that counts tokens exactly like the simulator, for inference-perf.

inference-perf always loads a tokenizer with `AutoTokenizer.from_pretrained(dir)`; nothing can be
downloaded here, so `ingate bench tokenizer OUT_DIR` writes `tokenizer.json` + `tokenizer_config.json`
built offline with the `tokenizers` library. The rule is the simulator's (`ingate.sim.tokenizer`):
split on whitespace, then cut every word into chunks of at most 8 characters; each chunk is one token.
Known words (the simulator's output vocabulary and the bench prompt words) get their own ids; any other
chunk maps to `[UNK]`, which keeps counts exact.
"""

from __future__ import annotations

import json
from pathlib import Path

from ingate.bench.workload import _WORDS
from ingate.sim.tokenizer import MAX_TOKEN_CHARS, VOCAB


def build_tokenizer(out_dir: str | Path) -> Path:
    """Write an HF-format tokenizer directory to `out_dir` and return its path."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    words = ["[UNK]", "<|endoftext|>"]
    for w in [*VOCAB, *_WORDS]:
        if w not in words:
            words.append(w)
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(f".{{1,{MAX_TOKEN_CHARS}}}"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with single spaces
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "[UNK]",
        "eos_token": "<|endoftext|>",
        "model_max_length": 1_000_000,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
