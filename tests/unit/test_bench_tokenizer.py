"""`ingate bench tokenizer`: the HF tokenizer counts tokens exactly like the simulator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ingate.bench.tokenizer import build_tokenizer
from ingate.sim.tokenizer import count_tokens

tokenizers = pytest.importorskip("tokenizers", reason="tokenizers (bench extra) not installed")


@pytest.mark.parametrize(
    "text",
    [
        "hello   wonderful-world",
        "the of and to in is it",
        "alpha bravo\ncharlie <|user|> supercalifragilistic x",
        "",
        "a" * 17,
    ],
)
def test_counts_match_simulator(tmp_path: Path, text: str) -> None:
    out = build_tokenizer(tmp_path / "tok")
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert len(tok.encode(text, add_special_tokens=False).ids) == count_tokens(text)


def test_config_names_fast_tokenizer_class(tmp_path: Path) -> None:
    out = build_tokenizer(tmp_path / "tok")
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.decode(tok.encode("the of and").ids) == "the of and"
