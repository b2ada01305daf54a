"""Write a tiny, randomly initialised Llama with a local word-level tokenizer (no download).

Run with the Python of the vLLM venv (it has torch and transformers): ``python make_tiny_llama.py DIR``.
The model (hidden 128, 2 layers of 2 heads, vocabulary 1,000) only has to be served by real vLLM on CPU: its
outputs are noise, its metrics, usage reports and KV-cache events are real.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VOCAB = 1000
SPECIAL = ["<unk>", "<s>", "</s>"]


def tokenizer_json() -> dict[str, object]:
    words = [f"w{i}" for i in range(VOCAB - len(SPECIAL))]
    vocab = {t: i for i, t in enumerate(SPECIAL + words)}
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL)
    ]
    bos = {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": bos,
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": False},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }


def main(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64: vLLM's CPU attention has no kernel for 16
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json()))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": 4096,
                "chat_template": "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}",
            }
        )
    )
    print(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
